"""The gradient row gate: the one primitive every routed backward uses.

In block ``b`` (1 = bottom) of an ``L``-block stack a token of depth ``d`` is
active when ``d > L - b``. Gating a gradient tensor whose rows are tokens
keeps the active rows and multiplies the inactive rows by ``leak_rate``
(0 by default: the rows belong to constants, docs/design.md §1.8). The Triton kernel
reads one depth per row, so no mask the size of the hidden states exists.
"""

from __future__ import annotations

import torch

from .kernels import check_rows, triton_available


def gate_rows_reference(grad: torch.Tensor, depth: torch.Tensor, threshold: int, leak_rate: float) -> torch.Tensor:
    """``grad`` with rows whose ``depth <= threshold`` scaled by ``leak_rate``.

    ``grad`` is ``[..., H]`` with ``depth.numel()`` rows (``grad.numel() //
    H``); ``depth`` is an integer tensor, one entry per row. Returns a new
    tensor of ``grad``'s shape and dtype.
    """
    rows = depth.numel()
    check_rows(grad, rows)
    g = grad.reshape(rows, grad.numel() // rows if rows else 0)
    keep = (depth.reshape(rows, 1) > threshold)
    scale = torch.where(keep, torch.ones((), dtype=g.dtype, device=g.device),
                        torch.full((), leak_rate, dtype=g.dtype, device=g.device))
    return (g * scale).reshape(grad.shape)


def gate_rows(grad: torch.Tensor, depth: torch.Tensor, threshold: int, leak_rate: float) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA when available, else the reference.

    The kernel is not differentiable; where the result must be (a backward with ``create_graph=True``, whose
    incoming gradient requires grad), the reference runs, so that a double backward stays exact.
    """
    if grad.is_cuda and not (grad.requires_grad and torch.is_grad_enabled()):
        if triton_available():
            from .kernels.gate import gate_rows_triton  # imports Triton: only when it runs

            return gate_rows_triton(grad, depth, threshold, leak_rate)
    return gate_rows_reference(grad, depth, threshold, leak_rate)
