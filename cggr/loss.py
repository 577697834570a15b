"""Fused linear cross-entropy that also returns the difficulty scores (docs/design.md §1.3).

Fused linear-cross-entropy losses (Liger-Kernel's, Cut Cross-Entropy) never
materialise the ``[tokens, vocab]`` logits, so there is nothing left for
:func:`cggr.scoring.score_difficulty` to read. :func:`linear_cross_entropy`
computes the loss of ``hidden @ weight.T (+ bias)`` chunk by chunk of rows and,
from the same read of each chunk's logits, every token's
``Scores(difficulty, entropy, confidence)``.

Routing by those scores: the loss is a plain function and hands nothing to
anyone. A routed model's forward that computes it returns its scores with the
loss (``return linear_cross_entropy(...)``, a :class:`LossWithScores`, or any
output with ``.scores`` / ``["scores"]`` beside the loss), and the router reads
them from the forward's output where it would read the logits
(:func:`cggr.tokens.find_scores`). With ``fused_loss=True`` the forward cggr
installs in an HF causal LM hands them to its router itself
(:class:`cggr.hf_loss.FusedLossForward`).

How (per chunk of ``chunk_rows`` rows):

1. ``logits_c = h_c @ W^T (+ b)`` in the input dtype (the only logits that exist);
2. one pass over each row (online softmax, as :mod:`cggr.kernels.scoring`)
   gives the row's loss and scores; a second pass overwrites the row with the
   gradient of the loss w.r.t. it, ``(softmax - onehot(label)) * scale``;
3. ``grad_h_c = grad_logits_c @ W``, ``grad_W += grad_logits_c^T @ h_c``,
   ``grad_b += grad_logits_c.sum(0)``.

Step 2 is one Triton kernel per chunk on CUDA (:mod:`cggr.kernels.linear_ce`)
and the same computation in PyTorch elsewhere (:func:`_rows_torch`). For
``reduction="mean"`` / ``"sum"`` the gradients are computed in the forward,
as Liger does, and the backward only multiplies them by the incoming scalar
gradient; for ``reduction="none"`` the incoming gradient differs per token, so
the backward recomputes each chunk's logits and runs step 2 with it as the
per-row scale (one more ``h @ W^T``, no ``[N, V]`` storage either way).

Memory beyond the inputs: one ``[chunk_rows, V]`` logits buffer in the input
dtype, and while gradients are needed ``grad_hidden`` (``[N, D]``, input dtype)
plus fp32 accumulators for ``grad_weight`` (``[V, D]``) and ``grad_bias``,
held from the forward until the backward (mean/sum).

The slow, obviously-correct version is :func:`linear_cross_entropy_reference`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .scoring import Scores, entropy_confidence_reference, loss_gradient_norm

REDUCTIONS = ("mean", "sum", "none")


class LossWithScores(NamedTuple):
    """What :func:`linear_cross_entropy` returns.

    Attributes:
        loss: fp32; a scalar for ``reduction="mean"``/``"sum"``, else shaped like
            ``labels`` (0 at ignored tokens). Differentiable w.r.t. ``hidden``,
            ``weight`` and ``bias``.
        scores: :class:`cggr.scoring.Scores`, fp32 tensors shaped like
            ``labels``, detached, for every position (ignored labels included),
            scored from that position's logits; NaN where the logits row is not
            finite (the rules of :func:`cggr.scoring.entropy_confidence_reference`).
    """

    loss: torch.Tensor
    scores: Scores


# --------------------------------------------------------------------------- arguments


def _shape_of(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _validate(hidden, weight, labels, bias, ignore_index, reduction, shift_labels, chunk_rows,
              num_items=None) -> None:
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError("hidden must be a floating-point tensor [..., D], got "
                        + (f"dtype {hidden.dtype}" if isinstance(hidden, torch.Tensor) else type(hidden).__name__))
    if hidden.dim() < 1:
        raise ValueError("hidden must have a last (hidden-size) dimension, got a 0-d tensor")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be the LM head's 2-D weight [V, D], got {_shape_of(weight)}")
    V, D = weight.shape
    if V < 1:
        raise ValueError("weight must have at least one row (vocabulary entry), got shape (0, D)")
    if hidden.shape[-1] != D:
        raise ValueError(f"hidden's last dimension ({hidden.shape[-1]}) must equal weight.shape[1] ({D})")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight's dtype ({weight.dtype}) must equal hidden's ({hidden.dtype}); cast one, or run "
                        f"under torch.autocast (which casts both to its dtype, as F.linear does)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (V,):
            raise ValueError(f"bias must be None or a tensor of shape ({V},), got {_shape_of(bias)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias's dtype ({bias.dtype}) must equal hidden's ({hidden.dtype})")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor (class indices), got "
                        + (f"dtype {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__))
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have hidden's shape without its last dimension, {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    devices = {t.device for t in (hidden, weight, labels) + ((bias,) if bias is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight, labels and bias must be on one device, got {sorted(map(str, devices))}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(shift_labels, bool):
        raise TypeError(f"shift_labels must be True or False, got {shift_labels!r}")
    if shift_labels and labels.dim() < 1:
        raise ValueError("shift_labels=True needs a sequence dimension: labels must be at least 1-D "
                         "(hidden [..., T, D], labels [..., T])")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or a positive int, got {chunk_rows!r}")
    if num_items is not None:
        if reduction != "sum":
            raise ValueError(f"num_items divides the summed loss: it needs reduction='sum', got {reduction!r}")
        ok = (num_items.numel() == 1 and not num_items.is_complex() if isinstance(num_items, torch.Tensor)
              else isinstance(num_items, (int, float)) and not isinstance(num_items, bool) and num_items > 0)
        if not ok:
            raise ValueError(f"num_items must be None, a positive number or a one-element tensor, got {num_items!r}")


def _autocast(hidden, weight, bias):
    """``(hidden, weight, bias)`` in the dtype ``F.linear`` would compute in: under ``torch.autocast`` for
    hidden's device, its floating tensors other than fp64 cast to the autocast dtype (as autocast casts them);
    else as they are. Non-tensors pass through for :func:`_validate` to refuse."""
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dt = torch.get_autocast_dtype(hidden.device.type)

    def cast(t):
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dt) if eligible else t

    return cast(hidden), cast(weight), cast(bias)


def _shift(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """HF causal-LM convention: position t is scored against ``labels[..., t + 1]``; the last gets ``ignore_index``."""
    pad = labels.new_full(labels.shape[:-1] + (1,), ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def _check_label_range(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """Refuse labels outside ``[0, V)`` that are not ``ignore_index`` (F.cross_entropy refuses them too).

    On the CPU a clear error; on CUDA an asynchronous device assert (no host
    sync; like F.cross_entropy's own, it ends the CUDA context), and the kernel
    writes a NaN loss for such a row in any case.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if labels.is_cuda:
        torch._assert_async(~bad.any())
    elif bool(bad.any()):
        raise ValueError(f"labels must be in [0, {V}) or equal ignore_index ({ignore_index}); "
                         f"found {int(labels[bad][0])}")


def _default_chunk_rows(n: int, V: int, D: int) -> int:
    """About as many chunk-logits elements as ``hidden`` has (at most twice), in a power of two of rows."""
    per_row = -(-V // D)  # each logits row is this many hidden rows
    rows = max(1, -(-n // per_row))
    return 1 << (rows - 1).bit_length()


# --------------------------------------------------------------------------- reference


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "mean",
    shift_labels: bool = False,
    num_items: torch.Tensor | float | None = None,
    grad_norm: bool = False,
) -> LossWithScores:
    """What :func:`linear_cross_entropy` computes, the slow and obvious way.

    The logits are materialised as a model would compute them,
    ``F.linear(hidden, weight, bias)`` in the input dtype (autocast applies),
    then upcast to fp32 for ``F.cross_entropy`` and
    :func:`cggr.scoring.entropy_confidence_reference`, as Hugging Face's
    causal-LM loss upcasts them. Differentiable through autograd.

    One difference from the fused path: an ignored row whose logits are not
    finite gets a NaN gradient here (``F.cross_entropy``'s ``log_softmax``
    backward multiplies 0 by NaN) and exact zeros there (the loss does not
    depend on the row).
    """
    cast_h, cast_w, cast_b = _autocast(hidden, weight, bias)  # what F.linear below computes in
    _validate(cast_h, cast_w, labels, cast_b, ignore_index, reduction, shift_labels, None, num_items)
    _check_label_range(labels, weight.shape[0], ignore_index)
    if shift_labels:
        labels = _shift(labels, ignore_index)
    logits = F.linear(hidden, weight, bias)
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1).long(),
                           ignore_index=ignore_index, reduction=reduction)
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    if num_items is not None:  # as Hugging Face's ForCausalLMLoss divides the sum
        loss = loss / (num_items.to(loss.device) if isinstance(num_items, torch.Tensor) else num_items)
    scores = entropy_confidence_reference(logits.detach())
    if grad_norm:  # the gradient of the per-token loss at the logits, by autograd: the definition
        z = logits.detach().float().requires_grad_(True)
        per_token = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1).long(), ignore_index=ignore_index,
                                    reduction="sum")
        (dz,) = torch.autograd.grad(per_token, z)
        norms = torch.linalg.vector_norm(dz, dim=-1)
        scores = scores.with_grad_norm(torch.where(labels != ignore_index, norms, float("nan")))
    return LossWithScores(loss, scores)


# --------------------------------------------------------------------------- per-chunk rows


@torch.no_grad()
def _rows_torch(logits, labels, scale, ignore_index, compute_grad, loss, difficulty, entropy, confidence) -> None:
    """PyTorch twin of :func:`cggr.kernels.linear_ce.linear_ce_rows_triton` (same arguments, same results)."""
    V = logits.shape[-1]
    x = logits.float()
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < V)
    sc = entropy_confidence_reference(logits)
    difficulty.copy_(sc.difficulty)
    entropy.copy_(sc.entropy)
    confidence.copy_(sc.confidence)
    # log_softmax = (x - m) - log sum exp(x - m), m not made finite: a row of -inf,
    # or with NaN / +inf, gives NaN (x - m or the sum), so a NaN loss and gradient, as the kernel does.
    m = x.amax(-1, keepdim=True)
    z = x - m
    logp = z - torch.log(torch.exp(z).sum(-1, keepdim=True))
    safe = torch.where(in_range, labels, torch.zeros_like(labels)).unsqueeze(-1)
    row_loss = -logp.gather(-1, safe).squeeze(-1)
    row_loss = torch.where(in_range, row_loss, torch.full_like(row_loss, float("nan")))
    loss.copy_(torch.where(valid, row_loss, torch.zeros_like(row_loss)))
    if compute_grad:
        g = torch.exp(logp)
        g.scatter_add_(-1, safe, torch.where(in_range, -1.0, 0.0).to(g.dtype).unsqueeze(-1))
        g = g * scale.float().reshape(-1, 1)
        g = torch.where(valid.unsqueeze(-1), g, torch.zeros_like(g))
        logits.copy_(g)


def _use_triton(t: torch.Tensor) -> bool:
    if not t.is_cuda:
        return False
    from .kernels import triton_available

    return triton_available()


def _rows_op(use_triton: bool):
    if use_triton:
        from .kernels.linear_ce import linear_ce_rows_triton

        return linear_ce_rows_triton
    return _rows_torch


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` with ``acc`` fp32 and ``a``, ``b`` possibly half precision (returns the new ``acc``)."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if acc.is_cuda:
        try:  # cuBLAS accumulates into fp32 directly (torch >= 2.8): no half-precision partial sum
            return torch.addmm(acc, a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return acc.add_(a @ b)


def _chunked(hidden, weight, bias, labels, ignore_index, chunk_rows, use_triton, scale, compute_grad, needs,
             loss, scores, grad_norm=None):
    """Steps 1-3 of the module docstring over all rows; returns ``(grad_hidden, grad_weight, grad_bias)``.

    ``hidden`` is ``[N, D]``, ``labels`` ``[N]`` int64, ``scale`` fp32 of one
    element or ``[N]``; ``loss`` ``[N]`` and ``scores`` ``[3, N]`` fp32 are
    filled, and ``grad_norm`` ``[N]`` fp32 when given (each row's ``||softmax - onehot||``: from the gradient the
    chunk holds after step 2, or from its logits when no gradient is computed). The gradients are None unless
    ``compute_grad`` and the matching entry of ``needs``.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    row_op = _rows_op(use_triton)
    need_h, need_w, need_b = needs if compute_grad else (False, False, False)
    f32 = torch.float32
    grad_h = torch.empty((N, D), dtype=hidden.dtype, device=hidden.device) if need_h else None
    grad_w = torch.zeros((V, D), dtype=f32, device=weight.device) if need_w else None
    grad_b = torch.zeros((V,), dtype=f32, device=weight.device) if need_b else None
    per_row_scale = scale.numel() != 1
    if N > 0:
        buf = torch.empty((min(chunk_rows, N), V), dtype=hidden.dtype, device=hidden.device)
        w_t = weight.t()
        for start in range(0, N, chunk_rows):
            end = min(start + chunk_rows, N)
            h = hidden[start:end]
            logits = buf[: end - start]
            if bias is None:
                torch.mm(h, w_t, out=logits)
            else:
                torch.addmm(bias, h, w_t, out=logits)
            if grad_norm is not None and not compute_grad:
                grad_norm[start:end] = loss_gradient_norm(logits, labels[start:end], ignore_index)
            row_op(logits, labels[start:end], scale[start:end] if per_row_scale else scale, ignore_index,
                   compute_grad, loss[start:end], scores[0, start:end], scores[1, start:end], scores[2, start:end])
            if grad_norm is not None and compute_grad:  # the row holds (softmax - onehot) * scale now
                norms = torch.linalg.vector_norm(logits, dim=-1, dtype=f32) / scale.reshape(-1)
                valid = labels[start:end] != ignore_index
                grad_norm[start:end] = torch.where(valid, norms, float("nan"))
            if compute_grad:  # logits now holds d loss / d logits
                if need_h:
                    torch.mm(logits, weight, out=grad_h[start:end])
                if need_w:
                    grad_w = _addmm_fp32(grad_w, logits.t(), h)
                if need_b:
                    grad_b += logits.sum(0, dtype=f32)
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, chunk_rows, use_triton, needs,
                num_items, with_grad_norm):
        N = hidden.shape[0]
        dev = hidden.device
        loss_rows = torch.empty((N,), dtype=torch.float32, device=dev)
        scores = torch.empty((4 if with_grad_norm else 3, N), dtype=torch.float32, device=dev)
        n_valid = (labels != ignore_index).sum()
        grad_now = reduction != "none" and any(needs)
        if reduction == "mean":
            scale = n_valid.to(torch.float32).reciprocal().reshape(1)  # inf with no valid row: every row is then zeroed
        elif num_items is not None:
            # 1 / num_items goes into the fp32 gradient here: an incoming gradient of 1 / num_items would be
            # rounded to the saved gradients' dtype in the backward (up to 0.4 % off in bf16, for every element).
            divisor = torch.as_tensor(num_items, device=dev).to(torch.float32).reshape(1)
            scale = divisor.reciprocal()
        else:
            scale = torch.ones((1,), dtype=torch.float32, device=dev)
        with torch.autocast(dev.type, enabled=False):
            grads = _chunked(hidden, weight, bias, labels, ignore_index, chunk_rows, use_triton, scale, grad_now,
                             needs, loss_rows, scores[:3], scores[3] if with_grad_norm else None)
        if reduction == "mean":
            loss = loss_rows.sum() / n_valid  # NaN with no valid token, as F.cross_entropy
        elif reduction == "sum":
            loss = loss_rows.sum()
            if num_items is not None:
                loss = loss / divisor.reshape(())
        else:
            loss = loss_rows
        ctx.reduction = reduction
        ctx.args = (ignore_index, chunk_rows, use_triton)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, labels)
        else:
            ctx.save_for_backward(*grads)
        per_token = scores.unbind(0)
        ctx.mark_non_differentiable(*per_token)
        return (loss, *per_token)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *unused):
        if ctx.reduction != "none":
            # d loss / d inputs were computed in the forward for an incoming gradient of 1.
            g = grad_loss.reshape(())
            grads = tuple(None if t is None else t * g.to(t.dtype) for t in ctx.saved_tensors)
        else:
            hidden, weight, bias, labels = ctx.saved_tensors
            ignore_index, chunk_rows, use_triton = ctx.args
            N = hidden.shape[0]
            scratch_loss = torch.empty((N,), dtype=torch.float32, device=hidden.device)
            scratch_scores = torch.empty((3, N), dtype=torch.float32, device=hidden.device)
            with torch.autocast(hidden.device.type, enabled=False):
                grads = _chunked(hidden, weight, bias, labels, ignore_index, chunk_rows, use_triton,
                                 grad_loss.float().contiguous(), True, ctx.needs_input_grad[:3],
                                 scratch_loss, scratch_scores)
        return (*grads, None, None, None, None, None, None, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "mean",
    shift_labels: bool = False,
    chunk_rows: int | None = None,
    num_items: torch.Tensor | float | None = None,
    grad_norm: bool = False,
) -> LossWithScores:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` and every token's difficulty scores, without ``[N, V]`` logits.

    Equal (to rounding) to :func:`linear_cross_entropy_reference`, i.e. to
    ``F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, -2), labels.flatten(), ...)``
    plus :func:`cggr.scoring.score_difficulty` of those logits.

    Args:
        hidden: ``[..., D]`` final hidden states (fp32, fp16 or bf16).
        weight: ``[V, D]`` LM-head weight, same dtype as ``hidden`` (under
            ``torch.autocast`` both are cast to the autocast dtype, as ``F.linear`` would).
        labels: integer tensor shaped ``hidden.shape[:-1]``.
        bias: optional ``[V]`` head bias.
        ignore_index: label of tokens that take no part in the loss (they are still scored).
        reduction: ``"mean"`` over tokens whose label is not ``ignore_index``
            (NaN when there is none, as ``F.cross_entropy``; the gradients are
            then zero), ``"sum"`` (0 when there is none), or ``"none"`` (per
            token, shaped like ``labels``, 0 at ignored tokens). For Hugging
            Face's ``num_items_in_batch`` (gradient accumulation), take the
            ``"sum"`` with ``num_items``.
        shift_labels: label convention. ``False`` (default): the logits at
            position t are scored against ``labels[..., t]`` (already-shifted
            labels, as ``F.cross_entropy`` and Liger take them). ``True``: Hugging
            Face causal-LM convention, the logits at t predict
            ``labels[..., t + 1]`` along the last label dimension, and the last
            position is ignored; pass the model's (unshifted) ``labels``. Scores
            always belong to the logits position t, as ``score_difficulty(logits)`` would give.
        chunk_rows: rows of logits materialised at a time (default: about as
            many logits elements as ``hidden`` holds, rounded up to a power of two of rows).
        num_items: ``reduction="sum"`` only: the sum divided by this count (a
            number or a one-element tensor; HF's ``num_items_in_batch``). Unlike
            dividing the returned loss, the division is folded into the fp32
            gradient the forward computes, so a half-precision backward does not
            scale every gradient by a rounded copy of ``1 / num_items``.
        grad_norm: also return each token's ``||softmax(z) - onehot(y)||`` in ``scores.grad_norm`` (NaN at ignored
            labels): the importance of ``importance="loss"`` routing, at one more read of each chunk's logits.

    Returns:
        :class:`LossWithScores` ``(loss, scores)``; see there. The loss is fp32. Inside a routed model's
        forward, return it (or its ``scores`` beside the loss) from the forward: the router then routes by
        these scores as it would by the logits (the module docstring says how).

    Notes:
        Labels outside ``[0, V)`` other than ``ignore_index`` raise on the CPU
        and trigger a device-side assert on CUDA (no host sync). An ignored
        token whose logits are not finite gets a zero gradient (``F.cross_entropy``
        gives NaN there). Not twice differentiable.
    """
    hidden, weight, bias = _autocast(hidden, weight, bias)  # what F.linear would compute in
    _validate(hidden, weight, labels, bias, ignore_index, reduction, shift_labels, chunk_rows, num_items)
    V, D = weight.shape
    _check_label_range(labels, V, ignore_index)
    if shift_labels:
        labels = _shift(labels, ignore_index)
    lead = labels.shape
    h2 = hidden.reshape(-1, D)
    y = labels.reshape(-1).long().contiguous()
    N = h2.shape[0]
    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    needs = tuple(bool(n and torch.is_grad_enabled()) for n in needs)
    rows = chunk_rows if chunk_rows is not None else _default_chunk_rows(N, V, D)
    if not isinstance(grad_norm, bool):
        raise TypeError(f"grad_norm must be True or False, got {grad_norm!r}")
    loss, *per_token = _LinearCrossEntropy.apply(h2, weight, bias, y, ignore_index, reduction, rows,
                                                 _use_triton(h2), needs, num_items, grad_norm)
    if reduction == "none":
        loss = loss.reshape(lead)
    scores = Scores(*(t.reshape(lead) for t in per_token[:3]))
    if grad_norm:
        scores = scores.with_grad_norm(per_token[3].reshape(lead))
    return LossWithScores(loss, scores)
