"""Compacted routed backward for Llama-family blocks (Llama, Mistral, Qwen2).

One autograd function per block. Its forward computes exactly what the HF
decoder layer computes (RMSNorm, q/k/v projections, rotary, causal SDPA with
GQA, output projection, residual, RMSNorm, SwiGLU MLP, residual) with the HF
module's own weights, and saves what the backward needs. Its backward works
on the block's *active rows only*: one gather of the output gradient, every
projection, norm, activation and rotary backward on ``[n_active, ...]``
tensors, and one scatter of the input gradient. Only the attention backward
stays dense over the sequence (keys and values of inactive tokens are
constants, but active queries attend to them): it is recomputed from the
saved q/k/v with the output gradient of inactive queries zero.

The gradient is that of DESIGN.md §1's sparse mode; tests compare it with
``cggr.reference_routing``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..routing import Routing


@dataclass(frozen=True)
class LlamaBlockSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    eps1: float
    eps2: float


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_half_t(x: torch.Tensor) -> torch.Tensor:
    """Transpose of :func:`_rotate_half` (for the rotary backward)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, -x1), dim=-1)


def _rms_forward(x: torch.Tensor, w: torch.Tensor, eps: float):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * (xf * rstd).to(x.dtype), rstd


def _rms_backward(dout: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, w: torch.Tensor):
    """Backward of ``w * (x * rstd).to(dtype)`` for rows ``x`` ``[n, D]``; returns (dx, dw) in fp32."""
    xhat = x.float() * rstd
    dw = (dout.float() * xhat.to(x.dtype).float()).sum(0)
    dxhat = dout.float() * w.float()
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx, dw


def _attention(q, k, v, mask, spec: LlamaBlockSpec):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=spec.scaling,
                                          enable_gqa=spec.num_heads != spec.num_kv_heads)


def _lin(x, w, b):
    return F.linear(x, w, b)


class LlamaBlockRouted(torch.autograd.Function):
    """``y = block(x)`` with a backward restricted to the rows active in ``block_index``."""

    @staticmethod
    def forward(ctx, x, cos, sin, mask, routing: Routing, block_index: int, spec: LlamaBlockSpec,
                w_n1, wq, bq, wk, bk, wv, bv, wo, bo, w_n2, wg, bg, wu, bu, wd, bd):
        B, S, D = x.shape
        H, KV, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        r1, rstd1 = _rms_forward(x, w_n1, spec.eps1)
        q = _lin(r1, wq, bq).view(B, S, H, hd).transpose(1, 2)
        k = _lin(r1, wk, bk).view(B, S, KV, hd).transpose(1, 2)
        v = _lin(r1, wv, bv).view(B, S, KV, hd).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        o = _attention(q, k, v, mask, spec).transpose(1, 2).reshape(B, S, H * hd)
        h = x + _lin(o, wo, bo)
        r2, rstd2 = _rms_forward(h, w_n2, spec.eps2)
        g = _lin(r2, wg, bg)
        u = _lin(r2, wu, bu)
        y = h + _lin(F.silu(g) * u, wd, bd)
        ctx.save_for_backward(x, rstd1, q, k, v, o, h, rstd2, g, u, cos, sin, mask,
                              w_n1, wq, bq, wk, bk, wv, bv, wo, bo, w_n2, wg, bg, wu, bu, wd, bd)
        ctx.routing, ctx.block_index, ctx.spec = routing, block_index, spec
        return y

    @staticmethod
    def backward(ctx, dy):
        (x, rstd1, q, k, v, o, h, rstd2, g, u, cos, sin, mask,
         w_n1, wq, bq, wk, bk, wv, bv, wo, bo, w_n2, wg, bg, wu, bu, wd, bd) = ctx.saved_tensors
        r: Routing = ctx.routing
        spec: LlamaBlockSpec = ctx.spec
        B, S, D = x.shape
        N = B * S
        H, KV, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        n = r.active_count(ctx.block_index)
        weights = (w_n1, wq, bq, wk, bk, wv, bv, wo, bo, w_n2, wg, bg, wu, bu, wd, bd)
        if n == 0:
            grads = [None if w is None else torch.zeros_like(w) for w in weights]
            return (torch.zeros_like(x), None, None, None, None, None, None, *grads)
        idx = None if n == N else r.active_rows(ctx.block_index)
        bi, si = (None, None) if idx is None else (torch.div(idx, S, rounding_mode="floor"), idx % S)

        def rows(t: torch.Tensor) -> torch.Tensor:
            """Active rows of a ``[B, S, ...]`` tensor as ``[n, ...]``."""
            if idx is None:
                return t.reshape(N, *t.shape[2:])
            return t[bi, si]

        def head_rows(t: torch.Tensor) -> torch.Tensor:
            """Active rows of a ``[B, heads, S, hd]`` tensor as ``[n, heads, hd]``."""
            if idx is None:
                return t.transpose(1, 2).reshape(N, t.shape[1], t.shape[3])
            return t[bi, :, si]

        dt = x.dtype
        dy_a = rows(dy).to(dt)  # [n, D]
        # ---- MLP: y = h + down(silu(g) * u)
        g_a, u_a = rows(g), rows(u)
        sig = torch.sigmoid(g_a.float())
        act = (g_a.float() * sig).to(dt)
        m_a = act * u_a
        dwd = dy_a.t() @ m_a
        dbd = dy_a.sum(0) if bd is not None else None
        dm = dy_a @ wd
        du = dm * act
        dg = (dm.float() * u_a.float() * sig * (1 + g_a.float() * (1 - sig))).to(dt)
        h_a, rstd2_a = rows(h), rows(rstd2)
        r2_a = w_n2 * (h_a.float() * rstd2_a).to(dt)
        dwg, dwu = dg.t() @ r2_a, du.t() @ r2_a
        dbg = dg.sum(0) if bg is not None else None
        dbu = du.sum(0) if bu is not None else None
        dr2 = dg @ wg + du @ wu
        dh_norm, dw_n2 = _rms_backward(dr2, h_a, rstd2_a, w_n2)
        dh = dy_a.float() + dh_norm  # fp32 residual accumulation
        dh_t = dh.to(dt)
        # ---- attention output projection: h = x + o_proj(o)
        o_a = rows(o)
        dwo = dh_t.t() @ o_a
        dbo = dh_t.sum(0) if bo is not None else None
        do_a = dh_t @ wo
        # ---- attention: dense over the sequence, inactive queries' output gradient is zero
        if idx is None:
            do = do_a.view(B, S, H, hd).transpose(1, 2)
        else:
            do = do_a.new_zeros(N, H * hd).index_copy_(0, idx, do_a).view(B, S, H, hd).transpose(1, 2)
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            out = _attention(qq, kk, vv, mask, spec)
            dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), do)
        # ---- rotary backward, on active rows only (inactive keys and values are constants)
        c_a = rows(cos.expand(B, S, hd)).unsqueeze(1)  # [n, 1, hd]
        s_a = rows(sin.expand(B, S, hd)).unsqueeze(1)

        def unrope(t: torch.Tensor) -> torch.Tensor:
            t = head_rows(t)
            return (t * c_a + _rotate_half_t(t * s_a)).reshape(t.shape[0], -1)

        dq_a, dk_a = unrope(dq), unrope(dk)
        dv_a = head_rows(dv).reshape(-1, KV * hd)
        x_a, rstd1_a = rows(x), rows(rstd1)
        r1_a = w_n1 * (x_a.float() * rstd1_a).to(dt)
        dwq, dwk, dwv = dq_a.t() @ r1_a, dk_a.t() @ r1_a, dv_a.t() @ r1_a
        dbq = dq_a.sum(0) if bq is not None else None
        dbk = dk_a.sum(0) if bk is not None else None
        dbv = dv_a.sum(0) if bv is not None else None
        dr1 = dq_a @ wq + dk_a @ wk + dv_a @ wv
        dx_norm, dw_n1 = _rms_backward(dr1, x_a, rstd1_a, w_n1)
        dx_a = (dh + dx_norm).to(dt)
        if idx is None:
            dx = dx_a.view(B, S, D)
        else:
            dx = dx_a.new_zeros(N, D).index_copy_(0, idx, dx_a).view(B, S, D)
        grads = (dw_n1, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo, dw_n2, dwg, dbg, dwu, dbu, dwd, dbd)
        grads = [None if gr is None else gr.to(w.dtype) for gr, w in zip(grads, weights)]
        return (dx, None, None, None, None, None, None, *grads)


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
    # Plain RMSNorm (w * x_hat), no q/k norms, SiLU gate, no dropout.
    for n in (n1, n2):
        if not type(n).__name__.endswith("RMSNorm") or type(n).__name__.startswith("Gemma"):
            return None
        if not hasattr(n, "variance_epsilon") or getattr(n, "weight", None) is None:
            return None
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return None
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, torch.nn.SiLU) and type(act).__name__ not in ("SiLUActivation", "SiLU"):
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
