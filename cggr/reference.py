"""The reference routed backward of docs/design.md §1.8, as forward hooks.

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

With skip semantics the inactive rows of the block output ``y`` become ``x + (y - x).detach()`` instead (``x``
the block's input row), and with ``branch_weight`` (estimator="unbiased") each kept row becomes
``x + (y - x).detach() + w * ((y - x) - (y - x).detach())``: the same value, its gradient entering the block's
branch times ``w`` while the residual stream carries it unweighted.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .adapters import is_fused_experts, is_moe_router, is_routable_linear
from .config import MODES, as_number


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
def reference_routing(blocks: Sequence[nn.Module], depth: torch.Tensor | None = None, *,
                      mode: str | Sequence[str] = "sparse", leak_rate: float = 0.0, inactive: str = "stop",
                      block_active: torch.Tensor | None = None,
                      branch_weight: torch.Tensor | None = None) -> Iterator[None]:
    """Within this context, forwards through ``blocks`` apply the routing ``depth`` (or ``block_active``).

    Args:
        blocks: the block stack, bottom first (``L = len(blocks)``).
        depth: gradient depth of every token, shaped like the tokens (nested placement: active in the top
            ``depth`` blocks).
        mode: ``"sparse"`` or ``"mask"``, or one of those per block.
        leak_rate: λ in [0, 1].
        inactive: ``"stop"`` (an inactive row of the block output is a constant) or ``"skip"`` (it is
            ``x + c``, ``x`` the block's input row: its gradient passes to the input).
        block_active: instead of ``depth``, each block's active tokens, ``[L, *tokens]`` bool.
        branch_weight: skip semantics only: each block's weight of its active rows, ``[L, *tokens]`` (the
            estimator="unbiased" routing's ``1/pi``; values on inactive rows are not read).
    """
    L = len(blocks)
    modes = [mode] * L if isinstance(mode, str) else list(mode)
    if len(modes) != L or any(m not in MODES for m in modes):
        raise ValueError(f"mode must be one of {MODES}, or a list of them with one per block ({L}), got {mode!r}")
    if not 0.0 <= as_number(leak_rate) <= 1.0:
        raise ValueError(f"leak_rate must be a number in [0, 1], got {leak_rate!r}")
    leak_rate = float(leak_rate)
    if (depth is None) == (block_active is None):
        raise ValueError("reference_routing takes depth or block_active, exactly one of them")
    if block_active is not None:
        active = block_active.reshape(L, -1).bool()
    else:
        flat = depth.reshape(-1)
        active = torch.stack([flat > (L - 1 - i) for i in range(L)]) if L else flat.new_zeros((0, flat.numel()))
    handles = []

    def make_hook(inactive_rows, replace=_replace_first):
        def hook(module, args, out):
            return replace(out, lambda t: _freeze_rows(t, inactive_rows, leak_rate))
        return hook

    def skip_hook(inactive_rows, weight_rows):
        def hook(module, args, kwargs, out):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]

            def route(y):
                branch = y - x
                if weight_rows is not None:  # kept rows: the branch's gradient times w, the residual's as it is
                    w = weight_rows.reshape(*y.shape[:-1], 1).to(y.dtype)
                    y = x + branch.detach() + w * (branch - branch.detach())
                # y -> x + (y - x).detach() on inactive rows (λ of the row stays on y with a leak)
                frozen = x + branch.detach()
                return torch.where(inactive_rows.reshape(*y.shape[:-1], 1),
                                   leak_rate * y + (1 - leak_rate) * frozen if leak_rate > 0 else frozen, y)
            return _replace_first(out, route)
        return hook

    if inactive not in ("stop", "skip"):
        raise ValueError(f"inactive must be 'stop' or 'skip', got {inactive!r}")
    if branch_weight is not None and inactive != "skip":
        raise ValueError("branch_weight reweights the branch under skip semantics: it needs inactive='skip'")
    weights = None if branch_weight is None else branch_weight.reshape(L, -1)
    try:
        for i, block in enumerate(blocks):
            inactive_rows = ~active[i]
            if inactive == "skip":
                handles.append(block.register_forward_hook(
                    skip_hook(inactive_rows, None if weights is None else weights[i]), with_kwargs=True))
            else:
                handles.append(block.register_forward_hook(make_hook(inactive_rows)))
            if modes[i] == "sparse":
                for m in block.modules():
                    if is_routable_linear(m) or is_fused_experts(m):
                        handles.append(m.register_forward_hook(make_hook(inactive_rows)))
                    elif is_moe_router(m):
                        # First of its hooks: HF records the router logits for the auxiliary loss
                        # with a forward hook of its own, which must see the frozen rows.
                        handles.append(m.register_forward_hook(make_hook(inactive_rows, _replace_floats),
                                                               prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()
