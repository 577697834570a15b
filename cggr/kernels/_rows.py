"""Launch configurations shared by the kernels that stream one vocabulary row per program
(:mod:`cggr.kernels.scoring`, :mod:`cggr.kernels.linear_ce`)."""

from __future__ import annotations

import triton
import triton.language as tl

# Measured on an H100 for the scoring kernel (bf16, V = 32000 and 128256): 4096/4 and 8192/8 read at about
# 2.9 TB/s, as fast as torch's own sum; 16 warps or 8 warps on 4096 lose 5-25 %. Not yet measured for the
# fused linear cross-entropy kernel, which reads each row twice and writes it once.
ROW_CONFIGS = [
    triton.Config({"BLOCK_V": bv}, num_warps=nw)
    for bv, nw in ((1024, 4), (2048, 4), (4096, 4), (8192, 8))
]


def prune_wide_blocks(configs, named_args, **kwargs):
    """Drop blocks much wider than the vocabulary (they would only load padding)."""
    v = named_args["V"]
    cap = max(triton.next_power_of_2(v), 1024)
    kept = [c for c in configs if c.kwargs["BLOCK_V"] <= cap]
    return kept or configs[:1]


@triton.jit
def online_softmax_row(base, V, BLOCK_V: tl.constexpr):
    """One read of a row of ``V`` values at ``base``, chunk by chunk: ``(m, s, t)`` in fp32 with ``m`` the row
    maximum, ``s = sum exp(x - m)`` and ``t = sum exp(x - m) (x - m)`` (entropy = log s - t / s).

    When a chunk raises the maximum from ``m`` to ``m'`` the state is rescaled: ``s' = s e^(m-m')`` and
    ``t' = e^(m-m') (t + s (m - m'))``. NaN or +inf entries make ``s`` NaN (``inf - inf``); ``-inf`` entries add
    nothing (their ``x - m`` is clamped to a finite value, since ``0 * -inf`` is NaN).
    """
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")  # running max
    s = 0.0            # sum exp(x - m)
    t = 0.0            # sum exp(x - m) * (x - m)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # Shift by the new max; by 0 while every entry seen so far is -inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = x - shift
        e = tl.exp(z)
        s_c = tl.sum(e, axis=0)
        # -inf entries: e = 0 and z = -inf; clamping z keeps 0 * z at 0 (one max, no select).
        t_c = tl.sum(e * tl.maximum(z, -3.0e38), axis=0)
        # Rescale the old state to the new max (no-op when the max is unchanged; s = t = 0 while it is -inf).
        same = m == m_new
        scale = tl.where(same, 1.0, tl.exp(m - m_new))
        t_old = tl.where(same, t, tl.where(s > 0.0, scale * (t + s * (m - m_new)), 0.0))
        t = t_old + t_c
        s = s * scale + s_c
        m = m_new
    return m, s, t
