"""The attention backward of the compacted blocks: dense over the sequence, by recomputing the forward.

Active queries attend to every key, so the attention's backward cannot shrink to the active rows; the output
gradient of inactive queries is zero, and only the active rows of the key and value gradients are read
afterwards. ``attend(q, k, v)`` is the family's own SDPA call.
"""

from __future__ import annotations

from typing import Callable

import torch


def attention_with_grad(attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``(out, grad)``: the attention's output on detached copies of q, k, v, and ``grad(do) -> (dq, dk, dv)``
    through that same forward (the checkpointed backwards need both)."""
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = attend(qq, kk, vv)
    return out, lambda do: torch.autograd.grad(out, (qq, kk, vv), do)


def attention_grad_by_recompute(attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``grad(do) -> (dq, dk, dv)`` that recomputes the forward only when called (nothing kept meanwhile)."""
    return lambda do: attention_with_grad(attend, q, k, v)[1](do)


def refuse_double_backward() -> None:
    """Called first in every compacted backward: raise when it runs with ``create_graph=True``.

    The compacted backwards compute their gradients with ops autograd does not differentiate (recomputed,
    detached, compiled pieces): a graph through them would give wrong second derivatives without an error.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("cggr: double backward through a compacted block is not supported; attach with "
                           "backward='generic' for create_graph/double backward")
