"""The routing state one training forward decides and its backward carries.

A :class:`Routing` is created when a training forward starts, handed to every
routed op of that forward (so a backward always uses the routing of *its own*
forward, never a later batch's), and filled in once the logits exist, before
any backward can run.

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
(:func:`block_counts`), read early in the forward, and hands it over with
:meth:`Routing.set_counts`; only global buckets read the counts back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import sampling


def block_counts(num_valid: int, num_layers: int, bucket_depths: Sequence[int]) -> list[int]:
    """Active rows of every block, bottom first, from the number of valid tokens alone.

    With ``n`` valid tokens and ``K`` buckets, bucket ``k`` holds the ranks ``r`` with ``floor(r*K/n) == k``:
    ``ceil((k+1)*n/K) - ceil(k*n/K)`` tokens; block ``i`` counts those of the buckets deeper than
    ``L - 1 - i``. Exact for the buckets' depths; tokens with non-finite logits, raised to full depth, get it
    only as far as these counts leave room (:meth:`Routing.set_counts`).
    """
    K, n = len(bucket_depths), num_valid
    sizes = [-(-(k + 1) * n // K) - -(-k * n // K) for k in range(K)]
    return [sum(size for size, d in zip(sizes, bucket_depths) if d > num_layers - 1 - i) for i in range(num_layers)]


def per_block_counts(num_valid: int, num_layers: int, nested_counts: Sequence[int], dense_ends: int = 0,
                     fractions: Sequence[float] | None = None) -> list[int]:
    """Active rows of every block under per-block placement, bottom first.

    ``fractions`` given: ``round(f_b * n)`` per block. Otherwise exactly the same total work as the nested
    counts (``sum(nested_counts)`` rows over the stack), with ``e`` blocks at each end of the stack at every
    valid token and the rest spread evenly over the middle blocks (upper blocks first take the rest).
    ``e`` is ``dense_ends`` where it fits: at most ``(L - 1) // 2``, so at least one block stays routed (a
    2-block stack routes both blocks), and at most what the total pays for, ``2 * e * n <= sum(nested_counts)``
    (dense ends never spend more than the nested routing: with a small budget fewer end blocks are dense, or
    none, and all blocks share it; a budget of exactly the dense ends leaves the middle blocks none).
    """
    n, L = num_valid, num_layers
    if fractions is not None:
        return [min(n, max(0, int(math.floor(f * n + 0.5)))) for f in fractions]
    total = sum(nested_counts)
    ends = max(0, min(dense_ends, (L - 1) // 2, total // (2 * n) if n else 0))
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


@dataclass(eq=False)
class Routing:
    num_layers: int
    leak_rate: float = 0.0
    depth: torch.Tensor | None = None  # LongTensor shaped like the tokens, set after the forward
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # device tensors, read lazily
    compact_blocks: set[int] = field(default_factory=set)  # blocks whose forward took a compacted backward
    inactive: str = "stop"  # "stop" or "skip": see the module docstring
    block_active: torch.Tensor | None = None  # [L, tokens] bool under per-block placement, else None (nested)
    # estimator="unbiased" (known when the forward starts, before the weights are decided at its end)
    reweighted: bool = False
    # ... then [L, tokens] float32, each block's weight 1/pi on its kept rows and 0 elsewhere (the gradient a kept
    # row sends into the block's branch is multiplied by it); None: plain, every kept row as it is.
    branch_weight: torch.Tensor | None = None
    backward_draws: BackwardDraws | None = None  # importance="block": rows drawn in the backward, else None
    probe: VarianceProbe | None = None  # variance_budget: this forward's backward is measured, else None
    _order: torch.Tensor | None = field(default=None, repr=False)
    _active_counts: list[int] | None = field(default=None, repr=False)
    _rows_by_block: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_depth(cls, depth: torch.Tensor, num_layers: int, leak_rate: float = 0.0, inactive: str = "stop"
                   ) -> "Routing":
        """A nested routing given each token's depth (tests, verification): counts read on demand."""
        return cls(num_layers=num_layers, leak_rate=leak_rate, depth=depth, inactive=inactive)

    @classmethod
    def from_block_active(cls, block_active: torch.Tensor, leak_rate: float = 0.0, inactive: str = "skip"
                          ) -> "Routing":
        """A per-block routing given each block's active tokens (``[L, *token grid]`` bool)."""
        L = block_active.shape[0]
        r = cls(num_layers=L, leak_rate=leak_rate, depth=block_active.long().sum(0), inactive=inactive)
        r.block_active = block_active.reshape(L, -1).bool()
        return r

    @property
    def skip(self) -> bool:
        return self.inactive == "skip"

    @property
    def ready(self) -> bool:
        return self.depth is not None

    @property
    def num_rows(self) -> int:
        self._require()
        return self.depth.numel()

    def _require(self) -> None:
        if self.depth is None:
            raise RuntimeError(
                "cggr: backward reached a routed block before the routing of its forward was decided. "
                "The routed model's forward must return logits (a tensor, a tuple starting with logits, "
                "or an object with .logits) and finish before backward.")

    def gate_keys(self, block_index: int) -> tuple[torch.Tensor, int]:
        """``(keys, threshold)``: a row is active in ``block_index`` when its key is above the threshold."""
        self._require()
        if self.block_active is not None:
            return self.block_active[block_index].to(torch.int32), 0
        return self.depth.reshape(-1), self.num_layers - 1 - block_index

    def inactive_mask(self, block_index: int) -> torch.Tensor:
        """Bool per row (flattened tokens): inactive in ``block_index``."""
        keys, threshold = self.gate_keys(block_index)
        return keys <= threshold

    def gate(self, grad: torch.Tensor, block_index: int) -> torch.Tensor:
        """``grad`` (rows = tokens) with the rows inactive in ``block_index`` scaled by the leak (0 by default)."""
        from .gate import gate_rows

        keys, threshold = self.gate_keys(block_index)
        return gate_rows(grad, keys, threshold, self.leak_rate)

    def prepare_backward(self, block_index: int, grad: torch.Tensor) -> None:
        """Called with the gradient of block ``block_index``'s output, before the block's own backward: records
        the rows' norms when this forward is measured, and draws the block's rows when they are drawn from them."""
        draws, probe = self.backward_draws, self.probe
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
            self.block_active[block_index] = d.mask[0]
            self.branch_weight[block_index] = d.weight[0]
            self._rows_by_block[block_index] = d.rows[0]
            self.depth = self.depth + d.mask[0].view(self.depth.shape)

    def into_branch(self, grad: torch.Tensor, block_index: int, inactive_enter: bool = False) -> torch.Tensor:
        """The gradient rows that enter block ``block_index`` from its output gradient ``grad``: the active rows
        (times their weight when reweighted), the inactive ones zero (or scaled by the leak), or, with
        ``inactive_enter``, unchanged (for a block whose own backward passes them to its input)."""
        if self.branch_weight is None:
            return grad if inactive_enter else self.gate(grad, block_index)
        w = self.branch_weight[block_index].view(*grad.shape[:-1], 1)
        weighted = grad * w  # the product in fp32: a weight rounded to bf16 would be off by 0.4 %
        return (torch.where(w > 0, weighted, grad) if inactive_enter else weighted).to(grad.dtype)

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
        return self.depth.reshape(-1)

    def _plan(self) -> None:
        """Fetch the active count of every block from the device: a host synchronisation."""
        self._active_counts = self.active_counts_tensor().tolist()

    def set_counts(self, counts: Sequence[int], counts_on_device: torch.Tensor) -> None:
        """Every block's active count, computed on the host (:func:`block_counts`): no synchronisation.

        Nested placement only. ``counts_on_device``: the same numbers on the depth's device. Block ``i``'s rows
        are then the first ``counts[i]`` of the tokens sorted by depth, deepest first, and ``depth`` becomes the
        depth that this gives each token: the same, except where tokens raised to full depth (non-finite logits)
        outnumber the room the counts leave: those keep less depth, and ``depth`` says how much.
        """
        if len(counts) != self.num_layers:
            raise ValueError(f"cggr: {len(counts)} counts for {self.num_layers} blocks")
        self._require()
        self._active_counts = [int(c) for c in counts]
        d = self.flat_depth()
        self._order = torch.sort(d, descending=True, stable=True).indices
        position = torch.empty_like(self._order)
        position[self._order] = torch.arange(d.numel(), device=d.device)
        # Counts rise from the bottom block up: the token at sorted position p is active in the blocks whose
        # count exceeds p, the top L - (number of counts <= p) blocks.
        depth = self.num_layers - torch.searchsorted(counts_on_device, position, right=True)
        self.depth = depth.view(self.depth.shape)

    def set_block_rows(self, rows: Sequence[torch.Tensor]) -> None:
        """Per-block placement: each block's active rows (flat token indices), their counts known on the host."""
        if len(rows) != self.num_layers:
            raise ValueError(f"cggr: {len(rows)} row sets for {self.num_layers} blocks")
        self._rows_by_block = dict(enumerate(rows))
        self._active_counts = [int(r.numel()) for r in rows]

    @property
    def counts_known(self) -> bool:
        return self._active_counts is not None

    def active_counts_tensor(self) -> torch.Tensor:
        """Rows active in each block, bottom first, as a device tensor (no synchronisation)."""
        if self.block_active is not None:
            return self.block_active.long().sum(1)
        d = self.flat_depth()
        L = self.num_layers
        hist = torch.zeros(L + 2, dtype=torch.long, device=d.device)
        hist.scatter_add_(0, d.clamp(0, L + 1), torch.ones_like(d))
        at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[k] = rows with depth >= k
        return at_least[L - torch.arange(L, device=d.device)]  # block i: depth >= L - i

    def plan(self) -> None:
        """Fetch the active counts from the device now, if neither fetched nor set from the host.

        Only global buckets get here with unknown counts (the router sets them otherwise): the router calls
        this right after the forward, so that this read-back happens once there rather than mid-backward.
        """
        if self._active_counts is None:
            self._plan()

    def active_count(self, block_index: int) -> int:
        if self._active_counts is None:
            self._plan()
        return self._active_counts[block_index]

    def active_rows(self, block_index: int) -> torch.Tensor:
        """Indices (into the flattened tokens) of the rows active in ``block_index`` (nested: deepest first)."""
        rows = self._rows_by_block.get(block_index)
        if rows is None:
            if self.block_active is not None:
                rows = torch.nonzero(self.block_active[block_index]).reshape(-1)  # a read-back: tests only
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
