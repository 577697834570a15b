"""Where a training step's time goes: host (Python launches) against GPU, per phase, dense against cggr.

For each arm of ``benchmarks/speed.py`` named: 20 steps (the first 8 not counted) on one random batch; per
step the host time of the forward (with the routing), of ``loss.backward()`` and of the optimizer step, the
time spent reading routing counts back from the device (``plan``: 0 when they come from the host), the
wall-clock of the step (CUDA-synchronised at its end) and the GPU's time between the same points (CUDA
events). A phase whose host time matches its GPU time is bound by the host.

    python -m benchmarks.host_probe 125M eager,cggr,full
"""
if not __package__:  # run by path: this folder would shadow installed packages (benchmarks/__init__.py)
    raise SystemExit("run it from the repository root as a module: python -m benchmarks.host_probe ...")

import statistics
import sys
import time

import torch

import cggr
from benchmarks import speed  # the models and arms
from cggr import routing


def main(name: str, arms: list[str]) -> None:
    plan_s = []  # seconds spent reading counts back from the device, this step
    read_back = routing.Routing._plan

    def timed_plan(self):
        t = time.perf_counter()
        read_back(self)
        plan_s.append(time.perf_counter() - t)

    routing.Routing._plan = timed_plan
    batch, seq = speed.MODELS[name][4:]
    for arm in arms:
        model = speed.build(name)
        options = dict(num_buckets=4, warmup_steps=0)
        if speed.ARMS[arm].base != "eager":
            raise SystemExit(f"host_probe times HF eager models only, not {arm!r} ({speed.ARMS[arm].doc})")
        options.update(speed.ARMS[arm].cggr or {})
        router = cggr.attach(model, **options) if speed.ARMS[arm].cggr is not None else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, speed.VOCAB, (batch, seq), device="cuda")
        rows = []
        for i in range(20):
            plan_s.clear()
            torch.cuda.synchronize()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            t0 = time.perf_counter()
            ev[0].record()
            loss = model(input_ids=ids, labels=ids).loss
            t1 = time.perf_counter()
            ev[1].record()
            loss.backward()
            t2 = time.perf_counter()
            ev[2].record()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if router:
                router.step()
            t3 = time.perf_counter()
            ev[3].record()
            torch.cuda.synchronize()
            t4 = time.perf_counter()
            if i >= 8:
                rows.append(((t1 - t0) * 1e3, sum(plan_s) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t4 - t0) * 1e3,
                             ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2]), ev[2].elapsed_time(ev[3])))
        med = [statistics.median(c) for c in zip(*rows)]
        print(f"{name} {arm:7s} host: fwd {med[0]:6.1f} (plan {med[1]:5.1f}) bwd {med[2]:6.1f} opt {med[3]:5.1f} | "
              f"wall {med[4]:6.1f} | gpu-events fwd {med[5]:6.1f} bwd {med[6]:6.1f} opt {med[7]:5.1f}", flush=True)
        del model, opt, router
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "125M", (sys.argv[2] if len(sys.argv) > 2 else "eager,cggr,full").split(","))
