"""Buckets, depths and the curriculum (docs/design.md §1.4, §1.5).

Data flows one way: scores -> buckets -> depths.

* Valid tokens are ranked hardest first; with ``n`` valid tokens and ``K``
  buckets the token of rank ``r`` goes to bucket ``floor(r*K/n)`` (bucket 0 =
  hardest). Non-finite scores rank hardest of all, under every policy. Ties keep
  token order.
* Bucket ``k`` has target depth ``ceil(L*(K-k)/K)`` blocks, or
  ``ceil(L*f_k)`` for user fractions ``f``.
* Curriculum: at progress ``p`` bucket ``k`` has depth
  ``round(L - p*(L - depth_k))`` (round half up), so every token is at full
  depth at step 0 and at its target once warm-up ends.
* Per-block fractions given by the user follow the same curriculum: block
  ``b`` keeps ``1 - p*(1 - f_b)`` of the valid tokens at progress ``p``.
* Hand-back (optional): over the last ``handback_steps`` of ``total_steps``
  the progress falls linearly back to 0, so training ends at full depth
  (DeepSpeed's random-LTD also ends dense).
* Invalid tokens have depth 0 and take no part in bucketing.
* Under data parallelism each rank ranks its own tokens by default;
  :func:`rank_buckets_global` ranks the valid tokens of all ranks together
  (as if their batches were one, in rank order) from histograms all-reduced
  across ranks.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .config import POLICIES, RoutingConfig, as_number


def target_depths(num_layers: int, num_buckets: int, depths: Sequence[float] | None = None) -> list[int]:
    """Target depth in blocks of each bucket, hardest bucket first."""
    if depths is not None:
        return [max(1, min(num_layers, math.ceil(num_layers * float(f) - 1e-9))) for f in depths]
    return [math.ceil(num_layers * (num_buckets - k) / num_buckets) for k in range(num_buckets)]


def curriculum_depths(targets: Sequence[int], num_layers: int, progress: float) -> list[int]:
    """Depth of each bucket at warm-up progress ``progress`` in [0, 1]."""
    p = min(1.0, max(0.0, float(progress)))
    return [int(math.floor(num_layers - p * (num_layers - d) + 0.5)) for d in targets]


def curriculum_fractions(fractions: Sequence[float], progress: float) -> list[float]:
    """Per-block active fractions at curriculum ``progress``: 1 (dense) at 0, the given ``fractions`` at 1."""
    p = min(1.0, max(0.0, float(progress)))
    return [1.0 - p * (1.0 - float(f)) for f in fractions]


def schedule_progress(step: float, warmup: float, total: float | None = None, handback: float = 0) -> float:
    """Curriculum progress in [0, 1] at ``step``: 0 = every token at full depth, 1 = target depths.

    Rises linearly over ``warmup``; with ``handback > 0`` it falls linearly back to 0 over the last
    ``handback`` of ``total``. Units are free (optimizer steps, or fractions of a wall-clock budget).
    """
    p = 1.0 if warmup <= 0 else min(1.0, max(0.0, step / warmup))
    if handback > 0 and total is not None:
        p = min(p, max(0.0, (total - step) / handback))
    return p


def _rank_keys(scores: torch.Tensor) -> torch.Tensor:
    """fp32 keys where larger is harder and non-finite scores are hardest."""
    s = scores.float()
    return torch.where(torch.isfinite(s), s, torch.full_like(s, float("inf")))


@torch.no_grad()
def rank_buckets_reference(scores: torch.Tensor, valid: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Exact ranks with a stable sort: the definition, used on CPU and in tests.

    Returns a LongTensor shaped like ``scores``: the bucket of each valid token,
    -1 for invalid tokens.
    """
    shape = scores.shape
    keys = _rank_keys(scores).reshape(-1)
    ok = valid.reshape(-1).bool()
    # Invalid tokens sort last: below every valid key, including -inf scores.
    keys = torch.where(ok, keys, torch.full_like(keys, float("-inf")))
    order = torch.sort(keys, descending=True, stable=True).indices
    # Within the -inf block, valid tokens must still precede invalid ones.
    order = order[torch.sort((~ok[order]).to(torch.uint8), stable=True).indices]
    n = ok.sum()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    bucket = torch.div(rank * num_buckets, n.clamp_min(1), rounding_mode="floor")
    bucket = torch.where(ok, bucket, torch.full_like(bucket, -1))
    return bucket.reshape(shape)


def _use_triton(t: torch.Tensor) -> bool:
    if not t.is_cuda:
        return False
    from .kernels import triton_available

    return triton_available()


@torch.no_grad()
def rank_buckets(scores: torch.Tensor, valid: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket of each token by difficulty rank (-1 for invalid tokens).

    On CUDA an O(n) histogram-threshold kernel is used (no full sort; bucket
    membership within 1 % of ``n`` of the exact ranks at each boundary, bucket
    sizes exact); elsewhere the exact stable sort.
    """
    if scores.shape != valid.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} must have the same shape")
    if _use_triton(scores):
        from .kernels.bucketing import rank_buckets_triton

        return rank_buckets_triton(scores, valid, num_buckets)
    return rank_buckets_reference(scores, valid, num_buckets)


@torch.no_grad()
def random_buckets(valid: torch.Tensor, num_buckets: int, generator: torch.Generator | None = None,
                   rank: Callable = rank_buckets, scores: torch.Tensor | None = None) -> torch.Tensor:
    """The random control: same bucket sizes as :func:`rank_buckets` (or ``rank``), tokens drawn uniformly.

    Tokens whose ``scores`` (when given) are non-finite are the hardest, as in every policy: they fill the
    first buckets.
    """
    keys = torch.rand(valid.shape, device=valid.device, generator=generator)
    if scores is not None:
        keys = torch.where(torch.isfinite(scores), keys, torch.full_like(keys, float("inf")))
    return rank(keys, valid, num_buckets)


def _sortable_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2**32) whose ascending order is the descending order of the fp32 score.

    Non-finite scores come first (as +inf), -0 equals +0: the order of :func:`_rank_keys`, as integers
    whose bits can be histogrammed digit by digit.
    """
    s = _rank_keys(scores).reshape(-1)
    s = torch.where(s == 0, torch.zeros_like(s), s)
    b = s.view(torch.int32).to(torch.int64)
    b = torch.where(b < 0, b ^ 0x7FFFFFFF, b)  # signed integer order == float order
    return (2**31 - 1) - b  # reversed (hardest first), shifted to unsigned


def _locate(hist: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin of each row of ``hist`` ``[T, B]`` holding 0-based rank ``r[j]``, and the count in earlier bins."""
    cum = hist.cumsum(-1)
    before = cum <= r[:, None]
    return before.sum(-1).clamp_max(hist.shape[-1] - 1), torch.where(before, hist, 0).sum(-1)


@torch.no_grad()
def rank_buckets_global(scores: torch.Tensor, valid: torch.Tensor, num_buckets: int, group=None) -> torch.Tensor:
    """:func:`rank_buckets` over the valid tokens of every rank of ``group`` together (exact ranks, ties in
    (rank, token) order): the buckets single-process bucketing of all ranks' tokens, concatenated in rank order,
    would give. Returns this rank's buckets (-1 for invalid tokens).

    The K-1 threshold tokens (global ranks ``R_k = ceil(k*n/K)``) are found by radix selection on the 32-bit
    key of :func:`_sortable_keys`: a histogram of its top 11 bits, then of the next 11 bits inside each
    threshold's bin, then of the last 10 bits, each summed over ranks. The last one is gathered per rank (an
    all-reduce of one row per rank) so that tied keys are ordered by rank. Three all-reduces of at most
    ``world * (K-1) * 2048`` counts, whatever the number of tokens; every rank takes part, with or without
    valid tokens, and nothing is read back to the host.
    """
    dist = torch.distributed
    world, me = dist.get_world_size(group), dist.get_rank(group)
    if scores.shape != valid.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} must have the same shape")
    K, dev = num_buckets, scores.device
    w = _sortable_keys(scores)
    ok = valid.reshape(-1).bool()
    count = ok.long()
    T = max(K - 1, 1)  # thresholds (one idle one when K == 1, so that shapes stay non-empty)

    h1 = torch.zeros(2048, dtype=torch.long, device=dev).scatter_add_(0, w >> 21, count)
    dist.all_reduce(h1, group=group)
    n = h1.sum()
    k = torch.arange(1, T + 1, device=dev)
    R = (k * n + K - 1) // K  # global rank of each threshold token
    exists = (k <= K - 1) & (R < n)
    b1, G = _locate(h1.expand(T, -1), R)

    in_bin = ((w >> 21)[None, :] == b1[:, None]) & ok
    h2 = torch.zeros(T, 2048, dtype=torch.long, device=dev).scatter_add_(
        1, ((w >> 10) & 2047).expand(T, -1), in_bin.long())
    dist.all_reduce(h2, group=group)
    b2, before = _locate(h2, R - G)
    G = G + before
    prefix = (b1 << 11) | b2

    in_prefix = ((w >> 10)[None, :] == prefix[:, None]) & ok
    h3 = torch.zeros(world, T, 1024, dtype=torch.long, device=dev)
    h3[me].scatter_add_(1, (w & 1023).expand(T, -1), in_prefix.long())
    dist.all_reduce(h3, group=group)
    b3, before = _locate(h3.sum(0), R - G)
    G = G + before
    W = (prefix << 10) | b3  # the threshold tokens' keys
    ties_on_lower_ranks = h3[:me, torch.arange(T, device=dev), b3].sum(0)

    # rank(t) >= R_k  iff  key > W_k, or key == W_k and t's position among the tied tokens >= R_k - G_k.
    tied = (w[None, :] == W[:, None]) & ok
    position = ties_on_lower_ranks[:, None] + tied.long().cumsum(1) - 1
    past = (w[None, :] > W[:, None]) | (tied & (position >= (R - G)[:, None]))
    bucket = (past & exists[:, None]).sum(0)
    return torch.where(ok, bucket, torch.full_like(bucket, -1)).reshape(scores.shape)


# Weight of the hardest token relative to the easiest in the "sampled" policy.
SAMPLED_WEIGHT_RATIO = 3.0


@torch.no_grad()
def sampled_buckets(scores: torch.Tensor, valid: torch.Tensor, num_buckets: int,
                    generator: torch.Generator | None = None, rank: Callable = rank_buckets) -> torch.Tensor:
    """Buckets drawn at random, with the chance of a deep bucket rising with difficulty.

    Same bucket sizes as :func:`rank_buckets`. Valid tokens are put in a random
    order by weighted sampling without replacement (Efraimidis-Spirakis keys
    ``log(u) / w``) with weights rising linearly with the difficulty rank, from 1
    for the easiest token to :data:`SAMPLED_WEIGHT_RATIO` for the hardest; the
    order is cut into buckets as the difficulty ranking is (by ``rank``: with global
    buckets across data-parallel ranks, the weights still come from each rank's own
    ranking). Every token can reach every depth, so no class of tokens is starved of
    lower-layer gradient.
    """
    if scores.shape != valid.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} must have the same shape")
    ok = valid.reshape(-1).bool()
    keys = torch.where(ok, _rank_keys(scores).reshape(-1), torch.full_like(ok, float("-inf"), dtype=torch.float32))
    order = torch.sort(keys, stable=True).indices  # easiest first; invalid (-inf) before every valid token
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    n_invalid = (~ok).sum()
    q = (position - n_invalid).float() / (ok.sum() - 1).clamp_min(1).float()  # 0 easiest .. 1 hardest
    w = 1.0 + (SAMPLED_WEIGHT_RATIO - 1.0) * q.clamp(0, 1)
    u = torch.rand(keys.shape, device=keys.device, generator=generator).clamp_min(1e-12)
    drawn = torch.where(keys == float("inf"), keys, u.log() / w)  # non-finite scores: the hardest, first
    return rank(drawn.reshape(scores.shape), valid, num_buckets)


@torch.no_grad()
def buckets_to_depths(buckets: torch.Tensor, bucket_depths: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Depth in blocks of each token; 0 where ``buckets`` is -1 (invalid).

    ``bucket_depths``: a sequence, hardest bucket first, or the table ``[0, *depths]`` as a tensor on the
    buckets' device (made once by the caller: building it here would copy from host memory every call).
    """
    if isinstance(bucket_depths, torch.Tensor):
        table = bucket_depths
    else:
        table = torch.tensor([0, *bucket_depths], dtype=torch.long, device=buckets.device)
    return table[buckets + 1]


@torch.no_grad()
def assign_depths(
    scores: torch.Tensor,
    valid: torch.Tensor,
    num_layers: int,
    num_buckets: int = 4,
    depths: Sequence[float] | None = None,
    progress: float = 1.0,
) -> torch.Tensor:
    """Scores -> gradient depth per token, by difficulty rank (the seed's rule).

    Args:
        scores: per-token difficulty (higher = harder; NaN/inf = hardest).
        valid: bool mask of the same shape; invalid tokens get depth 0.
        num_layers: ``L``, the number of routed blocks.
        num_buckets: ``K``.
        depths: optional target depth fractions per bucket, hardest first.
        progress: curriculum progress in [0, 1].
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {type(scores).__name__}")
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != scores.shape:
        raise ValueError(f"valid must be a bool tensor shaped like scores {tuple(scores.shape)}, got "
                         + (f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, torch.Tensor) else
                            type(valid).__name__))
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    depths = RoutingConfig(num_buckets=num_buckets, depths=depths).depths
    if not 0.0 <= as_number(progress) <= 1.0:
        raise ValueError(f"progress must be a number in [0, 1], got {progress!r}")
    buckets = rank_buckets(scores, valid, num_buckets)
    return buckets_to_depths(buckets, curriculum_depths(target_depths(num_layers, num_buckets, depths), num_layers, progress))


BucketPolicy = Callable[..., torch.Tensor]


def _difficulty_policy(scores, valid, num_buckets, generator, rank=rank_buckets):
    return rank(scores, valid, num_buckets)


def _random_policy(scores, valid, num_buckets, generator, rank=rank_buckets):
    return random_buckets(valid, num_buckets, generator, rank, scores)


def _sampled_policy(scores, valid, num_buckets, generator, rank=rank_buckets):
    return sampled_buckets(scores, valid, num_buckets, generator, rank)


# Each routing policy under its name: (scores, valid, K, generator, rank=rank_buckets) -> buckets,
# where ``rank(keys, valid, K)`` buckets by rank: rank_buckets, or rank_buckets_global across ranks.
POLICY_FNS: dict[str, BucketPolicy] = {"difficulty": _difficulty_policy, "random": _random_policy,
                                       "sampled": _sampled_policy}
assert set(POLICY_FNS) == set(POLICIES)
