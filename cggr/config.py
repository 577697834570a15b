"""User-facing options of the router, validated in one place.

Every error a user can make here is a ``ValueError`` naming the argument and
the allowed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .bucketing import POLICIES
from .scoring import SCORERS

MODES = ("sparse", "mask")
BACKWARDS = ("auto", "generic")
BUCKETS = ("local", "global")


@dataclass(frozen=True)
class RoutingConfig:
    num_buckets: int = 4
    warmup_steps: int = 1000
    leak_rate: float = 0.0
    mode: str = "sparse"
    policy: str = "random"
    depths: tuple[float, ...] | None = None
    scorer: str = "entropy_confidence"
    ignore_index: int = -100
    seed: int = 0
    label_shift: int | None = None
    backward: str = "auto"
    handback_steps: int = 0
    total_steps: int | None = None
    buckets: str = "local"

    def __post_init__(self) -> None:
        if isinstance(self.num_buckets, bool) or not isinstance(self.num_buckets, int) or self.num_buckets < 1:
            raise ValueError(f"num_buckets must be an integer >= 1, got {self.num_buckets!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        try:
            leak = float(self.leak_rate)
        except (TypeError, ValueError):
            leak = math.nan
        if not (0.0 <= leak <= 1.0):
            raise ValueError(f"leak_rate must be a number in [0, 1], got {self.leak_rate!r}")
        object.__setattr__(self, "leak_rate", leak)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        if self.depths is not None:
            object.__setattr__(self, "depths", _check_depths(self.depths, self.num_buckets))
        if self.label_shift not in (None, 0, 1):
            raise ValueError(f"label_shift must be None (auto), 0 or 1, got {self.label_shift!r}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward must be one of {BACKWARDS}, got {self.backward!r}")
        if isinstance(self.handback_steps, bool) or not isinstance(self.handback_steps, int) or self.handback_steps < 0:
            raise ValueError(f"handback_steps must be an integer >= 0, got {self.handback_steps!r}")
        if self.total_steps is not None and (isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int)
                                             or self.total_steps < 1):
            raise ValueError(f"total_steps must be None or an integer >= 1, got {self.total_steps!r}")
        if self.handback_steps and (self.total_steps is None or self.handback_steps > self.total_steps):
            raise ValueError(f"handback_steps={self.handback_steps} needs total_steps (the length of training, in "
                             f"optimizer steps) >= handback_steps, got total_steps={self.total_steps!r}")
        if self.buckets not in BUCKETS:
            raise ValueError(f"buckets must be one of {BUCKETS}, got {self.buckets!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


def _check_depths(depths: Sequence[float], num_buckets: int) -> tuple[float, ...]:
    msg = ("depths must be a sequence of num_buckets={k} fractions, strictly decreasing, "
           "each in (0, 1] (hardest bucket first), got {d!r}")
    try:
        fr = tuple(float(f) for f in depths)
    except (TypeError, ValueError):
        raise ValueError(msg.format(k=num_buckets, d=depths)) from None
    ok = (len(fr) == num_buckets and all(0.0 < f <= 1.0 for f in fr)
          and all(a > b for a, b in zip(fr, fr[1:])))
    if not ok:
        raise ValueError(msg.format(k=num_buckets, d=depths))
    return fr
