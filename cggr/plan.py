"""Deciding one step's routing: valid tokens -> scores -> order (policy) -> buckets -> per-block active sets.

:class:`Planner` is the whole decision, with no hooks in it: given a forward's
valid tokens, its logits (only when the policy scores tokens), the curriculum
progress and a seed, it returns the :class:`~cggr.routing.Routing` the backward
carries. The router (:mod:`cggr.router`) only calls it at the end of each
training forward. Its only state is caches (device constants, generators).
"""

from __future__ import annotations

import logging

import torch

from ._host import HostCopy
from .bucketing import (POLICY_FNS, buckets_to_depths, curriculum_depths, curriculum_fractions, rank_buckets,
                        rank_buckets_global, target_depths)
from .config import RoutingConfig
from .routing import Routing, block_counts, per_block_counts
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
                    draw_seed: int, num_valid: int | None = None, global_buckets: bool = False
                    ) -> tuple[Routing, torch.Tensor]:
        """Decide the routing of one forward into ``routing`` (the object its routed ops captured when they ran;
        it holds nothing yet); returns it and ``[tokens with non-finite logits, those of them below full depth]``
        as a device tensor (for a warning read later, without a synchronisation).

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
            self._place_per_block(routing, valid, nonfinite, n, progress, generator)
            routing.metrics = self._metrics(routing, None, valid, finite, scores)
            return routing, torch.stack([routing.metrics["nonfinite_tokens"],
                                         (nonfinite & (routing.depth < L)).sum()])
        if scores is None:  # random policy without logits: only the valid tokens matter
            buckets = POLICY_FNS["random"](None, valid, c.num_buckets, generator, rank)
        else:
            buckets = POLICY_FNS[c.policy](difficulty, valid, c.num_buckets, generator, rank)
        bucket_depths = self.bucket_depths(progress)
        depth = buckets_to_depths(buckets, self._constant((0, *bucket_depths), valid.device))
        depth = torch.where(nonfinite, torch.full_like(depth, L), depth)  # no distribution: full depth
        routing.depth = depth
        if self.needs_counts:
            if not global_buckets:
                # Bucket sizes follow from the number of valid tokens: every block's count without a read-back.
                n = num_valid if num_valid is not None else int(valid.sum())
                counts = block_counts(n, L, bucket_depths)
                routing.set_counts(counts, self._constant(tuple(counts), valid.device))
            else:
                routing.plan()  # global buckets: the step's one read-back, here rather than mid-backward
        routing.metrics = self._metrics(routing, buckets, valid, finite, scores)
        nonfinite_summary = torch.stack([routing.metrics["nonfinite_tokens"], (nonfinite & (routing.depth < L)).sum()])
        return routing, nonfinite_summary

    def _place_per_block(self, routing: Routing, valid, nonfinite, n: int, progress: float, generator) -> None:
        """Each block's own random subset of exactly ``counts[i]`` valid tokens (non-finite ones first)."""
        c, L = self.config, self.num_layers
        nested = block_counts(n, L, self.bucket_depths(progress))
        fractions = None if c.block_fractions is None else curriculum_fractions(c.block_fractions, progress)
        counts = per_block_counts(n, L, nested, c.dense_ends, fractions)
        N = valid.numel()
        keys = torch.rand((L, N), device=valid.device, generator=generator)
        keys = torch.where(nonfinite.reshape(1, N), 2.0, keys)  # no distribution: in every block first
        keys = torch.where(valid.reshape(1, N), keys, -1.0)  # invalid tokens never
        order = torch.argsort(keys, dim=1, descending=True)
        rows = [order[i, :counts[i]] for i in range(L)]
        position = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(L, N))
        block_active = position < self._constant(tuple(counts), valid.device)[:, None]
        routing.block_active = block_active
        routing.depth = block_active.long().sum(0).view(valid.shape)
        routing.set_block_rows(rows)

    def _metrics(self, r: Routing, buckets, valid, finite, scores: Scores | None) -> dict[str, torch.Tensor]:
        c, L = self.config, self.num_layers
        depth = r.depth
        n_valid = valid.sum()
        denom = n_valid.clamp_min(1).float()
        out = {}
        if buckets is not None:
            counts = torch.zeros(c.num_buckets + 1, dtype=torch.long, device=depth.device)
            counts.scatter_add_(0, (buckets + 1).reshape(-1), torch.ones_like(buckets).reshape(-1))
            out = {f"bucket_{k}_fraction": counts[k + 1].float() / denom for k in range(c.num_buckets)}
        out["valid_tokens"] = n_valid
        out["mean_depth_fraction"] = depth.sum().float() / (denom * L)
        # Backward block work skipped: rows inactive in each sparse-routed block, over all rows of all blocks.
        n = depth.numel()
        sparse = self._constant(tuple(self.sparse_blocks), depth.device) != 0
        inactive = torch.where(sparse, n - r.active_counts_tensor(), torch.zeros_like(sparse, dtype=torch.long))
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

    def _constant(self, values: tuple, device: torch.device) -> torch.Tensor:
        """A small int64 tensor of ``values`` on ``device``, made once: ``torch.tensor(..., device=cuda)``
        would synchronise the host with the GPU at every call (a copy from pageable memory)."""
        key = (values, device)
        t = self._constants.get(key)
        if t is None:
            if len(self._constants) > 1024:  # batch shapes and curriculum steps seen: a handful in practice
                self._constants.clear()
            host = torch.tensor(values, dtype=torch.long)
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
