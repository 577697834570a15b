"""GPU micro-benchmark of the compacted Llama backward's row-wise stages: Inductor against cggr's Triton kernels.

    python -m benchmarks.rows --out benchmarks/results

The two row-gather pieces that ``CGGR_ROW_KERNELS`` switches (:mod:`cggr.kernels.rows`), at the shapes of
``benchmarks/speed.py``'s models (``--models``, default 350M and 1B; bf16) and active fractions (``--fractions``,
default 0.59 and 1.0):

* ``rope_backward``: the rotary backward of ``dq`` on the active rows. ``dq`` comes from a real
  ``F.scaled_dot_product_attention`` backward on q/k/v laid out as ``cggr.compact.decoder._qkv`` lays them out
  (token-major storage, transposed to heads-first), taken as token rows (``token_rows``: a view), with cos/sin
  ``[1, S, hd]`` expanded over the batch, as the stage gets them;
* ``swiglu_backward``: the SwiGLU backward of the active rows of the saved ``g``, ``u`` ``[N, F]``.

The active rows are those a routing hands a block: the tokens sorted by a random depth, deepest first, the
first ``fraction * N`` of them (every row in order at 1.0). For each: (a) ``inductor``: the plain PyTorch piece
(``cggr.compact.pointwise``) under ``torch.compile``, called first with two other row counts, with the row count
dynamic and every other size static, as the stages are compiled in training (the rotary one flattens the
expanded cos/sin inside, as ``rope_rows`` does); (b) ``triton``: the op the stages call, compiled the same way
(Inductor launches the kernel; the op, eager and compiled, is checked to give the kernel's result); (c)
``bound``: the bytes the piece must move (active rows read and written once; the index),
at the copy bandwidth measured here (``torch.empty_like(x).copy_(x)`` of a 1 GiB tensor). Times are medians of
``--reps`` CUDA-event timings, each after a 256 MB write that evicts the L2 cache (the saved tensors are not in
cache in training either).

Checks each result against the eager reference (max abs difference printed; the rotary backward should be
exactly 0, the SwiGLU backward within one or two units of bf16 where a sigmoid's last fp32 bit differs), writes
``rows-<gpu>.json`` into ``--out`` (a list of records with the provenance of ``cggr_lab.provenance``, the GPU
under ``gpu``) and prints a markdown table last. ``--device cpu --smoke``: tiny shapes and a few repetitions
on the CPU (the Triton kernels under ``TRITON_INTERPRET=1``; ``torch.compile`` with the ``aot_eager`` backend,
as Inductor's CPU build is slow), so that the script is tested and does not rot; its times mean nothing.
"""

from __future__ import annotations

if not __package__:  # run by path: this folder would shadow installed packages (benchmarks/__init__.py)
    raise SystemExit("run it from the repository root as a module: python -m benchmarks.rows ...")

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.speed import MODELS, model_type  # name: hidden, layers, heads, mlp, batch, seq

from cggr.compact import pointwise
from cggr.compact.attention import attention_with_grad
from cggr_lab.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]

FLUSH_BYTES = 256 * 2**20  # more than an H200's 50 MB L2


def _rotary(S: int, hd: int, dtype, device):
    """cos/sin ``[1, S, hd]`` as HF's Llama rotary embedding makes them (base 10000)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    freqs = torch.arange(S, device=device, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[None].to(dtype), emb.sin()[None].to(dtype)


def active_rows(N: int, n: int, gen: torch.Generator, device) -> torch.Tensor:
    """``n`` rows as ``Routing.compact_indices`` hands them: tokens sorted by a random depth (4 buckets), deepest
    first, ties in order; every row in order when ``n == N`` (where the routing hands None, which reads no index:
    here the indexed path is timed at that size)."""
    if n == N:
        return torch.arange(N, device=device)
    depth = torch.randint(0, 4, (N,), generator=gen)
    return torch.sort(depth, descending=True, stable=True).indices[:n].clone().to(device)


def attention_grads(B, S, H, hd, idx, dtype, device, gen):
    """``(dq, dk, dv)`` of a causal SDPA backward, q/k/v laid out as ``_qkv`` lays them out (``[B, S, H, hd]``
    storage, viewed heads-first) and the output gradient as the stage passes it (token rows, zero on inactive
    rows, viewed heads-first), through ``cggr.compact.attention.attention_with_grad`` as the blocks call it."""
    q, k, v = (torch.randn(B, S, H, hd, generator=gen).to(device, dtype).transpose(1, 2) for _ in range(3))
    _, grad = attention_with_grad(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
    do = torch.zeros(B * S, H * hd, device=device, dtype=dtype)
    do[idx] = torch.randn(idx.numel(), H * hd, generator=gen).to(device, dtype)
    return grad(do.view(B, S, H, hd).transpose(1, 2))


class Timer:
    """Median time of a call in ms: CUDA events after an L2-evicting write (CUDA), or the wall clock (CPU)."""

    def __init__(self, device: str, reps: int):
        self.cuda, self.reps = device == "cuda", reps
        self.flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device) if self.cuda else None

    def __call__(self, fn) -> float:
        for _ in range(3):  # warm-up
            fn()
        times = []
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(self.reps)]
            for start, end in events:
                self.flush.zero_()  # also gives the host time to get ahead: launch overhead is not timed
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) for s, e in events]
        else:
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_bandwidth(timer: Timer, device: str, nbytes: int) -> float:
    """Bytes per ms of ``torch.empty_like(x).copy_(x)`` (read + write) on a ``nbytes`` tensor."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    ms = timer(lambda: torch.empty_like(x).copy_(x))
    return 2 * x.numel() * x.element_size() / ms


def _max_abs_diff(got, ref) -> float:
    got, ref = (got,) if isinstance(got, torch.Tensor) else got, (ref,) if isinstance(ref, torch.Tensor) else ref
    return max(((a.float() - b.float()).abs().max().item() if b.numel() else 0.0) for a, b in zip(got, ref))


def _rope_flat(dt, cos, sin, idx):
    """The Inductor arm of the rotary backward: the piece with the flattening ``rope_rows`` does."""
    return pointwise.rope_backward(dt, cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1]), idx)


def bench_model(name, fractions, timer, bandwidth, device, backend, dtype=torch.bfloat16):
    from cggr.kernels import rows

    hidden, _, H, Fm, B, S = MODELS[name]
    hd, N = hidden // H, B * S
    gen = torch.Generator().manual_seed(0)
    es = torch.finfo(dtype).bits // 8
    cos1, sin1 = _rotary(S, hd, dtype, device)
    cos, sin = cos1.expand(B, S, hd), sin1.expand(B, S, hd)  # as _backward_on_active_rows passes them
    g = torch.randn(N, Fm, generator=gen).to(device, dtype)
    u = torch.randn(N, Fm, generator=gen).to(device, dtype)
    # Both arms compiled as the stages compile (pointwise.kernel): the row count dynamic, every other size static.
    compile_ = lambda fn: (lambda *a, _c=torch.compile(fn, backend=backend): _c(*pointwise.row_count_dynamic(a, 3)))
    rope_c, swiglu_c = compile_(_rope_flat), compile_(pointwise.swiglu_backward)
    rope_op, swiglu_op = compile_(_rope_op), compile_(_swiglu_op)
    records = []
    for stage in ("rope_backward", "swiglu_backward"):
        for frac in fractions:
            n = max(3, round(frac * N))
            idx = active_rows(N, n, gen, device)
            if stage == "rope_backward":
                dq = pointwise.token_rows(attention_grads(B, S, H, hd, idx, dtype, device, gen)[0])
                args = (dq, cos, sin, idx)
                ref_fn, compiled, kernel, compiled_op = _rope_flat, rope_c, rows.rope_rows_backward, rope_op
                op = torch.ops.cggr.rope_rows_backward
                nbytes = 2 * n * H * hd * es + 2 * S * hd * es + n * idx.element_size()
                shape = dict(B=B, S=S, heads=H, head_dim=hd, dt_stride=list(dq.stride()))
                tol = 0.0  # the same roundings: bit-exact
            else:
                dm = torch.randn(n, Fm, generator=gen).to(device, dtype)
                args = (dm, g, u, idx)
                ref_fn, compiled, kernel, compiled_op = (pointwise.swiglu_backward, swiglu_c, rows.swiglu_rows_backward,
                                                         swiglu_op)
                op = torch.ops.cggr.swiglu_rows_backward
                nbytes = 6 * n * Fm * es + n * idx.element_size()
                shape = dict(N=N, F=Fm)
                # Two units of bf16's last place at the largest |result|, where a sigmoid's last bit differs.
                tol = None
            # Two other row counts first: compiled for dynamic row counts, as the stages are in training.
            for m in (n // 2 + 1, n // 3 + 1):
                compiled(*_with_rows(stage, args, active_rows(N, m, gen, device), gen))
                compiled_op(*_with_rows(stage, args, active_rows(N, m, gen, device), gen))
            ref = ref_fn(*args)
            got, ind = kernel(*args), compiled(*args)
            if tol is None:
                tol = 2 * max(r.abs().max().item() for r in ref) * 2.0 ** -7
            if device == "cuda":  # the op the stages call launches the same kernel, eagerly and compiled
                assert _max_abs_diff(op(*args), got) == 0.0, f"{stage}: the op differs from the kernel"
                assert _max_abs_diff(compiled_op(*args), got) == 0.0, f"{stage}: the compiled op differs"
            rec = dict(stage=stage, model=name, fraction=frac, n=n, dtype=str(dtype).replace("torch.", ""),
                       shape=shape, bytes=nbytes,
                       inductor_ms=timer(lambda: compiled(*args)), triton_ms=timer(lambda: compiled_op(*args)),
                       bound_ms=nbytes / bandwidth, copy_gb_per_s=bandwidth / 1e6,
                       triton_max_abs_diff=_max_abs_diff(got, ref), inductor_max_abs_diff=_max_abs_diff(ind, ref),
                       tolerance=tol)
            rec["speedup"] = rec["inductor_ms"] / rec["triton_ms"]
            records.append(rec)
            print(json.dumps(rec), flush=True)
            if rec["triton_max_abs_diff"] > tol:
                print(f"WARNING {stage} {name} {frac}: Triton differs from the reference by "
                      f"{rec['triton_max_abs_diff']:.3g} > {tol:.3g}", flush=True)
    return records


def _rope_op(dt, cos, sin, idx):
    """The Triton arm as the stages run it: the op inside a compiled graph (Inductor launches the kernel)."""
    return torch.ops.cggr.rope_rows_backward(dt, cos, sin, idx)


def _swiglu_op(dm, g, u, idx):
    return torch.ops.cggr.swiglu_rows_backward(dm, g, u, idx)


def _with_rows(stage, args, idx, gen):
    """``args`` for other active rows ``idx`` (the rotary's dq and the SwiGLU's dm have one row per active row
    or per token: only dm changes)."""
    if stage == "rope_backward":
        return (*args[:3], idx)
    dm = torch.randn(idx.numel(), args[0].shape[1], generator=gen).to(args[0].device, args[0].dtype)
    return (dm, args[1], args[2], idx)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for rows-<gpu>.json")
    llama = [m for m in MODELS if model_type(m) == "llama"]  # the row kernels' shapes: Llama's SwiGLU and rotary
    ap.add_argument("--models", default="350M,1B", help="comma-separated Llama models of benchmarks/speed.py: "
                    + ", ".join(llama))
    ap.add_argument("--fractions", default="0.59,1.0", help="active fractions of the rows")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per measurement (the median is reported)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 3 repetitions (the CPU test)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu --smoke for the smoke test)")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--device cpu runs the Triton kernels under Triton's interpreter: set TRITON_INTERPRET=1")
    models = ["tiny"] if args.smoke else args.models.split(",")
    unknown = [m for m in models if m not in llama]
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)}; allowed: " + ", ".join(llama))
    fractions = [float(f) for f in args.fractions.split(",")]
    reps = 3 if args.smoke else args.reps
    backend = "aot_eager" if args.device == "cpu" else "inductor"

    meta = provenance(device=args.device)
    gpu = meta["gpu"] = meta.pop("device")
    if args.device == "cpu":
        meta["gpu"], meta["cpu"] = "cpu", gpu
    timer = Timer(args.device, reps)
    bandwidth = copy_bandwidth(timer, args.device, 2**20 if args.smoke else 2**30)
    records = []
    for name in models:
        for rec in bench_model(name, fractions, timer, bandwidth, args.device, backend):
            rec.update(meta)
            records.append(rec)
        if args.device == "cuda":
            torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", meta["gpu"].lower()).strip("-")
    path = out / f"rows-{slug}.json"
    path.write_text(json.dumps(records, indent=2) + "\n")
    print(f"\nwrote {path}\n")
    print(f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, copy {bandwidth / 1e6:.0f} GB/s\n")
    print("| model | stage | fraction | rows | inductor ms | triton ms | bound ms | inductor / triton | "
          "triton max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        print(f"| {r['model']} | {r['stage']} | {r['fraction']} | {r['n']} | {r['inductor_ms']:.4f} | "
              f"{r['triton_ms']:.4f} | {r['bound_ms']:.4f} | {r['speedup']:.2f} | {r['triton_max_abs_diff']:.3g} |")


if __name__ == "__main__":
    main()
