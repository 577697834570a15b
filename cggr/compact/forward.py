"""The forward a block whose backward is compacted gets: the compacted Functions where the call allows it.

:class:`CompactedForward` replaces the block's ``forward`` (the router installs it after the attach-time check,
:mod:`cggr.compact.verify`). Calls the fast path cannot take (a KV cache, fp16 autocast, weights in another dtype
than the hidden states without autocast, a non-zero leak, inputs the backward's ``inputs`` refuses) run the
block's own forward, and the generic routed backward of :mod:`cggr.sparse` handles them. Under bf16 autocast
over fp32 weights the block runs in bf16 on casts of its weights and input.
"""

from __future__ import annotations

import inspect
import logging
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..routing import Routing
from .backward import CompactedBackward

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


class CompactedForward:
    """The forward installed on a block whose backward is compacted: it takes the compacted path when the
    running forward is routed and the call allows it (:meth:`takes_call`), else the block's plain forward.

    ``source.current_routing()`` returns the running forward's :class:`Routing`, or None outside routed
    training (the router passes itself). ``plain_forward``: the forward the block had before (a bound method).
    A plain object rather than a closure, so that ``copy.deepcopy(model)`` gives a forward bound to the copied
    block and routed by the copied router (deepcopy's memo maps both), and the block pickles. ``returns_tuple``:
    the block's forward returns ``(y,)`` (HF's older layers), which the compacted path then returns too (the
    attach-time check sees what the block returns; annotations can be stale).
    """

    def __init__(self, source: Any, block: torch.nn.Module, block_index: int, backward: CompactedBackward, spec: Any,
                 plain_forward: Callable, returns_tuple: bool = False):
        self.source = source
        self.block = block
        self.block_index = block_index
        self.backward = backward
        self.spec = spec
        self.plain_forward = plain_forward
        # Names of the forward's parameters after hidden_states: models pass some positionally (GPT-2 does).
        self._arg_names = list(inspect.signature(type(block).forward).parameters)[2:]
        self._as_tuple = returns_tuple

    def __getstate__(self):
        state = dict(self.__dict__)
        f = self.plain_forward
        if isinstance(f, types.MethodType) and f.__self__ is self.block:
            # Rebound on loading: pickling the bound method would look up block.forward, i.e. this object.
            state["plain_forward"] = _BoundToBlock(f.__func__)
        return state

    def __setstate__(self, state):
        f = state["plain_forward"]
        if isinstance(f, _BoundToBlock):
            state["plain_forward"] = types.MethodType(f.func, state["block"])
        self.__dict__.update(state)

    # -- the forward
    def current_routing(self) -> Routing | None:
        s = self.source
        return s.current_routing()

    def _by_name(self, args, kwargs) -> dict | None:
        if len(args) > len(self._arg_names):
            return None
        named = dict(zip(self._arg_names, args))
        named.update(kwargs)
        return named

    def checkpointing(self) -> bool:
        """Whether this call checkpoints (HF's ``gradient_checkpointing`` on the block, in training)."""
        block = self.block
        return getattr(block, "gradient_checkpointing", False) and block.training and torch.is_grad_enabled()

    def _inputs(self, r: Routing | None, hidden_states, args, kwargs, checkpointing: bool):
        """``(dtype, family inputs, the block's weights)`` when this call can take the compacted path, else
        None."""
        fam = self.backward
        block = self.block
        kwargs = self._by_name(args, kwargs)
        if (r is None or kwargs is None or r.leak_rate != 0 or not isinstance(hidden_states, torch.Tensor)
                or hidden_states.dim() != 3
                or any(kwargs.get(c) is not None for c in ("cache", "past_key_values", "layer_past"))
                or kwargs.get("output_attentions", False)
                or (checkpointing and fam.checkpointed is None)):
            return None
        params = fam.weights(block)
        dt = _compute_dtype(hidden_states, params)
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
        return (dt, tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in extra),
                params)

    def takes_call(self, hidden_states, args: tuple, kwargs: dict) -> bool:
        """Whether a call with these arguments, now, takes the compacted path (the router skips HF's own
        checkpointing of the block for such calls: the block then checkpoints itself, routed)."""
        return self._inputs(self.current_routing(), hidden_states, args, kwargs, self.checkpointing()) is not None

    def run(self, r: Routing, hidden_states, args: tuple, kwargs: dict, checkpointed: bool, block_index: int):
        """The compacted forward of this call under routing ``r`` (saving or checkpointed), or None when the
        call cannot take it. The output is the block's (a tensor, or a 1-tuple where the block returns one)."""
        found = self._inputs(r, hidden_states, args, kwargs, checkpointed)
        if found is None:
            return None
        dt, extra, params = found
        function = self.backward.checkpointed if checkpointed else self.backward.saving
        device_type = hidden_states.device.type
        if not torch.is_autocast_enabled(device_type):
            y = function.apply(hidden_states, *extra, r, block_index, self.spec, *params)  # dtypes checked
        else:
            # bf16 autocast (over fp32 weights, say): the block runs in bf16 on bf16 casts of its weights and
            # input, as the benchmarked bf16 path does; the casts are autograd ops (no-ops for bf16 tensors),
            # so the weights' fp32 .grad and the fp32 input gradient come back through them.
            params = type(params)(*(None if p is None else p.to(dt) for p in params))
            with torch.autocast(device_type, enabled=False):
                y = function.apply(hidden_states.to(dt), *extra, r, block_index, self.spec, *params)
            y = y.to(hidden_states.dtype)
        r.record_compacted(block_index)
        return (y,) if self._as_tuple else y

    def __call__(self, hidden_states, *args, **kwargs):
        r = self.current_routing()
        # With activation checkpointing on, the block checkpoints itself, routed: only the block input is kept.
        y = None if r is None else self.run(r, hidden_states, args, kwargs, self.checkpointing(), self.block_index)
        return self.plain_forward(hidden_states, *args, **kwargs) if y is None else y

    def __repr__(self) -> str:
        return f"CompactedForward({type(self.block).__name__} #{self.block_index}, {self.backward.name})"


@dataclass(frozen=True)
class _BoundToBlock:
    func: Callable
