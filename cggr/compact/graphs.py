"""CUDA graphs of the compacted backward's compiled stages: a stage issued as one replay.

At 350M and below the routed backward is bound by the host: each block's two compiled stages cost the host
about as much as the GPU spends on them (guards, the wrapper, a launch per kernel). With per-block placement a
block's row count repeats from step to step, so each block's stage calls repeat their shapes: a call is keyed by
its weights (their addresses: each block's are its own), the layouts of its other tensors (and which of them are
one tensor passed twice), its other arguments and the stream; a key seen twice is captured, and a key captured
replays: its tensors other than the weights are copied into the graph's input buffers (one multi-tensor copy),
the graph replays, and its outputs are copied out.

Why that is exact: a graph reads its inputs at the addresses it was captured with. The weights' addresses are
in the key; everything else a call passes is copied into the buffers the graph reads, right before the replay,
on the same stream; its other arguments are equal immutable values, and the global state dynamo guards on is
as at the capture. A graph computes nothing on the host from its inputs' values (a stage has no host
synchronisation, or its capture fails and the stage is never graphed).

Why copy the inputs rather than key on their addresses too: in a training loop the activations' addresses do
not repeat reliably (measured: 59 replays for 64 captures at 350M on an H100, and none in a test loop with
gradient accumulation), because a replay allocates differently from the compiled call it replaces and so moves
every later allocation of the step.

Memory: the buffers are shared by every graph of the stage, inputs by their position and layout, outputs by the
whole call's output layouts (the graphs of a stream replay one at a time, each copied out before the next):
about one block's stage inputs and outputs per stage, plus what differs per row count, for at most
:data:`MAX_SIGNATURES` row counts per stage. Everything else a capture allocates is temporary, in the pool the
graphs share. Opt-in (``CGGR_CUDA_GRAPHS=1``) while it is measured.
"""

import collections
import functools
import logging
from typing import Any, Callable, NamedTuple

import torch
from torch._C._dynamo.guards import GlobalStateGuard

logger = logging.getLogger("cggr")

FUTILE_CAPTURES = 64
"""Captures after which a stage that has replayed fewer times than it captured stops capturing: its calls' keys
do not repeat in this loop, e.g. row counts that change every step (a capture costs about two runs of the
stage)."""
MAX_SIGNATURES = 8
"""Output shapes (row counts, in practice) per stage that keep graphs: beyond that the graphs of the least
recently replayed one are dropped, with the buffers no other graph uses (per-block placement uses at most
three: the dense end blocks', and the middle blocks' one or two)."""
MAX_SEEN = 4096
"""Keys remembered until their second call; forgotten all at once beyond that (keys that never repeat, such as
row counts that change every step, then capture nothing)."""


class _Captured(NamedTuple):
    graph: Any  # torch.cuda.CUDAGraph, or a test's stand-in with .replay()
    outputs: Any  # the stage's result, its tensors the shared output buffers the graph writes last


class _Kept(NamedTuple):
    captured: _Captured
    state: GlobalStateGuard  # the global state dynamo guards on, at the capture
    signature: tuple  # the outputs' (device, stream, layouts): which shared buffers the graph writes
    inputs: tuple  # the keys of the input buffers the graph reads, in the call's tensor order (None: a weight)
    copy_to: list  # what each replay copies the call's non-weight tensors into (their buffers, unexpanded)
    expanded: tuple  # positions among those tensors with a broadcast (stride 0) dim, copied unexpanded


_VALUES = (type(None), bool, int, float, str, torch.dtype, torch.device)
"""Leaves a key holds as themselves: immutable values compared by value (with their type: ``1 == True``)."""


@functools.lru_cache(maxsize=None)
def _frozen_dataclass(cls) -> bool:
    params = getattr(cls, "__dataclass_params__", None)
    return params is not None and params.frozen


def _walk(x, tensors: list, key: list) -> None:
    """Append ``x``'s tensors to ``tensors`` and what identifies the call to ``key``: each tensor's layout, and
    for a weight (an ``nn.Parameter``: it stays where it is from step to step) its address too; every other leaf
    with its type. Tuples (named or not) are walked. Raises TypeError for what a key cannot vouch for: a tensor
    subclass (it may read memory other than its own, or have none) and a leaf that is no immutable value (an
    object compared by identity may have changed since the capture, and the graph holds what it read then)."""
    cls = type(x)  # one type test per argument: this runs for some 60 arguments per stage call
    if cls is torch.Tensor:
        tensors.append(x)
        key.append((None, x.shape, x.stride(), x.dtype, x.device))
    elif cls is torch.nn.Parameter:
        tensors.append(x)
        key.append((x.data_ptr(), x.shape, x.stride(), x.dtype, x.device))
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
    """A compiled stage, replayed from a CUDA graph when a call with the same weights and layouts was captured.

    ``compiled(*prepare(args))`` is the stage as it runs without graphs. Counters: ``replays``, ``compiled_calls``
    (no graph for those inputs yet, or none possible), ``captures``; ``broken`` holds why capturing failed
    (then the stage is never graphed again in this process: the compiled path is exact).
    """

    def __init__(self, name: str, compiled: Callable, prepare: Callable[[tuple], tuple], backend=None):
        self.name, self._compiled, self._prepare = name, compiled, prepare
        self._backend = backend or CudaGraphs()
        self._graphs: collections.OrderedDict[tuple, _Kept] = collections.OrderedDict()  # least recently replayed first
        self._outputs: dict[tuple, list] = {}  # output signature -> the buffers its graphs write their outputs to
        self._inputs: dict[tuple, torch.Tensor] = {}  # (position, layout, stream) -> the buffer graphs read there
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
        key.append(_repeats(tensors))
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
            _copy_in(kept, tensors)
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

    def _capture(self, key: tuple, args: tuple, tensors: list):
        device, stream = tensors[0].device, key[-1]
        if any(t.device != device for t in tensors):
            return self._run(args)  # a CPU scalar tensor, say: its value would be baked into the graph
        result = self._compiled(*self._prepare(args))  # this call's result as without graphs; the stage's first run
        unfit = _unfit_outputs(result, tensors) or _unfit_inputs(tensors)
        if unfit:
            self.broken = unfit
            logger.warning("cggr: the %s stage runs without CUDA graphs: %s", self.name, unfit)
            self.compiled_calls += 1
            return result
        # The buffers the graph reads: the call's weights themselves, a shared buffer for every other tensor.
        # A tensor passed twice (a stage's idx, and the rows it reads at) is one buffer read twice: dynamo guards on
        # such repeats, and the key holds them (:func:`_repeats`, before the stream).
        first = dict(key[-2])  # a repeat's position -> its first one's
        input_keys = tuple(None if type(t) is torch.nn.Parameter or i in first
                           else (i, t.shape, t.stride(), t.dtype, device, stream) for i, t in enumerate(tensors))
        read = [t if k is None else self._inputs.get(k) for t, k in zip(tensors, input_keys)]
        read = [b if b is not None else _empty_like(t) for b, t in zip(read, tensors)]
        read = [read[first.get(i, i)] for i in range(len(tensors))]
        copied = [i for i, k in enumerate(input_keys) if k is not None]
        expanded = tuple(j for j, i in enumerate(copied) if 0 in tensors[i].stride())
        copy_to = [read[i] for i in copied]
        copy_to = [_unexpanded(b) if j in expanded else b for j, b in enumerate(copy_to)]
        layouts = tuple((t.shape, t.stride(), t.dtype) for t in _tensors(result))
        signature = (device, stream, layouts)
        outputs = self._outputs.get(signature) or [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                                                    for shape, stride, dtype in layouts]
        kept = _Kept(None, GlobalStateGuard(), signature, input_keys, copy_to, expanded)
        _copy_in(kept, tensors)
        prepared = self._prepare(_replace_tensors(args, iter(read)))

        def run():  # the stage on the buffers, its outputs copied into the shared ones: all the graph leaves behind
            fresh = _tensors(self._compiled(*prepared))
            if tuple((t.shape, t.stride(), t.dtype) for t in fresh) != layouts:
                raise RuntimeError("the stage's outputs changed layout between two calls of the same layouts")
            for buffer, t in zip(outputs, fresh):
                buffer.copy_(t)
            return _replace_tensors(result, iter(outputs))

        try:
            captured = self._backend.capture(run, device, stream)
        except Exception as e:  # noqa: BLE001 - a stage that cannot be captured runs compiled, as without graphs
            self.broken = f"{type(e).__name__}: {e}"
            logger.warning("cggr: CUDA graph capture of the %s stage failed (%s); it runs compiled, without "
                           "graphs, from now on", self.name, self.broken)
            self.compiled_calls += 1
            return result
        self._seen.discard(key)
        self._outputs[signature] = outputs
        self._inputs.update((k, b) for k, b in zip(input_keys, read) if k is not None)
        self._keep(key, kept._replace(captured=captured))
        self.captures += 1
        if self.captures >= FUTILE_CAPTURES and self.replays < self.captures:
            self.broken = f"{self.captures} captures, {self.replays} replays: the calls' layouts do not repeat"
            self._graphs.clear()
            self._outputs.clear()
            self._inputs.clear()
            logger.warning("cggr: the %s stage stops capturing CUDA graphs (%s); it runs compiled", self.name,
                           self.broken)
        return result

    def _keep(self, key: tuple, kept: _Kept) -> None:
        """Keep ``kept``, dropping the graphs of the least recently replayed output signature beyond
        :data:`MAX_SIGNATURES`, and the buffers no graph uses any more. Safe beside another thread's calls (one per
        device in the autograd engine): the graphs are read at once, and a key another thread dropped is skipped."""
        self._graphs[key] = kept
        by_recency = list(dict.fromkeys(k.signature for k in list(self._graphs.values())))
        for dropped in by_recency[:max(0, len(by_recency) - MAX_SIGNATURES)]:
            for k in [k for k, v in list(self._graphs.items()) if v.signature == dropped]:
                self._graphs.pop(k, None)
        graphs = list(self._graphs.values())
        written, read = {g.signature for g in graphs}, {k for g in graphs for k in g.inputs}
        for signature in [s for s in list(self._outputs) if s not in written]:
            self._outputs.pop(signature, None)
        for k in [k for k in list(self._inputs) if k not in read]:
            self._inputs.pop(k, None)

    def stats(self) -> dict:
        buffers = [t for b in self._outputs.values() for t in b] + list(self._inputs.values())
        return dict(graphs=len(self._graphs), replays=self.replays, compiled_calls=self.compiled_calls,
                    captures=self.captures, broken=self.broken, buffers=len(buffers),
                    buffer_bytes=sum(t.untyped_storage().nbytes() for t in buffers))


def _repeats(tensors: list) -> tuple:
    """Which of a call's tensors are ones passed earlier in the same call: for each repeat, its position and the
    first one's (empty when none repeats, the common case, at the cost of one set)."""
    ids = [id(t) for t in tensors]
    if len(set(ids)) == len(ids):
        return ()
    first: dict = {}
    repeats = []
    for i, x in enumerate(ids):
        j = first.setdefault(x, i)
        if j != i:
            repeats.append((i, j))
    return tuple(repeats)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """A buffer of ``t``'s shape, strides and dtype (broadcast dims included), outside any capture."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


def _unexpanded(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its broadcast dims' repeats (their first element): what a copy into a buffer of that layout
    writes, as a copy into elements that share memory is refused."""
    return t[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in t.stride())]


def _copy_in(kept: _Kept, tensors: list) -> None:
    """The call's non-weight tensors into the buffers ``kept``'s graph reads (one multi-tensor copy)."""
    sources = [t for t, k in zip(tensors, kept.inputs) if k is not None]
    for j in kept.expanded:
        sources[j] = _unexpanded(sources[j])
    if sources:
        torch._foreach_copy_(kept.copy_to, sources)


def _unfit_inputs(tensors: list) -> str | None:
    """Why a call's inputs cannot be copied into buffers of their layout, or None: one whose elements share memory
    other than by broadcasting (a copy into it is refused)."""
    for t in tensors:
        if type(t) is not torch.nn.Parameter and _overlaps(_unexpanded(t)):
            return f"an input of shape {tuple(t.shape)}, strides {t.stride()} has elements that share memory"
    return None


def _overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory: taken by increasing stride, each dim must step past all
    that the smaller ones reach (sufficient for no overlap; gaps, as in a slice, are fine)."""
    reach = 0
    for stride, size in sorted((stride, size) for stride, size in zip(t.stride(), t.shape) if size > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


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
