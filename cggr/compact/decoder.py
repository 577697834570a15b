"""Compacted routed backward for rotary decoder layers: Llama and its relatives (Qwen 3, Gemma 3, OLMo 2, Phi-3).

One autograd function per block. Its forward computes exactly what the HF
decoder layer computes with the HF module's own weights, and saves what the
backward needs. Its backward works on the block's *active rows only*: one
gather of the output gradient, every projection, norm, activation and rotary
backward on ``[n_active, ...]`` tensors, and one scatter of the input
gradient. Only the attention backward stays dense over the sequence (keys and
values of inactive tokens are constants, but active queries attend to them):
the fused attention's own backward, kept from the forward, runs with the output
gradient of inactive queries zero. On CUDA the forward's stages around the
attention and the backward's two row-wise stages run compiled
(``pointwise.kernel``).

The families differ in which pieces their layer has, and a :class:`DecoderLayout` (one per family module) says
which; the maths of each piece is written once, here:

* an RMSNorm of the input (all but OLMo 2), of one :class:`~cggr.compact.pointwise.RMSNormKind` for the whole
  layer (Llama's ``w * x_hat.to(dtype)``, OLMo 2's ``(w * x_hat).to(dtype)``, Gemma's ``(1 + w)``);
* q/k/v as three projections, or one fused ``qkv_proj`` (Phi-3);
* an RMSNorm of q and k per head (Qwen 3, Gemma 3) or over the projection's width (OLMo 2), before the rotary;
* rotary, causal SDPA with grouped-query heads and the layer's own 4-D mask (a sliding window comes in the mask
  HF builds for the layer's type), output projection;
* a norm of the attention branch before its residual add (Gemma 3's sandwich, OLMo 2's post-norm);
* a norm before the MLP (all but OLMo 2); a gated MLP, ``down(act(gate(r)) * up(r))`` with a SiLU (SwiGLU) or
  tanh-GELU (GeGLU) gate, gate/up separate or fused into one ``gate_up_proj`` (Phi-3);
* a norm of the MLP branch before its residual add (Gemma 3, OLMo 2).

Weights travel as one named tuple, :class:`DecoderWeights` (None for a piece the layer does not have).

The gradient is that of sparse mode (docs/design.md §1.8): a block's weight gradients come from its active rows, with
one exception the reference implies: a key norm's weight (Qwen 3, Gemma 3, OLMo 2) sits after the key
projection, so every key an active query attends to contributes to it, active or not. Tests compare the
Functions with ``cggr.reference_routing``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from ..routing import Routing
from .attention import attention_in_forward, attention_with_grad, refuse_double_backward, take_attention_grad
from .backward import CompactedBackward, dropout_off
from .pointwise import (LLAMA_NORM, RMSNormKind, glu_rows, keep_attention_for, kept_rows, kernel, plus_rest,
                        rms_backward_add, rms_input_grad, rms_norm, rms_rows, rms_weight_grad, rope_rows, rows_of,
                        scatter_rows, stage_grads, token_rows, weighted_rows, with_skip)


# ------------------------------------------------------------------------------------------- what a layer has
@dataclass(frozen=True)
class DecoderLayout:
    """Which pieces a family's decoder layer has, by the attribute names HF gives them, and their maths.

    The attention is ``block.self_attn`` (``q_proj``/``k_proj``/``v_proj`` or ``qkv_proj``, ``o_proj``,
    ``q_norm``/``k_norm``), the MLP ``block.mlp`` (``gate_proj``/``up_proj`` or ``gate_up_proj``,
    ``down_proj``, its activation ``act_fn`` or ``activation_fn``).
    """

    norm: RMSNormKind = LLAMA_NORM
    input_norm: str | None = "input_layernorm"
    """The block's norm of its input, before the attention (None: the attention reads the input)."""
    mlp_norm: str | None = "post_attention_layernorm"
    """The norm before the MLP (Llama calls it ``post_attention_layernorm``, Gemma ``pre_feedforward_layernorm``)."""
    attention_out_norm: str | None = None
    """A norm of the attention branch before its residual add (Gemma 3, OLMo 2: ``post_attention_layernorm``)."""
    mlp_out_norm: str | None = None
    """A norm of the MLP branch before its residual add (``post_feedforward_layernorm``)."""
    qk_norm: Literal["head", "width"] | None = None
    """RMSNorm of q and k before the rotary: over each head (Qwen 3, Gemma 3) or the projection's width
    (OLMo 2)."""
    fused_qkv: bool = False
    fused_gate_up: bool = False
    activation: Literal["silu", "gelu_tanh"] = "silu"


@dataclass(frozen=True)
class DecoderSpec:
    """One block's shape and maths, as the Functions read it (the attach-time check proves it)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    input_norm_eps: float | None
    mlp_norm_eps: float | None
    attention_out_norm_eps: float | None = None
    mlp_out_norm_eps: float | None = None
    q_norm_eps: float | None = None
    k_norm_eps: float | None = None
    qk_norm: Literal["head", "width"] | None = None
    norm: RMSNormKind = LLAMA_NORM
    activation: Literal["silu", "gelu_tanh"] = "silu"
    # Whether the block's rotary reads only the first half of cos/sin and repeats it, as Liger-Kernel's RoPE
    # kernel does (it assumes HF's tables, cat(freqs, freqs)). The attach-time check tries this only when the
    # block fails the plain reading (verify.py); with it the Function computes what such a block computes for
    # any cos/sin, HF's tables or not.
    rotary_first_half: bool = False
    # The q/k norms' kind where it differs from ``norm``: Liger-Kernel's patch of an OLMo 2 instance replaces the
    # block's norms and leaves HF's q/k norms (they round elsewhere in bf16). None: ``norm``.
    qk_norm_kind: RMSNormKind | None = None


def _qk_kind(spec: DecoderSpec) -> RMSNormKind:
    return spec.norm if spec.qk_norm_kind is None else spec.qk_norm_kind


class DecoderWeights(NamedTuple):
    """A decoder layer's parameters (or their gradients), None for a piece the layer does not have."""

    input_norm: torch.Tensor | None = None
    q: torch.Tensor | None = None
    q_bias: torch.Tensor | None = None
    k: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    qkv: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    o: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    attention_out_norm: torch.Tensor | None = None
    mlp_norm: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    up: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    mlp_out_norm: torch.Tensor | None = None


class _Saved(NamedTuple):
    """What a saving block keeps for its backward (None: a piece the layer does not have)."""

    x: torch.Tensor
    rstd1: torch.Tensor | None
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    h: torch.Tensor
    rstd2: torch.Tensor | None
    g: torch.Tensor
    u: torch.Tensor
    t: torch.Tensor | None  # the attention branch before its out norm
    rstd_ao: torch.Tensor | None
    f: torch.Tensor | None  # the MLP branch before its out norm
    rstd_mo: torch.Tensor | None
    q_raw: torch.Tensor | None  # q and k before their norms
    k_raw: torch.Tensor | None
    rstd_q: torch.Tensor | None
    rstd_k: torch.Tensor | None


class MlpRows(NamedTuple):
    """Where the first backward stage reads the values after the attention: rows ``rows`` of these ``[*, ...]``
    tensors (the saved ones at the active rows; recomputed ones at ``0..n-1``; None: every row, in order)."""

    g: torch.Tensor
    u: torch.Tensor
    h: torch.Tensor
    rstd2: torch.Tensor | None
    t: torch.Tensor | None
    rstd_ao: torch.Tensor | None
    f: torch.Tensor | None
    rstd_mo: torch.Tensor | None
    rows: torch.Tensor | None


class QKNormRows(NamedTuple):
    """q and k before their norms, ``[N, heads * hd]``, and the norms' statistics, ``[N, heads]`` per head or
    ``[N, 1]`` over the width (all None without q/k norms)."""

    q_raw: torch.Tensor | None = None
    k_raw: torch.Tensor | None = None
    rstd_q: torch.Tensor | None = None
    rstd_k: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------- the forward
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary_tables(cos: torch.Tensor, sin: torch.Tensor, spec: DecoderSpec):
    """The cos/sin the block's rotary reads (``spec.rotary_first_half``: their first halves, twice)."""
    if not spec.rotary_first_half:
        return cos, sin
    half = spec.head_dim // 2
    return torch.cat((cos[..., :half],) * 2, dim=-1), torch.cat((sin[..., :half],) * 2, dim=-1)


def _attention(q, k, v, mask, spec: DecoderSpec):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=spec.scaling,
                                          enable_gqa=spec.num_heads != spec.num_kv_heads)


def _lin(x, w, b):
    return F.linear(x, w, b)


def _norm_or_none(x, w, eps: float | None, spec: DecoderSpec):
    """``(norm(x), rstd)``, or ``(x, None)`` where the layer has no such norm (``eps`` None)."""
    return (x, None) if eps is None else rms_norm(x, w, eps, spec.norm)


def _project_qkv(a, w: DecoderWeights, spec: DecoderSpec):
    """q, k, v ``[..., heads * hd]`` from the attention input: three projections, or views of the fused one."""
    if w.qkv is None:
        return _lin(a, w.q, w.q_bias), _lin(a, w.k, w.k_bias), _lin(a, w.v, w.v_bias)
    hd = spec.head_dim
    return _lin(a, w.qkv, None).split([spec.num_heads * hd, spec.num_kv_heads * hd, spec.num_kv_heads * hd], -1)


def _qkv(x, cos, sin, spec: DecoderSpec, w: DecoderWeights):
    """Input norm, projections, q/k norms and rotary: ``(rstd1, q, k, v, q_raw, k_raw, rstd_q, rstd_k)`` with
    q/k/v as ``[B, heads, S, hd]`` (the last four None without q/k norms)."""
    B, S, _ = x.shape
    H, KV, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    a, rstd1 = _norm_or_none(x, w.input_norm, spec.input_norm_eps, spec)
    q_raw, k_raw, v = _project_qkv(a, w, spec)
    q, k, rstd_q, rstd_k = q_raw, k_raw, None, None
    if spec.qk_norm == "width":
        q, rstd_q = rms_norm(q, w.q_norm, spec.q_norm_eps, _qk_kind(spec))
        k, rstd_k = rms_norm(k, w.k_norm, spec.k_norm_eps, _qk_kind(spec))
    # Rotary in token-major layout [B, S, heads, hd] (contiguous in and out), then the heads-first views the
    # attention takes: the fused attention keeps that storage order for its output and gradients.
    q, k, v = q.view(B, S, H, hd), k.view(B, S, KV, hd), v.view(B, S, KV, hd)
    if spec.qk_norm == "head":
        q, rstd_q = rms_norm(q, w.q_norm, spec.q_norm_eps, _qk_kind(spec))
        k, rstd_k = rms_norm(k, w.k_norm, spec.k_norm_eps, _qk_kind(spec))
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    if spec.qk_norm is None:
        q_raw = k_raw = None
    return rstd1, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), q_raw, k_raw, rstd_q, rstd_k


def _gate_up(r, w: DecoderWeights):
    if w.gate_up is None:
        return _lin(r, w.gate, w.gate_bias), _lin(r, w.up, w.up_bias)
    return _lin(r, w.gate_up, None).chunk(2, dim=-1)


def _act(g, spec: DecoderSpec):
    return F.silu(g) if spec.activation == "silu" else F.gelu(g, approximate="tanh")


def _post_attention(x, o, spec: DecoderSpec, w: DecoderWeights, need_output: bool = True):
    """From the attention output on: ``(y, h, rstd2, g, u, t, rstd_ao, f, rstd_mo)``, what the MLP's backward
    reads (``t``/``f``: the branches before their out norms, None without them). ``need_output`` False: ``y``
    is None, and the MLP's down projection runs only where its out norm's backward needs ``f``."""
    t = _lin(o, w.o, w.o_bias)
    p, rstd_ao = _norm_or_none(t, w.attention_out_norm, spec.attention_out_norm_eps, spec)
    h = x + p
    r2, rstd2 = _norm_or_none(h, w.mlp_norm, spec.mlp_norm_eps, spec)
    g, u = _gate_up(r2, w)
    y = f = rstd_mo = None
    if need_output or spec.mlp_out_norm_eps is not None:
        f = _lin(_act(g, spec) * u, w.down, w.down_bias)
        p, rstd_mo = _norm_or_none(f, w.mlp_out_norm, spec.mlp_out_norm_eps, spec)
        y = h + p if need_output else None
    t_kept = None if rstd_ao is None else t
    f_kept = None if rstd_mo is None else f
    return y, h, rstd2, g, u, t_kept, rstd_ao, f_kept, rstd_mo


def _block_forward(x, cos, sin, mask, spec: DecoderSpec, w: DecoderWeights, keep_attention: bool = False):
    """The HF decoder layer's forward: ``(y, saved, attention_grad)``, with what a backward may save and, when
    ``keep_attention``, the attention's backward through this forward (:func:`attention_in_forward`).

    On CUDA the two stages around the attention run compiled (:func:`~cggr.compact.pointwise.kernel`): the
    norms, rotary, gated activation and residual adds fuse into few kernels around the matmuls, as in a compiled
    or Liger-patched dense layer; on the CPU (and in the attach-time check) they run eagerly.
    """
    B, S, _ = x.shape
    K = functools.partial(kernel, on_cuda=x.is_cuda)
    rstd1, q, k, v, q_raw, k_raw, rstd_q, rstd_k = K(_qkv)(x, cos, sin, spec, w)
    out, attention_grad = attention_in_forward(functools.partial(_attention, mask=mask, spec=spec), q, k, v,
                                               keep_attention)
    o = out.transpose(1, 2).reshape(B, S, -1)
    y, h, rstd2, g, u, t, rstd_ao, f, rstd_mo = K(_post_attention)(x, o, spec, w)
    saved = _Saved(x, rstd1, q, k, v, o, h, rstd2, g, u, t, rstd_ao, f, rstd_mo, q_raw, k_raw, rstd_q, rstd_k)
    return y, saved, attention_grad


# ------------------------------------------------------------------------------------------- the backward
def _bias_grad(grad, b):
    return None if b is None else grad.sum(0)


def _norm_backward_or_none(dout, residual, x, rstd, w, rows, spec: DecoderSpec):
    """:func:`rms_backward_add` where the layer has the norm (``rstd`` not None), else ``(residual + dout,
    None)`` (``dout`` alone without a residual)."""
    if rstd is None:
        return (dout if residual is None else residual + dout), None
    return rms_backward_add(dout, residual, x, rstd, w, rows, spec.norm)


def mlp_backward_rows(dy, idx, mlp: MlpRows, o_a, w: DecoderWeights, spec: DecoderSpec, weight=None):
    """First half of the block backward, on rows ``idx``: the MLP, its norms and the attention's output branch.

    ``dy`` ``[N, D]``: the block's output gradient; ``mlp``: the values after the attention (read at
    ``mlp.rows``); ``o_a``: the attention output of rows ``idx``; ``idx`` (and ``mlp.rows``) None: every row;
    ``weight`` ``[N]`` or None: the rows' weights of a reweighting routing (:func:`weighted_rows`: the branches
    see ``w dy``, the residual carries all of ``dy``).
    Returns ``dh`` (gradient of the residual stream after attention, active rows), ``do`` ``[N, H*hd]`` (the
    attention output's gradient, zero on inactive rows) and the gradients of the weights read here (a
    :class:`DecoderWeights`, None elsewhere).
    One compiled graph on CUDA: its matmuls and row-wise kernels are launched by Inductor's wrapper, far
    cheaper on the host than as separate eager ops.
    """
    N, rows = dy.shape[0], mlp.rows
    # ---- MLP branch: y = h + out_norm(down(act(gate(r2)) * up(r2))), r2 = mlp_norm(h)
    dy_a, rest = weighted_rows(rows_of(dy, idx).to(mlp.h.dtype), weight, idx)  # the one gather of dy
    df, d_mlp_out_norm = _norm_backward_or_none(dy_a, None, mlp.f, mlp.rstd_mo, w.mlp_out_norm, rows, spec)
    dm = df @ w.down
    m_a, dg, du = glu_rows(dm, mlp.g, mlp.u, rows, spec.activation)
    d_down, d_down_bias = df.t() @ m_a, _bias_grad(df, w.down_bias)
    r2_a = (rows_of(mlp.h, rows) if mlp.rstd2 is None
            else rms_rows(mlp.h, mlp.rstd2, w.mlp_norm, rows, spec.norm))
    if w.gate_up is None:
        d_gate, d_up = dg.t() @ r2_a, du.t() @ r2_a
        d_gate_up = None
        dr2 = torch.addmm(dg @ w.gate, du, w.up)
    else:
        dgu = torch.cat((dg, du), dim=1)
        d_gate = d_up = None
        d_gate_up = dgu.t() @ r2_a
        dr2 = dgu @ w.gate_up
    dh, d_mlp_norm = _norm_backward_or_none(dr2, dy_a, mlp.h, mlp.rstd2, w.mlp_norm, rows, spec)
    # ---- attention branch: h = x + out_norm(o_proj(o))
    dt, d_attention_out_norm = _norm_backward_or_none(dh, None, mlp.t, mlp.rstd_ao, w.attention_out_norm, rows,
                                                      spec)
    d_o, d_o_bias = dt.t() @ o_a, _bias_grad(dt, w.o_bias)
    do = scatter_rows(dt @ w.o, idx, N)
    grads = DecoderWeights(o=d_o, o_bias=d_o_bias, attention_out_norm=d_attention_out_norm, mlp_norm=d_mlp_norm,
                           gate=d_gate, gate_bias=_bias_grad(dg, w.gate_bias), up=d_up,
                           up_bias=_bias_grad(du, w.up_bias), gate_up=d_gate_up, down=d_down, down_bias=d_down_bias,
                           mlp_out_norm=d_mlp_out_norm)
    return plus_rest(dh, rest), do, grads


def _qk_norm_backward(d_a, raw, rstd, w, idx, spec: DecoderSpec, d_every=None):
    """The backward of q's (or k's) norm on rows ``idx``: ``(d_raw_a, dw)``.

    ``d_a`` ``[n, C]``: the gradient after the norm (before the rotary) on rows ``idx``; ``raw`` ``[N, C]``: the
    projection before the norm; ``rstd`` ``[N, heads]`` (per head) or ``[N, 1]`` (over the width). The weight's
    gradient sums over rows ``idx``, or over every row of ``d_every`` where given (the keys: inactive keys are
    constants before the norm, but the norm's weight acts on them after it).
    """
    C, width = raw.shape[1], raw.shape[1] // rstd.shape[1]

    def per_norm(t):  # one row per norm application: [rows * heads, hd] per head, the rows as they are over the width
        return t.reshape(-1, width)

    raw_a, rstd_a = per_norm(rows_of(raw, idx)), rows_of(rstd, idx).reshape(-1, 1)
    d_raw_a = rms_input_grad(per_norm(d_a), None, raw_a, rstd_a, w, None, _qk_kind(spec)).reshape(-1, C)
    if d_every is None:
        dw = rms_weight_grad(per_norm(d_a), raw_a, rstd_a, None, _qk_kind(spec))
    else:
        dw = rms_weight_grad(per_norm(d_every), per_norm(raw), rstd.reshape(-1, 1), None, _qk_kind(spec))
    return d_raw_a, dw


def qkv_backward_rows(dq, dk, dv, cos, sin, x, rstd1, qk: QKNormRows, idx, dh, dx_base, w: DecoderWeights,
                      spec: DecoderSpec):
    """Second half, on rows ``idx``: rotary, q/k norms, the q/k/v projections and the input norm, after the
    attention.

    ``dq, dk, dv`` ``[N, heads * hd]``: the attention's input gradients as token rows (inactive keys and values
    are constants here: only the active rows are read, but for a key norm's weight); ``cos, sin`` ``[B, S, hd]``
    (expanded over the batch: flattened to rows inside the compiled stage rather than copied in every block; the
    Triton kernels read them as they are); ``x`` ``[N, D]``: the block input; ``rstd1`` ``[N, 1]`` or None;
    ``dh``: from :func:`mlp_backward_rows`; ``dx_base``: the input gradient's inactive rows (the output gradient
    under skip semantics; None: zeros). Returns ``dx`` ``[N, D]`` (the one scatter) and the gradients of the
    weights read here (a :class:`DecoderWeights`, None elsewhere).
    """
    N = x.shape[0]
    dq_a, dv_a = rope_rows(dq, cos, sin, idx), rows_of(dv, idx)
    d_q_norm = d_k_norm = None
    if spec.qk_norm is None:
        dk_a = rope_rows(dk, cos, sin, idx)
    else:
        dk_every = rope_rows(dk, cos, sin, None)  # every key: the key norm's weight gradient reads them all
        dq_a, d_q_norm = _qk_norm_backward(dq_a, qk.q_raw, qk.rstd_q, w.q_norm, idx, spec)
        dk_a, d_k_norm = _qk_norm_backward(rows_of(dk_every, idx), qk.k_raw, qk.rstd_k, w.k_norm, idx, spec,
                                           d_every=dk_every)
    a_a = rows_of(x, idx) if rstd1 is None else rms_rows(x, rstd1, w.input_norm, idx, spec.norm)
    if w.qkv is None:
        d_q, d_k, d_v = dq_a.t() @ a_a, dk_a.t() @ a_a, dv_a.t() @ a_a
        d_qkv = None
        da = torch.addmm(torch.addmm(dq_a @ w.q, dk_a, w.k), dv_a, w.v)
    else:
        dqkv = torch.cat((dq_a, dk_a, dv_a), dim=1)
        d_q = d_k = d_v = None
        d_qkv = dqkv.t() @ a_a
        da = dqkv @ w.qkv
    dx_a, d_input_norm = _norm_backward_or_none(da, dh, x, rstd1, w.input_norm, idx, spec)
    grads = DecoderWeights(input_norm=d_input_norm, q=d_q, q_bias=_bias_grad(dq_a, w.q_bias), k=d_k,
                           k_bias=_bias_grad(dk_a, w.k_bias), v=d_v, v_bias=_bias_grad(dv_a, w.v_bias), qkv=d_qkv,
                           q_norm=d_q_norm, k_norm=d_k_norm)
    return scatter_rows(dx_a, idx, N, dx_base), grads


_INPUTS = 6  # the Functions' arguments between x and the weights: cos, sin, mask, routing, block_index, spec


def _zero_grads(x, w: DecoderWeights):
    return (torch.zeros_like(x), *[None] * _INPUTS, *[None if t is None else torch.zeros_like(t) for t in w])


def _token_rows_of(t, N):
    """A saved ``[B, S, ...]`` tensor as ``[N, ...]`` rows (None stays None)."""
    return None if t is None else t.reshape(N, -1)


def _backward_on_active_rows(dy, idx, mlp: MlpRows, o_a, attention_grad, x, rstd1, qk: QKNormRows, cos, sin,
                             spec: DecoderSpec, w: DecoderWeights, skip: bool, weight=None):
    """The block backward on its active rows; shared by the saved and the checkpointed variants. ``skip``: the
    inactive rows' input gradient is their output gradient (skip semantics), else zero. ``weight`` ``[N]`` float32:
    the rows' weights when the routing reweights (:meth:`cggr.routing.Routing.kept_weight`), else None.

    ``mlp``: where the values after the attention are read; ``o_a``: attention output of the active rows;
    ``attention_grad(do)``: gradients of the attention's q, k, v for an output gradient ``do`` ``[B, H, S, hd]``.
    """
    B, S, D = x.shape
    N = B * S
    H, hd = spec.num_heads, spec.head_dim
    K = functools.partial(kernel, on_cuda=x.is_cuda, rows="idx")  # the row count: dynamic
    dh, do, mlp_grads = K(mlp_backward_rows)(dy.reshape(N, D), idx, mlp, o_a, w, spec, weight)
    # ---- attention: dense over the sequence; inactive queries' output gradient is zero
    dq, dk, dv = attention_grad(do.view(B, S, H, hd).transpose(1, 2))
    dx, qkv_grads = K(qkv_backward_rows)(
        token_rows(dq), token_rows(dk), token_rows(dv), cos.expand(B, S, hd), sin.expand(B, S, hd), x.view(N, D),
        _token_rows_of(rstd1, N), qk, idx, dh, dy.reshape(N, D) if skip else None, w, spec)
    return (dx.view(B, S, D), *[None] * _INPUTS, *stage_grads(mlp_grads, qkv_grads, w))


class DecoderBlockRouted(torch.autograd.Function):
    """``y = block(x)`` with a backward restricted to the rows active in ``block_index``.

    Saves the activations the backward reads (fewer than the HF layer's autograd graph saves), and the
    attention's own backward from this forward (no recompute).
    """

    @staticmethod
    def forward(ctx, x, cos, sin, mask, routing: Routing, block_index: int, spec: DecoderSpec, *weights):
        w = DecoderWeights(*weights)
        cos, sin = _rotary_tables(cos, sin, spec)
        y, saved, ctx.attention_grad = _block_forward(x, cos, sin, mask, spec, w, keep_attention_for(ctx))
        ctx.save_for_backward(*saved, cos, sin, mask, *w)
        ctx.routing, ctx.block_index, ctx.spec = routing, block_index, spec
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        tensors = ctx.saved_tensors
        n = len(_Saved._fields)
        s = _Saved(*tensors[:n])
        cos, sin, mask = tensors[n:n + 3]
        w = DecoderWeights(*tensors[n + 3:])
        r: Routing = ctx.routing
        B, S, D = s.x.shape
        N = B * S
        attention_grad = take_attention_grad(ctx, functools.partial(_attention, mask=mask, spec=ctx.spec),
                                             s.q, s.k, s.v)
        kept, idx = kept_rows(r, ctx.block_index, dy)
        if not kept:
            return with_skip(_zero_grads(s.x, w), dy, r, ctx.block_index)
        rows = functools.partial(_token_rows_of, N=N)
        o_a = rows_of(rows(s.o), idx)
        mlp = MlpRows(rows(s.g), rows(s.u), rows(s.h), rows(s.rstd2), rows(s.t), rows(s.rstd_ao), rows(s.f),
                      rows(s.rstd_mo), idx)
        qk = QKNormRows(rows(s.q_raw), rows(s.k_raw), rows(s.rstd_q), rows(s.rstd_k))
        return _backward_on_active_rows(dy, idx, mlp, o_a, attention_grad, s.x, s.rstd1, qk, cos, sin, ctx.spec,
                                        w, r.skip, r.kept_weight(ctx.block_index))


class DecoderBlockRoutedCheckpointed(torch.autograd.Function):
    """Routed activation checkpointing: saves only the block input, recomputes in backward what is needed.

    The recompute runs the input norm, q/k/v and the attention for every row (active queries attend to
    every key), but the output projection, the norms after it and the MLP for the active rows only; the
    attention's recomputed forward also serves its backward.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, mask, routing: Routing, block_index: int, spec: DecoderSpec, *weights):
        w = DecoderWeights(*weights)
        cos, sin = _rotary_tables(cos, sin, spec)
        y, _, _ = _block_forward(x, cos, sin, mask, spec, w)  # activations dropped: recomputed in backward
        ctx.save_for_backward(x, cos, sin, mask, *w)
        ctx.routing, ctx.block_index, ctx.spec = routing, block_index, spec
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        x, cos, sin, mask, *weights = ctx.saved_tensors
        w = DecoderWeights(*weights)
        r: Routing = ctx.routing
        spec: DecoderSpec = ctx.spec
        B, S, D = x.shape
        N = B * S
        kept, idx = kept_rows(r, ctx.block_index, dy)
        if not kept:
            return with_skip(_zero_grads(x, w), dy, r, ctx.block_index)
        rstd1, q, k, v, q_raw, k_raw, rstd_q, rstd_k = kernel(_qkv, x.is_cuda)(x, cos, sin, spec, w)
        out, attention_grad = attention_with_grad(functools.partial(_attention, mask=mask, spec=spec), q, k, v)
        o_a = rows_of(token_rows(out.detach()), idx)
        _, h_a, rstd2_a, g_a, u_a, t_a, rstd_ao_a, f_a, rstd_mo_a = _post_attention(
            rows_of(x.view(N, D), idx), o_a, spec, w, need_output=False)
        local = None if idx is None else torch.arange(idx.numel(), device=idx.device)
        mlp = MlpRows(g_a, u_a, h_a, rstd2_a, t_a, rstd_ao_a, f_a, rstd_mo_a, local)
        rows = functools.partial(_token_rows_of, N=N)
        qk = QKNormRows(rows(q_raw), rows(k_raw), rows(rstd_q), rows(rstd_k))
        return _backward_on_active_rows(dy, idx, mlp, o_a, attention_grad, x, rstd1, qk, cos, sin, spec, w,
                                        r.skip, r.kept_weight(ctx.block_index))


# ------------------------------------------------------------------------------------------- recognising a layer
def _norm_kind(norm, kind: RMSNormKind) -> tuple[RMSNormKind, float] | None:
    """``(kind, eps)`` of ``norm`` if it is an RMSNorm with a weight of the layout's ``kind`` (HF's class, or
    Liger-Kernel's, whose casting mode says where it rounds), else None."""
    name = type(norm).__name__  # HF's <Family>RMSNorm; Liger-Kernel's LigerRMSNorm, LigerRMSNormForGemma3, ...
    if "RMSNorm" not in name or getattr(norm, "weight", None) is None:
        return None
    eps = vars(norm).get("variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(eps, (int, float)):
        return None
    if hasattr(norm, "casting_mode"):  # Liger-Kernel's RMSNorm: its maths in its attributes
        in_fp32 = {"llama": False, "gemma": True}.get(norm.casting_mode)
        if in_fp32 is None or float(getattr(norm, "offset", 0.0)) != kind.offset:
            return None
        kind = replace(kind, weight_in_fp32=in_fp32)
    elif name.startswith("Gemma") != bool(kind.offset):  # Gemma's norms are (1 + w); no other family's are
        return None
    return kind, float(eps)


_SILU = ("SiLUActivation", "SiLU")
_GELU_TANH = ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanh")
# Liger-Kernel's gated MLPs call their fused kernel instead of an activation module.
_LIGER_MLPS = {"LigerSwiGLUMLP": "silu", "LigerGEGLUMLP": "gelu_tanh"}


def _gate_activation(mlp) -> str | None:
    act = getattr(mlp, "act_fn", getattr(mlp, "activation_fn", None))
    if act is None:
        return _LIGER_MLPS.get(type(mlp).__name__)
    name = type(act).__name__
    if name in _SILU:
        return "silu"
    if name in _GELU_TANH or (isinstance(act, torch.nn.GELU) and act.approximate == "tanh"):
        return "gelu_tanh"
    return None


def _linear(m, bias: bool = True):
    """``m`` if it is an ``nn.Linear`` (with no bias unless ``bias``), else None."""
    return m if isinstance(m, torch.nn.Linear) and (bias or m.bias is None) else None


def _norm_paths(layout: DecoderLayout) -> dict[str, str | None]:
    """Where each norm of the layout sits in the block, by its field of :class:`DecoderWeights` (None: the layout
    has no such norm)."""
    qk = layout.qk_norm is not None
    return dict(input_norm=layout.input_norm, mlp_norm=layout.mlp_norm, attention_out_norm=layout.attention_out_norm,
                mlp_out_norm=layout.mlp_out_norm, q_norm="self_attn.q_norm" if qk else None,
                k_norm="self_attn.k_norm" if qk else None)


def _modules(layout: DecoderLayout, block):
    """The block's modules the layout names: ``(attn, mlp, projections, norms)``, or what is missing or of another
    kind (a projection not an ``nn.Linear``), in words."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if attn is None or mlp is None:
        return "no self_attn and mlp modules"
    # a fused projection must have no bias (the Functions read none); the separate ones may
    qkv_names = ("qkv_proj",) if layout.fused_qkv else ("q_proj", "k_proj", "v_proj")
    gate_up_names = ("gate_up_proj",) if layout.fused_gate_up else ("gate_proj", "up_proj")
    qkv = tuple(_linear(getattr(attn, n, None), bias=not layout.fused_qkv) for n in qkv_names)
    gate_up = tuple(_linear(getattr(mlp, n, None), bias=not layout.fused_gate_up) for n in gate_up_names)
    o, down = _linear(getattr(attn, "o_proj", None)), _linear(getattr(mlp, "down_proj", None))
    paths = _norm_paths(layout)
    norms = {k: None if path is None else functools.reduce(lambda m, n: getattr(m, n, None), path.split("."), block)
             for k, path in paths.items()}
    projections = qkv_names + gate_up_names + ("o_proj", "down_proj")
    missing = [n for n, m in zip(projections, (*qkv, *gate_up, o, down)) if m is None]
    if missing:
        return f"{', '.join(missing)} missing or not nn.Linear (with no bias where the layout has none)"
    missing = [path for k, path in paths.items() if path is not None and norms[k] is None]
    if missing:
        return f"no {', '.join(missing)}"
    return attn, mlp, qkv, gate_up, o, down, norms


def decoder_weights(layout: DecoderLayout, block) -> DecoderWeights:
    """The block's parameters as the Functions take them (its modules as ``layout`` names them)."""
    _, _, qkv, gate_up, o, down, norms = _modules(layout, block)
    weight = {k: getattr(m, "weight", None) for k, m in norms.items()}
    if layout.fused_qkv:
        projections = dict(qkv=qkv[0].weight)
    else:
        q, k, v = qkv
        projections = dict(q=q.weight, q_bias=q.bias, k=k.weight, k_bias=k.bias, v=v.weight, v_bias=v.bias)
    if layout.fused_gate_up:
        projections.update(gate_up=gate_up[0].weight)
    else:
        gate, up = gate_up
        projections.update(gate=gate.weight, gate_bias=gate.bias, up=up.weight, up_bias=up.bias)
    return DecoderWeights(**weight, **projections, o=o.weight, o_bias=o.bias, down=down.weight,
                          down_bias=down.bias)


def decoder_block_spec(layout: DecoderLayout, block) -> DecoderSpec | str:
    """The block's spec if it has the modules ``layout`` names, of the kinds it reads (RMSNorms of the layout's
    kind, linear projections, the gate activation), and no other parameters; else the first difference found,
    in words (for the router's report)."""
    found = _modules(layout, block)
    if isinstance(found, str):
        return found
    attn, mlp, qkv, _, o, down, norms = found
    w = decoder_weights(layout, block)
    read = {id(t) for t in w if t is not None}
    other = [n for n, p in block.named_parameters() if id(p) not in read]
    if other:  # another layer's pieces (a q/k norm, a sandwich norm, adapters)
        return f"parameters the layout does not read: {', '.join(other[:4])}{', ...' if len(other) > 4 else ''}"
    kinds = {k: None if m is None else _norm_kind(m, layout.norm) for k, m in norms.items()}
    odd = [k for k, m in norms.items() if m is not None and kinds[k] is None]
    if odd:
        paths = _norm_paths(layout)
        return (f"{', '.join(paths[k] for k in odd)}: not an RMSNorm of the layout's kind "
                f"({type(norms[odd[0]]).__name__})")
    qk = ("q_norm", "k_norm")
    block_kinds = {kinds[k][0] for k in kinds if k not in qk and kinds[k] is not None}
    qk_kinds = {kinds[k][0] for k in qk if kinds[k] is not None}
    if len(block_kinds) > 1 or len(qk_kinds) > 1:  # a partly patched layer: not one spec
        return "norms that round in different places (some patched, some not)"
    activation = _gate_activation(mlp)
    if activation != layout.activation:
        return f"the MLP's gate activation is {activation or 'not one the layouts know'}, not {layout.activation}"
    if float(getattr(attn, "attention_dropout", 0.0) or 0.0) != 0.0:
        return "dropout in the attention"
    if not getattr(attn, "is_causal", True):
        return "bidirectional attention"
    if getattr(attn, "attn_logit_softcapping", None) is not None:
        return "softcapped attention logits"
    hd = getattr(attn, "head_dim", None)
    if not isinstance(hd, int) or hd <= 0 or hd % 2 or o.in_features % hd:
        return f"head_dim {hd!r} is not an even divisor of o_proj's input width {o.in_features}"
    heads = o.in_features // hd
    kv = (qkv[0].out_features - heads * hd) // (2 * hd) if layout.fused_qkv else qkv[1].out_features // hd
    widths = [heads * hd, kv * hd, kv * hd]
    if kv <= 0 or heads % kv or (sum(widths) != qkv[0].out_features if layout.fused_qkv
                                 else [m.out_features for m in qkv] != widths):
        return f"q/k/v widths {[m.out_features for m in qkv]} are not grouped-query heads of {hd}"
    if layout.qk_norm is not None:
        per = hd if layout.qk_norm == "head" else None
        if (norms["q_norm"].weight.shape[0], norms["k_norm"].weight.shape[0]) != (per or widths[0], per or widths[1]):
            return f"q/k norms not {'per head' if per else 'over the projection width'}"
    eps = {k: None if kind_eps is None else kind_eps[1] for k, kind_eps in kinds.items()}
    kind = next(iter(block_kinds or qk_kinds), layout.norm)
    qk_kind = next(iter(qk_kinds), kind)
    return DecoderSpec(hidden_size=o.out_features, num_heads=heads, num_kv_heads=kv, head_dim=hd,
                       scaling=float(getattr(attn, "scaling", hd ** -0.5)), input_norm_eps=eps["input_norm"],
                       mlp_norm_eps=eps["mlp_norm"], attention_out_norm_eps=eps["attention_out_norm"],
                       mlp_out_norm_eps=eps["mlp_out_norm"], q_norm_eps=eps["q_norm"], k_norm_eps=eps["k_norm"],
                       qk_norm=layout.qk_norm, norm=kind, activation=layout.activation,
                       qk_norm_kind=None if qk_kind == kind else qk_kind)


# ------------------------------------------------------------------------------------------- a call's inputs
def _sliding_window(attn) -> float:
    """The attention's sliding window (Qwen 2/3 and Gemma 3 set it per layer, Mistral and Phi-3 read their
    config), else infinity."""
    window = vars(attn)["sliding_window"] if "sliding_window" in vars(attn) else getattr(
        getattr(attn, "config", None), "sliding_window", None)
    return math.inf if window is None else window


def rotary_inputs(block, kwargs: dict, dtype: torch.dtype):
    """``(cos, sin, mask)`` of this call, or None where the Function cannot compute what the layer does."""
    pe = kwargs.get("position_embeddings")
    if pe is None or not dropout_off(block):
        return None
    cos, sin = pe
    if cos.shape[-1] != block.self_attn.head_dim:
        return None  # partial rotary (GLM, Phi-4-mini): the layer rotates part of each head, the Function all of it
    mask = kwargs.get("attention_mask")
    if mask is None and cos.shape[-2] > _sliding_window(block.self_attn):
        return None  # no mask (flash attention): the window is the attention's own to apply; the Function's is not
    return cos.to(dtype), sin.to(dtype), mask


def rotary_check_inputs(spec: DecoderSpec, g: torch.Generator, batch: int, seq: int, mask) -> dict:
    """The attach-time check's call: a mask (or None), positions, and unstructured cos/sin (not HF's duplicated
    halves): any other use of them than the Function's shows."""
    angle = (torch.rand(batch, seq, spec.head_dim, generator=g, device=g.device) * 2 - 1) * math.pi
    return dict(attention_mask=mask, position_ids=torch.arange(seq, device=g.device).expand(batch, seq),
                position_embeddings=(angle.cos(), angle.sin()))


def rotary_variants(spec: DecoderSpec) -> tuple[DecoderSpec, ...]:
    """Other readings of a block of this shape, tried in turn when the block fails the check with ``spec``."""
    return () if spec.rotary_first_half else (replace(spec, rotary_first_half=True),)


def describe_rotary(spec: DecoderSpec) -> str:
    """What ``spec`` reads differently from the plain layer, for the router's report."""
    if spec.rotary_first_half:
        return "its rotary reading the first half of cos/sin (as Liger-Kernel's RoPE does)"
    return ""


def decoder_backward(name: str, layout: DecoderLayout) -> CompactedBackward:
    """The compacted backward of the decoder layers ``layout`` describes (a family module's ``BACKWARD``)."""
    return CompactedBackward(name=name, spec=functools.partial(decoder_block_spec, layout),
                             weights=functools.partial(decoder_weights, layout), inputs=rotary_inputs,
                             check_inputs=rotary_check_inputs, saving=DecoderBlockRouted,
                             checkpointed=DecoderBlockRoutedCheckpointed, variants=rotary_variants,
                             describe=describe_rotary)
