"""cggr_lab.ltd: the random-LTD arm of ``cggr bench quality`` against slow references, on a tiny Llama (CPU, fp32).

Tolerances: keep=1 bypasses the gather and must match the plain model to 1e-5 (in fact bit-equal: the same
calls). The gathered fast path against the per-sequence reference runs the same layer on the same rows, but
with a batch of B sub-sequences instead of one, so matmul blocking may differ: fp32 rounding, 1e-5 relative;
in bf16 (the harness's CUDA dtype) one rounding of a bf16 result is 2**-8 relative, and a layer output
passes through a few of them: 2e-2 relative and absolute. Dropped rows are bit-equal in every dtype.
"""

import json
import math

import pytest
import torch

from cggr_lab.ltd import RandomLTD, keep_fraction, kept_tokens
from cggr_lab.quality import parse_arm

IMPLS = ("sdpa", "eager")


def tiny_llama(impl: str, layers: int = 4, seed: int = 0, seq_len: int = 37):
    from cggr_lab.training import build_llama

    torch.manual_seed(seed)
    config, model = build_llama(d_model=48, layers=layers, heads=4, vocab_size=97, seq_len=seq_len, eot=0)
    model.config._attn_implementation = impl
    return model.float().train()


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_layer(layer, rotary, hidden, idx, impl, key_valid=None):
    """The slow definition: per sequence, the kept sub-sequence through the HF layer with its original
    positions (position ids, rotary cos/sin recomputed at them) and a mask built from the original positions;
    the dropped rows unchanged."""
    out = hidden.clone()
    for b in range(hidden.shape[0]):
        pos = idx[b].tolist()
        sub = hidden[b:b + 1, pos]
        position_ids = torch.tensor([pos])
        cos, sin = rotary(sub, position_ids=position_ids)
        p = torch.tensor(pos)
        allowed = (p[None, :] <= p[:, None])[None, None]  # key position <= query position
        if key_valid is not None:  # padding: keys at padded positions are masked
            allowed = allowed & key_valid[b, p][None, None, None, :]
        if impl == "eager":
            mask = torch.zeros(allowed.shape, dtype=hidden.dtype).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
        else:
            mask = allowed
        y = type(layer).forward(layer, sub, attention_mask=mask, position_ids=position_ids,
                                position_embeddings=(cos, sin))
        for j, s in enumerate(pos):
            out[b, s] = y[0, j]
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", [0, 1])
def test_keep_one_equals_plain_model(impl, seed):
    model = tiny_llama(impl, seed=seed)
    ids = torch.randint(0, 97, (3, 37), generator=torch.Generator().manual_seed(seed))
    loss0, grads0 = loss_and_grads(model, ids)
    ltd = RandomLTD(model, start_keep=1.0, seed=seed)
    loss1, grads1 = loss_and_grads(model, ids)
    assert torch.allclose(loss1, loss0, rtol=0, atol=1e-5)
    assert grads1.keys() == grads0.keys()
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=0, atol=1e-5, msg=n)
    ltd.detach()
    assert all("forward" not in vars(layer) for layer in model.model.layers)


@pytest.mark.parametrize("impl", IMPLS)
def test_reference_with_every_token_is_the_dense_layer(impl):
    """The reference itself: kept = all positions reproduces the HF layer as LlamaModel calls it."""
    model = tiny_llama(impl, seed=3)
    seen, handle = capture(model, 1)
    model(input_ids=torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(3)))
    handle.remove()
    ref = reference_layer(model.model.layers[1], model.model.rotary_emb, seen["input"],
                          torch.arange(37).expand(2, 37), impl)
    torch.testing.assert_close(ref, seen["output"], rtol=1e-5, atol=1e-5)


def capture(model, index):
    seen = {}

    def hook(module, args, kwargs, output):
        seen["input"], seen["output"] = args[0].detach(), output.detach()

    return seen, model.model.layers[index].register_forward_hook(hook, with_kwargs=True)


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed,keep,batch,seq", [(0, 0.5, 3, 37), (1, 0.3, 2, 29), (2, 0.6, 4, 24)])
def test_dropped_rows_pass_and_kept_rows_match_reference(impl, seed, keep, batch, seq, dtype):
    model = tiny_llama(impl, layers=5, seed=seed, seq_len=seq).to(dtype)
    ids = torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))
    ltd = RandomLTD(model, start_keep=keep, seed=seed)
    k = kept_tokens(keep, seq)
    assert 0 < k < seq
    for index in (1, 2, 3):
        seen, handle = capture(model, index)
        model(input_ids=ids, labels=ids).loss.backward()
        handle.remove()
        idx = ltd.last_indices[index]
        assert idx.shape == (batch, k) and bool((idx[:, 1:] > idx[:, :-1]).all())
        dropped = torch.ones(batch, seq, dtype=torch.bool)
        dropped[torch.arange(batch)[:, None], idx] = False
        assert torch.equal(seen["output"][dropped], seen["input"][dropped])
        assert not torch.equal(seen["output"][~dropped], seen["input"][~dropped])
        ref = reference_layer(model.model.layers[index], model.model.rotary_emb, seen["input"], idx, impl)
        torch.testing.assert_close(seen["output"], ref, rtol=TOL[dtype], atol=TOL[dtype])
    # The first and last layers stay dense; each middle layer draws afresh.
    assert set(ltd.last_indices) == {1, 2, 3}
    assert not torch.equal(ltd.last_indices[1], ltd.last_indices[2])
    ltd.detach()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", [4, 5])
def test_loss_and_gradients_match_reference_model(impl, seed):
    """The whole model, forward and backward, against the model whose middle layers run the slow reference
    on the same kept positions."""
    model = tiny_llama(impl, layers=4, seed=seed, seq_len=23)
    ids = torch.randint(0, 97, (3, 23), generator=torch.Generator().manual_seed(seed))
    ltd = RandomLTD(model, start_keep=0.4, seed=seed)
    loss_fast, grads_fast = loss_and_grads(model, ids)
    indices = dict(ltd.last_indices)
    ltd.detach()
    rotary = model.model.rotary_emb
    for i, idx in indices.items():
        layer = model.model.layers[i]
        layer.forward = (lambda layer, idx: lambda h, **kw: reference_layer(layer, rotary, h, idx, impl))(layer, idx)
    try:
        loss_ref, grads_ref = loss_and_grads(model, ids)
    finally:
        for i in indices:
            del model.model.layers[i].forward
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads_fast.keys() == grads_ref.keys()
    for n in grads_ref:
        torch.testing.assert_close(grads_fast[n], grads_ref[n], rtol=1e-5, atol=1e-5, msg=n)
    loss_plain, _ = loss_and_grads(model, ids)
    assert not torch.allclose(loss_plain, loss_fast)  # tokens were really dropped


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", [7, 8])
def test_padding_mask_is_restricted_to_kept_tokens(impl, seed):
    """With an attention_mask (right padding) HF passes a 4-D mask (SDPA too): kept tokens see the kept,
    unpadded keys at earlier or equal original positions."""
    model = tiny_llama(impl, layers=3, seed=seed, seq_len=23)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, 23), generator=g)
    valid = torch.ones(3, 23, dtype=torch.bool)
    valid[1, 19:] = False
    valid[2, 21:] = False
    ltd = RandomLTD(model, start_keep=0.6, seed=seed)
    seen, handle = capture(model, 1)
    model(input_ids=ids, attention_mask=valid.long())
    handle.remove()
    idx = ltd.last_indices[1]
    ref = reference_layer(model.model.layers[1], model.model.rotary_emb, seen["input"], idx, impl, key_valid=valid)
    torch.testing.assert_close(seen["output"], ref, rtol=1e-5, atol=1e-5)
    ltd.detach()


def test_eval_mode_is_dense_and_draws_are_seeded():
    model = tiny_llama("sdpa", seed=6)
    ids = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(6))
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        ltd = RandomLTD(model, start_keep=0.5, seed=6)
        torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)
    model.train()
    model(input_ids=ids)
    first = dict(ltd.last_indices)
    ltd.detach()
    again = RandomLTD(model, start_keep=0.5, seed=6)
    model(input_ids=ids)
    assert all(torch.equal(first[i], again.last_indices[i]) for i in first)
    again.detach()


@pytest.mark.parametrize("seq", [1, 5, 8, 13, 64, 100, 1024])
def test_kept_tokens_are_multiples_of_8(seq):
    """Nearest multiple of 8 (halves up), at least 8, at most the sequence; every token at keep 1."""
    for keep in [i / 97 for i in range(1, 98)] + [0.001, 0.999999, 1.0]:
        k = kept_tokens(keep, seq)
        nearest = 8 * math.floor(keep * seq / 8 + 0.5)  # the definition, written out
        expected = seq if keep >= 1.0 else min(seq, max(8, nearest))
        assert k == expected, (keep, seq, k)
        assert k == seq or (k % 8 == 0 and 8 <= k < seq)
        assert k == seq or abs(k - keep * seq) <= 4 or k == 8  # rounding moves at most half a multiple
    assert kept_tokens(1.0, 100) == 100 and kept_tokens(0.99, 100) == 96  # 99 -> 96, not 104 > seq
    assert kept_tokens(0.5, 1024) == 512 and kept_tokens(0.51, 1024) == 520 and kept_tokens(0.01, 1024) == 8
    assert kept_tokens(0.5, 5) == 5  # shorter than 8: the whole sequence


def test_schedule_rises_to_full():
    assert keep_fraction(0.0, 0.5, 0.7) == 0.5
    assert keep_fraction(0.35, 0.5, 0.7) == pytest.approx(0.75)
    assert keep_fraction(0.7, 0.5, 0.7) == 1.0 and keep_fraction(1.0, 0.5, 0.7) == 1.0
    fs = [i / 50 for i in range(51)]
    ks = [kept_tokens(keep_fraction(f, 0.25, 0.8), 64) for f in fs]
    assert ks[0] == 16 and ks[-1] == 64 and ks == sorted(ks)
    assert all(k == 64 for f, k in zip(fs, ks) if f >= 0.8)
    model = tiny_llama("sdpa")
    ltd = RandomLTD(model, start_keep=0.25, ramp=0.8)
    ltd.set_fraction(0.0)
    ids = torch.randint(0, 97, (2, 32))
    model(input_ids=ids)
    m = ltd.metrics()
    # 4 layers, 2 middle ones at 8 of 32 tokens: (2 * 32 + 2 * 8) / (4 * 32).
    assert m["keep_fraction"] == 0.25 and m["mean_depth_fraction"] == pytest.approx(80 / 128)
    ltd.set_fraction(0.9)
    model(input_ids=ids)
    assert ltd.metrics() == {"keep_fraction": 1.0, "mean_depth_fraction": 1.0}
    ltd.detach()


def test_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="at least 3 layers"):
        RandomLTD(tiny_llama("sdpa", layers=2))
    model = tiny_llama("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attention implementations"):
        RandomLTD(model)
    with pytest.raises(ValueError, match="start_keep must be in"):
        RandomLTD(tiny_llama("sdpa"), start_keep=0.0)
    with pytest.raises(ValueError, match="ramp must be in"):
        RandomLTD(tiny_llama("sdpa"), ramp=1.5)
    model = tiny_llama("sdpa")
    RandomLTD(model)
    with pytest.raises(RuntimeError, match="attached twice"):
        RandomLTD(model)


def test_parse_ltd_arm():
    a = parse_arm("ltd")
    assert a["policy"] == "random-ltd" and a["ltd"] == {"start_keep": 0.5, "ramp": 0.7} and a["seed"] == 0
    a = parse_arm("ltd/keep=0.25/ramp=0.8/seed=1")
    assert a["ltd"] == {"start_keep": 0.25, "ramp": 0.8} and a["seed"] == 1
    for spec, match in [("ltd/buckets=2", r"key in \['keep', 'liger', 'ramp', 'seed'\]"), ("ltd/keep=0", "keep must be in"),
                        ("ltd/ramp=1.2", "ramp must be in"), ("ltd/keep=half", "bad value"), ("ltd/keep", "key=value")]:
        with pytest.raises(ValueError, match=match):
            parse_arm(spec)


def test_quality_bench_ltd_arm(tmp_path, monkeypatch, capsys):
    from cggr.cli import main

    monkeypatch.setenv("CGGR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text("\n".join(f"==> doc{i} <==\n" + " ".join(["alpha", "beta", "gamma", "the"][
        (i * j) % 4] for j in range(300)) for i in range(8)))
    argv = ["bench", "quality", "--model", "tiny", "--d-model", "32", "--layers", "3", "--heads", "2",
            "--seq-len", "32", "--batch-size", "2", "--vocab-size", "300", "--steps", "5", "--evals", "2",
            "--eval-batches", "1", "--data", str(tmp_path / "a.txt"), "--arms", "dense,ltd/keep=0.5/ramp=0.6",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "ltd/keep=0.5/ramp=0.6" in capsys.readouterr().out
    rec = json.loads((tmp_path / "out" / "quality-pretrain-tiny-a-5steps.json").read_text())
    arms = {r["arm"]: r for r in rec["arms"]}
    ltd = arms["ltd/keep=0.5/ramp=0.6"]
    assert ltd["steps"] == 5 and ltd["policy"] == "random-ltd" and ltd["options"] == {"start_keep": 0.5, "ramp": 0.6}
    assert [m["keep_fraction"] for m in ltd["router_metrics"]] == pytest.approx([0.5, 0.5 + 0.5 / 3, 0.5 + 1 / 3,
                                                                                 1.0, 1.0])
    assert 0.5 < ltd["mean_depth_fraction"] < 1.0
    assert ltd["val_loss"][0] == arms["dense"]["val_loss"][0]
    assert "ltd/keep=0.5/ramp=0.6" in rec["summary"]["arms"]
    assert main(argv[:-4] + ["--layers", "2", "--arms", "ltd", "--out", str(tmp_path / "o2")]) == 1
    assert "--layers >= 3" in capsys.readouterr().err
