"""What the training-framework callbacks share (no framework imports here)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch.nn as nn

from ..config import RoutingConfig
from ..router import attach

METRIC_PREFIX = "cggr/"

# Wrappers whose ``.module`` is the model whose forward returns the logits. PEFT models are not
# unwrapped: they return logits themselves.
_PARALLEL_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "_FabricModule")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / DeepSpeed / Fabric wrappers: cggr attaches to the model itself."""
    while type(model).__name__ in _PARALLEL_WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def checked_attach_options(owner: str, num_buckets: int, warmup_steps: int, leak_rate: float,
                           attach_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options of :func:`cggr.attach`, checked now (unknown names, bad values) rather than at train time."""
    try:
        inspect.signature(attach).bind(None, num_buckets, warmup_steps, leak_rate, **attach_kwargs)
    except TypeError as e:
        raise TypeError(f"{owner}: {e} (it takes the options of cggr.attach)") from None
    fields = {f.name for f in dataclasses.fields(RoutingConfig)}
    RoutingConfig(num_buckets=num_buckets, warmup_steps=warmup_steps, leak_rate=leak_rate,
                  **{k: v for k, v in attach_kwargs.items() if k in fields})
    return dict(num_buckets=num_buckets, warmup_steps=warmup_steps, leak_rate=leak_rate, **attach_kwargs)
