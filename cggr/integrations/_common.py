"""What the training-framework callbacks share (no framework imports here)."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..config import OPTION_NAMES, RoutingConfig, resolve_config

METRIC_PREFIX = "cggr/"

# Wrappers whose ``.module`` is the model whose forward returns the logits. PEFT models are not
# unwrapped: they return logits themselves.
_PARALLEL_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "_FabricModule")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / DeepSpeed / Fabric wrappers: cggr attaches to the model itself."""
    while type(model).__name__ in _PARALLEL_WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def check_flags(owner: str, **flags: Any) -> None:
    """A callback's own switches are True or False: a number or a string is refused, never taken by its truth."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")


class CallbackOptions:
    """A callback's cggr options: a :class:`~cggr.RoutingConfig` and/or its fields by name, as :func:`cggr.attach`
    takes them. Checked when the callback is built (unknown names, bad values), resolved at train begin, when
    the trainer knows the length of training that ``handback_steps`` needs."""

    def __init__(self, owner: str, config: RoutingConfig | None, overrides: dict[str, Any]):
        self.owner, self.config, self.overrides = owner, config, dict(overrides)
        base = resolve_config(config, {}, owner)
        handback = self.overrides.get("handback_steps", base.handback_steps)
        self.wants_length = bool(handback) and self.overrides.get("total_steps", base.total_steps) is None
        # Every check now; the trainer's length stands in for total_steps until it is known.
        self.checked = resolve_config(config, {**overrides, "total_steps": handback} if self.wants_length
                                      else overrides, owner)

    @property
    def by_name(self) -> dict[str, Any]:
        """Every option by name, as checked (``total_steps`` as given: the trainer may fill it in later)."""
        return {f: (self.overrides.get(f) if f == "total_steps" else getattr(self.checked, f)) for f in OPTION_NAMES}

    def resolve(self, total_steps: int | None) -> RoutingConfig:
        """The config to attach with; ``total_steps``: the trainer's length of training, in optimizer steps."""
        overrides = dict(self.overrides)
        if self.wants_length:
            if total_steps is None or total_steps < 1:
                raise ValueError(f"{self.owner}: handback_steps needs the length of training; the trainer does not "
                                 f"know it (got {total_steps!r}): pass total_steps=")
            overrides["total_steps"] = int(total_steps)
        return resolve_config(self.config, overrides, self.owner)
