"""The generic routed backward: works for any block built from linears.

Two autograd functions carry a :class:`~cggr.routing.Routing` from a forward to
its backward:

* :class:`RoutedLinear` computes ``y = x W^T + b`` (or ``x W + b`` for HF's
  ``Conv1D``) and, in backward, treats the output rows of tokens inactive in
  its block as constants. With ``leak_rate == 0`` it gathers the active rows
  and runs the two backward matmuls on them alone, so the matmul work really
  shrinks with the active fraction; the input gradient of inactive rows is
  zero. With ``leak_rate > 0`` the rows are dense again (gated by
  ``leak_rate``), which is why a leak costs the whole saving.
* :class:`GateRows` is the identity in forward and gates the gradient rows of
  a block's output in backward (sparse and mask mode both use it).

This is the fallback every architecture gets; the norms, attention backward
and residual adds still run over every row (docs/design.md §3.1 measures what
that costs).
"""

from __future__ import annotations

import torch

from .routing import Routing


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``t`` runs in under the current autocast state."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class RoutedLinear(torch.autograd.Function):
    """A linear whose backward uses only the rows active in ``block_index``.

    ``weight_in_out``: the weight is stored ``[in, out]`` (HF ``Conv1D``)
    instead of ``[out, in]`` (``nn.Linear``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, routing: Routing, block_index: int, weight_in_out: bool):
        dt = _compute_dtype(x)
        xc = x if x.dtype == dt else x.to(dt)
        wc = weight if weight.dtype == dt else weight.to(dt)
        bc = None if bias is None else (bias if bias.dtype == dt else bias.to(dt))
        with torch.autocast(x.device.type, enabled=False):
            if weight_in_out:
                shape = xc.shape[:-1] + (wc.shape[1],)
                x2 = xc.reshape(-1, xc.shape[-1])
                y = (torch.addmm(bc, x2, wc) if bc is not None else x2 @ wc).reshape(shape)
            else:
                y = torch.nn.functional.linear(xc, wc, bc)
        # Saving the cast copies keeps autocast's memory behaviour (the cast
        # weight is what plain autocast saves too).
        ctx.save_for_backward(xc, wc)
        ctx.routing = routing
        ctx.block_index = block_index
        ctx.weight_in_out = weight_in_out
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.cast = xc is not x or wc is not weight  # saved copies (a cast bias is not saved)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        routing: Routing = ctx.routing
        i = ctx.block_index
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        n = routing.num_rows
        x2 = x.reshape(-1, x.shape[-1])
        g2 = gy.reshape(-1, gy.shape[-1]).to(x2.dtype)
        if x2.shape[0] != n:
            raise RuntimeError(
                f"cggr: a routed linear in block {i} saw {x2.shape[0]} rows but the batch has {n} tokens; "
                "this block cannot be routed row by row")
        if ctx.cast and torch.is_grad_enabled():
            # A create_graph backward differentiates this one; the cast copies saved in forward carry no graph
            # back to the input and weights, so the second derivative would silently miss their terms.
            raise RuntimeError(
                f"cggr: a double backward (create_graph=True) through the routed linear in block {i} is not "
                "supported when its forward cast the input or weights (autocast, or weights in another dtype "
                "than the input): run that forward outside autocast, with input and weights in one dtype")
        # w as [out, in] for the maths below
        w_oi = w.t() if ctx.weight_in_out else w

        leak = routing.leak_rate
        n_active = n if leak > 0 else routing.active_count(i)
        if leak > 0:
            g2 = routing.gate(g2, i)
        gx = gw = gb = None
        if n_active == n:  # every row active (or leaking): the dense backward
            if need_x:
                gx = (g2 @ w_oi).reshape(x.shape)
            if need_w:
                gw = g2.t() @ x2
            if need_b and ctx.has_bias:
                gb = g2.sum(0)
        else:
            idx = routing.active_rows(i)
            ga = g2.index_select(0, idx)
            if need_x:
                gx = x2.new_zeros(x2.shape)
                if n_active:
                    gx.index_copy_(0, idx, ga @ w_oi)
                gx = gx.reshape(x.shape)
            if need_w:
                gw = ga.t() @ x2.index_select(0, idx)
            if need_b and ctx.has_bias:
                gb = ga.sum(0)
        if gw is not None and ctx.weight_in_out:
            gw = gw.t()
        x_dt, w_dt, b_dt = ctx.dtypes
        if gx is not None and gx.dtype != x_dt:
            gx = gx.to(x_dt)
        if gw is not None and gw.dtype != w_dt:
            gw = gw.to(w_dt)
        if gb is not None and gb.dtype != b_dt:
            gb = gb.to(b_dt)
        return gx, gw, gb, None, None, None


class GateRows(torch.autograd.Function):
    """Identity in forward; in backward, gradient rows inactive in ``block_index`` are scaled by the leak."""

    @staticmethod
    def forward(ctx, h, routing: Routing, block_index: int):
        ctx.routing = routing
        ctx.block_index = block_index
        # A fresh tensor, not a view: models may modify block outputs in place.
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        r: Routing = ctx.routing
        _check_rows(g, r, ctx.block_index)
        return r.gate(g, ctx.block_index), None, None


class SkipRows(torch.autograd.Function):
    """Skip semantics at a block's output (docs/design.md §1.7): identity in forward; in backward the gradient rows of
    tokens inactive in ``block_index`` go to the block's *input* (the residual stream) instead of into the
    block (by ``1 - leak_rate``; the block keeps ``leak_rate`` of them). Active rows enter the block, times their
    weight ``w`` when the routing reweights (``1/pi``, :attr:`Routing.branch_weight`), the rest ``(1 - w)`` going
    straight to the input: the input gets ``g + J^T (w g)``, the residual unweighted, the branch reweighted
    (docs/design.md §1.13). Also the point where the block's rows are drawn from its output gradient
    (importance="block"), before the block's own backward reads them. (A compacted block does all of this in its
    own backward, on its kept rows: :mod:`cggr.compact`.)

    ``y``: the block output; ``x``: the block input, of the same shape.
    """

    @staticmethod
    def forward(ctx, y, x, routing: Routing, block_index: int):
        ctx.routing, ctx.block_index, ctx.x_dtype = routing, block_index, x.dtype
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        r: Routing = ctx.routing
        _check_rows(g, r, ctx.block_index)
        r.prepare_backward(ctx.block_index, g)
        into_block = r.into_branch(g, ctx.block_index)
        return into_block, (g - into_block).to(ctx.x_dtype), None, None


def _check_rows(g: torch.Tensor, r: Routing, block_index: int) -> None:
    if g.numel() // max(1, g.shape[-1]) != r.num_rows:
        raise RuntimeError(f"cggr: block {block_index} output has {g.numel() // max(1, g.shape[-1])} rows "
                           f"but the batch has {r.num_rows} tokens")
