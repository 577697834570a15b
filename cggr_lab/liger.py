"""Liger-Kernel's patches on a model instance, as every benchmark's liger arm applies them (the speed, quality
and data-parallel benchmarks share this, so their liger arms are the same baseline)."""

from __future__ import annotations

import inspect
import sys
from typing import Callable

import torch

# Liger-Kernel's arguments, the same for every family it patches (its apply_liger_kernel_to_<family>): RoPE,
# RMSNorm, SwiGLU and the fused linear cross-entropy.
LIGER_OPTIONS = dict(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True, cross_entropy=False)


def _options_of(fn: Callable) -> dict:
    """:data:`LIGER_OPTIONS` as ``fn`` names them: Liger's Gemma patches call their gated MLP ``geglu``."""
    names = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in names.values()):
        return dict(LIGER_OPTIONS)
    options = {k: v for k, v in LIGER_OPTIONS.items() if k in names}
    if "geglu" in names:
        options["geglu"] = LIGER_OPTIONS["swiglu"]
    return options


def apply_liger(model: torch.nn.Module) -> Callable[[], None]:
    """Patch ``model`` with Liger-Kernel (its fused linear cross-entropy included); returns a function that
    undoes what Liger also changes for the whole process (the RoPE function and the norm and MLP classes of the
    family's modeling module), so that models built afterwards in the same process run without Liger.

    Raises ImportError without liger-kernel and LookupError when it has no patch for the model's family.
    """
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    family = model.config.model_type
    fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(family)
    if fn is None:
        raise LookupError(f"Liger-Kernel has no patch for model_type {family!r}")
    module = sys.modules[type(model).__module__]
    saved = dict(vars(module))
    fn(model=model, **_options_of(fn))

    def restore() -> None:
        for key in set(vars(module)) - set(saved):
            delattr(module, key)
        for key, value in saved.items():
            if vars(module).get(key) is not value:
                setattr(module, key, value)

    return restore
