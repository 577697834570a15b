"""Compacted routed backward for Llama-family blocks (Llama, Mistral, Qwen2).

One autograd function per block. Its forward computes exactly what the HF
decoder layer computes (RMSNorm, q/k/v projections, rotary, causal SDPA with
GQA, output projection, residual, RMSNorm, SwiGLU MLP, residual) with the HF
module's own weights, and saves what the backward needs. Its backward works
on the block's *active rows only*: one gather of the output gradient, every
projection, norm, activation and rotary backward on ``[n_active, ...]``
tensors, and one scatter of the input gradient. Only the attention backward
stays dense over the sequence (keys and values of inactive tokens are
constants, but active queries attend to them): the fused attention's own
backward, kept from the forward, runs with the output gradient of inactive
queries zero. On CUDA the forward's stages around the attention and the
backward's two row-wise stages run compiled (``pointwise.kernel``).

The gradient is that of sparse mode (docs/design.md §1.8); tests compare it with
``cggr.reference_routing``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..routing import Routing
from .attention import attention_in_forward, attention_with_grad, refuse_double_backward, take_attention_grad
from .pointwise import (keep_attention_for, kernel, mlp_rows, qkv_rows, rms_backward_add, rows_of, scatter_rows,
                        token_rows, with_skip)


@dataclass(frozen=True)
class LlamaBlockSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    eps1: float
    eps2: float
    # Whether the block's rotary reads only the first half of cos/sin and repeats it, as Liger-Kernel's RoPE
    # kernel does (it assumes HF's tables, cat(freqs, freqs)). The attach-time check tries this only when the
    # block fails the plain reading (verify.py); with it the Function computes what such a block computes for
    # any cos/sin, HF's tables or not.
    rotary_first_half: bool = False


def llama_spec_variants(spec: LlamaBlockSpec) -> tuple[LlamaBlockSpec, ...]:
    """Other readings of a block of this shape, tried in turn when the block fails the check with ``spec``."""
    return () if spec.rotary_first_half else (replace(spec, rotary_first_half=True),)


def describe_llama_spec(spec: LlamaBlockSpec) -> str:
    """What ``spec`` reads differently from the plain Llama block, for the router's report."""
    if spec.rotary_first_half:
        return "its rotary reading the first half of cos/sin (as Liger-Kernel's RoPE does)"
    return ""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary_tables(cos: torch.Tensor, sin: torch.Tensor, spec: LlamaBlockSpec):
    """The cos/sin the block's rotary reads (``spec.rotary_first_half``: their first halves, twice)."""
    if not spec.rotary_first_half:
        return cos, sin
    half = spec.head_dim // 2
    return torch.cat((cos[..., :half],) * 2, dim=-1), torch.cat((sin[..., :half],) * 2, dim=-1)


def _rms_forward(x: torch.Tensor, w: torch.Tensor, eps: float):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * (xf * rstd).to(x.dtype), rstd


def _attention(q, k, v, mask, spec: LlamaBlockSpec):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=spec.scaling,
                                          enable_gqa=spec.num_heads != spec.num_kv_heads)


def _lin(x, w, b):
    return F.linear(x, w, b)


def _qkv(x, cos, sin, spec: LlamaBlockSpec, w_n1, wq, bq, wk, bk, wv, bv):
    """Input norm, projections and rotary: ``(rstd1, q, k, v)`` with q/k/v as ``[B, heads, S, hd]``."""
    B, S, _ = x.shape
    H, KV, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    r1, rstd1 = _rms_forward(x, w_n1, spec.eps1)
    # Rotary in token-major layout [B, S, heads, hd] (contiguous in and out), then the heads-first views the
    # attention takes: the fused attention keeps that storage order for its output and gradients.
    q = _lin(r1, wq, bq).view(B, S, H, hd)
    k = _lin(r1, wk, bk).view(B, S, KV, hd)
    v = _lin(r1, wv, bv).view(B, S, KV, hd)
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    return rstd1, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _mlp_input(x, o, w_n2, wo, bo, spec: LlamaBlockSpec):
    """``h = x + o_proj(o)``, the post-attention norm and its ``rstd``: ``(h, r2, rstd2)``."""
    h = x + _lin(o, wo, bo)
    r2, rstd2 = _rms_forward(h, w_n2, spec.eps2)
    return h, r2, rstd2


def _post_attention(x, o, spec: LlamaBlockSpec, w_n2, wo, bo, wg, bg, wu, bu, wd, bd):
    """From the attention output on: ``y`` and what the MLP's backward saves, ``(y, h, rstd2, g, u)``."""
    h, r2, rstd2 = _mlp_input(x, o, w_n2, wo, bo, spec)
    g = _lin(r2, wg, bg)
    u = _lin(r2, wu, bu)
    return h + _lin(F.silu(g) * u, wd, bd), h, rstd2, g, u


def _block_forward(x, cos, sin, mask, spec: LlamaBlockSpec, weights, keep_attention: bool = False):
    """The HF decoder layer's forward: ``(y, saved, attention_grad)``, with what a backward may save and, when
    ``keep_attention``, the attention's backward through this forward (:func:`attention_in_forward`).

    On CUDA the two stages around the attention run compiled (:func:`~cggr.compact.pointwise.kernel`): the
    norms, rotary, SwiGLU and residual adds fuse into few kernels around the matmuls, as in a compiled or
    Liger-patched dense layer; on the CPU (and in the attach-time check) they run eagerly.
    """
    (w_n1, wq, bq, wk, bk, wv, bv, wo, bo, w_n2, wg, bg, wu, bu, wd, bd) = weights
    B, S, _ = x.shape
    K = functools.partial(kernel, on_cuda=x.is_cuda)
    rstd1, q, k, v = K(_qkv)(x, cos, sin, spec, w_n1, wq, bq, wk, bk, wv, bv)
    out, attention_grad = attention_in_forward(functools.partial(_attention, mask=mask, spec=spec), q, k, v,
                                               keep_attention)
    o = out.transpose(1, 2).reshape(B, S, -1)
    y, h, rstd2, g, u = K(_post_attention)(x, o, spec, w_n2, wo, bo, wg, bg, wu, bu, wd, bd)
    return y, (rstd1, q, k, v, o, h, rstd2, g, u), attention_grad


def _zero_grads(x, weights):
    return (torch.zeros_like(x), None, None, None, None, None, None,
            *[None if w is None else torch.zeros_like(w) for w in weights])


def _bias_grad(grad, b):
    return None if b is None else grad.sum(0)


def mlp_backward_rows(dy, idx, g, u, h, rstd2, mlp_idx, o_a, w_n2, wo, bo, wg, bg, wu, bu, wd, bd):
    """First half of the block backward, on rows ``idx``: the MLP, the post-attention norm, the output projection.

    ``dy`` ``[N, D]``: the block's output gradient; ``g, u, h, rstd2``: the MLP's saved values, read at rows
    ``mlp_idx``; ``o_a``: the attention output of rows ``idx``; ``idx`` (and ``mlp_idx``) None: every row.
    Returns ``dh`` (gradient of the residual stream after attention, active rows), ``do`` ``[N, H*hd]`` (the
    attention output's gradient, zero on inactive rows) and the weight gradients
    ``(dw_n2, dwo, dbo, dwg, dbg, dwu, dbu, dwd, dbd)``.
    One compiled graph on CUDA: its matmuls and row-wise kernels are launched by Inductor's wrapper, far
    cheaper on the host than as separate eager ops.
    """
    N = dy.shape[0]
    # ---- MLP: y = h + down(silu(gate(r2)) * up(r2)), r2 = rmsnorm(h)
    dy_a = rows_of(dy, idx).to(h.dtype)  # the one gather of the output gradient
    dm = dy_a @ wd
    m_a, dg, du, r2_a = mlp_rows(dm, g, u, h, rstd2, w_n2, mlp_idx)
    dwd, dbd = dy_a.t() @ m_a, _bias_grad(dy_a, bd)
    dwg, dwu = dg.t() @ r2_a, du.t() @ r2_a
    dbg, dbu = _bias_grad(dg, bg), _bias_grad(du, bu)
    dr2 = torch.addmm(dg @ wg, du, wu)
    dh, dw_n2 = rms_backward_add(dr2, dy_a, h, rstd2, w_n2, mlp_idx)
    # ---- attention output projection: h = x + o_proj(o)
    dwo, dbo = dh.t() @ o_a, _bias_grad(dh, bo)
    do_a = dh @ wo
    do = scatter_rows(do_a, idx, N)
    return dh, do, dw_n2, dwo, dbo, dwg, dbg, dwu, dbu, dwd, dbd


def qkv_backward_rows(dq, dk, dv, cos, sin, x, rstd1, w_n1, idx, dh, dx_base, wq, bq, wk, bk, wv, bv):
    """Second half, on rows ``idx``: rotary, the q/k/v projections and the input norm, after the attention.

    ``dq, dk, dv`` ``[N, heads * hd]``: the attention's input gradients as token rows (inactive keys and values
    are constants here: only the active rows are read); ``cos, sin`` ``[B, S, hd]`` (expanded over the batch:
    flattened to rows by ``qkv_rows``, inside the compiled stage, rather than copied in every block; the Triton
    kernels read them as they are); ``x`` ``[N, D]``:
    the block input; ``dh``: from :func:`mlp_backward_rows`; ``dx_base``: the input gradient's inactive rows
    (the output gradient under skip semantics; None: zeros). Returns ``dx`` ``[N, D]`` (the one scatter) and
    ``(dw_n1, dwq, dbq, dwk, dbk, dwv, dbv)``.
    """
    N = x.shape[0]
    dq_a, dk_a, dv_a, r1_a = qkv_rows(dq, dk, dv, cos, sin, x, rstd1, w_n1, idx)
    dwq, dwk, dwv = dq_a.t() @ r1_a, dk_a.t() @ r1_a, dv_a.t() @ r1_a
    dbq, dbk, dbv = _bias_grad(dq_a, bq), _bias_grad(dk_a, bk), _bias_grad(dv_a, bv)
    dr1 = torch.addmm(torch.addmm(dq_a @ wq, dk_a, wk), dv_a, wv)
    dx_a, dw_n1 = rms_backward_add(dr1, dh, x, rstd1, w_n1, idx)
    return scatter_rows(dx_a, idx, N, dx_base), dw_n1, dwq, dbq, dwk, dbk, dwv, dbv


def _backward_on_active_rows(dy, idx, mlp_rows_src, o_a, attention_grad, x, rstd1, cos, sin,
                             spec: LlamaBlockSpec, weights, skip: bool):
    """The block backward on its active rows; shared by the saved and the checkpointed variants. ``skip``: the
    inactive rows' input gradient is their output gradient (skip semantics), else zero.

    ``mlp_rows_src = (g, u, h, rstd2, rows)``: where the MLP's saved values are read (rows ``rows`` of
    ``[*, ...]`` tensors); ``o_a``: attention output of the active rows; ``attention_grad(do)``: gradients of
    the attention's q, k, v for an output gradient ``do`` ``[B, H, S, hd]``.
    """
    (w_n1, wq, bq, wk, bk, wv, bv, wo, bo, w_n2, wg, bg, wu, bu, wd, bd) = weights
    B, S, D = x.shape
    N = B * S
    H, hd = spec.num_heads, spec.head_dim
    K = functools.partial(kernel, on_cuda=x.is_cuda, rows="idx")  # the row count: dynamic
    dh, do, dw_n2, dwo, dbo, dwg, dbg, dwu, dbu, dwd, dbd = K(mlp_backward_rows)(
        dy.reshape(N, D), idx, *mlp_rows_src, o_a, w_n2, wo, bo, wg, bg, wu, bu, wd, bd)
    # ---- attention: dense over the sequence; inactive queries' output gradient is zero
    dq, dk, dv = attention_grad(do.view(B, S, H, hd).transpose(1, 2))
    dx, dw_n1, dwq, dbq, dwk, dbk, dwv, dbv = K(qkv_backward_rows)(
        token_rows(dq), token_rows(dk), token_rows(dv), cos.expand(B, S, hd), sin.expand(B, S, hd), x.view(N, D),
        rstd1.view(N, 1), w_n1, idx, dh, dy.reshape(N, D) if skip else None, wq, bq, wk, bk, wv, bv)
    grads = (dw_n1, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo, dw_n2, dwg, dbg, dwu, dbu, dwd, dbd)
    grads = [None if gr is None else gr.to(w.dtype) for gr, w in zip(grads, weights)]
    return (dx.view(B, S, D), None, None, None, None, None, None, *grads)


class LlamaBlockRouted(torch.autograd.Function):
    """``y = block(x)`` with a backward restricted to the rows active in ``block_index``.

    Saves the activations the backward reads (fewer than the HF layer's autograd graph saves), and the
    attention's own backward from this forward (no recompute).
    """

    @staticmethod
    def forward(ctx, x, cos, sin, mask, routing: Routing, block_index: int, spec: LlamaBlockSpec, *weights):
        cos, sin = _rotary_tables(cos, sin, spec)
        y, saved, ctx.attention_grad = _block_forward(x, cos, sin, mask, spec, weights, keep_attention_for(ctx))
        ctx.save_for_backward(x, *saved, cos, sin, mask, *weights)
        ctx.routing, ctx.block_index, ctx.spec = routing, block_index, spec
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        x, rstd1, q, k, v, o, h, rstd2, g, u, cos, sin, mask, *weights = ctx.saved_tensors
        r: Routing = ctx.routing
        B, S, D = x.shape
        N = B * S
        attention_grad = take_attention_grad(ctx, functools.partial(_attention, mask=mask, spec=ctx.spec), q, k, v)
        if r.active_count(ctx.block_index) == 0:
            return with_skip(_zero_grads(x, weights), dy, r, ctx.block_index)
        idx = r.compact_indices(ctx.block_index)
        o_a = rows_of(o.view(N, -1), idx)
        mlp_src = (g.view(N, -1), u.view(N, -1), h.view(N, D), rstd2.view(N, 1), idx)
        return _backward_on_active_rows(dy, idx, mlp_src, o_a, attention_grad, x, rstd1, cos, sin, ctx.spec,
                                        weights, r.skip)


class LlamaBlockRoutedCheckpointed(torch.autograd.Function):
    """Routed activation checkpointing: saves only the block input, recomputes in backward what is needed.

    The recompute runs the input norm, q/k/v and the attention for every row (active queries attend to
    every key), but the output projection, the post-attention norm and the MLP for the active rows only;
    the attention's recomputed forward also serves its backward.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, mask, routing: Routing, block_index: int, spec: LlamaBlockSpec, *weights):
        cos, sin = _rotary_tables(cos, sin, spec)
        y, _, _ = _block_forward(x, cos, sin, mask, spec, weights)  # activations dropped: recomputed in backward
        ctx.save_for_backward(x, cos, sin, mask, *weights)
        ctx.routing, ctx.block_index, ctx.spec = routing, block_index, spec
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        x, cos, sin, mask, *weights = ctx.saved_tensors
        (w_n1, wq, bq, wk, bk, wv, bv, wo, bo, w_n2, wg, bg, wu, bu, wd, bd) = weights
        r: Routing = ctx.routing
        spec: LlamaBlockSpec = ctx.spec
        B, S, D = x.shape
        N = B * S
        if r.active_count(ctx.block_index) == 0:
            return with_skip(_zero_grads(x, weights), dy, r, ctx.block_index)
        idx = r.compact_indices(ctx.block_index)
        rstd1, q, k, v = kernel(_qkv, x.is_cuda)(x, cos, sin, spec, w_n1, wq, bq, wk, bk, wv, bv)
        out, attention_grad = attention_with_grad(functools.partial(_attention, mask=mask, spec=spec), q, k, v)
        o_a = rows_of(token_rows(out.detach()), idx)
        x_a = rows_of(x.view(N, D), idx)
        h_a, r2_a, rstd2_a = _mlp_input(x_a, o_a, w_n2, wo, bo, spec)
        g_a, u_a = _lin(r2_a, wg, bg), _lin(r2_a, wu, bu)
        local = None if idx is None else torch.arange(idx.numel(), device=idx.device)
        mlp_src = (g_a, u_a, h_a, rstd2_a, local)

        return _backward_on_active_rows(dy, idx, mlp_src, o_a, attention_grad, x, rstd1, cos, sin, spec,
                                        weights, r.skip)


def _linear_ok(m) -> bool:
    return isinstance(m, torch.nn.Linear)


def llama_block_spec(block) -> LlamaBlockSpec | None:
    """The block's shape if it is a Llama-family decoder layer this path handles, else None."""
    attn = getattr(block, "self_attn", None)
    mlp = getattr(block, "mlp", None)
    n1 = getattr(block, "input_layernorm", None)
    n2 = getattr(block, "post_attention_layernorm", None)
    if attn is None or mlp is None or n1 is None or n2 is None:
        return None
    if not all(_linear_ok(getattr(attn, p, None)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return None
    if not all(_linear_ok(getattr(mlp, p, None)) for p in ("gate_proj", "up_proj", "down_proj")):
        return None
    # Plain RMSNorm (w * x_hat), no q/k norms, SiLU gate, no dropout. Liger-Kernel's RMSNorm (offset 0, "llama"
    # casting) and SwiGLU MLP compute the same maths with fused kernels (the attach-time check runs them).
    for n in (n1, n2):
        if not type(n).__name__.endswith("RMSNorm") or type(n).__name__.startswith("Gemma"):
            return None
        if not hasattr(n, "variance_epsilon") or getattr(n, "weight", None) is None:
            return None
        if getattr(n, "offset", 0.0) != 0.0 or getattr(n, "casting_mode", "llama") != "llama":
            return None
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return None
    act = getattr(mlp, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")
    liger_swiglu = (act is None and type(mlp).__name__ == "LigerSwiGLUMLP"
                    and getattr(getattr(mlp, "config", None), "hidden_act", None) in ("silu", "swish"))
    if not (silu or liger_swiglu):
        return None
    if float(getattr(attn, "attention_dropout", 0.0) or 0.0) != 0.0:
        return None
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None:
        return None
    heads = attn.q_proj.out_features // head_dim
    kv = attn.k_proj.out_features // head_dim
    return LlamaBlockSpec(num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                          scaling=float(getattr(attn, "scaling", head_dim ** -0.5)),
                          eps1=float(n1.variance_epsilon), eps2=float(n2.variance_epsilon))


def llama_block_params(block):
    a, m = block.self_attn, block.mlp
    return (block.input_layernorm.weight, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias,
            a.v_proj.weight, a.v_proj.bias, a.o_proj.weight, a.o_proj.bias, block.post_attention_layernorm.weight,
            m.gate_proj.weight, m.gate_proj.bias, m.up_proj.weight, m.up_proj.bias, m.down_proj.weight,
            m.down_proj.bias)
