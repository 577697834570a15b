"""HF mixture-of-experts blocks (Mixtral, Qwen2-MoE, OLMoE) in sparse mode against the reference
of docs/design.md §1.8.

The loss is HF's: cross-entropy plus ``router_aux_loss_coef`` times the router's load-balancing loss, so
the auxiliary loss's gradient into the routers is compared too.
"""

import copy
import logging

import pytest
import torch

import cggr
from cggr.adapters import find_layer_stack, is_fused_experts
from cggr.moe import REPLAY_BELOW
from tests.tiny import MOE_KINDS, flat_grads, hf_model, routed_as

TOL = 1e-5
LAYERS = 4


def _ids(seed=0):
    return torch.randint(0, 61, (3, 11), generator=torch.Generator().manual_seed(seed))


def _assert_equal_grads(g_fast, g_ref):
    scale = max(v.norm().item() for v in g_ref.values())
    for name, ref in g_ref.items():
        err = (g_fast[name] - ref).norm().item() / max(ref.norm().item(), 1e-3 * scale)
        assert err < TOL, f"{name}: relative error {err:.2e}"


def _routed_and_reference(kind, seed=0, mode="sparse", leak=0.0, policy="difficulty", loss=lambda out: out.loss,
                          before=None):
    model = hf_model(kind, layers=LAYERS, seed=seed)
    ref = copy.deepcopy(model)
    ids = _ids(seed)
    if before is not None:
        before(model, ref, ids)
    router = cggr.attach(model, warmup_steps=0, mode=mode, leak_rate=leak, policy=policy, seed=seed)
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None
    loss(out).backward()
    _, ref_blocks = find_layer_stack(ref)
    with cggr.reference_routing(ref_blocks, mode=mode, leak_rate=leak, **routed_as(router)):
        loss(ref(input_ids=ids, labels=ids)).backward()
    return model, router, flat_grads(model), flat_grads(ref)


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize("mode,leak,policy", [("sparse", 0.0, "difficulty"), ("sparse", 0.0, "random"),
                                              ("sparse", 0.25, "difficulty"), ("mask", 0.0, "difficulty")])
def test_gradients_equal_reference(kind, mode, leak, policy):
    seed = torch.randint(0, 10_000, ()).item()
    model, router, g_fast, g_ref = _routed_and_reference(kind, seed, mode, leak, policy)
    _assert_equal_grads(g_fast, g_ref)
    assert router.sparse_blocks == [mode == "sparse"] * LAYERS  # no block fell back to mask mode
    assert router.routing.compact_blocks == set()  # the compacted backwards know dense MLPs only
    counts = [router.routing.active_count(i) for i in range(LAYERS)]
    assert min(counts) < max(counts)  # routing really happened
    assert router.config.placement == ("per_block" if policy == "random" else "nested")


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_every_hf_experts_implementation(impl):
    """The experts' replay goes through the module's own forward, so any kernel HF dispatches to works."""
    def use(model, ref, ids):
        model.config._experts_implementation = ref.config._experts_implementation = impl

    _, _, g_fast, g_ref = _routed_and_reference("olmoe", before=use)
    _assert_equal_grads(g_fast, g_ref)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_aux_loss_gradient_reaches_routers_through_active_rows(kind):
    """The load-balancing loss alone: its gradient reaches every router, from the active rows only."""
    model, router, g_fast, g_ref = _routed_and_reference(kind, loss=lambda out: out.aux_loss)
    _assert_equal_grads(g_fast, g_ref)
    for i in range(LAYERS):
        assert g_fast[f"model.layers.{i}.mlp.gate.weight"].norm() > 0
    # Without cggr the bottom router gets more of it: the inactive rows' share is really gone.
    dense = hf_model(kind, layers=LAYERS)
    dense(input_ids=_ids(), labels=_ids()).aux_loss.backward()
    bottom = "model.layers.0.mlp.gate.weight"
    assert (g_fast[bottom] - dense.get_parameter(bottom).grad).norm() > 1e-3 * g_fast[bottom].norm()


def test_router_logits_recorded_before_attaching():
    """HF installs its router-logits recorder at the first forward; one run before cggr (or before the
    reference's hooks) must still record the routed logits."""
    def warm(model, ref, ids):
        with torch.no_grad():
            model(input_ids=ids, labels=ids)
            ref(input_ids=ids, labels=ids)

    _, _, g_fast, g_ref = _routed_and_reference("mixtral", before=warm)
    _assert_equal_grads(g_fast, g_ref)


def test_experts_backward_runs_on_active_rows_only():
    """Every expert call in backward is a replay of one block's active rows, in the blocks where the replay
    pays (fewer than REPLAY_BELOW of the rows active); elsewhere backward uses the forward's graph."""
    model = hf_model("mixtral", layers=LAYERS)
    calls = []
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        plain = experts.forward

        def spy(hidden_states, top_k_index, top_k_weights, _plain=plain, _i=i):
            calls.append((_i, hidden_states.shape[0]))
            return _plain(hidden_states, top_k_index, top_k_weights)

        experts.forward = spy  # cggr wraps the spy
    router = cggr.attach(model, warmup_steps=0)
    ids = _ids()
    out = model(input_ids=ids, labels=ids)
    assert sorted(calls) == [(i, ids.numel()) for i in range(LAYERS)]
    calls.clear()
    out.loss.backward()
    n, r = ids.numel(), router.routing
    replayed = [(i, r.active_count(i)) for i in range(LAYERS) if r.active_count(i) < REPLAY_BELOW * n]
    assert len(replayed) >= 2 and all(rows < n / 2 for _, rows in replayed)
    assert sorted(calls) == replayed


def test_second_backward_replays():
    """The forward's graph of the experts is used once; a retained graph's second backward replays."""
    model = hf_model("olmoe", layers=LAYERS)
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0)
    ids = _ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    loss.backward()
    _, ref_blocks = find_layer_stack(ref)
    with cggr.reference_routing(ref_blocks, **routed_as(router)):
        (2 * ref(input_ids=ids, labels=ids).loss).backward()
    _assert_equal_grads(flat_grads(model), flat_grads(ref))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    def checkpoint(model, ref, ids):
        for m in (model, ref):  # (HF's reentrant checkpointing drops the aux loss's gradient, cggr or not)
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})

    _, _, g_fast, g_ref = _routed_and_reference("qwen2_moe", before=checkpoint)
    _assert_equal_grads(g_fast, g_ref)


def test_bf16_autocast_replays_in_the_forwards_precision():
    """Under autocast the experts' replay runs in bf16 as their forward did: equal to the bf16 reference (an
    fp32 reference would pick other experts for some tokens)."""
    model = hf_model("mixtral", layers=LAYERS)
    model.config._experts_implementation = "eager"  # its matmuls autocast on the CPU (grouped_mm's do not)
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0)
    ids = _ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    _, ref_blocks = find_layer_stack(ref)
    with cggr.reference_routing(ref_blocks, **routed_as(router)), torch.autocast("cpu", dtype=torch.bfloat16):
        ref(input_ids=ids, labels=ids).loss.backward()
    _assert_equal_grads(flat_grads(model), flat_grads(ref))


def test_unhandled_experts_fall_back_to_mask_mode(caplog):
    """Experts cggr cannot route row by row (here: expert parallel) make their block use mask mode, warned once."""
    model = hf_model("mixtral", layers=LAYERS)
    model.model.layers[1].mlp.experts._is_expert_parallel = True
    assert not is_fused_experts(model.model.layers[1].mlp.experts)
    with caplog.at_level(logging.WARNING, logger="cggr"):
        router = cggr.attach(model, warmup_steps=0)
    assert router.sparse_blocks == [True, False, True, True]
    warned = [r.getMessage() for r in caplog.records if "mask mode" in r.getMessage()]
    assert len(warned) == 1 and "model.layers.1" in warned[0] and "MixtralExperts" in warned[0]


def test_list_of_experts_falls_back_to_mask_mode(caplog):
    """transformers 4 MoE: experts as a list of MLPs, each on the rows sent to it (not one row per token)."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(8, 2)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

        def forward(self, x):
            pick = self.gate(x).argmax(-1)
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                out[pick == e] = expert(x[pick == e])
            return x + out

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(61, 8)
            self.layers = torch.nn.ModuleList(Block() for _ in range(2))
            self.head = torch.nn.Linear(8, 61)

        def forward(self, ids):
            x = self.emb(ids)
            for b in self.layers:
                x = b(x)
            return self.head(x)

    model = LM()
    with caplog.at_level(logging.WARNING, logger="cggr"):
        router = cggr.attach(model, warmup_steps=0)
    assert router.sparse_blocks == [False, False]
    assert sum("a list of experts" in r.getMessage() for r in caplog.records) == 2
    ids = _ids()
    torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()  # mask mode: runs


def test_double_backward_is_refused():
    """The experts' replayed gradients are not differentiable: a gradient penalty through them would be silently
    wrong (0.85 relative error measured on Mixtral before this refusal), so it raises."""
    model = hf_model("mixtral", layers=2, seed=1)
    cggr.attach(model, warmup_steps=0, seed=1)
    ids = _ids()
    loss = model(input_ids=ids, labels=ids).loss
    with pytest.raises(RuntimeError, match="double backward through routed mixture-of-experts experts is not "
                                           "supported; attach with mode='mask'"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
