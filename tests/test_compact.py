"""cggr.compact: the attach-time check that a compacted backward equals the block, the Functions against the
HF layers under the reference routing, double backward refused, and the compacted forward copied and pickled."""

import copy
import logging
import os
import pickle

import pytest
import torch
import transformers as tf

import cggr
from cggr.compact import CompactedForward, _structural_family, compact_decision, compact_family
from cggr.compact import verify as V
from cggr.routing import Routing
from tests.tiny import hf_model, rel_err, routed_as

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=61, max_position_embeddings=64, pad_token_id=0)


@pytest.fixture(autouse=True)
def _fresh_verdicts():
    V.clear_cache()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small run several times faster on one thread on a busy CI host
    yield
    torch.set_num_threads(threads)
    V.clear_cache()


def _model(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if kind == "gpt2":
        return hf_model("gpt2", seed=seed)
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "granite": (tf.GraniteConfig, tf.GraniteForCausalLM),
        "smollm3": (tf.SmolLM3Config, tf.SmolLM3ForCausalLM), "ernie4_5": (tf.Ernie4_5Config, tf.Ernie4_5ForCausalLM),
    }[kind]
    model = model_cls(config_cls(**{**TINY, **overrides}))
    model.config._attn_implementation = "eager"
    return model.float().train()


def _blocks(model):
    return list(model.transformer.h) if hasattr(model, "transformer") else list(model.model.layers)


# ---------------------------------------------------------------------------------------- the attach-time check
@pytest.mark.parametrize("kind,family", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "llama"),
                                         ("gpt2", "gpt2")])
def test_check_passes_for_the_families_it_was_written_for(kind, family, caplog):
    model = _model(kind)
    with caplog.at_level(logging.WARNING, logger="cggr"):
        decisions = [compact_decision(b) for b in _blocks(model)]
    assert [d[0][0] if d[0] else None for d in decisions] == [family] * len(decisions)
    for block in _blocks(model):
        verdict = V.verify(block, *_structural_family(block))
        assert verdict.ok and verdict.max_diff < 1e-5, verdict.reason  # fp32 rounding, ~1e-6 measured
    assert "checked against" in decisions[0][1]
    assert not [r for r in caplog.records if "generic routed backward" in r.getMessage()]


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
    assert V.verify(blocks[wrong[0]], "llama", _structural_family(blocks[wrong[0]])[1]).max_diff > 10 * V.TOLERANCE


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
    assert found is not None and found[0] == "gpt2", reason


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
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY))
    found, reason = compact_decision(model.model.layers[0])
    assert found is not None, reason


def test_calls_the_function_cannot_compute_take_the_plain_forward():
    """Inputs the check cannot see: a sliding window applied by the attention itself (flash attention gets no
    mask) on a sequence longer than the window, and partial rotary (cos/sin narrower than a head)."""
    model = _model("mistral", sliding_window=5)  # the check's sequences (5) fit in it
    block = model.model.layers[0]
    found, reason = compact_decision(block)
    assert found is not None, reason
    forward = CompactedForward(_Source(), block, 0, *found, block.forward)
    forward.source.routing = Routing.from_depth(torch.ones(2, 6, dtype=torch.long), num_layers=4)
    cos, sin = torch.ones(2, 6, 8), torch.zeros(2, 6, 8)
    assert not forward.takes_call(torch.randn(2, 6, 32), (), dict(position_embeddings=(cos, sin)))
    assert forward.takes_call(torch.randn(2, 5, 32), (), dict(position_embeddings=(cos[:, :5], sin[:, :5])))
    mask = torch.zeros(2, 1, 6, 6)  # a mask carries the window: HF builds it with the window in
    assert forward.takes_call(torch.randn(2, 6, 32), (), dict(position_embeddings=(cos, sin), attention_mask=mask))
    assert not forward.takes_call(torch.randn(2, 6, 32), (), dict(position_embeddings=(cos[..., :4], sin[..., :4]),
                                                                  attention_mask=mask))


def test_decision_reasons():
    assert compact_decision(torch.nn.Linear(4, 4)) == (None, "Linear matches no compacted family (llama, gpt2)")
    moe = hf_model("mixtral", layers=1)
    assert "mixture-of-experts" in compact_decision(moe.model.layers[0])[1]
    assert compact_family(moe.model.layers[0]) is None


# ---------------------------------------------------------- one compacted block against the HF layer, reference
def _layer_and_kwargs(family, seed, dtype, batch, seq):
    torch.manual_seed(seed)
    if family == "llama":  # odd sizes: hidden 40, 5 heads of 8, one key/value head, MLP 72
        config = tf.LlamaConfig(hidden_size=40, intermediate_size=72, num_hidden_layers=1, num_attention_heads=5,
                                num_key_value_heads=1, head_dim=8, vocab_size=61, attention_bias=True)
        config._attn_implementation = "eager"
        layer = tf.models.llama.modeling_llama.LlamaDecoderLayer(config, 0)
        rotary = tf.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
        x = torch.randn(batch, seq, 40)
        cos, sin = rotary(x, torch.arange(seq).expand(batch, seq))
        mask = torch.zeros(batch, 1, seq, seq).masked_fill(
            ~torch.ones(seq, seq, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
        kwargs = dict(attention_mask=mask, position_embeddings=(cos, sin))
    else:  # hidden 36, 3 heads of 12
        config = tf.GPT2Config(n_embd=36, n_layer=1, n_head=3, vocab_size=61, resid_pdrop=0.0, attn_pdrop=0.0)
        config._attn_implementation = "sdpa"
        layer = tf.models.gpt2.modeling_gpt2.GPT2Block(config, 0)
        x = torch.randn(batch, seq, 36)
        kwargs = dict(attention_mask=None)
    for name, p in layer.named_parameters():  # away from HF's tiny init, so that every part shows
        p.data.normal_(1.0 if p.dim() == 1 and "bias" not in name else 0.0, 0.2)
    layer.train()
    ref = copy.deepcopy(layer)
    layer.to(dtype)
    kwargs_dt = {k: tuple(t.to(dtype) for t in v) if isinstance(v, tuple) else
                 (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return layer, ref, x, kwargs, kwargs_dt


def _grads(fn, x, params, gy):
    xx = x.detach().clone().requires_grad_()
    y = fn(xx)
    y = y[0] if isinstance(y, tuple) else y
    return [y.detach(), *torch.autograd.grad(y, [xx, *params], gy.to(y.dtype), allow_unused=True)]


# bf16: the compacted block rounds where the HF layer rounds, but not identically (fused pieces, another
# order of sums), so its error against an fp32 reference is compared with the HF bf16 layer's own error.
BF16_FACTOR = 2.0


@pytest.mark.parametrize("checkpointed", [False, True], ids=["saving", "checkpointed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("seed", [11, 4242, 90210], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("active", ["some", "every"])
def test_compacted_block_equals_hf_layer_under_reference(seed, family, dtype, checkpointed, active):
    """``active="every"``: the block reads whole tensors (its indices are None: no gather, no scatter)."""
    batch, seq = 3, 7
    layer, ref, x, kwargs, kwargs_dt = _layer_and_kwargs(family, seed, dtype, batch, seq)
    g = torch.Generator().manual_seed(seed)
    depth = torch.randint(0, 2, (batch, seq), generator=g)
    depth[0, 0], depth[-1, -1], depth[1] = 0, 1, 0  # a whole sequence inactive too
    if active == "every":
        depth.fill_(1)
        assert Routing.from_depth(depth, 1).compact_indices(0) is None
    gy = torch.randn(batch, seq, x.shape[-1], generator=g)
    spec = _structural_family(layer)[1]
    forward = CompactedForward(None, layer, 0, family, spec, layer.forward)
    got = _grads(lambda xx: forward.run(Routing.from_depth(depth, 1), xx.to(dtype), (), kwargs_dt, checkpointed, 0),
                 x, list(layer.parameters()), gy)
    with cggr.reference_routing([ref], depth):
        want = _grads(lambda xx: ref(xx, **kwargs), x, list(ref.parameters()), gy)
    if dtype == torch.float32:
        errs = [rel_err(a, b) for a, b in zip(got, want)]
        assert max(errs) < 2e-5, errs
    else:
        with cggr.reference_routing([layer], depth):
            hf = _grads(lambda xx: layer(xx.to(dtype), **kwargs_dt), x, list(layer.parameters()), gy)
        for a, h, b in zip(got, hf, want):
            assert rel_err(a.float(), b) <= BF16_FACTOR * rel_err(h.float(), b) + 1e-3


# ------------------------------------------------------------------------------------------ double backward
@pytest.mark.parametrize("checkpointed", [False, True], ids=["saving", "checkpointed"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_double_backward_is_refused(family, checkpointed):
    layer, _, x, _, kwargs = _layer_and_kwargs(family, 0, torch.float32, 2, 5)
    forward = CompactedForward(None, layer, 0, family, _structural_family(layer)[1], layer.forward)
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
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("seed", [7, 31337], ids=lambda s: f"seed{s}")
def test_saving_block_keeps_its_attention_backward_once_and_recomputes_after(seed, family):
    """The saving Function keeps the attention's own backward from its forward (no recompute); the first backward
    takes it and frees it; a second backward through a retained graph recomputes and gets the same gradients."""
    layer, ref, x, kwargs, _ = _layer_and_kwargs(family, seed, torch.float32, 2, 6)
    forward = CompactedForward(None, layer, 0, family, _structural_family(layer)[1], layer.forward)
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
            assert rel_err(a, w) < 2e-5 and rel_err(b, w) < 2e-5
    # Nothing kept when no backward can follow.
    with torch.no_grad():
        y = _first(forward.run(Routing.from_depth(depth, 1), x, (), kwargs, False, 0))
    assert y.grad_fn is None


class LigerRMSNorm(tf.models.llama.modeling_llama.LlamaRMSNorm):
    """Stands in for Liger-Kernel's class of this name (its attributes, HF's maths): Liger needs a GPU."""

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
    assert [d[0][0] if d[0] else None for d in decisions] == ["llama"] * len(decisions), decisions
    V.clear_cache()
    wrong = [compact_decision(b)[0] for b in _blocks(_liger_like(_model("llama"), scale=1.01))]
    assert wrong == [None] * len(wrong)  # same structure, other maths: refused by the check
    gemma_like = _liger_like(_model("llama"), offset=1.0)  # Liger's Gemma norm: (1 + w), another norm
    assert _structural_family(_blocks(gemma_like)[0]) is None


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
    assert all(found[1].rotary_first_half is False for found in plain)
    V.clear_cache()
    monkeypatch.setattr(tf.models.llama.modeling_llama, "apply_rotary_pos_emb", _rope_reading("first"))
    model = _liger_like(_model("llama"))
    with caplog.at_level(logging.WARNING, logger="cggr"):
        decisions = [compact_decision(b) for b in _blocks(model)]
    assert [found[1].rotary_first_half for found, _ in decisions] == [True] * 4, decisions
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
        assert [f[1].rotary_first_half if f else None for f in found] == [rope is not plain_rope] * 4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_check_covers_skip_semantics(monkeypatch, kind):
    """A compacted backward whose skip path were wrong (here: inactive rows' input gradient left zero, as under
    stop) is refused at attach, the reason naming the skip case."""
    from cggr.compact import gpt2, llama, pointwise

    stop_only = lambda rows, idx, num_rows, base=None: pointwise.scatter_rows(rows, idx, num_rows)  # noqa: E731
    monkeypatch.setattr(llama if kind == "llama" else gpt2, "scatter_rows", stop_only)
    found, reason = compact_decision(_blocks(_model(kind))[0])
    assert found is None and "some rows inactive (skip)" in reason, reason


def test_a_rope_no_variant_reads_is_refused(monkeypatch):
    monkeypatch.setattr(tf.models.llama.modeling_llama, "apply_rotary_pos_emb", _rope_reading("second"))
    model = _model("llama")
    assert [compact_decision(b)[0] for b in _blocks(model)] == [None] * 4
    reason = compact_decision(_blocks(model)[0])[1]
    assert "differs from it by" in reason


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Liger's kernel on CPU tensors: the interpreter")
def test_liger_rope_under_the_interpreter_takes_the_first_half_variant(monkeypatch):
    """Liger-Kernel's own RoPE kernel (where installed: a ``bench`` extra, not in CI), through Triton's
    interpreter on the CPU: the block is admitted with the variant, and the Function equals the block."""
    rope = pytest.importorskip("liger_kernel.transformers.rope")
    monkeypatch.setattr(tf.models.llama.modeling_llama, "apply_rotary_pos_emb", rope.liger_rotary_pos_emb)
    found, reason = compact_decision(_blocks(_model("llama"))[0])
    assert found is not None and found[1].rotary_first_half, reason


# ---------------------------------------------------------------------------- copying the compacted forward
class _Source:
    """Stands in for the router: hands out the routing of the running forward."""

    def __init__(self):
        self.routing = None

    def current_routing(self):
        return self.routing


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compacted_forward_follows_deepcopy_and_pickle(family):
    layer, _, x, _, kwargs = _layer_and_kwargs(family, 1, torch.float32, 2, 5)
    source = _Source()
    layer.forward = CompactedForward(source, layer, 3, family, _structural_family(layer)[1], layer.forward)
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
