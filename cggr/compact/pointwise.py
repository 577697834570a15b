"""Fused row-wise pieces of the compacted backward.

Each function reads the active rows of full saved tensors through an index
(the gather is fused into its consumer) and does one row-wise job: the
SwiGLU backward, an RMSNorm recompute or backward with its residual, the
rotary backward. Written in plain PyTorch: that is the reference, and what
runs on CPU. On CUDA :func:`kernel` compiles them by ``torch.compile`` with
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

import torch

from ..env import compile_enabled, row_kernels

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


def swiglu_backward(dm: torch.Tensor, g: torch.Tensor, u: torch.Tensor, idx: torch.Tensor | None):
    """Rows ``idx`` of ``m = silu(g) * u``, and its input gradients given ``dm`` (active rows; ``idx`` None: all
    rows, as everywhere in this module).

    Returns ``(m_a, dg_a, du_a)`` in ``dm``'s dtype.
    """
    dt = dm.dtype
    ga = _acc(rows_of(g, idx))
    ua = _acc(rows_of(u, idx))
    sig = torch.sigmoid(ga)
    act = _acc((ga * sig).to(dt))  # the layer's forward rounds silu(g) to the activation dtype
    dmf = _acc(dm)
    m_a = act * ua
    du = dmf * act
    dg = dmf * ua * (sig * (1.0 + ga * (1.0 - sig)))
    return m_a.to(dt), dg.to(dt), du.to(dt)


def rms_rows(x: torch.Tensor, rstd: torch.Tensor, w: torch.Tensor, idx: torch.Tensor | None):
    """Rows ``idx`` of ``w * (x * rstd).to(x.dtype)`` (an RMSNorm output, recomputed)."""
    return w * (_acc(rows_of(x, idx)) * rows_of(rstd, idx)).to(x.dtype)


def rms_backward_add(dout: torch.Tensor, residual: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor,
                     w: torch.Tensor, idx: torch.Tensor | None):
    """``residual + d(RMSNorm)/dx · dout`` on rows ``idx``, and the norm weight's gradient (fp32; fp64 for fp64).

    Backward of ``w * (x * rstd).to(dtype)`` with ``rstd = rsqrt(mean(x^2) + eps)``.
    """
    rstd_a = rows_of(rstd, idx)
    xhat = _acc(rows_of(x, idx)) * rstd_a
    dof = _acc(dout)
    dw = (dof * _acc(xhat.to(x.dtype))).sum(0)
    dxhat = dof * _acc(w)
    dx = rstd_a * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return (_acc(residual) + dx).to(dout.dtype), dw


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


def mlp_rows(dm: torch.Tensor, g: torch.Tensor, u: torch.Tensor, h: torch.Tensor, rstd: torch.Tensor,
             w_norm: torch.Tensor, idx: torch.Tensor | None):
    """Everything row-wise the MLP backward needs: ``swiglu_backward`` and the recomputed norm output."""
    swiglu = swiglu_rows_backward if triton_rows(dm) else swiglu_backward
    return (*swiglu(dm, g, u, idx), rms_rows(h, rstd, w_norm, idx))


def qkv_rows(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             x: torch.Tensor, rstd: torch.Tensor, w_norm: torch.Tensor, idx: torch.Tensor | None):
    """Active rows of the q/k/v gradients before rotary (``dq, dk, dv``: token rows ``[N, heads * hd]``;
    ``cos``/``sin``: ``[N, hd]``, or ``[B, S, hd]`` with ``B * S = N``), and the recomputed input norm output."""
    if triton_rows(dq):
        dq_a, dk_a = rope_rows_backward(dq, cos, sin, idx), rope_rows_backward(dk, cos, sin, idx)
    else:
        cos, sin = _flat(cos), _flat(sin)
        dq_a, dk_a = rope_backward(dq, cos, sin, idx), rope_backward(dk, cos, sin, idx)
    return dq_a, dk_a, rows_of(dv, idx), rms_rows(x, rstd, w_norm, idx)


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_tanh_rows(dact: torch.Tensor, f: torch.Tensor, idx: torch.Tensor | None):
    """Rows ``idx`` of ``gelu_tanh(f)`` and ``d/df`` given ``dact``: ``(act_a, df_a)`` in ``dact``'s dtype."""
    fa = _acc(rows_of(f, idx))
    t = torch.tanh(_GELU_C * (fa + 0.044715 * fa * fa * fa))
    act = 0.5 * fa * (1.0 + t)
    grad = 0.5 * (1.0 + t) + 0.5 * fa * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * 0.044715 * fa * fa)
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
    grad). Every other dim stays static: the hidden sizes are the model's, and Inductor builds its best kernels
    for static ones (single-pass reductions over a known row length; the row kernels' strides known multiples of
    16, so their loads are vectorised). ``rows_at`` None (a forward stage) or ``idx`` None (every row): nothing
    is marked."""
    idx = None if rows_at is None else args[rows_at]
    n = None if idx is None else idx.shape[0]
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            d = a.detach()
            if n is not None and d.dim() and d.shape[0] == n and not a.requires_grad:
                torch._dynamo.maybe_mark_dynamic(d, 0)
            a = d
        out.append(a)
    return tuple(out)


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
    static (:func:`row_count_dynamic`).
    """
    # Under an outer torch.compile (dynamo tracing the block), the pieces are traced as plain PyTorch.
    if on_cuda and compile_enabled() and not _eager_only and not torch.compiler.is_compiling():
        row_kernels()  # read inside the stages as they compile: a bad value raises a plain ValueError here
        fn = _compiled(eager, None)
        at = None if rows is None else _position(eager, rows)
        return lambda *args: fn(*row_count_dynamic(args, at))
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


def with_skip(grads: tuple, dy: torch.Tensor, routing, block_index: int) -> tuple:
    """A compacted block's gradients ``(dx, ...)`` under the routing's inactive semantics: under skip the
    inactive rows' output gradient ``dy`` passes to the block input (:meth:`cggr.routing.Routing.block_input_grad`)."""
    return (routing.block_input_grad(grads[0], dy, block_index), *grads[1:])
