"""Every environment variable cggr reads, in one place (the README's "Environment variables" lists them).

Read at call time, not import time, so that tests and scripts can set them after ``import cggr``.
"""

from __future__ import annotations

import os
from pathlib import Path


def triton_disabled() -> bool:
    """``CGGR_DISABLE_TRITON=1``: never use cggr's Triton kernels (the PyTorch references run instead)."""
    return os.environ.get("CGGR_DISABLE_TRITON", "0") == "1"


def triton_interpret() -> bool:
    """``TRITON_INTERPRET=1`` (Triton's own variable): kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def compile_enabled() -> bool:
    """``CGGR_COMPILE=0``: the compacted backward's stages run eagerly on CUDA instead of under torch.compile."""
    return os.environ.get("CGGR_COMPILE", "1") != "0"


def cuda_graphs_enabled() -> bool:
    """``CGGR_CUDA_GRAPHS=1``: the compacted backward's compiled stages replay CUDA graphs, one per block and row
    count, their inputs copied in (:mod:`cggr.compact.graphs`). Read at every stage call."""
    value = os.environ.get("CGGR_CUDA_GRAPHS", "0")
    if value not in ("0", "1"):
        raise ValueError(f"CGGR_CUDA_GRAPHS={value!r}: allowed values are 0, 1")
    return value == "1"


ROW_KERNELS = ("inductor", "triton")
# The default since the H200 A/B at rev 6e87199 (runs/rows-h200-6e87199.json, the speed records' row_kernels):
# the whole 1B routed step 4 % faster. Since the stages compile with static model sizes (rev d3d1b73,
# benchmarks/results/rows-nvidia-h200.json) Inductor's own pieces have caught up: the Triton rotary backward is
# 1.8-6x faster at 1B but slower at 350M with 59 % of the rows, the SwiGLU backward 1.04-1.09x at 350M, 0.86x
# at 1B. The whole step has not been timed with CGGR_ROW_KERNELS=inductor at that revision.
DEFAULT_ROW_KERNELS = "triton"


def row_kernels() -> str:
    """``CGGR_ROW_KERNELS``: what computes the rotary and SwiGLU backward inside the compacted Llama backward's
    stages on CUDA: ``triton`` (the default: cggr's hand-written kernels, :mod:`cggr.kernels.rows`, called as
    Triton ops; where Triton or the dtypes are missing, the PyTorch pieces) or ``inductor`` (Inductor compiles the
    plain PyTorch pieces with the rest of the stage). Off CUDA the PyTorch pieces run either way. The compiled
    stages read it when they compile (once per process). Any other value raises ValueError."""
    value = os.environ.get("CGGR_ROW_KERNELS") or DEFAULT_ROW_KERNELS
    if value not in ROW_KERNELS:
        raise ValueError(f"CGGR_ROW_KERNELS={value!r}: allowed values are {', '.join(ROW_KERNELS)}")
    return value


def cache_dir() -> Path:
    """``CGGR_CACHE``: where tokenizers and tokenized corpora are cached (default ``~/.cache/cggr``)."""
    return Path(os.environ.get("CGGR_CACHE") or Path.home() / ".cache" / "cggr")


def git_rev_override() -> str | None:
    """``CGGR_GIT_REV``: the revision results files record (a copied tree's .git may be stale or absent)."""
    return os.environ.get("CGGR_GIT_REV") or None
