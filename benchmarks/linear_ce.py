"""GPU benchmark of cggr's fused linear cross-entropy (loss + difficulty scores) against the alternatives.

    python -m benchmarks.linear_ce --out benchmarks/results

For each hidden size (N tokens, vocabulary V, bf16 by default), one training
step of the LM head and loss (forward + backward into hidden, weight) by:

* ``materialised``        ``F.linear`` -> ``F.cross_entropy(logits.float())`` (what HF models do), no scores
* ``materialised+scores`` the same plus ``cggr.score_difficulty(logits)`` (what cggr needs today)
* ``cggr-fused``          ``cggr.loss.linear_cross_entropy`` (loss and scores, no ``[N, V]`` logits)
* ``liger-fused``         ``LigerFusedLinearCrossEntropyLoss`` when liger-kernel is importable (loss only)

Median ms of forward + backward (CUDA events, after warm-up), and peak memory
allocated during one step above what the inputs already hold. Before timing,
cggr-fused is checked against ``cggr.loss.linear_cross_entropy_reference``
(loss, scores, gradients; ``max_rel_err`` = max |got - ref| / max |ref| per
tensor, worst of all); a result off by more than 2e-2 is marked MISMATCH.
Writes ``linear-ce-<gpu>.json`` into ``--out`` and prints a markdown table last.
"""

from __future__ import annotations

if not __package__:  # run by path: this folder would shadow installed packages (benchmarks/__init__.py)
    raise SystemExit("run it from the repository root as a module: python -m benchmarks.linear_ce ...")

import argparse
import json
import re
import subprocess
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from cggr.env import git_rev_override
from cggr.loss import linear_cross_entropy, linear_cross_entropy_reference
from cggr.scoring import score_difficulty

ROOT = Path(__file__).resolve().parents[1]

MISMATCH_TOL = 2e-2  # bf16 gradients differ from the reference by a few bf16 ulps (2^-8 each) at most


def _git_rev() -> str | None:
    if git_rev_override():
        return git_rev_override()
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _inputs(n: int, d: int, v: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, d, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[torch.rand(n, device="cuda", generator=g) < 0.1] = -100
    return hidden, weight, labels


def _arms(hidden, weight, labels):
    def materialised():
        logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), labels)

    def materialised_scores():
        logits = F.linear(hidden, weight)
        score_difficulty(logits.detach())
        return F.cross_entropy(logits.float(), labels)

    def cggr_fused():
        return linear_cross_entropy(hidden, weight, labels).loss

    arms = {"materialised": materialised, "materialised+scores": materialised_scores, "cggr-fused": cggr_fused}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        arms["liger-fused"] = lambda: liger(weight, hidden, labels)
    except Exception as e:  # not installed, or an incompatible version
        print(f"liger-fused skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return arms


def _step(fn, params):
    for p in params:
        p.grad = None
    fn().backward()


def _time_ms(fn, params, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        _step(fn, params)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(fn, params)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _peak_mb(fn, params) -> float:
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(fn, params)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    if not torch.equal(got.isnan(), ref.isnan()):
        return float("inf")
    fin = ref.isfinite()
    if not fin.any():
        return 0.0
    return float((got[fin] - ref[fin]).abs().max() / ref[fin].abs().max().clamp_min(1e-12))


def _check(hidden, weight, labels) -> float:
    got = linear_cross_entropy(hidden, weight, labels)
    ref = linear_cross_entropy_reference(hidden, weight, labels)
    errs = [_rel_err(got.loss.detach(), ref.loss.detach())]
    errs += [_rel_err(g, r) for g, r in zip(got.scores, ref.scores)]
    gg = torch.autograd.grad(got.loss, (hidden, weight))
    gr = torch.autograd.grad(ref.loss, (hidden, weight))
    errs += [_rel_err(a, b) for a, b in zip(gg, gr)]
    return max(errs)


def bench(n: int, d: int, v: int, dtype: torch.dtype, warmup: int, iters: int) -> list[dict]:
    hidden, weight, labels = _inputs(n, d, v, dtype)
    params = (hidden, weight)
    err = _check(hidden, weight, labels)
    records = []
    for name, fn in _arms(hidden, weight, labels).items():
        rec = dict(arm=name, n=n, d=d, v=v, dtype=str(dtype).replace("torch.", ""), ms_median=None, peak_mb=None,
                   max_rel_err=err if name == "cggr-fused" else None)
        try:
            rec["ms_median"] = _time_ms(fn, params, warmup, iters)
            rec["peak_mb"] = _peak_mb(fn, params)
        except Exception:  # an arm that fails (out of memory, a compile error) must not sink the others
            traceback.print_exc()
        records.append(rec)
        print(json.dumps(rec), flush=True)
        torch.cuda.empty_cache()
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384, help="tokens (rows)")
    ap.add_argument("--d", type=int, nargs="+", default=[1024, 2048], help="hidden sizes")
    ap.add_argument("--v", type=int, default=32000, help="vocabulary size")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for linear-ce-<gpu>.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/linear_ce.py needs a CUDA GPU")

    import triton

    gpu = torch.cuda.get_device_name()
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, git_rev=_git_rev(),
                command="python " + " ".join(sys.argv))
    dtype = getattr(torch, args.dtype)
    records = []
    for d in args.d:
        for rec in bench(args.n, d, args.v, dtype, args.warmup, args.iters):
            rec.update(meta)
            records.append(rec)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    path = out / f"linear-ce-{slug}.json"
    path.write_text(json.dumps(records, indent=2) + "\n")
    print(f"\nwrote {path}\n")
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}; "
          "forward + backward of the LM head and loss\n")
    print("| N x D x V | dtype | arm | ms (median) | peak MB above inputs | vs materialised+scores | max rel err |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in records:
        base = next((b for b in records if b["arm"] == "materialised+scores" and b["d"] == r["d"]), None)
        ratio = (f"{r['ms_median'] / base['ms_median']:.2f}x" if base and base["ms_median"] and r["ms_median"]
                 else "—")
        err = r["max_rel_err"]
        err_s = "—" if err is None else (f"{err:.2e}" + (" MISMATCH" if err > MISMATCH_TOL else ""))
        ms = "failed" if r["ms_median"] is None else f"{r['ms_median']:.2f}"
        mb = "—" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        print(f"| {r['n']}x{r['d']}x{r['v']} | {r['dtype']} | {r['arm']} | {ms} | {mb} | {ratio} | {err_s} |")


if __name__ == "__main__":
    main()
