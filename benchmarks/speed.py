"""Step-time benchmark: dense training against cggr, side by side, one process, one GPU.

Builds Llama-style models from configs (random weights, random tokens), bf16
weights (or, with ``--precision autocast``, fp32 weights under bf16 autocast),
AdamW, HF's own loss; for each arm measures the median step time
(forward + backward + optimizer) over ``--steps`` steps after ``--warmup``,
tokens/s and peak memory. Writes ``speed-<gpu>.json`` (a list of records) and
``speed-<gpu>.md`` into ``--out``, and prints the table last.

    python benchmarks/speed.py --models 125M,350M,1B --out benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

from report import speed_table  # benchmarks/report.py, beside this script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's cggr, cggr_lab
from cggr_lab.provenance import provenance  # noqa: E402

MODELS = {  # name: (hidden, layers, heads, mlp, batch, seq); Llama-style unless the name says gpt2
    "125M": (768, 12, 12, 2048, 16, 1024),
    "350M": (1024, 24, 16, 2816, 16, 1024),
    "1B": (2048, 16, 16, 5632, 8, 2048),
    "gpt2-124M": (768, 12, 12, 3072, 16, 1024),
}
VOCAB = 32000
ARMS = {  # arm: attach options (None = dense)
    "dense": None,
    "cggr": dict(mode="sparse", policy="difficulty"),          # compacted backward where the family has one
    "random": dict(mode="sparse", policy="random"),            # same bucket sizes: same work as cggr
    "generic": dict(mode="sparse", backward="generic"),        # per-linear routed backward only
    "mask": dict(mode="mask", policy="difficulty"),            # gates gradients, saves nothing
    # cggr's own machinery with every token at full depth (one bucket): how much of the speedup is the
    # implementation (fused backward, fewer saved activations) rather than the skipped rows
    "full": dict(mode="sparse", num_buckets=1),
}


def flop_ratio_ceiling(hidden, layers, mlp, seq, vocab, mean_depth_fraction=0.625, mlp_matrices=3):
    """Dense step FLOPs over routed step FLOPs if the block backward scaled with its active rows."""
    linears = 4 * hidden * hidden + mlp_matrices * hidden * mlp  # SwiGLU: 3 MLP matrices, GPT-2: 2
    per_token_block = 2 * linears + 2 * 2 * seq * hidden / 2  # linears + causal attention
    block_fwd = layers * per_token_block
    head_fwd = 2 * hidden * vocab
    dense = 3 * (block_fwd + head_fwd)
    routed = block_fwd + 2 * block_fwd * mean_depth_fraction + 3 * head_fwd
    return dense / routed


def build(name, seed=0, dtype=torch.bfloat16, device="cuda", shape=None):
    """The model ``name`` of :data:`MODELS` (or of ``shape``, a tuple like theirs) with random weights."""
    import transformers as tf

    hidden, layers, heads, mlp, _, _ = shape or MODELS[name]
    if name.startswith("gpt2"):
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=mlp, vocab_size=VOCAB,
                            n_positions=4096, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        with torch.device(device):
            model = tf.GPT2LMHeadModel(cfg)
        return model.to(dtype).train()
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=VOCAB,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False
    torch.manual_seed(seed)
    with torch.device(device):
        model = tf.LlamaForCausalLM(cfg)
    return model.to(dtype).train()


def run_arm(name, arm, steps, warmup, checkpointing, profile_dir=None, precision="bf16"):
    import contextlib

    import cggr
    from cggr_lab.training import train_step

    hidden, layers, heads, mlp, batch, seq = MODELS[name]
    # "bf16": bf16 weights; "autocast": fp32 weights under bf16 autocast (the HF Trainer's bf16=True)
    autocast = precision == "autocast"
    model = build(name, dtype=torch.float32 if autocast else torch.bfloat16)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else None
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    options = dict(num_buckets=4, warmup_steps=0)
    options.update(ARMS[arm] or {})
    router = cggr.attach(model, **options) if ARMS[arm] else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randint(0, VOCAB, (batch, seq), device="cuda", generator=g) for _ in range(4)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        ids = batches[i % len(batches)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        train_step(model, ids, opt, router, amp)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    if profile_dir:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for ids in batches[:2]:
                with amp() if amp else contextlib.nullcontext():
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        averages = prof.key_averages()
        table = (averages.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60)
                 + "\nby host time:\n" + averages.table(sort_by="self_cpu_time_total", row_limit=15,
                                                         max_name_column_width=60))
        os.makedirs(profile_dir, exist_ok=True)
        with open(os.path.join(profile_dir, f"profile-{name}.txt"), "a") as f:
            f.write(f"\n=== {name} {arm} ckpt={checkpointing}: 2 forward+backward steps (no optimizer), "
                    f"CUDA time by kernel\n{table}\n")
    metrics = router.metrics() if router is not None else {}
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, router, batches
    gc.collect()
    torch.cuda.empty_cache()
    med = statistics.median(times)
    return dict(model=name, batch=batch, seq=seq, arm=arm, checkpointing=checkpointing, precision=precision,
                step_ms_median=round(med, 3), step_ms_min=round(min(times), 3),
                tokens_per_s=round(batch * seq / (med / 1e3)), peak_mem_gib=round(peak, 3),
                mean_depth_fraction=metrics.get("mean_depth_fraction"),
                backward_flops_skipped=metrics.get("backward_flops_skipped"),
                flop_ratio_ceiling=round(flop_ratio_ceiling(hidden, layers, mlp, seq, VOCAB,
                                                            1.0 if arm == "full" else 0.625,
                                                            2 if name.startswith("gpt2") else 3), 3))


def environment():
    """The provenance every record carries (``cggr_lab.provenance``), the device under the key ``gpu``."""
    env = provenance()
    env["gpu"] = env.pop("device")
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="125M,350M,1B,gpt2-124M")
    p.add_argument("--arms", default="dense,cggr,random,generic,mask,full")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--checkpointing", default="off", help="off, on or both")
    p.add_argument("--precision", default="bf16", choices=["bf16", "autocast"],
                   help="bf16 weights, or fp32 weights under bf16 autocast (the HF Trainer's bf16=True)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--profile", default="", help="model whose arms are also profiled (kernel table per arm)")
    p.add_argument("--profile-dir", default=None, help="where profile tables go (default --out)")
    a = p.parse_args(argv)
    env = environment()
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[a.checkpointing]
    records = []
    for name in a.models.split(","):
        for ck in ckpts:
            group = []
            for arm in a.arms.split(","):
                t0 = time.time()
                prof = (a.profile_dir or a.out) if name == a.profile else None
                rec = run_arm(name, arm, a.steps, a.warmup, ck, prof, a.precision)
                group.append(rec)
                print(f"{name} ckpt={ck} {arm}: {rec['step_ms_median']:.1f} ms, peak {rec['peak_mem_gib']:.2f} GiB "
                      f"({time.time() - t0:.0f}s)", flush=True)
            dense = next((r["step_ms_median"] for r in group if r["arm"] == "dense"), None)
            for r in group:
                r["speedup_vs_dense"] = round(dense / r["step_ms_median"], 4) if dense else None
                r.update(env)
            records += group
    os.makedirs(a.out, exist_ok=True)
    slug = env["gpu"].lower().replace(" ", "-")
    path = os.path.join(a.out, f"speed-{slug}.json")
    # Merge with earlier runs in the same file: a new record replaces the one of the same configuration.
    key = lambda r: (r["model"], r["arm"], bool(r.get("checkpointing")), r.get("precision", "bf16"))
    if os.path.exists(path):
        with open(path) as f:
            fresh = {key(r) for r in records}
            records = [r for r in json.load(f) if key(r) not in fresh] + records
    order = {m: i for i, m in enumerate(MODELS)}
    records.sort(key=lambda r: (r.get("precision", "bf16") != "bf16", order.get(r["model"], 99),
                                bool(r.get("checkpointing")), list(ARMS).index(r["arm"])))
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    table = speed_table(records)  # the README's table, from the same function
    with open(os.path.join(a.out, f"speed-{slug}.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
