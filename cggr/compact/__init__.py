"""Compacted routed backwards, one per model family, and the table that picks them.

A compacted backward replaces a whole block's backward by one that works on
the block's active rows only (DESIGN.md §2: per-linear sparsity alone cannot
approach the FLOP ratio). Blocks of families not in :data:`FAMILIES`, and
calls the fast path cannot take (a KV cache, fp16 autocast, weights in another
dtype than the hidden states without autocast, a non-zero leak), use the
generic path of :mod:`cggr.sparse`. Under bf16 autocast over fp32 weights the
block runs in bf16 on casts of its weights and input.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..adapters import is_moe_module
from ..routing import Routing
from .gpt2 import GPT2BlockRouted, GPT2BlockRoutedCheckpointed, gpt2_block_params, gpt2_block_spec, gpt2_dropout_off
from .llama import LlamaBlockRouted, LlamaBlockRoutedCheckpointed, llama_block_params, llama_block_spec

logger = logging.getLogger("cggr")
_warned_dtype = False  # once per process: the advice is the same for every block and every model


def _warn_dtype_fallback(reason: str) -> None:
    """Say once why the fast path is not taken where the user can fix it (the usual HF bf16=True setup)."""
    global _warned_dtype
    if not _warned_dtype:
        _warned_dtype = True
        logger.warning("cggr: %s: the compacted backward runs in bf16 (bf16 weights, or bf16 autocast), so these "
                       "blocks use the generic routed backward, which saves far less (on an H100 it is slower "
                       "than dense training). For the fast path use bf16 weights or bf16 autocast "
                       "(Trainer: bf16=True, not fp16=True).", reason)


@dataclass(frozen=True)
class Family:
    """How one model family's blocks take the compacted backward.

    ``spec(block)``: the block's shape, or None when the family does not handle it; ``params(block)``: its
    weights in the Functions' order; ``inputs(block, kwargs, dtype)``: the per-call inputs before routing
    (e.g. rotary cos/sin), or None when this call cannot take the compacted path; ``saving`` /
    ``checkpointed``: the autograd Functions (checkpointed may be None: then checkpointed calls use the
    model's own checkpointing and the generic backward).
    """

    spec: Callable
    params: Callable
    inputs: Callable
    saving: type
    checkpointed: type | None


def _llama_inputs(block, kwargs, dtype):
    pe = kwargs.get("position_embeddings")
    if pe is None:
        return None
    return tuple(t.to(dtype) for t in pe) + (kwargs.get("attention_mask"),)


def _gpt2_inputs(block, kwargs, dtype):
    if not gpt2_dropout_off(block) or kwargs.get("encoder_hidden_states") is not None:
        return None
    return (kwargs.get("attention_mask"),)


FAMILIES: dict[str, Family] = {
    "llama": Family(llama_block_spec, llama_block_params, _llama_inputs, LlamaBlockRouted,
                    LlamaBlockRoutedCheckpointed),
    "gpt2": Family(gpt2_block_spec, gpt2_block_params, _gpt2_inputs, GPT2BlockRouted, GPT2BlockRoutedCheckpointed),
}


def _compute_dtype(hidden_states: torch.Tensor, params) -> torch.dtype | None:
    """The dtype a compacted block runs in, or None when it cannot (a warning says why, once).

    Without autocast: the hidden states' dtype, which every weight must have. Under bf16 autocast (the HF
    Trainer's ``bf16=True``, fp32 master weights): bf16, on casts of the weights and of the block input.
    """
    dev = hidden_states.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if dt != torch.bfloat16 or not hidden_states.is_floating_point():
            _warn_dtype_fallback(f"autocast to {dt}")
            return None
        return dt
    if any(p is not None and p.dtype != hidden_states.dtype for p in params):
        _warn_dtype_fallback(f"weights and hidden states differ in dtype ({hidden_states.dtype} states)")
        return None
    return hidden_states.dtype


def compact_family(block: torch.nn.Module) -> tuple[str, Any] | None:
    """``(family, spec)`` of the first family whose compacted backward handles ``block``, else None."""
    if any(is_moe_module(m) for m in block.modules()):
        return None  # the compacted Functions know dense MLPs only; MoE blocks take the generic path
    for name, family in FAMILIES.items():
        spec = family.spec(block)
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
    fam = FAMILIES[family]
    as_tuple = _returns_tuple(block)
    modules = tuple(block.modules())  # what the spec was read from
    # Names of the forward's parameters after hidden_states: models pass some positionally (GPT-2 does).
    arg_names = list(inspect.signature(type(block).forward).parameters)[2:]

    def by_name(args, kwargs) -> dict | None:
        if len(args) > len(arg_names):
            return None
        named = dict(zip(arg_names, args))
        named.update(kwargs)
        return named

    def checkpointing() -> bool:
        return getattr(block, "gradient_checkpointing", False) and block.training and torch.is_grad_enabled()

    def inputs(r: Routing | None, hidden_states, args, kwargs):
        """The family's per-call inputs when this call can take the compacted path, else None."""
        kwargs = by_name(args, kwargs)
        if (r is None or kwargs is None or r.leak_rate != 0 or r.skip or not isinstance(hidden_states, torch.Tensor)
                or hidden_states.dim() != 3 or tuple(block.modules()) != modules  # e.g. linears wrapped by PEFT
                or any(kwargs.get(c) is not None for c in ("cache", "past_key_values", "layer_past"))
                or kwargs.get("output_attentions", False)
                or (checkpointing() and fam.checkpointed is None)):
            return None
        dt = _compute_dtype(hidden_states, fam.params(block))
        if dt is None:
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4
                                     and tuple(mask.shape[-2:]) == (hidden_states.shape[1],) * 2):
            return None
        extra = fam.inputs(block, kwargs, dt)
        if extra is None:
            return None
        # A float attention mask follows the compute dtype (under autocast HF builds it in the weights' fp32).
        return dt, tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in extra)

    def forward(hidden_states, *args, **kwargs):
        r = get_routing()
        found = inputs(r, hidden_states, args, kwargs)
        if found is None:
            return plain_forward(hidden_states, *args, **kwargs)
        dt, extra = found
        # With activation checkpointing on, the block checkpoints itself, routed: only the block input is kept.
        function = fam.checkpointed if checkpointing() else fam.saving
        params = fam.params(block)
        device_type = hidden_states.device.type
        if not torch.is_autocast_enabled(device_type):
            y = function.apply(hidden_states, *extra, r, block_index, spec, *params)  # dtypes checked in inputs()
        else:
            # bf16 autocast (over fp32 weights, say): the block runs in bf16 on bf16 casts of its weights and
            # input, as the benchmarked bf16 path does; the casts are autograd ops (no-ops for bf16 tensors),
            # so the weights' fp32 .grad and the fp32 input gradient come back through them.
            params = tuple(None if p is None else p.to(dt) for p in params)
            with torch.autocast(device_type, enabled=False):
                y = function.apply(hidden_states.to(dt), *extra, r, block_index, spec, *params)
            y = y.to(hidden_states.dtype)
        r.compact_blocks.add(block_index)
        return (y,) if as_tuple else y

    # Lets the router skip HF's own checkpointing of this block for calls that checkpoint themselves.
    forward.cggr_routes_call = lambda h, args, kwargs: inputs(get_routing(), h, args, kwargs) is not None
    return forward
