"""Triton kernels. Each has a plain PyTorch reference beside the code that calls it:

* ``scoring.py``   -- one-pass difficulty score; reference ``cggr.scoring.entropy_confidence_reference``
* ``bucketing.py`` -- O(n) rank-threshold buckets; reference ``cggr.bucketing.rank_buckets_reference``
* ``gate.py``      -- fused gradient row gate; reference ``cggr.gate.gate_rows_reference``
* ``rows.py``      -- rotary and SwiGLU backward on active rows (``CGGR_ROW_KERNELS=triton``); references
  ``cggr.compact.pointwise.rope_backward`` and ``swiglu_backward``

Triton is optional: without it (or off CUDA) the references run. Tests run
every kernel on the CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools

import torch

from ..env import triton_disabled


@functools.lru_cache(maxsize=None)
def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def triton_available() -> bool:
    """True when Triton kernels can run (installed, and not disabled by ``CGGR_DISABLE_TRITON=1``)."""
    if triton_disabled():
        return False
    return _import_triton()


def check_rows(grad: torch.Tensor, rows: int) -> None:
    """``grad`` must split into ``rows`` rows of equal length (and be empty when there is no row): the layout
    the row gate takes, checked by its kernel (``gate.py``) and its reference (``cggr.gate``) alike. Here, below
    both, so that the kernel never imports the module that dispatches to it."""
    fits = grad.numel() % rows == 0 if rows else grad.numel() == 0
    if not fits:
        raise ValueError(f"grad of shape {tuple(grad.shape)} does not split into {rows} rows (one per depth)")
