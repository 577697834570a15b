"""benchmarks/parallel.py end to end on two CPU processes (gloo, fp32, a tiny Llama): what the 2-GPU run does."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parallel_benchmark_runs_and_routed_gradients_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    # The arms a CPU runs (Inductor included; Liger needs a GPU: recorded as skipped), every gradient check.
    arms = ("eager", "compile", "liger", "cggr", "compile+cggr", "stop")  # cggr: its defaults; stop: the seed's
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "benchmarks.parallel", "--model", "tiny", "--steps", "2", "--warmup", "1",
           "--arms", ",".join(arms), "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("parallel-*.json")
    records = json.loads(path.read_text())
    timed = [r for r in records if r["arm"] != "gradient_check" and not r.get("skipped")]
    skipped = [r for r in records if r.get("skipped")]
    checks = [r for r in records if r["arm"] == "gradient_check"]
    ran = [a for a in arms if a != "liger"]
    assert {(r["parallel"], r["arm"]) for r in timed} == {(p, a) for p in ("ddp", "fsdp2") for a in ran}
    assert {(r["parallel"], r["arm"]) for r in skipped} == {("ddp", "liger"), ("fsdp2", "liger")}
    assert all("CUDA" in r["skipped"] for r in skipped)
    assert all(r["world_size"] == 2 and r["step_ms_median"] > 0 and r["git_rev"] for r in timed)
    for r in timed:  # the speedups of the same mode: against HF eager and the fastest dense arm that ran
        same = {x["arm"]: x["step_ms_median"] for x in timed if x["parallel"] == r["parallel"]}
        best = min(("eager", "compile"), key=same.get)
        assert r["best_dense_arm"] == best
        assert abs(r["speedup_vs_best_dense"] - same[best] / r["step_ms_median"]) < 1e-3
        assert abs(r["speedup_vs_dense"] - same["eager"] / r["step_ms_median"]) < 1e-3
    # cggr_lab.provenance's record on every row, the device under the key the results table reads.
    from cggr_lab.provenance import provenance

    expected = set(provenance()) - {"device"} | {"gpu"}
    assert all(expected <= set(r) and r["gpu"].startswith("cpu") for r in records)
    assert {(r["parallel"], r["semantics"]) for r in checks} == {(p, s) for p in ("ddp", "fsdp2")
                                                                 for s in ("stop", "skip")}
    for r in timed:
        assert ("routing" in r) == (r["arm"] in ("cggr", "compile+cggr", "stop"))
    assert {r["routing"]["inactive"] for r in timed if r["arm"] == "stop"} == {"stop"}
    for r in checks:
        assert r["ok"] and r["worst_rel_err"] < 1e-4, r
        assert r["routing"] == (dict(inactive="stop", placement="nested", dense_ends=0) if r["semantics"] == "stop"
                                else dict(inactive="skip", placement="per_block", dense_ends=1)), r
    assert "gradient" in done.stdout and "| tiny | ddp | 2 |" in done.stdout and "skipped [1]" in done.stdout
