"""``cggr demo``: train one small Llama three ways and compare (docs/design.md §4).

Arms, trained one after another from IDENTICAL initial weights on the SAME
batches in the same order:

* ``dense``  -- plain training, the baseline;
* ``random`` -- ``cggr.attach()`` with its defaults: random routing in
  per-block subsets, one dense block at each end, skip semantics (the best in
  the quality benchmark);
* ``difficulty`` -- ``cggr.attach(policy="difficulty")``: tokens ranked by
  difficulty (the seed's rule) into nested depths, skip semantics (the same
  backward work as ``random``).

Each arm: AdamW, linear LR warm-up then cosine decay to 10 %; validation loss
on held-out documents (eval mode, no_grad, a fixed list of batches) at step
0, every ``--eval-every`` steps and at the end. Step time is the forward,
backward, optimizer step and ``router.step()``, synchronised on CUDA;
evaluation is not timed, so "wall-clock" below means training seconds.

Output: a table (median step time, tokens/s, final val loss, speedup vs dense,
mean depth fraction), ``demo.png`` (val loss vs steps and vs training
seconds) and ``demo.json`` (every curve, the configuration and versions).

The defaults depend on the device: on CPU a tiny model that runs all three
arms, tokenizer training included, in under 3 minutes on 2 cores; on CUDA a
larger one with bf16 weights, as in the speed benchmark (the measured setting
of cggr's compacted backward).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ARMS = {"dense": None, "random": "random", "difficulty": "difficulty"}
"""Arm name -> routing policy passed to ``cggr.attach`` (``None``: no routing)."""

NUM_BUCKETS = 4

# Defaults per device type; a flag given on the command line wins.
DEFAULTS = {
    "cpu": dict(steps=200, batch_size=8, seq_len=128, d_model=128, layers=4, heads=4, vocab_size=4096,
                lr=6e-3, eval_every=20, eval_batches=4),
    "cuda": dict(steps=300, batch_size=16, seq_len=512, d_model=512, layers=8, heads=8, vocab_size=8192,
                 lr=1e-3, eval_every=25, eval_batches=8),
}


def add_demo_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's flags. ``None`` defaults are filled per device by ``resolve_config``."""
    g = p.add_argument_group("model and training (defaults depend on the device: CPU tiny, CUDA larger)")
    g.add_argument("--steps", type=int, help="training steps per arm (CPU 200, CUDA 300)")
    g.add_argument("--batch-size", type=int, help="sequences per step (CPU 8, CUDA 16)")
    g.add_argument("--seq-len", type=int, help="tokens per sequence (CPU 128, CUDA 512)")
    g.add_argument("--d-model", type=int, help="hidden size (CPU 128, CUDA 512)")
    g.add_argument("--layers", type=int, help="transformer blocks (CPU 4, CUDA 8)")
    g.add_argument("--heads", type=int, help="attention heads (CPU 4, CUDA 8)")
    g.add_argument("--vocab-size", type=int, help="BPE vocabulary size, trained locally (CPU 4096, CUDA 8192)")
    g.add_argument("--lr", type=float, help="peak AdamW learning rate (CPU 6e-3, CUDA 1e-3)")
    g.add_argument("--warmup-steps", type=int,
                   help="cggr curriculum warm-up steps (default 20%% of --steps)")
    g.add_argument("--eval-every", type=int, help="validate every N steps (CPU 20, CUDA 25)")
    g.add_argument("--eval-batches", type=int, help="fixed validation batches (CPU 4, CUDA 8)")
    r = p.add_argument_group("run")
    r.add_argument("--data", help="text file, folder of text files, or .xz file "
                                  "(default: the Python standard library's .py files)")
    r.add_argument("--out", default="cggr-out", help="folder for demo.png and demo.json (default ./cggr-out)")
    r.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    r.add_argument("--seed", type=int, default=0, help="weights, data order and random routing seed (default 0)")
    r.add_argument("--arms", default="dense,random,difficulty",
                   help=f"comma list from {','.join(ARMS)} (default all three)")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Every setting of the run: the flags given, the rest from ``DEFAULTS`` for the device."""
    device = torch.device(getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in DEFAULTS:
        raise ValueError(f"unsupported device {device} (use cpu or cuda)")
    cfg = dict(DEFAULTS[device.type])
    for key in list(cfg) + ["warmup_steps"]:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    if cfg.get("warmup_steps") is None:
        cfg["warmup_steps"] = round(0.2 * cfg["steps"])
    arms = [a.strip() for a in str(getattr(args, "arms", None) or ",".join(ARMS)).split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms or len(set(arms)) != len(arms):
        raise ValueError(f"--arms must be distinct names from {list(ARMS)}, got {arms}")
    if cfg["d_model"] % cfg["heads"]:
        raise ValueError(f"--d-model {cfg['d_model']} is not divisible by --heads {cfg['heads']}")
    for key in ("steps", "batch_size", "seq_len", "d_model", "layers", "heads", "eval_every", "eval_batches"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {cfg[key]}")
    cfg.update(device=str(device), arms=arms, data=getattr(args, "data", None),
               out=str(getattr(args, "out", None) or "cggr-out"), seed=int(getattr(args, "seed", 0) or 0),
               num_buckets=NUM_BUCKETS, lr_warmup_steps=max(1, min(200, cfg["steps"] // 10)))
    return cfg


# --------------------------------------------------------------------------- pieces

def _require_attach():
    import cggr  # lazily: the router is optional for the dense arm

    if not hasattr(cggr, "attach"):
        raise RuntimeError("the routed arms need cggr.attach, which this install does not provide; "
                           "run with --arms dense")
    return cggr.attach


def _build_model(cfg: dict, vocab_size: int, eot: int):
    from .training import build_llama

    return build_llama(cfg["d_model"], cfg["layers"], cfg["heads"], vocab_size, cfg["seq_len"], eot)


def _timing_window(cfg: dict) -> tuple[int, int]:
    """Steps whose median is reported: after the cggr curriculum warm-up (routing at its
    target depths) when >= 10 such steps remain, else after the first 3 steps; the same
    window for every arm."""
    start = cfg["warmup_steps"] if cfg["steps"] - cfg["warmup_steps"] >= 10 else min(3, cfg["steps"] - 1)
    return start, cfg["steps"]


def _train_arm(arm: str, cfg: dict, model_config, init_state, train_stream, val_batches) -> dict:
    from transformers import LlamaForCausalLM

    from .data import TokenBatches
    from .training import Budget, free_memory, train_arm

    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    model = LlamaForCausalLM(model_config)
    model.load_state_dict(init_state)
    # bf16 weights on CUDA, no autocast: every arm the same, and cggr's compacted backward applies.
    model.to(device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).train()
    router = None
    if ARMS[arm] is not None:
        router = _require_attach()(model, num_buckets=cfg["num_buckets"], warmup_steps=cfg["warmup_steps"],
                                   policy=ARMS[arm], seed=cfg["seed"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    batches = TokenBatches(train_stream, cfg["batch_size"], cfg["seq_len"], seed=cfg["seed"])
    steps = cfg["steps"]
    result = train_arm(model, iter(batches), val_batches, budget=Budget(steps=steps), lr=cfg["lr"],
                       lr_warmup=cfg["lr_warmup_steps"] / steps, router=router,
                       routing_warmup=cfg["warmup_steps"] / steps, device=device, desc=f"{arm:>6}",
                       eval_at=[k / steps for k in range(cfg["eval_every"], steps, cfg["eval_every"])])
    start, end = _timing_window(cfg)
    median_ms = statistics.median(result["step_ms"][start:end])
    depth = [m["mean_depth_fraction"] for m in result["router_metrics"] if "mean_depth_fraction" in m]
    result.update({
        "policy": ARMS[arm],
        "timing_window": [start, end],
        "step_ms_median": median_ms,
        "tokens_per_s": cfg["batch_size"] * cfg["seq_len"] / (median_ms / 1e3),
        "mean_depth_fraction_in_timing_window": (statistics.fmean(depth[start:end]) if depth[start:end]
                                                 else (1.0 if router is None else None)),
        "epochs_used": batches.epochs_used,
        "peak_memory_mb": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
    })
    if router is not None:
        router.detach()
    del model, router
    free_memory(device)
    return result


def _format_table(cfg: dict, results: dict) -> str:
    dense = results.get("dense")
    header = ("arm", "median step ms", "tokens/s", "final val loss", "speedup vs dense", "mean depth frac")
    rows = []
    for arm, r in results.items():
        speedup = f"{dense['step_ms_median'] / r['step_ms_median']:.3f}x" if dense else "-"
        depth = "-" if r["mean_depth_fraction"] is None else f"{r['mean_depth_fraction']:.3f}"
        rows.append((arm, f"{r['step_ms_median']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['final_val_loss']:.4f}",
                     speedup, depth))
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    start, end = _timing_window(cfg)
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows] + [
        f"median over steps {start + 1}..{end}; speedup = dense median step / arm median step; "
        f"mean depth averaged over all steps"])


def _plot(cfg: dict, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, r in results.items():
        a.plot(r["step"], r["val_loss"], marker="o", ms=3, label=arm)
        b.plot(r["train_seconds"], r["val_loss"], marker="o", ms=3, label=arm)
    a.set_xlabel("step")
    b.set_xlabel("training wall-clock (s, evaluation excluded)")
    for ax in (a, b):
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"cggr demo: d{cfg['d_model']} L{cfg['layers']}, {cfg['batch_size']}x{cfg['seq_len']} tokens/step, "
                 f"{cfg['steps']} steps, curriculum {cfg['warmup_steps']} steps, {cfg['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- entry point

def run_demo(args: argparse.Namespace) -> dict:
    """Run the demo described in the module docstring; returns what ``demo.json`` holds."""
    from . import data
    from .provenance import package_version, provenance

    cfg = resolve_config(args)
    if any(ARMS[a] is not None for a in cfg["arms"]):
        _require_attach()  # fail before spending minutes on the dense arm
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t0 = time.perf_counter()
    docs = data.load_documents(cfg["data"])
    train_docs, val_docs = data.split_documents(docs, val_fraction=0.05, seed=cfg["seed"])
    if not val_docs:
        raise ValueError("the corpus needs at least two documents (one is held out for validation)")
    tokenizer = data.train_tokenizer(train_docs, cfg["vocab_size"])
    train_stream = data.encode_documents(tokenizer, train_docs)
    val_stream = data.encode_documents(tokenizer, val_docs)
    val_batches = data.eval_batches(val_stream, cfg["batch_size"], cfg["seq_len"], cfg["eval_batches"])
    prep_s = time.perf_counter() - t0
    tokens_needed = cfg["steps"] * cfg["batch_size"] * cfg["seq_len"]
    print(f"data: {cfg['data'] or 'python stdlib'}: {len(train_docs)} train / {len(val_docs)} val documents, "
          f"{train_stream.numel():,} / {val_stream.numel():,} tokens; tokenizer "
          f"{'from cache' if getattr(tokenizer, 'cggr_cache_hit', False) else 'trained'}; {prep_s:.1f}s",
          flush=True)
    if tokens_needed > 2 * train_stream.numel():
        print(f"warning: {tokens_needed:,} training tokens per arm repeat the {train_stream.numel():,}-token "
              f"corpus more than twice", file=sys.stderr)

    torch.manual_seed(cfg["seed"])
    model_config, model = _build_model(cfg, tokenizer.get_vocab_size(), data.eot_id(tokenizer))
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    del model
    print(f"model: Llama d{cfg['d_model']} L{cfg['layers']} H{cfg['heads']} vocab {tokenizer.get_vocab_size()}, "
          f"{n_params / 1e6:.2f}M parameters; {cfg['steps']} steps of {cfg['batch_size']}x{cfg['seq_len']} on "
          f"{cfg['device']}{' (bf16 weights)' if device.type == 'cuda' else ''}; arms {','.join(cfg['arms'])}",
          flush=True)

    results = {arm: _train_arm(arm, cfg, model_config, init_state, train_stream, val_batches)
               for arm in cfg["arms"]}
    if "dense" in results:
        for r in results.values():
            r["speedup_vs_dense"] = results["dense"]["step_ms_median"] / r["step_ms_median"]

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    png, js = out / "demo.png", out / "demo.json"
    _plot(cfg, results, png)
    record = {
        # Top-level keys shared with the benchmarks' JSON (benchmarks/report.py reads them).
        **provenance(getattr(args, "command_line", None), device=device),
        "config": cfg,
        "model": {"parameters": n_params, "llama_config": model_config.to_dict()},
        "data": {"source": cfg["data"] or "python-stdlib", "train_documents": len(train_docs),
                 "val_documents": len(val_docs), "train_tokens": train_stream.numel(),
                 "val_tokens": val_stream.numel(), "prep_seconds": prep_s},
        "arms": [{"arm": arm, **r} for arm, r in results.items()],
        "environment": {"tokenizers": package_version("tokenizers"), "platform": platform.platform(),
                        "cpu_threads": torch.get_num_threads()},
    }
    js.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print()
    print(_format_table(cfg, results))
    print(f"\nplot: {png}\njson: {js}")
    return record


def main(argv: list[str] | None = None) -> None:
    """``python -m cggr_lab.demo``: the same as ``cggr demo``."""
    run_demo(add_demo_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv))


if __name__ == "__main__":
    main()
