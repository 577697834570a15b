"""Fused row-wise pieces of the compacted backward.

Each function reads the active rows of full saved tensors through an index
(the gather is fused into its consumer) and does one row-wise job: the gated
MLP's backward (SwiGLU, GeGLU), an RMSNorm recompute or backward with its
residual (Llama's, OLMo 2's or Gemma's kind of norm), the rotary backward, and
GPT-2's GELU and LayerNorm. Written in plain PyTorch: that is the reference,
and what runs on CPU. On CUDA :func:`kernel` compiles them by ``torch.compile`` with
the row count dynamic (the number of active rows changes every block and
step) and every other size static, mostly inside the two stage functions of
each compacted backward, which fuses the gather and the arithmetic into few
kernels; ``CGGR_COMPILE=0`` turns that off. The rotary and SwiGLU backward
run cggr's Triton kernels (:mod:`cggr.kernels.rows`) there, as Triton ops
whose kernels Inductor launches from the compiled stages;
``CGGR_ROW_KERNELS=inductor`` lets Inductor compile the PyTorch pieces
instead.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
from dataclasses import dataclass

import torch

from ..env import compile_enabled, cuda_graphs_enabled, row_kernels
from .graphs import graphed

logger = logging.getLogger("cggr")


def rows_of(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Rows ``idx`` of ``t``; ``t`` itself when ``idx`` is None, which every piece here reads as "all rows, in
    order" (a block whose every row is active). No gather, no copy: at 1B, full depth, the gathers of nearly
    all rows cost about 0.45 ms a block on an H200, 6 % of its backward. (With HF's labels every row is rarely
    active: the last position of each sequence has no label, so it is routed out of every block.)"""
    return t if idx is None else t[idx]


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision the pieces compute in: fp32, or fp64 for fp64 tensors (not rounded down)."""
    return t if t.dtype == torch.float64 else t.float()


@dataclass(frozen=True)
class RMSNormKind:
    """How an RMSNorm applies its weight ``w`` to the normalised rows ``x_hat = x * rstd`` (fp32).

    Llama's (``LlamaRMSNorm``; Qwen 3's, Phi-3's): ``w * x_hat.to(dtype)``, the product in the input dtype.
    OLMo 2's: ``(w * x_hat).to(dtype)``, the product in fp32. Gemma's: ``((1 + w) * x_hat).to(dtype)``. In fp32
    they differ only by the offset; in bf16 by where the result rounds, which the compacted blocks reproduce.
    """

    offset: float = 0.0
    """Added to the weight: 1.0 for Gemma's norms (their weights start at zero)."""
    weight_in_fp32: bool = False
    """The weight multiplies the fp32 rows and the product rounds to the input dtype (Gemma, OLMo 2); else the
    rows round first and the product is in the input dtype (Llama)."""


LLAMA_NORM = RMSNormKind()


def _norm_weight(w: torch.Tensor, kind: RMSNormKind) -> torch.Tensor:
    """The factor the normalised rows are multiplied by: ``w``, or ``offset + w``."""
    return w if not kind.offset else kind.offset + w


def _apply_norm_weight(xhat: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, kind: RMSNormKind) -> torch.Tensor:
    if kind.weight_in_fp32:
        return (xhat * _norm_weight(_acc(w), kind)).to(dtype)
    return _norm_weight(w, kind) * xhat.to(dtype)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, kind: RMSNormKind = LLAMA_NORM):
    """HF's RMSNorm of the last dim, and its saved statistic: ``(out, rstd)``, ``rstd`` fp32 ``[..., 1]``."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return _apply_norm_weight(xf * rstd, w, x.dtype, kind), rstd


def _silu_and_grad(g: torch.Tensor):
    """``silu(g)`` and its derivative, from one sigmoid."""
    sig = torch.sigmoid(g)
    return g * sig, sig * (1.0 + g * (1.0 - sig))


_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu_tanh_and_grad(f: torch.Tensor):
    """``gelu(f, approximate="tanh")`` and its derivative."""
    t = torch.tanh(_GELU_C * (f + 0.044715 * f * f * f))
    act = 0.5 * f * (1.0 + t)
    return act, 0.5 * (1.0 + t) + 0.5 * f * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * 0.044715 * f * f)


ACTIVATIONS = {"silu": _silu_and_grad, "gelu_tanh": _gelu_tanh_and_grad}
"""The gate activations of the gated MLPs (SwiGLU, GeGLU), by name: value and derivative in one pass."""


def glu_backward(dm: torch.Tensor, g: torch.Tensor, u: torch.Tensor, idx: torch.Tensor | None,
                 activation: str = "silu"):
    """Rows ``idx`` of ``m = act(g) * u``, and its input gradients given ``dm`` (active rows; ``idx`` None: all
    rows, as everywhere in this module). ``activation``: a key of :data:`ACTIVATIONS`.

    Returns ``(m_a, dg_a, du_a)`` in ``dm``'s dtype.
    """
    dt = dm.dtype
    ga = _acc(rows_of(g, idx))
    ua = _acc(rows_of(u, idx))
    act, grad = ACTIVATIONS[activation](ga)
    act = _acc(act.to(dt))  # the layer's forward rounds act(g) to the activation dtype
    dmf = _acc(dm)
    m_a = act * ua
    du = dmf * act
    dg = dmf * ua * grad
    return m_a.to(dt), dg.to(dt), du.to(dt)


def swiglu_backward(dm: torch.Tensor, g: torch.Tensor, u: torch.Tensor, idx: torch.Tensor | None):
    """:func:`glu_backward` of SwiGLU, ``m = silu(g) * u``: the reference of the Triton kernel."""
    return glu_backward(dm, g, u, idx, "silu")


def rms_rows(x: torch.Tensor, rstd: torch.Tensor, w: torch.Tensor, idx: torch.Tensor | None,
             kind: RMSNormKind = LLAMA_NORM):
    """Rows ``idx`` of the RMSNorm output (recomputed from the saved ``rstd``)."""
    return _apply_norm_weight(_acc(rows_of(x, idx)) * rows_of(rstd, idx), w, x.dtype, kind)


def rms_weight_grad(dout: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, idx: torch.Tensor | None,
                    kind: RMSNormKind = LLAMA_NORM) -> torch.Tensor:
    """The norm weight's gradient from rows ``idx`` (fp32; fp64 for fp64): ``sum(dout * x_hat)``, ``x_hat``
    rounded to the input dtype where the layer rounds it before the weight."""
    xhat = _acc(rows_of(x, idx)) * rows_of(rstd, idx)
    return (_acc(dout) * (xhat if kind.weight_in_fp32 else _acc(xhat.to(x.dtype)))).sum(0)


def rms_input_grad(dout: torch.Tensor, residual: torch.Tensor | None, x: torch.Tensor, rstd: torch.Tensor,
                   w: torch.Tensor, idx: torch.Tensor | None, kind: RMSNormKind = LLAMA_NORM) -> torch.Tensor:
    """``residual + d(RMSNorm)/dx · dout`` on rows ``idx`` (``residual`` None: the norm's input gradient alone),
    in ``dout``'s dtype."""
    rstd_a = rows_of(rstd, idx)
    xhat = _acc(rows_of(x, idx)) * rstd_a
    dxhat = _acc(dout) * _norm_weight(_acc(w), kind)
    dx = rstd_a * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return (dx if residual is None else _acc(residual) + dx).to(dout.dtype)


def rms_backward_add(dout: torch.Tensor, residual: torch.Tensor | None, x: torch.Tensor, rstd: torch.Tensor,
                     w: torch.Tensor, idx: torch.Tensor | None, kind: RMSNormKind = LLAMA_NORM):
    """``residual + d(RMSNorm)/dx · dout`` on rows ``idx``, and the norm weight's gradient (fp32; fp64 for fp64).

    Backward of ``w * (x * rstd).to(dtype)`` (or of the ``kind``'s other form) with
    ``rstd = rsqrt(mean(x^2) + eps)``.
    """
    return rms_input_grad(dout, residual, x, rstd, w, idx, kind), rms_weight_grad(dout, x, rstd, idx, kind)


def token_rows(t_heads: torch.Tensor) -> torch.Tensor:
    """A ``[B, heads, S, hd]`` tensor as ``[B * S, heads * hd]``, one row per token: a view when its storage is
    token-major (``[B, S, heads, hd]`` transposed, as the blocks' q/k/v and the fused attention's outputs and
    gradients are), else one copy. Row gathers then read whole contiguous rows, which the compiled stages turn
    into wide, coalesced loads even with dynamic shapes."""
    B, heads, S, hd = t_heads.shape
    return t_heads.transpose(1, 2).reshape(B * S, heads * hd)


def rope_backward(dt: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, idx: torch.Tensor | None):
    """Gradient before the rotary embedding, for rows ``idx`` of ``dt`` ``[N, heads * hd]`` (token rows, see
    :func:`token_rows`), with ``cos``/``sin`` ``[N, hd]``. Returns ``[n, heads * hd]``.

    Forward: ``t' = t*cos + rotate_half(t)*sin`` with ``rotate_half([a, b]) = [-b, a]``; so
    ``dt = dt'*cos + rotate_half^T(dt'*sin)`` with ``rotate_half^T([a, b]) = [b, -a]``.
    """
    hd = cos.shape[-1]
    n = dt.shape[0] if idx is None else idx.shape[0]
    t = _acc(rows_of(dt, idx)).reshape(n, dt.shape[1] // hd, hd)  # [n, heads, hd]; n may be 0
    c = _acc(rows_of(cos, idx)).unsqueeze(1)
    s = _acc(rows_of(sin, idx)).unsqueeze(1)
    ts = t * s
    half = hd // 2
    rot_t = torch.cat((ts[..., half:], -ts[..., :half]), dim=-1)
    return (t * c + rot_t).to(dt.dtype).reshape(n, dt.shape[1])


# ---- The Triton kernels of cggr.kernels.rows as ops, for CGGR_ROW_KERNELS=triton. Triton ops
# (``torch.library.triton_op``): inside a compiled stage Inductor traces into them and launches the kernels from
# its own generated code, as it launches its own kernels (no custom-op dispatch, no Triton Python launcher per
# call: about 0.3 ms of host time per call under the profiler on an H200 host, three calls a block). Called
# eagerly they run their body. On CUDA the body launches the kernel (the reference where Triton is missing or
# disabled, or for fp64); on any other device it runs the reference.

def _flat(t: torch.Tensor) -> torch.Tensor:
    """cos/sin ``[B, S, hd]`` (or ``[N, hd]``) as ``[N, hd]``."""
    return t.reshape(-1, t.shape[-1])


def _row_kernel(name: str, *tensors: torch.Tensor):
    """The Triton kernel ``cggr.kernels.rows.<name>`` when Triton is available and takes these tensors' dtypes,
    else None (the caller runs its reference)."""
    from ..kernels import triton_available

    if not triton_available():
        return None
    from ..kernels import rows

    return getattr(rows, name) if rows.supported(*tensors) else None


def _rope_rows_cuda(dt, cos, sin, idx):
    fast = _row_kernel("rope_rows_backward", dt, cos, sin)
    return fast(dt, cos, sin, idx) if fast is not None else rope_backward(dt, _flat(cos), _flat(sin), idx)


@torch.library.triton_op("cggr::rope_rows_backward", mutates_args=())
def rope_rows_backward(dt: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       idx: torch.Tensor | None) -> torch.Tensor:
    """:func:`rope_backward` with ``cos``/``sin`` ``[N, hd]`` or ``[B, S, hd]`` (``B * S = N``; the kernel reads
    a batch-expanded view in place, where flattening it would copy)."""
    if dt.is_cuda:
        return _rope_rows_cuda(dt, cos, sin, idx)
    return rope_backward(dt, _flat(cos), _flat(sin), idx)


def _swiglu_rows_cuda(dm, g, u, idx):
    fast = _row_kernel("swiglu_rows_backward", dm, g, u)
    return fast(dm, g, u, idx) if fast is not None else swiglu_backward(dm, g, u, idx)


@torch.library.triton_op("cggr::swiglu_rows_backward", mutates_args=())
def swiglu_rows_backward(dm: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                         idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`swiglu_backward`."""
    if dm.is_cuda:
        return _swiglu_rows_cuda(dm, g, u, idx)
    return swiglu_backward(dm, g, u, idx)


@torch.compiler.assume_constant_result  # a compiled stage reads the setting once, when it compiles
def _row_kernels_triton() -> bool:
    return row_kernels() == "triton"


def triton_rows(t: torch.Tensor) -> bool:
    """Whether the stages' rotary and SwiGLU backward on ``t``'s device are the custom ops above:
    ``CGGR_ROW_KERNELS=triton`` (read on every device, so that a bad value fails anywhere) and a CUDA tensor."""
    return _row_kernels_triton() and t.is_cuda


def glu_rows(dm: torch.Tensor, g: torch.Tensor, u: torch.Tensor, idx: torch.Tensor | None,
             activation: str = "silu"):
    """:func:`glu_backward` as a compacted backward's stage runs it: SwiGLU through the Triton op where
    :func:`triton_rows` says so, else (GeGLU, the CPU) the plain piece."""
    if triton_rows(dm) and activation == "silu":
        return swiglu_rows_backward(dm, g, u, idx)
    return glu_backward(dm, g, u, idx, activation)


def rope_rows(dt: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Rows ``idx`` of the gradient before the rotary embedding (``dt``: token rows ``[N, heads * hd]``;
    ``cos``/``sin``: ``[N, hd]``, or ``[B, S, hd]`` with ``B * S = N``): the Triton op where :func:`triton_rows`
    says so (it reads cos/sin as they are, no flattening copy), else :func:`rope_backward`."""
    if triton_rows(dt):
        return rope_rows_backward(dt, cos, sin, idx)
    return rope_backward(dt, _flat(cos), _flat(sin), idx)


def gelu_tanh_rows(dact: torch.Tensor, f: torch.Tensor, idx: torch.Tensor | None):
    """Rows ``idx`` of ``gelu_tanh(f)`` and ``d/df`` given ``dact``: ``(act_a, df_a)`` in ``dact``'s dtype."""
    act, grad = _gelu_tanh_and_grad(_acc(rows_of(f, idx)))
    return act.to(dact.dtype), (_acc(dact) * grad).to(dact.dtype)


def layer_norm_rows(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                    idx: torch.Tensor | None):
    """Rows ``idx`` of ``LayerNorm(x)`` from saved statistics (fp32, or fp64 for fp64 inputs)."""
    return ((_acc(rows_of(x, idx)) - rows_of(mean, idx)) * rows_of(rstd, idx) * _acc(w) + _acc(b)).to(x.dtype)


def layer_norm_backward_add(dout: torch.Tensor, residual: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                            rstd: torch.Tensor, w: torch.Tensor, idx: torch.Tensor | None):
    """``residual + d(LayerNorm)/dx · dout`` on rows ``idx``, and the weight and bias gradients (fp32; fp64 for
    fp64)."""
    rstd_a = rows_of(rstd, idx)
    xhat = (_acc(rows_of(x, idx)) - rows_of(mean, idx)) * rstd_a
    dof = _acc(dout)
    dw = (dof * xhat).sum(0)
    db = dof.sum(0)
    dxhat = dof * _acc(w)
    dx = rstd_a * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return (_acc(residual) + dx).to(dout.dtype), dw, db


@functools.lru_cache(maxsize=None)
def _compiled(fn, dynamic):
    try:
        return torch.compile(fn, dynamic=dynamic)
    except Exception as e:  # no compiler toolchain, unsupported platform
        logger.warning("cggr: torch.compile unavailable (%s); the compacted backward runs eagerly", e)
        return fn


_eager_only = False  # set while cggr.compact.verify runs a check: nothing is compiled for its one-off shapes


@contextlib.contextmanager
def eager_kernels():
    """Within this context :func:`kernel` returns the eager functions, compiling nothing."""
    global _eager_only
    previous, _eager_only = _eager_only, True
    try:
        yield
    finally:
        _eager_only = previous


def row_count_dynamic(args: tuple, rows_at: int | None) -> tuple:
    """``args`` for a compiled stage, detached (a requires_grad flag that differs between calls would make dynamo
    recompile), with the row count of a backward stage marked dynamic: dim 0 of ``args[rows_at]`` (the stage's
    active rows, ``idx``) and of every other tensor of that many rows that is not a weight (weights require
    grad). Tensors inside named tuples (a block's weights, its saved activations) are treated alike. Every other
    dim stays static: the hidden sizes are the model's, and Inductor builds its best kernels
    for static ones (single-pass reductions over a known row length; the row kernels' strides known multiples of
    16, so their loads are vectorised). ``rows_at`` None (a forward stage) or ``idx`` None (every row): nothing
    is marked."""
    idx = None if rows_at is None else args[rows_at]
    n = None if idx is None else idx.shape[0]

    def prepared(a):
        if isinstance(a, torch.Tensor):
            d = a.detach()
            if n is not None and d.dim() and d.shape[0] == n and not a.requires_grad:
                torch._dynamo.maybe_mark_dynamic(d, 0)
            return d
        if isinstance(a, tuple) and hasattr(a, "_fields"):
            return type(a)(*map(prepared, a))
        return a

    return tuple(map(prepared, args))


@functools.lru_cache(maxsize=None)
def _position(fn, name: str) -> int:
    return list(inspect.signature(fn).parameters).index(name)


def kernel(eager, on_cuda: bool, rows: str | None = None):
    """What to run for the function ``eager`` (a row-wise piece, a whole stage of a compacted backward made
    of them, or a stage of a compacted block's forward around its attention): compiled on CUDA unless
    ``CGGR_COMPILE=0`` (or within :func:`eager_kernels`, or under an outer ``torch.compile``), else ``eager``.

    Compiled for the shapes of its first call (static shapes get Inductor's best kernels), with dynamic shapes
    from a second shape on (torch.compile's default): the forward stages' shapes change only with the batch.
    ``rows``: for the backward stages, whose row count changes every block and step, the name of their argument
    that lists the active rows (``"idx"``): the row count is dynamic from the first call, every other size
    static (:func:`row_count_dynamic`); with ``CGGR_CUDA_GRAPHS=1`` those stages replay CUDA graphs where they
    can (:mod:`cggr.compact.graphs`).
    """
    # Under an outer torch.compile (dynamo tracing the block), the pieces are traced as plain PyTorch.
    if on_cuda and compile_enabled() and not _eager_only and not torch.compiler.is_compiling():
        row_kernels()  # read inside the stages as they compile: a bad value raises a plain ValueError here
        fn = _compiled(eager, None)
        at = None if rows is None else _position(eager, rows)
        prepare = functools.partial(row_count_dynamic, rows_at=at)
        if rows is not None and cuda_graphs_enabled():
            return graphed(f"{eager.__module__}.{eager.__qualname__}", fn, prepare)
        return lambda *args: fn(*prepare(args))
    return eager


def keep_attention_for(ctx) -> bool:
    """Whether a saving block's forward keeps its attention's backward (:func:`cggr.compact.attention.
    attention_in_forward`): when a backward may follow, and not while dynamo traces the block (an outer
    ``torch.compile``), where a nested autograd graph has no place."""
    return any(ctx.needs_input_grad) and not torch.compiler.is_compiling()


def scatter_rows(rows: torch.Tensor, idx: torch.Tensor | None, num_rows: int, base: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``[num_rows, D]``: ``rows`` at rows ``idx``, ``base``'s rows (zeros when None) elsewhere; ``rows`` itself
    when every row is active (``idx`` None). Traced into the compiled backward stages: the input gradient of a
    block under skip semantics (``base`` = its output gradient, which the inactive rows pass on) is one copy and
    one scatter, rather than a scatter into zeros and then a select over the whole tensor."""
    if idx is None:
        return rows
    out = rows.new_zeros(num_rows, rows.shape[1]) if base is None else base.to(rows.dtype)
    return out.index_copy(0, idx, rows)


def weighted_rows(dy_a: torch.Tensor, weight: torch.Tensor | None, idx: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A reweighted block's output-gradient rows ``dy_a`` (rows ``idx`` of every row's) split in two
    (docs/design.md §1.13): ``(w dy_a, (1 - w) dy_a)``, the part that enters the block's branches and the part its
    residual carries straight to the input; ``(dy_a, None)`` when the routing does not reweight (``weight`` None).
    ``weight`` ``[N]`` float32: every row's weight ``1/pi`` (0 off the kept rows). Traced into the compiled
    backward stages, on the kept rows only: the weights cost no pass over the whole output gradient."""
    if weight is None:
        return dy_a, None
    w = rows_of(weight, idx).unsqueeze(-1)
    g = dy_a.float()  # the products in fp32: a weight rounded to bf16 would be off by 0.4 %
    return (g * w).to(dy_a.dtype), (g * (1.0 - w)).to(dy_a.dtype)


def plus_rest(dh: torch.Tensor, rest: torch.Tensor | None) -> torch.Tensor:
    """``dh`` (the gradient of the stream after the attention, kept rows) with the residual's unweighted rest of
    :func:`weighted_rows` added: what reaches the block input past both branches."""
    return dh if rest is None else dh + rest


def stage_grads(first: tuple, second: tuple, weights: tuple) -> list:
    """Each weight's gradient from the backward stage that computed it (``first`` and ``second``: named tuples of
    the weights' fields, None where that stage did not compute one), in the weight's dtype (None for no weight)."""
    return [None if t is None else (a if a is not None else b).to(t.dtype) for a, b, t in zip(first, second, weights)]


def kept_rows(routing, block_index: int, dy: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
    """The start of a compacted block's backward, given its output gradient ``dy``: the rows drawn from ``dy``
    where they are drawn in the backward (:meth:`cggr.routing.Routing.prepare_backward`), before anything reads
    them; then ``(any_kept, idx)``, ``idx`` the kept rows (None: every row)."""
    routing.prepare_backward(block_index, dy)
    if routing.active_count(block_index) == 0:
        return False, None
    return True, routing.compact_indices(block_index)


def with_skip(grads: tuple, dy: torch.Tensor, routing, block_index: int) -> tuple:
    """A compacted block's gradients ``(dx, ...)`` under the routing's inactive semantics: under skip the
    inactive rows' output gradient ``dy`` passes to the block input (:meth:`cggr.routing.Routing.block_input_grad`)."""
    return (routing.block_input_grad(grads[0], dy, block_index), *grads[1:])
