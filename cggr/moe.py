"""The routed backward of HF mixture-of-experts layers (Mixtral, Qwen2-MoE, OLMoE, ...).

An MoE block holds, besides linears (attention, a shared expert: those take
:class:`~cggr.sparse.RoutedLinear`), two row-wise modules that
:mod:`cggr.adapters` recognises:

* the top-k router: its float outputs (logits, expert weights) go through
  :class:`~cggr.sparse.GateRows`, so the gradient of an inactive row, the
  auxiliary loss's included, stops there. Its backward is one
  ``[tokens, experts]`` matmul, too small to be worth gathering rows for;
* the fused experts (3-D ``gate_up_proj`` / ``down_proj``): :class:`RoutedExperts`,
  whose backward runs the experts of the active rows only.

Why the experts are replayed in backward: the routing is decided from the
logits, after the forward, so the forward cannot know for which rows to keep
a graph, and a graph over every row makes autograd work on every row. So the
forward keeps HF's graph of the experts (whatever kernel HF dispatches to:
eager loop, batched or grouped mm) and, in backward, either uses it with the
inactive rows' gradient zeroed, or drops it and runs the experts again on the
active rows alone (forward and backward) -- whichever costs less. An expert
backward costs about two forwards, so the replay (one forward plus one
backward of the active fraction ``a``: ``3a``) pays when ``a < 2/3``: the
lower blocks, where most tokens are inactive.
"""

from __future__ import annotations

import torch

from .routing import Routing

# Replay the active rows when fewer than this fraction of rows is active (see the module docstring).
REPLAY_BELOW = 2 / 3


class RoutedExperts(torch.autograd.Function):
    """``experts_forward(hidden, top_k_index, top_k_weights)`` whose backward uses only the rows active in
    ``block_index`` (``hidden``: ``[tokens, hidden]``; ``params``: the experts' weights, for autograd)."""

    @staticmethod
    def forward(ctx, hidden, top_k_weights, top_k_index, routing: Routing, block_index: int, experts,
                experts_forward, *params):
        dev = hidden.device.type
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(hidden.requires_grad)
            w = top_k_weights.detach().requires_grad_(top_k_weights.requires_grad)
            out = experts_forward(h, top_k_index, w)
        ctx.graph = (out, h, w, params) if out.requires_grad else None
        ctx.save_for_backward(hidden, top_k_weights, top_k_index)
        ctx.routing = routing
        ctx.block_index = block_index
        ctx.experts = experts
        ctx.experts_forward = experts_forward
        ctx.autocast = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        return out.detach()

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True: the replayed experts' gradients are not differentiable
            raise RuntimeError("cggr: double backward through routed mixture-of-experts experts is not supported; "
                               "attach with mode='mask' for create_graph/double backward")
        hidden, weights, index = ctx.saved_tensors
        graph, ctx.graph = ctx.graph, None  # used once: a second backward (retain_graph) replays
        r: Routing = ctx.routing
        i = ctx.block_index
        n = r.num_rows
        if hidden.dim() != 2 or hidden.shape[0] != n:
            raise RuntimeError(f"cggr: the experts of block {i} saw hidden states {tuple(hidden.shape)} but the "
                               f"batch has {n} tokens; they cannot be routed row by row")
        need_h, need_w = ctx.needs_input_grad[:2]
        need_p = ctx.needs_input_grad[7:]
        n_active = n if r.leak_rate > 0 else r.active_count(i)
        if n_active == 0:
            return (None,) * len(ctx.needs_input_grad)
        if n_active == n or (graph is not None and n_active >= REPLAY_BELOW * n):
            rows = None  # every row: the inactive ones carry a gated (zero, or leak-scaled) gradient
            if n_active < n or r.leak_rate > 0:
                g = r.gate(g, i)
        else:
            rows = r.active_rows(i)
            g = g.index_select(0, rows)

        if rows is None and graph is not None:
            out, h, w, params = graph
        else:
            dev, dtype, enabled = ctx.autocast
            params = tuple(ctx.experts.parameters())  # the weights its forward reads now (as FSDP has them)
            h, w, k = (hidden, weights, index) if rows is None else (
                hidden.index_select(0, rows), weights.index_select(0, rows), index.index_select(0, rows))
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                h = h.detach().requires_grad_(need_h)
                w = w.detach().requires_grad_(need_w)
                out = ctx.experts_forward(h, k, w)

        wanted = [t for t, need in ((h, need_h), (w, need_w), *zip(params, need_p)) if need]
        if not wanted:
            return (None,) * len(ctx.needs_input_grad)
        got = iter(torch.autograd.grad(out, wanted, g, allow_unused=True))
        gh = next(got) if need_h else None
        gw = next(got) if need_w else None
        gp = [next(got) if need else None for need in need_p]
        if rows is not None:
            gh = None if gh is None else hidden.new_zeros(hidden.shape).index_copy_(0, rows, gh)
            gw = None if gw is None else weights.new_zeros(weights.shape).index_copy_(0, rows, gw)
        return (gh, gw, None, None, None, None, None, *gp)
