"""``CGGRWrapper``: the one-line ``nn.Module`` around the in-place router.

``model = CGGRWrapper(model)`` returns exactly what the wrapped model returns;
attributes the wrapper does not define (``config``, ``generate``,
``save_pretrained``, ...) reach the wrapped model. ``unwrap()`` removes every
hook and gives the original module back.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from .router import Router, attach
from .routing import Routing


class CGGRWrapper(nn.Module):
    """Wrap ``model`` so that its backward pass is routed by token difficulty.

    Arguments are those of :func:`cggr.attach`. The curriculum step lives in the
    router's registered buffer, so ``state_dict()`` / ``load_state_dict()``
    save and restore it with the weights.
    """

    def __init__(self, model: nn.Module, num_buckets: int = 4, warmup_steps: int = 1000, leak_rate: float = 0.0, *,
                 mode: str = "sparse", policy: str = "difficulty", layers=None,
                 depths: Sequence[float] | None = None, scorer: str = "entropy_confidence",
                 ignore_index: int = -100, seed: int = 0, label_shift: int | None = None,
                 backward: str = "auto", buckets: str = "local"):
        super().__init__()
        self.model = model
        self.router: Router = attach(model, num_buckets, warmup_steps, leak_rate, mode=mode, policy=policy,
                                     layers=layers, depths=depths, scorer=scorer, ignore_index=ignore_index,
                                     seed=seed, label_shift=label_shift, backward=backward, buckets=buckets)

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
