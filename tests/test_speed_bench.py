"""benchmarks/speed.py: the dense baselines beside the routed arms, best-dense speedups, failed and skipped
arms recorded (not fatal), and the results table rendered from such records."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import report, speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rec(arm, ms=None, model="350M", **extra):
    r = dict(model=model, batch=16, seq=1024, arm=arm, checkpointing=False, precision="bf16", gpu="NVIDIA H200",
             torch="2.11.0", transformers="5.1.0", triton="3.6.0", liger_kernel="0.8.5", git_rev="abcdef0123")
    if ms is not None:
        r.update(step_ms_median=ms, tokens_per_s=round(16 * 1024 / (ms / 1e3)), peak_mem_gib=20.0)
    r["flop_ratio_ceiling"] = None if arm in speed.DENSE_ARMS else 1.29
    return dict(r, **extra)


def _synthetic_run():
    """One configuration as a GPU run would record it: three dense arms, routed arms, two arms that failed."""
    group = [_rec("eager", 146.6), _rec("compile", 94.8), _rec("liger", 108.2), _rec("cggr", 107.3),
             _rec("full", 126.7),
             _rec("compile+cggr", error="BackendCompilerFailed: backend='inductor' raised:\nbool.view(uint8)",
                  failed_at="warm-up step"),
             _rec("liger+cggr", error="ValueError: cggr: the routed model's forward must return logits",
                  failed_at="warm-up step")]
    return speed.add_speedups(group)


def test_speedups_against_hf_eager_and_the_best_dense_arm():
    by = {r["arm"]: r for r in _synthetic_run()}
    assert all(r["best_dense_arm"] == "compile" for r in by.values())  # the fastest of eager, compile, liger
    assert by["cggr"]["speedup_vs_best_dense"] == pytest.approx(94.8 / 107.3, abs=1e-4)
    assert by["cggr"]["speedup_vs_dense"] == pytest.approx(146.6 / 107.3, abs=1e-4)
    assert by["compile"]["speedup_vs_best_dense"] == 1.0
    assert by["liger"]["speedup_vs_best_dense"] == pytest.approx(94.8 / 108.2, abs=1e-4)
    assert by["compile+cggr"]["speedup_vs_best_dense"] is None and by["compile+cggr"]["speedup_vs_dense"] is None
    assert by["eager"]["dense_arms_measured"] == ["eager", "compile", "liger"]


def test_best_dense_ignores_failed_dense_arms():
    group = speed.add_speedups([_rec("eager", 150.0), _rec("compile", error="boom", failed_at="warm-up step"),
                                _rec("cggr", 100.0)])
    assert {r["best_dense_arm"] for r in group} == {"eager"}
    assert group[2]["speedup_vs_best_dense"] == pytest.approx(1.5)
    assert group[0]["dense_arms_measured"] == ["eager"]


def test_speed_table_renders_new_arms_failures_and_legacy_rows():
    legacy = dict(model="1B", batch=8, seq=2048, arm="dense", checkpointing=False, step_ms_median=269.5,
                  tokens_per_s=60790, peak_mem_gib=34.52, flop_ratio_ceiling=1.30, speedup_vs_dense=1.0,
                  gpu="NVIDIA H100 80GB HBM3", torch="2.11.0+cu130", triton="3.6.0", git_rev="98dece2")
    table = report.speed_table(_synthetic_run() + [legacy])
    rows = {line.split(" | ")[3]: line for line in table.splitlines() if line.startswith("| 350M")}
    assert "| 94.8 |" in rows["compile"] and "| 1.546x | 1.000x (best dense) |" in rows["compile"]
    assert "| 107.3 |" in rows["cggr"] and "| 1.366x | 0.883x | 1.29x |" in rows["cggr"]
    assert "failed [1]" in rows["compile+cggr"] and "failed [2]" in rows["liger+cggr"]
    assert "[1] compile+cggr: failed at warm-up step: BackendCompilerFailed: backend='inductor' raised:" in table
    assert "bool.view(uint8)" not in table  # only the error's first line goes into the note; the JSON keeps all
    assert "[2] liger+cggr: failed at warm-up step: ValueError: cggr: the routed model's forward must return" in table
    legacy_row = next(line for line in table.splitlines() if line.startswith("| 1B"))
    assert legacy_row.endswith("| 269.5 | 60,790 | 34.52 | 1.000x | — | 1.30x |")
    assert "measured against HF eager only (NVIDIA H100 80GB HBM3, rev 98dece2)" in table
    assert "NVIDIA H200, torch 2.11.0, transformers 5.1.0, Liger-Kernel 0.8.5, Triton 3.6.0, rev abcdef0123" in table


def test_speed_table_marks_skipped_arms_with_the_reason():
    group = speed.add_speedups([_rec("eager", 10.0, model="tiny"),
                                _rec("liger", model="tiny", skipped="Liger-Kernel's Triton kernels need a CUDA device")])
    table = report.speed_table(group)
    assert "| liger | skipped [1] | — |" in table
    assert "[1] liger: skipped: Liger-Kernel's Triton kernels need a CUDA device" in table
    assert "HF eager only" not in table


def test_speed_headline_quotes_the_best_dense_arm():
    text = report.speed_headline(_synthetic_run())
    assert "On NVIDIA H200" in text and "0.88x (350M: 107.3 ms against compile's 94.8 ms)" in text
    assert "HF eager only" in report.speed_headline([_rec("cggr", 50.0, speedup_vs_dense=1.3)])


def test_speed_headline_quotes_the_fastest_of_the_routed_default_arms():
    """cggr's defaults on HF's model, on Liger's or under torch.compile: the headline quotes whichever ran
    fastest, naming it when it is not plain ``cggr``."""
    group = speed.add_speedups([_rec("liger", 177.7, model="1B"), _rec("compile", 200.0, model="1B"),
                                _rec("cggr", 150.0, model="1B"), _rec("liger+cggr", 145.7, model="1B"),
                                _rec("liger+full", 140.0, model="1B")])  # not a default arm: not quoted
    text = report.speed_headline(group)
    assert "1.22x (1B: liger+cggr, 145.7 ms against liger's 177.7 ms)" in text and "150.0" not in text


def test_training_loop_speedups_against_the_dense_arm_fastest_in_the_loop():
    """--loop records: each arm's loop ratio is against the dense arm fastest *in the loop* (which may not be the
    fastest isolated step), and the headline quotes it beside the isolated step's."""
    group = speed.add_speedups([_rec("compile", 101.2, loop_step_ms=100.4), _rec("liger", 95.5, loop_step_ms=105.0),
                                _rec("cggr", 93.7, loop_step_ms=94.8)])
    by = {r["arm"]: r for r in group}
    assert by["cggr"]["best_dense_arm"] == "liger" and by["cggr"]["loop_best_dense_arm"] == "compile"
    assert by["cggr"]["loop_speedup_vs_best_dense"] == pytest.approx(100.4 / 94.8, abs=1e-4)
    text = report.speed_headline(group)
    assert "1.02x (350M: 93.7 ms against liger's 95.5 ms; in the training loop 1.06x against compile)" in text


def test_speed_phases_table_shows_phases_host_issue_and_kernel_kinds():
    prof = dict(kernel_ms=140.0, kernel_ms_by_kind={"matmul": 92.0, "attention": 19.3,
                                                   "row-wise (Triton, Liger, Inductor)": 14.2, "optimizer": 10.2,
                                                   "copies and fills": 4.3})
    phases = dict(phase_ms=dict(forward=63.9, backward=77.9, optimizer=5.2),
                  issue_ms=dict(forward=58.2, backward=41.9, optimizer=2.3))
    records = [_rec("liger+cggr", 145.7, model="1B", profile=prof, **phases), _rec("liger", 177.7, model="1B", **phases),
               _rec("cggr", 80.0)]  # no phase times (an older record): no row
    table = report.speed_phases_table(records)
    rows = [line for line in table.splitlines() if line.startswith("| 1B")]
    assert rows[0] == "| 1B | liger+cggr | 145.7 | 63.9 | 77.9 | 5.2 | 41.9 | 92.0 | 19.3 | 14.2 | 14.5 | 140.0 |"
    assert rows[1].endswith("| 41.9 | — | — | — | — | — |") and len(rows) == 2
    assert "rev abcdef0123" in table
    assert "No committed speed run" in report.speed_phases_table([_rec("cggr", 80.0)])


def test_flop_ratio_ceiling_follows_the_planned_depths():
    L = 24
    assert speed.planned_depth_fraction(None, L) == 1.0
    assert speed.planned_depth_fraction(dict(num_buckets=1), L) == 1.0
    assert speed.planned_depth_fraction(dict(), L) == pytest.approx((24 + 18 + 12 + 6) / (4 * 24))
    assert speed.planned_depth_fraction(dict(num_buckets=2, depths=(1.0, 0.75)), L) == pytest.approx(42 / 48)
    # 3 layers, 2 buckets: depths ceil(1.5) = 2 and 3 blocks
    assert speed.planned_depth_fraction(dict(num_buckets=2), 3) == pytest.approx(5 / 6)
    hidden, layers, _, mlp, _, seq = speed.MODELS["350M"]
    assert speed.flop_ratio_ceiling(hidden, layers, mlp, seq, speed.VOCAB, 1.0) == pytest.approx(1.0)
    fractions = [0.25, 0.5, 0.625, 0.875]
    ceilings = [speed.flop_ratio_ceiling(hidden, layers, mlp, seq, speed.VOCAB, f) for f in fractions]
    assert ceilings == sorted(ceilings, reverse=True) and all(c > 1 for c in ceilings)


def test_a_failing_arm_is_recorded_with_its_error(monkeypatch):
    """An exception inside an arm (here cggr.attach refusing num_buckets=0) becomes a failed record."""
    monkeypatch.setitem(speed.ARMS, "cggr", speed.Arm("eager", dict(num_buckets=0), "invalid on purpose"))
    rec = speed.run_arm("tiny", "cggr", steps=1, warmup=0, checkpointing=False, device="cpu")
    assert rec["failed_at"] == "cggr.attach" and "num_buckets" in rec["error"]
    assert rec.get("step_ms_median") is None


def test_unknown_arm_names_the_allowed_ones(capsys):
    with pytest.raises(SystemExit):
        speed.main(["--device", "cpu", "--models", "tiny", "--arms", "eager,turbo"])
    err = capsys.readouterr().err
    assert "--arms: unknown 'turbo'" in err and "compile+cggr" in err


def test_cpu_smoke_run(tmp_path):
    """speed.py end to end on a tiny model, one process per arm: eager and cggr measured, Liger skipped with
    its reason (it needs CUDA), an arm stopped by --arm-timeout recorded as failed; the JSON carries the
    provenance and the best-dense figures. (``compile`` runs too, but Inductor's CPU build of the tiny
    model's training step takes about a minute of CPU time: too slow for this suite.)"""
    run = lambda arms, *extra: subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--device", "cpu", "--models", "tiny",
         "--arms", arms, "--steps", "2", "--warmup", "1", "--out", str(tmp_path), *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    r = run("eager,liger/cggr")  # two tiers
    assert r.returncode == 0, r.stderr[-3000:]
    assert [line.split()[3] for line in r.stdout.splitlines() if line.startswith("== ")] == ["eager:", "liger:", "cggr:"]
    r2 = run("compile", "--arm-timeout", "0.5")
    assert r2.returncode == 0, r2.stderr[-3000:]
    records = json.load(open(tmp_path / "speed-cpu.json"))
    by = {x["arm"]: x for x in records}
    assert [x["arm"] for x in records] == ["eager", "compile", "liger", "cggr"]  # ARMS order, merged
    for arm in ("eager", "cggr"):
        assert by[arm]["step_ms_median"] > 0 and len(by[arm]["step_ms"]) == 2 and by[arm]["tokens_per_s"] > 0
        assert by[arm]["best_dense_arm"] == "eager"
    assert by["cggr"]["speedup_vs_best_dense"] == pytest.approx(
        by["eager"]["step_ms_median"] / by["cggr"]["step_ms_median"], abs=1e-3)
    assert by["cggr"]["flop_ratio_ceiling"] > 1 and by["cggr"]["mean_depth_fraction"] < 1
    for arm in ("eager", "cggr"):  # where the step's time goes, per phase
        phases = by[arm]["phase_ms"]
        assert list(phases) == ["forward", "backward", "optimizer"] and all(ms > 0 for ms in phases.values())
        assert list(by[arm]["issue_ms"]) == list(phases)
    assert by["cggr"]["routing"] == dict(inactive="skip", placement="per_block", dense_ends=1)  # as resolved
    assert "routing" not in by["eager"]
    assert by["liger"]["skipped"] == "Liger-Kernel's Triton kernels need a CUDA device"
    assert "ran past --arm-timeout" in by["compile"]["error"] and by["compile"]["failed_at"] == "process"
    for key in ("gpu", "torch", "transformers", "triton", "liger_kernel", "git_rev", "command"):
        assert key in by["eager"]
    assert by["eager"]["gpu"] == "cpu" and "benchmarks.speed" in by["eager"]["command"]
    assert "| liger | skipped [1] |" in r.stdout and r.stdout.splitlines()[-1].startswith("| tiny | cggr |")


@pytest.mark.parametrize("name, kind", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", "attention"),
    ("void at::native::index_elementwise_kernel<128, 4>", "gather/scatter"),
    ("_rope_rows_backward_kernel", "row-wise (Triton, Liger, Inductor)"),
    ("triton_poi_fused__to_copy_add_index_mul_rsub_sigmoid_2", "row-wise (Triton, Liger, Inductor)"),  # gather fused in
    ("liger_cross_entropy_kernel", "loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("Memset (Device)", "copies and fills"),
    ("void at::native::vectorized_elementwise_kernel<8, add>", "elementwise and reductions"),
    ("some_unknown_kernel", "other"),
])
def test_kernel_kinds_of_a_profiled_step(name, kind):
    """The profile's summary sorts kernels into kinds by name, first match first: a Triton kernel is row-wise
    work even with a gather fused in (only a gather that runs alone counts as one)."""
    assert speed.kernel_kind(name) == kind


def test_records_say_which_row_kernels_ran(monkeypatch):
    """CGGR_ROW_KERNELS (inherited by every arm's process) is recorded: an A/B of the switch is two runs."""
    monkeypatch.delenv("CGGR_ROW_KERNELS", raising=False)
    assert speed.environment("cpu")["row_kernels"] == "triton"
    monkeypatch.setenv("CGGR_ROW_KERNELS", "inductor")
    assert speed.environment("cpu")["row_kernels"] == "inductor"


def test_gpu_run_script_names_existing_arms_and_parses():
    """benchmarks/gpu_run.sh is only ever run on the GPU machine: check here that bash parses it and that every
    arm it asks for exists, the dense baselines first."""
    path = os.path.join(ROOT, "benchmarks", "gpu_run.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read()
    arms = text.split('--arms "', 1)[1].split('"', 1)[0]
    tiers = [t.split(",") for t in arms.split("/")]
    assert all(arm in speed.ARMS for tier in tiers for arm in tier)
    assert tiers[0][:3] == ["eager", "compile", "liger"] and "cggr" in tiers[0]
    assert {"full", "light", "compile+cggr", "liger+cggr"} <= {arm for tier in tiers for arm in tier}
    # The CGGR_ROW_KERNELS A/B (ROWS_AB=1) times existing arms too, under the switch's allowed value.
    ab = text.split('--arms "')[2].split('"', 1)[0].split(",")
    assert all(arm in speed.ARMS for arm in ab) and "cggr" in ab
    assert "CGGR_ROW_KERNELS=inductor" in text


def test_gpu_quality_script_parses_and_runs_its_commands(tmp_path):
    """benchmarks/gpu_quality.sh (one GPU call of cggr bench quality): bash parses it and the wheel setup it
    sources; with a stand-in python3 on the PATH it runs each quoted command line in turn against the unpacked
    corpus, into its own folder, and packs one archive."""
    for script in ("gpu_quality.sh", "gpu_wheels.sh"):
        assert subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", script)]).returncode == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\necho \"python3 $*\" >> \"$CALLS\"\n")
    (fake / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", OUT=str(tmp_path / "out"), CALLS=str(tmp_path / "calls"))
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_quality.sh"), "--arms dense --steps 2",
                           "--arms random"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    runs = [c for c in calls if "cggr bench quality" in c]
    assert runs == [f"python3 -m cggr bench quality --corpus /tmp/corpus --out {tmp_path}/out/quality/run1 --arms dense "
                    "--steps 2", f"python3 -m cggr bench quality --corpus /tmp/corpus --out {tmp_path}/out/quality/run2 "
                    "--arms random"]
    assert (tmp_path / "out" / "quality.tgz").exists()


def test_cggr_arm_runs_the_defaults_and_stop_arm_the_seeds_routing():
    import cggr

    def config(arm):
        return cggr.RoutingConfig(**speed.arm_options(arm))

    assert config("cggr") == config("skip") == cggr.RoutingConfig(num_buckets=4, warmup_steps=0)
    assert (config("cggr").inactive, config("cggr").placement, config("cggr").dense_ends) == ("skip", "per_block", 1)
    assert config("stop") == cggr.RoutingConfig(num_buckets=4, warmup_steps=0, inactive="stop", placement="nested",
                                                 dense_ends=0)
    assert "defaults" in speed.ARMS["cggr"].doc and "seed's" in speed.ARMS["stop"].doc
    assert config("stop").placement == "nested" and config("full").placement == "nested"  # nothing to draw


def _summary_snippets():
    """The Python each GPU script runs last (``python3 - DIR <<'PY' ... PY``: the summary of its results)."""
    import re

    from pathlib import Path

    for script in sorted(Path(ROOT, "benchmarks").glob("gpu_*.sh")):
        for m in re.finditer(r'python3 - "\$(?:OUT|DIR)" <<\'PY\'\n(.*?)\nPY\n', script.read_text(), re.S):
            yield script.name, m.group(1)


@pytest.mark.parametrize("script,code", list(_summary_snippets()), ids=lambda v: v if v.endswith(".sh") else "")
def test_the_gpu_scripts_summaries_run_on_committed_results(script, code, tmp_path):
    """A summary that breaks is found out only on a lent GPU, after its run: here it reads committed results."""
    import shutil

    shutil.copy(os.path.join(ROOT, "benchmarks/results/speed-nvidia-h200-5b56522-accum8.json"), tmp_path / "speed-x.json")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "speed-x.json" in done.stdout and "| compile |" in done.stdout
