"""The router's lifecycle: ``cggr.attach(model, ...)`` installs it, ``router.detach()`` removes it.

A routed training forward goes one way through small stages, each in its own module:

1. :mod:`cggr.tokens`: at the forward's start, the token grid and its valid tokens;
2. :mod:`cggr.plan`: at its end, scores (only where the policy needs them) -> order -> buckets -> the depth
   of every token and every block's active rows, in a :class:`~cggr.routing.Routing`;
3. :mod:`cggr.install`: the routed ops the forward ran captured that Routing object when they ran, so their
   backward (:mod:`cggr.sparse`, :mod:`cggr.compact`, :mod:`cggr.moe`) uses exactly the routing of its own
   forward.

The router itself only holds the lifecycle: install, the hand-off of the running forward's routing (live
from the forward's start to its end, never after), the curriculum step and its state, metrics, detach. What
the installed pieces call on it, its hooks on the model included, is :class:`cggr.install.InstalledRouter`:
public methods only.
Routing happens only when the model is in training mode with gradients enabled; otherwise every patched
forward and hook passes through untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from typing import Any

import torch
import torch.nn as nn

from . import install
from ._host import HostCopy
from .adapters import block_names, default_label_shift, find_layer_stack, model_type
from .bucketing import schedule_progress
from .config import RoutingConfig, as_number, resolve_config
from .plan import NonfiniteReport, Planner
from .routing import Routing
from .scoring import Scores, loss_gradient_norm
from .tokens import (find_logits, find_scores, input_device, input_tokens_shape, label_targets, no_logits_error,
                     valid_tokens)

logger = logging.getLogger("cggr")

VALID_MASK_KWARG = "cggr_valid_mask"


class _Forward:
    """What one routed training forward knows between its start and its end."""

    def __init__(self, routing: Routing, tokens_shape, extra_valid):
        self.routing = routing
        self.tokens_shape = tokens_shape
        self.extra_valid = extra_valid
        self.valid: torch.Tensor | None = None
        self.num_valid: HostCopy | None = None
        self.block_rows: set[int] = set()
        self.scores: Scores | None = None  # per-token scores the loss cggr installed handed over (take_scores)

    def check_rows(self, name: str, h: torch.Tensor) -> None:
        """A block output must keep one row per token, in the input's token order (else routing is wrong)."""
        shape = self.tokens_shape
        rows = h.numel() // max(1, h.shape[-1])
        if shape is None:
            self.block_rows.add(rows)  # checked against the logits at the forward's end
        elif h.dim() - 1 == len(shape) and tuple(h.shape[:-1]) != tuple(shape):
            raise ValueError(f"cggr: {name} returned rows shaped {tuple(h.shape[:-1])} but the input tokens are "
                             f"{tuple(shape)}: the routed stack must keep one row per token in the input's order "
                             "(a sequence-first [S, B, D] stack routes the wrong tokens)")
        elif h.dim() - 1 != len(shape) and rows != shape.numel():
            raise ValueError(f"cggr: {name} returned {rows} rows but the batch has {shape.numel()} tokens; the "
                             "routed stack must keep one row per token")


class Router(nn.Module):
    """Routes one model's backward pass. Build it with :func:`attach`.

    Holds the curriculum step as a registered buffer (``step_count``) so that
    ``state_dict()`` / ``load_state_dict()`` save and restore it.
    """

    def __init__(self, model: nn.Module, config: RoutingConfig):
        super().__init__()
        if not isinstance(config, RoutingConfig):
            raise TypeError(f"Router(model, config) takes a cggr.RoutingConfig, got {type(config).__name__}; "
                            "cggr.attach(model, ...) builds the router from options by name")
        self.config = config
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self._step = 0  # host mirror of step_count: reading the buffer would synchronise
        self._micro = 0
        self._progress_override: float | None = None
        self.register_load_state_dict_post_hook(Router._sync_step_mirror)
        object.__setattr__(self, "_model", model)  # not a submodule: its weights are not ours
        self.layer_path, blocks = find_layer_stack(model, config.layers)
        _refuse_second_router(model, blocks)
        install.refuse_unroutable_stack(blocks)
        object.__setattr__(self, "_blocks", blocks)
        self.num_layers = len(blocks)
        self.block_names = block_names(model, blocks)
        self.label_shift = config.label_shift if config.label_shift is not None else default_label_shift(model)
        self._drop_cache = _accepts_use_cache(model)
        self.routing: Routing | None = None  # the last training forward's routing
        self._forward: _Forward | None = None  # the running forward, between its start and its end
        self._warned: set[str] = set()
        self._nonfinite = NonfiniteReport()
        self._measured_step: int | None = None  # variance_budget: the optimizer step last measured
        self._probe = None  # ... and its measurement, until its backward has recorded every block
        self._install()
        if config.num_buckets > self.num_layers and config.depths is None and config.block_fractions is None:
            self._warn_once("buckets", f"num_buckets={config.num_buckets} exceeds the {self.num_layers} blocks "
                                       f"of the stack: bucket depths collapse to {self.targets}")
        object.__setattr__(model, "_cggr_router", self)
        _LIVE_ROUTERS.add(self)
        logger.info("cggr: attached\n%s", self.describe())

    # ------------------------------------------------------------------ public
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self._blocks)

    @property
    def progress(self) -> float:
        """Curriculum progress in [0, 1]: 0 = every token at full depth, 1 = the target depths."""
        if self._progress_override is not None:
            return self._progress_override
        c = self.config
        return schedule_progress(self._step, c.warmup_steps, c.total_steps, c.handback_steps)

    def set_progress(self, progress: float | None) -> None:
        """Drive the curriculum by something other than the step count (a wall-clock budget, say).

        ``progress`` in [0, 1] replaces the step-based schedule until ``set_progress(None)``.
        """
        if progress is not None:
            p = as_number(progress)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"set_progress: progress must be None or a number in [0, 1] (None: the step-based "
                                 f"schedule again), got {progress!r}")
            progress = p
        self._progress_override = progress

    def bucket_depths(self) -> list[int]:
        """Depth in blocks of each bucket at the current curriculum step, hardest first."""
        return self._planner.bucket_depths(self.progress)

    def step(self) -> None:
        """Advance the curriculum by one optimizer step."""
        self.step_count += 1
        self._step += 1
        self._micro = 0

    def attach_optimizer(self, optimizer: torch.optim.Optimizer):
        """Advance the curriculum after every ``optimizer.step()``; returns a removable handle."""
        return optimizer.register_step_post_hook(self.after_optimizer_step)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """The optimizer's step post-hook that :meth:`attach_optimizer` registers: :meth:`step`."""
        self.step()

    def metrics(self) -> dict[str, float]:
        """Flat dict of Python numbers about the last training forward (synchronises once)."""
        out: dict[str, float] = {"step": float(self._step), "warmup_progress": self.progress}
        r = self.routing
        if r is None or not r.metrics:
            return out
        names = list(r.metrics)
        values = torch.stack([r.metrics[n].float().reshape(()) for n in names]).tolist()
        out.update(zip(names, values))
        return out

    def describe(self) -> str:
        """Which backward each block takes and why (the last forward's compacted blocks, once one ran)."""
        head = (f"{self.layer_path} ({self.num_layers} blocks, model_type {model_type(self._model)!r}, "
                f"label_shift {self.label_shift}):")
        return self._installation.describe(head, None if self.routing is None else self.routing.compact_blocks)

    def detach(self) -> nn.Module:
        """Remove every hook and patched forward; returns the model as it was."""
        self._installation.remove()
        self._forward = None
        if getattr(self._model, "_cggr_router", None) is self:
            object.__delattr__(self._model, "_cggr_router")
        _LIVE_ROUTERS.discard(self)
        return self._model

    def extra_repr(self) -> str:
        c = self.config
        return (f"layers={self.layer_path!r} ({self.num_layers} blocks), num_buckets={c.num_buckets}, "
                f"warmup_steps={c.warmup_steps}, mode={c.mode!r}, policy={c.policy!r}, leak_rate={c.leak_rate}, "
                f"buckets={c.buckets!r}, inactive={c.inactive!r}, placement={c.placement!r}, dense_ends={c.dense_ends}")

    def _install(self) -> None:
        self._installation = install.Installation(self, self._model, self._blocks, self.block_names, self.config)
        self.sparse_blocks = self._installation.sparse_blocks
        self.compact_blocks = self._installation.compact_blocks  # family of each block's compacted backward, or None
        self.backward_reasons = self._installation.reasons
        self._planner = Planner(self.config, self.num_layers, self.sparse_blocks)
        self.targets = self._planner.targets

    def _reinstall_if_changed(self) -> None:
        """Modules replaced inside the blocks since attach (PEFT's get_peft_model after attach, say) were never
        patched: routing them as they are would give wrong gradients, so the routing is installed anew on them."""
        changed = self._installation.changed_blocks()
        if changed:
            self._installation.remove()
            self._install()
            self._warn_once("reinstalled", f"the modules inside {', '.join(changed[:3])}"
                                           f"{' and others' if len(changed) > 3 else ''} changed after cggr.attach "
                                           "(e.g. PEFT's get_peft_model): cggr installed its routing on them anew")

    # -------------------------------------------- hand-off to the routed ops
    def current_routing(self) -> Routing | None:
        """The routing of the running training forward; None outside one (then routed ops pass through)."""
        f = self._forward
        return None if f is None else f.routing

    @contextlib.contextmanager
    def routing_of(self, routing: Routing | None):
        """Run with ``routing`` as the current one (activation checkpointing replays a block with its own)."""
        previous = self._forward
        self._forward = None if routing is None else _Forward(routing, None, None)
        try:
            yield
        finally:
            self._forward = previous

    def take_scores(self, scores: Scores) -> None:
        """Per-token scores of the running training forward, from the loss cggr installed in it
        (``fused_loss=True``: :class:`cggr.hf_loss.FusedLossForward`); the forward's end routes by them instead
        of by logits. Outside a routed training forward there is nothing to route and they are dropped. (A
        model's own forward that computes :func:`cggr.loss.linear_cross_entropy` returns its scores instead.)"""
        if self._forward is not None:
            self._forward.scores = scores

    def check_block_rows(self, name: str, h: torch.Tensor) -> None:
        """A routed block's output must keep one row per token, in the input's token order."""
        if self._forward is not None:
            self._forward.check_rows(name, h)

    # ------------------------------------- the model's hooks (cggr.install.InstalledRouter)
    @torch._dynamo.disable  # the decision point runs eagerly under torch.compile: a clean graph break
    def start_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The model's forward pre-hook (docs/design.md §2.2): in a training forward, the token grid, its valid
        tokens (their number on its way to the host) and the forward's new :class:`Routing`, current until
        :meth:`close_forward`; returns the call's ``(args, kwargs)`` (``cggr_valid_mask`` taken out, ``use_cache``
        off where cggr may). Outside training it only ends what an earlier forward left."""
        self._nonfinite.report()
        if self._probe is not None and self._probe.complete():  # the measured backward has run
            self._planner.measure_budget(self._probe)
            self._probe = None
        extra = kwargs.pop(VALID_MASK_KWARG, None)
        self._forward = None
        if not (module.training and torch.is_grad_enabled()):
            return args, kwargs
        self._reinstall_if_changed()
        self._installation.bind_checkpoints()
        tokens_shape = input_tokens_shape(args, kwargs)
        routing = Routing(num_layers=self.num_layers, leak_rate=self.config.leak_rate, inactive=self.config.inactive,
                          reweighted=self.config.estimator == "unbiased")
        f = _Forward(routing, tokens_shape, extra)
        device = input_device(args, kwargs)
        if tokens_shape is not None and device is not None:
            # The valid tokens are known before the forward runs: their number starts its way to the host
            # now and is read once the forward is done (without waiting for the forward's GPU work).
            f.valid = self._valid(tokens_shape, kwargs, extra, device)
            if self._planner.needs_counts and not self._global_buckets():
                f.num_valid = HostCopy(f.valid.sum())
        if self._drop_cache and "use_cache" not in kwargs:
            if "position_ids" in kwargs:
                # HF builds a block-diagonal mask for restarting position_ids (packed sequences) only without a
                # cache: switching the cache off would change the model's attention. The user decides.
                self._warn_once("use_cache", "position_ids are given, so cggr leaves use_cache as it is; HF then "
                                             "builds a KV cache, which keeps blocks off the compacted backward. "
                                             "Pass use_cache=False for the fast path (HF then treats restarting "
                                             "position_ids as packed sequences)")
            else:
                kwargs["use_cache"] = False  # a KV cache is useless in a training forward and blocks the fast path
        self._forward = f
        return args, kwargs

    @torch._dynamo.disable  # the decision point runs eagerly under torch.compile: a clean graph break
    def plan_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """The model's forward hook (docs/design.md §2.3): the planner decides the running forward's routing from
        its output (logits, or a fused loss's scores) before any backward can run; returns None (the output is
        the model's)."""
        f = self._forward
        if f is None:
            return None
        logits = find_logits(output, f.tokens_shape)
        scores = f.scores if f.scores is not None else find_scores(output)  # a fused loss's, in or from the forward
        if logits is None and scores is None and (self._planner.needs_scores or f.tokens_shape is None):
            raise no_logits_error(output, f.tokens_shape, self.config.policy)
        shape = f.tokens_shape if f.tokens_shape is not None else (
            logits.shape[:-1] if logits is not None else scores.difficulty.shape)
        if scores is not None:
            if tuple(scores.difficulty.shape) != tuple(shape):
                raise ValueError(f"cggr: the fused loss scored tokens shaped {tuple(scores.difficulty.shape)} but the "
                                 f"input tokens are {tuple(shape)}; it must score every input position")
            logits = None  # the fused loss's scores are the logits' scores
        if logits is not None and tuple(logits.shape[:-1]) != tuple(shape):
            raise ValueError(f"cggr: logits have leading shape {tuple(logits.shape[:-1])} but the input tokens have "
                             f"shape {tuple(shape)}; routing needs one logits row per token")
        if f.block_rows - {shape.numel()}:
            raise ValueError(f"cggr: blocks produced {sorted(f.block_rows)} rows but the logits have "
                             f"{shape.numel()} tokens; the routed stack must keep one row per token")
        device = (logits.device if logits is not None else scores.difficulty.device if scores is not None
                  else f.valid.device)
        valid = f.valid.to(device) if f.valid is not None else self._valid(shape, kwargs, f.extra_valid, device)
        seed = self.config.seed * 1_000_003 + _rank() * 100_003 + self._step * 1009 + self._micro
        measure = self._measure_now()
        r, nonfinite = self._planner.decide_into(
            f.routing, valid, None if logits is None else logits.detach(), scores=scores, progress=self.progress,
            draw_seed=seed,
            num_valid=None if f.num_valid is None else f.num_valid.get(), global_buckets=self._global_buckets(),
            importance=self._loss_importance(logits, scores, kwargs, shape), measure=measure)
        if measure:
            self._probe, self._measured_step = r.probe, self._step
        self._nonfinite.offer(nonfinite)
        self.routing = r
        self._micro += 1
        return None

    @torch._dynamo.disable  # the decision point runs eagerly under torch.compile: a clean graph break
    def close_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        """The model's forward hook that always runs, even when the forward raised: the routing is live only
        inside its own forward (its backward keeps the object its ops captured)."""
        self._forward = None

    def _measure_now(self) -> bool:
        """variance_budget: measure the first forward of every ``variance_every``-th optimizer step (once)."""
        c = self.config
        return (c.variance_budget is not None and self._micro == 0 and self._step % c.variance_every == 0
                and self._measured_step != self._step)

    def _loss_importance(self, logits, scores, kwargs, shape) -> torch.Tensor | None:
        """importance="loss": each token's ``||softmax(z) - onehot(y)||``, from the fused loss's scores or from the
        logits and the labels; None for the other importances."""
        c = self.config
        if c.importance != "loss":
            return None
        if scores is not None and scores.grad_norm is not None:
            return scores.grad_norm
        labels = kwargs.get("labels")
        if logits is None or not isinstance(labels, torch.Tensor):
            raise ValueError("cggr: importance='loss' draws tokens by the size of their loss gradient at the logits, "
                             "which needs the logits and the labels in the forward (labels=... to a Hugging Face "
                             "model, or fused_loss=True); this forward gave "
                             + ("no labels" if logits is not None else "no logits (a fused loss of another library?)"))
        targets = label_targets(labels, shape, self.label_shift, c.ignore_index)
        return loss_gradient_norm(logits.detach(), targets.to(logits.device), c.ignore_index)

    def _valid(self, shape, kwargs, extra, device) -> torch.Tensor:
        return valid_tokens(shape, device, attention_mask=kwargs.get("attention_mask"), labels=kwargs.get("labels"),
                            label_shift=self.label_shift, ignore_index=self.config.ignore_index, extra=extra,
                            extra_name=VALID_MASK_KWARG)

    def _global_buckets(self) -> bool:
        return self.config.buckets == "global" and _world_size() > 1

    # ------------------------------------------------------------ diagnostics
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("cggr: %s", message)

    @staticmethod
    def _sync_step_mirror(module, incompatible_keys) -> None:
        module._step = int(module.step_count)

    def __getstate__(self):
        # A pickled router carries no forward in flight.
        state = super().__getstate__()
        return {**state, "_forward": None}

    def __setstate__(self, state):
        # A deep copy or an unpickled router routes its own copy of the model: attached like the original (its
        # model may not hold it yet while the copy is being built; attach checks that, see _refuse_second_router).
        super().__setstate__(state)
        _LIVE_ROUTERS.add(self)


# The attached routers (deep copies and unpickled ones included), so that attach can refuse a second router on
# a module nested with an attached one's model. Weak: a router goes away with its model.
_LIVE_ROUTERS: "weakref.WeakSet[Router]" = weakref.WeakSet()


def _refuse_second_router(model: nn.Module, blocks: list[nn.Module]) -> None:
    """One router per model: two on nested modules (``cggr.attach(m.model)`` and ``cggr.attach(m)``, either order)
    or on modules sharing blocks would both route one backward, and the gradients would match neither routing."""
    if getattr(model, "_cggr_router", None) is not None:
        raise ValueError(f"cggr is already attached to this model ({type(model).__name__}); call .detach() on its "
                         "router first (the Router that cggr.attach returned, also at model._cggr_router)")
    inside = {id(m): name for name, m in model.named_modules()}
    ours = {id(b) for b in blocks}
    for other in list(_LIVE_ROUTERS):
        owner = other._model
        if getattr(owner, "_cggr_router", None) is not other:
            continue  # detached
        kind = type(owner).__name__
        if id(owner) in inside:
            where = f"its submodule {inside[id(owner)]!r} ({kind}) already carries a cggr router"
            router = f"model.{inside[id(owner)]}._cggr_router"
        elif any(m is model for m in owner.modules()):
            path = next(name for name, m in owner.named_modules() if m is model)
            where = f"it is the submodule {path!r} of the {kind} that already carries a cggr router"
            router = f"that {kind}'s ._cggr_router"
        elif ours & {id(b) for b in other._blocks}:
            where = f"its blocks are the blocks {other.layer_path!r} of the {kind} that already carries a cggr router"
            router = f"that {kind}'s ._cggr_router"
        else:
            continue
        raise ValueError(f"cggr.attach: cannot attach to this {type(model).__name__}: {where}; two routers on one "
                         "backward give gradients that match neither routing. Attach to one module only: call "
                         f".detach() on the other router first (the Router that cggr.attach returned, also at "
                         f"{router})")


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _accepts_use_cache(model: nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _refuse_wrappers(model: nn.Module) -> None:
    """cggr goes on the model itself, before DDP / DataParallel / torch.compile wrap it.

    On a wrapper it would route the wrong tokens: the label shift and the KV-cache switch are read from
    the model's class and forward signature, which a wrapper hides. (FSDP2's ``fully_shard`` keeps the
    model's class, so either order works there.)
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    name = type(model).__name__
    if isinstance(model, (DataParallel, DistributedDataParallel)) or name == "OptimizedModule":
        wrap = "torch.compile" if name == "OptimizedModule" else name
        raise ValueError(f"cggr.attach got a {name} wrapper: attach cggr to the model first, then wrap it "
                         f"(router = cggr.attach(model); model = {wrap}(model))")


def attach(model: nn.Module, config: RoutingConfig | None = None, **overrides: Any) -> Router:
    """Install cggr's gradient routing on ``model`` in place and return its :class:`Router`.

    Args:
        model: a module whose forward returns logits (a tensor, a tuple holding them, or ``.logits``); with
            ``policy="random"`` (the default) a forward that returns only a fused loss works too, and under every
            policy one that returns :func:`cggr.loss.linear_cross_entropy`'s loss with its scores.
        config: a :class:`cggr.RoutingConfig` (second argument or ``config=``); None = the defaults.
        **overrides: any field of :class:`cggr.RoutingConfig` by name (``num_buckets=4``, ``policy="random"``,
            ``layers="model.layers"``, ...), applied over ``config``. Each field's docstring says what it does.
    """
    config = resolve_config(config, overrides, "cggr.attach")
    _refuse_wrappers(model)
    return Router(model, config)
