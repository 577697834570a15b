"""The attention backward of the compacted blocks: dense over the sequence.

Active queries attend to every key, so the attention's backward cannot shrink to the active rows; the output
gradient of inactive queries is zero, and only the active rows of the key and value gradients are read
afterwards. ``attend(q, k, v)`` is the family's own SDPA call.

A saving block keeps the attention's own autograd node from its forward (:func:`attention_in_forward`): the
fused attention saves its output and log-sum-exp, so the backward needs no second forward. The node is taken
by the first backward (:func:`take_attention_grad`) and freed with it; a second backward through the same graph
(``retain_graph=True``) recomputes the forward from the saved q, k, v instead.
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


def attention_in_forward(attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: bool):
    """``(out, grad)`` for a block's forward: ``out`` detached, and ``grad(do) -> (dq, dk, dv)`` through that
    very forward when ``keep`` (its saved tensors share storage with q, k, v and out: no extra memory beyond
    the log-sum-exp), else None (nothing recorded)."""
    if not keep:
        return attend(q, k, v), None
    out, grad = attention_with_grad(attend, q, k, v)
    return out.detach(), grad


def take_attention_grad(ctx, attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The attention backward a forward kept on ``ctx.attention_grad``, handed out once (the kept node is freed
    after this backward); a later backward through a retained graph gets one that recomputes the forward."""
    kept = getattr(ctx, "attention_grad", None)
    ctx.attention_grad = None
    return kept if kept is not None else attention_grad_by_recompute(attend, q, k, v)


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
