"""Deciding one step's routing: valid tokens -> scores -> order (policy) -> buckets -> per-block active sets.

:class:`Planner` is the whole decision, with no hooks in it: given a forward's
valid tokens, its logits (only when the policy scores tokens), the curriculum
progress and a seed, it returns the :class:`~cggr.routing.Routing` the backward
carries. The router (:mod:`cggr.router`) only calls it at the end of each
training forward. Its only state is caches (device constants, generators).
"""

from __future__ import annotations

import logging
import math

import torch

from . import sampling
from ._host import HostCopy
from .bucketing import (POLICY_FNS, buckets_to_depths, curriculum_depths, curriculum_fractions, rank_buckets,
                        rank_buckets_global, target_depths)
from .config import RoutingConfig
from .routing import (BackwardDraws, Routing, VarianceProbe, block_counts, dense_end_blocks, nested_active_counts,
                      nested_rows, per_block_counts)
from .scoring import Scores, score_difficulty, scores_for

# Policies that need per-token scores (hence logits); "random" needs only the valid tokens.
SCORING_POLICIES = ("difficulty", "sampled")


class Planner:
    """Decides the routing of a forward from its inputs and the config."""

    def __init__(self, config: RoutingConfig, num_layers: int, sparse_blocks: list[bool]):
        self.config = config
        self.num_layers = num_layers
        self.targets = target_depths(num_layers, config.num_buckets, config.depths)
        if config.block_fractions is not None and len(config.block_fractions) != num_layers:
            raise ValueError(f"block_fractions has {len(config.block_fractions)} fractions for a stack of "
                             f"{num_layers} blocks: give one per block, bottom first")
        self.sparse_blocks = list(sparse_blocks)
        self._constants: dict[tuple, torch.Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        # variance_budget: each block's kept fraction from the last measurement (None until the first one)
        self.budget_fractions: list[float] | None = None

    @property
    def needs_scores(self) -> bool:
        return self.config.policy in SCORING_POLICIES

    @property
    def needs_counts(self) -> bool:
        """Whether a sparse backward will need every block's active count on the host."""
        return self.config.placement == "per_block" or (self.config.leak_rate == 0 and any(self.sparse_blocks))

    def bucket_depths(self, progress: float) -> list[int]:
        """Depth in blocks of each bucket at curriculum ``progress``, hardest first."""
        return curriculum_depths(self.targets, self.num_layers, progress)

    @torch.no_grad()
    def decide_into(self, routing: Routing, valid: torch.Tensor, logits: torch.Tensor | None, *,
                    scores: Scores | None = None, progress: float,
                    draw_seed: int, num_valid: int | None = None, global_buckets: bool = False,
                    importance: torch.Tensor | None = None, measure: bool = False
                    ) -> tuple[Routing, torch.Tensor]:
        """Decide the routing of one forward into ``routing`` (the object its routed ops captured when they ran;
        undecided until now), through its one write of the decision (:meth:`Routing.decide`); returns it and
        ``[tokens with non-finite logits, those of them below full depth]`` as a device tensor (for a warning read
        later, without a synchronisation).

        Args:
            valid: bool mask of the valid tokens (the token grid's shape).
            logits: ``[*valid.shape, vocab]`` or None (needed by the scoring policies unless ``scores`` are
                given; used for the non-finite check and the score metrics when given).
            scores: per-token scores already computed (by a fused loss, :mod:`cggr.loss`), instead of logits.
            progress: curriculum progress in [0, 1].
            draw_seed: seed of this forward's random draws.
            num_valid: the number of valid tokens when already on the host (per-rank buckets: every block's
                count then follows without reading anything back).
            global_buckets: rank the valid tokens of all data-parallel ranks together.
            importance: ``importance="loss"``: each token's ``||softmax(z) - onehot(y)||`` (the token grid's shape).
            measure: record every block's output-gradient row norms in the backward (``variance_budget``).
        """
        c, L = self.config, self.num_layers
        if scores is None and logits is not None:
            scores = score_difficulty(logits, c.scorer)
        elif scores is not None:
            scores = scores_for(scores, c.scorer)
        difficulty = scores.difficulty if scores is not None else torch.zeros(valid.shape, device=valid.device)
        finite = torch.isfinite(difficulty)
        nonfinite = valid & ~finite
        rank = rank_buckets_global if global_buckets else rank_buckets
        generator = self._generator(valid.device, draw_seed)
        if c.placement == "per_block":
            n = num_valid if num_valid is not None else int(valid.sum())
            counts, block_active, rows, weight, draws = self._place_per_block(valid, nonfinite, n, progress,
                                                                              generator, importance, draw_seed)
            depth = block_active.long().sum(0).view(valid.shape)
            probe = None if not measure else VarianceProbe(
                torch.zeros((L, valid.numel()), dtype=torch.float32, device=valid.device), valid.reshape(-1),
                None if importance is None else importance.reshape(-1))
            metrics = self._metrics(depth, self._constant(tuple(counts), valid.device), None, valid, finite, scores)
            routing.decide(depth, block_active=block_active, block_rows=rows, counts=counts, branch_weight=weight,
                           backward_draws=draws, probe=probe, metrics=metrics)
            return routing, torch.stack([metrics["nonfinite_tokens"], (nonfinite & (depth < L)).sum()])
        if scores is None:  # random policy without logits: only the valid tokens matter
            buckets = POLICY_FNS["random"](None, valid, c.num_buckets, generator, rank)
        else:
            buckets = POLICY_FNS[c.policy](difficulty, valid, c.num_buckets, generator, rank)
        bucket_depths = self.bucket_depths(progress)
        depth = buckets_to_depths(buckets, self._constant((0, *bucket_depths), valid.device))
        depth = torch.where(nonfinite, torch.full_like(depth, L), depth)  # no distribution: full depth
        counts = order = None
        if self.needs_counts and not global_buckets:
            # Bucket sizes follow from the number of valid tokens: every block's count without a read-back.
            n = num_valid if num_valid is not None else int(valid.sum())
            counts = block_counts(n, L, bucket_depths)
            depth, order = nested_rows(depth, self._constant(tuple(counts), valid.device), L)
        active = nested_active_counts(depth, L)
        if self.needs_counts and global_buckets:
            counts = active.tolist()  # global buckets: the step's one read-back, here rather than mid-backward
        metrics = self._metrics(depth, active, buckets, valid, finite, scores)
        routing.decide(depth, counts=counts, order=order, metrics=metrics)
        return routing, torch.stack([metrics["nonfinite_tokens"], (nonfinite & (depth < L)).sum()])

    def measure_budget(self, probe: VarianceProbe) -> list[float]:
        """``variance_budget``: each routed block's kept fraction from a measured forward's output-gradient norms,
        the smallest whose draw adds at most ``tau`` of the minibatch's variance
        (:func:`cggr.sampling.smallest_k_for_budget`; the dense end blocks keep every row). Stored for the next
        forwards and returned. Synchronises (twice), once every ``variance_every`` steps."""
        c, L = self.config, self.num_layers
        ends = dense_end_blocks(c.dense_ends, L)
        routed = list(range(ends, L - ends))
        fractions = [1.0] * L
        if routed:
            # The draw's inclusion probabilities: uniform, the loss's importance, or the block's own sizes.
            alpha = math.inf if c.importance == "uniform" else c.importance_mix
            ks = sampling.smallest_k_for_budget(probe.sizes[routed], probe.valid.expand(len(routed), -1),
                                                c.variance_budget, alpha, importance=probe.importance)
            n = max(1, int(probe.valid.sum()))
            for b, k in zip(routed, ks):
                fractions[b] = k / n
        self.budget_fractions = fractions
        return fractions

    def block_fractions(self, progress: float) -> list[float] | None:
        """Each block's kept fraction at curriculum ``progress`` (:func:`~cggr.bucketing.curriculum_fractions`:
        every row at 0) when the fractions are given (``block_fractions``) or measured (``variance_budget``:
        every row until the first measurement); None when they follow the buckets."""
        c = self.config
        if c.variance_budget is not None:
            return curriculum_fractions(self.budget_fractions or [1.0] * self.num_layers, progress)
        if c.block_fractions is not None:
            return curriculum_fractions(c.block_fractions, progress)
        return None

    def _place_per_block(self, valid, nonfinite, n: int, progress: float, generator,
                         importance: torch.Tensor | None, draw_seed: int):
        """Each block's own subset of exactly ``counts[i]`` valid tokens: ``(counts, block_active [L, tokens],
        each block's rows, the rows' weights or None, the backward draws or None)``, for :meth:`Routing.decide`.

        Uniform draws put tokens with non-finite logits first (they have no distribution: full depth); the
        importance draws (:mod:`cggr.sampling`) treat a non-finite importance as the largest. With
        ``estimator="unbiased"`` every kept row gets its weight ``1/pi`` (the routing's ``branch_weight``); with
        ``importance="block"`` the routed blocks' rows are drawn later, in each block's backward.
        """
        c, L = self.config, self.num_layers
        nested = block_counts(n, L, self.bucket_depths(progress))
        counts = per_block_counts(n, L, nested, c.dense_ends, self.block_fractions(progress))
        N = valid.numel()
        flat_valid = valid.reshape(N)
        if c.importance == "loss":
            d = sampling.draw(c.sampler, importance.reshape(N), flat_valid, counts, alpha=c.importance_mix,
                              generator=generator)
            block_active, rows, weight = d.mask, d.rows, d.weight
        else:
            keys = torch.rand((L, N), device=valid.device, generator=generator)
            keys = torch.where(nonfinite.reshape(1, N), 2.0, keys)  # no distribution: in every block first
            keys = torch.where(flat_valid.reshape(1, N), keys, -1.0)  # invalid tokens never
            order = torch.argsort(keys, dim=1, descending=True)
            rows = [order[i, :counts[i]] for i in range(L)]
            position = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(L, N))
            block_active = position < self._constant(tuple(counts), valid.device)[:, None]
            # A uniform draw of k of n rows: pi = k / n (a block keeping every valid row: weight 1).
            weight = None if c.estimator == "plain" else torch.where(
                block_active, self._constant(tuple(n / max(k, 1) for k in counts), valid.device, torch.float32)[:, None],
                0.0)
        draws = None
        if c.importance == "block":
            # Blocks that keep every valid row need no draw; the others draw in their backward.
            pending = {i for i, k in enumerate(counts) if k < n}
            routed = self._constant(tuple(i in pending for i in range(L)), valid.device) != 0
            block_active = block_active & ~routed[:, None]
            weight = torch.where(block_active, 1.0, 0.0)
            rows = [r if i not in pending else r[:0] for i, r in enumerate(rows)]
            draws = BackwardDraws(counts=list(counts), pending=pending, valid=flat_valid, sampler=c.sampler,
                                  alpha=c.importance_mix, generator=generator, seed=draw_seed)
        # Drawn in the backward or not, each block keeps counts[i] rows.
        return counts, block_active, rows, weight, draws

    def _metrics(self, depth: torch.Tensor, active: torch.Tensor, buckets, valid, finite, scores: Scores | None
                 ) -> dict[str, torch.Tensor]:
        """The decision's metrics, from each token's ``depth`` and each block's ``active`` rows (a device tensor;
        per-block placement: the rows each block keeps, some maybe drawn only in the backward)."""
        c, L = self.config, self.num_layers
        n_valid = valid.sum()
        denom = n_valid.clamp_min(1).float()
        out = {}
        if buckets is not None:
            counts = torch.zeros(c.num_buckets + 1, dtype=torch.long, device=depth.device)
            counts.scatter_add_(0, (buckets + 1).reshape(-1), torch.ones_like(buckets).reshape(-1))
            out = {f"bucket_{k}_fraction": counts[k + 1].float() / denom for k in range(c.num_buckets)}
        out["valid_tokens"] = n_valid
        out["mean_depth_fraction"] = active.sum().float() / (denom * L)
        # Backward block work skipped: rows inactive in each sparse-routed block, over all rows of all blocks.
        n = depth.numel()
        sparse = self._constant(tuple(self.sparse_blocks), depth.device) != 0
        inactive = torch.where(sparse, n - active, torch.zeros_like(sparse, dtype=torch.long))
        skipped = inactive.sum().float() / max(1, n * L)
        out["backward_flops_skipped"] = skipped if c.leak_rate == 0 else torch.zeros_like(skipped)
        if scores is not None:
            ok = valid & finite
            n_ok = ok.sum().clamp_min(1).float()
            zero = torch.zeros((), device=depth.device)
            out["mean_entropy"] = torch.where(ok, scores.entropy, zero).sum() / n_ok
            out["mean_confidence"] = torch.where(ok, scores.confidence, zero).sum() / n_ok
        out["nonfinite_tokens"] = (valid & ~finite).sum()
        return out

    def _constant(self, values: tuple, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """A small tensor of ``values`` on ``device``, made once: ``torch.tensor(..., device=cuda)`` would
        synchronise the host with the GPU at every call (a copy from pageable memory)."""
        key = (values, device, dtype)
        t = self._constants.get(key)
        if t is None:
            if len(self._constants) > 1024:  # batch shapes and curriculum steps seen: a handful in practice
                self._constants.clear()
            host = torch.tensor(values, dtype=dtype)
            if device.type == "cuda":
                host = host.pin_memory()
            t = self._constants[key] = host.to(device, non_blocking=True)
        return t

    def _generator(self, device: torch.device, seed: int) -> torch.Generator | None:
        if self.config.policy == "difficulty":
            return None
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        g.manual_seed(seed % (2**63))
        return g

    def __getstate__(self):
        # Caches only: generators and device constants are rebuilt on first use (a Generator does not pickle).
        return {**self.__dict__, "_constants": {}, "_generators": {}}


class NonfiniteReport:
    """Warns once about tokens with non-finite logits, when their count has reached the host: it never waits
    for the GPU (the count of one forward is read at a later forward, once its copy has landed)."""

    def __init__(self):
        self._pending: HostCopy | None = None
        self._warned = False

    def offer(self, summary: torch.Tensor) -> None:
        """``summary``: ``[tokens with non-finite logits, those of them below full depth]`` (from decide_into)."""
        if not self._warned:
            self._pending = HostCopy(summary)
            self.report()

    def report(self) -> None:
        pending = self._pending
        if pending is None or not pending.ready():
            return
        self._pending = None
        n, overflow = pending.get()
        if n and not self._warned:
            self._warned = True
            how = ("at full depth" if not overflow else
                   "at full depth as far as the blocks' row counts, which follow the bucket sizes, had room; "
                   "the rest got less (routing.depth says how much). With their loss counted, the step's "
                   "gradient is non-finite either way")
            logging.getLogger("cggr").warning(
                "cggr: %s token(s) had non-finite logits (NaN or +inf); they were routed %s. The metric "
                "'nonfinite_tokens' counts them", n, how)

    def __getstate__(self):
        return {**self.__dict__, "_pending": None}  # a pending device read does not pickle (CUDA events)
