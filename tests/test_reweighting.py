"""Sampling options of per-block placement (estimator, importance, variance budget): the routed backward against
the reference of docs/design.md (hooks that detach and reweight rows), the estimator's unbiasedness by Monte
Carlo, and the variance budget's measurement."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cggr
from cggr.routing import Routing
from tests.tiny import TinyLM, flat_grads, hf_model, rel_err

SAMPLINGS = {
    "unbiased": dict(estimator="unbiased"),
    "loss": dict(estimator="unbiased", importance="loss"),
    "loss-priority": dict(estimator="unbiased", importance="loss", sampler="priority", importance_mix=0.5),
    "block": dict(estimator="unbiased", importance="block"),
    "block-priority": dict(estimator="unbiased", importance="block", sampler="priority"),
}


def _batch(vocab, seed, B=3, S=13):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # padding: never drawn
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _loss(out, labels):
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("kind,seed", [("llama", 4101), ("gpt2", 4102), ("mistral", 4103)])
def test_routed_gradients_equal_the_reweighting_reference(kind, seed, sampling):
    """Every block's kept rows and their weights ``1/pi`` as the routing drew them (in the backward, for
    importance="block"), applied by the reference hooks to a copy of the model: the same gradients (fp32)."""
    model = hf_model(kind, layers=5, seed=seed)
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0, seed=seed, **SAMPLINGS[sampling])
    ids, mask, labels = _batch(model.config.vocab_size, seed)
    _loss(model(input_ids=ids, attention_mask=mask, labels=labels), labels).backward()
    r = router.routing
    L = router.num_layers
    assert r.reweighted and r.block_active.shape == (L, ids.numel())
    if "block" in sampling:
        assert r.backward_draws is not None and not r.backward_draws.pending  # every routed block drew
    kept = r.block_active.sum(1).tolist()
    assert kept == [r.active_count(i) for i in range(L)]
    n = int((labels[:, 1:] != -100).sum())
    assert kept[0] == kept[-1] == n and all(k < n for k in kept[1:-1])  # dense ends, routed middle
    w = r.branch_weight
    assert bool((w[~r.block_active] == 0).all()) and bool((w[r.block_active] >= 1 - 1e-6).all())
    assert bool((w[1:-1][r.block_active[1:-1]] > 1).any())  # a routed block's kept rows weigh more than 1
    if sampling == "unbiased":  # a uniform draw of k of n: every kept row weighs n / k
        for b in range(L):
            assert torch.allclose(w[b][r.block_active[b]], torch.tensor(n / kept[b]))
    assert sorted(r.compact_blocks) == list(range(L))
    with cggr.reference_routing(_blocks(ref, kind), block_active=r.block_active.view(L, *ids.shape),
                                branch_weight=w.view(L, *ids.shape), inactive="skip"):
        _loss(ref(input_ids=ids, attention_mask=mask, labels=labels), labels).backward()
    got, want = flat_grads(model), flat_grads(ref)
    worst = max(want, key=lambda k: rel_err(got[k], want[k]))
    assert rel_err(got[worst], want[worst]) < 1e-5, worst


def _blocks(model, kind):
    return list(model.transformer.h if kind == "gpt2" else model.model.layers)


@pytest.mark.parametrize("backward,wrapped", [("auto", 0), ("generic", 4)])
def test_compacted_blocks_weigh_their_rows_in_their_own_backward(backward, wrapped, monkeypatch):
    """A compacted block applies its rows' weights (and draws them, importance="block") inside its own backward, on
    the rows it keeps: no SkipRows at its output, whose clone and full-width passes cost 10 % of the 350M step's
    kernel time; a generic block still takes SkipRows (every one of the 4 blocks here)."""
    from cggr import sparse
    seed = 4131
    model = hf_model("llama", layers=4, seed=seed)
    calls = []
    apply = sparse.SkipRows.apply
    monkeypatch.setattr(sparse.SkipRows, "apply", lambda *a: calls.append(a[3]) or apply(*a))
    router = cggr.attach(model, warmup_steps=0, seed=seed, backward=backward, **SAMPLINGS["block"])
    ids, mask, labels = _batch(model.config.vocab_size, seed)
    _loss(model(input_ids=ids, attention_mask=mask, labels=labels), labels).backward()
    r = router.routing
    assert len(r.compact_blocks) == 4 - wrapped and sorted(calls) == list(range(wrapped))
    assert not r.backward_draws.pending  # every routed block drew its rows in its backward, either way


@pytest.mark.parametrize("sampling", ["unbiased", "block", "loss"])
def test_generic_backward_equals_the_reference_too(sampling):
    """The per-linear (generic) path under the same options: backward='generic' on Llama."""
    seed = 4111
    model = hf_model("llama", layers=4, seed=seed)
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0, seed=seed, backward="generic", **SAMPLINGS[sampling])
    ids, mask, labels = _batch(model.config.vocab_size, seed)
    _loss(model(input_ids=ids, attention_mask=mask, labels=labels), labels).backward()
    r = router.routing
    assert not r.compact_blocks and r.reweighted
    L = router.num_layers
    with cggr.reference_routing(_blocks(ref, "llama"), block_active=r.block_active.view(L, *ids.shape),
                                branch_weight=r.branch_weight.view(L, *ids.shape), inactive="skip"):
        _loss(ref(input_ids=ids, attention_mask=mask, labels=labels), labels).backward()
    got, want = flat_grads(model), flat_grads(ref)
    assert max(rel_err(got[k], want[k]) for k in want) < 1e-5


def test_fused_loss_gives_the_loss_importance_without_logits():
    """importance="loss" with fused_loss=True: the loss's own gradient norms draw the rows (no logits exist)."""
    seed = 4121
    model = hf_model("llama", layers=4, seed=seed)
    unfused = copy.deepcopy(model)
    a = cggr.attach(model, warmup_steps=0, seed=seed, fused_loss=True, **SAMPLINGS["loss"])
    b = cggr.attach(unfused, warmup_steps=0, seed=seed, **SAMPLINGS["loss"])
    ids, mask, labels = _batch(model.config.vocab_size, seed)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    unfused(input_ids=ids, attention_mask=mask, labels=labels)
    # The same importance up to rounding, so the same draws (systematic pi-ps on the same random numbers).
    assert torch.equal(a.routing.block_active, b.routing.block_active)
    torch.testing.assert_close(a.routing.branch_weight, b.routing.branch_weight, rtol=1e-4, atol=0)


def test_loss_importance_without_labels_is_refused():
    model = TinyLM()
    cggr.attach(model, warmup_steps=0, **SAMPLINGS["loss"])
    with pytest.raises(ValueError, match="importance='loss'.*labels"):
        model(torch.randint(0, 61, (2, 9)))


# ---------------------------------------------------------------------------------------------------- Monte Carlo


class _MLPBlock(nn.Module):
    """A residual MLP block: every row's branch depends on that row alone (no attention)."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class _MLPStack(nn.Module):
    def __init__(self, vocab=17, d=8, layers=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_MLPBlock(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, labels=None):  # labels: read by the router (importance="loss"), aligned with ids
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _mean_routed_grads(model, ids, targets, draws, **options):
    """Dense gradients and the mean of ``draws`` routed ones (each forward draws afresh), float64 sums."""
    dense_model = copy.deepcopy(model)
    F.cross_entropy(dense_model(ids).flatten(0, 1), targets.flatten(), reduction="sum").backward()
    labels = {"labels": targets} if options.get("importance") == "loss" else {}
    dense = flat_grads(dense_model)
    router = cggr.attach(model, warmup_steps=0, label_shift=0, **options)
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in dense.items()}
    squares = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in dense.items()}
    for _ in range(draws):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(ids, **labels).flatten(0, 1), targets.flatten(), reduction="sum").backward()
        for k, v in flat_grads(model).items():
            total[k] += v.double()
            squares[k] += v.double() ** 2
    router.detach()
    mean = {k: v / draws for k, v in total.items()}
    stderr = {k: ((squares[k] / draws - mean[k] ** 2).clamp_min(0) / draws).sqrt() for k in total}
    return dense, mean, stderr


@pytest.mark.parametrize("sampling,seed", [("unbiased", 4201), ("block", 4202), ("loss", 4203)])
def test_unbiased_estimator_is_unbiased_by_monte_carlo(sampling, seed):
    """Row-local blocks: the mean of many reweighted routed gradients is the dense gradient (every weight, within
    5 standard errors of the mean, 2000 draws); without reweighting the routed blocks' weight gradients come out
    smaller (the kept fraction of them), as the plain estimator's do."""
    torch.manual_seed(seed)
    model = _MLPStack()
    ids = torch.randint(0, 17, (4, 16))
    targets = torch.randint(0, 17, (4, 16))
    options = dict(SAMPLINGS[sampling], block_fractions=(1.0, 0.3, 0.5, 1.0), seed=seed)
    dense, mean, stderr = _mean_routed_grads(copy.deepcopy(model), ids, targets, 2000, **options)
    for k in dense:
        z = (mean[k] - dense[k].double()).abs() / (stderr[k] + 1e-6 * dense[k].double().abs().max())
        assert float(z.max()) < 5.5, (k, float(z.max()))
    plain_options = dict(block_fractions=(1.0, 0.3, 0.5, 1.0), seed=seed)
    dense, plain, _ = _mean_routed_grads(copy.deepcopy(model), ids, targets, 300, **plain_options)
    ratio = plain["blocks.1.up.weight"].norm() / dense["blocks.1.up.weight"].double().norm()
    assert 0.2 < float(ratio) < 0.45  # about the kept fraction 0.3


def test_attention_key_value_path_keeps_the_documented_bias():
    """With attention, the keys and values of dropped rows stay constants (docs/design.md): the query, output and
    MLP weights' gradients are unbiased, the key and value weights' come out about the kept fraction smaller."""
    seed = 4211
    torch.manual_seed(seed)
    model = TinyLM(vocab=23, d=16, layers=3, heads=2)
    ids = torch.randint(0, 23, (2, 12))
    targets = torch.randint(0, 23, (2, 12))
    dense, mean, stderr = _mean_routed_grads(model, ids, targets, 1500, block_fractions=(1.0, 0.5, 1.0),
                                             seed=seed, **SAMPLINGS["unbiased"])
    for name in ("q.weight", "o.weight", "up.weight", "down.weight"):
        k = f"blocks.1.{name}"
        z = (mean[k] - dense[k].double()).abs() / (stderr[k] + 1e-6 * dense[k].double().abs().max())
        assert float(z.max()) < 5.5, (k, float(z.max()))
    for name in ("k.weight", "v.weight"):
        k = f"blocks.1.{name}"
        ratio = float(mean[k].norm() / dense[k].double().norm())
        assert 0.35 < ratio < 0.8, (k, ratio)  # between the kept fraction (off-diagonal terms) and 1 (diagonal)


# ---------------------------------------------------------------------------------------------------- variance budget


def test_variance_budget_measures_then_sets_each_blocks_fraction():
    """variance_budget: the first step keeps every row and records every block's output-gradient norms; the next
    forward sets the routed blocks' fractions from them (uniform draws: k = ceil(n / (1 + tau))); the dense
    ends keep every row; measurements repeat every ``variance_every`` steps."""
    seed = 4301
    model = hf_model("llama", layers=5, seed=seed)
    router = cggr.attach(model, warmup_steps=0, seed=seed, variance_every=2, **SAMPLINGS["unbiased"],
                         variance_budget=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    router.attach_optimizer(opt)
    ids, mask, labels = _batch(model.config.vocab_size, seed)
    n = int((labels[:, 1:] != -100).sum())
    counts = []
    for step in range(5):
        _loss(model(input_ids=ids, attention_mask=mask, labels=labels), labels).backward()
        r = router.routing
        assert (r.probe is not None) == (step % 2 == 0)
        counts.append([r.active_count(i) for i in range(router.num_layers)])
        opt.step()
        opt.zero_grad()
    assert counts[0] == [n] * 5  # until the first measurement: every row
    expected = math.ceil(n / 1.5)
    assert counts[1] == [n, expected, expected, expected, n]
    assert router._planner.budget_fractions[1] == pytest.approx(expected / n)


def test_block_importance_budget_keeps_fewer_rows_where_gradients_concentrate():
    """importance="block": the budget is met with the rows' own pi-ps design, which needs fewer rows than a
    uniform draw when the output-gradient norms are uneven."""
    seed = 4311
    sizes = torch.cat([torch.full((8,), 10.0), torch.full((56,), 0.1)])
    valid = torch.ones(64, dtype=torch.bool)
    probe = cggr.routing.VarianceProbe(sizes.expand(4, 64).clone(), valid, None, {0, 1, 2, 3})
    uniform = cggr.plan.Planner(cggr.RoutingConfig(variance_budget=0.1, **SAMPLINGS["unbiased"]), 4, [True] * 4)
    block = cggr.plan.Planner(cggr.RoutingConfig(variance_budget=0.1, **SAMPLINGS["block"]), 4, [True] * 4)
    fu, fb = uniform.measure_budget(probe), block.measure_budget(probe)
    assert fu[0] == fu[3] == fb[0] == fb[3] == 1.0
    assert fu[1] == pytest.approx(math.ceil(64 / 1.1) / 64)
    assert fb[1] < 0.5 * fu[1], (fb, fu, seed)


@pytest.mark.parametrize("bad,match", [
    (dict(importance="block"), "needs estimator='unbiased'"),
    (dict(estimator="unbiased", inactive="stop"), "need placement='per_block'"),
    (dict(estimator="unbiased", leak_rate=0.5), "leak_rate"),
    (dict(variance_budget=0.1), "needs estimator='unbiased'"),
    (dict(estimator="unbiased", variance_budget=0.1, block_fractions=(1.0, 0.5)), "give one"),
    (dict(estimator="unbiased", variance_budget=0.0), "variance_budget must be"),
    (dict(estimator="unbiased", variance_budget=True), "variance_budget must be"),
    (dict(importance_mix=-1.0), "importance_mix must be"),
    (dict(importance_mix=True), "importance_mix must be"),
    (dict(sampler="poisson"), "sampler must be one of"),
    (dict(estimator="hajek"), "estimator must be one of"),
    (dict(importance="gradient"), "importance must be one of"),
    (dict(variance_every=0), "variance_every must be"),
])
def test_bad_sampling_options_are_refused_naming_them(bad, match):
    with pytest.raises(ValueError, match=match):
        cggr.RoutingConfig(**bad)


def test_sampling_options_choose_per_block_placement():
    c = cggr.RoutingConfig(estimator="unbiased", variance_budget=0.05)
    assert c.placement == "per_block" and c.dense_ends == 1
    with pytest.raises(ValueError, match="num_buckets=1 and variance_budget cannot be combined"):
        cggr.RoutingConfig(estimator="unbiased", num_buckets=1, variance_budget=0.05)
    for ignored, match in ((dict(sampler="priority"), "would be ignored"), (dict(importance_mix=2.0), "ignored"),
                           (dict(variance_every=7), "give variance_budget too")):
        with pytest.raises(ValueError, match=match):
            cggr.RoutingConfig(estimator="unbiased", **ignored)
    assert Routing(num_layers=2).reweighted is False
