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
    checked = {k: v for k, v in attach_kwargs.items() if k in fields}
    if checked.get("handback_steps") and checked.get("total_steps") is None:
        checked["total_steps"] = checked["handback_steps"]  # the trainer's length fills it in at train begin
    RoutingConfig(num_buckets=num_buckets, warmup_steps=warmup_steps, leak_rate=leak_rate, **checked)
    return dict(num_buckets=num_buckets, warmup_steps=warmup_steps, leak_rate=leak_rate, **attach_kwargs)


def with_total_steps(owner: str, attach_kwargs: dict[str, Any], total_steps: int | None) -> dict[str, Any]:
    """``attach_kwargs`` with ``total_steps`` taken from the trainer when ``handback_steps`` needs it."""
    if not attach_kwargs.get("handback_steps") or attach_kwargs.get("total_steps") is not None:
        return attach_kwargs
    if total_steps is None or total_steps < 1:
        raise ValueError(f"{owner}: handback_steps needs the length of training; the trainer does not know it "
                         f"(got {total_steps!r}): pass total_steps=")
    return {**attach_kwargs, "total_steps": int(total_steps)}
