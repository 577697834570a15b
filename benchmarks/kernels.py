"""GPU micro-benchmark of cggr's Triton kernels against their PyTorch references.

    python -m benchmarks.kernels --out benchmarks/results

For each kernel at realistic sizes: checks the result against the reference,
times kernel, eager reference and (for scoring) ``torch.compile`` of the
reference with ``triton.testing.do_bench`` (median ms), and writes
``kernels-<gpu>.json`` into ``--out``: a list of records

    kernel, shape, dtype, ms_median, gb_per_s, reference_ms, compiled_ms,
    max_rel_err, kernel_ms, and the provenance of cggr_lab.provenance (gpu: the device;
    git_rev, git_dirty, torch, transformers, triton, python, command, timestamp)

``ms_median`` is ``do_bench``'s time on the CUDA stream, which includes any
gap left by Python launch overhead when the GPU work is shorter than it (the
small bucketing kernel); ``kernel_ms`` is the GPU time of the kernels alone
(torch.profiler, summed per call), i.e. what a step pays when the CPU runs
ahead. ``gb_per_s`` is computed from ``ms_median`` and counts the bytes the kernel must move at least once: the logits
read for scoring; scores and mask read plus buckets written for bucketing;
gradient read plus result written for the gate. ``max_rel_err`` is
``max |kernel - reference| / max(|reference|, 1e-3)`` over the finite outputs
(NaN positions must agree, else it is ``inf``); for bucketing it is the
fraction of tokens whose bucket differs from the exact reference.
A markdown table of the records is printed last.
"""

from __future__ import annotations

if not __package__:  # run by path: this folder would shadow installed packages (benchmarks/__init__.py)
    raise SystemExit("run it from the repository root as a module: python -m benchmarks.kernels ...")

import argparse
import json
import re
import sys
import traceback
from pathlib import Path

import torch

import triton
from triton.testing import do_bench

from cggr.bucketing import rank_buckets_reference
from cggr.gate import gate_rows_reference
from cggr.kernels.bucketing import rank_buckets_triton
from cggr.kernels.gate import gate_rows_triton
from cggr.kernels.scoring import entropy_confidence_triton
from cggr.scoring import entropy_confidence_reference
from cggr_lab.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def _ms(fn, rep: int = 200) -> float:
    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def _try_ms(fn, rep: int = 200) -> float | None:
    try:
        fn()
        torch.cuda.synchronize()
        return _ms(fn, rep)
    except Exception:  # a compile or launch failure must not sink the other numbers
        traceback.print_exc()
        return None


def _kernel_ms(fn, iters: int = 20) -> float | None:
    """GPU time of the kernels ``fn`` launches, per call (None if the profiler fails)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        return sum(e.self_device_time_total for e in prof.key_averages()) / iters / 1e3
    except Exception:
        traceback.print_exc()
        return None


def _max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    if not torch.equal(torch.isnan(got), torch.isnan(ref)):
        return float("inf")
    fin = torch.isfinite(ref)
    if not fin.any():
        return 0.0
    err = (got[fin] - ref[fin]).abs() / ref[fin].abs().clamp_min(1e-3)
    return float(err.max())


def bench_scoring(rows: int, vocab: int, dtype: torch.dtype, compile_ref: bool) -> dict:
    torch.manual_seed(0)
    logits = (torch.randn(rows, vocab, device="cuda", dtype=torch.float32) * 2.0).to(dtype)
    got = entropy_confidence_triton(logits)
    ref = entropy_confidence_reference(logits)
    err = max(_max_rel_err(g, r) for g, r in zip(got, ref))
    ms = _ms(lambda: entropy_confidence_triton(logits))
    kernel_ms = _kernel_ms(lambda: entropy_confidence_triton(logits))
    ref_ms = _try_ms(lambda: entropy_confidence_reference(logits), rep=100)
    compiled_ms = None
    if compile_ref:
        compiled = torch.compile(entropy_confidence_reference)
        compiled_ms = _try_ms(lambda: compiled(logits), rep=100)
    nbytes = logits.numel() * logits.element_size()
    return dict(kernel="entropy_confidence", shape=[rows, vocab], dtype=str(dtype).replace("torch.", ""),
                ms_median=ms, gb_per_s=nbytes / ms / 1e6, reference_ms=ref_ms, compiled_ms=compiled_ms, max_rel_err=err,
                kernel_ms=kernel_ms)


def bench_bucketing(n: int, num_buckets: int, case: str) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    valid = torch.rand(n, device="cuda", generator=g) > 0.1
    if case == "randn":
        scores = torch.randn(n, device="cuda", generator=g) * 2.0 + 5.0
    elif case == "tied":
        scores = torch.full((n,), 3.0, device="cuda")
    elif case == "outliers+nonfinite":
        scores = torch.rand(n, device="cuda", generator=g)
        scores[::97] = 1e30
        scores[1::101] = float("nan")
        scores[2::103] = float("-inf")
    else:
        raise ValueError(case)
    got = rank_buckets_triton(scores, valid, num_buckets)
    ref = rank_buckets_reference(scores, valid, num_buckets)
    err = float((got != ref).sum()) / n
    ms = _ms(lambda: rank_buckets_triton(scores, valid, num_buckets))
    kernel_ms = _kernel_ms(lambda: rank_buckets_triton(scores, valid, num_buckets))
    ref_ms = _try_ms(lambda: rank_buckets_reference(scores, valid, num_buckets))
    nbytes = n * (scores.element_size() + 1 + 8)
    return dict(kernel=f"rank_buckets[{case},K={num_buckets}]", shape=[n], dtype="float32",
                ms_median=ms, gb_per_s=nbytes / ms / 1e6, reference_ms=ref_ms, compiled_ms=None, max_rel_err=err,
                kernel_ms=kernel_ms)


def bench_gate(rows: int, hidden: int, dtype: torch.dtype, leak: float) -> dict:
    torch.manual_seed(0)
    grad = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    depth = torch.randint(0, 13, (rows,), device="cuda")
    threshold = 6
    got = gate_rows_triton(grad, depth, threshold, leak)
    ref = gate_rows_reference(grad, depth, threshold, leak)
    err = _max_rel_err(got, ref)
    if not torch.equal(got, ref):
        print(f"gate {rows}x{hidden} {dtype} leak={leak}: not bit-exact (max rel err {err:.3g})")
    ms = _ms(lambda: gate_rows_triton(grad, depth, threshold, leak))
    kernel_ms = _kernel_ms(lambda: gate_rows_triton(grad, depth, threshold, leak))
    ref_ms = _try_ms(lambda: gate_rows_reference(grad, depth, threshold, leak))
    nbytes = 2 * grad.numel() * grad.element_size() + depth.numel() * depth.element_size()
    return dict(kernel=f"gate_rows[leak={leak}]", shape=[rows, hidden], dtype=str(dtype).replace("torch.", ""),
                ms_median=ms, gb_per_s=nbytes / ms / 1e6, reference_ms=ref_ms, compiled_ms=None, max_rel_err=err,
                kernel_ms=kernel_ms)


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for kernels-<gpu>.json")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the scoring reference")
    ap.add_argument("--quick", action="store_true", help="only the first size of each kernel")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU")

    meta = provenance()
    gpu = meta["gpu"] = meta.pop("device")  # the key the results table reads
    jobs = [
        lambda: bench_scoring(16384, 32000, torch.bfloat16, not args.no_compile),
        lambda: bench_scoring(8192, 128256, torch.bfloat16, not args.no_compile),
        lambda: bench_bucketing(65536, 4, "randn"),
        lambda: bench_bucketing(65536, 4, "tied"),
        lambda: bench_bucketing(65536, 4, "outliers+nonfinite"),
        lambda: bench_bucketing(16384, 4, "randn"),
        lambda: bench_gate(16384, 2048, torch.bfloat16, 0.0),
        lambda: bench_gate(16384, 2048, torch.bfloat16, 0.3),
    ]
    if args.quick:
        jobs = [jobs[0], jobs[2], jobs[6]]
    records = []
    for job in jobs:
        try:
            rec = job()
        except Exception:
            traceback.print_exc()
            continue
        rec.update(meta)
        records.append(rec)
        print(json.dumps(rec), flush=True)
        torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    path = out / f"kernels-{slug}.json"
    path.write_text(json.dumps(records, indent=2) + "\n")
    print(f"\nwrote {path}\n")
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}\n")
    print("| kernel | shape | dtype | ms (median) | kernel ms | GB/s | eager ref ms | compiled ref ms | max rel err |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in records:
        shape = "x".join(str(s) for s in r["shape"])
        print(f"| {r['kernel']} | {shape} | {r['dtype']} | {r['ms_median']:.4f} | {_fmt(r['kernel_ms'], '.4f')} | "
              f"{r['gb_per_s']:.0f} | {_fmt(r['reference_ms'], '.3f')} | {_fmt(r['compiled_ms'], '.3f')} | "
              f"{r['max_rel_err']:.2e} |")


if __name__ == "__main__":
    main()
