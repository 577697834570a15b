"""Compacted routed backward for GPT-2 blocks (HF ``GPT2Block``).

The same design as :mod:`cggr.compact.decoder`: one autograd function per
block whose forward is the HF block's maths with the block's own weights
(LayerNorm, fused q/k/v ``Conv1D``, causal SDPA, output ``Conv1D``, residual,
LayerNorm, ``Conv1D`` MLP with tanh-GELU, residual) and whose backward
gathers the active rows once, runs every projection, LayerNorm and GELU
backward on them alone, and scatters the input gradient once; the attention
backward stays dense over the sequence; with activation checkpointing on, a
second function keeps only the block input (routed checkpointing, as Llama's).
Dropout must be off (p = 0 or eval).
HF ``Conv1D`` stores weights ``[in, out]``: ``y = x @ W + b``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..routing import Routing
from .attention import attention_in_forward, attention_with_grad, refuse_double_backward, take_attention_grad
from .backward import CompactedBackward, dropout_off
from .pointwise import (gelu_tanh_rows, keep_attention_for, kept_rows, kernel, layer_norm_backward_add,
                        layer_norm_rows, plus_rest, rows_of, scatter_rows, stage_grads, token_rows, weighted_rows,
                        with_skip)


@dataclass(frozen=True)
class GPT2BlockSpec:
    hidden_size: int
    num_heads: int
    head_dim: int
    scaling: float
    eps1: float
    eps2: float


class GPT2Weights(NamedTuple):
    """A GPT-2 block's parameters (or their gradients); ``Conv1D`` weights stored ``[in, out]``."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    attn: torch.Tensor  # c_attn: q, k, v fused
    attn_b: torch.Tensor
    attn_proj: torch.Tensor  # the attention's c_proj
    attn_proj_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc: torch.Tensor
    fc_b: torch.Tensor
    mlp_proj: torch.Tensor  # the MLP's c_proj
    mlp_proj_b: torch.Tensor


def _conv1d(x, w, b):
    """HF ``Conv1D``: ``x @ w + b`` with ``w`` stored ``[in, out]``."""
    shape = x.shape[:-1] + (w.shape[1],)
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(shape)


def _layer_norm(x, w, b, eps):
    """LayerNorm returning ``(out, mean, rstd)``; statistics in fp32."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
    return F.layer_norm(x, x.shape[-1:], w, b, eps), mean, rstd


def _attention(q, k, v, mask, spec: GPT2BlockSpec):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=spec.scaling)


def _qkv(x, spec: GPT2BlockSpec, w: GPT2Weights):
    """``ln_1`` and the fused projection: ``(mean1, rstd1, q, k, v)`` with q/k/v as ``[B, H, S, hd]``."""
    B, S, D = x.shape
    a1, mean1, rstd1 = _layer_norm(x, w.ln1_w, w.ln1_b, spec.eps1)
    q, k, v = (t.view(B, S, spec.num_heads, spec.head_dim).transpose(1, 2)
               for t in _conv1d(a1, w.attn, w.attn_b).split(D, dim=2))
    return mean1, rstd1, q, k, v


def _mlp_input(x, o, spec: GPT2BlockSpec, w: GPT2Weights):
    """``h = x + c_proj(o)``, ``ln_2``'s statistics and ``f = c_fc(ln_2(h))``: ``(h, mean2, rstd2, f)``."""
    h = x + _conv1d(o, w.attn_proj, w.attn_proj_b)
    a2, mean2, rstd2 = _layer_norm(h, w.ln2_w, w.ln2_b, spec.eps2)
    return h, mean2, rstd2, _conv1d(a2, w.fc, w.fc_b)


def _post_attention(x, o, spec: GPT2BlockSpec, w: GPT2Weights):
    """From the attention output on: ``(y, h, mean2, rstd2, f)``."""
    h, mean2, rstd2, f = _mlp_input(x, o, spec, w)
    return h + _conv1d(F.gelu(f, approximate="tanh"), w.mlp_proj, w.mlp_proj_b), h, mean2, rstd2, f


def _block_forward(x, mask, spec: GPT2BlockSpec, w: GPT2Weights, keep_attention: bool = False):
    """The HF block's forward: ``(y, saved, attention_grad)`` as :func:`cggr.compact.decoder._block_forward`
    (the stages around the attention compiled on CUDA)."""
    B, S, D = x.shape
    K = functools.partial(kernel, on_cuda=x.is_cuda)
    mean1, rstd1, q, k, v = K(_qkv)(x, spec, w)
    out, attention_grad = attention_in_forward(functools.partial(_attention, mask=mask, spec=spec), q, k, v,
                                               keep_attention)
    o = out.transpose(1, 2).reshape(B, S, D)
    y, h, mean2, rstd2, f = K(_post_attention)(x, o, spec, w)
    return y, (mean1, rstd1, q, k, v, o, h, mean2, rstd2, f), attention_grad


_INPUTS = 4  # the Functions' arguments between x and the weights: mask, routing, block_index, spec


def _zero_grads(x, w: GPT2Weights):
    return (torch.zeros_like(x), *[None] * _INPUTS, *[torch.zeros_like(t) for t in w])


def _backward_on_active_rows(dy, idx, mlp_src, attention_grad, x, mean1, rstd1, spec: GPT2BlockSpec,
                             w: GPT2Weights, skip: bool, weight=None):
    """The block backward on its active rows; shared by the saved and the checkpointed variants. ``skip``: the
    inactive rows' input gradient is their output gradient (skip semantics), else zero. ``weight`` ``[N]`` float32:
    the rows' weights when the routing reweights (:meth:`cggr.routing.Routing.kept_weight`), else None.

    ``mlp_src = (f, h, mean2, rstd2, o, rows)``: where the values after the attention are read (rows ``rows``);
    ``attention_grad(do)``: gradients of the attention's q, k, v for an output gradient ``do`` ``[B, H, S, hd]``.
    """
    B, S, D = x.shape
    N = B * S
    K = functools.partial(kernel, on_cuda=x.is_cuda, rows="idx")  # the row count: dynamic
    dh, do, mlp_grads = K(mlp_backward_rows)(dy.reshape(N, D), idx, *mlp_src, w, weight)
    dq, dk, dv = attention_grad(do.view(B, S, spec.num_heads, spec.head_dim).transpose(1, 2))
    dx, qkv_grads = K(qkv_backward_rows)(
        token_rows(dq), token_rows(dk), token_rows(dv), x.view(N, D), mean1.view(N, 1), rstd1.view(N, 1), w, idx,
        dh, dy.reshape(N, D) if skip else None)
    return (dx.view(B, S, D), *[None] * _INPUTS, *stage_grads(mlp_grads, qkv_grads, w))


class GPT2BlockRouted(torch.autograd.Function):
    """``y = block(x)`` with a backward restricted to the rows active in ``block_index``."""

    @staticmethod
    def forward(ctx, x, mask, routing: Routing, block_index: int, spec: GPT2BlockSpec, *weights):
        w = GPT2Weights(*weights)
        y, saved, ctx.attention_grad = _block_forward(x, mask, spec, w, keep_attention_for(ctx))
        ctx.save_for_backward(x, *saved, mask, *w)
        ctx.routing, ctx.block_index, ctx.spec = routing, block_index, spec
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        x, mean1, rstd1, q, k, v, o, h, mean2, rstd2, f, mask, *weights = ctx.saved_tensors
        w = GPT2Weights(*weights)
        r: Routing = ctx.routing
        B, S, D = x.shape
        N = B * S
        attention_grad = take_attention_grad(ctx, functools.partial(_attention, mask=mask, spec=ctx.spec), q, k, v)
        kept, idx = kept_rows(r, ctx.block_index, dy)
        if not kept:
            return with_skip(_zero_grads(x, w), dy, r, ctx.block_index)
        mlp_src = (f.view(N, -1), h.view(N, D), mean2.view(N, 1), rstd2.view(N, 1), o.view(N, D), idx)
        return _backward_on_active_rows(dy, idx, mlp_src, attention_grad, x, mean1, rstd1, ctx.spec, w, r.skip,
                                        r.kept_weight(ctx.block_index))


class GPT2BlockRoutedCheckpointed(torch.autograd.Function):
    """Routed activation checkpointing: saves only the block input, recomputes in backward what is needed.

    The recompute runs ``ln_1``, the q/k/v projection and the attention for every row (active queries attend
    to every key) but the output projection, ``ln_2`` and ``c_fc`` for the active rows only; the attention's
    recomputed forward also serves its backward.
    """

    @staticmethod
    def forward(ctx, x, mask, routing: Routing, block_index: int, spec: GPT2BlockSpec, *weights):
        w = GPT2Weights(*weights)
        y, _, _ = _block_forward(x, mask, spec, w)  # activations dropped: recomputed in backward
        ctx.save_for_backward(x, mask, *w)
        ctx.routing, ctx.block_index, ctx.spec = routing, block_index, spec
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        x, mask, *weights = ctx.saved_tensors
        w = GPT2Weights(*weights)
        r: Routing = ctx.routing
        spec: GPT2BlockSpec = ctx.spec
        B, S, D = x.shape
        N = B * S
        kept, idx = kept_rows(r, ctx.block_index, dy)
        if not kept:
            return with_skip(_zero_grads(x, w), dy, r, ctx.block_index)
        mean1, rstd1, q, k, v = kernel(_qkv, x.is_cuda)(x, spec, w)
        out, attention_grad = attention_with_grad(functools.partial(_attention, mask=mask, spec=spec), q, k, v)
        o_a = rows_of(token_rows(out.detach()), idx)
        h_a, mean2_a, rstd2_a, f_a = _mlp_input(rows_of(x.view(N, D), idx), o_a, spec, w)
        local = None if idx is None else torch.arange(idx.numel(), device=idx.device)
        mlp_src = (f_a, h_a, mean2_a, rstd2_a, o_a, local)

        return _backward_on_active_rows(dy, idx, mlp_src, attention_grad, x, mean1, rstd1, spec, w, r.skip,
                                        r.kept_weight(ctx.block_index))


def mlp_backward_rows(dy, idx, f, h, mean2, rstd2, o, rows, w: GPT2Weights, weight=None):
    """First half of the block backward, on rows ``idx``: the MLP, ``ln_2`` and the attention's output projection.

    ``dy`` ``[N, D]``: the block's output gradient; ``f, h, mean2, rstd2, o``: the values after the attention,
    read at rows ``rows`` (``idx`` when saved for all rows; ``0..n-1`` when recomputed for the active rows;
    both None when every row is active); ``weight`` ``[N]`` or None: the rows' weights of a reweighting routing
    (:func:`weighted_rows`: the branches see ``w dy``, the residual carries all of ``dy``).
    Returns ``dh`` (active rows), ``do`` ``[N, D]`` (zero on inactive rows) and the gradients of ``ln_2``,
    ``c_fc``, the MLP's ``c_proj`` and the attention's ``c_proj`` (a :class:`GPT2Weights`, None elsewhere). One
    compiled graph on CUDA.
    """
    N = dy.shape[0]
    # ---- MLP: y = h + c_proj(gelu(c_fc(ln_2(h))))
    dy_a, rest = weighted_rows(rows_of(dy, idx).to(h.dtype), weight, idx)
    dact = dy_a @ w.mlp_proj.t()
    act_a, df = gelu_tanh_rows(dact, f, rows)
    dw_out, db_out = act_a.t() @ dy_a, dy_a.sum(0)
    a2_a = layer_norm_rows(h, mean2, rstd2, w.ln2_w, w.ln2_b, rows)
    dw_fc, db_fc = a2_a.t() @ df, df.sum(0)
    da2 = df @ w.fc.t()
    dh, dln2_w, dln2_b = layer_norm_backward_add(da2, dy_a, h, mean2, rstd2, w.ln2_w, rows)
    # ---- attention output projection: h = x + c_proj(o)
    o_a = rows_of(o, rows)
    dw_proj, db_proj = o_a.t() @ dh, dh.sum(0)
    do_a = dh @ w.attn_proj.t()
    do = scatter_rows(do_a, idx, N)
    grads = GPT2Weights(None, None, None, None, dw_proj, db_proj, dln2_w, dln2_b, dw_fc, db_fc, dw_out, db_out)
    return plus_rest(dh, rest), do, grads


def qkv_backward_rows(dq, dk, dv, x, mean1, rstd1, w: GPT2Weights, idx, dh, dx_base):
    """Second half, on rows ``idx``: the fused q/k/v projection and ``ln_1`` (inactive keys and values are
    constants: only active rows of ``dq, dk, dv``, token rows ``[N, D]``, are read). Returns ``dx`` ``[N, D]``
    (the one scatter; inactive rows from ``dx_base``, zeros when None) and the gradients of ``ln_1`` and
    ``c_attn`` (a :class:`GPT2Weights`, None elsewhere)."""
    N = x.shape[0]
    dqkv = torch.cat([rows_of(t, idx) for t in (dq, dk, dv)], dim=1)  # [n, 3D]
    a1_a = layer_norm_rows(x, mean1, rstd1, w.ln1_w, w.ln1_b, idx)
    dw_attn, db_attn = a1_a.t() @ dqkv, dqkv.sum(0)
    da1 = dqkv @ w.attn.t()
    dx_a, dln1_w, dln1_b = layer_norm_backward_add(da1, dh, x, mean1, rstd1, w.ln1_w, idx)
    grads = GPT2Weights(dln1_w, dln1_b, dw_attn, db_attn, *[None] * 8)
    return scatter_rows(dx_a, idx, N, dx_base), grads


def gpt2_block_spec(block) -> GPT2BlockSpec | str:
    """The block's shape if it is a GPT-2 block this path handles, else the first difference found, in words."""
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    ln1, ln2 = getattr(block, "ln_1", None), getattr(block, "ln_2", None)
    if attn is None or mlp is None or not isinstance(ln1, torch.nn.LayerNorm) or not isinstance(ln2, torch.nn.LayerNorm):
        return "no attn and mlp modules with LayerNorms ln_1, ln_2"
    if hasattr(block, "crossattention") or getattr(attn, "is_cross_attention", False):
        return "cross-attention"
    convs = [getattr(attn, "c_attn", None), getattr(attn, "c_proj", None), getattr(mlp, "c_fc", None),
             getattr(mlp, "c_proj", None)]
    if not all(type(c).__name__ == "Conv1D" and getattr(c, "bias", None) is not None for c in convs):
        return "projections that are not HF's Conv1D with a bias"
    if getattr(attn, "reorder_and_upcast_attn", False) or ln1.weight is None or ln2.weight is None:
        return "reorder_and_upcast_attn, or LayerNorms without weights"
    activation = type(getattr(mlp, "act", None)).__name__
    if activation not in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh"):
        return f"the MLP's activation is {activation}, not the tanh GELU"
    heads, head_dim = getattr(attn, "num_heads", None), getattr(attn, "head_dim", None)
    if heads is None or head_dim is None:
        return "no num_heads or head_dim on the attention"
    return GPT2BlockSpec(hidden_size=ln1.weight.shape[0], num_heads=heads, head_dim=head_dim,
                         scaling=float(getattr(attn, "scaling", head_dim ** -0.5)), eps1=float(ln1.eps),
                         eps2=float(ln2.eps))


def gpt2_block_weights(block) -> GPT2Weights:
    a, m = block.attn, block.mlp
    return GPT2Weights(block.ln_1.weight, block.ln_1.bias, a.c_attn.weight, a.c_attn.bias, a.c_proj.weight,
                       a.c_proj.bias, block.ln_2.weight, block.ln_2.bias, m.c_fc.weight, m.c_fc.bias, m.c_proj.weight,
                       m.c_proj.bias)


def gpt2_inputs(block, kwargs: dict, dtype: torch.dtype):
    """``(mask,)`` of this call; None with dropout on in training (the forward would be random) or cross-attention."""
    if not dropout_off(block) or kwargs.get("encoder_hidden_states") is not None:
        return None
    return (kwargs.get("attention_mask"),)


def gpt2_check_inputs(spec: GPT2BlockSpec, g: torch.Generator, batch: int, seq: int, mask) -> dict:
    return dict(attention_mask=mask)


BACKWARD = CompactedBackward(name="gpt2", spec=gpt2_block_spec, weights=gpt2_block_weights, inputs=gpt2_inputs,
                             check_inputs=gpt2_check_inputs, saving=GPT2BlockRouted,
                             checkpointed=GPT2BlockRoutedCheckpointed)
