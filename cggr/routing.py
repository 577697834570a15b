"""The routing state one training forward decides and its backward carries.

A :class:`Routing` is created when a training forward starts, handed to every
routed op of that forward (so a backward always uses the routing of *its own*
forward, never a later batch's), and decided (:meth:`Routing.decide`) once the
logits exist, before any backward can run. Its class docstring says which
stage writes which part of it, and when.

Where a token is active (docs/design.md §1.6, placement):

* *nested* (the seed's): block ``i`` (0-based, bottom first) of an ``L``-block
  stack sees token ``t`` as active when ``depth[t] > L - 1 - i`` (active in
  blocks ``b > L - d`` with ``b = i + 1``);
* *per-block* (the default where it applies: skip semantics, the random policy,
  per-rank buckets): each block has its own set of active tokens
  (``block_active``, ``[L, tokens]``), and ``depth[t]`` counts the blocks where
  ``t`` is active.

What an inactive row means (``inactive``): ``"stop"`` (the seed's), its
gradient stops at the block (the block's input row gets none from it);
``"skip"`` (the default), the gradient reaching the block's output row passes
unchanged to its input row (the residual stream), and no other part of the
block receives gradient from it.

A backward that works on a block's active rows as a tensor of their own size
needs their number on the host. Reading it back from the device would be a
host synchronisation after the forward: the GPU's queue drains and the whole
backward then runs at the pace of the host's Python launches. When bucket
sizes depend only on the number of valid tokens (per-rank buckets), the router
computes every block's count on the host from that one number
(:func:`block_counts`), read early in the forward, and hands the counts over
with the decision (:meth:`Routing.decide`); only global buckets read them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import sampling
from .gate import gate_rows


def block_counts(num_valid: int, num_layers: int, bucket_depths: Sequence[int]) -> list[int]:
    """Active rows of every block, bottom first, from the number of valid tokens alone.

    With ``n`` valid tokens and ``K`` buckets, bucket ``k`` holds the ranks ``r`` with ``floor(r*K/n) == k``:
    ``ceil((k+1)*n/K) - ceil(k*n/K)`` tokens; block ``i`` counts those of the buckets deeper than
    ``L - 1 - i``. Exact for the buckets' depths; tokens with non-finite logits, raised to full depth, get it
    only as far as these counts leave room (:func:`nested_rows`).
    """
    K, n = len(bucket_depths), num_valid
    sizes = [-(-(k + 1) * n // K) - -(-k * n // K) for k in range(K)]
    return [sum(size for size, d in zip(sizes, bucket_depths) if d > num_layers - 1 - i) for i in range(num_layers)]


def dense_end_blocks(dense_ends: int, num_layers: int) -> int:
    """Blocks kept dense at each end of the stack: ``dense_ends`` where it fits, at most ``(L - 1) // 2``, so that
    at least one block stays routed (a 2-block stack routes both)."""
    return max(0, min(dense_ends, (num_layers - 1) // 2))


def per_block_counts(num_valid: int, num_layers: int, nested_counts: Sequence[int], dense_ends: int = 0,
                     fractions: Sequence[float] | None = None) -> list[int]:
    """Active rows of every block under per-block placement, bottom first.

    ``fractions`` given: ``round(f_b * n)`` per block. Otherwise exactly the same total work as the nested
    counts (``sum(nested_counts)`` rows over the stack), with ``e`` blocks at each end of the stack at every
    valid token and the rest spread evenly over the middle blocks (upper blocks first take the rest).
    ``e`` is :func:`dense_end_blocks`, and at most what the total pays for, ``2 * e * n <= sum(nested_counts)``
    (dense ends never spend more than the nested routing: with a small budget fewer end blocks are dense, or
    none, and all blocks share it; a budget of exactly the dense ends leaves the middle blocks none).
    """
    n, L = num_valid, num_layers
    if fractions is not None:
        return [min(n, max(0, int(math.floor(f * n + 0.5)))) for f in fractions]
    total = sum(nested_counts)
    ends = min(dense_end_blocks(dense_ends, L), total // (2 * n) if n else 0)
    middle = L - 2 * ends
    base, extra = divmod(total - 2 * ends * n, middle)
    mid = [min(n, base + (1 if j >= middle - extra else 0)) for j in range(middle)]
    return [n] * ends + mid + [n] * ends


@dataclass(eq=False)
class BackwardDraws:
    """``importance="block"``: the blocks whose kept rows are drawn in their own backward, from the norms of their
    output-gradient rows (:meth:`Routing.prepare_backward`), with the counts the planner fixed."""

    counts: list[int]  # rows kept in each block (host ints); blocks not in ``pending`` were drawn at plan time
    pending: set[int]  # blocks still to draw
    valid: torch.Tensor  # [N] bool
    sampler: str
    alpha: float
    generator: torch.Generator | None
    seed: int  # block b draws with seed + b: the same rows whatever order the blocks' backwards run in


@dataclass(eq=False)
class VarianceProbe:
    """A forward measured for ``variance_budget``: each block's backward records the norms of its output-gradient
    rows (:meth:`Routing.prepare_backward`); the planner reads them once every block has (:meth:`complete`)."""

    sizes: torch.Tensor  # [L, N] float32
    valid: torch.Tensor  # [N] bool
    importance: torch.Tensor | None  # [N] the draws' importance when it is not the sizes (importance="loss")
    recorded: set[int] = field(default_factory=set)

    def complete(self) -> bool:
        return len(self.recorded) == self.sizes.shape[0]


def nested_rows(depth: torch.Tensor, counts_on_device: torch.Tensor, num_layers: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nested placement with every block's active count known (:func:`block_counts`; ``counts_on_device``, the
    same numbers on the depth's device): ``(depth, order)``, where ``order`` sorts the tokens (flat indices) by
    depth, deepest first, and block ``i``'s rows are the first ``counts[i]`` of them; ``depth`` is the depth this
    gives each token: the given one, except where tokens raised to full depth (non-finite logits) outnumber the
    room the counts leave: those keep less depth, and the returned depth says how much. No synchronisation."""
    flat = depth.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(flat.numel(), device=flat.device)
    # Counts rise from the bottom block up: the token at sorted position p is active in the blocks whose
    # count exceeds p, the top L - (number of counts <= p) blocks.
    placed = num_layers - torch.searchsorted(counts_on_device, position, right=True)
    return placed.view(depth.shape), order


def nested_active_counts(depth: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Rows active in each block under nested placement, bottom first, as a device tensor (no synchronisation):
    block ``i`` counts the tokens with ``depth >= L - i``."""
    d, L = depth.reshape(-1), num_layers
    hist = torch.zeros(L + 2, dtype=torch.long, device=d.device)
    hist.scatter_add_(0, d.clamp(0, L + 1), torch.ones_like(d))
    at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[k] = rows with depth >= k
    return at_least[L - torch.arange(L, device=d.device)]


class Routing:
    """The routing of one training forward: what the forward decides and its backward reads.

    Each part is written by one stage, through one method, in the order a step runs them; everything else
    only reads (the properties below are read-only):

    1. **Forward start** (the router, :meth:`cggr.router.Router.start_forward`): the constructor, with what is
       known before the forward runs (``num_layers``, ``leak_rate``, ``inactive``, ``reweighted``). Every
       routed op of the forward captures this object as it runs.
    2. **During the forward** (a compacted block's forward, :class:`cggr.compact.forward.CompactedForward`):
       :meth:`record_compacted`, the forward's facts: which blocks took the compacted path in this call (their
       output gate then leaves the gating to them; :meth:`cggr.router.Router.describe` reports them).
    3. **Forward end** (the planner, :meth:`cggr.plan.Planner.decide_into`): :meth:`decide`, once, before any
       backward can run: each token's depth, the per-block active sets, the host counts, the rows' weights, the
       rows left to the backward (``importance="block"``), the variance probe and the metrics.
    4. **Each block's backward**, before the block's own backward reads its rows (the routed ops of
       :mod:`cggr.sparse`, or a compacted block's own backward): :meth:`prepare_backward`, the backward-time
       stage: the rows of a block drawn from its output-gradient norms (``importance="block"``) and those norms
       for the probe (``variance_budget``).

    What the reads derive from the decision (a block's rows, the sort order, counts read back from the device)
    is cached on first use; it never changes the decision.
    """

    def __init__(self, num_layers: int, leak_rate: float = 0.0, inactive: str = "stop", reweighted: bool = False):
        self.num_layers = num_layers
        self.leak_rate = leak_rate
        self.inactive = inactive  # "stop" or "skip": see the module docstring
        # estimator="unbiased" (known when the forward starts, before the weights are decided at its end)
        self.reweighted = reweighted
        self._compacted: set[int] = set()  # 2. blocks whose forward took a compacted backward
        # 3. the decision (see decide)
        self._depth: torch.Tensor | None = None
        self._block_active: torch.Tensor | None = None
        self._branch_weight: torch.Tensor | None = None
        self._backward_draws: BackwardDraws | None = None
        self._probe: VarianceProbe | None = None
        self._metrics: dict[str, torch.Tensor] = {}
        # derived from the decision on first use (or given with it)
        self._order: torch.Tensor | None = None
        self._active_counts: list[int] | None = None
        self._rows_by_block: dict[int, torch.Tensor] = {}

    @classmethod
    def from_depth(cls, depth: torch.Tensor, num_layers: int, leak_rate: float = 0.0, inactive: str = "stop"
                   ) -> "Routing":
        """A nested routing given each token's depth (tests, verification): counts read on demand."""
        return cls(num_layers=num_layers, leak_rate=leak_rate, inactive=inactive).decide(depth)

    @classmethod
    def from_block_active(cls, block_active: torch.Tensor, leak_rate: float = 0.0, inactive: str = "skip"
                          ) -> "Routing":
        """A per-block routing given each block's active tokens (``[L, *token grid]`` bool)."""
        L = block_active.shape[0]
        return cls(num_layers=L, leak_rate=leak_rate, inactive=inactive).decide(
            block_active.long().sum(0), block_active=block_active.reshape(L, -1).bool())

    def __repr__(self) -> str:
        return (f"Routing(num_layers={self.num_layers}, inactive={self.inactive!r}, leak_rate={self.leak_rate}, "
                f"decided={self.ready}, placement={'per_block' if self._block_active is not None else 'nested'})")

    # ------------------------------------------------------------ the writes, one per stage
    def record_compacted(self, block_index: int) -> None:
        """Stage 2, while the forward runs: block ``block_index``'s forward took the compacted path (its backward
        gates, weighs and draws its own rows: the block's output gate leaves them alone)."""
        self._compacted.add(block_index)

    def decide(self, depth: torch.Tensor, *, block_active: torch.Tensor | None = None,
               block_rows: Sequence[torch.Tensor] | None = None, counts: Sequence[int] | None = None,
               order: torch.Tensor | None = None, branch_weight: torch.Tensor | None = None,
               backward_draws: BackwardDraws | None = None, probe: VarianceProbe | None = None,
               metrics: dict[str, torch.Tensor] | None = None) -> "Routing":
        """Stage 3, once, at the forward's end: the planner's decision. Returns this routing.

        Args:
            depth: each token's depth in blocks (the token grid's shape): nested placement, block ``i`` sees the
                token active when ``depth > L - 1 - i``; per-block placement, the number of blocks where it is.
            block_active: per-block placement, ``[L, tokens]`` bool, each block's active tokens; None: nested.
            block_rows: per-block placement, each block's active rows (flat token indices).
            counts: every block's active rows, bottom first, known on the host (:func:`block_counts`,
                :func:`per_block_counts`); per-block with ``backward_draws``, the rows each block keeps, drawn
                now or in its backward. None: read back from the device when first needed.
            order: nested placement with ``counts``, the tokens sorted deepest first (:func:`nested_rows`):
                block ``i``'s rows are its first ``counts[i]``.
            branch_weight: ``estimator="unbiased"``: ``[L, tokens]`` float32, each block's weight ``1/pi`` on its
                kept rows and 0 elsewhere (the gradient a kept row sends into the block's branch is multiplied by
                it); None: every kept row as it is.
            backward_draws: ``importance="block"``: the blocks whose rows are drawn in their backward.
            probe: ``variance_budget``: this forward's backward is measured.
            metrics: device tensors about the decision, read lazily (:meth:`cggr.router.Router.metrics`).
        """
        if self._depth is not None:
            raise RuntimeError("cggr: the routing of a forward is decided once, at the forward's end")
        L = self.num_layers
        for name, per_block in (("counts", counts), ("block_rows", block_rows)):
            if per_block is not None and len(per_block) != L:
                raise ValueError(f"cggr: {len(per_block)} {name} for {L} blocks")
        self._depth = depth
        self._block_active = block_active
        self._branch_weight = branch_weight
        self._backward_draws = backward_draws
        self._probe = probe
        self._metrics = dict(metrics or {})
        self._order = order
        if block_rows is not None:
            self._rows_by_block = dict(enumerate(block_rows))
        if counts is not None:
            self._active_counts = [int(c) for c in counts]
        elif block_rows is not None:
            self._active_counts = [int(r.numel()) for r in block_rows]
        return self

    def prepare_backward(self, block_index: int, grad: torch.Tensor) -> None:
        """Stage 4, called with the gradient of block ``block_index``'s output before the block's own backward
        reads its rows: records the rows' norms when this forward is measured (``probe``), and draws the block's
        rows when they are drawn from them (``backward_draws``: its active set, weights and rows, and the
        tokens' depth, are completed here). Blocks draw with seeds of their own, so the rows do not depend on the
        order the blocks' backwards run in."""
        draws, probe = self._backward_draws, self._probe
        if probe is None and (draws is None or block_index not in draws.pending):
            return
        norms = torch.linalg.vector_norm(grad.reshape(-1, grad.shape[-1]), dim=-1, dtype=torch.float32)
        if probe is not None:
            probe.sizes[block_index] = norms
            probe.recorded.add(block_index)
        if draws is not None and block_index in draws.pending:
            draws.pending.discard(block_index)
            if draws.generator is not None:
                draws.generator.manual_seed((draws.seed + block_index) % (2**63))
            d = sampling.draw(draws.sampler, norms, draws.valid, [draws.counts[block_index]], alpha=draws.alpha,
                              generator=draws.generator)
            self._block_active[block_index] = d.mask[0]
            self._branch_weight[block_index] = d.weight[0]
            self._rows_by_block[block_index] = d.rows[0]
            self._depth = self._depth + d.mask[0].view(self._depth.shape)

    # ------------------------------------------------------------ reads
    @property
    def depth(self) -> torch.Tensor | None:
        """Each token's depth (LongTensor shaped like the tokens); None until decided."""
        return self._depth

    @property
    def block_active(self) -> torch.Tensor | None:
        """``[L, tokens]`` bool under per-block placement, else None (nested)."""
        return self._block_active

    @property
    def branch_weight(self) -> torch.Tensor | None:
        """``estimator="unbiased"``: ``[L, tokens]`` float32 weights ``1/pi`` of the kept rows; else None."""
        return self._branch_weight

    @property
    def backward_draws(self) -> BackwardDraws | None:
        """``importance="block"``: the rows drawn in the backward, else None."""
        return self._backward_draws

    @property
    def probe(self) -> VarianceProbe | None:
        """``variance_budget``: this forward's backward is measured, else None."""
        return self._probe

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """Device tensors about the decision, read lazily (a copy: the routing's own are not changed)."""
        return dict(self._metrics)

    @property
    def compact_blocks(self) -> frozenset[int]:
        """The blocks whose forward took a compacted backward in this forward."""
        return frozenset(self._compacted)

    def took_compacted(self, block_index: int) -> bool:
        return block_index in self._compacted

    @property
    def skip(self) -> bool:
        return self.inactive == "skip"

    @property
    def ready(self) -> bool:
        return self._depth is not None

    @property
    def num_rows(self) -> int:
        self._require()
        return self._depth.numel()

    def _require(self) -> None:
        if self._depth is None:
            raise RuntimeError(
                "cggr: backward reached a routed block before the routing of its forward was decided. "
                "The routed model's forward must return logits (a tensor, a tuple starting with logits, "
                "or an object with .logits) and finish before backward.")

    def gate_keys(self, block_index: int) -> tuple[torch.Tensor, int]:
        """``(keys, threshold)``: a row is active in ``block_index`` when its key is above the threshold."""
        self._require()
        if self._block_active is not None:
            return self._block_active[block_index].to(torch.int32), 0
        return self._depth.reshape(-1), self.num_layers - 1 - block_index

    def inactive_mask(self, block_index: int) -> torch.Tensor:
        """Bool per row (flattened tokens): inactive in ``block_index``."""
        keys, threshold = self.gate_keys(block_index)
        return keys <= threshold

    def gate(self, grad: torch.Tensor, block_index: int) -> torch.Tensor:
        """``grad`` (rows = tokens) with the rows inactive in ``block_index`` scaled by the leak (0 by default)."""
        keys, threshold = self.gate_keys(block_index)
        return gate_rows(grad, keys, threshold, self.leak_rate)

    def into_branch(self, grad: torch.Tensor, block_index: int) -> torch.Tensor:
        """The gradient rows that enter block ``block_index``'s branch from its output gradient ``grad``: the
        active rows (times their weight when reweighted), the inactive ones zero (or scaled by the leak)."""
        if self._branch_weight is None:
            return self.gate(grad, block_index)
        w = self._branch_weight[block_index].view(*grad.shape[:-1], 1)
        return (grad * w).to(grad.dtype)  # the product in fp32: a weight rounded to bf16 would be off by 0.4 %

    def kept_weight(self, block_index: int) -> torch.Tensor | None:
        """Every row's weight in block ``block_index`` (``[tokens]`` float32: ``1/pi`` on its kept rows, 0 elsewhere)
        when the routing reweights, else None: what a compacted backward applies to the rows it keeps."""
        return None if self._branch_weight is None else self._branch_weight[block_index]

    def block_input_grad(self, dx: torch.Tensor, dy: torch.Tensor, block_index: int) -> torch.Tensor:
        """The gradient of a block's input under the inactive semantics, from ``dx`` (the block's own backward,
        zero on inactive rows) and ``dy`` (the gradient of its output): ``dx`` under stop; under skip the
        inactive rows' output gradient passes to the input unchanged (the residual stream)."""
        if not self.skip:
            return dx
        inactive = self.inactive_mask(block_index).view(*dy.shape[:-1], 1)
        return torch.where(inactive, dy.to(dx.dtype), dx)

    def flat_depth(self) -> torch.Tensor:
        self._require()
        return self._depth.reshape(-1)

    @property
    def counts_known(self) -> bool:
        """Whether every block's active count is on the host (given with the decision, or read back already)."""
        return self._active_counts is not None

    def active_counts_tensor(self) -> torch.Tensor:
        """Rows active in each block, bottom first, as a device tensor (no synchronisation)."""
        if self._block_active is not None:
            return self._block_active.long().sum(1)
        return nested_active_counts(self.flat_depth(), self.num_layers)

    def active_count(self, block_index: int) -> int:
        if self._active_counts is None:
            self._plan()
        return self._active_counts[block_index]

    def _plan(self) -> None:
        """Counts not given with the decision: read back from the device, a host synchronisation (tests and
        verification only; the planner gives the counts, reading them back itself for global buckets).
        ``benchmarks/host_probe.py`` times this method by its name."""
        self._active_counts = self.active_counts_tensor().tolist()

    def active_rows(self, block_index: int) -> torch.Tensor:
        """Indices (into the flattened tokens) of the rows active in ``block_index`` (nested: deepest first)."""
        rows = self._rows_by_block.get(block_index)
        if rows is None:
            if self._block_active is not None:
                rows = torch.nonzero(self._block_active[block_index]).reshape(-1)  # a read-back: tests only
            else:
                n = self.active_count(block_index)
                if self._order is None:  # rows sorted by depth, deepest first: block i's rows are a prefix
                    self._order = torch.sort(self.flat_depth(), descending=True, stable=True).indices
                rows = self._order[:n]
            self._rows_by_block[block_index] = rows
        return rows

    def compact_indices(self, block_index: int) -> torch.Tensor | None:
        """Active rows of ``block_index`` as flat indices (:meth:`active_rows`) for a compacted backward, or None
        when every row is active: the compacted backwards then read whole tensors, with no gather and no scatter.
        (With HF's labels that is rare: the last position of each sequence has no label and is inactive.)"""
        return None if self.active_count(block_index) >= self.num_rows else self.active_rows(block_index)
