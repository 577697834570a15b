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
from .llama import LlamaBlockRouted, LlamaBlockRoutedCheckpointed, llama_block_params, llama_block_spec

# name -> (spec(block) -> spec or None, params(block) -> tuple, Function saving activations,
#          Function recomputing them: routed activation checkpointing)
FAMILIES: dict[str, tuple[Callable, Callable, type, type]] = {
    "llama": (llama_block_spec, llama_block_params, LlamaBlockRouted, LlamaBlockRoutedCheckpointed),
}


def compact_family(block: torch.nn.Module) -> tuple[str, Any] | None:
    """``(family, spec)`` of the first family whose compacted backward handles ``block``, else None."""
    for name, (spec_fn, *_) in FAMILIES.items():
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
    _, params_fn, saving, checkpointed = FAMILIES[family]
    as_tuple = _returns_tuple(block)
    modules = tuple(block.modules())  # what the spec was read from

    def usable(r: Routing | None, hidden_states, args, kwargs) -> bool:
        pe = kwargs.get("position_embeddings")
        mask = kwargs.get("attention_mask")
        return (
            r is not None and not args and r.leak_rate == 0 and pe is not None
            and isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3
            and tuple(block.modules()) == modules  # not changed since attach (e.g. linears wrapped by PEFT)
            and kwargs.get("cache") is None and kwargs.get("past_key_values") is None
            and not kwargs.get("output_attentions", False)
            and (mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4
                                  and tuple(mask.shape[-2:]) == (hidden_states.shape[1],) * 2))
            and not torch.is_autocast_enabled(hidden_states.device.type)
            and all(p is None or p.dtype == hidden_states.dtype for p in params_fn(block))
        )

    def forward(hidden_states, *args, **kwargs):
        r = get_routing()
        if not usable(r, hidden_states, args, kwargs):
            return plain_forward(hidden_states, *args, **kwargs)
        cos, sin = (t.to(hidden_states.dtype) for t in kwargs["position_embeddings"])
        # With activation checkpointing on, the block checkpoints itself, routed: only the block input is kept.
        ckpt = getattr(block, "gradient_checkpointing", False) and block.training and torch.is_grad_enabled()
        function = checkpointed if ckpt else saving
        y = function.apply(hidden_states, cos, sin, kwargs.get("attention_mask"), r, block_index, spec,
                           *params_fn(block))
        r.compact_blocks.add(block_index)
        return (y,) if as_tuple else y

    # Lets the router skip HF's own checkpointing of this block for calls that checkpoint themselves.
    forward.cggr_routes_call = lambda hidden_states, args, kwargs: usable(get_routing(), hidden_states, args, kwargs)
    return forward
