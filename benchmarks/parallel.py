"""Data-parallel step time and gradients: dense against cggr under DDP and FSDP2, one process per GPU.

    torchrun --nproc-per-node 2 benchmarks/parallel.py --model 1B --out benchmarks/results

For each parallel mode (``ddp``: ``DistributedDataParallel``; ``fsdp2``: ``fully_shard`` on every decoder
layer and on the root) and arm (``dense``; ``cggr``: 4 buckets at target depth, attached before wrapping),
every rank builds the same model (same seed; the speed benchmark's configs, bf16 weights on GPUs) and trains
on its own random batch of the speed benchmark's shape, so the global batch is ``world`` times that. Reported
per arm: the median step time of the slowest rank, global tokens/s, the peak memory of the fullest rank.

Then, per mode, one check of the routed gradient: one data-parallel step of the routed model against one
process running the concatenated global batch under the same routing (every rank's depths, concatenated in
rank order) through :func:`cggr.reference_routing`: the worst per-tensor relative error of the gradients.

Rank 0 writes ``parallel-<gpu>.json`` into ``--out`` (records as the speed benchmark's plus
``world_size`` and ``parallel``; one ``gradient_check`` record per mode) and prints a table last. Without
GPUs it runs on CPU processes over gloo in fp32 (what the tests do, with ``--model tiny``).
"""

from __future__ import annotations

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402  (benchmarks/speed.py: the models, their builder, the provenance record)
from report import parallel_table  # noqa: E402  (the README's table, from the same function)

MODELS = dict(speed.MODELS, tiny=(64, 4, 4, 128, 2, 32))  # tiny: the CPU test's model
CHECK_BATCH = (2, 256)  # per-rank batch of the gradient check (its reference runs the global batch on one GPU)
ARMS = {"dense": None, "cggr": dict(num_buckets=4, warmup_steps=0)}


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
    model = _build(name, device)
    router = cggr.attach(model, **ARMS[arm]) if ARMS[arm] else None
    wrapped = _wrap(model, parallel, device)
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
    med = _max_over_ranks(statistics.median(times), device)
    peak = _max_over_ranks(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0, device)
    del wrapped, model, opt, router
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(model=name, batch=batch, seq=seq, arm=arm, checkpointing=False, precision="bf16",
                parallel=parallel, world_size=world, step_ms_median=round(med, 3),
                tokens_per_s=round(world * batch * seq / (med / 1e3)),
                peak_mem_gib=round(peak, 3) if device.type == "cuda" else None)


def gradient_check(name, parallel, rank, world, device) -> dict:
    """Routed data-parallel gradients of one step against one process on the global batch, same routing."""
    import cggr
    from cggr.adapters import find_layer_stack

    model = _build(name, device)
    reference = copy.deepcopy(model) if rank == 0 else None
    router = cggr.attach(model, num_buckets=4, warmup_steps=0)
    wrapped = _wrap(model, parallel, device)
    batch, seq = CHECK_BATCH if name != "tiny" else MODELS[name][4:]
    ids = _batch(rank, batch, seq, device, step=99)
    wrapped(input_ids=ids, labels=ids).loss.backward()  # every rank has as many labels: HF's mean averages alike
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2: gathered on every rank
        grads[n] = g.float() if rank == 0 else None
    everyone_ids = [torch.empty_like(ids) for _ in range(world)]
    everyone_depth = [torch.empty_like(router.routing.depth) for _ in range(world)]
    dist.all_gather(everyone_ids, ids)
    dist.all_gather(everyone_depth, router.routing.depth)
    worst = 0.0
    if rank == 0:
        all_ids = torch.cat(everyone_ids)
        with cggr.reference_routing(find_layer_stack(reference)[1], torch.cat(everyone_depth)):
            reference(input_ids=all_ids, labels=all_ids).loss.backward()
        for n, p in reference.named_parameters():
            r = p.grad.float()
            if r.norm() > 0:
                worst = max(worst, ((grads[n] - r).norm() / r.norm()).item())
    worst = _max_over_ranks(worst, device)
    tolerance = 5e-2 if device.type == "cuda" else 1e-4  # bf16 on GPUs, fp32 on CPU
    del wrapped, model, reference
    return dict(model=name, batch=batch, seq=seq, arm="gradient_check", parallel=parallel, world_size=world,
                worst_rel_err=worst, tolerance=tolerance, ok=worst < tolerance)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="1B", choices=sorted(MODELS))
    p.add_argument("--parallel", default="ddp,fsdp2")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    rank, world, device = _setup()
    env = speed.environment()
    records = []
    for parallel in a.parallel.split(","):
        if parallel not in ("ddp", "fsdp2"):
            raise SystemExit(f"--parallel takes ddp and/or fsdp2, got {parallel!r}")
        group = [time_arm(a.model, parallel, arm, a.steps, a.warmup, rank, world, device) for arm in ARMS]
        dense = group[0]["step_ms_median"]
        for r in group:
            r["speedup_vs_dense"] = round(dense / r["step_ms_median"], 4)
        records += group + [gradient_check(a.model, parallel, rank, world, device)]
        if rank == 0:
            print(f"{a.model} {parallel} x{world}: " + ", ".join(f"{r['arm']} {r['step_ms_median']:.1f} ms"
                                                                 for r in group), flush=True)
    for r in records:
        r.update(env)
    if rank == 0:
        os.makedirs(a.out, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")  # on CPU the name holds the processor's
        path = os.path.join(a.out, f"parallel-{slug}.json")
        key = lambda r: (r["model"], r["arm"], r["parallel"], r["world_size"])
        if os.path.exists(path):  # a new record replaces the one of the same configuration
            fresh = {key(r) for r in records}
            with open(path) as f:
                records = [r for r in json.load(f) if key(r) not in fresh] + records
        with open(path, "w") as f:
            json.dump(records, f, indent=1)
        print(parallel_table(records))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
