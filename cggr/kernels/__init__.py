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
