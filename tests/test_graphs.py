"""The CUDA-graph replay of compiled stages (cggr/compact/graphs.py), on the CPU with a stand-in for CUDA graphs.

The stand-in's "graph" reruns the captured call on the tensors it was captured with and writes the results into
the outputs it captured, as a CUDA graph reads and writes fixed memory: a replay given other tensors than the
captured ones would return the captured call's result. The device test (tests/test_cuda.py,
``test_cuda_graphs_replay_the_compiled_stages_exactly``) runs real graphs inside the routed backward.
"""

import logging
from typing import NamedTuple

import pytest
import torch

from cggr.compact import graphs
from cggr.compact.graphs import GraphedStage, _Captured


class FakeGraph:
    def __init__(self, run, outputs):
        self.run, self.outputs = run, outputs

    def replay(self):
        for static, new in zip(graphs._tensors(self.outputs), graphs._tensors(self.run())):
            static.copy_(new)


class FakeGraphs:
    def __init__(self, fail=None):
        self.fail = fail

    def stream(self, device):
        return None

    def capture(self, run, device, stream):
        assert device == torch.device("cpu") and stream is None  # the call's tensors' device, its stream
        if self.fail:
            raise RuntimeError(self.fail)
        outputs = run()
        return _Captured(FakeGraph(run, outputs), outputs)


class Weights(NamedTuple):
    w: torch.Tensor
    b: torch.Tensor | None


def stage(x, idx, weights: Weights, scale: float):
    """A stage of the compacted backward's kind: rows ``idx`` of ``x`` through a matmul, a weight gradient."""
    rows = x[idx] * scale
    y = rows @ weights.w
    return y, (rows.t() @ y, None)


def prepared(args):
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def graphed_stage(**kw):
    return GraphedStage("test", stage, prepared, backend=FakeGraphs(**kw))


@pytest.fixture(params=[0, 1, 2], ids=lambda s: f"seed{s}")
def case(request):
    g = torch.Generator().manual_seed(request.param)
    x = torch.randn(13, 5, generator=g)
    idx = torch.randperm(13, generator=g)[:7]
    weights = Weights(torch.nn.Parameter(torch.randn(5, 3, generator=g)), None)
    return x, idx, weights


def assert_same(got, want):
    for a, b in zip(graphs._tensors(got), graphs._tensors(want)):
        assert torch.equal(a, b)


def test_a_call_seen_twice_is_captured_then_replayed(case):
    x, idx, weights = case
    s = graphed_stage()
    for _ in range(4):
        assert_same(s(x, idx, weights, 0.5), stage(x, idx, weights, 0.5))
    assert (s.compiled_calls, s.captures, s.replays) == (1, 1, 2)


def test_a_replay_reads_the_current_values_at_the_captured_addresses(case):
    x, idx, weights = case
    s = graphed_stage()
    s(x, idx, weights, 0.5), s(x, idx, weights, 0.5)
    x.mul_(3)
    idx.copy_(idx.flip(0))
    with torch.no_grad():
        weights.w.add_(1)
    assert_same(s(x, idx, weights, 0.5), stage(x, idx, weights, 0.5))
    assert s.replays == 1


def test_other_layouts_leaves_or_weights_are_not_replayed(case):
    x, idx, weights = case
    s = graphed_stage()
    s(x, idx, weights, 0.5), s(x, idx, weights, 0.5)
    calls = [(x, idx[:5], weights, 0.5),  # another row count
             (x.t().contiguous().t(), idx, weights, 0.5),  # another layout
             (x, idx, weights, 0.25),  # another leaf
             (x, idx, Weights(torch.nn.Parameter(weights.w.detach().clone()), None), 0.5),  # other weights
             (x, idx, Weights(weights.w.detach(), None), 0.5)]  # the weights' values, not the weights
    for args in calls:
        assert_same(s(*args), stage(*args))
    assert s.replays == 0 and s.compiled_calls == 1 + len(calls)


def test_activations_elsewhere_are_copied_in_and_replayed(case):
    """A call with the captured call's weights and layouts replays whatever addresses its other tensors have:
    they are copied into the buffers the graph reads (a graph reads fixed addresses)."""
    x, idx, weights = case
    s = graphed_stage()
    s(x, idx, weights, 0.5), s(x, idx, weights, 0.5)
    for scale in (2.0, -1.0, 0.0):
        a, rows = x * scale, idx.flip(0).clone()
        assert_same(s(a, rows, weights, 0.5), stage(a, rows, weights, 0.5))
    assert (s.compiled_calls, s.captures, s.replays) == (1, 1, 3)


def test_a_tensor_passed_twice_is_one_buffer_and_part_of_the_key(case):
    """The compacted MLP stage gets its kept rows twice (``idx`` and ``mlp.rows``): the graph reads one buffer for
    both, as the compiled stage saw one tensor (dynamo guards on that); a call passing two tensors there is
    another key."""
    x, idx, weights = case
    s = GraphedStage("twice", lambda x, idx, rows: x[idx] + x[rows].flip(0), prepared, backend=FakeGraphs())
    for rows in (idx, idx.flip(0).clone(), idx.roll(1).clone()):
        assert_same(s(x, rows, rows), x[rows] + x[rows].flip(0))
        assert_same(s(x, rows, rows), x[rows] + x[rows].flip(0))
    (kept,) = s._graphs.values()
    assert len(kept.copy_to) == 2  # x and the rows, once
    other = idx.roll(2).clone()
    assert_same(s(x, idx, other), x[idx] + x[other].flip(0))
    assert (s.compiled_calls, s.captures, s.replays) == (2, 1, 4)


def test_a_broadcast_input_is_copied_in_unexpanded(case):
    """An input with a stride-0 dim (cos and sin expanded over the batch) replays: only its distinct elements are
    copied, as a copy into elements that share memory is refused."""
    x, idx, weights = case
    s = GraphedStage("broadcast", lambda x, idx, c: x[idx] * c, prepared, backend=FakeGraphs())
    for row in (torch.arange(5.0), torch.arange(5.0) - 7, torch.ones(5)):
        c = row.unsqueeze(0).expand(13, 5)[:7]
        assert_same(s(x, idx, c), x[idx] * c)
        assert_same(s(x, idx, c), x[idx] * c)
    assert s.replays == 4 and s.captures == 1


def test_an_input_whose_elements_overlap_is_never_graphed(case, caplog):
    x, idx, weights = case
    s = GraphedStage("overlap", lambda x, idx, o: x[idx] + o.sum(), prepared, backend=FakeGraphs())
    o = torch.arange(10.0).as_strided((3, 3), (1, 1))
    with caplog.at_level(logging.WARNING, logger="cggr"):
        for _ in range(3):
            assert_same(s(x, idx, o), x[idx] + o.sum())
    assert s.captures == 0 and "share memory" in s.broken


def test_the_outputs_are_copied_out_of_the_graphs_memory(case):
    x, idx, weights = case
    s = graphed_stage()
    s(x, idx, weights, 0.5), s(x, idx, weights, 0.5)
    first = s(x, idx, weights, 0.5)
    kept = [t.clone() for t in graphs._tensors(first)]
    x.mul_(-2)
    second = s(x, idx, weights, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(graphs._tensors(first), kept))  # the next replay left it alone
    graphs._tensors(second)[0].zero_()  # the caller's to change
    assert_same(s(x, idx, weights, 0.5), stage(x, idx, weights, 0.5))
    assert isinstance(second[1], tuple) and second[1][1] is None  # the result's structure as the stage returns it


def test_a_failed_capture_warns_once_and_runs_compiled_from_then_on(case, caplog):
    x, idx, weights = case
    s = graphed_stage(fail="operation not permitted when stream is capturing")
    with caplog.at_level(logging.WARNING, logger="cggr"):
        for _ in range(4):
            assert_same(s(x, idx, weights, 0.5), stage(x, idx, weights, 0.5))
    assert "not permitted" in s.broken and s.replays == 0 and s.compiled_calls == 4
    assert sum("CUDA graph capture" in r.message for r in caplog.records) == 1


def test_a_stage_returning_an_input_is_never_graphed(case):
    x, idx, weights = case
    s = GraphedStage("echo", lambda x, idx: (x, x[idx]), prepared, backend=FakeGraphs())
    for _ in range(3):
        out = s(x, idx)
        assert out[0].data_ptr() == x.data_ptr() and torch.equal(out[1], x[idx])
    assert s.broken and s.replays == 0


def test_each_block_s_weights_have_a_graph_of_their_own(case):
    x, idx, weights = case
    s = graphed_stage()
    other = Weights(torch.nn.Parameter(weights.w.detach() * 3), None)  # another block's weights
    for _ in range(3):
        for w in (weights, other):
            assert_same(s(x, idx, w, 0.5), stage(x, idx, w, 0.5))
    assert (s.compiled_calls, s.captures, s.replays) == (2, 2, 2) and len(s._graphs) == 2


def test_graphs_of_outputs_of_one_layout_share_their_buffers_and_each_replay_is_copied_out(case):
    """Every block's graph at one row count writes its outputs into the same buffers (the memory the graphs keep is
    one block's outputs per row count, not one per block); each replay's result is copied out before the next
    replay overwrites them."""
    x, idx, weights = case
    blocks = [Weights(torch.nn.Parameter(weights.w.detach() * (b + 1)), None) for b in range(3)]
    inputs = [x * (b - 1) for b in range(3)]
    s = graphed_stage()
    for _ in range(2):
        for xb, wb in zip(inputs, blocks):
            s(xb, idx, wb, 0.5)
    assert s.captures == 3 and s.stats()["buffers"] == 2 + 2  # x and idx in, two outputs
    buffers = [graphs._tensors(kept.captured.outputs) + kept.copy_to for kept in s._graphs.values()]
    assert all(a is b for other in buffers[1:] for a, b in zip(buffers[0], other))
    results = [s(xb, idx, wb, 0.5) for xb, wb in zip(inputs, blocks)]  # three replays, one after another
    assert s.replays == 3
    for got, xb, wb in zip(results, inputs, blocks):
        assert_same(got, stage(xb, idx, wb, 0.5))


def test_at_most_max_signatures_output_layouts_keep_graphs_and_buffers(case, monkeypatch):
    """Row counts beyond :data:`MAX_SIGNATURES` drop the least recently replayed count's graphs with its buffers;
    a dropped count is captured again when it comes back."""
    monkeypatch.setattr(graphs, "MAX_SIGNATURES", 2)
    x, idx, weights = case
    s = graphed_stage()
    for k in (7, 6, 5):
        for _ in range(2):
            s(x, idx[:k], weights, 0.5)
    assert s.captures == 3 and len(s._graphs) == 2 and len(s._outputs) == 2
    assert s.stats()["buffers"] == 2 * 2 + 1 + 2  # two outputs per row count, x, idx per row count
    assert {g.captured.outputs[0].shape[0] for g in s._graphs.values()} == {6, 5}
    for k in (6, 5, 7, 7, 7):
        assert_same(s(x, idx[:k], weights, 0.5), stage(x, idx[:k], weights, 0.5))
    assert s.replays == 3 and s.captures == 4  # 6 and 5 replayed; 7 seen, captured, replayed
    assert {g.captured.outputs[0].shape[0] for g in s._graphs.values()} == {5, 7}


def test_an_unhashable_argument_runs_compiled(case):
    x, idx, weights = case
    s = GraphedStage("lists", lambda x, idx, extra: x[idx] * len(extra), prepared, backend=FakeGraphs())
    for _ in range(3):
        assert torch.equal(s(x, idx, [1, 2]), x[idx] * 2)
    assert s.captures == 0 and s.compiled_calls == 3


def test_the_switch_names_its_values(monkeypatch):
    from cggr.env import cuda_graphs_enabled

    monkeypatch.setenv("CGGR_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="CGGR_CUDA_GRAPHS='yes': allowed values are 0, 1"):
        cuda_graphs_enabled()
    monkeypatch.setenv("CGGR_CUDA_GRAPHS", "1")
    assert cuda_graphs_enabled()
    monkeypatch.delenv("CGGR_CUDA_GRAPHS")
    assert not cuda_graphs_enabled()


def test_off_cuda_the_stages_are_the_eager_functions(monkeypatch):
    from cggr.compact.pointwise import kernel

    monkeypatch.setenv("CGGR_CUDA_GRAPHS", "1")
    assert kernel(stage, on_cuda=False, rows="idx") is stage


def test_a_stage_whose_calls_never_repeat_stops_capturing(case, monkeypatch, caplog):
    """Each key (here: a row count) seen exactly twice, never a third time: every capture is wasted, so the stage
    gives up, and keeps no buffers."""
    x, idx, weights = case
    monkeypatch.setattr(graphs, "FUTILE_CAPTURES", 5)
    s = graphed_stage()
    with caplog.at_level(logging.WARNING, logger="cggr"):
        for k in range(1, 9):
            rows = torch.arange(k)
            assert_same(s(x, rows, weights, 0.5), stage(x, rows, weights, 0.5))
            assert_same(s(x, rows, weights, 0.5), stage(x, rows, weights, 0.5))
    assert s.captures == 5 and "do not repeat" in s.broken and not s._graphs and s.stats()["buffers"] == 0
    assert sum("stops capturing" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3_text", "olmo2", "phi3", "gpt2"])
def test_every_compacted_family_s_stage_calls_have_the_same_keys_every_step(kind, monkeypatch):
    """The real stages' arguments (named tuples of weights and saved rows, the block's spec) make hashable keys,
    each block's two stage calls have the same keys from one step to the next, and every block's its own (its
    weights are passed as the parameters themselves): what lets a steady loop replay."""
    from benchmarks import speed
    from cggr.compact import decoder, gpt2
    import cggr

    calls = []
    for module in (decoder, gpt2):
        def spy(eager, on_cuda, rows=None, real=module.kernel):
            fn = real(eager, on_cuda, rows)
            if rows is None:
                return fn

            def recorded(*args):
                key: list = []
                graphs._walk(args, [], key)
                calls.append(tuple(key))
                return fn(*args)
            return recorded
        monkeypatch.setattr(module, "kernel", spy)
    monkeypatch.setattr(speed, "VOCAB", 128)
    model = speed.build_family(kind, 64, 4, 4, 128, dtype=torch.float32, device="cpu")
    cggr.attach(model, warmup_steps=0)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    for step in range(3):  # the first step runs before any scores: every row, other shapes
        if step == 1:
            calls.clear()
        model(input_ids=ids, labels=ids).loss.backward()
    per_step = len(calls) // 2
    assert per_step == 2 * 4
    assert all(hash(k) is not None for k in calls)
    assert calls[:per_step] == calls[per_step:] and len(set(calls[:per_step])) == per_step


def test_a_call_without_tensors_runs_compiled():
    s = GraphedStage("scalars", lambda a, b: a + b, prepared, backend=FakeGraphs())
    assert [s(1, 2) for _ in range(3)] == [3, 3, 3] and s.compiled_calls == 3 and s.captures == 0


def captured_then(s, *args):
    """``s`` called twice with ``args`` (seen, then captured): the next such call may replay."""
    s(*args), s(*args)
    assert s.captures == 1


def test_a_replay_needs_the_global_state_of_its_capture(case):
    """What dynamo guards on besides the arguments (here the deterministic flag; also TF32, the reduced-precision
    reductions, autocast, the default dtype): under another state the compiled stage would recompile, and a
    replay would run what was captured."""
    x, idx, weights = case
    s = graphed_stage()
    captured_then(s, x, idx, weights, 0.5)
    torch.use_deterministic_algorithms(True)
    try:
        assert_same(s(x, idx, weights, 0.5), stage(x, idx, weights, 0.5))
    finally:
        torch.use_deterministic_algorithms(False)
    assert s.replays == 0
    s(x, idx, weights, 0.5)
    assert s.replays == 1


def test_the_key_does_not_ask_the_legacy_matmul_precision(case):
    """With TF32 set through the new API, ``torch.get_float32_matmul_precision()`` raises."""
    x, idx, weights = case
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        s = graphed_stage()
        for _ in range(3):
            assert_same(s(x, idx, weights, 0.5), stage(x, idx, weights, 0.5))
    finally:
        matmul.fp32_precision = previous
    assert s.replays == 1


def test_under_a_dispatch_mode_the_stage_runs_compiled(case):
    """A mode (a FLOP counter, say) must see the stage's operations, which a replay does not issue."""
    from torch.utils.flop_counter import FlopCounterMode

    x, idx, weights = case
    s = graphed_stage()
    captured_then(s, x, idx, weights, 0.5)
    with FlopCounterMode(display=False) as flops:
        assert_same(s(x, idx, weights, 0.5), stage(x, idx, weights, 0.5))
    assert s.replays == 0 and flops.get_total_flops() > 0


class Scale:
    def __init__(self, value):
        self.value = value


def test_a_leaf_compared_by_identity_runs_compiled(case):
    """An object hashed by its identity may have changed since the capture (the graph holds what it read)."""
    x, idx, weights = case
    s = GraphedStage("object", lambda x, idx, scale: x[idx] * scale.value, prepared, backend=FakeGraphs())
    scale = Scale(0.5)
    s(x, idx, scale), s(x, idx, scale)
    scale.value = 3.0
    assert torch.equal(s(x, idx, scale), x[idx] * 3.0)
    assert s.captures == 0 and s.replays == 0


def test_equal_leaves_of_other_types_are_other_calls(case):
    """``1 == 1.0 == True`` in Python, but the stage computes in another dtype."""
    x, idx, _ = case
    s = GraphedStage("scalar", lambda x, idx, v: x[idx].long() + v, prepared, backend=FakeGraphs())
    s(x, idx, 1), s(x, idx, 1)
    assert s(x, idx, 1.0).dtype == torch.float32 and s(x, idx, 1).dtype == torch.int64
    assert s.replays == 1


def test_tensors_on_two_devices_are_not_captured(case):
    """A CPU scalar beside CUDA tensors is read on the host at capture: its value would be baked in."""
    x, idx, _ = case
    s = GraphedStage("devices", lambda x, idx, m: x[idx], prepared, backend=FakeGraphs())
    m = torch.empty(1, device="meta")
    for _ in range(3):
        assert torch.equal(s(x, idx, m), x[idx])
    assert s.captures == 0 and s.compiled_calls == 3


@pytest.mark.parametrize("outputs", [
    lambda x, idx: (x[idx], x[idx] > 0),  # a bool copied by x * 1 is an integer
    lambda x, idx: x[idx][:, ::2],  # a copy of a tensor with gaps is dense: other strides
    lambda x, idx: (lambda y: (y, y[1:]))(x[idx] * 2),  # two outputs sharing memory, as copies would not
    lambda x, idx: (x[idx], x[1:]),  # a view of an input (another address than the input's)
], ids=["bool", "gaps", "aliased-outputs", "input-view"])
def test_outputs_a_copy_would_not_reproduce_are_never_graphed(case, outputs):
    x, idx, _ = case
    s = GraphedStage("outputs", outputs, prepared, backend=FakeGraphs())
    for _ in range(3):
        got, want = graphs._tensors(s(x, idx)), graphs._tensors(outputs(x, idx))
        for a, b in zip(got, want):
            assert torch.equal(a, b) and (a.dtype, a.stride()) == (b.dtype, b.stride())

        def memory(tensors):  # which of x and the outputs share memory
            ptrs = [t.untyped_storage().data_ptr() for t in (x, *tensors)]
            return [ptrs.index(p) for p in ptrs]
        assert memory(got) == memory(want)
    assert s.broken and s.replays == 0


@pytest.mark.parametrize("kind,options", [("llama", {}), ("llama", {"estimator": "unbiased"}), ("qwen3", {}),
                                          ("gpt2", {})], ids=["llama", "llama-unbiased", "qwen3", "gpt2"])
def test_a_training_loop_replaying_every_stage_matches_the_loop_without_graphs(kind, options, monkeypatch):
    """The real stages graphed with the stand-in (a replay reruns the stage on the buffers it was captured with),
    in a loop of 4 optimizer steps of 2 micro-batches, new tokens in each: every gradient equals the loop without
    graphs bit for bit, and from the third micro-batch on every stage call replays. A buffer shared wrongly (two
    inputs of one call, or a block reading another's copy) or a key that let one block replay another's graph
    would change a gradient."""
    from benchmarks import speed
    from cggr.compact import decoder, gpt2
    import copy
    import cggr

    monkeypatch.setattr(speed, "VOCAB", 128)
    base = speed.build_family(kind, 64, 4, 4, 128, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, 128, (2, 16), generator=g) for _ in range(8)]

    def train(graphed: bool):
        stages = {}
        for module in (decoder, gpt2):
            def wrapped(eager, on_cuda, rows=None, real=module.kernel):
                if rows is None or not graphed:
                    return real(eager, on_cuda, rows)
                return stages.setdefault(eager, GraphedStage(eager.__name__, eager, prepared, backend=FakeGraphs()))
            monkeypatch.setattr(module, "kernel", wrapped)
        model = copy.deepcopy(base)
        cggr.attach(model, warmup_steps=0, seed=3, **options)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        per_step = []
        for step in range(4):
            for ids in batches[2 * step:2 * step + 2]:
                model(input_ids=ids, labels=ids).loss.backward()
            per_step.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            opt.step()
            opt.zero_grad(set_to_none=True)
        return per_step, stages

    plain, _ = train(False)
    replayed, stages = train(True)
    assert len(stages) == 2 and not any(s.broken for s in stages.values())
    for s in stages.values():  # 8 micro-batches x 4 blocks: seen, captured, then replayed
        assert (s.compiled_calls, s.captures, s.replays) == (4, 4, 24), s.stats()
    for a, b in zip(replayed, plain):
        assert a.keys() == b.keys()
        for name in b:
            assert torch.equal(a[name], b[name]), name
