"""The routing state one training forward decides and its backward carries.

A :class:`Routing` is created when a training forward starts, handed to every
routed op of that forward (so a backward always uses the routing of *its own*
forward, never a later batch's), and filled in once the logits exist, before
any backward can run.

Block ``i`` (0-based, bottom first) of an ``L``-block stack sees token ``t`` as
active when ``depth[t] > L - 1 - i`` (DESIGN.md §1: active in blocks
``b > L - d`` with ``b = i + 1``).

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

from dataclasses import dataclass, field
from typing import Sequence

import torch


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


@dataclass(eq=False)
class Routing:
    num_layers: int
    leak_rate: float = 0.0
    depth: torch.Tensor | None = None  # LongTensor shaped like the tokens, set after the forward
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # device tensors, read lazily
    compact_blocks: set[int] = field(default_factory=set)  # blocks whose forward took a compacted backward
    _order: torch.Tensor | None = field(default=None, repr=False)
    _active_counts: list[int] | None = field(default=None, repr=False)
    _rows_by_block: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _positions: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_depth(cls, depth: torch.Tensor, num_layers: int, leak_rate: float = 0.0) -> "Routing":
        """A routing given each token's depth (tests, verification, the reference): counts read on demand."""
        return cls(num_layers=num_layers, leak_rate=leak_rate, depth=depth)

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

    def threshold(self, block_index: int) -> int:
        """Tokens with depth strictly above this value are active in ``block_index``."""
        return self.num_layers - 1 - block_index

    def flat_depth(self) -> torch.Tensor:
        self._require()
        return self.depth.reshape(-1)

    def _plan(self) -> None:
        """Fetch the active count of every block from the device: a host synchronisation."""
        self._active_counts = self.active_counts_tensor().tolist()

    def set_counts(self, counts: Sequence[int], counts_on_device: torch.Tensor) -> None:
        """Every block's active count, computed on the host (:func:`block_counts`): no synchronisation.

        ``counts_on_device``: the same numbers on the depth's device. Block ``i``'s rows are then the first
        ``counts[i]`` of the tokens sorted by depth, deepest first, and ``depth`` becomes the depth that
        this gives each token: the same, except where tokens raised to full depth (non-finite logits)
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

    @property
    def counts_known(self) -> bool:
        return self._active_counts is not None

    def active_counts_tensor(self) -> torch.Tensor:
        """Rows active in each block, bottom first, as a device tensor (no synchronisation)."""
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
        """Indices (into the flattened tokens) of the rows active in ``block_index``, deepest first."""
        rows = self._rows_by_block.get(block_index)
        if rows is None:
            n = self.active_count(block_index)
            if self._order is None:  # rows sorted by depth, deepest first: block i's rows are a prefix
                self._order = torch.sort(self.flat_depth(), descending=True, stable=True).indices
            rows = self._order[:n]
            self._rows_by_block[block_index] = rows
        return rows

    def active_positions(self, block_index: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Active rows of ``block_index`` as flat indices and as (batch, position) pairs.

        All rows when every row is active (the compacted backward then gathers in order).
        """
        key = (block_index, seq_len)
        cached = self._positions.get(key)
        if cached is None:
            n = self.active_count(block_index)
            idx = self.active_rows(block_index) if n < self.num_rows else torch.arange(
                self.num_rows, device=self.depth.device)
            cached = self._positions[key] = (idx, torch.div(idx, seq_len, rounding_mode="floor"), idx % seq_len)
        return cached
