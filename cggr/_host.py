"""Reading small device values on the host without stalling the GPU queue.

``torch.Tensor.item()`` (or ``tolist``, ``int(t)``) on a CUDA tensor waits for
every kernel queued so far: after a forward, that drains the queue and the
backward then runs at the pace of its Python launches. :class:`HostCopy` starts
a copy into pinned memory behind the work already queued and lets the host read
it later: ``ready()`` never waits, ``get()`` waits only until the GPU has
reached the copy.
"""

from __future__ import annotations

import torch


class HostCopy:
    """An asynchronous copy of a small tensor to the host."""

    def __init__(self, value: torch.Tensor):
        if value.device.type == "cuda":
            self._host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = value, None

    def ready(self) -> bool:
        """Whether ``get()`` would return at once."""
        return self._event is None or self._event.query()

    def get(self) -> list | int | float | bool:
        """The value as Python numbers (a scalar for a 0-d tensor)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
