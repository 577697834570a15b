"""cggr.compact: the attach-time check that a compacted backward equals the block, the Functions against the
HF layers under the reference routing, double backward refused, and the compacted forward copied and pickled."""

import copy
import inspect
import logging
import os
import pickle

import pytest
import torch
import transformers as tf

import cggr
from cggr.adapters import find_layer_stack
from cggr.compact import decoder, gpt2
from cggr.compact import verify as V
from cggr.compact.forward import CompactedForward
from cggr.compact.pointwise import rms_norm
from cggr.families import FAMILIES, compacted_backwards
from cggr.routing import Routing
from tests.tiny import COMPACTED_KINDS, compacted_kind, hf_model, rel_err, routed_as

BACKWARDS = [b.name for b in compacted_backwards()]  # one test per compacted backward: a family of each


@pytest.fixture(autouse=True)
def _fresh_verdicts():
    V.clear_cache()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small run several times faster on one thread on a busy CI host
    yield
    torch.set_num_threads(threads)
    V.clear_cache()


def _model(kind: str, seed: int = 0, **overrides):
    """The registry's tiny model of ``kind`` (vocabulary 61), with config ``overrides``."""
    return hf_model(kind, vocab=61, seed=seed, **overrides)


def _blocks(model):
    return find_layer_stack(model)[1]


def compact_decision(block):
    """The decision for a block of a model of no known family: every compacted backward is a candidate."""
    return V.compact_decision(block, compacted_backwards())


def _structural_family(block):
    """``(backward, spec)`` the block's structure matches, or None (structural_match's reason dropped)."""
    found = V.structural_match(block, compacted_backwards())
    return None if isinstance(found, str) else found


def _name(found):
    return None if found is None else found.backward.name


# ---------------------------------------------------------------------------------------- the attach-time check
@pytest.mark.parametrize("kind", COMPACTED_KINDS)
def test_check_passes_for_the_families_it_was_written_for(kind, caplog):
    model = _model(kind)
    family = FAMILIES[kind].backward.name
    with caplog.at_level(logging.WARNING, logger="cggr"):
        decisions = [compact_decision(b) for b in _blocks(model)]
    assert [_name(found) for found, _ in decisions] == [family] * len(decisions)
    for block in _blocks(model):
        verdict = V.verify(block, *_structural_family(block))
        # fp32 rounding: ~1e-6 measured, up to 1.5e-5 for a q/k norm's weight gradient (a sum of cancelling terms)
        assert verdict.ok and verdict.max_diff < 3e-5, verdict.reason
    assert "checked against" in decisions[0][1]
    assert not [r for r in caplog.records if "generic routed backward" in r.getMessage()]


def test_each_compacted_backward_recognises_its_own_families_only():
    """Structure picks one backward per layer: each family's blocks match the backward its record names first
    (the others' structural tests refuse them), and blocks of families without one match none of the new ones."""
    for kind, family in FAMILIES.items():
        if family.moe:
            continue
        block = _blocks(_model(kind, layers=1))[0]
        found = [b.name for b in compacted_backwards() if not isinstance(b.spec(block), str)]
        if family.backward is not None:
            assert found == [family.backward.name], kind
        else:  # Llama's modules with other maths (Granite, SmolLM3, Ernie): for the attach-time check to refuse
            assert found in ([], ["llama"]), (kind, found)


class ScaledMlpLlamaLayer(tf.models.llama.modeling_llama.LlamaDecoderLayer):
    """A Llama layer whose MLP branch is 1 % stronger: every module a Llama layer has, not its forward."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                          attention_mask=attention_mask, position_embeddings=position_embeddings,
                                          **kwargs)
        hidden_states = residual + hidden_states
        return hidden_states + 1.01 * self.mlp(self.post_attention_layernorm(hidden_states))


class IndexedLlamaLayer(ScaledMlpLlamaLayer):
    """A Llama layer whose forward reads its layer index: nothing in its attributes tells its layers apart."""

    def forward(self, hidden_states, *args, **kwargs):
        if self.self_attn.layer_idx == 0:
            return tf.models.llama.modeling_llama.LlamaDecoderLayer.forward(self, hidden_states, *args, **kwargs)
        return super().forward(hidden_states, *args, **kwargs)


def _lookalike(kind):
    """A model whose (some) decoder layers pass the Llama family's structural test but compute something else;
    the indices of those layers."""
    if kind == "granite":  # residual and attention multipliers (the defaults, 1.0, are Llama's maths)
        return _model("granite", residual_multiplier=0.7, attention_multiplier=0.3), [0, 1, 2, 3]
    if kind == "smollm3":  # no rotary on every 2nd layer
        return _model("smollm3", no_rope_layer_interval=2), [1, 3]
    if kind == "ernie4_5":  # rotary on interleaved pairs
        return _model("ernie4_5"), [0, 1, 2, 3]
    model = _model("llama")
    layers = (1, 2) if kind == "subclass" else (0, 1, 2, 3)
    for i in layers:
        layer = (ScaledMlpLlamaLayer if kind == "subclass" else IndexedLlamaLayer)(model.config, i)
        layer.load_state_dict(model.model.layers[i].state_dict())
        model.model.layers[i] = layer
    return model, [1, 2] if kind == "subclass" else [1, 2, 3]  # the indexed one: its layer 0 is Llama's


@pytest.mark.parametrize("kind", ["granite", "smollm3", "ernie4_5", "subclass", "by_layer_index"])
def test_check_rejects_lookalike_blocks_with_one_warning(kind, caplog):
    model, wrong = _lookalike(kind)
    blocks = _blocks(model)
    assert all(_structural_family(b) is not None for b in blocks)  # the structure alone lets them all in
    with caplog.at_level(logging.WARNING, logger="cggr"):
        decisions = [compact_decision(b) for b in blocks]
    assert [i for i, (found, _) in enumerate(decisions) if found is None] == wrong
    warnings = [r.getMessage() for r in caplog.records if "generic routed backward" in r.getMessage()]
    assert len(warnings) == 1, warnings  # one per kind of block
    name = type(blocks[wrong[0]]).__name__
    assert name in warnings[0] and "llama" in warnings[0] and "differs from it by" in warnings[0]
    assert decisions[wrong[0]][1] in warnings[0]
    assert V.verify(blocks[wrong[0]], *_structural_family(blocks[wrong[0]])).max_diff > 10 * V.TOLERANCE


def test_layers_that_differ_in_attributes_are_checked_each():
    """GPT-2 scaling attention by the inverse layer index: each layer's scale is its own (spec and check)."""
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=61, resid_pdrop=0.0,
                                             attn_pdrop=0.0, embd_pdrop=0.0, scale_attn_by_inverse_layer_idx=True))
    decisions = [compact_decision(b) for b in model.transformer.h]
    assert all(found is not None for found, _ in decisions), decisions
    assert len({found[1].scaling for found, _ in decisions}) == 3


def test_rejected_blocks_train_exactly_through_the_router():
    """The probe's case: Granite with non-default multipliers took the compacted backward and trained wrong.
    Now its blocks take the generic one, and the gradients are the reference's."""
    model = _model("granite", residual_multiplier=0.7, attention_multiplier=0.3)
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0)
    assert router.compact_blocks == [None] * 4
    ids = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    depth = router.routing.depth
    assert depth.min() < 4 and not router.routing.compact_blocks
    with cggr.reference_routing(list(ref.model.layers), **routed_as(router)):
        ref(input_ids=ids, labels=ids).loss.backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5 if q.grad.norm() > 0 else p.grad.norm() == 0, n


def test_gpt2_with_dropout_is_checked_in_eval_mode():
    """Dropout on: the family refuses training calls (the forward is random), so the check runs in eval mode,
    the only mode in which such a block takes the compacted path."""
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=61)).train()
    found, reason = compact_decision(model.transformer.h[0])
    assert _name(found) == "gpt2", reason


def test_check_leaves_the_users_state_alone():
    model = _model("llama")
    model.gradient_checkpointing_enable()
    model.eval()
    block = model.model.layers[0]
    for p in block.parameters():
        p.grad = torch.full_like(p, 0.5)
    grads = [p.grad.clone() for p in block.parameters()]
    weights = [p.detach().clone() for p in block.parameters()]
    model.config._attn_implementation = "eager"
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    with torch.no_grad():  # attach may run anywhere; the check turns grad on for itself
        found, reason = compact_decision(block)
    assert found is not None, reason
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, g) for p, g in zip(block.parameters(), grads))
    assert all(torch.equal(p, w) for p, w in zip(block.parameters(), weights))
    assert not any(m.training for m in block.modules()) and block.gradient_checkpointing
    assert model.config._attn_implementation == "eager"


def test_check_leaves_the_blocks_own_hooks_out():
    """The block's own hooks run around either path alike; some must not run outside a training step (FSDP2's
    lazy initialisation would make the block its own root), so the check leaves them out and puts them back."""
    block = _model("llama").model.layers[0]

    def hook(module, args):
        raise AssertionError("the check ran the block's own hook")

    handle = block.register_forward_pre_hook(hook)
    found, reason = compact_decision(block)
    assert found is not None, reason
    with pytest.raises(AssertionError, match="own hook"):
        block(torch.zeros(1, 2, 32))
    handle.remove()


def test_check_needs_no_weights():
    """Random weights stand in for the block's: a model built on the meta device is checked too."""
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**FAMILIES["llama"].tiny, num_hidden_layers=2))
    found, reason = compact_decision(model.model.layers[0])
    assert found is not None, reason


def test_calls_the_function_cannot_compute_take_the_plain_forward():
    """Inputs the check cannot see: a sliding window applied by the attention itself (flash attention gets no
    mask) on a sequence longer than the window, and partial rotary (cos/sin narrower than a head)."""
    model = _model("mistral", sliding_window=5)  # the check's sequences (5) fit in it
    block = model.model.layers[0]
    found, reason = compact_decision(block)
    assert found is not None, reason
    forward = CompactedForward(_Source(), block, 0, found.backward, found.spec, block.forward)
    forward.source.routing = Routing.from_depth(torch.ones(2, 6, dtype=torch.long), num_layers=4)
    cos, sin = torch.ones(2, 6, 8), torch.zeros(2, 6, 8)
    assert not forward.takes_call(torch.randn(2, 6, 32), (), dict(position_embeddings=(cos, sin)))
    assert forward.takes_call(torch.randn(2, 5, 32), (), dict(position_embeddings=(cos[:, :5], sin[:, :5])))
    mask = torch.zeros(2, 1, 6, 6)  # a mask carries the window: HF builds it with the window in
    assert forward.takes_call(torch.randn(2, 6, 32), (), dict(position_embeddings=(cos, sin), attention_mask=mask))
    assert not forward.takes_call(torch.randn(2, 6, 32), (), dict(position_embeddings=(cos[..., :4], sin[..., :4]),
                                                                  attention_mask=mask))


QWEN3_SLIDING = dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("kind,config", [("gemma3_text", {}), ("qwen3", QWEN3_SLIDING)],
                         ids=["gemma3_text", "qwen3-sliding"])
def test_sliding_window_layers_train_exactly_with_the_masks_hf_builds(kind, config, attention):
    """Sliding-window layers (a window of 4 in sequences of 11) beside global ones: HF passes each layer the mask
    of its type (eager: a float mask always; SDPA: a boolean one where the window or the padding cuts, none
    where it can use its causal kernel). Every block takes the compacted backward, and the gradients are the
    reference's."""
    model = _model(kind, **config)
    model.config._attn_implementation = attention
    assert {"sliding_attention", "full_attention"} <= set(model.config.layer_types)
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0)
    ids = torch.randint(1, 61, (3, 11), generator=torch.Generator().manual_seed(5))
    padding = torch.ones_like(ids)
    padding[0, 9:] = 0
    labels = ids.masked_fill(padding == 0, -100)
    model(input_ids=ids, labels=labels, attention_mask=padding).loss.backward()
    assert router.routing.compact_blocks == set(range(4)) and router.routing.depth.min() < 4
    with cggr.reference_routing(_blocks(ref), **routed_as(router)):
        ref(input_ids=ids, labels=labels, attention_mask=padding).loss.backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5 if q.grad.norm() > 0 else p.grad.norm() == 0, n


def test_a_sliding_window_without_a_mask_takes_the_layers_own_forward():
    """No mask (flash attention applies the window itself): a sliding-window layer's call on a sequence longer
    than its window takes the plain forward; a global layer's, or a sequence within the window, the compacted
    path."""
    model = _model("gemma3_text")
    sliding, full = _blocks(model)[:2]
    assert sliding.self_attn.sliding_window == 4 and full.self_attn.sliding_window is None
    cos, sin = torch.ones(2, 6, 8), torch.zeros(2, 6, 8)
    for block, window_cuts in ((sliding, True), (full, False)):
        found, reason = compact_decision(block)
        forward = CompactedForward(_Source(), block, 0, found.backward, found.spec, block.forward)
        forward.source.routing = Routing.from_depth(torch.ones(2, 6, dtype=torch.long), num_layers=4)
        x = torch.randn(2, 6, 32)
        assert forward.takes_call(x, (), dict(position_embeddings=(cos, sin))) is not window_cuts
        assert forward.takes_call(x[:, :4], (), dict(position_embeddings=(cos[:, :4], sin[:, :4])))


def test_partial_rotary_calls_take_the_generic_backward():
    """Phi-3 with ``partial_rotary_factor`` < 1 (Phi-4-mini's) rotates part of each head: its blocks pass the
    check (whose cos/sin span the head), but the model's cos/sin are narrower than a head, so every training call
    takes the layer's own forward and the generic backward; the gradients are the reference's."""
    model = _model("phi3", partial_rotary_factor=0.5)
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0)
    assert router.compact_blocks == ["phi3"] * 4
    ids = torch.randint(1, 61, (3, 9), generator=torch.Generator().manual_seed(4))
    model(input_ids=ids, labels=ids).loss.backward()
    assert router.routing.compact_blocks == set() and router.routing.depth.min() < 4
    with cggr.reference_routing(_blocks(ref), **routed_as(router)):
        ref(input_ids=ids, labels=ids).loss.backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5 if q.grad.norm() > 0 else p.grad.norm() == 0, n


def test_decision_reasons():
    found, reason = compact_decision(torch.nn.Linear(4, 4))
    assert found is None and reason.startswith("Linear matches no compacted backward (llama: no self_attn and mlp")
    assert [part.split(":")[0] for part in reason.split("(", 1)[1].split("; ")] == BACKWARDS  # each one's reason
    moe = hf_model("mixtral", layers=1)
    found, reason = compact_decision(moe.model.layers[0])
    assert found is None and "mixture-of-experts" in reason


# ---------------------------------------------------------- one compacted block against the HF layer, reference
def _layer_types(kind):
    """The layer types of the registry's tiny config (sliding-window and global layers), one per layer."""
    family = FAMILIES[kind]
    config = getattr(tf, family.config)(**{**family.tiny, "num_hidden_layers": 2})
    return list(getattr(config, "layer_types", None) or ["full_attention"] * 2)


# (kind, layer index): a layer of each type of each compacted family (Gemma 3: a sliding-window one, a global one)
LAYERS = [(kind, i) for kind in COMPACTED_KINDS for i, t in enumerate(_layer_types(kind)) if t not in
          _layer_types(kind)[:i]]


def _odd_sizes(kind):
    """Odd sizes: hidden 40, 5 heads of 8, one key/value head, MLP 72, with biases where the family has them
    (GPT-2: hidden 36, 3 heads of 12)."""
    if FAMILIES[kind].backward.name == "gpt2":
        return dict(hidden_size=36, num_attention_heads=3)
    sizes = dict(hidden_size=40, intermediate_size=72, num_attention_heads=5, num_key_value_heads=1, head_dim=8)
    if "attention_bias" in vars(getattr(tf, FAMILIES[kind].config)()):
        sizes["attention_bias"] = True
    return sizes


class _Captured(Exception):
    pass


def _call_of(model, index, ids, attention_mask) -> dict:
    """The arguments (by name) the HF model passes its block ``index``: the mask of the layer's type, with the
    padding and, for a sliding-window layer, the window in it; the rotary tables of the layer's type."""
    block = _blocks(model)[index]
    seen = {}

    def hook(module, args, kwargs):
        names = list(inspect.signature(type(module).forward).parameters)[1:]
        seen.update(dict(zip(names, args)), **kwargs)
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    seen.pop("hidden_states")
    return seen


def _layer_and_kwargs(kind, seed, dtype, batch, seq, index=0, attention="eager"):
    """Layer ``index`` of a tiny ``kind`` model (odd sizes, weights away from HF's init), an fp32 copy, an input,
    and the call HF makes (``attention``'s masks: eager's 4-D float mask always; SDPA's None where it can use its
    causal kernel) with the last sequence right-padded; the call's float tensors also in ``dtype``."""
    model = _model(kind, seed=seed, layers=index + 1, **_odd_sizes(kind))
    model.config._attn_implementation = attention
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 61, (batch, seq), generator=g)
    padding = torch.ones_like(ids)
    padding[-1, seq - 2:] = 0
    kwargs = _call_of(model, index, ids, padding)
    layer = _blocks(model)[index]
    for name, p in layer.named_parameters():  # away from HF's tiny init, so that every part shows
        p.data.normal_(1.0 if p.dim() == 1 and "bias" not in name else 0.0, 0.2, generator=g)
    layer.train()
    ref = copy.deepcopy(layer)
    layer.to(dtype)
    x = torch.randn(batch, seq, FAMILIES[kind].backward.spec(layer).hidden_size, generator=g)
    kwargs_dt = {k: tuple(t.to(dtype) for t in v) if isinstance(v, tuple) else
                 (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                 for k, v in kwargs.items()}
    return layer, ref, x, kwargs, kwargs_dt


def _compacted(layer, block_index=0, source=None):
    found = _structural_family(layer)
    return CompactedForward(source, layer, block_index, found[0], found[1], layer.forward)


def _grads(fn, x, params, gy):
    xx = x.detach().clone().requires_grad_()
    y = fn(xx)
    y = y[0] if isinstance(y, tuple) else y
    return [y.detach(), *torch.autograd.grad(y, [xx, *params], gy.to(y.dtype), allow_unused=True)]


# bf16: the compacted block rounds where the HF layer rounds, but not identically (fused pieces, another
# order of sums; SDPA where HF's eager attention runs its own matmuls and softmax), so its error against an fp32
# reference is compared with the HF bf16 layer's own error: summed over the block's tensors within BF16_MEAN of it
# (ratios 0.6 to 1.34 measured over 13 seeds per family, Gemma 3's widest), each tensor within BF16_EACH of it (a
# small tensor, a bias or a q/k norm's weight of 8 entries, is at the mercy of a few roundings: up to 2.4 x).
BF16_MEAN, BF16_EACH = 1.5, 3.0


@pytest.mark.parametrize("checkpointed", [False, True], ids=["saving", "checkpointed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,index", LAYERS, ids=[f"{k}-layer{i}" for k, i in LAYERS])
@pytest.mark.parametrize("seed", [11, 4242, 90210], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("active", ["some", "every"])
def test_compacted_block_equals_hf_layer_under_reference(seed, kind, index, dtype, checkpointed, active):
    """The layer's own call (HF's mask and rotary for its type, a padded sequence), stop and skip semantics.
    ``active="every"``: the block reads whole tensors (its indices are None: no gather, no scatter), with
    SDPA's masks (None where HF lets SDPA apply causality itself)."""
    batch, seq = 3, 7  # longer than Gemma 3's tiny sliding window (4)
    attention = "sdpa" if active == "every" else "eager"
    layer, ref, x, kwargs, kwargs_dt = _layer_and_kwargs(kind, seed, dtype, batch, seq, index, attention)
    g = torch.Generator().manual_seed(seed)
    depth = torch.randint(0, 2, (batch, seq), generator=g)
    depth[0, 0], depth[-1, -1], depth[1] = 0, 1, 0  # a whole sequence inactive too
    if active == "every":
        depth.fill_(1)
        assert Routing.from_depth(depth, 1).compact_indices(0) is None
    gy = torch.randn(batch, seq, x.shape[-1], generator=g)
    forward = _compacted(layer)
    for inactive in ("stop", "skip"):
        routing = Routing.from_depth(depth, 1, inactive=inactive)
        got = _grads(lambda xx: forward.run(routing, xx.to(dtype), (), kwargs_dt, checkpointed, 0), x,
                     list(layer.parameters()), gy)
        with cggr.reference_routing([ref], depth, inactive=inactive):
            want = _grads(lambda xx: ref(xx, **kwargs), x, list(ref.parameters()), gy)
        if dtype == torch.float32:
            errs = [rel_err(a, b) for a, b in zip(got, want)]
            assert max(errs) < 1e-5, (inactive, errs)
        else:
            with cggr.reference_routing([layer], depth, inactive=inactive):
                hf = _grads(lambda xx: layer(xx.to(dtype), **kwargs_dt), x, list(layer.parameters()), gy)
            ours = [rel_err(a.float(), b) for a, b in zip(got, want)]
            theirs = [rel_err(h.float(), b) for h, b in zip(hf, want)]
            assert sum(ours) <= BF16_MEAN * sum(theirs), (inactive, ours, theirs)
            assert all(a <= BF16_EACH * h + 1e-3 for a, h in zip(ours, theirs)), (inactive, ours, theirs)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_compiled_stages_take_the_named_weights_and_equal_the_reference(backward, monkeypatch):
    """On CUDA the forward's two stages and the backward's two run under torch.compile (``pointwise.kernel``),
    their weights a named tuple. Here dynamo traces them on the CPU (``aot_eager``), saving and checkpointed, for
    three row counts: the gradients are the reference's, and each stage compiles once for every row count (the
    first backward stage once for saved rows and once for recomputed ones)."""
    import torch._dynamo.testing

    from cggr.compact import pointwise

    counters = {}

    def compiled(fn, dynamic):
        if fn not in counters:
            counters[fn] = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        return torch.compile(fn, backend=counters[fn], dynamic=dynamic)

    monkeypatch.setattr(pointwise, "_compiled", compiled)
    module = gpt2 if backward == "gpt2" else decoder
    monkeypatch.setattr(module, "kernel", lambda eager, on_cuda, rows=None: pointwise.kernel(eager, True, rows))
    torch._dynamo.reset()
    layer, ref, x, kwargs, _ = _layer_and_kwargs(compacted_kind(backward), 0, torch.float32, 3, 7)
    forward = _compacted(layer)
    for checkpointed in (False, True):
        for seed in range(3):
            depth = torch.randint(0, 2, (3, 7), generator=torch.Generator().manual_seed(seed))
            gy = torch.randn(3, 7, x.shape[-1], generator=torch.Generator().manual_seed(seed))
            routing = Routing.from_depth(depth, 1)
            got = _grads(lambda xx: forward.run(routing, xx, (), kwargs, checkpointed, 0), x,
                         list(layer.parameters()), gy)
            with cggr.reference_routing([ref], depth):
                want = _grads(lambda xx: ref(xx, **kwargs), x, list(ref.parameters()), gy)
            assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-5, (checkpointed, seed)
    frames = {fn.__name__: c.frame_count for fn, c in counters.items()}
    assert frames == {"_qkv": 1, "_post_attention": 1, "mlp_backward_rows": 2, "qkv_backward_rows": 1}, frames


# ------------------------------------------------------------------------------------------ double backward
@pytest.mark.parametrize("checkpointed", [False, True], ids=["saving", "checkpointed"])
@pytest.mark.parametrize("backward", BACKWARDS)
def test_double_backward_is_refused(backward, checkpointed):
    layer, _, x, _, kwargs = _layer_and_kwargs(compacted_kind(backward), 0, torch.float32, 2, 5)
    forward = _compacted(layer)
    for depth in (torch.ones(2, 5, dtype=torch.long), torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 1]])):
        xx = x.clone().requires_grad_()
        y = _first(forward.run(Routing.from_depth(depth, 1), xx, (), kwargs, checkpointed, 0))
        with pytest.raises(RuntimeError, match="double backward through a compacted block is not supported; "
                                               "attach with backward='generic'"):
            torch.autograd.grad(y.pow(2).sum(), xx, create_graph=True)
        # A first-order backward through the same block still works.
        y = _first(forward.run(Routing.from_depth(depth, 1), xx, (), kwargs, checkpointed, 0))
        (gx,) = torch.autograd.grad(y.pow(2).sum(), xx)
        assert torch.isfinite(gx).all() and gx.abs().sum() > 0


def _first(y):
    return y[0] if isinstance(y, tuple) else y


# ------------------------------------------------------------- the attention's backward kept from the forward
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("seed", [7, 31337], ids=lambda s: f"seed{s}")
def test_saving_block_keeps_its_attention_backward_once_and_recomputes_after(seed, backward):
    """The saving Function keeps the attention's own backward from its forward (no recompute); the first backward
    takes it and frees it; a second backward through a retained graph recomputes and gets the same gradients."""
    layer, ref, x, kwargs, _ = _layer_and_kwargs(compacted_kind(backward), seed, torch.float32, 2, 6)
    forward = _compacted(layer)
    depth = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1]])
    gy = torch.randn(2, 6, x.shape[-1], generator=torch.Generator().manual_seed(seed))
    params = list(layer.parameters())
    xx = x.clone().requires_grad_()
    y = _first(forward.run(Routing.from_depth(depth, 1), xx, (), kwargs, False, 0))
    assert y.grad_fn.attention_grad is not None  # kept by the forward
    first = torch.autograd.grad(y, [xx, *params], gy, retain_graph=True, allow_unused=True)
    assert y.grad_fn.attention_grad is None  # taken by the first backward, its node freed with it
    second = torch.autograd.grad(y, [xx, *params], gy, allow_unused=True)  # recomputes the attention
    with cggr.reference_routing([ref], depth):
        want = _grads(lambda t: ref(t, **kwargs), x, list(ref.parameters()), gy)[1:]
    for a, b, w in zip(first, second, want):
        assert (a is None) == (b is None) == (w is None)
        if a is not None:
            assert rel_err(a, w) < 1e-5 and rel_err(b, w) < 1e-5
    # Nothing kept when no backward can follow.
    with torch.no_grad():
        y = _first(forward.run(Routing.from_depth(depth, 1), x, (), kwargs, False, 0))
    assert y.grad_fn is None


class LigerRMSNorm(tf.models.llama.modeling_llama.LlamaRMSNorm):
    """Stands in for Liger-Kernel's class of this name (its attributes, HF's maths): these tests need no Liger
    (tests/test_liger.py runs Liger's own)."""

    def __init__(self, hidden_size, eps, offset=0.0, casting_mode="llama"):
        super().__init__(hidden_size, eps)
        self.offset, self.casting_mode = offset, casting_mode


class LigerSwiGLUMLP(torch.nn.Module):
    """Stands in for Liger-Kernel's class of this name: no ``act_fn``, the activation named by the config."""

    def __init__(self, config, scale=1.0):
        super().__init__()
        self.config, self.scale = config, scale
        d, m = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = torch.nn.Linear(d, m, bias=False), torch.nn.Linear(d, m, bias=False)
        self.down_proj = torch.nn.Linear(m, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x) * self.scale)


def _liger_like(model, scale=1.0, offset=0.0):
    for block in _blocks(model):
        d, eps = model.config.hidden_size, block.input_layernorm.variance_epsilon
        block.input_layernorm = LigerRMSNorm(d, eps, offset=offset)
        block.post_attention_layernorm = LigerRMSNorm(d, eps)
        block.mlp = LigerSwiGLUMLP(model.config, scale)
    return model


def test_liger_patched_llama_blocks_take_the_compacted_path_when_the_check_passes():
    """Liger's RMSNorm (offset 0, "llama" casting) and SwiGLU MLP have no SiLU module to recognise: the structure
    admits them, and the attach-time check decides by what they compute."""
    decisions = [compact_decision(b) for b in _blocks(_liger_like(_model("llama")))]
    assert [_name(found) for found, _ in decisions] == ["llama"] * len(decisions), decisions
    V.clear_cache()
    wrong = [compact_decision(b)[0] for b in _blocks(_liger_like(_model("llama"), scale=1.01))]
    assert wrong == [None] * len(wrong)  # same structure, other maths: refused by the check
    gemma_like = _liger_like(_model("llama"), offset=1.0)  # Liger's Gemma norm: (1 + w), another norm
    assert _structural_family(_blocks(gemma_like)[0]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", [5, 2718], ids=lambda s: f"seed{s}")
def test_olmo2_with_liger_post_norms_and_hf_qk_norms_takes_the_compacted_path_each_norm_rounding_its_way(seed,
                                                                                                       dtype):
    """Liger's patch of an OLMo 2 instance replaces the post-norms (casting "llama": the product rounds in the
    input dtype) and leaves HF's q/k norms (the product in fp32): the spec reads each group's kind, and the
    routed block equals the reference in fp32 and, in bf16, is as close to the fp32 reference as the layer."""
    batch, seq = 3, 7
    layer, ref, x, kwargs, kwargs_dt = _layer_and_kwargs("olmo2", seed, dtype, batch, seq)
    for module in (layer, ref):
        for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
            hf = getattr(module, name)
            liger = LigerRMSNorm(hf.weight.shape[0], hf.variance_epsilon).to(hf.weight.dtype)
            liger.weight.data.copy_(hf.weight.data)
            setattr(module, name, liger)
    found, reason = compact_decision(ref)
    assert _name(found) == "olmo2", reason
    assert not found.spec.norm.weight_in_fp32 and found.spec.qk_norm_kind.weight_in_fp32
    g = torch.Generator().manual_seed(seed)
    depth = torch.randint(0, 2, (batch, seq), generator=g)
    depth[0, 0], depth[-1, -1] = 0, 1
    gy = torch.randn(batch, seq, x.shape[-1], generator=g)
    forward = _compacted(layer)
    assert forward.spec == found.spec
    routing = Routing.from_depth(depth, 1)
    got = _grads(lambda xx: forward.run(routing, xx.to(dtype), (), kwargs_dt, False, 0), x,
                 list(layer.parameters()), gy)
    with cggr.reference_routing([ref], depth):
        want = _grads(lambda xx: ref(xx, **kwargs), x, list(ref.parameters()), gy)
    ours = [rel_err(a.float(), b) for a, b in zip(got, want)]
    if dtype == torch.float32:
        assert max(ours) < 1e-5, ours
        return
    # The q/k norms' rounding, which the tolerances below cannot tell: HF's q norm, bit for bit, with the spec's
    # q/k kind and not with the block norms' kind.
    q_norm = layer.self_attn.q_norm
    q_raw = torch.randn(batch * seq, q_norm.weight.shape[0], generator=g).to(dtype)
    assert torch.equal(rms_norm(q_raw, q_norm.weight, found.spec.q_norm_eps, found.spec.qk_norm_kind)[0],
                       q_norm(q_raw))
    assert not torch.equal(rms_norm(q_raw, q_norm.weight, found.spec.q_norm_eps, found.spec.norm)[0], q_norm(q_raw))
    with cggr.reference_routing([layer], depth):
        hf = _grads(lambda xx: layer(xx.to(dtype), **kwargs_dt), x, list(layer.parameters()), gy)
    theirs = [rel_err(h.float(), b) for h, b in zip(hf, want)]
    assert sum(ours) <= BF16_MEAN * sum(theirs), (ours, theirs)
    assert all(a <= BF16_EACH * h + 1e-3 for a, h in zip(ours, theirs)), (ours, theirs)


def _rope_reading(half_of: str):
    """HF's ``apply_rotary_pos_emb`` with cos/sin's ``half_of`` half read and repeated: "first" is what
    Liger-Kernel's RoPE kernel computes (it assumes HF's tables, ``cat(freqs, freqs)``), "second" no known one."""
    def rope(q, k, cos, sin, *args, **kwargs):
        h = cos.shape[-1] // 2
        part = slice(None, h) if half_of == "first" else slice(h, None)
        cos, sin = torch.cat((cos[..., part],) * 2, -1).unsqueeze(1), torch.cat((sin[..., part],) * 2, -1).unsqueeze(1)
        rot = tf.models.llama.modeling_llama.rotate_half
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin
    return rope


def test_a_rope_reading_the_first_half_of_cos_sin_takes_the_compacted_path_that_reads_it_so(monkeypatch, caplog):
    """Liger's RoPE (patched into HF's module) reads the first half of cos/sin only: it equals HF's rotary on HF's
    tables but not on the check's unstructured ones. The check then tries the variant that reads them so, and the
    router trains exactly (the reference runs the same patched model)."""
    plain = [compact_decision(b)[0] for b in _blocks(_model("llama"))]
    assert all(found.spec.rotary_first_half is False for found in plain)
    V.clear_cache()
    monkeypatch.setattr(tf.models.llama.modeling_llama, "apply_rotary_pos_emb", _rope_reading("first"))
    model = _liger_like(_model("llama"))
    with caplog.at_level(logging.WARNING, logger="cggr"):
        decisions = [compact_decision(b) for b in _blocks(model)]
    assert [found.spec.rotary_first_half for found, _ in decisions] == [True] * 4, decisions
    assert "Liger-Kernel's RoPE" in decisions[0][1] and not caplog.records  # no warning: the variant passed

    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0)
    assert router.compact_blocks == ["llama"] * 4
    ids = torch.randint(1, 61, (3, 9), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    assert router.routing.compact_blocks == {0, 1, 2, 3} and router.routing.depth.min() < 4
    with cggr.reference_routing(list(ref.model.layers), **routed_as(router)):
        ref(input_ids=ids, labels=ids).loss.backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5 if q.grad.norm() > 0 else p.grad.norm() == 0, n


@pytest.mark.parametrize("patched_first", [False, True], ids=["plain-first", "patched-first"])
def test_a_cached_verdict_does_not_keep_the_next_model_off_its_variant(monkeypatch, patched_first):
    """Verdicts are cached per kind of block. A model whose rotary was patched since (Liger patches HF's module)
    fails the cached spec's re-check; the full check then finds the variant it reads, in either order."""
    llama = tf.models.llama.modeling_llama
    plain_rope = llama.apply_rotary_pos_emb
    order = [_rope_reading("first"), plain_rope] if patched_first else [plain_rope, _rope_reading("first")]
    for rope in order:
        monkeypatch.setattr(llama, "apply_rotary_pos_emb", rope)
        found = [compact_decision(b)[0] for b in _blocks(_model("llama"))]
        assert [f.spec.rotary_first_half if f else None for f in found] == [rope is not plain_rope] * 4


@pytest.mark.parametrize("backward", BACKWARDS)
def test_the_check_covers_skip_semantics(monkeypatch, backward):
    """A compacted backward whose skip path were wrong (here: inactive rows' input gradient left zero, as under
    stop) is refused at attach, the reason naming the skip case."""
    from cggr.compact import pointwise

    stop_only = lambda rows, idx, num_rows, base=None: pointwise.scatter_rows(rows, idx, num_rows)  # noqa: E731
    monkeypatch.setattr(gpt2 if backward == "gpt2" else decoder, "scatter_rows", stop_only)
    found, reason = compact_decision(_blocks(_model(compacted_kind(backward)))[0])
    assert found is None and "some rows inactive (skip)" in reason, reason


@pytest.mark.parametrize("backward", [b for b in BACKWARDS if b != "gpt2"])
def test_the_check_covers_a_key_norms_weight_gradient_from_inactive_keys(monkeypatch, backward):
    """Inactive keys are constants before a key norm, not after it: the norm's weight gets gradient from every key
    an active query attends to. A backward that summed it over the active rows only (here) is refused at attach
    in the families with a key norm; the others have nothing to get wrong."""
    real = decoder._qk_norm_backward
    monkeypatch.setattr(decoder, "_qk_norm_backward", lambda *args, d_every=None: real(*args))
    block = _blocks(_model(compacted_kind(backward)))[0]
    found, reason = compact_decision(block)
    if _structural_family(block)[1].qk_norm is None:
        assert found is not None, reason
    else:
        assert found is None and "gradient of self_attn.k_norm.weight (some rows inactive" in reason, reason


def test_a_rope_no_variant_reads_is_refused(monkeypatch):
    monkeypatch.setattr(tf.models.llama.modeling_llama, "apply_rotary_pos_emb", _rope_reading("second"))
    model = _model("llama")
    assert [compact_decision(b)[0] for b in _blocks(model)] == [None] * 4
    reason = compact_decision(_blocks(model)[0])[1]
    assert "differs from it by" in reason


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Liger's kernel on CPU tensors: the interpreter")
def test_liger_rope_under_the_interpreter_takes_the_first_half_variant(monkeypatch):
    """Liger-Kernel's own RoPE kernel (a ``test`` extra; tests/test_liger.py runs all its patches), through Triton's
    interpreter on the CPU: the block is admitted with the variant, and the Function equals the block."""
    rope = pytest.importorskip("liger_kernel.transformers.rope")
    monkeypatch.setattr(tf.models.llama.modeling_llama, "apply_rotary_pos_emb", rope.liger_rotary_pos_emb)
    found, reason = compact_decision(_blocks(_model("llama"))[0])
    assert found is not None and found.spec.rotary_first_half, reason


# ---------------------------------------------------------------------------- copying the compacted forward
class _Source:
    """Stands in for the router: hands out the routing of the running forward."""

    def __init__(self):
        self.routing = None

    def current_routing(self):
        return self.routing


@pytest.mark.parametrize("backward", BACKWARDS)
def test_compacted_forward_follows_deepcopy_and_pickle(backward):
    layer, _, x, _, kwargs = _layer_and_kwargs(compacted_kind(backward), 1, torch.float32, 2, 5)
    source = _Source()
    layer.forward = _compacted(layer, 3, source)
    plain = _first(layer(x, **kwargs))
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        f = copied.__dict__["forward"]
        assert isinstance(f, CompactedForward) and f.block is copied and f.plain_forward.__self__ is copied
        assert f.block_index == 3
        assert torch.equal(_first(copied(x, **kwargs)), plain)  # no routing: the plain forward
        with torch.no_grad():
            next(copied.parameters()).add_(1.0)  # the copy's weights are its own
        assert not torch.equal(_first(copied(x, **kwargs)), plain)
    copied = copy.deepcopy(layer)
    # copied with the block (deepcopy's memo): a copied model is routed by its copied router, never the original
    assert copied.forward.source is not source and isinstance(copied.forward.source, _Source)
    copied.forward.source.routing = Routing.from_depth(torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]), num_layers=4)
    assert copied.forward.takes_call(x, (), kwargs)
    y = copied(x.requires_grad_(), **kwargs)
    assert copied.forward.source.routing.compact_blocks == {3} and source.routing is None
    assert torch.allclose(_first(y), plain, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_check_runs_on_the_blocks_gpu_without_tf32_or_compiling():
    """A block on a GPU is checked there (a 1B-size block in well under a second), in full fp32 whatever the
    user's TF32 setting, which is put back; nothing is compiled for the check's shapes."""
    import time

    config = tf.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=32,
                            num_key_value_heads=4, vocab_size=64)
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(config).to(torch.bfloat16)
    precision = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()  # graphs compiled by earlier tests in this process are not the check's
        start = time.perf_counter()
        decisions = [compact_decision(b) for b in model.model.layers]
        seconds = time.perf_counter() - start
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = precision
    assert all(found is not None for found, _ in decisions), decisions
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"check of 2 blocks of 44M parameters on {torch.cuda.get_device_name()}: {seconds:.2f} s")


@pytest.mark.parametrize("change,named", [
    ("extra_parameter", "parameters the layout does not read: extra"),
    ("activation", "the MLP's gate activation is not one the layouts know, not silu"),
    ("norm", "post_attention_layernorm: not an RMSNorm of the layout's kind (LayerNorm)"),
    ("projection", "o_proj missing or not nn.Linear")])
def test_a_block_that_matches_no_compacted_backward_is_told_what_differs(change, named):
    """The router's report names the first difference from each candidate backward, not only that none matched
    (a patched layer that falls back is then found without reading the layouts)."""
    block = _blocks(_model("llama"))[0]
    if change == "extra_parameter":
        block.extra = torch.nn.Parameter(torch.zeros(3))
    elif change == "activation":
        block.mlp.act_fn = torch.nn.ReLU()
    elif change == "norm":
        block.post_attention_layernorm = torch.nn.LayerNorm(block.post_attention_layernorm.weight.shape[0], bias=False)
    else:
        block.self_attn.o_proj = torch.nn.Identity()
    found, reason = compact_decision(block)
    assert found is None and "LlamaDecoderLayer matches no compacted backward (" in reason, reason
    assert f"llama: {named}" in reason, reason
    assert all(f"{b.name}: " in reason for b in compacted_backwards()), reason
