"""CUDA graphs of the compacted backward's compiled stages: a stage issued as one replay.

At 350M and below the routed backward is bound by the host: each block's two compiled stages cost the host
about as much as the GPU spends on them (guards, the wrapper, a launch per kernel). With per-block placement a
block's row count repeats from step to step, and in a steady training loop so do the addresses of what its
stages read: the caching allocator hands the same blocks to the same sequence of allocations. So a stage call
whose every input sits where it sat when its graph was captured (same address, shape, strides, dtype) replays
that graph; every other call runs the compiled stage as before, and a call seen twice is captured.

Why that is exact: a graph reads its inputs at the addresses it was captured with, and :class:`GraphedStage`
replays only when the call's tensors are at those addresses with the same layout. It computes nothing on the
host from their values (a stage has no host synchronisation, or its capture fails and the stage is never
graphed). Its outputs live in the graphs' memory pool, which the next replay of any graph overwrites, so they
are copied out right after each replay: the caller gets tensors no graph writes to.

Opt-in (``CGGR_CUDA_GRAPHS=1``) while it is measured. Memory: each captured graph keeps its outputs' memory
(about the size of its block's weight gradients plus two activation-sized tensors), bounded by
:data:`MAX_VARIANTS` graphs per block and row count.
"""

from __future__ import annotations

import collections
import functools
import logging
from typing import Any, Callable, NamedTuple

import torch

logger = logging.getLogger("cggr")

MAX_VARIANTS = 2
"""Graphs kept per call site (a block's weights at one row count): under gradient accumulation the first
micro-batch of a step allocates the gradients and so may see other addresses than the rest."""
FUTILE_CAPTURES = 64
"""Captures after which a stage that has replayed fewer times than it captured stops capturing: its inputs'
addresses do not repeat in this loop (a capture costs about two runs of the stage)."""
MAX_SEEN = 4096
"""Signatures remembered until their second call; forgotten all at once beyond that (addresses that never
repeat, such as a loop that allocates differently every step, then capture nothing)."""


class _Captured(NamedTuple):
    graph: Any  # torch.cuda.CUDAGraph, or a test's stand-in with .replay()
    outputs: Any  # the stage's result, its tensors in the graph's memory


def _is_weight(t: torch.Tensor) -> bool:
    """Whether ``t`` looks like a trained weight: a leaf that requires grad and is no view (in the backward a
    view of the block input also requires grad). Weights keep their addresses; a frozen one is not told from an
    activation, which only merges call sites (:func:`_site`)."""
    return t.requires_grad and t.is_leaf and t._base is None


def _walk(x, tensors: list, key: list) -> None:
    """Append ``x``'s tensors to ``tensors`` and what identifies the call to ``key``: each tensor's address,
    layout and whether it is a weight (:func:`_is_weight`), every other leaf as itself. Tuples (named or
    not) are walked."""
    if isinstance(x, torch.Tensor):
        tensors.append(x)
        key.append((x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, _is_weight(x)))
    elif isinstance(x, tuple):
        key.append(type(x))
        for item in x:
            _walk(item, tensors, key)
        key.append(len(x))
    else:
        key.append(x)


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
    """How :class:`GraphedStage` captures: CUDA graphs in one memory pool per device, captured on a side stream
    (tests on the CPU pass a stand-in with the same method)."""

    def capture(self, run: Callable[[], Any], device: torch.device) -> tuple[Any, _Captured]:
        """Run ``run()`` for this call's result, then capture it as a graph on ``device`` (its tensors'); returns
        ``(result, captured)``.

        The first run is on the side stream too, outside the capture, so lazy per-stream state (cuBLAS's
        workspace) exists before the capture. The memory pool is shared by every graph of the device: replays
        run one after another on one stream and each stage's outputs are copied out before the next replay."""
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        with torch.cuda.device(index):
            return self._capture(run, index)

    def _capture(self, run, device: int):
        current, side = torch.cuda.current_stream(), _side_stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            result = run()
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=_pool(device), capture_error_mode="thread_local")
            try:
                outputs = run()
            finally:
                graph.capture_end()
        current.wait_stream(side)
        for t in _tensors(result):
            t.record_stream(current)  # allocated on the side stream, used on the current one
        return result, _Captured(graph, outputs)


@functools.lru_cache(maxsize=None)
def _side_stream(device: int):
    return torch.cuda.Stream(device)


@functools.lru_cache(maxsize=None)
def _pool(device: int):
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
        self._graphs: collections.OrderedDict[tuple, _Captured] = collections.OrderedDict()  # least recent first
        self._seen: dict[tuple, int] = {}
        self.replays = self.compiled_calls = self.captures = 0
        self.broken: str | None = None

    def __call__(self, *args):
        tensors: list = []
        key: list = [torch.is_grad_enabled(), torch.is_autocast_enabled(), torch.get_float32_matmul_precision()]
        try:
            _walk(args, tensors, key)
            key = tuple(key)
            hash(key)
        except TypeError:  # a leaf that is not hashable: no way to know it is the same call
            return self._run(args)
        if not tensors or (tensors[0].is_cuda and torch.cuda.is_current_stream_capturing()):
            return self._run(args)  # no tensor to key on; or inside a graph the caller captures: theirs to replay
        captured = self._graphs.get(key)
        if captured is not None:
            self._graphs.move_to_end(key)
            captured.graph.replay()
            self.replays += 1
            return _copy_out(captured.outputs)
        if self.broken is not None or self._seen.get(key, 0) < 1:
            if len(self._seen) >= MAX_SEEN:
                self._seen.clear()
            self._seen[key] = self._seen.get(key, 0) + 1
            return self._run(args)
        return self._capture(key, args, tensors)

    def _run(self, args):
        self.compiled_calls += 1
        return self._compiled(*self._prepare(args))

    def _capture(self, key: tuple, args: tuple, inputs: list):
        prepared = self._prepare(args)
        try:
            result, captured = self._backend.capture(lambda: self._compiled(*prepared), inputs[0].device)
        except Exception as e:  # noqa: BLE001 - a stage that cannot be captured runs compiled, as without graphs
            self.broken = f"{type(e).__name__}: {e}"
            logger.warning("cggr: CUDA graph capture of the %s stage failed (%s); it runs compiled, without "
                           "graphs, from now on", self.name, self.broken)
            self.compiled_calls += 1
            return self._compiled(*prepared)
        self._seen.pop(key, None)
        addresses = {t.data_ptr() for t in inputs}
        if any(t.data_ptr() in addresses for t in _tensors(captured.outputs)):
            # An output that is an input (a stage returning what it was given): the graph's "output" would be
            # the captured call's tensor, kept alive; such a stage runs compiled.
            self.broken = "an output aliases an input"
            logger.warning("cggr: the %s stage returns one of its inputs; it runs without CUDA graphs", self.name)
            return result
        self._keep(key, captured)
        self.captures += 1
        if self.captures >= FUTILE_CAPTURES and self.replays < self.captures:
            self.broken = f"{self.captures} captures, {self.replays} replays: the inputs' addresses do not repeat"
            self._graphs.clear()
            logger.warning("cggr: the %s stage stops capturing CUDA graphs (%s); it runs compiled", self.name,
                           self.broken)
        return result

    def _keep(self, key: tuple, captured: _Captured) -> None:
        """Keep ``captured``, dropping the least recently replayed graph of the same call site (the same
        tensors but for the activations' addresses) beyond :data:`MAX_VARIANTS`."""
        site = _site(key)
        same_site = [k for k in self._graphs if _site(k) == site]
        for old in same_site[:max(0, len(same_site) + 1 - MAX_VARIANTS)]:
            del self._graphs[old]
        self._graphs[key] = captured

    def stats(self) -> dict:
        return dict(graphs=len(self._graphs), replays=self.replays, compiled_calls=self.compiled_calls,
                    captures=self.captures, broken=self.broken)


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
