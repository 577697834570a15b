"""benchmarks/parallel.py end to end on two CPU processes (gloo, fp32, a tiny Llama): what the 2-GPU run does."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parallel_benchmark_runs_and_routed_gradients_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "benchmarks", "parallel.py"), "--model", "tiny", "--steps", "2", "--warmup", "1",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("parallel-*.json")
    records = json.loads(path.read_text())
    timed = [r for r in records if r["arm"] != "gradient_check"]
    checks = [r for r in records if r["arm"] == "gradient_check"]
    assert {(r["parallel"], r["arm"]) for r in timed} == {(p, a) for p in ("ddp", "fsdp2") for a in ("dense", "cggr")}
    assert all(r["world_size"] == 2 and r["step_ms_median"] > 0 and r["git_rev"] for r in timed)
    # cggr_lab.provenance's record on every row, the device under the key the README's table reads.
    from cggr_lab.provenance import provenance

    expected = set(provenance()) - {"device"} | {"gpu"}
    assert all(expected <= set(r) and r["gpu"].startswith("cpu") for r in records)
    assert {r["parallel"] for r in checks} == {"ddp", "fsdp2"}
    for r in checks:
        assert r["ok"] and r["worst_rel_err"] < 1e-4, r
    assert "gradient" in done.stdout and "| tiny | ddp | 2 |" in done.stdout
