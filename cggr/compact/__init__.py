"""Compacted routed backwards, one per model family, and the table that picks them.

A compacted backward replaces a whole block's backward by one that works on
the block's active rows only (DESIGN.md §2: per-linear sparsity alone cannot
approach the FLOP ratio). Blocks of families not in :data:`FAMILIES`, and
calls the fast path cannot take (a KV cache, autocast, mixed dtypes, a
non-zero leak), use the generic path of :mod:`cggr.sparse`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from ..routing import Routing
from .llama import LlamaBlockRouted, llama_block_params, llama_block_spec

# name -> (spec(block) -> spec or None, params(block) -> tuple, autograd Function)
FAMILIES: dict[str, tuple[Callable, Callable, type]] = {
    "llama": (llama_block_spec, llama_block_params, LlamaBlockRouted),
}


def compact_family(block: torch.nn.Module) -> tuple[str, Any] | None:
    """``(family, spec)`` of the first family whose compacted backward handles ``block``, else None."""
    for name, (spec_fn, _, _) in FAMILIES.items():
        spec = spec_fn(block)
        if spec is not None:
            return name, spec
    return None


def _returns_tuple(block: torch.nn.Module) -> bool:
    ann = inspect.signature(type(block).forward).return_annotation
    return "tuple" in str(ann).lower()


def make_compact_forward(get_routing: Callable[[], Routing | None], block: torch.nn.Module, block_index: int,
                         family: str, spec: Any, plain_forward: Callable) -> Callable:
    """A forward for ``block`` that takes the compacted path when it can, else ``plain_forward``.

    ``get_routing`` returns the routing of the running forward (None outside routed training).
    """
    _, params_fn, function = FAMILIES[family]
    as_tuple = _returns_tuple(block)
    modules = tuple(block.modules())  # what the spec was read from
    # Older HF layers checkpoint in ``__call__`` (around this forward); newer ones wrap the class's ``forward``,
    # which this instance forward shadows, so then the compacted block must checkpoint itself.
    checkpoints_itself = type(block).__call__ is torch.nn.Module.__call__

    def forward(hidden_states, *args, **kwargs):
        r = get_routing()
        pe = kwargs.get("position_embeddings")
        mask = kwargs.get("attention_mask")
        params = params_fn(block)
        usable = (
            r is not None and not args and r.leak_rate == 0 and pe is not None
            and tuple(block.modules()) == modules  # not changed since attach (e.g. linears wrapped by PEFT)
            and kwargs.get("cache") is None and kwargs.get("past_key_values") is None
            and not kwargs.get("output_attentions", False)
            and hidden_states.dim() == 3
            and (mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4
                                  and tuple(mask.shape[-2:]) == (hidden_states.shape[1],) * 2))
            and not torch.is_autocast_enabled(hidden_states.device.type)
            and all(p is None or p.dtype == hidden_states.dtype for p in params)
        )
        if not usable:
            return plain_forward(hidden_states, *args, **kwargs)
        cos, sin = (t.to(hidden_states.dtype) for t in pe)

        def run(h):
            return function.apply(h, cos, sin, mask, r, block_index, spec, *params)

        if checkpoints_itself and getattr(block, "gradient_checkpointing", False) and block.training:
            # ``run`` closes over this forward's routing, so the replay in backward uses it too.
            y = block._gradient_checkpointing_func(run, hidden_states)
        else:
            y = run(hidden_states)
        r.compact_blocks.add(block_index)
        return (y,) if as_tuple else y

    return forward
