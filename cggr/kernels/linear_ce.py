"""Cross-entropy, its logits gradient and the difficulty scores of one chunk of logits rows.

Called by :func:`cggr.loss.linear_cross_entropy` once per chunk of rows, on
logits ``h_c @ W^T (+ b)`` that only exist for that chunk. One program per row:

Pass 1 reads the row once with the online-softmax state of
:mod:`cggr.kernels.scoring` (running max ``m``, ``s = sum exp(x - m)``,
``t = sum exp(x - m) (x - m)``), plus the one entry at the row's label, and writes

    loss       = (m - x[label]) + log s      (0 for an ignored row)
    entropy    = log s - t / s
    confidence = 1 / s
    difficulty = entropy - confidence

Pass 2 (``COMPUTE_GRAD``) reads the row again and overwrites it in place with
the gradient of the loss w.r.t. the row, ``(softmax(x) - onehot(label)) * scale``,
where ``softmax(x) = exp((x - m) - log s)`` and ``scale`` is the row's share of the
reduction (``1 / n_valid`` for a mean, 1 for a sum, the incoming gradient for
``reduction="none"``); an ignored row gets exact zeros.

Reference: the per-chunk PyTorch code in :func:`cggr.loss._rows_torch` (same
quantities, same rules), and for the whole loss
:func:`cggr.loss.linear_cross_entropy_reference`.

Non-finite rows need no per-element test, as in the scoring kernel: a NaN or
``+inf`` entry makes ``s`` NaN, a row of ``-inf`` has ``m = -inf``; both give
NaN scores, a NaN loss (if the row is not ignored) and a NaN gradient row (as
``F.cross_entropy`` gives). ``-inf`` entries (a masked vocabulary) contribute
nothing and get a zero gradient. A label outside ``[0, V)`` that is not the
ignore index gives a NaN loss; the caller also refuses it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..env import triton_interpret
from ._rows import ROW_CONFIGS, online_softmax_row, prune_wide_blocks


@triton.jit
def _linear_ce_rows_kernel(
    x_ptr, labels_ptr, scale_ptr,
    loss_ptr, diff_ptr, ent_ptr, conf_ptr,
    V, stride_row, scale_stride, ignore_index,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)

    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)
    safe_label = tl.where(in_range, label, 0)
    x_label = tl.load(base + safe_label).to(tl.float32)

    # Pass 1: online softmax (the rescaling algebra is in cggr/kernels/_rows.py).
    m, s, t = online_softmax_row(base, V, BLOCK_V)

    # Shifted by m before adding log s (as log_softmax does): x - m is exact, x - (m + log s) is not for large m.
    # A row of -inf has m = -inf and a row with NaN / +inf has s = NaN: x - m, and so the loss, are NaN.
    log_s = tl.log(s)
    ent = log_s - t / s
    conf = 1.0 / s
    bad = (s != s) | (m == float("-inf"))
    nan = float("nan")
    ent = tl.where(bad, nan, ent)
    conf = tl.where(bad, nan, conf)
    loss = tl.where(in_range, (m - x_label) + log_s, nan)
    loss = tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(diff_ptr + row, ent - conf)
    tl.store(ent_ptr + row, ent)
    tl.store(conf_ptr + row, conf)

    if COMPUTE_GRAD:
        # Pass 2: softmax - onehot, scaled, written over the logits (the row is hot in L2).
        g_scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            msk = idx < V
            x = tl.load(base + idx, mask=msk, other=float("-inf")).to(tl.float32)
            p = tl.exp((x - m) - log_s)
            g = tl.where(idx == label, p - 1.0, p) * g_scale
            g = tl.where(valid, g, 0.0)
            tl.store(base + idx, g.to(x_ptr.dtype.element_ty), mask=msk)


_linear_ce_rows_autotuned = triton.autotune(
    configs=ROW_CONFIGS,
    key=["V", "COMPUTE_GRAD"],
    prune_configs_by={"early_config_prune": prune_wide_blocks},
    # Autotuning runs the kernel several times; pass 2 overwrites the logits, so
    # each trial must start from the same row contents.
    restore_value=["x_ptr"],
)(_linear_ce_rows_kernel)


@torch.no_grad()
def linear_ce_rows_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    compute_grad: bool,
    loss: torch.Tensor,
    difficulty: torch.Tensor,
    entropy: torch.Tensor,
    confidence: torch.Tensor,
    block_v: int | None = None,
) -> None:
    """Per-row loss and scores of ``logits`` and, with ``compute_grad``, its gradient in place.

    The caller (:func:`cggr.loss.linear_cross_entropy`) validates everything;
    this module imports nothing of cggr's loss.

    Args:
        logits: ``[n, V]`` fp32 / fp16 / bf16 with contiguous rows; overwritten
            with the gradient when ``compute_grad``.
        labels: ``[n]`` integer labels.
        scale: fp32, either one element (every row's gradient scale) or ``[n]``
            (one per row).
        ignore_index: label of rows that take no part in the loss.
        compute_grad: run pass 2.
        loss, difficulty, entropy, confidence: ``[n]`` fp32 outputs (contiguous).
        block_v: force a chunk width (tests use it to exercise the rescaling).
    """
    n, V = logits.shape
    if n == 0:
        return
    if logits.stride(-1) != 1:
        raise ValueError("logits rows must be contiguous")
    stride_row = logits.stride(0) if n > 1 else V
    scale_stride = 0 if scale.numel() == 1 else 1
    grid = (n,)
    args = (logits, labels, scale, loss, difficulty, entropy, confidence, V, stride_row, scale_stride, ignore_index)
    if block_v is None and triton_interpret():
        # The interpreter runs one config; wide blocks mean few (slow) Python-level steps.
        block_v = min(triton.next_power_of_2(V), 4096)
    if block_v is not None:
        _linear_ce_rows_kernel[grid](*args, COMPUTE_GRAD=compute_grad, BLOCK_V=block_v)
    else:
        _linear_ce_rows_autotuned[grid](*args, COMPUTE_GRAD=compute_grad)
