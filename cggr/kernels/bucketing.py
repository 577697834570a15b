"""O(n) difficulty buckets by radix selection. Reference: :func:`cggr.bucketing.rank_buckets_reference`.

With ``n`` valid tokens and ``K`` buckets the token of rank ``r`` (hardest
first, ties by token index) goes to bucket ``floor(r*K/n)``, that is::

    bucket(t) = #{k in 1..K-1 : rank(t) >= R_k},   R_k = ceil(k*n/K)

so only the K-1 tokens of rank ``R_k`` (the thresholds) need to be found.
They are found by radix selection on a 32-bit key, a histogram per digit,
without sorting anything:

* key ``w``: the score as fp32 (non-finite -> ``+inf``, ``-0`` -> ``+0``),
  its bits mapped to an unsigned integer whose *ascending* order is the
  *descending* order of the score. Ranks are the order of ``(w, token index)``.
* level 1: histogram of the top 11 bits of ``w`` over the valid tokens; its
  cumulative sum gives, for each threshold, the bin holding rank ``R_k`` and
  ``G_k``, the count of tokens in earlier bins.
* level 2: histogram of the next 11 bits over the tokens in those bins (one
  histogram per distinct bin), same scan -> 22-bit prefixes.
* level 3: the last 10 bits -> the threshold key ``W_k`` exactly, and ``G_k``
  = number of tokens with a smaller key. The tokens with key ``W_k`` are tied;
  the threshold is the one at position ``R_k - G_k`` among them in token
  order: each program counts its ties, then a prefix over programs plus a
  cumulative sum inside each program gives every tied token its position.
* assign: ``rank(t) >= R_k`` iff ``w_t > W_k`` or (``w_t == W_k`` and the
  token's position among the ties is ``>= R_k - G_k``).

The result equals the reference exactly (so bucket sizes are exact and no
boundary deviates, ties included). On a GPU it is one cooperative launch
(plus one ``torch.zeros``): the phases are separated by grid barriers, every
program recomputes the small scans itself, and ``n`` never leaves the device.
Level-1 counts go to a private row per program and are then summed; other
atomics first add the block's extreme bins as single counts, so tied or
clustered keys do not serialise on one counter. The interpreter, which runs
programs one after another, runs one program, or one launch per phase.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..env import triton_interpret

_NB1 = 2048  # level 1: key bits 31..21
_NB2 = 2048  # level 2: key bits 20..10
_NB3 = 1024  # level 3: key bits 9..0
_MAX_PROGRAMS = 256


@triton.jit
def _load_keys(scores_ptr, valid_ptr, offs, N):
    """Rank keys and validity of tokens ``offs``.

    The key is an int64 in [0, 2**32) whose ascending order is the descending
    order of the fp32 score: non-finite scores first (as +inf), -0 equal to +0.
    """
    inb = offs < N
    s = tl.load(scores_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    ok = (tl.load(valid_ptr + offs, mask=inb, other=0) != 0) & inb
    finite = (s == s) & (tl.abs(s) != float("inf"))
    s = tl.where(finite, s, float("inf"))
    s = tl.where(s == 0.0, 0.0, s)
    b = s.to(tl.int32, bitcast=True)
    b = tl.where(b < 0, b ^ 0x7FFFFFFF, b)      # signed order == float order
    w = (~b).to(tl.int64) + 2147483647 + 1      # reversed (hardest first), as unsigned
    return w, ok


@triton.jit
def _hist_add(hist_ptr, bins, mask):
    """``hist[bins[i]] += 1`` where ``mask``.

    The block's two lowest and two highest bins go in as one atomic each:
    tied or clustered keys would otherwise serialise on a single counter.
    """
    rest = mask
    for _ in tl.static_range(2):
        lo = tl.min(tl.where(rest, bins, 2147483647), axis=0)
        n_lo = tl.sum((rest & (bins == lo)).to(tl.int32), axis=0)
        tl.atomic_add(hist_ptr + tl.where(n_lo > 0, lo, 0), n_lo, mask=n_lo > 0, sem="relaxed")
        rest = rest & (bins != lo)
        hi = tl.max(tl.where(rest, bins, -1), axis=0)
        n_hi = tl.sum((rest & (bins == hi)).to(tl.int32), axis=0)
        tl.atomic_add(hist_ptr + tl.where(n_hi > 0, hi, 0), n_hi, mask=n_hi > 0, sem="relaxed")
        rest = rest & (bins != hi)
    tl.atomic_add(hist_ptr + tl.where(rest, bins, 0), tl.full(bins.shape, 1, tl.int32), mask=rest, sem="relaxed")


@triton.jit
def _thresholds(n, K, KP: tl.constexpr):
    """Ranks R_k = ceil(k n / K) of the K-1 threshold tokens; active when such a token exists."""
    k = tl.arange(0, KP).to(tl.int64) + 1
    R = (k * n + K - 1) // K
    active = (k <= K - 1) & (R < n)
    return R, active


@triton.jit
def _scan_one(h, r):
    """Bin of histogram ``h`` holding rank ``r[j]`` for each threshold j, and the count before it."""
    cum = tl.cumsum(h, axis=0)
    before = cum[None, :] <= r[:, None]
    b = tl.sum(before.to(tl.int64), axis=1)
    above = tl.sum(tl.where(before, h[None, :], 0).to(tl.int64), axis=1)
    return b, above


@triton.jit
def _scan(hist_ptr, rows, r, NB: tl.constexpr):
    """As :func:`_scan_one`, threshold j reading histogram row ``rows[j]``."""
    bins = tl.arange(0, NB)
    h = tl.load(hist_ptr + rows[:, None] * NB + bins[None, :], cache_modifier=".cg")
    cum = tl.cumsum(h, axis=1)
    before = cum <= r[:, None]
    b = tl.sum(before.to(tl.int64), axis=1)
    above = tl.sum(tl.where(before, h, 0).to(tl.int64), axis=1)
    return b, above


@triton.jit
def _first_equal(P, KP: tl.constexpr):
    """For each threshold, the first threshold with the same prefix: whose histogram row it shares.

    Thresholds are ordered by rank, so every threshold before an active one is
    active: for active thresholds this is the first active one, as in :func:`_slot`.
    """
    j = tl.arange(0, KP)
    same = P[:, None] == P[None, :]
    return tl.min(tl.where(same, j[None, :], KP), axis=1)


@triton.jit
def _slot(prefix, ok, P, active, KP: tl.constexpr):
    """Histogram row of each token: the first active threshold whose prefix it has (KP if none)."""
    j = tl.arange(0, KP)
    match = ok[:, None] & active[None, :] & (prefix[:, None] == P[None, :])
    return tl.min(tl.where(match, j[None, :], KP), axis=1)


@triton.jit
def _grid_sync(bar_ptr, target):
    """Wait until every program has arrived here (``target`` = programs x barriers so far).

    Needs all programs resident at once: the launch is cooperative."""
    tl.debug_barrier()  # this program's earlier atomics are issued before it arrives
    seen = tl.atomic_add(bar_ptr, 1, sem="acq_rel") + 1
    while seen < target:
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _rank_buckets_kernel(
    scores_ptr, valid_ptr, out_ptr, scratch_ptr, N, CHUNK, K, P,
    PHASE: tl.constexpr, KP: tl.constexpr, PM: tl.constexpr, BLOCK: tl.constexpr,
):
    """All phases in one cooperative launch (``PHASE < 0``), or phase ``PHASE`` alone.

    Program ``pid`` owns tokens ``[pid*CHUNK, (pid+1)*CHUNK)``. The phases are
    separated by grid barriers; run one launch per phase (the interpreter
    does) and each launch recomputes the scans it needs from the histograms.
    ``scratch`` (int32, zeroed) holds, in order: level-1 rows of each program
    ``[P, 2048]``, level-1 totals ``[2048]``, level-2 ``[KP, 2048]``,
    level-3 ``[KP, 1024]``, tie counts ``[P, KP]`` and the barrier counter.
    """
    FUSED: tl.constexpr = PHASE < 0
    hist1p_ptr = scratch_ptr
    hist1_ptr = hist1p_ptr + P * 2048
    hist2_ptr = hist1_ptr + 2048
    hist3_ptr = hist2_ptr + KP * 2048
    ties_ptr = hist3_ptr + KP * 1024
    bar_ptr = ties_ptr + P * KP
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * CHUNK
    j = tl.arange(0, KP)

    # Phase 0: level-1 histogram, one private row per program (no contention between programs).
    if FUSED or PHASE == 0:
        for off in range(0, CHUNK, BLOCK):
            w, ok = _load_keys(scores_ptr, valid_ptr, start + off + tl.arange(0, BLOCK), N)
            _hist_add(hist1p_ptr + pid * 2048, (w >> 21).to(tl.int32), ok)
    if FUSED:
        _grid_sync(bar_ptr, P)

    # Phase 1: sum the private rows, 64 bins per program.
    if FUSED or PHASE == 1:
        rows = tl.arange(0, PM)
        for c0 in range(pid * 64, 2048, P * 64):
            cols = c0 + tl.arange(0, 64)
            h = tl.load(hist1p_ptr + rows[:, None] * 2048 + cols[None, :], mask=(rows < P)[:, None], other=0,
                        cache_modifier=".cg")
            tl.store(hist1_ptr + cols, tl.sum(h, axis=0))
    if FUSED:
        _grid_sync(bar_ptr, 2 * P)

    # Phase 2: thresholds and their level-1 bins; level-2 histogram of the tokens in those bins.
    if FUSED or PHASE >= 2:
        h1 = tl.load(hist1_ptr + tl.arange(0, 2048), cache_modifier=".cg")
        n = tl.sum(h1.to(tl.int64), axis=0)
        R, active = _thresholds(n, K, KP)
        P1, G1 = _scan_one(h1, R)
    if FUSED or PHASE == 2:
        for off in range(0, CHUNK, BLOCK):
            w, ok = _load_keys(scores_ptr, valid_ptr, start + off + tl.arange(0, BLOCK), N)
            slot = _slot(w >> 21, ok, P1, active, KP)
            _hist_add(hist2_ptr, (slot * 2048 + ((w >> 10) & 2047)).to(tl.int32), slot < KP)
    if FUSED:
        _grid_sync(bar_ptr, 3 * P)

    # Phase 3: 22-bit prefixes; level-3 histogram.
    if FUSED or PHASE >= 3:
        b2, above2 = _scan(hist2_ptr, _first_equal(P1, KP), R - G1, 2048)
        P2 = P1 * 2048 + b2
        G2 = G1 + above2
    if FUSED or PHASE == 3:
        for off in range(0, CHUNK, BLOCK):
            w, ok = _load_keys(scores_ptr, valid_ptr, start + off + tl.arange(0, BLOCK), N)
            slot = _slot(w >> 10, ok, P2, active, KP)
            _hist_add(hist3_ptr, (slot * 1024 + (w & 1023)).to(tl.int32), slot < KP)
    if FUSED:
        _grid_sync(bar_ptr, 4 * P)

    # Phase 4: threshold keys W exactly; each program counts its tokens tied with each W.
    if FUSED or PHASE >= 4:
        b3, above3 = _scan(hist3_ptr, _first_equal(P2, KP), R - G2, 1024)
        W = P2 * 1024 + b3            # key of the threshold token
        tie_rank = R - G2 - above3    # its position among the tokens with key W, in token order
    if FUSED or PHASE == 4:
        ties = tl.zeros([KP], dtype=tl.int32)
        for off in range(0, CHUNK, BLOCK):
            w, ok = _load_keys(scores_ptr, valid_ptr, start + off + tl.arange(0, BLOCK), N)
            tie = ok[:, None] & active[None, :] & (w[:, None] == W[None, :])
            ties += tl.sum(tie.to(tl.int32), axis=0)
        tl.store(ties_ptr + pid * KP + j, ties)
    if FUSED:
        _grid_sync(bar_ptr, 5 * P)

    # Phase 5: bucket = number of thresholds at or before the token in (key, index) order.
    if FUSED or PHASE == 5:
        p = tl.arange(0, PM)
        prior = tl.load(ties_ptr + p[:, None] * KP + j[None, :], mask=(p < pid)[:, None], other=0,
                        cache_modifier=".cg")
        seen = tl.sum(prior, axis=0)  # ties held by earlier programs
        for off in range(0, CHUNK, BLOCK):
            offs = start + off + tl.arange(0, BLOCK)
            w, ok = _load_keys(scores_ptr, valid_ptr, offs, N)
            tie = (ok[:, None] & active[None, :] & (w[:, None] == W[None, :])).to(tl.int32)
            pos = seen[None, :] + tl.cumsum(tie, axis=0) - tie
            later = (w[:, None] > W[None, :]) | ((tie != 0) & (pos >= tie_rank[None, :]))
            bucket = tl.sum((ok[:, None] & active[None, :] & later).to(tl.int64), axis=1)
            seen += tl.sum(tie, axis=0)
            tl.store(out_ptr + offs, tl.where(ok, bucket, -1), mask=offs < N)


def _interpreting() -> bool:
    return triton_interpret()


def rank_buckets_triton(scores: torch.Tensor, valid: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Exact difficulty buckets in O(n): same result as :func:`cggr.bucketing.rank_buckets_reference`.

    Args:
        scores: per-token difficulty, any shape (higher = harder; NaN/inf = hardest).
        valid: mask of the same shape (bool or numbers, nonzero = valid).
        num_buckets: ``K >= 1``.
    Returns:
        LongTensor shaped like ``scores``: bucket of each valid token, -1 for invalid ones.
    """
    return _rank_buckets(scores, valid, num_buckets)


def _rank_buckets(scores: torch.Tensor, valid: torch.Tensor, num_buckets: int, block: int | None = None,
                  max_programs: int | None = None, cooperative: bool | None = None) -> torch.Tensor:
    """The launcher. ``block`` and ``max_programs`` override the tiling;
    ``cooperative=False`` forces one launch per phase (tests use them)."""
    if scores.shape != valid.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} must have the same shape")
    K = int(num_buckets)
    if K < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    device = scores.device
    N = scores.numel()
    out = torch.empty(scores.shape, dtype=torch.long, device=device)
    if N == 0:
        return out
    # (Few, cheap host-side steps: at 64k tokens Python overhead outweighs the GPU time.)
    s = scores if scores.dim() == 1 else scores.reshape(-1)
    if s.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        s = s.float()  # the reference ranks fp32 keys
    if not s.is_contiguous():
        s = s.contiguous()
    v = valid if valid.dim() == 1 else valid.reshape(-1)
    v = v.view(torch.uint8) if v.dtype == torch.bool else (v != 0).view(torch.uint8)
    if not v.is_contiguous():
        v = v.contiguous()

    KP = triton.next_power_of_2(max(K - 1, 1))
    interpreting = _interpreting()
    if block is None:
        # GPU: small blocks spread over the SMs. The interpreter: one wide program.
        block = max(128, min(4096 if interpreting else min(512, 8192 // KP), triton.next_power_of_2(N)))
    if max_programs is None:
        max_programs = 1 if interpreting else _MAX_PROGRAMS
    if cooperative is None:
        cooperative = not interpreting
    if cooperative:  # one launch whose programs must all be resident at once
        max_programs = min(max_programs, _num_sms(device))
    programs = min(triton.cdiv(N, block), max_programs)
    chunk = triton.cdiv(triton.cdiv(N, programs), block) * block
    programs = triton.cdiv(N, chunk)

    scratch = torch.zeros(programs * _NB1 + _NB1 + KP * (_NB2 + _NB3) + programs * KP + 1,
                          dtype=torch.int32, device=device)
    args = (s, v, out, scratch, N, chunk, K, programs)
    meta = dict(KP=KP, PM=triton.next_power_of_2(programs), BLOCK=block, num_warps=8 if block * KP >= 2048 else 4)
    if programs == 1:  # the barriers of a single program are no-ops
        _rank_buckets_kernel[(1,)](*args, PHASE=-1, **meta)
        return out
    if cooperative:
        try:
            _rank_buckets_kernel[(programs,)](*args, PHASE=-1, launch_cooperative_grid=True, **meta)
            return out
        except RuntimeError:  # the device refused a cooperative launch this large: phase by phase
            scratch.zero_()
    # Kernel boundaries as barriers (also what the interpreter, which runs programs one by one, needs).
    for phase in range(6):
        _rank_buckets_kernel[(programs,)](*args, PHASE=phase, **meta)
    return out


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _MAX_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count
