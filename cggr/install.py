"""What :func:`cggr.attach` installs on a model's blocks, and how it is removed.

Every patched forward and hook is a small module-level callable object
holding the router, the module and the block index, never a closure: so that
``copy.deepcopy(model)`` gives a copy whose routed forwards act on the copy's
modules, and ``pickle`` / ``torch.save(model)`` work. Each reads the routing of
the running forward through ``router.current_routing()``, which is None
outside a routed training forward: then it does exactly what the module did.
What they call on the router is :class:`InstalledRouter`, its public methods
and nothing else.

* the model itself: three hooks, the router's
  :meth:`~InstalledRouter.start_forward`, :meth:`~InstalledRouter.plan_forward`
  and :meth:`~InstalledRouter.close_forward`;
* every linear of a sparse block: :class:`~cggr.sparse.RoutedLinear`;
* HF MoE routers and fused experts: gated outputs / :class:`~cggr.moe.RoutedExperts`;
* every block: a gate of its output rows (:class:`BlockGate`), unless the
  block took its compacted backward for this call (it gates itself);
* blocks whose family has a verified compacted backward: their forward;
* with ``fused_loss=True``, the HF causal LM's own forward: :class:`~cggr.hf_loss.FusedLossForward`.
"""

from __future__ import annotations

import logging
from typing import Any, ContextManager, Protocol, runtime_checkable

import torch
import torch.nn as nn

from .adapters import (family_of, is_fused_experts, is_moe_router, is_routable_linear, model_type,
                       unsupported_parametrised_modules, weight_in_out)
from .compact.forward import CompactedForward
from .compact.verify import compact_decision
from .config import RoutingConfig
from .families import compacted_backwards
from .hf_loss import FusedLossForward, fused_loss_target
from .moe import RoutedExperts
from .routing import Routing
from .scoring import Scores
from .sparse import GateRows, RoutedLinear, SkipRows

logger = logging.getLogger("cggr")


@runtime_checkable
class InstalledRouter(Protocol):
    """The router as everything :class:`Installation` installs sees it: these public methods, nothing else
    (:class:`cggr.router.Router` implements them; docs/design.md §2 walks through the stages).

    The model's hooks, in the order a forward runs them:

    * ``start_forward(model, args, kwargs)``, its forward pre-hook (with kwargs): the token grid, its valid
      tokens and the forward's new :class:`~cggr.routing.Routing`; returns the call's ``(args, kwargs)``;
    * ``plan_forward(model, args, kwargs, output)``, its forward hook (with kwargs): the routing decided from the
      output (logits, or a fused loss's scores);
    * ``close_forward(model, args, output)``, its forward hook that runs even when the forward raised: the
      routing stops being the current one.

    The patched forwards and block hooks, while the forward runs: ``current_routing()`` (None outside a routed
    training forward), ``routing_of(routing)`` (a checkpointed block's replay runs with the routing of its
    first run), ``check_block_rows(name, h)`` (a block output keeps one row per token) and
    ``take_scores(scores)`` (the fused loss's per-token scores, :class:`~cggr.hf_loss.FusedLossForward`).
    """

    def start_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]: ...

    def plan_forward(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None: ...

    def close_forward(self, model: nn.Module, args: tuple, output: Any) -> None: ...

    def current_routing(self) -> Routing | None: ...

    def routing_of(self, routing: Routing | None) -> ContextManager[None]: ...

    def check_block_rows(self, name: str, h: torch.Tensor) -> None: ...

    def take_scores(self, scores: Scores) -> None: ...


class _PatchedForward:
    """Base of the patched forwards: calls the module's own forward when no routing runs."""

    def __init__(self, router, module: nn.Module, block_index: int):
        self.router = router
        self.module = module
        self.block_index = block_index
        # An instance-level forward someone else installed, else None: the class's forward is then called
        # through the module (never through a bound method stored here, which would unpickle as this object).
        self.previous = module.__dict__.get("forward")

    def plain(self, *args, **kwargs):
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


class LinearForward(_PatchedForward):
    """``nn.Linear`` / HF ``Conv1D`` whose backward uses only the rows active in its block."""

    def __call__(self, x, *args, **kwargs):
        r = self.router.current_routing()
        if r is None or args or kwargs:
            return self.plain(x, *args, **kwargs)
        m = self.module
        return RoutedLinear.apply(x, m.weight, m.bias, r, self.block_index, weight_in_out(m))


class MoERouterForward(_PatchedForward):
    """HF top-k router: every float output row of an inactive token is a constant."""

    def __call__(self, *args, **kwargs):
        out = self.plain(*args, **kwargs)
        r = self.router.current_routing()
        if r is None:
            return out
        # Inside the forward, so every hook (HF's recorder of router logits for the aux loss) sees it.
        return tuple(GateRows.apply(t, r, self.block_index) if isinstance(t, torch.Tensor) and t.is_floating_point()
                     else t for t in out)


class ExpertsForward(_PatchedForward):
    """HF fused experts: the experts' backward replayed on the active tokens only."""

    def __call__(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        r = self.router.current_routing()
        if r is None:
            return self.plain(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        if args or kwargs:  # a call this path does not know: still exact, gating the output rows
            return GateRows.apply(self.plain(hidden_states, top_k_index, top_k_weights, *args, **kwargs),
                                  r, self.block_index)
        m = self.module
        return RoutedExperts.apply(hidden_states, top_k_weights, top_k_index, r, self.block_index, m,
                                   self.plain, *m.parameters())


def _first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _replace_first(out, first: torch.Tensor):
    if isinstance(out, torch.Tensor):
        return first
    if hasattr(out, "_replace") and hasattr(out, "_fields"):  # a NamedTuple
        return out._replace(**{out._fields[0]: first})
    if isinstance(out, tuple):
        return type(out)((first, *out[1:]))
    return [first, *out[1:]]


def _block_input(args, kwargs) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    h = kwargs.get("hidden_states")
    return h if isinstance(h, torch.Tensor) else None


class BlockGate:
    """Forward hook of block ``block_index``: gates the gradient rows of its output (sparse and mask mode);
    with skip semantics the inactive rows' gradient goes to the block's input instead."""

    def __init__(self, router, block_index: int, name: str):
        self.router = router
        self.block_index = block_index
        self.name = name

    def __call__(self, module, args, kwargs, out):
        r = self.router.current_routing()
        if r is None or r.took_compacted(self.block_index):  # a compacted backward gates, weighs and draws its rows
            return out
        h = _first_tensor(out)
        if h is None:
            raise TypeError(f"cggr: {self.name} returned {type(out).__name__}; a routed block must return a tensor "
                            "or a tuple (or list, or NamedTuple) starting with one")
        self.router.check_block_rows(self.name, h)
        if not r.skip:
            return _replace_first(out, GateRows.apply(h, r, self.block_index))
        x = _block_input(args, kwargs)
        if x is None or x.shape != h.shape:
            raise ValueError(f"cggr: inactive='skip' passes an inactive row's gradient from {self.name}'s output to "
                             f"its input, which must be a tensor of the output's shape {tuple(h.shape)}; got "
                             + (type(x).__name__ if x is None else f"{tuple(x.shape)}"))
        return _replace_first(out, SkipRows.apply(h, x, r, self.block_index))


class CheckpointWithRouting:
    """Replaces a block's ``_gradient_checkpointing_func`` (HF layers checkpoint through it): the replayed
    forward runs with the routing of the forward that ran it first, not whatever runs at backward time."""

    def __init__(self, router, block: nn.Module, checkpoint_fn):
        self.router = router
        self.block = block
        self.checkpoint_fn = checkpoint_fn

    def __call__(self, function, *args, **kwargs):
        routing = self.router.current_routing()
        forward = self.block.__dict__.get("forward")
        takes_call = getattr(forward, "takes_call", None)
        if takes_call is not None and args and takes_call(args[0], args[1:], getattr(function, "keywords", {})):
            # A compacted block checkpoints itself, routed (older HF layers checkpoint in __call__).
            return function(*args, **kwargs)
        return self.checkpoint_fn(_Replay(self.router, routing, function), *args, **kwargs)


class _Replay:
    def __init__(self, router, routing, function):
        self.router, self.routing, self.function = router, routing, function

    def __call__(self, *args, **kwargs):
        with self.router.routing_of(self.routing):
            return self.function(*args, **kwargs)


def refuse_unroutable_stack(blocks: list[nn.Module]) -> None:
    """Stacks cggr would route wrongly without an error: refuse them at attach, saying why."""
    seen: dict[int, int] = {}
    for i, block in enumerate(blocks):
        for sub in block.modules():
            j = seen.setdefault(id(sub), i)
            if j != i:
                what = "block" if sub is block else f"module {type(sub).__name__}"
                raise ValueError(f"cggr: the same {what} is in blocks {j} and {i} of the stack (weight-shared layers, "
                                 "e.g. ModuleList([block] * n)): one module cannot be routed as two blocks; cggr does "
                                 "not support weight-shared stacks")
            if isinstance(sub, nn.MultiheadAttention) and not sub.batch_first:
                raise ValueError(f"cggr: block {i} holds an nn.MultiheadAttention with batch_first=False: its rows are "
                                 "sequence-first ([S, B, D]), so cggr would route the wrong tokens; build the layers "
                                 "with batch_first=True")



def choose_backward(model: nn.Module, block: nn.Module, config: RoutingConfig):
    """``(Compacted, why)`` when the block takes a compacted backward, else ``(None, why not)``: its
    family's (:mod:`cggr.families`), or for a model of no known family any whose structure the block has; in
    either case only once the attach-time check proves it equal to the block."""
    if config.backward == "generic":
        return None, "generic backward (backward='generic')"
    family = family_of(model)
    if family is not None and family.backward is None:
        return None, f"generic backward (model_type {model_type(model)!r} has no compacted backward)"
    found, why = compact_decision(block, [family.backward] if family is not None else compacted_backwards())
    if found is None:
        return None, f"generic backward ({why})"
    return found, why


class Installation:
    """Every forward patched and hook registered on one model's blocks; :meth:`remove` restores it exactly.

    Per block it decides sparse or mask mode (``sparse_blocks``), the compacted family or None
    (``compact_blocks``) and says why (``reasons``).
    """

    def __init__(self, router: InstalledRouter, model: nn.Module, blocks: list[nn.Module], names: list[str],
                 config: RoutingConfig):
        self.router, self.blocks = router, blocks
        # Refused before anything is installed: a refusal leaves the model as it was.
        self.fused_loss_model = fused_loss_target(model) if config.fused_loss else None
        self.handles: list = []
        self.patched: list[tuple[nn.Module, Any]] = []  # (module, its instance-level forward before, or None)
        self.checkpoints: list[tuple[nn.Module, Any]] = []  # (block, its own checkpoint function)
        self.handles.append(model.register_forward_pre_hook(router.start_forward, with_kwargs=True))
        self.handles.append(model.register_forward_hook(router.plan_forward, with_kwargs=True))
        self.handles.append(model.register_forward_hook(router.close_forward, always_call=True))
        self.sparse_blocks: list[bool] = []
        self.compact_blocks: list[str | None] = []
        self.reasons: list[str] = []
        for i, block in enumerate(blocks):
            sparse, family, reason = config.mode == "sparse", None, "mode='mask'"
            if sparse:
                bad = unsupported_parametrised_modules(block)
                if bad:
                    sparse, reason = False, f"parametrised layers sparse mode cannot route ({', '.join(bad)})"
                    logger.warning("cggr: %s has %s; it uses mask mode", names[i], reason)
            if sparse:
                for sub in block.modules():
                    if is_routable_linear(sub):
                        self.patch_forward(sub, LinearForward(router, sub, i))
                    elif is_moe_router(sub):
                        self.patch_forward(sub, MoERouterForward(router, sub, i))
                    elif is_fused_experts(sub):
                        self.patch_forward(sub, ExpertsForward(router, sub, i))
                found, reason = choose_backward(model, block, config)
                if found is not None:
                    family = found.backward.name
                    self.patch_forward(block, CompactedForward(router, block, i, found.backward, found.spec,
                                                               block.forward, found.returns_tuple))
            self.sparse_blocks.append(sparse)
            self.compact_blocks.append(family)
            self.reasons.append(reason)
            self.handles.append(block.register_forward_hook(BlockGate(router, i, names[i]), with_kwargs=True))
        self.names = names
        if self.fused_loss_model is not None:
            self.patch_forward(self.fused_loss_model,
                               FusedLossForward(self.fused_loss_model, router, grad_norm=config.importance == "loss"))
        # Every container inside the blocks and the children it held at install. Checked at each training
        # forward (a few dictionary look-ups per module): no global module-registration hook, which would
        # make dynamo guard on a counter that HF bumps in every forward (``self.layers[:n]`` builds a list).
        self._structure = [[(parent, tuple(parent._modules.items())) for parent in block.modules()]
                           for block in blocks]

    def describe(self, head: str, ran: set[int] | None) -> str:
        """One line per block: the backward it takes and why; ``ran``: the blocks the last forward compacted."""
        lines = [head]
        for i, name in enumerate(self.names):
            family = self.compact_blocks[i]
            kind = "mask" if not self.sparse_blocks[i] else f"compacted ({family})" if family else "generic"
            took = "" if ran is None or not family else (
                "; last forward: compacted" if i in ran else "; last forward: generic (this call could not take it)")
            lines.append(f"  {name}: {kind} - {self.reasons[i]}{took}")
        if self.fused_loss_model is not None:
            lines.append(f"  loss: cggr's fused linear cross-entropy in {type(self.fused_loss_model).__name__}'s "
                         "training forwards with labels (fused_loss=True; no logits returned)")
        return "\n".join(lines)

    def changed_blocks(self) -> list[str]:
        """Names of the blocks whose modules changed since install (PEFT's get_peft_model after attach, say):
        their new modules were never patched, so they must not be routed as they are."""
        return [name for name, parents in zip(self.names, self._structure)
                if any(len(p._modules) != len(items) or any(p._modules.get(n) is not c for n, c in items)
                       for p, items in parents)]
    def patch_forward(self, module: nn.Module, forward) -> None:
        self.patched.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def bind_checkpoints(self) -> None:
        """Wrap each HF block's checkpoint function (set by ``gradient_checkpointing_enable``, possibly after
        attach, hence called at every training forward)."""
        router = self.router
        for block in self.blocks:
            fn = block.__dict__.get("_gradient_checkpointing_func")
            if fn is None or (isinstance(fn, CheckpointWithRouting) and fn.router is router):
                continue
            block._gradient_checkpointing_func = CheckpointWithRouting(router, block, fn)
            self.checkpoints.append((block, fn))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for module, previous in reversed(self.patched):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self.patched.clear()
        for block, previous in self.checkpoints:
            if isinstance(block.__dict__.get("_gradient_checkpointing_func"), CheckpointWithRouting):
                block._gradient_checkpointing_func = previous
        self.checkpoints.clear()
