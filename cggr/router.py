"""The in-place router: ``cggr.attach(model, ...)``.

It installs, on the model object itself (an HF model stays the same object, so
``save_pretrained``, ``generate``, PEFT and Trainer keep working):

* a forward pre-hook on the model that opens a new :class:`Routing` for each
  training forward;
* in sparse mode, a routed forward on every linear of every routable block
  (:class:`~cggr.sparse.RoutedLinear`) and on HF's MoE routers and fused
  experts (:mod:`cggr.moe`), and on every block a gradient gate of its output
  (:class:`~cggr.sparse.GateRows`);
* a forward hook on the model that scores the logits, buckets the tokens and
  fills the routing in, before any backward can run.

Routing happens only when the model is in training mode with gradients
enabled; otherwise every hook passes through untouched.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Sequence

import torch
import torch.nn as nn

from .adapters import (block_names, default_label_shift, find_layer_stack, is_fused_experts, is_moe_router,
                       is_routable_linear, unsupported_parametrised_modules, weight_in_out)
from .compact import compact_family, make_compact_forward
from .bucketing import (POLICY_FNS, buckets_to_depths, curriculum_depths, rank_buckets, rank_buckets_global,
                        schedule_progress, target_depths)
from .config import RoutingConfig
from .moe import RoutedExperts
from .routing import Routing, block_counts
from .scoring import score_difficulty
from .sparse import GateRows, RoutedLinear

logger = logging.getLogger("cggr")

VALID_MASK_KWARG = "cggr_valid_mask"


def _extract_logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        "cggr: the routed model's forward must return logits: a tensor, a tuple whose first item is the "
        f"logits, or an object with .logits; got {type(output).__name__}")


def _input_tokens_shape(args, kwargs) -> torch.Size | None:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    if isinstance(ids, torch.Tensor):
        return ids.shape
    emb = kwargs.get("inputs_embeds")
    if isinstance(emb, torch.Tensor):
        return emb.shape[:-1]
    return None


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


class Router(nn.Module):
    """Routes one model's backward pass. Build it with :func:`attach`.

    Holds the curriculum step as a registered buffer (``step_count``) so that
    ``state_dict()`` / ``load_state_dict()`` save and restore it.
    """

    def __init__(self, model: nn.Module, config: RoutingConfig, layers=None):
        super().__init__()
        if getattr(model, "_cggr_router", None) is not None:
            raise ValueError("cggr is already attached to this model; call .detach() on its router first")
        self.config = config
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self._step = 0  # host mirror of step_count: reading the buffer would synchronise
        self._progress_override: float | None = None
        self.register_load_state_dict_post_hook(Router._sync_step_mirror)
        object.__setattr__(self, "_model", model)  # not a submodule: its weights are not ours
        self.layer_path, blocks = find_layer_stack(model, layers)
        object.__setattr__(self, "_blocks", blocks)
        self.num_layers = len(blocks)
        self.block_names = block_names(model, blocks)
        self.label_shift = config.label_shift if config.label_shift is not None else default_label_shift(model)
        self.targets = target_depths(self.num_layers, config.num_buckets, config.depths)
        self.sparse_blocks: list[bool] = []
        self.compact_blocks: list[str | None] = []  # family of each block's compacted backward, or None
        self._drop_cache = _accepts_use_cache(model)
        self.routing: Routing | None = None  # the last training forward's routing
        self._current: Routing | None = None  # what routed ops of the running forward capture
        self._forward_state: dict[str, Any] = {}
        self._micro = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        self._warned: set[str] = set()
        self._nonfinite_pending = None
        self._constants: dict[tuple, torch.Tensor] = {}
        self._handles: list = []
        self._patched: list[tuple[nn.Module, Any]] = []
        self._checkpoint_patched: list[tuple[nn.Module, Any]] = []  # (block, its own checkpoint function)
        if config.num_buckets > self.num_layers and config.depths is None:
            self._warn_once("buckets", f"num_buckets={config.num_buckets} exceeds the {self.num_layers} blocks "
                                       f"of the stack: bucket depths collapse to {self.targets}")
        self._install()
        object.__setattr__(model, "_cggr_router", self)

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
            p = float(progress)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"progress must be None or a number in [0, 1], got {progress!r}")
            progress = p
        self._progress_override = progress

    def bucket_depths(self) -> list[int]:
        """Depth in blocks of each bucket at the current curriculum step, hardest first."""
        return curriculum_depths(self.targets, self.num_layers, self.progress)

    def step(self) -> None:
        """Advance the curriculum by one optimizer step."""
        self.step_count += 1
        self._step += 1
        self._micro = 0

    def attach_optimizer(self, optimizer: torch.optim.Optimizer):
        """Advance the curriculum after every ``optimizer.step()``; returns a removable handle."""
        return optimizer.register_step_post_hook(lambda *_: self.step())

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

    def detach(self) -> nn.Module:
        """Remove every hook and patched forward; returns the model as it was."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, previous in reversed(self._patched):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._patched.clear()
        for block, previous in self._checkpoint_patched:
            if getattr(block.__dict__.get("_gradient_checkpointing_func"), "_cggr_router", None) is self:
                block._gradient_checkpointing_func = previous
        self._checkpoint_patched.clear()
        self._current = None
        if getattr(self._model, "_cggr_router", None) is self:
            object.__delattr__(self._model, "_cggr_router")
        return self._model

    def extra_repr(self) -> str:
        c = self.config
        return (f"layers={self.layer_path!r} ({self.num_layers} blocks), num_buckets={c.num_buckets}, "
                f"warmup_steps={c.warmup_steps}, mode={c.mode!r}, policy={c.policy!r}, leak_rate={c.leak_rate}, "
                f"buckets={c.buckets!r}")

    # ------------------------------------------------------------- installing
    def _install(self) -> None:
        m = self._model
        self._handles.append(m.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._handles.append(m.register_forward_hook(self._post_forward, with_kwargs=True))
        for i, block in enumerate(self._blocks):
            sparse = self.config.mode == "sparse"
            if sparse:
                bad = unsupported_parametrised_modules(block)
                if bad:
                    sparse = False
                    self._warn_once(f"fallback{i}", f"{self.block_names[i]} has parametrised layers sparse mode "
                                                    f"cannot route ({', '.join(bad)}); it uses mask mode")
            self.sparse_blocks.append(sparse)
            family = None
            if sparse:
                for m in block.modules():
                    if is_routable_linear(m):
                        self._patch_linear(m, i)
                    elif is_moe_router(m):
                        self._patch_moe_router(m, i)
                    elif is_fused_experts(m):
                        self._patch_experts(m, i)
                found = compact_family(block) if self.config.backward == "auto" else None
                if found is not None:
                    family, spec = found
                    self._patch_forward(block, make_compact_forward(lambda: self._current, block, i, family, spec,
                                                                    block.forward))
            self.compact_blocks.append(family)
            self._handles.append(block.register_forward_hook(self._make_block_hook(i)))

    def _patch_forward(self, module: nn.Module, forward) -> None:
        self._patched.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def _patch_linear(self, lin: nn.Module, block_index: int) -> None:
        plain_forward = lin.forward
        in_out = weight_in_out(lin)
        router = self

        def routed_forward(x, *args, **kwargs):
            r = router._current
            if r is None or args or kwargs:
                return plain_forward(x, *args, **kwargs)
            return RoutedLinear.apply(x, lin.weight, lin.bias, r, block_index, in_out)

        self._patch_forward(lin, routed_forward)

    def _patch_moe_router(self, gate: nn.Module, block_index: int) -> None:
        plain_forward = gate.forward
        router = self

        def routed_forward(*args, **kwargs):
            out = plain_forward(*args, **kwargs)
            r = router._current
            if r is None:
                return out
            # Inside the forward, so every hook (HF's recorder of router logits for the aux loss) sees it.
            return tuple(GateRows.apply(t, r, block_index) if isinstance(t, torch.Tensor) and t.is_floating_point()
                         else t for t in out)

        self._patch_forward(gate, routed_forward)

    def _patch_experts(self, experts: nn.Module, block_index: int) -> None:
        plain_forward = experts.forward
        router = self

        def routed_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            r = router._current
            if r is None:
                return plain_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            if args or kwargs:  # a call this path does not know: still exact, gating the output rows
                return GateRows.apply(plain_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs),
                                      r, block_index)
            return RoutedExperts.apply(hidden_states, top_k_weights, top_k_index, r, block_index, experts,
                                       plain_forward, *experts.parameters())

        self._patch_forward(experts, routed_forward)

    def _make_block_hook(self, i: int):
        def hook(module, args, out):
            r = self._current
            if r is None or i in r.compact_blocks:  # a compacted backward gates its own output rows
                return out
            h = _first_tensor(out)
            if h is None:
                raise TypeError(f"cggr: {self.block_names[i]} returned {type(out).__name__}; "
                                "a routed block must return a tensor or a tuple starting with one")
            self._forward_state.setdefault("block_rows", set()).add(h.numel() // max(1, h.shape[-1]))
            gated = GateRows.apply(h, r, i)
            if isinstance(out, torch.Tensor):
                return gated
            return type(out)((gated, *out[1:])) if isinstance(out, tuple) else [gated, *out[1:]]
        return hook

    # ---------------------------------------------------------------- forward
    def _pre_forward(self, module, args, kwargs):
        self._report_nonfinite()
        extra = kwargs.pop(VALID_MASK_KWARG, None)
        if module.training and torch.is_grad_enabled():
            self._bind_routing_to_checkpoints()
            self._current = Routing(num_layers=self.num_layers, leak_rate=self.config.leak_rate)
            tokens_shape = _input_tokens_shape(args, kwargs)
            am = kwargs.get("attention_mask")
            if (tokens_shape is not None and isinstance(am, torch.Tensor) and am.dim() == len(tokens_shape)
                    and am.shape != tokens_shape):
                raise ValueError(f"cggr: attention_mask has shape {tuple(am.shape)} but the input tokens have "
                                 f"shape {tuple(tokens_shape)}")
            self._forward_state = {"valid_mask": extra, "tokens_shape": tokens_shape}
            device = _input_device(args, kwargs)
            if tokens_shape is not None and device is not None:
                # The valid tokens are known before the forward runs: their number starts its way to the host
                # now and is read once the forward is done (without waiting for the forward's GPU work).
                valid = self._forward_state["valid"] = self._valid_mask(tokens_shape, kwargs, device)
                if self._needs_counts():
                    self._forward_state["num_valid"] = _copy_to_host_later(valid.sum())
            if self._drop_cache and "use_cache" not in kwargs:
                kwargs["use_cache"] = False  # a KV cache is useless in a training forward and blocks the fast path
        else:
            self._current = None
            self._forward_state = {}
        return args, kwargs

    def _bind_routing_to_checkpoints(self) -> None:
        """Make activation checkpointing replay a block with the routing of the forward that ran it.

        A checkpointed block runs its forward again during backward, and the
        routed ops read ``_current`` when they run: by then it may hold another
        forward's routing, or None after an evaluation forward. Reentrant
        checkpointing then builds the block's gradient graph with the wrong rows;
        non-reentrant checkpointing fails on recomputed tensors of other shapes.
        HF layers checkpoint through ``_gradient_checkpointing_func``, set by
        ``gradient_checkpointing_enable`` (possibly after ``attach``, hence this
        check at every training forward); the wrapper closes the routing of the
        first run over the function the checkpoint replays.
        """
        for block in self._blocks:
            fn = block.__dict__.get("_gradient_checkpointing_func")
            if fn is None or getattr(fn, "_cggr_router", None) is self:
                continue
            block._gradient_checkpointing_func = self._checkpoint_with_routing(fn, block)
            self._checkpoint_patched.append((block, fn))

    def _checkpoint_with_routing(self, checkpoint_fn, block: nn.Module):
        router = self

        def checkpoint_with_routing(function, *args, **kwargs):
            routing = router._current
            routes = getattr(block.__dict__.get("forward"), "cggr_routes_call", None)
            if routes is not None and args and routes(args[0], args[1:], getattr(function, "keywords", {})):
                # A compacted block checkpoints itself, routed (older HF layers checkpoint in __call__).
                return function(*args, **kwargs)

            def replay(*a, **k):
                previous, router._current = router._current, routing
                try:
                    return function(*a, **k)
                finally:
                    router._current = previous

            return checkpoint_fn(replay, *args, **kwargs)

        checkpoint_with_routing._cggr_router = self
        return checkpoint_with_routing

    def _post_forward(self, module, args, kwargs, output):
        r = self._current
        if r is None:
            return None
        logits = _extract_logits(output)
        tokens_shape = logits.shape[:-1]
        expected = self._forward_state.get("tokens_shape")
        if expected is not None and tuple(expected) != tuple(tokens_shape):
            raise ValueError(f"cggr: logits have leading shape {tuple(tokens_shape)} but the input tokens have "
                             f"shape {tuple(expected)}; routing needs one logits row per token")
        n = tokens_shape.numel()
        rows = self._forward_state.get("block_rows", set())
        if rows - {n}:
            raise ValueError(f"cggr: blocks produced {sorted(rows)} rows but the logits have {n} tokens; "
                             "the routed stack must keep one row per token")
        valid = self._forward_state.get("valid")
        valid = self._valid_mask(tokens_shape, kwargs, logits.device) if valid is None else valid.to(logits.device)
        self._route(r, logits.detach(), valid, self._forward_state.get("num_valid"))
        if self._needs_counts():
            # Global buckets: the counts are read back from the device, the step's one host synchronisation,
            # here rather than mid-backward. Otherwise _route has set them from the host (no-op here).
            r.plan()
        self.routing = r
        self._micro += 1
        return None

    def _valid_mask(self, shape: torch.Size, kwargs, device) -> torch.Tensor:
        valid = torch.ones(shape, dtype=torch.bool, device=device)
        am = kwargs.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() == len(shape):
            if am.shape != shape:
                raise ValueError(f"cggr: attention_mask has shape {tuple(am.shape)}, logits have {tuple(shape)} tokens")
            valid &= am.to(device) != 0
        elif isinstance(am, torch.Tensor):
            self._warn_once("am", f"attention_mask of shape {tuple(am.shape)} is not one entry per token; "
                                  "cggr does not use it to find padding")
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == len(shape) and not labels.is_floating_point():
            if labels.shape != shape:
                raise ValueError(f"cggr: labels have shape {tuple(labels.shape)}, logits have {tuple(shape)} tokens")
            lab = labels.to(device) != self.config.ignore_index
            if self.label_shift:
                shifted = torch.zeros_like(lab)
                shifted[..., :-1] = lab[..., 1:]
                lab = shifted
            valid &= lab
        extra = self._forward_state.get("valid_mask")
        if extra is not None:
            extra = torch.as_tensor(extra, device=device)
            if extra.shape != shape:
                raise ValueError(f"cggr: {VALID_MASK_KWARG} has shape {tuple(extra.shape)}, logits have "
                                 f"{tuple(shape)} tokens")
            valid &= extra.bool()
        return valid

    def _needs_counts(self) -> bool:
        """Whether sparse backwards need every block's active count on the host."""
        return self.config.leak_rate == 0 and any(self.sparse_blocks)

    @torch.no_grad()
    def _route(self, r: Routing, logits: torch.Tensor, valid: torch.Tensor, num_valid=None) -> None:
        c, L = self.config, self.num_layers
        scores = score_difficulty(logits, c.scorer)
        finite = torch.isfinite(scores.difficulty)
        nonfinite = valid & ~finite
        rank = rank_buckets_global if c.buckets == "global" and _world_size() > 1 else rank_buckets
        buckets = POLICY_FNS[c.policy](scores.difficulty, valid, c.num_buckets, self._generator(valid.device), rank)
        bucket_depths = self.bucket_depths()
        depth = buckets_to_depths(buckets, self._constant((0, *bucket_depths), valid.device))
        depth = torch.where(nonfinite, torch.full_like(depth, L), depth)  # no distribution: full depth
        r.depth = depth
        if rank is rank_buckets and self._needs_counts():
            # Bucket sizes follow from the number of valid tokens: every block's count without a synchronisation
            # (only when the valid tokens were not known before the forward, reading it here waits for the GPU).
            n = _read_from_host(num_valid) if num_valid is not None else int(valid.sum())
            counts = block_counts(n, L, bucket_depths)
            r.set_counts(counts, self._constant(tuple(counts), valid.device))
        r.metrics = self._metrics(r, buckets, valid, finite, scores)
        if "nonfinite" not in self._warned:
            self._check_nonfinite_later(r.metrics["nonfinite_tokens"], (nonfinite & (r.depth < L)).any())

    def _metrics(self, r: Routing, buckets, valid, finite, scores) -> dict[str, torch.Tensor]:
        c, L = self.config, self.num_layers
        depth = r.depth
        n_valid = valid.sum()
        denom = n_valid.clamp_min(1).float()
        counts = torch.zeros(c.num_buckets + 1, dtype=torch.long, device=depth.device)
        counts.scatter_add_(0, (buckets + 1).reshape(-1), torch.ones_like(buckets).reshape(-1))
        out = {f"bucket_{k}_fraction": counts[k + 1].float() / denom for k in range(c.num_buckets)}
        out["valid_tokens"] = n_valid
        out["mean_depth_fraction"] = depth.sum().float() / (denom * L)
        # Backward block work skipped: rows inactive in each sparse-routed block, over all rows of all blocks.
        n = depth.numel()
        sparse = self._constant(tuple(self.sparse_blocks), depth.device) != 0
        inactive = torch.where(sparse, n - r.active_counts_tensor(), torch.zeros_like(sparse, dtype=torch.long))
        skipped = inactive.sum().float() / max(1, n * L)
        out["backward_flops_skipped"] = skipped if c.leak_rate == 0 else torch.zeros_like(skipped)
        ok = valid & finite
        n_ok = ok.sum().clamp_min(1).float()
        zero = torch.zeros((), device=depth.device)
        out["mean_entropy"] = torch.where(ok, scores.entropy, zero).sum() / n_ok
        out["mean_confidence"] = torch.where(ok, scores.confidence, zero).sum() / n_ok
        out["nonfinite_tokens"] = (valid & ~finite).sum()
        return out

    def _constant(self, values: tuple, device: torch.device) -> torch.Tensor:
        """A small int64 tensor of ``values`` on ``device``, made once: ``torch.tensor(..., device=cuda)``
        would synchronise the host with the GPU at every call (a copy from pageable memory)."""
        key = (values, device)
        t = self._constants.get(key)
        if t is None:
            if len(self._constants) > 1024:  # batch shapes and curriculum steps seen: a handful in practice
                self._constants.clear()
            host = torch.tensor(values, dtype=torch.long)
            if device.type == "cuda":
                host = host.pin_memory()
            t = self._constants[key] = host.to(device, non_blocking=True)
        return t

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.config.policy == "difficulty":
            return None
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        # Seeded by (seed, rank, step, micro-batch): fresh every forward, reproducible after a resume, and
        # different on each data-parallel rank (the same draw everywhere would route the same positions).
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        g.manual_seed((self.config.seed * 1_000_003 + rank * 100_003 + self._step * 1009 + self._micro) % (2**63))
        return g

    # ------------------------------------------------------------ diagnostics
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("cggr: %s", message)

    def _check_nonfinite_later(self, count: torch.Tensor, overflow: torch.Tensor) -> None:
        """Warn about non-finite logits without a host synchronisation in the step.

        ``overflow``: some non-finite tokens did not fit at full depth (see :meth:`Routing.set_counts`). On
        CUDA both are copied to pinned memory asynchronously and read at the next forward, once landed.
        """
        if "nonfinite" in self._warned:
            return
        both = torch.stack([count.long(), overflow.long()])
        if count.device.type != "cuda":
            self._nonfinite_pending = (both, None)
            self._report_nonfinite()
            return
        host = torch.empty(2, dtype=torch.long, pin_memory=True)
        host.copy_(both, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._nonfinite_pending = (host, event)

    def _report_nonfinite(self) -> None:
        pending = self._nonfinite_pending
        if pending is None:
            return
        value, event = pending
        if event is not None and not event.query():
            return
        self._nonfinite_pending = None
        n, overflow = value.tolist()
        if n:
            how = ("at full depth" if not overflow else
                   "at full depth as far as the blocks' row counts, which follow the bucket sizes, had room; "
                   "the rest got less (routing.depth says how much). With their loss counted, the step's "
                   "gradient is non-finite either way")
            self._warn_once("nonfinite", f"{n} token(s) had non-finite logits (NaN or +inf); they were routed "
                                         f"{how}. The metric 'nonfinite_tokens' counts them")

    @staticmethod
    def _sync_step_mirror(module, incompatible_keys) -> None:
        module._step = int(module.step_count)


def _input_device(args, kwargs) -> torch.device | None:
    for t in (kwargs.get("input_ids"), args[0] if args else None, kwargs.get("inputs_embeds")):
        if isinstance(t, torch.Tensor):
            return t.device
    return None


def _copy_to_host_later(t: torch.Tensor):
    """Start copying a device scalar to the host without waiting; :func:`_read_from_host` gets it."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty((), dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _read_from_host(pending) -> int:
    """The value :func:`_copy_to_host_later` started copying (waits only until the GPU has made it)."""
    value, event = pending
    if event is not None:
        event.synchronize()
    return int(value)


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


def attach(model: nn.Module, num_buckets: int = 4, warmup_steps: int = 1000, leak_rate: float = 0.0, *,
           mode: str = "sparse", policy: str = "random", layers=None, depths: Sequence[float] | None = None,
           scorer: str = "entropy_confidence", ignore_index: int = -100, seed: int = 0,
           label_shift: int | None = None, backward: str = "auto", buckets: str = "local",
           handback_steps: int = 0, total_steps: int | None = None) -> Router:
    """Install cggr's gradient routing on ``model`` in place and return its :class:`Router`.

    Args:
        model: a module whose forward returns logits (tensor, tuple, or ``.logits``).
        num_buckets: ``K``, buckets of tokens ranked by difficulty.
        warmup_steps: curriculum length in optimizer steps (0 = target depths at once).
        leak_rate: λ in [0, 1]: inactive rows carry λ times their gradient (λ > 0 makes them dense again).
        mode: ``"sparse"`` (exact token-sparse backward) or ``"mask"`` (gate block outputs only; no saving).
        policy: ``"random"`` (the default: the best in the quality benchmark, see the README; also the
            control), ``"difficulty"`` (rank by score, the seed's rule) or ``"sampled"`` (random buckets,
            deep ones likelier for harder tokens).
        layers: the block stack: attribute path, ``nn.ModuleList`` or list; found automatically when None.
        depths: target depth fractions per bucket, hardest first (default ``(K-k)/K``).
        scorer: ``"entropy_confidence"`` (default), ``"entropy"`` or ``"margin"``.
        ignore_index: label value of tokens without a target.
        seed: seed of the random policy.
        label_shift: 1 if logits at t predict ``labels[t+1]`` (HF causal LMs; auto when None), else 0.
        backward: ``"auto"`` (a compacted per-family backward where one exists, else the generic one) or
            ``"generic"`` (always the per-linear generic backward).
        buckets: ``"local"`` (each data-parallel rank ranks its own tokens) or ``"global"`` (the valid tokens
            of all ranks of the default process group are ranked together; three small all-reduces per training
            forward, which every rank must run). The same as local without a process group of several ranks.
        handback_steps: over the last ``handback_steps`` of ``total_steps`` optimizer steps the depths
            return linearly to full, so training ends dense (0 = never).
        total_steps: the length of training in optimizer steps (needed by ``handback_steps``).
    """
    config = RoutingConfig(num_buckets=num_buckets, warmup_steps=warmup_steps, leak_rate=leak_rate, mode=mode,
                           policy=policy, depths=depths, scorer=scorer,
                           ignore_index=ignore_index, seed=seed, label_shift=label_shift, backward=backward,
                           buckets=buckets, handback_steps=handback_steps, total_steps=total_steps)
    _refuse_wrappers(model)
    return Router(model, config, layers=layers)
