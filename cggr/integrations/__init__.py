"""Integrations of cggr with training frameworks.

``from cggr.integrations import CGGRCallback`` gives the Hugging Face
``Trainer`` callback (:mod:`cggr.integrations.hf`);
``from cggr.integrations import CGGRLightningCallback`` the PyTorch Lightning
callback (:mod:`cggr.integrations.lightning`). Each integration imports
its framework only when it is first used, so ``import cggr`` (and
``import cggr.integrations``) never needs transformers.
"""

from __future__ import annotations

import importlib

# public name -> submodule that defines it
_LAZY = {"CGGRCallback": "hf", "CGGR_STATE_NAME": "hf", "CGGRLightningCallback": "lightning"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    sub = _LAZY.get(name)
    if sub is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{sub}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
