"""cggr_lab.vcas: the VCAS arm of ``cggr bench quality`` on a tiny Llama (CPU), against exact gradients.

Unbiasedness is checked by Monte Carlo: many sampled backwards of one fixed batch (one forward, its graph
retained), the mean of each gradient entry against the exact gradient in units of its standard error. The
sampled entries of one draw are strongly correlated (a few Bernoulli draws move them all), so the largest
``|z|`` over thousands of entries stays near 2-3 when unbiased; the bound is 5. Each test also shows it
could see a bias: the same statistics reject the mean scaled by 0.8. Entries that are exact in every draw
(the layers above the top sampler, or everything but the linears' weights under weight sampling) must
equal the exact gradient to fp32 rounding (1e-6 relative). With every ratio 1 the backward runs the same
matmuls as autograd's linear backward: bit-equal, fp32 and bf16.
"""

import json
import math

import pytest
import torch

from cggr_lab.quality import parse_arm
from cggr_lab.vcas import (VCAS, VarianceEstimate, default_every, poisson_pips, sampled_weight_gradient,
                           top_share_fraction, weight_gradient_variance)


def tiny_llama(layers: int = 3, seed: int = 0, dtype=torch.float32):
    from tests.tiny import hf_model

    return hf_model("llama", layers=layers, seed=seed).to(dtype).train()


def batch(seed: int, B: int = 6, S: int = 11) -> torch.Tensor:
    return torch.randint(0, 97, (B, S), generator=torch.Generator().manual_seed(1000 + seed))


def grads(model, ids) -> dict:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny matmuls: one thread is faster than several fighting over a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def monte_carlo(model, ids, draws: int):
    """Exact gradients, and the mean and standard error of ``draws`` sampled gradients (float64, by name)."""
    names, params = zip(*model.named_parameters())
    loss = model(input_ids=ids, labels=ids).loss
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    total_sq = [t.clone() for t in total]
    for _ in range(draws):
        for t, sq, g in zip(total, total_sq, torch.autograd.grad(loss, params, retain_graph=True)):
            t += g.double()
            sq += g.double().square()
    mean = [t / draws for t in total]
    se = [((sq / draws - m.square()).clamp_min(0) * draws / (draws - 1) / draws).sqrt()
          for m, sq in zip(mean, total_sq)]
    return dict(zip(names, mean)), dict(zip(names, se))


def check_unbiased(mean, se, exact, sampled_names):
    """Every moving entry of the sampled tensors within 5 standard errors of the exact gradient, where a scaled
    mean (0.8x) is not; every entry that never moves (all of the other tensors; e.g. the embedding rows of
    tokens not in the batch) equal to the exact gradient (to fp32 rounding)."""
    for name, e in exact.items():
        e = e.double()
        moving = se[name] > 1e-7 * e.abs().max()  # above the float64 rounding of a constant's sample variance
        if name in sampled_names:
            assert moving.any(), f"{name}: the sampling does not move it"
            z = ((mean[name] - e) / se[name])[moving]
            assert z.abs().max() < 5, f"{name}: max |z| {z.abs().max():.2f}"
            biased = ((0.8 * mean[name] - e) / se[name])[moving]
            assert biased.abs().max() > 5, f"{name}: the test cannot see a 20% bias"
        else:
            assert not moving.any(), f"{name}: varies, but should be exact in every draw"
        torch.testing.assert_close(mean[name][~moving], e[~moving], rtol=1e-6, atol=1e-6 * e.abs().max().item(),
                                   msg=name)


# ----------------------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_ratio_one_is_the_exact_gradient(seed, dtype):
    model = tiny_llama(layers=3, seed=seed, dtype=dtype)
    ids = batch(seed, B=5, S=13)
    exact = grads(model, ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    vcas = VCAS(model, seed=seed)
    got = grads(model, ids)
    with torch.no_grad():  # validation runs the plain forward
        assert torch.equal(model(input_ids=ids).logits, logits)
    for n in exact:  # the same matmuls as autograd's linear backward, in both dtypes: bit-equal
        torch.testing.assert_close(got[n], exact[n], rtol=0, atol=0, msg=n)
    assert vcas.metrics() == {"s": 1.0, "probe_batches": 0.0, "act_fraction": 1.0, "mean_depth_fraction": 1.0,
                              "weight_fraction": 1.0}
    vcas.detach()
    assert all("forward" not in vars(m) for m in model.modules())
    assert all(not layer._forward_hooks for layer in model.model.layers)


# ----------------------------------------------------------------------------------------------- unbiasedness

def test_activation_sampling_is_unbiased():
    """Nested per-sequence sampling at every layer (k = 2, 3, 4 of 6 sequences), weight gradients exact."""
    model = tiny_llama(layers=3, seed=2)
    ids = batch(2)
    exact = grads(model, ids)
    vcas = VCAS(model, seed=2)
    vcas.act_ratios = [0.34, 0.5, 0.67]
    mean, se = monte_carlo(model, ids, draws=2000)
    m = vcas.metrics()
    assert m["weight_fraction"] == 1.0
    # Expected kept fractions per layer: 4/6 at the top, then 3/6 and 2/6 of all sequences (nested).
    assert m["act_fraction"] == pytest.approx((4 + 3 + 2) / 18, abs=0.02)
    sampled = {n for n in exact if n.startswith("model.layers.") or n == "model.embed_tokens.weight"}
    check_unbiased(mean, se, exact, sampled)


def test_weight_sampling_is_unbiased():
    """Leverage-score row sampling in every decoder linear (nu = 0.4), activations exact: only the linears'
    weights move, everything else (norms, embeddings: dX is exact) is the exact gradient in every draw."""
    model = tiny_llama(layers=2, seed=3)
    ids = batch(3)
    exact = grads(model, ids)
    vcas = VCAS(model, seed=3)
    vcas.weight_ratios = [0.4] * len(vcas.weight_ratios)
    mean, se = monte_carlo(model, ids, draws=1000)
    m = vcas.metrics()
    assert m["act_fraction"] == 1.0 and m["weight_fraction"] == pytest.approx(0.4, abs=0.02)
    sampled = {n for n in exact if n.endswith("proj.weight")}
    assert len(sampled) == 14
    check_unbiased(mean, se, exact, sampled)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropped_sequences_send_no_gradient_below(dtype):
    """Stop semantics per sequence: a sequence dropped at a layer's output has zero gradient at the inputs of
    the model (its embeddings), residual stream included; the kept ones do not. Both samplers on."""
    model = tiny_llama(layers=3, seed=4, dtype=dtype)
    ids = batch(4, B=8)
    vcas = VCAS(model, seed=4)
    vcas.act_ratios, vcas.weight_ratios = [0.3, 0.6, 0.6], [0.5] * len(vcas.weight_ratios)
    seen = set()
    for _ in range(20):
        embeds = model.model.embed_tokens(ids).detach().requires_grad_()
        model(inputs_embeds=embeds, labels=ids).loss.backward()
        kept = set(vcas._kept.tolist())
        rows = embeds.grad.flatten(1).abs().amax(1)
        assert all((rows[b] > 0) == (b in kept) for b in range(8)), (kept, rows)
        assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)
        seen.add(len(kept))
    assert len(seen) > 1  # Poisson sampling: the kept count varies around int(8 * 0.3) = 2
    m = vcas.metrics()
    assert 0.3 < m["act_fraction"] < 0.7 and 0.3 < m["weight_fraction"] < 0.7
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="autocast"):
        model(input_ids=ids, labels=ids)


# ----------------------------------------------------------------------------------------------- the draws

@pytest.mark.parametrize("seed", [0, 1])
def test_poisson_pips_inclusion_probabilities_by_counting(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(13, generator=g) ** 3
    scores[3] = 50.0  # capped at pi = 1
    scores[7] = 0.0  # never drawn
    k, draws = 5, 5000
    pi, _ = poisson_pips(scores, k, g)
    assert pi.sum().item() == pytest.approx(k) and pi[3] == 1.0 and pi[7] == 0.0
    free = pi < 1
    ratio = pi[free & (scores > 0)] / scores[free & (scores > 0)].double()
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio))  # pi-ps: proportional below the cap
    counts = torch.zeros(13, dtype=torch.float64)
    sizes = []
    for _ in range(draws):
        p, keep = poisson_pips(scores, k, g)
        counts += keep
        sizes.append(keep.sum().item())
    se = (pi * (1 - pi) / draws).sqrt()
    assert ((counts / draws - pi).abs() <= 5 * se + 1e-12).all()
    assert len(set(sizes)) > 2  # independent draws: the size varies around k
    assert sum(sizes) / draws == pytest.approx(k, abs=5 * math.sqrt(pi.mul(1 - pi).sum().item() / draws))


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_weight_gradient_matches_its_analytic_variance(seed):
    """The leverage-score estimate of G^T X: unbiased, and its variance summed over entries is
    sum (1/pi - 1) ||G_j||^2 ||X_j||^2, the formula the probe uses; exact at k >= K and k = 0."""
    g = torch.Generator().manual_seed(seed)
    G, X = torch.randn(37, 5, generator=g), torch.randn(37, 7, generator=g)
    G[::4] *= 5  # uneven leverage scores
    exact = (G.t() @ X).double()
    for k in (0, 37, 50):
        w, rows = sampled_weight_gradient(G, X, k, g)
        assert rows == 37 and torch.equal(w, G.t() @ X)
        assert weight_gradient_variance(G, X, k).item() == 0.0
    k, draws = 11, 6000
    total = torch.zeros_like(exact)
    total_sq = torch.zeros_like(exact)
    for _ in range(draws):
        w, _ = sampled_weight_gradient(G, X, k, g)
        total += w.double()
        total_sq += w.double().square()
    mean = total / draws
    var = (total_sq / draws - mean.square()) * draws / (draws - 1)
    z = (mean - exact) / (var / draws).sqrt()
    assert z.abs().max() < 5
    assert var.sum().item() == pytest.approx(weight_gradient_variance(G, X, k).item(), rel=0.1)


def test_top_share_fraction():
    norms = torch.tensor([1.0, 4.0, 2.0, 3.0])  # total 10; descending 4, 3, 2, 1
    assert top_share_fraction(norms, 0.0) == 0.25  # at least one
    assert top_share_fraction(norms, 0.4) == 0.25
    assert top_share_fraction(norms, 0.41) == 0.5
    assert top_share_fraction(norms, 0.9) == 0.75
    assert top_share_fraction(norms, 1.0) == 1.0
    assert top_share_fraction(norms, 1.01) == 1.0


def test_default_every():
    assert default_every(300) == 6 and default_every(3) == 1 and default_every(10_000) == 200
    assert default_every(None) == 100


# ----------------------------------------------------------------------------------------------- the controller

def estimate(n_linears, n_layers, sgd=1.0, act=0.0, weight=0.0, up=0.9, down=0.5):
    return VarianceEstimate(sgd_var=[sgd] * n_linears, act_var=[act] * n_linears, weight_var=[weight] * n_linears,
                            ratios_up=[up] * n_layers, ratios_down=[down] * n_layers)


def test_controller_moves_s_rho_and_nu_the_right_way():
    vcas = VCAS(tiny_llama(layers=3), tau_act=0.025, tau_weight=0.025)
    n, L = len(vcas.weight_ratios), 3
    assert (vcas.s, vcas.act_ratios, vcas.weight_ratios) == (1.0, [1.0] * 3, [1.0] * n)  # starts exact
    # Small variances: s falls, rho moves toward the ratios measured at the lower share, nu shrinks.
    low = estimate(n, L, act=0.01, weight=0.01, down=0.5)
    low.ratios_down = [0.5, 0.25, 0.75]  # made non-decreasing toward the top: 0.5, 0.5, 0.75
    vcas.adapt(low)
    assert vcas.s == pytest.approx(0.99)
    assert vcas.act_ratios == pytest.approx([0.6 + 0.4 * 0.5, 0.6 + 0.4 * 0.5, 0.6 + 0.4 * 0.75])
    assert vcas.weight_ratios == pytest.approx([0.95] * n)
    # Large ones (above tau): s rises, rho moves toward the ratios measured at the higher share, nu grows.
    before = list(vcas.act_ratios)
    high = estimate(n, L, act=0.05, weight=0.05, up=1.0)
    high.weight_var[0] = 0.0  # one linear under its budget: its nu keeps shrinking
    vcas.adapt(high)
    assert vcas.s == pytest.approx(1.0)
    assert vcas.act_ratios == pytest.approx([0.6 * r + 0.4 for r in before])
    assert vcas.weight_ratios[0] == pytest.approx(0.95 ** 2)
    assert vcas.weight_ratios[1:] == pytest.approx([1.0] * (n - 1))
    # The activation test sums over linears: one large variance against the summed SGD variance.
    mixed = estimate(n, L, act=0.0)
    mixed.act_var[0] = 0.03 * n
    vcas.adapt(mixed)
    assert vcas.s == pytest.approx(1.0)  # clipped at 1
    vcas.s = 0.005
    vcas.adapt(estimate(n, L))
    assert vcas.s == 0.0  # clipped at 0
    # An SGD variance of 0 with sampling variance reads as too much.
    vcas.adapt(estimate(n, L, sgd=0.0, act=1e-9, weight=1e-9))
    assert vcas.s == pytest.approx(0.01) and vcas.history[-1]["act_var_over_sgd_var"] == math.inf
    assert len(vcas.history) == 5


def _stream(seed: int, B: int = 4, S: int = 9):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, 97, (B, S), generator=g)


def test_probe_measures_the_sgd_variance_and_leaves_grads_alone():
    """With every entry measured (param_sample_ratio=1) and ratio 1, the probe's SGD variance is the sample
    variance of the exact weight gradients of its two batches, and the sampling variances are 0."""
    model = tiny_llama(layers=2, seed=5)
    vcas = VCAS(model, seed=5, param_sample_ratio=1.0)
    first = _stream(7)
    b1, b2 = next(first), next(first)
    exact = [grads(model, b) for b in (b1, b2)]
    est = vcas.probe(_stream(7))
    assert vcas.probe_batches_used == 2 and all(p.grad is None for p in model.parameters())
    names = [f"model.layers.{n}.weight" for n in vcas.linear_names]
    want = [((exact[0][n].double() - exact[1][n].double()).square() / 2).sum().item() for n in names]
    assert est.sgd_var == pytest.approx(want, rel=1e-9)
    assert est.act_var == [0.0] * len(names) and est.weight_var == [0.0] * len(names)
    assert est.ratios_up == [1.0, 1.0] and all(0 < r <= 1 for r in est.ratios_down)
    # Sampling on: both sampling variances are measured, positive.
    vcas.act_ratios, vcas.weight_ratios = [0.5, 0.75], [0.5] * len(names)
    est = vcas.probe(_stream(8))
    assert all(v > 0 for v in est.act_var) and all(v > 0 for v in est.weight_var)


def test_before_step_probes_every_f_steps_from_the_stream():
    model = tiny_llama(layers=2, seed=6)
    vcas = VCAS(model, seed=6, every=3)
    drawn = []

    def stream():
        for x in _stream(9):
            drawn.append(x)
            yield x

    batches = stream()
    probes = []
    for step in range(1, 8):
        vcas.before_step(batches)
        probes.append(vcas.metrics()["probe_batches"])
    assert probes == [0, 0, 2, 0, 0, 2, 0] and len(drawn) == 4 and vcas.probe_batches_used == 4
    assert [h["step"] for h in vcas.history] == [3, 6] and vcas.s == pytest.approx(0.98)


def test_vcas_errors():
    with pytest.raises(TypeError, match="model.model.layers"):
        VCAS(torch.nn.Linear(3, 3))
    for kwargs, match in [({"every": 0}, "every must be an int >= 1"), ({"tau_act": 0}, "tau_act must be"),
                          ({"tau_weight": math.nan}, "tau_weight must be"),
                          ({"probe_batches": 1}, "probe_batches must be an int >= 2"),
                          ({"param_sample_ratio": 0}, "param_sample_ratio must be in")]:
        with pytest.raises(ValueError, match=match):
            VCAS(tiny_llama(layers=1), **kwargs)
    model = tiny_llama(layers=1)
    VCAS(model)
    with pytest.raises(RuntimeError, match="attached twice"):
        VCAS(model)


# ----------------------------------------------------------------------------------------------- the harness

def test_parse_vcas_arm():
    a = parse_arm("vcas")
    assert a["policy"] == "vcas" and a["vcas"] == {"tau": 0.025, "every": None} and a["seed"] == 0
    a = parse_arm("vcas/tau=0.05/every=20/seed=2")
    assert a["vcas"] == {"tau": 0.05, "every": 20} and a["seed"] == 2 and a["backend"] == "eager"
    for spec, match in [("vcas/keep=0.5", r"key in \['every', 'seed', 'tau'\]"), ("vcas/tau=0", "tau must be"),
                        ("vcas/every=0", "every must be an int >= 1"), ("vcas/every=1.5", "bad value"),
                        ("vcas/tau=x", "bad value"), ("vcas/compile=1", "compile is not offered for vcas"),
                        ("vcas/liger=1", "liger is not offered for vcas"), ("vcas/tau", "key=value")]:
        with pytest.raises(ValueError, match=match):
            parse_arm(spec)


def test_quality_bench_vcas_arm(tmp_path, monkeypatch, capsys):
    from cggr.cli import main
    from tests.test_lab_quality import _corpus

    monkeypatch.setenv("CGGR_CACHE", str(tmp_path / "cache"))
    data = _corpus(tmp_path / "a.txt", ["alpha", "beta", "gamma", "the"], n_docs=8)
    argv = ["bench", "quality", "--model", "tiny", "--d-model", "32", "--layers", "2", "--heads", "2",
            "--seq-len", "32", "--batch-size", "4", "--vocab-size", "300", "--steps", "3", "--evals", "2",
            "--eval-batches", "1", "--data", data, "--arms", "dense,vcas", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "vcas" in capsys.readouterr().out
    rec = json.loads((tmp_path / "out" / "quality-pretrain-tiny-a-3steps.json").read_text())
    arms = {r["arm"]: r for r in rec["arms"]}
    dense, vcas = arms["dense"], arms["vcas"]
    assert vcas["steps"] == 3 and vcas["policy"] == "vcas" and vcas["options"] == {"tau": 0.025, "every": 1}
    # every = max(1, 3 // 50) = 1: a probe of 2 batches in each of the 3 steps, from the training stream.
    v = vcas["vcas"]
    assert v["probe_rounds"] == 3 and v["probe_batches"] == 6 and [h["step"] for h in v["history"]] == [1, 2, 3]
    assert vcas["epochs_of_training_data"] == pytest.approx(3 * dense["epochs_of_training_data"])
    assert [m["probe_batches"] for m in vcas["router_metrics"]] == [2.0, 2.0, 2.0]
    assert v["s"] == pytest.approx(0.97) and v["mean_act_fraction"] == 1.0 and 0 < v["mean_weight_fraction"] < 1
    assert vcas["mean_depth_fraction"] == v["mean_act_fraction"]
    assert set(v["weight_ratios"]) == {f"{i}.{n}" for i in range(2) for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    assert vcas["val_loss"][0] == dense["val_loss"][0] and "vcas" in rec["summary"]["arms"]
