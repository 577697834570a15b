"""CUDA graphs of the compacted backward's compiled stages: a stage issued as one replay.

At 350M and below the routed backward is bound by the host: each block's two compiled stages cost the host
about as much as the GPU spends on them (guards, the wrapper, a launch per kernel). With per-block placement a
block's row count repeats from step to step, and in a steady training loop so do the addresses of what its
stages read: the caching allocator hands the same blocks to the same sequence of allocations. So a stage call
whose every input sits where it sat when its graph was captured (same address, shape, strides, dtype) replays
that graph; every other call runs the compiled stage as before, and a call seen twice is captured.

Why that is exact: a graph reads its inputs at the addresses it was captured with, and :class:`GraphedStage`
replays only when the call's tensors are at those addresses with the same layout, its other arguments are equal
immutable values, and the global state dynamo guards on is as at the capture. It computes nothing on the host
from their values (a stage has no host synchronisation, or its capture fails and the stage is never graphed).
Its outputs live in the graphs' memory pool, which the next replay of any graph overwrites, so they are copied
out right after each replay: the caller gets tensors no graph writes to.

Opt-in (``CGGR_CUDA_GRAPHS=1``) while it is measured. Memory: a graph's last kernels copy its outputs into
buffers that every graph of the stage with outputs of the same shapes shares (one set per row count and
stream, not one per block: the graphs replay one at a time on their stream, each copied out before the next),
so the graphs of a block stack keep about one block's weight gradients and two activation-sized tensors per
row count, at most :data:`MAX_SIGNATURES` row counts per stage; everything else a capture allocates is
temporary, in the pool the graphs share.
"""

from __future__ import annotations

import collections
import functools
import logging
from typing import Any, Callable, NamedTuple

import torch
from torch._C._dynamo.guards import GlobalStateGuard

logger = logging.getLogger("cggr")

MAX_VARIANTS = 2
"""Graphs kept per call site (a block's weights at one row count): under gradient accumulation the first
micro-batch of a step allocates the gradients and so may see other addresses than the rest."""
FUTILE_CAPTURES = 64
"""Captures after which a stage that has replayed fewer times than it captured stops capturing: its inputs'
addresses do not repeat in this loop (a capture costs about two runs of the stage)."""
MAX_SIGNATURES = 8
"""Output shapes (row counts, in practice) per stage whose shared output buffers are kept: beyond that the graphs
of the least recently replayed one are dropped with its buffers (per-block placement uses at most three: the
dense end blocks', and the middle blocks' one or two)."""
MAX_SEEN = 4096
"""Signatures remembered until their second call; forgotten all at once beyond that (addresses that never
repeat, such as a loop that allocates differently every step, then capture nothing)."""


class _Captured(NamedTuple):
    graph: Any  # torch.cuda.CUDAGraph, or a test's stand-in with .replay()
    outputs: Any  # the stage's result, its tensors the shared output buffers the graph writes last


class _Kept(NamedTuple):
    captured: _Captured
    state: GlobalStateGuard  # the global state dynamo guards on, at the capture
    signature: tuple  # the outputs' (device, stream, layouts): which shared buffers the graph writes


_VALUES = (type(None), bool, int, float, str, torch.dtype, torch.device)
"""Leaves a key holds as themselves: immutable values compared by value (with their type: ``1 == True``)."""


@functools.lru_cache(maxsize=None)
def _frozen_dataclass(cls) -> bool:
    params = getattr(cls, "__dataclass_params__", None)
    return params is not None and params.frozen


def _walk(x, tensors: list, key: list) -> None:
    """Append ``x``'s tensors to ``tensors`` and what identifies the call to ``key``: each tensor's address,
    layout and whether it looks like a trained weight (a leaf that requires grad and is no view: in the backward
    a view of the block input also requires grad; a frozen weight is not told from an activation, which only
    merges call sites, :func:`_site`), every other leaf with its type. Tuples (named or not) are walked. Raises TypeError for what a key cannot vouch for: a tensor subclass (it may read memory
    other than its own, or have none) and a leaf that is no immutable value (an object compared by identity
    may have changed since the capture, and the graph holds what it read then)."""
    cls = type(x)  # one type test per argument: this runs for some 60 arguments per stage call
    if cls is torch.Tensor or cls is torch.nn.Parameter:
        tensors.append(x)
        key.append((x.data_ptr(), x.shape, x.stride(), x.dtype, x.device,
                    x.requires_grad and x.is_leaf and x._base is None))
    elif cls is type(None):
        key.append(None)
    elif isinstance(x, tuple):
        key.append(cls)
        for item in x:
            _walk(item, tensors, key)
        key.append(len(x))
    elif cls in _VALUES or _frozen_dataclass(cls):
        key.append((cls, x))
    else:
        raise TypeError(f"a {cls.__name__}")


def _tensors(x) -> list:
    found: list = []
    _walk(x, found, [])
    return found


def _replace_tensors(x, new):
    """``x`` with its tensors replaced, in order, by the items of the iterator ``new``."""
    if isinstance(x, torch.Tensor):
        return next(new)
    if isinstance(x, tuple):
        items = [_replace_tensors(item, new) for item in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x


def _copy_out(outputs):
    """``outputs`` with every tensor copied out of the graph's memory, in one multi-tensor kernel per dtype
    (``x * 1`` is ``x`` for every float, NaN and -0 included)."""
    tensors = _tensors(outputs)
    return _replace_tensors(outputs, iter(torch._foreach_mul(tensors, 1) if tensors else ()))


class CudaGraphs:
    """How :class:`GraphedStage` captures: CUDA graphs in one memory pool per device and replay stream (tests on
    the CPU pass a stand-in with the same methods)."""

    def stream(self, device: torch.device) -> int:
        """The stream a call on ``device`` runs on now: part of the key, as graphs replay on the stream they were
        captured for (:meth:`capture`)."""
        return torch._C._cuda_getCurrentRawStream(device.index)

    def capture(self, run: Callable[[], Any], device: torch.device, stream: int) -> _Captured:
        """``run()`` captured as a graph on ``device``, to replay on ``stream`` (the current one).

        The graphs of a pool replay one after another on its one stream, each stage's outputs copied out before
        the next replay, so they may share memory; graphs for another stream get another pool (and capture
        stream), as replays on two streams may overlap. The capture stream is used by captures alone, so the
        cuBLAS workspace the graphs use is allocated in the pool by the first capture: a workspace in ordinary
        memory (a stream's that ran eagerly) goes back to the allocator when the workspaces are cleared
        (Inductor's cudagraph trees clear them) and the graphs would write to whatever tensor is there next."""
        with torch.cuda.device(device.index):
            current, capturing = torch.cuda.current_stream(), _capture_stream(device.index, stream)
            capturing.wait_stream(current)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.stream(capturing):
                    graph.capture_begin(pool=_pool(device.index, stream), capture_error_mode="thread_local")
                    try:
                        outputs = run()
                    finally:
                        graph.capture_end()
            finally:  # also after a failed capture: nothing on the capture stream outlives the call's inputs
                current.wait_stream(capturing)
            return _Captured(graph, outputs)


@functools.lru_cache(maxsize=None)
def _capture_stream(device: int, stream: int):
    return torch.cuda.Stream(device)


@functools.lru_cache(maxsize=None)
def _pool(device: int, stream: int):
    return torch.cuda.graph_pool_handle()


class GraphedStage:
    """A compiled stage, replayed from a CUDA graph when the call's inputs sit where a captured call's did.

    ``compiled(*prepare(args))`` is the stage as it runs without graphs. Counters: ``replays``, ``compiled_calls``
    (no graph for those inputs yet, or none possible), ``captures``; ``broken`` holds why capturing failed
    (then the stage is never graphed again in this process: the compiled path is exact).
    """

    def __init__(self, name: str, compiled: Callable, prepare: Callable[[tuple], tuple], backend=None):
        self.name, self._compiled, self._prepare = name, compiled, prepare
        self._backend = backend or CudaGraphs()
        self._graphs: collections.OrderedDict[tuple, _Kept] = collections.OrderedDict()  # least recently replayed first
        self._buffers: dict[tuple, list] = {}  # output signature -> the buffers its graphs write their outputs to
        self._seen: set[tuple] = set()  # keys called once, not yet captured
        self.replays = self.compiled_calls = self.captures = 0
        self.broken: str | None = None

    def __call__(self, *args):
        tensors: list = []
        key: list = []
        try:
            _walk(args, tensors, key)
        except TypeError:  # what the key cannot vouch for (:func:`_walk`)
            return self._run(args)
        if not tensors or torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
            return self._run(args)  # no tensor to key on; or a mode that must see the stage's operations
        device = tensors[0].device
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return self._run(args)  # inside a graph the caller captures: theirs to replay
        key.append(self._backend.stream(device))
        key = tuple(key)
        try:
            kept = self._graphs.get(key)
        except TypeError:  # a frozen dataclass holding something unhashable
            return self._run(args)
        if kept is not None:
            # The global state dynamo guards on (grad mode, autocast, TF32 and reduced-precision reductions,
            # deterministic algorithms, default dtype): the compiled stage would recompile under another.
            if not kept.state.check():
                return self._run(args)
            self._graphs.move_to_end(key)
            kept.captured.graph.replay()
            self.replays += 1
            return _copy_out(kept.captured.outputs)  # before any other replay writes the shared buffers
        if self.broken is not None:
            return self._run(args)
        if key not in self._seen:
            if len(self._seen) >= MAX_SEEN:
                self._seen.clear()
            self._seen.add(key)
            return self._run(args)
        return self._capture(key, args, tensors)

    def _run(self, args):
        self.compiled_calls += 1
        return self._compiled(*self._prepare(args))

    def _capture(self, key: tuple, args: tuple, inputs: list):
        device = inputs[0].device
        if any(t.device != device for t in inputs):
            return self._run(args)  # a CPU scalar tensor, say: its value would be baked into the graph
        prepared = self._prepare(args)
        result = self._compiled(*prepared)  # this call's result as without graphs; also the stage's first run
        unfit = _unfit_outputs(result, inputs)
        if unfit:
            self.broken = unfit
            logger.warning("cggr: the %s stage runs without CUDA graphs: %s", self.name, unfit)
            self.compiled_calls += 1
            return result
        layouts = tuple((t.shape, t.stride(), t.dtype) for t in _tensors(result))
        signature = (device, key[-1], layouts)
        buffers = self._buffers.get(signature)
        if buffers is None:  # allocated outside the capture, on the stream the graphs replay on
            buffers = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                       for shape, stride, dtype in layouts]

        def run():  # the stage, then its outputs copied into the shared buffers: all the graph leaves behind
            fresh = _tensors(self._compiled(*prepared))
            if tuple((t.shape, t.stride(), t.dtype) for t in fresh) != layouts:
                raise RuntimeError("the stage's outputs changed layout between two calls on the same inputs")
            for buffer, t in zip(buffers, fresh):
                buffer.copy_(t)
            return _replace_tensors(result, iter(buffers))

        state = GlobalStateGuard()
        try:
            captured = self._backend.capture(run, device, key[-1])
        except Exception as e:  # noqa: BLE001 - a stage that cannot be captured runs compiled, as without graphs
            self.broken = f"{type(e).__name__}: {e}"
            logger.warning("cggr: CUDA graph capture of the %s stage failed (%s); it runs compiled, without "
                           "graphs, from now on", self.name, self.broken)
            self.compiled_calls += 1
            return result
        self._seen.discard(key)
        self._buffers[signature] = buffers
        self._keep(key, _Kept(captured, state, signature))
        self.captures += 1
        if self.captures >= FUTILE_CAPTURES and self.replays < self.captures:
            self.broken = f"{self.captures} captures, {self.replays} replays: the inputs' addresses do not repeat"
            self._graphs.clear()
            self._buffers.clear()
            logger.warning("cggr: the %s stage stops capturing CUDA graphs (%s); it runs compiled", self.name,
                           self.broken)
        return result

    def _keep(self, key: tuple, kept: _Kept) -> None:
        """Keep ``kept``, dropping the least recently replayed graph of the same call site (the same tensors but
        for the activations' addresses) beyond :data:`MAX_VARIANTS`, then the graphs of the least recently
        replayed output signature beyond :data:`MAX_SIGNATURES`, and buffers no graph writes any more. Safe beside
        another thread's calls (one per device in the autograd engine): the keys are read at once, and a key
        another thread dropped is skipped."""
        site = _site(key)
        same_site = [k for k in list(self._graphs) if _site(k) == site]
        for old in same_site[:max(0, len(same_site) + 1 - MAX_VARIANTS)]:
            self._graphs.pop(old, None)
        self._graphs[key] = kept
        by_recency = list(dict.fromkeys(k.signature for k in list(self._graphs.values())))
        for dropped in by_recency[:max(0, len(by_recency) - MAX_SIGNATURES)]:
            for k in [k for k, v in list(self._graphs.items()) if v.signature == dropped]:
                self._graphs.pop(k, None)
        written = {v.signature for v in list(self._graphs.values())}
        for signature in [s for s in list(self._buffers) if s not in written]:
            self._buffers.pop(signature, None)

    def stats(self) -> dict:
        return dict(graphs=len(self._graphs), replays=self.replays, compiled_calls=self.compiled_calls,
                    captures=self.captures, broken=self.broken, output_buffers=len(self._buffers),
                    output_buffer_bytes=sum(t.untyped_storage().nbytes() for b in self._buffers.values() for t in b))


def _unfit_outputs(outputs, inputs: list) -> str | None:
    """Why the stage's result cannot be given as copies of the graph's outputs (:func:`_copy_out`), or None:
    an output that shares memory with an input (the graph would hold the captured call's tensor) or with
    another output (the copies would not), or whose copy differs in dtype or strides (``x * 1`` of a bool is an
    integer; of a tensor with gaps or overlaps, dense)."""
    storages = {t.untyped_storage().data_ptr() for t in inputs} - {0}  # 0: no memory, nothing shared
    tensors = _tensors(outputs)
    for t in tensors:
        storage = t.untyped_storage().data_ptr()
        if storage and storage in storages:
            return "an output shares memory with an input or another output"
        storages.add(storage)
    for t, copy in zip(tensors, _tensors(_copy_out(outputs))):
        if (copy.dtype, copy.stride()) != (t.dtype, t.stride()):
            return f"an output of dtype {t.dtype}, strides {t.stride()} is copied as {copy.dtype}, {copy.stride()}"
    return None


def _site(key: tuple) -> tuple:
    """A call's site: its key without the addresses of tensors other than weights (activations and gradients,
    whose addresses may vary); weights keep theirs, so each block's calls are a site of their own."""
    return tuple((None, *k[1:]) if isinstance(k, tuple) and len(k) == 6 and isinstance(k[3], torch.dtype)
                 and not k[5] else k for k in key)


_STAGES: dict[str, GraphedStage] = {}


def graphed(name: str, compiled: Callable, prepare: Callable[[tuple], tuple]) -> GraphedStage:
    """The process's :class:`GraphedStage` for the stage ``name`` (one per stage function)."""
    stage = _STAGES.get(name)
    if stage is None:
        stage = _STAGES.setdefault(name, GraphedStage(name, compiled, prepare))
    return stage


def graph_stats() -> dict:
    """Each graphed stage's counters (:meth:`GraphedStage.stats`), by stage name: what the speed benchmark
    records to show whether the graphs replayed."""
    return {name: stage.stats() for name, stage in _STAGES.items()}
