"""Row-gather kernels of the compacted Llama backward: the rotary and the SwiGLU backward on active rows.

References (what these compute, bit for bit but for the sigmoid's last fp32 bit):
:func:`cggr.compact.pointwise.rope_backward` and :func:`cggr.compact.pointwise.swiglu_backward`. Both read the
rows ``idx`` of full saved tensors (the gather is fused into the load) and write ``[n, ...]`` results.

Each program handles a block of active rows times a block of columns: it loads the rows' indices once, reads
those rows (64-bit offsets: ``N * columns`` may pass 2^31), computes in fp32 and writes in the output dtype,
rounded to nearest even (compiled, by the GPU's conversion; under Triton's interpreter, whose conversion
truncates, bf16 by its bits).
No product is contracted into a sum: PyTorch's eager ops round every product and sum, and an FMA would round
once fewer. Compiled, the kernels multiply and add with libdevice's ``mul_rn``/``add_rn``/``sub_rn`` (PTX
``mul.rn``/``add.rn``, which the compiler never fuses), so they compute the same under any
``enable_fp_fusion``: Inductor, which launches them from the compacted backward's compiled stages
(``wrap_triton``: no Python launcher and no custom-op dispatch per call), builds user kernels with its default,
fusion on. The sigmoid is ``1 / (1 + exp(-x))`` with libdevice's ``expf`` and an
IEEE division, the formula and functions of PyTorch's CUDA kernel (Triton's ``tl.exp`` and ``/`` are
approximate); under Triton's interpreter, which has no libdevice, a fp64 ``exp`` rounded to fp32 stands in. The
sigmoid is the one operation whose last fp32 bit may differ from the reference's (on the CPU PyTorch's own
vectorised ``exp`` is not correctly rounded either); every other operation rounds alike. (Triton builds
libdevice with denormals flushed: a sigmoid below 2^-126, for g < -87, may come out 0 where PyTorch keeps the
denormal.)

fp32, bf16 and fp16 inputs (fp64 has no kernel here: the reference computes it in fp64). Block sizes are
untuned guesses (about 4096 elements per tile and input); ``benchmarks/rows.py`` measures them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.language.extra import libdevice

from ..env import triton_interpret

_TILE = 4096  # elements per tile and input


@triton.jit
def _mul(a, b, PRECISE: tl.constexpr):
    """``a * b`` rounded on its own: never contracted into an FMA with a following sum (see the module doc)."""
    if PRECISE:
        return libdevice.mul_rn(a, b)
    else:
        return a * b


@triton.jit
def _add(a, b, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.add_rn(a, b)
    else:
        return a + b


@triton.jit
def _sub(a, b, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.sub_rn(a, b)
    else:
        return a - b


@triton.jit
def _sigmoid(x, PRECISE: tl.constexpr):
    """PyTorch's CUDA sigmoid, ``1 / (1 + expf(-x))`` with an IEEE division. ``PRECISE`` off (Triton's
    interpreter, which has no libdevice): ``exp`` in fp64 rounded to fp32 (a nearly always correctly rounded
    ``expf``)."""
    if PRECISE:
        e = libdevice.exp(-x)
    else:
        e = tl.exp((-x).to(tl.float64)).to(tl.float32)
    # 1 + e by add.rn: expf ends in a product, which a contracting build would fuse with this sum.
    return tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), _add(e, 1.0, PRECISE))


@triton.jit
def _round(x, ptr, PRECISE: tl.constexpr):
    """fp32 ``x`` rounded to the element type of ``ptr``, to nearest even, as PyTorch's ``c10::BFloat16`` rounds.
    ``PRECISE`` (compiled for the GPU): the hardware's conversion, one instruction (``cvt.rn``). Off (Triton's
    interpreter, whose conversion truncates): bf16 by its bits, about seven integer operations per value (four
    roundings a value in the SwiGLU backward, which by its instruction count, not a profile, is bound by its
    instructions more than by memory); NaN stays NaN either way."""
    ty = ptr.dtype.element_ty
    if ty == tl.bfloat16 and not PRECISE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x == x, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, 0x7FC0)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ty)


@triton.jit
def _rope_rows_backward_kernel(
    dt_ptr, cos_ptr, sin_ptr, idx_ptr, out_ptr,
    n, S, heads,
    s_dr, s_dc,          # dt [N, heads * hd]: row and column strides
    s_cb, s_cs, s_cd,    # cos [B, S, hd]: strides (0 over an expanded batch)
    s_sb, s_ss, s_sd,    # sin [B, S, hd]
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISE: tl.constexpr,  # compiled for the GPU (not interpreted): see _round
    HAS_IDX: tl.constexpr,  # False: every row, in order (idx_ptr is not read)
):
    # Tile [BLOCK_R rows, BLOCK_H heads, BLOCK_D dims of each half]: each half of a head is read once.
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # output rows
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    row_ok = i < n
    d_ok = d < HALF
    if HAS_IDX:
        r = tl.load(idx_ptr + i, mask=row_ok, other=0).to(tl.int64)  # token rows
    else:
        r = i
    # cos/sin of token row r sit at (batch r // S, position r % S).
    cmask = row_ok[:, None] & d_ok[None, :]
    c_at = cos_ptr + ((r // S) * s_cb + (r % S) * s_cs)[:, None]
    s_at = sin_ptr + ((r // S) * s_sb + (r % S) * s_ss)[:, None]
    c1 = tl.load(c_at + d[None, :] * s_cd, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
    c2 = tl.load(c_at + (d + HALF)[None, :] * s_cd, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(s_at + d[None, :] * s_sd, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(s_at + (d + HALF)[None, :] * s_sd, mask=cmask, other=0.0).to(tl.float32)[:, None, :]

    col = h[None, :, None] * (2 * HALF) + d[None, None, :]  # first-half column of each head
    mask = row_ok[:, None, None] & (h < heads)[None, :, None] & d_ok[None, None, :]
    t_at = dt_ptr + r[:, None, None] * s_dr
    t1 = tl.load(t_at + col * s_dc, mask=mask, other=0.0).to(tl.float32)
    t2 = tl.load(t_at + (col + HALF) * s_dc, mask=mask, other=0.0).to(tl.float32)
    # dt = dt'*cos + rotate_half^T(dt'*sin), rotate_half^T([a, b]) = [b, -a]; rounded as the reference rounds.
    o1 = _add(_mul(t1, c1, PRECISE), _mul(t2, s2, PRECISE), PRECISE)
    o2 = _sub(_mul(t2, c2, PRECISE), _mul(t1, s1, PRECISE), PRECISE)
    o_at = out_ptr + i[:, None, None] * (heads * 2 * HALF) + col
    tl.store(o_at, _round(o1, out_ptr, PRECISE), mask=mask)
    tl.store(o_at + HALF, _round(o2, out_ptr, PRECISE), mask=mask)


@triton.jit
def _swiglu_rows_backward_kernel(
    dm_ptr, g_ptr, u_ptr, idx_ptr, m_ptr, dg_ptr, du_ptr,
    n, F,
    s_mr, s_mc, s_gr, s_gc, s_ur, s_uc,  # row and column strides of dm [n, F], g and u [N, F]
    PRECISE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
    HAS_IDX: tl.constexpr,  # False: every row, in order (idx_ptr is not read)
):
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # output rows
    f = (tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)).to(tl.int64)
    row_ok = i < n
    if HAS_IDX:
        r = tl.load(idx_ptr + i, mask=row_ok, other=0).to(tl.int64)  # token rows
    else:
        r = i
    mask = row_ok[:, None] & (f < F)[None, :]
    dm = tl.load(dm_ptr + i[:, None] * s_mr + f[None, :] * s_mc, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + r[:, None] * s_gr + f[None, :] * s_gc, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r[:, None] * s_ur + f[None, :] * s_uc, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g, PRECISE)
    act = _round(g * sig, m_ptr, PRECISE).to(tl.float32)  # the forward rounds silu(g) to the activation dtype
    # The reference's operations in its order (no contraction): every intermediate rounds to fp32 alike.
    m = act * u
    du = dm * act
    dg = dm * u * (sig * _add(_mul(g, 1.0 - sig, PRECISE), 1.0, PRECISE))
    o = i[:, None] * F + f[None, :]
    tl.store(m_ptr + o, _round(m, m_ptr, PRECISE), mask=mask)
    tl.store(dg_ptr + o, _round(dg, dg_ptr, PRECISE), mask=mask)
    tl.store(du_ptr + o, _round(du, du_ptr, PRECISE), mask=mask)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def supported(*tensors: torch.Tensor) -> bool:
    """Whether these kernels take tensors of these dtypes (fp64 goes to the reference, which keeps fp64)."""
    return all(t.dtype in _FLOATS for t in tensors)


def _as_bsd(t: torch.Tensor, N: int) -> torch.Tensor:
    """cos/sin as ``[B, S, hd]`` with ``B * S = N`` (a ``[N, hd]`` tensor is ``[1, N, hd]``): no copy."""
    t3 = t.unsqueeze(0) if t.dim() == 2 else t
    if t3.dim() != 3 or t3.shape[0] * t3.shape[1] != N:
        raise ValueError(f"cos/sin of shape {tuple(t.shape)}: expected [N, hd] or [B, S, hd] with B*S = N = {N}")
    return t3


def _launch_opts(tile: int) -> dict:
    return dict(num_warps=8 if tile >= 8192 else 4)


@torch.no_grad()
def rope_rows_backward(dt: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       idx: torch.Tensor | None) -> torch.Tensor:
    """:func:`cggr.compact.pointwise.rope_backward` as one kernel: ``[n, heads * hd]`` in ``dt``'s dtype.

    ``dt`` ``[N, heads * hd]`` in any strides (the views :func:`~cggr.compact.pointwise.token_rows` returns are
    2-D tensors with a row and a column stride: every one of them is read in place); ``cos``/``sin`` ``[N, hd]``
    or ``[B, S, hd]`` with ``B * S = N``, any strides (an expanded batch is read in place); ``idx``: the ``n``
    rows, an integer tensor, or None for every row in order (no index is read).
    """
    N, C = dt.shape
    hd = cos.shape[-1]
    if hd % 2 or C % hd:
        raise ValueError(f"rotary backward: head dim {hd} must be even and divide the row length {C}")
    if not supported(dt, cos, sin):
        raise TypeError(f"rotary backward kernel: fp32/bf16/fp16 only, got {dt.dtype}, {cos.dtype}, {sin.dtype}")
    c3, s3 = _as_bsd(cos, N), _as_bsd(sin, N)
    idx = None if idx is None else idx.reshape(-1).contiguous()
    n, heads, half = N if idx is None else idx.numel(), C // hd, hd // 2
    out = torch.empty(n, C, dtype=dt.dtype, device=dt.device)
    if n == 0 or C == 0:
        return out
    block_d = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(heads), max(1, 512 // block_d))
    # Block sizes from the static shapes only: under a compiled stage ``n`` is symbolic (one graph for every row
    # count), and a block size read from it would specialise the graph to it.
    block_r = max(1, _TILE // (block_h * block_d))
    grid = (triton.cdiv(n, block_r), triton.cdiv(heads, block_h))
    wrap_triton(_rope_rows_backward_kernel)[grid](
        dt, c3, s3, dt if idx is None else idx, out, n, c3.shape[1], heads, *dt.stride(), *c3.stride(),
        *s3.stride(), HALF=half, BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_D=block_d, PRECISE=not triton_interpret(),
        HAS_IDX=idx is not None,
        **_launch_opts(2 * block_r * block_h * block_d))
    return out


@torch.no_grad()
def swiglu_rows_backward(dm: torch.Tensor, g: torch.Tensor, u: torch.Tensor, idx: torch.Tensor | None):
    """:func:`cggr.compact.pointwise.swiglu_backward` as one kernel: ``(m_a, dg_a, du_a)``, ``[n, F]`` each, in
    ``dm``'s dtype. ``dm`` ``[n, F]``, ``g``/``u`` ``[N, F]``: any strides; ``idx``: the ``n`` rows (None: all
    ``N``, in order)."""
    if not supported(dm, g, u):
        raise TypeError(f"SwiGLU backward kernel: fp32/bf16/fp16 only, got {dm.dtype}, {g.dtype}, {u.dtype}")
    idx = None if idx is None else idx.reshape(-1).contiguous()
    n, F = g.shape[0] if idx is None else idx.numel(), g.shape[1]
    if dm.shape != (n, F) or u.shape != g.shape:
        raise ValueError(f"SwiGLU backward: dm {tuple(dm.shape)}, g {tuple(g.shape)}, u {tuple(u.shape)}, "
                         f"{n} rows")
    outs = [torch.empty(n, F, dtype=dm.dtype, device=dm.device) for _ in range(3)]
    if n == 0 or F == 0:
        return tuple(outs)
    block_f = min(triton.next_power_of_2(F), 256)  # rows of 512 contiguous bytes in bf16; F = 2816 = 11 * 256
    block_r = max(1, _TILE // block_f)  # not from n (see rope_rows_backward)
    grid = (triton.cdiv(n, block_r), triton.cdiv(F, block_f))
    wrap_triton(_swiglu_rows_backward_kernel)[grid](
        dm, g, u, g if idx is None else idx, *outs, n, F, *dm.stride(), *g.stride(), *u.stride(),
        PRECISE=not triton_interpret(), BLOCK_R=block_r, BLOCK_F=block_f, HAS_IDX=idx is not None,
        **_launch_opts(block_r * block_f))
    return tuple(outs)
