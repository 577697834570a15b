"""The reference routed backward of DESIGN.md §1, as forward hooks.

Slow, obviously correct, and what every fast path is tested against. Given
each token's depth *before* the forward, hooks replace the rows of tokens
inactive in a block by ``λ·x + (1-λ)·x.detach()`` (``x.detach()`` when
``leak_rate == 0``):

* sparse mode: the output of every linear inside the block and the block's
  output (so queries, keys, values, attention output and MLP rows of an
  inactive token are constants); in a mixture-of-experts block also the
  output of the fused experts and every float output of the top-k router
  (its logits and the expert weights taken from them: each row is a function
  of that token's logits row alone, so freezing them is freezing the router's
  linear output);
* mask mode: the block's output only.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .adapters import is_fused_experts, is_moe_router, is_routable_linear


def _freeze_rows(x: torch.Tensor, inactive: torch.Tensor, leak_rate: float) -> torch.Tensor:
    rows = inactive.numel()
    if x.numel() // x.shape[-1] != rows:
        raise RuntimeError(f"reference: tensor {tuple(x.shape)} does not have {rows} token rows")
    frozen = leak_rate * x + (1.0 - leak_rate) * x.detach() if leak_rate > 0 else x.detach()
    mask = inactive.reshape(*x.shape[:-1], 1)
    return torch.where(mask, frozen, x)


def _replace_first(out, fn):
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        if hasattr(out, "_fields"):  # a NamedTuple keeps its type
            return out._replace(**{out._fields[0]: fn(out[0])})
        return (fn(out[0]),) + tuple(out[1:])
    raise TypeError(f"reference: cannot route a block output of type {type(out).__name__}")


def _replace_floats(out: tuple, fn) -> tuple:
    return tuple(fn(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in out)


@contextlib.contextmanager
def reference_routing(blocks: Sequence[nn.Module], depth: torch.Tensor, *, mode: str | Sequence[str] = "sparse",
                      leak_rate: float = 0.0) -> Iterator[None]:
    """Within this context, forwards through ``blocks`` apply the routing ``depth``.

    Args:
        blocks: the block stack, bottom first (``L = len(blocks)``).
        depth: gradient depth of every token, shaped like the tokens.
        mode: ``"sparse"`` or ``"mask"``, or one of those per block.
        leak_rate: λ in [0, 1].
    """
    L = len(blocks)
    modes = [mode] * L if isinstance(mode, str) else list(mode)
    flat = depth.reshape(-1)
    handles = []

    def make_hook(inactive, replace=_replace_first):
        def hook(module, args, out):
            return replace(out, lambda t: _freeze_rows(t, inactive, leak_rate))
        return hook

    try:
        for i, block in enumerate(blocks):
            inactive = flat <= (L - 1 - i)
            handles.append(block.register_forward_hook(make_hook(inactive)))
            if modes[i] == "sparse":
                for m in block.modules():
                    if is_routable_linear(m) or is_fused_experts(m):
                        handles.append(m.register_forward_hook(make_hook(inactive)))
                    elif is_moe_router(m):
                        # First of its hooks: HF records the router logits for the auxiliary loss
                        # with a forward hook of its own, which must see the frozen rows.
                        handles.append(m.register_forward_hook(make_hook(inactive, _replace_floats), prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()
