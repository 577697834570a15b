"""Attach-time proof that a compacted backward computes what the block itself computes.

A compacted backward is picked by structure (module names and classes, its ``spec``; :func:`compact_decision`),
and structure is not behaviour: Granite's layers have a Llama layer's modules but scale the residual
branches, Ernie 4.5 rotates interleaved pairs, SmolLM3 leaves rotary out of some layers. Each of those would
silently change the forward output and the gradients. So before a block takes the compacted path,
:func:`verify` runs it both ways, in fp32, with fresh random weights (well scaled, so that every
part of the block shows in the output; the check holds for any weights or for none) and random inputs:

* the block's own forward (with the keyword arguments HF passes it) under
  :func:`cggr.reference_routing`, and its gradients by autograd;
* the family's compacted Functions (saving and checkpointed), through the same
  :class:`~cggr.compact.CompactedForward` call path the router installs;

comparing the output, the input gradient and the gradient of every parameter, every row active and with some
rows inactive (under both inactive semantics), with and without a 4-D float attention mask, within
``TOLERANCE`` of the largest entry of each tensor. Nothing of the user's is touched: the block runs on
substituted weights (``torch.func.functional_call``: no ``.grad`` is written), the global RNG state is
restored, and what the check sets (train mode, gradient checkpointing off, the attention implementation, the
block's own hooks left out, TF32 off) is put back. A check that cannot run is a failed check.

Verdicts are cached by what can make two blocks differ: the class, the spec, every plain attribute of every
submodule, the parameter shapes, the model config's scalars and its per-layer entries (``layer_types``,
``no_rope_layers``, ...). Blocks that share a verdict still have their forward output checked, in case it
reads their layer index. The check runs on the block's GPU where it has one (nothing compiled, TF32 off),
else on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch

from ..adapters import is_moe_module
from ..reference import reference_routing
from ..routing import Routing
from .backward import CompactedBackward
from .forward import CompactedForward
from .pointwise import eager_kernels

logger = logging.getLogger("cggr")

TOLERANCE = 1e-4  # fp32 on both sides: rounding differences are ~1e-6 of the largest entry of a tensor
BATCH, SEQ = 2, 5
_ONE_THREAD_BELOW = 1 << 24  # parameters of a block checked on one CPU thread

_SCALARS = (bool, int, float, str, type(None))
# Attributes that number a layer: left out of the cache key (the per-layer re-check covers their use).
_INDEX_NAMES = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx"})


@dataclass(frozen=True)
class Verdict:
    """``ok``: the compacted Functions equal the block; ``max_diff``: the worst difference found, relative to
    the largest entry of its tensor (nan when the check could not run); ``reason``: what was found."""

    ok: bool
    max_diff: float
    reason: str
    seconds: float
    spec: Any = None  # the spec checked: the Functions run with it (a variant of the structural one, maybe)
    returns_tuple: bool = False  # the block's forward returns (y,), not y: its compacted forward answers alike


_verdicts: dict[Any, Verdict] = {}  # by the key of :func:`_key`: the full check
_by_block: "weakref.WeakKeyDictionary[torch.nn.Module, Verdict]" = weakref.WeakKeyDictionary()
_warned: set = set()


def clear_cache() -> None:
    """Forget every verdict (tests; a block class edited at run time)."""
    _verdicts.clear()
    _by_block.clear()
    _warned.clear()


def structural_match(block: torch.nn.Module, backwards: Sequence[CompactedBackward]
                     ) -> tuple[CompactedBackward, Any] | str:
    """``(backward, spec)`` of the first of ``backwards`` whose structure (modules, class names) ``block`` has,
    else why none matched, in words (each backward's first difference).

    Structure is not behaviour: a layer can have a Llama layer's modules and compute something else (Granite's
    multipliers, another rotary, layers without rotary). :func:`compact_decision` checks the behaviour.
    """
    differences = []
    for backward in backwards:
        spec = backward.spec(block)
        if not isinstance(spec, str):
            return backward, spec
        differences.append(f"{backward.name}: {spec}")
    return "; ".join(differences) or "none given"


class Compacted(NamedTuple):
    """The compacted backward a block takes, as the check proved it."""

    backward: CompactedBackward
    spec: Any
    returns_tuple: bool  # the block's forward returns (y,) rather than y: its compacted forward answers alike


def compact_decision(block: torch.nn.Module, backwards: Sequence[CompactedBackward]
                     ) -> tuple[Compacted | None, str]:
    """Whether ``block`` takes one of ``backwards``: ``(Compacted or None, reason)``.

    A block takes one when its structure matches it (:func:`structural_match`) and :func:`verify` finds its
    Functions equal to the block's own forward and backward (under the reference routing) on random inputs and
    weights. The reason says why, for the router's report; a failed check also logs one warning per kind of
    block. ``backwards``: the model family's (:mod:`cggr.families`), or every one for a model of no known family.
    """
    if any(is_moe_module(m) for m in block.modules()):
        return None, "mixture-of-experts block: the compacted backwards know dense MLPs only"
    found = structural_match(block, backwards)
    if isinstance(found, str):
        return None, f"{type(block).__name__} matches no compacted backward ({found})"
    backward, spec = found
    verdict = verify(block, backward, spec)
    if not verdict.ok:
        return None, verdict.reason
    return Compacted(backward, verdict.spec, verdict.returns_tuple), verdict.reason


def verify(block: torch.nn.Module, backward: CompactedBackward, spec: Any) -> Verdict:
    """The cached verdict for ``block`` taking ``backward`` with ``spec`` or, where the block fails with it, with
    the first of its variants of it that passes (``verdict.spec`` says which).

    A failed verdict logs one warning per kind of block (class, backward, and the measured difference with
    ``spec``).
    """
    known = _by_block.get(block)
    if known is not None:
        return known
    key = _key(block, backward, spec)
    verdict = _verdicts.get(key)
    if verdict is None:
        verdict = _verdicts[key] = _first_passing(block, backward, spec)
    elif verdict.ok:
        # Same kind of block, already proven: its forward once more, in case it reads its layer index. Where it
        # differs, the full check decides, variants included: the block may compute what another variant reads
        # (a function patched into the model's module since, as Liger-Kernel patches HF's rotary).
        verdict = check(block, backward, verdict.spec, full=False)
        if not verdict.ok:
            verdict = _first_passing(block, backward, spec)
    if not verdict.ok and key not in _warned:
        _warned.add(key)
        logger.warning("cggr: %s; it takes the generic routed backward", verdict.reason)
    _by_block[block] = verdict
    return verdict


def _first_passing(block: torch.nn.Module, backward: CompactedBackward, spec: Any) -> Verdict:
    """The full check with ``spec``, then with each of the backward's variants of it until one passes; the first
    verdict when none does (its difference is the one to report)."""
    first = check(block, backward, spec)
    if first.ok:
        return first
    variants = backward.variants(spec)
    for variant in variants:
        verdict = check(block, backward, variant)
        if verdict.ok:
            return verdict
    if not variants:
        return first
    return dataclasses.replace(first, reason=f"{first.reason}; no variant of the {backward.name} spec matches it "
                                             f"either ({len(variants)} tried)")


# ------------------------------------------------------------------ the cache key
def _plain(v) -> bool:
    return isinstance(v, _SCALARS) or (isinstance(v, (tuple, list)) and all(isinstance(e, _SCALARS) for e in v))


def _frozen(v):
    return tuple(v) if isinstance(v, list) else v


def _key(block: torch.nn.Module, backward: CompactedBackward, spec: Any):
    """Everything the block's behaviour can depend on, short of its weights' values and its layer index."""
    parts = [type(block), backward.name, spec]
    configs, index = {}, None
    for name, m in block.named_modules():
        attrs = []
        for k, v in vars(m).items():
            if k in _INDEX_NAMES:
                index = v if isinstance(v, int) and index is None else index
            elif k == "config" and hasattr(v, "to_dict"):
                configs[id(v)] = v
            elif not k.startswith("_") and k != "training" and _plain(v):
                attrs.append((k, _frozen(v)))
        forward = m.__dict__.get("forward")  # an instance forward (the router's routed linears, others')
        if forward is not None:
            attrs.append(("forward", getattr(forward, "__qualname__", type(forward).__qualname__)))
        parts.append((name, type(m), tuple(sorted(attrs, key=lambda a: a[0]))))
    parts.append(tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters()))
    for config in configs.values():
        fields = {k: v for k, v in vars(config).items() if _plain(v)}
        layers = fields.get("num_hidden_layers")
        parts.append(tuple(sorted((k, _frozen(v)) for k, v in fields.items() if not isinstance(v, (tuple, list)))))
        if isinstance(layers, int) and isinstance(index, int):
            # Per-layer entries (layer_types, no_rope_layers, ...): this layer's only.
            parts.append(tuple(sorted((k, v[index]) for k, v in fields.items()
                                      if isinstance(v, (tuple, list)) and len(v) == layers and index < len(v))))
    return tuple(parts)


# ------------------------------------------------------------------ the check
class _Holder(torch.nn.Module):
    """Runs a function with the block's weights substituted (``functional_call`` needs a module to call)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, fn):
        return fn()


def _random_weights(block: torch.nn.Module, g: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """fp32 stand-ins for the block's parameters (random, scaled so every part of the block shows in its
    output) and buffers (copies: their values may be constants the forward needs)."""
    subs = {}
    for name, p in block.named_parameters():
        shape = tuple(getattr(p, "ds_shape", p.shape))  # DeepSpeed ZeRO-3 keeps an empty tensor and its shape
        noise = torch.randn(shape, generator=g, device=device)
        if name.endswith("bias"):
            t = 0.5 * noise
        elif len(shape) < 2:  # norm weights, scalar gains
            t = 1.0 + 0.5 * noise
        else:  # the geometric mean of fan-in and fan-out: activations of order one either way round
            t = noise * (shape[-1] * shape[-2]) ** -0.25
        subs[name] = t.requires_grad_()
    for name, b in block.named_buffers():
        subs[name] = b.detach().to(device, torch.float32 if b.is_floating_point() else b.dtype).clone()
    return subs


def _device(block: torch.nn.Module) -> torch.device:
    """Where the check runs: the block's CUDA device (milliseconds for a large block), else the CPU (a block
    on the meta device, or on the CPU)."""
    p = next(block.parameters(), None)
    return p.device if p is not None and p.device.type == "cuda" else torch.device("cpu")


def _causal_mask(device) -> torch.Tensor:
    """A 4-D float mask as HF builds it: causal, and the first key of sequence 1 padded (left padding)."""
    lowest = torch.finfo(torch.float32).min
    allowed = torch.ones(SEQ, SEQ, dtype=torch.bool, device=device).tril().expand(BATCH, 1, SEQ, SEQ).clone()
    allowed[1, :, 1:, 0] = False
    return torch.zeros(BATCH, 1, SEQ, SEQ, device=device).masked_fill(~allowed, lowest)


# The block's own hooks: they run around the compacted forward as around the plain one, so the check leaves
# them out; some must not run outside a training step (FSDP2's would make the block its own root).
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks")


@contextlib.contextmanager
def _check_state(block: torch.nn.Module, training: bool, sdpa: bool, device: torch.device):
    """The module state the check runs in, restored afterwards: the block's own hooks left out, train/eval as
    asked, no gradient checkpointing
    (the maths is the same), an attention implementation that runs on the CPU (``sdpa``: SDPA whatever the
    model's, for calls without a mask: HF's eager attention gets a mask always, and None means no mask to
    it), grad on, no autocast, fp32 matmuls in full precision (no TF32), nothing compiled, and the global RNG
    state as it was."""
    hooks = {name: getattr(block, name) for name in _HOOK_DICTS if isinstance(getattr(block, name, None), dict)}
    flags = [(m, m.training) for m in block.modules()]
    checkpointing = [(m, m.__dict__["gradient_checkpointing"]) for m in block.modules()
                     if "gradient_checkpointing" in m.__dict__]
    configs = {id(c): c for m in block.modules() for c in [getattr(m, "config", None)]
               if c is not None and hasattr(c, "_attn_implementation_internal")}
    attention = [(c, c._attn_implementation_internal) for c in configs.values()]
    try:
        for name, d in hooks.items():
            setattr(block, name, type(d)())
        block.train(training)
        for m, _ in checkpointing:
            m.gradient_checkpointing = False
        for c, impl in attention:
            if sdpa or impl not in (None, "eager", "sdpa"):
                c._attn_implementation_internal = "sdpa"  # flash attention does not run on the CPU; same maths
        cuda = device.type == "cuda"
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=[device] if cuda else []))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast(device.type, enabled=False))
            stack.enter_context(eager_kernels())
            if cuda:
                stack.enter_context(_full_fp32_matmuls())
            yield
    finally:
        for name, d in hooks.items():
            setattr(block, name, d)
        for m, t in flags:
            m.training = t
        for m, v in checkpointing:
            m.gradient_checkpointing = v
        for c, impl in attention:
            c._attn_implementation_internal = impl


@contextlib.contextmanager
def _full_fp32_matmuls():
    """TF32 off (its ~1e-3 rounding would fail the check), as the user had it afterwards."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _worst(got, want, names, case) -> tuple[float, str]:
    worst, where = 0.0, ""
    for a, b, name in zip(got, want, names):
        if a is None and b is None:  # a parameter neither side uses
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        if a.shape != b.shape:
            return math.inf, f"{name} has shape {tuple(a.shape)} instead of {tuple(b.shape)} ({case})"
        scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
        d = (a - b).abs().max().item() / scale
        if not d <= worst:  # nan included
            worst, where = d, f"{name} ({case})"
            if math.isnan(d):
                worst = math.inf
    return worst, where


def check(block: torch.nn.Module, backward: CompactedBackward, spec: Any, *, seed: int = 0, full: bool = True,
          tolerance: float = TOLERANCE) -> Verdict:
    """Run ``block`` and ``backward``'s Functions side by side (uncached; :func:`verify` caches).

    ``full``: every case (every row active and some inactive under stop and skip semantics, with and without a
    4-D mask, saving and checkpointed); else the forward output of one (some rows inactive, no mask, saving).
    """
    start = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        if _device(block).type == "cpu" and sum(p.numel() for p in block.parameters()) < _ONE_THREAD_BELOW:
            torch.set_num_threads(1)  # tensors this small: threads cost more than they save (10x on a busy host)
        worst, where, returns_tuple = _compare(block, backward, spec, seed, full)
    except Exception as e:  # noqa: BLE001 -- any failure to run the check is a failed check
        family = backward.name
        return Verdict(False, math.nan, f"the check of the compacted {family} backward against "
                       f"{type(block).__name__} could not run ({type(e).__name__}: {e})",
                       time.perf_counter() - start, spec)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    family = backward.name
    if worst <= tolerance:
        return Verdict(True, worst, f"compacted {family} backward, checked against {type(block).__name__} "
                       f"(largest relative difference {worst:.1e}){_reading(backward, spec)}", seconds, spec,
                       returns_tuple)
    return Verdict(False, worst, f"{type(block).__name__} has the modules of a {family} block but computes "
                   f"something else: the compacted {family} backward differs from it by {worst:.2g} of the "
                   f"largest entry in {where} (tolerance {tolerance:g})", seconds, spec)


def _reading(backward: CompactedBackward, spec: Any) -> str:
    """What a passing spec reads differently from the plain one, for the router's report
    (:attr:`CompactedBackward.describe`)."""
    note = backward.describe(spec)
    return f", {note}" if note else ""


def _compare(block, backward: CompactedBackward, spec, seed, full) -> tuple[float, str, bool]:
    """``(worst difference, where, whether the block returns a tuple)`` over the check's cases."""
    device = _device(block)
    g = torch.Generator(device).manual_seed(seed)
    subs = _random_weights(block, g, device)
    names = ["output", "input gradient"] + [f"gradient of {n}" for n in subs if subs[n].requires_grad]
    leaves = [t for t in subs.values() if t.requires_grad]
    holder = _Holder(block)
    subs = {"block." + n: t for n, t in subs.items()}
    x = torch.randn(BATCH, SEQ, spec.hidden_size, generator=g, device=device)
    routed_depth = (torch.rand(BATCH, SEQ, generator=g, device=device) < 0.5).long()
    # Some rows inactive, some active; in sequence 0 an active query after an inactive key (whose gradient a key
    # norm's weight reads).
    routed_depth[0, 0], routed_depth[0, -1], routed_depth[1, -1] = 0, 1, 1
    # (depth, inactive semantics): every row active; some rows inactive, under stop and under skip (the default:
    # inactive rows pass their output gradient to the input). The per-layer re-check runs the forward only.
    depths = ([(torch.ones_like(routed_depth), "stop"), (routed_depth, "stop"), (routed_depth, "skip")] if full
              else [(routed_depth, "stop")])
    functions = [False] + ([True] if full and backward.checkpointed is not None else [])
    compacted = CompactedForward(None, block, 0, backward, spec, block.forward)
    returns_tuple = []  # what the block's own forward returns: the compacted forward answers in kind

    def grads(fn):
        """Output and gradients of ``fn(x)`` (run with the substituted weights) for a fixed output gradient."""
        def run():
            xx = x.clone().requires_grad_()
            y = fn(xx)
            if y is None:
                return None
            returns_tuple.append(isinstance(y, (tuple, list)))
            y = _first(y)
            if not full:  # the per-layer re-check: the forward shows a layer computing something else
                return [y.detach()]
            gy = torch.randn(y.shape, generator=torch.Generator(device).manual_seed(seed + 1), device=device)
            got = torch.autograd.grad(y, [xx, *leaves], gy, allow_unused=True)
            return [y.detach(), *got]
        return torch.func.functional_call(holder, subs, (run,))

    def compare(training: bool) -> tuple[float, str] | None:
        """The worst difference over the cases in this mode that the compacted path takes (calls it refuses, it
        never runs: a sliding window shorter than the sequence without a mask), or None where it takes none.
        The per-layer re-check runs one case: without a mask, or with one where the path needs it."""
        worst, where, ran = 0.0, "", False
        for masked in (False, True):
            if ran and not full:
                break
            with _check_state(block, training, sdpa=not masked, device=device):
                kwargs = backward.check_inputs(spec, g, BATCH, SEQ, _causal_mask(device) if masked else None)
                for depth, inactive in depths:
                    case = (f"{'every row active' if bool(depth.all()) else f'some rows inactive ({inactive})'}, "
                            f"{'4-D mask' if masked else 'no mask'}, {'train' if training else 'eval'} mode")
                    routing = Routing.from_depth(depth, num_layers=1, inactive=inactive)
                    got = [grads(lambda xx: compacted.run(routing, xx, (), kwargs, checkpointed, 0))
                           for checkpointed in functions]
                    if got[0] is None:
                        break  # the path refuses this call: so it does at run time
                    ran = True
                    returns_tuple.clear()
                    with reference_routing([block], depth, inactive=inactive):
                        want = grads(lambda xx: block(xx, **kwargs))
                    for checkpointed, values in zip(functions, got):
                        d, w = _worst(values, want, names, f"{case}, {'checkpointed' if checkpointed else 'saving'}")
                        if not d <= worst:
                            worst, where = d, w
        return (worst, where) if ran else None

    # Train mode: the mode the compacted path runs in. A family that refuses this block in training (GPT-2
    # with dropout on) is checked in eval mode, the only mode it then takes the compacted path in.
    found = compare(True)
    if found is None:
        found = compare(False)
    if found is None:
        raise RuntimeError(f"the compacted {backward.name} path refuses the check's call in train and eval mode")
    return (*found, returns_tuple[0])
