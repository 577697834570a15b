"""cggr_lab.quality (``cggr bench quality``): arm specs, the comparison figures, and a tiny end-to-end run on CPU."""

import json

import pytest

from cggr_lab.provenance import provenance
from cggr_lab.quality import parse_arm, summarise


def test_parse_arm():
    a = parse_arm("random/handback=0.25/depths=1:0.5/seed=3")
    assert a["policy"] == "random" and a["handback"] == 0.25 and a["seed"] == 3
    assert a["attach"] == {"depths": (1.0, 0.5), "num_buckets": 2}
    assert parse_arm("dense/seed=1")["policy"] is None
    assert parse_arm("sampled/scorer=margin/mode=mask")["attach"] == {"scorer": "margin", "mode": "mask"}


@pytest.mark.parametrize("spec,match", [
    ("bogus", "must start with one of"),
    ("random/speed=2", "key=value with key in"),
    ("random/handback=2", "bad value"),
    ("random/warmup=0.8/handback=0.5", "must not exceed"),
    ("dense/handback=0.2", "a dense arm takes only seed="),
    ("random/mode=dense", "'random/mode=dense': mode must be one of"),
    ("random/depths=0.5:1", "strictly decreasing"),
])
def test_parse_arm_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_arm(spec)


def test_summarise_against_dense():
    def arm(name, policy, seed, seconds, losses, ms):
        return {"arm": name, "policy": policy, "seed": seed, "train_seconds": seconds, "step": [0, 5, 10],
                "val_loss": losses, "final_val_loss": losses[-1], "train_seconds_total": seconds[-1],
                "steps": 10, "step_ms_median": ms, "mean_depth_fraction": 1.0 if policy is None else 0.6}

    s = summarise([arm("dense", None, 0, [0, 5, 10], [6, 4, 3], 100.0),
                   arm("dense/seed=1", None, 1, [0, 5, 10], [6, 4.1, 3.1], 100.0),
                   arm("random", "random", 0, [0, 4, 8], [6, 3.5, 2.9], 80.0)])
    assert s["dense_seed_spread"] == pytest.approx(0.1)
    r = s["arms"]["random"]
    assert r["speedup_vs_dense"] == pytest.approx(1.25) and r["delta_vs_dense"] == pytest.approx(-0.1)
    assert r["seconds_to_dense_final"] == pytest.approx(4 + 4 * 0.5 / 0.6)
    assert s["arms"]["dense"]["time_to_dense_final_vs_dense"] == pytest.approx(1.0)
    assert s["arms"]["dense/seed=1"]["seconds_to_dense_final"] is None


def _corpus(path, words, n_docs=12):
    import random

    rnd = random.Random(len(words))
    path.write_text("\n".join(f"==> doc{i} <==\n" + " ".join(rnd.choice(words) for _ in range(400))
                              for i in range(n_docs)))
    return str(path)


def test_quality_bench_end_to_end(tmp_path, monkeypatch, capsys):
    """All three regimes, a steps budget, on CPU in seconds; the checkpoint is cached for the next run."""
    from cggr.cli import main

    monkeypatch.setenv("CGGR_CACHE", str(tmp_path / "cache"))
    a = _corpus(tmp_path / "a.txt", ["alpha", "beta", "gamma", "delta", "the", "of", "and"])
    b = _corpus(tmp_path / "b.txt", ["def", "return", "self", "import", "(", ")", ":"])
    argv = ["bench", "quality", "--model", "tiny", "--d-model", "32", "--layers", "2", "--heads", "2",
            "--seq-len", "32", "--batch-size", "2", "--vocab-size", "300", "--steps", "4", "--evals", "2",
            "--eval-batches", "1", "--data", a, "--finetune-data", b, "--regimes", "pretrain,continued,finetune",
            "--arms", "dense,dense/seed=1,random/handback=0.5,sampled", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[finetune]" in out and "time to dense's final loss" in out
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(f"quality-{r}-tiny-{c}-4steps.{e}" for r, c in
                           [("pretrain", "a"), ("continued", "a"), ("finetune", "b")] for e in ("json", "png"))
    rec = json.loads((tmp_path / "out" / "quality-finetune-tiny-b-4steps.json").read_text())
    assert rec["command"].startswith("cggr bench quality") and rec["checkpoint"]["pretrain_steps"] == 4
    expected = provenance()
    assert set(expected) <= set(rec) and rec["git_rev"] == expected["git_rev"] and rec["device"] == expected["device"]
    arms = {r["arm"]: r for r in rec["arms"]}
    assert set(arms) == {"dense", "dense/seed=1", "random/handback=0.5", "sampled"}
    for r in arms.values():
        assert r["steps"] == 4 and len(r["val_loss"]) == 3 and r["val_loss"][0] == arms["dense"]["val_loss"][0]
    # Hand-back: full depth again at the end of the budget; routed in between.
    assert arms["random/handback=0.5"]["routing_progress"] == [0.0, 1.0, 1.0, 0.5]
    assert arms["sampled"]["mean_depth_fraction"] < 1.0
    assert rec["summary"]["dense_seed_spread"] is not None
    # The second run reads the cached checkpoint.
    assert main(argv[:-4] + ["--regimes", "continued", "--arms", "dense", "--out", str(tmp_path / "out2")]) == 0
    rec2 = json.loads((tmp_path / "out2" / "quality-continued-tiny-a-4steps.json").read_text())
    assert rec2["checkpoint"]["cache_hit"] is True


def test_quality_bench_seconds_budget_and_errors(tmp_path, monkeypatch, capsys):
    from cggr.cli import main

    monkeypatch.setenv("CGGR_CACHE", str(tmp_path / "cache"))
    a = _corpus(tmp_path / "a.txt", ["one", "two", "three", "four"])
    base = ["bench", "quality", "--model", "tiny", "--d-model", "32", "--layers", "2", "--heads", "2",
            "--seq-len", "32", "--batch-size", "2", "--vocab-size", "300", "--eval-batches", "1", "--data", a,
            "--out", str(tmp_path / "out")]
    assert main(base + ["--seconds", "0.3", "--evals", "2", "--arms", "dense,random"]) == 0
    rec = json.loads((tmp_path / "out" / "quality-pretrain-tiny-a-0.3s.json").read_text())
    for r in rec["arms"]:
        assert r["train_seconds_total"] >= 0.3 and r["train_seconds"][-1] == r["train_seconds_total"]
    assert main(base + ["--regimes", "finetune"]) == 1
    assert "--regimes finetune needs --finetune-data" in capsys.readouterr().err
    assert main(base + ["--arms", "dense,dense"]) == 1
    for flags, said in [(["--seconds", "0"], "--seconds must be > 0"), (["--steps", "0"], "--steps must be >= 1"),
                        (["--pretrain-steps", "-1"], "--pretrain-steps must be >= 1"),
                        (["--arms", "random/depths=1:2"], "--arms: 'random/depths=1:2': depths must be")]:
        assert main(base + flags) == 1
        err = capsys.readouterr().err
        assert err.startswith("cggr bench quality: error: ") and said in err, err


def test_quality_bench_streams_a_tokenized_corpus(tmp_path, monkeypatch, capsys):
    """--corpus: a tokenized corpus folder (cggr_lab.corpus) read through memory maps, skip-semantics arms."""
    from cggr.cli import main
    from cggr_lab import corpus

    monkeypatch.setenv("CGGR_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text"
    text.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "and", "int", "return", "struct"]
    for i in range(40):
        (text / f"doc{i}.txt").write_text(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(400)))
    corpus.build(text, tmp_path / "corpus", vocab_size=300, seed=1, val_fraction=0.1, sample_chars=100_000,
                 cache_dir=tmp_path / "cache")
    argv = ["bench", "quality", "--model", "tiny", "--d-model", "32", "--layers", "4", "--heads", "2",
            "--seq-len", "32", "--batch-size", "2", "--steps", "3", "--evals", "1", "--eval-batches", "1",
            "--corpus", str(tmp_path / "corpus"), "--regimes", "pretrain",
            "--arms", "dense,random/inactive=skip/placement=per_block/dense_ends=1", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    rec = json.loads(next((tmp_path / "out").glob("quality-pretrain-*.json")).read_text())
    arms = {r["arm"]: r for r in rec["arms"]}
    assert arms["random/inactive=skip/placement=per_block/dense_ends=1"]["steps"] == 3
    assert arms["random/inactive=skip/placement=per_block/dense_ends=1"]["mean_depth_fraction"] < 1.0
    assert json.dumps(rec).count(str(tmp_path / "corpus")) >= 1  # the source is recorded
    capsys.readouterr()
    assert main(["bench", "quality", "--corpus", "x", "--data", "y", "--steps", "1"]) == 1
    assert "--corpus and --data both name corpus A" in capsys.readouterr().err
