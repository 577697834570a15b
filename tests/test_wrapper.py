"""The public CGGRWrapper: same outputs as the wrapped model, curriculum state, metrics."""

import copy

import pytest
import torch

import cggr
from tests.tiny import TinyLM, flat_grads, hf_model, routed_as


class TupleLM(TinyLM):
    def forward(self, input_ids):
        logits = super().forward(input_ids)
        return logits, logits.mean()


def test_returns_exactly_what_the_model_returns():
    torch.manual_seed(0)
    ids = torch.randint(0, 61, (2, 6))
    m = TinyLM()
    plain = m(ids)
    w = cggr.CGGRWrapper(m, warmup_steps=0)
    out = w(ids)
    assert isinstance(out, torch.Tensor) and torch.equal(out, plain)
    t = cggr.CGGRWrapper(TupleLM(), warmup_steps=0)
    out = t(ids)
    assert isinstance(out, tuple) and len(out) == 2
    h = hf_model("llama")
    plain = copy.deepcopy(h)(input_ids=ids, labels=ids)
    out = cggr.CGGRWrapper(h, warmup_steps=0)(input_ids=ids, labels=ids)
    assert type(out).__name__ == "CausalLMOutputWithPast"
    torch.testing.assert_close(out.loss, plain.loss)
    torch.testing.assert_close(out.logits, plain.logits)


def test_routing_depth_and_attribute_passthrough():
    h = hf_model("gpt2")
    w = cggr.CGGRWrapper(h, warmup_steps=0)
    ids = torch.randint(0, 61, (3, 5))
    w(input_ids=ids, labels=ids)
    d = w.routing.depth
    assert d.dtype == torch.long and d.shape == (3, 5)
    assert w.config is h.config and callable(w.generate) and callable(w.save_pretrained)
    assert w.router.layer_path == "transformer.h" and w.router.num_layers == 4


def test_unwrap_returns_original_without_hooks():
    m = TinyLM()
    w = cggr.CGGRWrapper(m)
    assert w.unwrap() is m
    assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(not b._forward_hooks for b in m.blocks)


def test_state_dict_round_trip_restores_curriculum():
    w = cggr.CGGRWrapper(TinyLM(), warmup_steps=10)
    for _ in range(4):
        w.step()
    sd = w.state_dict()
    assert sd["router.step_count"].item() == 4
    w2 = cggr.CGGRWrapper(TinyLM(), warmup_steps=10)
    assert w2.router.progress == 0.0
    w2.load_state_dict(sd)
    assert w2.router.progress == pytest.approx(0.4) and w2.router.bucket_depths() == w.router.bucket_depths()
    r = cggr.attach(TinyLM(), warmup_steps=10)
    r.load_state_dict(w.router.state_dict())
    assert r.metrics()["step"] == 4


def test_optimizer_hook_advances_curriculum():
    w = cggr.CGGRWrapper(TinyLM(), warmup_steps=4)
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    handle = w.attach_optimizer(opt)
    ids = torch.randint(0, 61, (2, 6))
    for _ in range(2):
        w(ids).sum().backward()
        opt.step()
        opt.zero_grad()
    assert w.metrics()["step"] == 2 and w.metrics()["warmup_progress"] == 0.5
    handle.remove()
    opt.step()
    assert w.metrics()["step"] == 2


def test_curriculum_full_depth_at_step_zero():
    w = cggr.CGGRWrapper(TinyLM(layers=4), warmup_steps=100)
    ids = torch.randint(0, 61, (2, 8))
    w(ids)
    assert (w.routing.depth == 4).all()


@pytest.mark.parametrize("options", [{}, dict(inactive="stop")], ids=["default", "seed"])
def test_metrics_are_python_numbers(options):
    w = cggr.CGGRWrapper(hf_model("llama", layers=4), warmup_steps=0, **options)
    ids = torch.randint(0, 61, (4, 8))
    w(input_ids=ids, labels=ids).loss.backward()
    m = w.metrics()
    keys = {"step", "warmup_progress", "mean_depth_fraction", "backward_flops_skipped", "mean_entropy",
            "mean_confidence", "nonfinite_tokens", "valid_tokens"}
    assert keys <= set(m) and all(isinstance(v, float) for v in m.values())
    if options:  # nested depths (the seed's): the bucket sizes
        assert sum(m[f"bucket_{k}_fraction"] for k in range(4)) == pytest.approx(1.0)
    else:  # per-block placement (the default) has no buckets
        assert not any(k.startswith("bucket_") for k in m)
    # 28 valid tokens in 4 equal buckets at depths 4,3,2,1: mean depth 2.5 of 4 (per-block: the same work)
    assert m["valid_tokens"] == 28 and m["mean_depth_fraction"] == pytest.approx(0.625)
    assert 0 < m["backward_flops_skipped"] < 1 and 0 < m["mean_confidence"] < 1


def test_training_loop_with_wrapper_updates_only_routed_rows():
    """A smoke run: losses finite, the curriculum advances, grads equal a manual reference at each step."""
    torch.manual_seed(0)
    model = TinyLM()
    ref_model = copy.deepcopy(model)  # copy before attaching: a copy of a routed model shares its routing
    w = cggr.CGGRWrapper(model, warmup_steps=3)
    opt = torch.optim.AdamW(w.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-3)
    for step in range(4):
        ids = torch.randint(0, 61, (2, 9))
        loss = torch.nn.functional.cross_entropy(w(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        with cggr.reference_routing(list(ref_model.blocks), **routed_as(w.router)):
            ref_loss = torch.nn.functional.cross_entropy(ref_model(ids).flatten(0, 1), ids.flatten())
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss)
        g, gr = flat_grads(w.model), flat_grads(ref_model)
        for n in gr:
            torch.testing.assert_close(g[n], gr[n], rtol=1e-4, atol=1e-6)
        opt.step(), ref_opt.step(), opt.zero_grad(), ref_opt.zero_grad()
        w.step()


def test_config_by_keyword():
    config = cggr.RoutingConfig(num_buckets=2, warmup_steps=0)
    w = cggr.CGGRWrapper(TinyLM(), config=config, seed=2)
    assert w.router.config == config.replace(seed=2)
    assert cggr.CGGRWrapper(TinyLM(), config).router.config == config
