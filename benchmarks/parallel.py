"""Data-parallel step time and gradients: the dense baselines against cggr under DDP and FSDP2, one process per
GPU.

    torchrun --nproc-per-node 2 -m benchmarks.parallel --model 1B --out benchmarks/results

For each parallel mode (``ddp``: ``DistributedDataParallel``; ``fsdp2``: ``fully_shard`` on every decoder
layer and on the root) and arm (the speed benchmark's arms, :data:`speed.ARMS`: the dense baselines ``eager``,
``compile`` and ``liger``, and cggr on top of each; cggr attached before wrapping, ``torch.compile`` on the
wrapped model), every rank builds the same model (same seed; the speed benchmark's configs, bf16 weights on
GPUs) and trains on its own random batch of the speed benchmark's shape, so the global batch is ``world``
times that. Reported per arm: the median step time of the slowest rank, global tokens/s, the peak memory of
the fullest rank, and the speedups against HF eager and against the fastest dense arm of the same mode
(``speedup_vs_best_dense``). An arm that cannot run here (Liger on CPUs) is recorded as skipped; one that
fails on every rank alike is recorded with its error.

Then, per mode and per inactive-row semantics of ``--checks`` (``stop``: nested depths; ``skip``: per-block
random subsets, the end blocks dense), one check of the routed gradient: one data-parallel step of the routed
model against one process running the concatenated global batch under the same routing (every rank's depths
or per-block active sets, concatenated in rank order) through :func:`cggr.reference_routing`: the worst
per-tensor relative error of the gradients.

Rank 0 writes ``parallel-<gpu>.json`` into ``--out`` after every arm (records as the speed benchmark's plus
``world_size`` and ``parallel``; one ``gradient_check`` record per mode and semantics) and prints a table last;
``--budget-s`` stops starting new arms past that many seconds, so a time limit keeps what was measured.
Without GPUs it runs on CPU processes over gloo in fp32 (what the tests do, with ``--model tiny``).
"""

from __future__ import annotations

if not __package__:  # run by path: this folder would shadow installed packages (benchmarks/__init__.py)
    raise SystemExit("run it from the repository root as a module: python -m benchmarks.parallel ...")

import argparse
import copy
import json
import os
import re
import statistics
import sys
import time

import torch
import torch.distributed as dist

from benchmarks import speed  # the models, their builder, the provenance record
from benchmarks.report import parallel_table  # the table of docs/results.md, from the same function
from cggr_lab.provenance import routing_record

MODELS = dict(speed.MODELS, tiny=(64, 4, 4, 128, 2, 32))  # tiny: the CPU test's model
CHECK_BATCH = (2, 256)  # per-rank batch of the gradient check (its reference runs the global batch on one GPU)
DEFAULT_ARMS = "eager,liger,cggr,cggr+lce,liger+cggr,compile,compile+cggr"
# The gradient checks: cggr's options for each inactive-row semantics.
CHECKS = {"stop": dict(num_buckets=4, warmup_steps=0, inactive="stop"),
          "skip": dict(num_buckets=4, warmup_steps=0, policy="random", inactive="skip", placement="per_block",
                       dense_ends=1)}


def _setup():
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def _build(name, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return speed.build(name, dtype=dtype, device=device, shape=MODELS[name])


def _wrap(model, parallel, device):
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    from cggr.adapters import find_layer_stack

    for layer in find_layer_stack(model)[1]:
        fully_shard(layer)
    fully_shard(model)
    return model


def _batch(rank, batch, seq, device, step=0):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randint(0, speed.VOCAB, (batch, seq), generator=g).to(device)


def _max_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def time_arm(name, parallel, arm, steps, warmup, rank, world, device) -> dict:
    import cggr
    from cggr_lab.training import train_step

    *_, batch, seq = MODELS[name]
    spec = speed.ARMS[arm]
    record = dict(model=name, batch=batch, seq=seq, arm=arm, arm_doc=spec.doc, checkpointing=False,
                  precision="bf16" if device.type == "cuda" else "fp32", parallel=parallel, world_size=world,
                  cggr_options=speed.arm_options(arm))
    try:
        model = _build(name, device)
        if spec.base == "liger":
            speed.apply_liger(model, device.type)
        router = cggr.attach(model, **record["cggr_options"]) if spec.cggr is not None else None
        if router is not None:
            record["routing"] = routing_record(router)
        wrapped = _wrap(model, parallel, device)
        if spec.base == "compile":
            wrapped = torch.compile(wrapped)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" and parallel == "ddp")
        batches = [_batch(rank, batch, seq, device, i) for i in range(4)]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(warmup + steps):
            ids = batches[i % len(batches)]
            t0 = time.perf_counter()
            train_step(wrapped, ids, opt, router)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    except speed.Skipped as e:  # the same on every rank (Liger on CPUs): nothing collective ran
        return dict(record, skipped=str(e))
    except Exception as e:  # noqa: BLE001 - an arm that fails alike on every rank is a result
        return dict(record, error=f"{type(e).__name__}: {e}"[:4000])
    med = _max_over_ranks(statistics.median(times), device)
    peak = _max_over_ranks(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0, device)
    del wrapped, model, opt, router
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(record, step_ms_median=round(med, 3), tokens_per_s=round(world * batch * seq / (med / 1e3)),
                peak_mem_gib=round(peak, 3) if device.type == "cuda" else None)


def gradient_check(name, parallel, semantics, rank, world, device) -> dict:
    """Routed data-parallel gradients of one step against one process on the global batch, same routing."""
    import cggr
    from cggr.adapters import find_layer_stack

    model = _build(name, device)
    reference = copy.deepcopy(model) if rank == 0 else None
    router = cggr.attach(model, **CHECKS[semantics])
    wrapped = _wrap(model, parallel, device)
    batch, seq = CHECK_BATCH if name != "tiny" else MODELS[name][4:]
    ids = _batch(rank, batch, seq, device, step=99)
    wrapped(input_ids=ids, labels=ids).loss.backward()  # every rank has as many labels: HF's mean averages alike
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2: gathered on every rank
        grads[n] = g.float() if rank == 0 else None
    r = router.routing
    # The routing of every rank, in rank order: depths (nested placement) or each block's active tokens.
    mine = r.depth if r.block_active is None else r.block_active.reshape(-1, *r.depth.shape)
    everyone_ids = [torch.empty_like(ids) for _ in range(world)]
    everyone_routing = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone_ids, ids)
    dist.all_gather(everyone_routing, mine)
    worst = 0.0
    if rank == 0:
        all_ids = torch.cat(everyone_ids)
        if r.block_active is None:
            how = dict(depth=torch.cat(everyone_routing), inactive=router.config.inactive)
        else:
            how = dict(block_active=torch.cat(everyone_routing, dim=1), inactive=router.config.inactive)
        with cggr.reference_routing(find_layer_stack(reference)[1], **how):
            reference(input_ids=all_ids, labels=all_ids).loss.backward()
        for n, p in reference.named_parameters():
            ref = p.grad.float()
            if ref.norm() > 0:
                worst = max(worst, ((grads[n] - ref).norm() / ref.norm()).item())
    worst = _max_over_ranks(worst, device)
    tolerance = 5e-2 if device.type == "cuda" else 1e-4  # bf16 on GPUs, fp32 on CPU
    routing = routing_record(router)
    del wrapped, model, reference
    return dict(model=name, batch=batch, seq=seq, arm="gradient_check", semantics=semantics, parallel=parallel,
                world_size=world, routing=routing, worst_rel_err=worst, tolerance=tolerance, ok=worst < tolerance)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="1B", choices=sorted(MODELS))
    p.add_argument("--parallel", default="ddp,fsdp2")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, in the order they run, of {', '.join(speed.ARMS)}")
    p.add_argument("--checks", default="stop,skip", help=f"gradient checks per mode, of {', '.join(CHECKS)}")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no new arm after this many seconds")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    arms, checks, modes = a.arms.split(","), [c for c in a.checks.split(",") if c], a.parallel.split(",")
    for kind, names, known in (("--arms", arms, speed.ARMS), ("--checks", checks, CHECKS),
                               ("--parallel", modes, ("ddp", "fsdp2"))):
        unknown = [n for n in names if n not in known]
        if unknown:
            p.error(f"{kind}: unknown {', '.join(map(repr, unknown))}; allowed: {', '.join(known)}")
    rank, world, device = _setup()
    env = speed.environment("cuda" if device.type == "cuda" else "cpu")
    slug = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")  # on CPU the name holds the processor's
    path = os.path.join(a.out, f"parallel-{slug}.json")
    earlier = []
    if rank == 0 and os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
    key = lambda r: (r["model"], r["arm"], r["parallel"], r["world_size"], r.get("semantics"))
    records, start = [], time.time()

    def save():  # rank 0, after every arm: a new record replaces the one of the same configuration
        if rank == 0:
            os.makedirs(a.out, exist_ok=True)
            fresh = {key(r) for r in records}
            with open(path, "w") as f:
                json.dump([r for r in earlier if key(r) not in fresh] + records, f, indent=1)

    def time_left() -> bool:  # the same answer on every rank
        return _max_over_ranks(time.time() - start, device) < a.budget_s

    for parallel in modes:
        group = []
        for arm in arms:
            if not time_left():
                break
            rec = dict(time_arm(a.model, parallel, arm, a.steps, a.warmup, rank, world, device), **env)
            group.append(rec)
            records.append(rec)
            speed.add_speedups(group)
            save()
            if rank == 0:
                state = (f"{rec['step_ms_median']:.1f} ms" if rec.get("step_ms_median") else
                         f"SKIPPED ({rec['skipped']})" if rec.get("skipped") else f"FAILED: {rec['error'][:200]}")
                print(f"== {a.model} {parallel} x{world} {arm}: {state}", flush=True)
        for semantics in checks:
            if not time_left():
                break
            records.append(dict(gradient_check(a.model, parallel, semantics, rank, world, device), **env))
            save()
    if rank == 0:
        with open(path) as f:
            print(parallel_table(json.load(f)))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
