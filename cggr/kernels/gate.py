"""Fused gradient row gate. Reference: :func:`cggr.gate.gate_rows_reference`.

``grad`` is viewed as ``[rows, H]`` with one depth per row; rows whose depth is
``<= threshold`` are multiplied by ``leak_rate``, the others are copied. Each
program handles a ``[BLOCK_R, BLOCK_H]`` tile and reads ``BLOCK_R`` depths, so
no mask of ``grad``'s size is ever built.

Rounding matches the reference exactly: ``leak_rate`` is first rounded to
``grad``'s dtype (as ``torch.full((), leak_rate, dtype=...)`` does), then the
product is formed in fp32 (fp64 for fp64 grads) and rounded once to the dtype,
which is what PyTorch's elementwise multiply does for half types.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ..env import triton_interpret
from . import check_rows


@triton.jit(do_not_specialize=["threshold", "leak_bits"])
def _gate_rows_kernel(
    g_ptr, depth_ptr, out_ptr,
    R, H, threshold, leak_bits,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, F64: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < R
    depth = tl.load(depth_ptr + rows, mask=row_ok, other=0)
    # leak_rate travels as the bit pattern of a float64 (exact for every dtype).
    leak = leak_bits.to(tl.int64).to(tl.float64, bitcast=True)
    if F64:
        one = tl.full([BLOCK_R], 1.0, tl.float64)
        scale = tl.where(depth > threshold, one, leak)
    else:
        one = tl.full([BLOCK_R], 1.0, tl.float32)
        scale = tl.where(depth > threshold, one, leak.to(tl.float32))
    offs = rows[:, None] * H + cols[None, :]
    mask = row_ok[:, None] & (cols < H)[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    y = g.to(scale.dtype) * scale[:, None]
    tl.store(out_ptr + offs, y.to(g.dtype), mask=mask)


def _interpreting() -> bool:
    return triton_interpret()


@torch.no_grad()
def gate_rows_triton(grad: torch.Tensor, depth: torch.Tensor, threshold: int, leak_rate: float) -> torch.Tensor:
    """:func:`cggr.gate.gate_rows_reference` as one Triton kernel.

    Args:
        grad: ``[..., H]`` float tensor with ``depth.numel()`` rows of ``H``
            elements (copied first if not contiguous).
        depth: integer tensor, one depth per row of ``grad``.
        threshold: rows with ``depth <= threshold`` are scaled by ``leak_rate``.
        leak_rate: factor of the gated rows (0 drops them).
    Returns:
        A new contiguous tensor of ``grad``'s shape and dtype.
    """
    if not grad.is_floating_point():
        raise TypeError(f"grad must be a floating-point tensor, got {grad.dtype}")
    rows = depth.numel()
    check_rows(grad, rows)
    if rows == 0 or grad.numel() == 0:
        return torch.empty_like(grad, memory_format=torch.contiguous_format)
    H = grad.numel() // rows
    g = grad.contiguous()
    d = depth.reshape(-1)
    if d.dtype == torch.bool:
        d = d.to(torch.uint8)
    if not d.is_contiguous():
        d = d.contiguous()
    out = torch.empty_like(g)
    # The reference's scale: leak_rate rounded to grad's dtype (exact in float64).
    leak = torch.tensor(float(leak_rate), dtype=grad.dtype).item()
    leak_bits = struct.unpack("<q", struct.pack("<d", leak))[0]
    block_h = min(triton.next_power_of_2(H), 2048)
    tile = 16384 if _interpreting() else (4096 if grad.element_size() >= 4 else 8192)
    block_r = max(1, min(tile // block_h, triton.next_power_of_2(rows)))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(H, block_h))
    _gate_rows_kernel[grid](
        g, d, out, rows, H, int(threshold), leak_bits,
        BLOCK_R=block_r, BLOCK_H=block_h, F64=grad.dtype == torch.float64,
        num_warps=4 if block_r * block_h <= 4096 else 8,
    )
    return out
