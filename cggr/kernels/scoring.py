"""One-pass difficulty score: ``entropy - confidence`` of ``softmax(logits)`` per row.

Reference: :func:`cggr.scoring.entropy_confidence_reference` (same quantities,
same NaN rules). The kernel reads each row of logits exactly once, keeping an
"online softmax" state per row in fp32:

    m  running maximum
    s  sum exp(x - m)
    t  sum exp(x - m) * (x - m)

and, when a chunk raises the maximum from ``m`` to ``m'``, rescales the state:
``s' = s e^(m-m')`` and ``t' = e^(m-m') (t + s (m - m'))``. At the end
``entropy = log s - t / s`` and ``confidence = 1 / s``.

Non-finite inputs need no per-element test: a NaN or ``+inf`` entry makes
``exp(x - m)`` NaN (``inf - inf``), so ``s`` ends NaN; a row whose maximum is
``-inf`` has no finite entry. Both give NaN outputs, as in the reference.
``-inf`` entries (masked vocabulary) give ``exp(-inf) = 0``; their ``x - m``
is clamped to a finite value before the product, since ``0 * -inf`` is NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..env import triton_interpret
from ._rows import ROW_CONFIGS, online_softmax_row, prune_wide_blocks


@triton.jit
def _entropy_confidence_kernel(
    x_ptr, diff_ptr, ent_ptr, conf_ptr,
    V, stride_row,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    m, s, t = online_softmax_row(base, V, BLOCK_V)

    ent = tl.log(s) - t / s
    conf = 1.0 / s
    bad = (s != s) | (m == float("-inf"))
    nan = float("nan")
    ent = tl.where(bad, nan, ent)
    conf = tl.where(bad, nan, conf)
    tl.store(diff_ptr + row, ent - conf)
    tl.store(ent_ptr + row, ent)
    tl.store(conf_ptr + row, conf)


_entropy_confidence_autotuned = triton.autotune(
    configs=ROW_CONFIGS, key=["V"], prune_configs_by={"early_config_prune": prune_wide_blocks},
)(_entropy_confidence_kernel)


def _interpreting() -> bool:
    return triton_interpret()


@torch.no_grad()
def entropy_confidence_triton(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cggr.scoring.entropy_confidence_reference` in one read of ``logits``.

    The caller (:func:`cggr.scoring.score_difficulty`) validates ``logits``; this module imports nothing
    of cggr's scoring, which wraps the result in :class:`cggr.scoring.Scores`.

    Args:
        logits: ``[..., V]`` float tensor (fp32, fp16 or bf16; fp64 is read
            as fp32, as the reference does). The last dimension must be
            contiguous (it is copied otherwise); the leading ones may be strided.
    Returns:
        ``(difficulty, entropy, confidence)``, fp32 tensors shaped ``logits.shape[:-1]``.
    """
    return _entropy_confidence(logits)


def _entropy_confidence(logits: torch.Tensor, block_v: int | None = None):
    """The launcher; ``block_v`` forces a chunk width (tests use it to exercise rescaling)."""
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    lead = logits.shape[:-1]
    V = logits.shape[-1]
    if logits.dtype == torch.float64:
        logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    x = logits.reshape(-1, V)  # a view whenever the leading dims allow it
    rows = x.shape[0]
    out = torch.empty((3, rows), dtype=torch.float32, device=logits.device)
    if rows > 0:
        stride_row = x.stride(0) if rows > 1 else V
        grid = (rows,)
        if block_v is None and _interpreting():
            # The interpreter runs one config; wide blocks mean few (slow) Python-level steps.
            block_v = min(triton.next_power_of_2(V), 4096)
        if block_v is not None:
            _entropy_confidence_kernel[grid](x, out[0], out[1], out[2], V, stride_row, BLOCK_V=block_v)
        else:
            _entropy_confidence_autotuned[grid](x, out[0], out[1], out[2], V, stride_row)
    d, ent, conf = (o.reshape(lead) for o in out)
    return d, ent, conf
