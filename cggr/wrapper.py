"""``CGGRWrapper``: the one-line ``nn.Module`` around the in-place router.

``model = CGGRWrapper(model)`` returns exactly what the wrapped model returns;
attributes the wrapper does not define (``config``, ``generate``,
``save_pretrained``, ...) reach the wrapped model. ``unwrap()`` removes every
hook and gives the original module back.
"""

from __future__ import annotations


from typing import Any

import torch.nn as nn

from .config import RoutingConfig, resolve_config
from .router import Router, attach
from .routing import Routing


class CGGRWrapper(nn.Module):
    """Wrap ``model`` so that its backward pass is routed by token difficulty.

    Arguments are those of :func:`cggr.attach`: a :class:`cggr.RoutingConfig` and/or its fields by name.
    The curriculum step lives in the
    router's registered buffer, so ``state_dict()`` / ``load_state_dict()``
    save and restore it with the weights.
    """

    def __init__(self, model: nn.Module, config: RoutingConfig | None = None, **overrides: Any):
        super().__init__()
        config = resolve_config(config, overrides, "CGGRWrapper")
        self.model = model
        self.router: Router = attach(model, config)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def routing(self) -> Routing | None:
        """The routing of the last training forward (``.depth``: gradient depth per token)."""
        return self.router.routing

    def step(self) -> None:
        """Advance the curriculum by one optimizer step."""
        self.router.step()

    def attach_optimizer(self, optimizer):
        """Advance the curriculum after every ``optimizer.step()``."""
        return self.router.attach_optimizer(optimizer)

    def metrics(self) -> dict[str, float]:
        return self.router.metrics()

    def unwrap(self) -> nn.Module:
        """Remove every hook and return the original module."""
        return self.router.detach()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)
