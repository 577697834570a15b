"""cggr_lab.quality (``cggr bench quality``): arm specs, the comparison figures, and a tiny end-to-end run on CPU."""

import json
import subprocess

import pytest
import torch

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
    assert "[finetune]" in out and "time to best dense's final loss" in out and "best dense arm: dense (" in out
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
            "--arms", "dense,random/inactive=skip/placement=per_block/dense_ends=1,random/inactive=stop",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    rec = json.loads(next((tmp_path / "out").glob("quality-pretrain-*.json")).read_text())
    arms = {r["arm"]: r for r in rec["arms"]}
    assert arms["random/inactive=skip/placement=per_block/dense_ends=1"]["steps"] == 3
    assert arms["random/inactive=skip/placement=per_block/dense_ends=1"]["mean_depth_fraction"] < 1.0
    # each routed arm records the routing it ran, cggr's defaults resolved
    assert arms["random/inactive=skip/placement=per_block/dense_ends=1"]["routing"] == dict(
        inactive="skip", placement="per_block", dense_ends=1)
    assert arms["random/inactive=stop"]["routing"] == dict(inactive="stop", placement="nested", dense_ends=0)
    assert "routing" not in arms["dense"]
    assert json.dumps(rec).count(str(tmp_path / "corpus")) >= 1  # the source is recorded
    capsys.readouterr()
    assert main(["bench", "quality", "--corpus", "x", "--data", "y", "--steps", "1"]) == 1
    assert "--corpus and --data both name corpus A" in capsys.readouterr().err


# --------------------------------------------------------------------------- dense bases: eager, compile, liger

def test_parse_arm_backends():
    assert parse_arm("dense")["backend"] == "eager"
    a = parse_arm("dense/compile=1/seed=1")
    assert a["backend"] == "compile" and a["seed"] == 1 and a["policy"] is None and a["attach"] == {}
    a = parse_arm("random/inactive=skip/placement=per_block/dense_ends=1/compile=1")
    assert a["backend"] == "compile" and a["attach"] == {"inactive": "skip", "placement": "per_block", "dense_ends": 1}
    assert parse_arm("random/liger=1")["backend"] == "liger" and parse_arm("dense/liger=1")["backend"] == "liger"
    a = parse_arm("ltd/keep=0.5/liger=1")
    assert a["backend"] == "liger" and a["ltd"] == {"start_keep": 0.5, "ramp": 0.7}
    assert parse_arm("random/compile=0")["backend"] == "eager"
    # an arm without routing options runs cggr's defaults: parse_arm adds none of its own
    assert parse_arm("random")["attach"] == {} and parse_arm("difficulty")["attach"] == {}
    assert parse_arm("random/inactive=stop")["attach"] == {"inactive": "stop"}
    assert parse_arm("random/placement=auto")["attach"] == {"placement": "auto"}


@pytest.mark.parametrize("spec,match", [
    ("dense/compile=2", r"bad value in compile='2' of 'dense/compile=2': compile takes 0 or 1"),
    ("dense/liger=yes", r"liger takes 0 or 1"),
    ("dense/compile=1/liger=1", r"'dense/compile=1/liger=1': compile=1 and liger=1 together are not offered"),
    ("random/liger=1/compile=1", r"compile=1 and liger=1 together"),
    ("ltd/compile=1", r"'ltd/compile=1': compile is not offered for ltd arms"),
    ("difficulty/liger=1", r"'difficulty/liger=1': liger=1 needs policy random"),
    ("sampled/liger=1", r"'sampled/liger=1': liger=1 needs policy random"),
    ("dense/compile=1/buckets=2", r"a dense arm takes only seed=, tokens=, compile= and liger="),
])
def test_parse_arm_backend_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_arm(spec)


def test_liger_arm_refused_on_cpu_before_training(tmp_path, capsys):
    """On a CPU (or without liger-kernel) a liger arm fails at config resolution, naming the arm."""
    from cggr.cli import main

    assert main(["bench", "quality", "--device", "cpu", "--steps", "1", "--arms", "dense,dense/liger=1",
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "--arms: 'dense/liger=1': liger=1 needs a CUDA device" in err and not (tmp_path / "out").exists()


def _rec(name, seed, ms, losses, backend=None, policy=None, seconds=None):
    """A hand-built arm record (the fields summarise reads); evaluations at steps 0, 5, 10."""
    seconds = seconds or [0.0, 5 * ms / 1e3, 10 * ms / 1e3]
    r = {"arm": name, "policy": policy, "seed": seed, "train_seconds": seconds, "step": [0, 5, 10],
         "val_loss": losses, "final_val_loss": losses[-1], "train_seconds_total": seconds[-1], "steps": 10,
         "step_ms_median": ms, "mean_depth_fraction": 1.0 if policy is None else 0.6}
    if backend is not None:  # files from before the compile and liger arms have no backend: eager
        r["backend"] = backend
    return r


def test_summarise_picks_the_best_dense_arm_at_equal_wall_clock():
    arms = [_rec("dense", 0, 100.0, [6, 4.0, 3.3]),  # no backend field: eager
            _rec("dense/seed=1", 1, 100.0, [6, 4.1, 3.4], "eager"),
            _rec("dense/compile=1", 0, 60.0, [6, 3.8, 3.0], "compile", seconds=[0.0, 0.5, 1.0]),
            _rec("dense/compile=1/seed=1", 1, 60.0, [6, 3.9, 3.05], "compile", seconds=[0.0, 0.5, 1.0]),
            _rec("dense/compile=1/seed=2", 2, 60.0, [6, 3.7, 2.9], "compile", seconds=[0.0, 0.5, 1.0]),
            _rec("random", 0, 50.0, [6, 3.5, 2.8], "eager", "random", seconds=[0.0, 0.4, 0.8]),
            _rec("random/compile=1", 0, 40.0, [6, 3.6, 3.2], "compile", "random", seconds=[0.0, 0.4, 0.8])]
    s = summarise(arms)
    # Seed 0 only (dense/compile=1/seed=2 is lower, but its weights and data order differ): compile at 3.0.
    assert s["best_dense_arm"] == "dense/compile=1" and s["best_dense_by"] == "final_val_loss"
    assert s["eager_dense_arm"] == "dense" and s["dense_final_val_loss"] == 3.0
    assert s["dense_seconds"] == 1.0 and s["dense_steps"] == 10
    assert s["dense_seed_spread_by_base"] == {"eager": pytest.approx(0.1), "compile": pytest.approx(0.15)}
    assert s["dense_seeds_by_base"] == {"eager": [0, 1], "compile": [0, 1, 2]}
    assert s["dense_seed_spread"] == pytest.approx(0.15)  # the best arm's base
    r = s["arms"]["random"]
    assert r["delta_vs_dense"] == pytest.approx(-0.2)
    assert r["speedup_vs_dense"] == pytest.approx(100 / 50) and r["speedup_vs_best_dense"] == pytest.approx(60 / 50)
    # 3.0 is crossed between 3.5 at 0.4 s and 2.8 at 0.8 s: 0.4 + 0.4 * 0.5 / 0.7 s, against the best's 1.0 s.
    assert r["seconds_to_dense_final"] == pytest.approx(0.4 + 0.4 * 0.5 / 0.7)
    assert r["time_to_dense_final_vs_dense"] == pytest.approx(0.4 + 0.4 * 0.5 / 0.7)
    assert r["steps_to_dense_final"] == pytest.approx(5 + 5 * 0.5 / 0.7)
    best = s["arms"]["dense/compile=1"]
    assert best["time_to_dense_final_vs_dense"] == pytest.approx(1.0) and best["speedup_vs_best_dense"] == 1.0
    assert best["speedup_vs_dense"] == pytest.approx(100 / 60) and best["backend"] == "compile"
    # HF eager never reaches the compiled arm's loss; a routed arm that stays above it never does either.
    assert s["arms"]["dense"]["seconds_to_dense_final"] is None
    assert s["arms"]["random/compile=1"]["time_to_dense_final_vs_dense"] is None
    assert s["arms"]["dense"]["delta_vs_dense"] == pytest.approx(0.3)
    # How far behind such an arm is: the best dense arm passed HF eager's 3.3 between 3.8 at 0.5 s and 3.0
    # at 1.0 s, and random/compile=1's 3.2 later; the routed arm's 2.8 it never reached.
    assert s["arms"]["dense"]["dense_time_to_this_final_vs_dense"] == pytest.approx(0.5 + 0.5 * 0.5 / 0.8)
    assert s["arms"]["random/compile=1"]["dense_time_to_this_final_vs_dense"] == pytest.approx(0.5 + 0.5 * 0.6 / 0.8)
    assert r["dense_time_to_this_final_vs_dense"] is None and best["dense_time_to_this_final_vs_dense"] == 1.0


def test_summarise_ties_and_missing_bases():
    # Equal steps: the bases run the same updates, their final losses differ by rounding: the fastest wins.
    arms = [_rec("dense", 0, 100.0, [6, 4.0, 3.0000], "eager"),
            _rec("dense/compile=1", 0, 70.0, [6, 4.0, 3.0001], "compile"),
            _rec("dense/liger=1", 0, 80.0, [6, 4.0, 2.9999], "liger")]
    s = summarise(arms, equal_steps=True)
    assert s["best_dense_arm"] == "dense/compile=1" and s["best_dense_by"] == "step_ms_median"
    assert s["dense_final_val_loss"] == 3.0001 and s["dense_seconds"] == pytest.approx(0.7)
    assert s["dense_seed_spread"] is None and s["dense_seed_spread_by_base"] == {"eager": None, "compile": None,
                                                                                  "liger": None}
    # Equal wall-clock with an exact tie of losses: the faster step wins.
    s = summarise([_rec("dense", 0, 100.0, [6, 4, 3], "eager"), _rec("dense/liger=1", 0, 90.0, [6, 4, 3], "liger")])
    assert s["best_dense_arm"] == "dense/liger=1"
    # No HF eager arm: no speedup against it, the best dense arm still the reference.
    s = summarise([_rec("dense/compile=1", 0, 60.0, [6, 4, 3], "compile"),
                   _rec("random", 0, 50.0, [6, 3.5, 2.9], "eager", "random")])
    assert s["eager_dense_arm"] is None and s["arms"]["random"]["speedup_vs_dense"] is None
    assert s["arms"]["random"]["speedup_vs_best_dense"] == pytest.approx(1.2)
    # Only dense arms of other seeds: they are the candidates.
    s = summarise([_rec("dense/seed=1", 1, 100.0, [6, 4, 3.2], "eager"),
                   _rec("dense/compile=1/seed=1", 1, 60.0, [6, 4, 3.1], "compile")])
    assert s["best_dense_arm"] == "dense/compile=1/seed=1"
    assert summarise([_rec("random", 0, 50.0, [6, 4, 3], "eager", "random")]) == {}


def test_format_table_names_the_best_dense_arm():
    from cggr_lab.quality import format_table

    arms = [_rec("dense", 0, 100.0, [6, 4.0, 3.3], "eager"), _rec("dense/seed=1", 1, 100.0, [6, 4.1, 3.4], "eager"),
            _rec("dense/compile=1", 0, 60.0, [6, 3.8, 3.0], "compile", seconds=[0.0, 0.5, 1.0]),
            _rec("random", 0, 50.0, [6, 3.5, 2.8], "eager", "random", seconds=[0.0, 0.4, 0.8])]
    table = format_table({"regime": "pretrain", "summary": summarise(arms)})
    assert "speed vs best dense" in table and "time to best dense's final loss" in table
    assert ("best dense arm: dense/compile=1 (lowest final loss, final val loss 3.0000); dense seed spread: "
            "eager 0.1000 (seeds 0,1), compile one seed") in table
    row = next(line for line in table.splitlines() if line.startswith("random "))
    assert row.split()[1:] == ["10", "50.0", "2.00x", "1.20x", "0.60", "2.8000", "-0.2000", "0.69x", "—"]
    row = next(line for line in table.splitlines() if line.startswith("dense "))
    assert row.split()[-2:] == ["never", "0.81x"]  # compile passed eager's 3.3 at 0.5 + 0.5 * 0.5 / 0.8 s


def test_quality_bench_compiled_dense_arm(tmp_path, monkeypatch):
    """A dense arm under torch.compile (Inductor, CPU C++ code) trains end to end beside HF eager: warmed up
    outside its budget, the same updates as eager (fp32: equal to 1e-4, Inductor reorders sums), and the
    summary's reference is the faster of the two at equal steps."""
    from cggr.cli import main

    monkeypatch.setenv("CGGR_CACHE", str(tmp_path / "cache"))
    a = _corpus(tmp_path / "a.txt", ["alpha", "beta", "gamma", "delta", "the", "of", "and"])
    argv = ["bench", "quality", "--model", "tiny", "--d-model", "32", "--layers", "2", "--heads", "2",
            "--seq-len", "32", "--batch-size", "2", "--vocab-size", "300", "--steps", "3", "--evals", "1",
            "--eval-batches", "1", "--data", a, "--arms", "dense,dense/compile=1", "--device", "cpu",
            "--out", str(tmp_path / "out")]
    torch._dynamo.utils.counters.clear()
    assert main(argv) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really compiled
    rec = json.loads((tmp_path / "out" / "quality-pretrain-tiny-a-3steps.json").read_text())
    arms = {r["arm"]: r for r in rec["arms"]}
    eager, compiled = arms["dense"], arms["dense/compile=1"]
    assert compiled["backend"] == "compile" and eager["backend"] == "eager"
    assert compiled["steps"] == 3 and compiled["untimed_warmup_seconds"] > eager["untimed_warmup_seconds"] > 0
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)
    s = rec["summary"]
    assert s["best_dense_arm"] == min(arms.values(), key=lambda r: r["step_ms_median"])["arm"]
    assert s["best_dense_by"] == "step_ms_median" and s["eager_dense_arm"] == "dense"
    assert s["arms"][s["best_dense_arm"]]["time_to_dense_final_vs_dense"] == pytest.approx(1.0)


def test_report_renders_best_dense_summaries_and_old_ones():
    """benchmarks/report.py: a summary naming the best dense arm gets its columns; an older one stays as it was."""
    from benchmarks import report

    arms = [_rec("dense", 0, 100.0, [6, 4.0, 3.3], "eager"), _rec("dense/seed=1", 1, 100.0, [6, 4.1, 3.4], "eager"),
            _rec("dense/compile=1", 0, 60.0, [6, 3.8, 3.0], "compile", seconds=[0.0, 0.5, 1.0]),
            _rec("random", 0, 50.0, [6, 3.5, 2.8], "eager", "random", seconds=[0.0, 0.4, 0.8])]
    for a in arms:
        a["step_ms"] = [a["step_ms_median"]] * 10
    arms.append({"arm": "random/compile=1", "policy": "random", "seed": 0, "backend": "compile",
                 "error": "BackendCompilerFailed: boom\nmore", "failed_at": "warm-up"})
    run = {"config": {"budget": {"seconds": 1.0}, "model": "tiny", "d_model": 64, "layers": 4, "batch_size": 4,
                      "seq_len": 64}, "regime": "pretrain", "corpus": "A", "data": {"A": {"source": "x/a.txt"}},
           "_file": "q.json", "device": "cpu", "git_rev": "abcdef0", "arms": arms, "summary": summarise(arms)}
    table = report.quality_table([run])
    assert "| speed vs HF eager | speed vs best dense |" in table and "time to best dense's final loss |" in table
    assert "| random | 10 | 50.0 | 2.00x | 1.20x | 0.60 | 2.8000 | -0.2000 | 0.69x | — |" in table
    assert "| dense | 10 | 100.0 | 1.00x | 0.60x | 1.00 | 3.3000 | +0.3000 | never | 0.81x |" in table
    assert "processes" not in table
    merged = dict(run, merged_from=[{"timestamp": "t"}] * 3)
    assert ", rev abcdef0; its arms ran in 3 processes, each alone on its GPU, merged by `--merge` ([plot](q.png))" \
        in report.quality_table([merged])
    assert ("Reference: the best dense arm of seed 0, `dense/compile=1` (the lowest final loss; final loss 3.0000). "
            "Dense seed-to-seed spread (max - min of the final losses) per base: eager 0.1000 (seeds 0, 1); "
            "compile not measured (one seed).") in table
    assert "random/compile=1: failed at warm-up: BackendCompilerFailed: boom" in table
    assert "| random/compile=1 |" not in table
    old = dict(run, summary={k: v for k, v in run["summary"].items() if k in ("dense_seed_spread", "arms")})
    table = report.quality_table([old])
    assert "| speed vs dense | mean depth |" in table and "| random | 10 | 50.0 | 2.00x | 0.60 |" in table


def test_a_failing_arm_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """torch.compile raising (as Inductor can on a routed model) fails that arm only: recorded with its stage
    and error, left out of the summary, named in the table; the JSON is written after every arm."""
    import cggr_lab.training
    from cggr.cli import main

    monkeypatch.setenv("CGGR_CACHE", str(tmp_path / "cache"))

    def no_compile(model, *args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", no_compile)
    a = _corpus(tmp_path / "a.txt", ["alpha", "beta", "gamma", "delta", "the", "of", "and"])
    argv = ["bench", "quality", "--model", "tiny", "--d-model", "32", "--layers", "2", "--heads", "2",
            "--seq-len", "32", "--batch-size", "2", "--vocab-size", "300", "--steps", "2", "--evals", "1",
            "--eval-batches", "1", "--data", a, "--device", "cpu", "--out", str(tmp_path / "out")]
    assert main(argv + ["--arms", "dense,dense/compile=1,random"]) == 0
    captured = capsys.readouterr()
    assert "failed: dense/compile=1: failed at torch.compile: RuntimeError: no compiler here" in captured.out
    assert "dense/compile=1              FAILED at torch.compile: RuntimeError: no compiler here" in captured.err
    path = tmp_path / "out" / "quality-pretrain-tiny-a-2steps.json"
    rec = json.loads(path.read_text())
    arms = {r["arm"]: r for r in rec["arms"]}
    assert arms["dense/compile=1"]["failed_at"] == "torch.compile" and "no compiler here" in arms["dense/compile=1"]["error"]
    assert arms["random"]["steps"] == 2 and "partial" not in rec
    assert set(rec["summary"]["arms"]) == {"dense", "random"} and rec["summary"]["best_dense_arm"] == "dense"
    assert set(rec["summary"]["failed_arms"]) == {"dense/compile=1"}
    # A run cut short (here: interrupted in its third arm) keeps the arms that finished.
    real_train_arm, calls = cggr_lab.training.train_arm, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train_arm(*args, **kwargs)

    monkeypatch.setattr(cggr_lab.training, "train_arm", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(argv + ["--arms", "dense,random,sampled", "--out", str(tmp_path / "cut")])
    rec = json.loads((tmp_path / "cut" / "quality-pretrain-tiny-a-2steps.json").read_text())
    assert rec["partial"] is True and [r["arm"] for r in rec["arms"]] == ["dense", "random"]


def test_liger_patches_of_the_modeling_module_are_undone(monkeypatch):
    """Liger-Kernel replaces functions and classes of the family's modeling module for the whole process; the
    arm's undo restores them (later arms are built without Liger). Liger itself needs CUDA: a stand-in
    patch function here, registered where the real one is looked up."""
    import sys
    import types

    from transformers.models.llama import modeling_llama

    from cggr_lab.liger import LIGER_OPTIONS
    from cggr_lab.quality import _apply_liger
    from cggr_lab.training import build_llama

    seen = {}

    def fake_apply(model, **options):
        seen.update(options)
        modeling_llama.apply_rotary_pos_emb = "liger rope"
        modeling_llama.LlamaRMSNorm = "liger norm"
        modeling_llama.liger_added = True
        model.forward = "liger forward"

    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": fake_apply}
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)
    before = dict(vars(modeling_llama))
    _, model = build_llama(32, 2, 2, 100, 16, 0)
    undo = _apply_liger(model)
    assert seen == LIGER_OPTIONS and modeling_llama.LlamaRMSNorm == "liger norm" and model.forward == "liger forward"
    undo()
    assert dict(vars(modeling_llama)) == before and not hasattr(modeling_llama, "liger_added")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {}
    with pytest.raises(ValueError, match="liger=1: Liger-Kernel has no patch for model_type 'llama'"):
        _apply_liger(model)


def test_results_of_parallel_processes_merge_into_one_comparison(tmp_path, monkeypatch, capsys):
    """Arms split over two processes (one per GPU) give one file whose summary is the one of all arms run in
    one process; files of another configuration, partial files and repeated arms are refused."""
    from cggr.cli import main

    monkeypatch.setenv("CGGR_CACHE", str(tmp_path / "cache"))
    a = _corpus(tmp_path / "a.txt", ["one", "two", "three", "four"])
    base = ["bench", "quality", "--model", "tiny", "--d-model", "32", "--layers", "3", "--heads", "2",
            "--seq-len", "32", "--batch-size", "2", "--vocab-size", "300", "--eval-batches", "1", "--data", a,
            "--steps", "3", "--evals", "1"]
    assert main(base + ["--arms", "dense,dense/seed=1", "--out", str(tmp_path / "gpu0")]) == 0
    assert main(base + ["--arms", "random/inactive=skip/placement=per_block/dense_ends=1,ltd",
                        "--out", str(tmp_path / "gpu1")]) == 0
    assert main(base + ["--arms", "dense,dense/seed=1,random/inactive=skip/placement=per_block/dense_ends=1,ltd",
                        "--out", str(tmp_path / "one")]) == 0
    name = "quality-pretrain-tiny-a-3steps.json"
    parts = [str(tmp_path / d / name) for d in ("gpu0", "gpu1")]
    capsys.readouterr()
    assert main(["bench", "quality", "--merge", *parts, "--out", str(tmp_path / "merged"), "--tag", "m"]) == 0
    assert "merged 2 files (4 arms)" in capsys.readouterr().out
    merged = json.loads((tmp_path / "merged" / "quality-pretrain-tiny-a-3steps-m.json").read_text())
    assert (tmp_path / "merged" / "quality-pretrain-tiny-a-3steps-m.png").exists()
    one = json.loads((tmp_path / "one" / name).read_text())
    assert [r["arm"] for r in merged["arms"]] == [r["arm"] for r in one["arms"]]
    assert [s["arms"] for s in merged["merged_from"]] == [["dense", "dense/seed=1"],
                                                         ["random/inactive=skip/placement=per_block/dense_ends=1", "ltd"]]
    for m, o in zip(merged["arms"], one["arms"]):  # same weights, batches and routing in either process
        assert m["source"]["file"] == name and m["val_loss"] == pytest.approx(o["val_loss"], abs=1e-4)
    assert merged["command"].startswith("cggr bench quality --merge") and merged["git_rev"] == one["git_rev"]
    assert merged["summary"]["best_dense_arm"] == "dense"
    assert merged["summary"]["arms"].keys() == one["summary"]["arms"].keys()
    assert merged["summary"]["dense_seed_spread"] == pytest.approx(one["summary"]["dense_seed_spread"], abs=1e-4)

    assert main(base[:-4] + ["--steps", "2", "--evals", "1", "--arms", "random", "--out", str(tmp_path / "other")]) == 0
    refusals = [([parts[0], str(tmp_path / "other" / "quality-pretrain-tiny-a-2steps.json")], "differ in budget"),
                ([parts[0], parts[0]], "arm names repeat"), ([parts[0]], "at least two result files")]
    partial = json.loads(open(parts[1]).read())
    partial["partial"] = True
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    refusals.append(([parts[0], str(tmp_path / "partial.json")], "is partial"))
    for files, said in refusals:
        assert main(["bench", "quality", "--merge", *files, "--out", str(tmp_path / "x")]) == 1
        assert said in capsys.readouterr().err


def test_arms_run_on_several_devices_at_once_and_merge(tmp_path, monkeypatch, capsys):
    """--devices deals the arms round-robin over one process per device, started together, and merges their
    files: the same arms, in the order given, with the curves of a single-process run; bad lists are refused
    before anything trains."""
    from cggr.cli import main

    monkeypatch.setenv("CGGR_CACHE", str(tmp_path / "cache"))
    a = _corpus(tmp_path / "a.txt", ["one", "two", "three", "four"])
    base = ["bench", "quality", "--model", "tiny", "--d-model", "32", "--layers", "3", "--heads", "2",
            "--seq-len", "32", "--batch-size", "2", "--vocab-size", "300", "--eval-batches", "1", "--data", a,
            "--steps", "3", "--evals", "1", "--regimes", "pretrain,continued", "--pretrain-steps", "2",
            "--arms", "dense,random,dense/seed=1"]
    assert main(base + ["--out", str(tmp_path / "one"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "two"), "--devices", "cpu,cpu", "--tag", "par"]) == 0
    out = capsys.readouterr().out
    assert "cpu: cggr bench quality" in out and "merged 3 files (3 arms)" in out
    for regime in ("pretrain", "continued"):
        one = json.loads((tmp_path / "one" / f"quality-{regime}-tiny-a-3steps.json").read_text())
        two = json.loads((tmp_path / "two" / f"quality-{regime}-tiny-a-3steps-par.json").read_text())
        assert [r["arm"] for r in two["arms"]] == ["dense", "random", "dense/seed=1"]
        # One process per arm (dealt round-robin: dense and dense/seed=1 to the first device, one after another).
        assert [s["arms"] for s in two["merged_from"]] == [["dense"], ["random"], ["dense/seed=1"]]
        assert "--devices" not in two["merged_from"][0]["command"] and "--device cpu" in two["merged_from"][0]["command"]
        for r, o in zip(two["arms"], one["arms"]):
            assert r["val_loss"] == pytest.approx(o["val_loss"], abs=1e-4)
    # An arm whose process fails is named; the others are merged all the same.
    real_run = subprocess.run

    def fail_random(argv, **kw):
        return subprocess.CompletedProcess(argv, 3) if "random" in argv else real_run(argv, **kw)

    monkeypatch.setattr(subprocess, "run", fail_random)
    assert main(base + ["--out", str(tmp_path / "three"), "--devices", "cpu,cpu"]) == 1
    assert "1 arm(s) failed: random on cpu (exit 3" in capsys.readouterr().err
    three = json.loads((tmp_path / "three" / "quality-pretrain-tiny-a-3steps.json").read_text())
    assert [r["arm"] for r in three["arms"]] == ["dense", "dense/seed=1"]
    monkeypatch.setattr(subprocess, "run", real_run)
    for devices, said in [("cpu", "at least two devices"), ("cuda:0,cuda:0", "names a GPU twice"),
                          ("cpu,gpu1", "'gpu1' is not a device")]:
        assert main(base + ["--out", str(tmp_path / "x"), "--devices", devices]) == 1
        assert said in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_tokens_per_step_axis_learning_rate_rule_and_smaller_batch_control(tmp_path, capsys):
    """--tokens-per-step: one file per size, each step accumulating its micro-batches; every arm's learning rate by
    the one rule (sqrt of the micro-batches, capped); a dense/tokens=F arm runs fewer tokens per step and is a
    control beside the best dense arm, not the reference; arms under 300 steps are named short."""
    from cggr.cli import main
    from cggr_lab import quality as q

    assert q._token_counts("512, 1K,2M") == [512, 1024, 2 * 1024 ** 2]
    for bad in ("0", "12X", "1K,1024"):
        with pytest.raises(ValueError, match="--tokens-per-step"):
            q._token_counts(bad)
    cfg = dict(batch_size=2, seq_len=32, lr=1e-3, lr_scaling="sqrt", lr_max_scale=4.0)
    assert q.lr_at(cfg, 64) == pytest.approx(1e-3) and q.lr_at(cfg, 256) == pytest.approx(2e-3)
    assert q.lr_at(cfg, 64 * 100) == pytest.approx(4e-3)  # capped
    assert q.lr_at(dict(cfg, lr_scaling="none"), 256) == pytest.approx(1e-3)
    out = tmp_path / "out"
    argv = ["bench", "quality", "--model", "tiny", "--d-model", "32", "--layers", "3", "--heads", "2",
            "--seq-len", "32", "--batch-size", "2", "--vocab-size", "300", "--steps", "2", "--evals", "1",
            "--eval-batches", "1", "--tokens-per-step", "128,256", "--arms",
            "dense,dense/tokens=0.5,random/estimator=unbiased", "--out", str(out)]
    assert main(argv) == 0
    assert "ran fewer than 300 optimizer steps" in capsys.readouterr().out
    for size, accum in ((128, 2), (256, 4)):
        (path,) = out.glob(f"quality-pretrain-tiny-*-tps{size}.json")
        rec = json.loads(path.read_text())
        assert rec["config"]["tokens_per_step"] == size and rec["config"]["accum"] == accum
        arms = {a["arm"]: a for a in rec["arms"]}
        assert arms["dense"]["tokens_per_step"] == size and arms["dense"]["accum"] == accum
        assert arms["dense/tokens=0.5"]["tokens_per_step"] == size // 2
        assert arms["dense"]["lr"] == pytest.approx(3e-3 * (accum ** 0.5))  # the tiny preset's 3e-3
        assert arms["dense/tokens=0.5"]["lr"] == pytest.approx(3e-3 * ((accum // 2) ** 0.5))
        s = rec["summary"]
        assert s["best_dense_arm"] == "dense" and set(s["short_arms"]) == set(arms)
        # Two micro-batches per step, each its own routing: the router counted both forwards.
        assert arms["random/estimator=unbiased"]["routing"]["estimator"] == "unbiased"
    with pytest.raises(ValueError, match="whole number"):
        q.resolve_config(q.add_quality_arguments(__import__("argparse").ArgumentParser()).parse_args(
            ["--device", "cpu", "--model", "tiny", "--tokens-per-step", "256", "--arms", "dense/tokens=0.3"]))
