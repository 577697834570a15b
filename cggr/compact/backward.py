"""What a compacted backward is, as the rest of cggr sees it: one record per kind of block.

A :class:`CompactedBackward` says how to recognise its blocks (``spec``), read their weights, build a call's
inputs, and call the block in the attach-time check, and which autograd Functions run it. Each family module
(:mod:`cggr.compact.llama`, :mod:`cggr.compact.gpt2`, ...) defines one as ``BACKWARD``; the family registry
(:mod:`cggr.families`) names it for each HF ``model_type`` whose blocks it fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


def no_variants(spec: Any) -> tuple:
    return ()


def plain_reading(spec: Any) -> str:
    return ""


@dataclass(frozen=True)
class CompactedBackward:
    """One compacted block backward.

    Every callable is a module-level function (or a ``functools.partial`` of one), so that the record, and the
    block forwards holding it, copy and pickle.
    """

    name: str
    """Its name in the router's report ("compacted (llama)") and in warnings."""
    spec: Callable[[torch.nn.Module], Any | str]
    """``spec(block)``: the block's shape (a frozen dataclass with a ``hidden_size``), or, when the block does not
    have this backward's structure, a string saying what differs (the router's report names it). Structure is
    not behaviour: the attach-time check decides."""
    weights: Callable[[torch.nn.Module], tuple]
    """``weights(block)``: the block's parameters as the Functions take them, a named tuple (None for a
    piece the block does not have)."""
    inputs: Callable[[torch.nn.Module, dict, torch.dtype], tuple | None]
    """``inputs(block, kwargs, dtype)``: the Functions' per-call inputs between the hidden states and the routing
    (rotary cos/sin, the attention mask), from the block's call arguments by name; None where this call cannot
    take the compacted path (what the Function would compute cannot be known to equal the block)."""
    check_inputs: Callable[[Any, torch.Generator, int, int, torch.Tensor | None], dict]
    """``check_inputs(spec, generator, batch, seq, mask)``: the keyword arguments the attach-time check calls
    the block with (random where the model would compute them, e.g. rotary tables)."""
    saving: type
    """The autograd Function that saves activations; its ``apply(x, *inputs, routing, block_index, spec,
    *weights)``."""
    checkpointed: type | None
    """The routed-checkpointing Function (same arguments), or None: checkpointed calls then use the model's own
    checkpointing and the generic backward."""
    variants: Callable[[Any], tuple] = no_variants
    """``variants(spec)``: other specs for a block of that shape, which the attach-time check tries in turn when
    the block fails with ``spec`` (fused kernels with conventions of their own: Liger-Kernel's RoPE)."""
    describe: Callable[[Any], str] = plain_reading
    """``describe(spec)``: what such a variant reads differently, for the router's report ("" for the plain
    one)."""

    def __deepcopy__(self, memo):
        return self  # immutable: a copied model's blocks share it

    def __repr__(self) -> str:
        return f"CompactedBackward({self.name!r})"


def dropout_off(block: torch.nn.Module) -> bool:
    """Whether the block's dropouts change nothing in this call (p = 0, or eval mode): dropout would make the
    forward random, and the compacted Functions have none."""
    if not block.training:
        return True
    return all(m.p == 0 for m in block.modules() if isinstance(m, torch.nn.Dropout))
