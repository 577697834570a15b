"""Step-time benchmark: dense training against cggr, side by side on one GPU, one process per arm.

Builds models of the family registry (cggr.families; Llama's unless the name says another family) from configs
(random weights, random tokens), bf16
weights (or, with ``--precision autocast``, fp32 weights under bf16 autocast),
fused AdamW, HF's own loss (or Liger's fused one in the Liger arms). The dense
baselines are the ones users run: HF eager, HF under ``torch.compile`` and HF
with Liger-Kernel's patches; every arm is reported against HF eager
(``speedup_vs_dense``) and against the fastest dense arm of the same run
(``speedup_vs_best_dense``, docs/design.md §4). For each arm: the median step time
(forward + backward + optimizer) over ``--steps`` steps after ``--warmup``
untimed ones (torch.compile's and Triton's compilation happen there),
tokens/s, peak memory, and the FLOP-ratio ceiling of its routing.

Each arm runs in a fresh process, so memory, monkey patches (Liger patches
HF's modules) and compile caches do not leak from one arm into the next. An
arm that fails (Inductor on cggr's kernels, cggr on Liger's logit-free loss)
is recorded with its error and shown as failed; one that cannot run here
(Liger on a CPU) is recorded as skipped with the reason. Writes
``speed-<gpu>.json`` (a list of records, rewritten after every arm so that a
timeout keeps what was measured) and ``speed-<gpu>.md`` into ``--out``, and
prints the table last.

    python -m benchmarks.speed --models 350M,1B --arms eager,compile,liger,cggr,full --out benchmarks/results
"""

from __future__ import annotations

if not __package__:  # run by path: this folder would shadow installed packages (benchmarks/__init__.py)
    raise SystemExit("run it from the repository root as a module: python -m benchmarks.speed ...")

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from benchmarks.report import speed_summary, speed_table
from cggr_lab import liger as cggr_lab_liger
from cggr_lab.provenance import provenance, routing_record
from cggr_lab.training import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: the arms' processes run there
MODELS = {  # name: (hidden, layers, heads, mlp, batch, seq); the family: MODEL_TYPES
    "125M": (768, 12, 12, 2048, 16, 1024),
    "350M": (1024, 24, 16, 2816, 16, 1024),
    "1B": (2048, 16, 16, 5632, 8, 2048),
    "gpt2-124M": (768, 12, 12, 3072, 16, 1024),
    "qwen3-350M": (1024, 24, 16, 2816, 16, 1024),
    "gemma3-350M": (1024, 24, 16, 2816, 16, 1024),
    "olmo2-350M": (1024, 24, 16, 2816, 16, 1024),
    "phi3-350M": (1024, 24, 16, 2816, 16, 1024),
    "tiny": (64, 4, 4, 176, 2, 64),  # the CPU smoke test's
}
# The registry's model_type of each model not Llama's.
MODEL_TYPES = {"gpt2-124M": "gpt2", "qwen3-350M": "qwen3", "gemma3-350M": "gemma3_text", "olmo2-350M": "olmo2",
               "phi3-350M": "phi3"}
VOCAB = 32000


def model_type(name: str) -> str:
    """The family (a key of ``cggr.families.FAMILIES``) of the model ``name`` of :data:`MODELS`."""
    return MODEL_TYPES.get(name, "llama")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way to train the model: a dense baseline, with cggr attached on top when ``cggr`` is set.

    Order of preparation: Liger's patches (they replace modules and the forward), then ``cggr.attach``,
    then ``torch.compile`` (cggr goes on the model before any wrapper; it refuses a compiled one).
    """

    base: str  # "eager" (plain HF), "compile" (torch.compile(model), default mode) or "liger"
    cggr: dict | None = None  # cggr.attach options (with num_buckets=4, warmup_steps=0 unless given); None = dense
    doc: str = ""
    env: tuple = ()  # (name, value) pairs of cggr's environment variables set in the arm's process


ARMS = {
    "eager": Arm("eager", doc="HF eager"),
    "compile": Arm("compile", doc="HF under torch.compile(model), default mode"),
    "liger": Arm("liger", doc="HF with Liger-Kernel's patches (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy)"),
    "cggr": Arm("eager", dict(policy="random"), "cggr's defaults: the work of 4 buckets at target depth in per-block "
                "random subsets, first and last block dense, skip semantics"),
    "cggr+lce": Arm("eager", dict(policy="random", fused_loss=True), "cggr with its own fused linear cross-entropy (no logits)"),
    "full": Arm("eager", dict(num_buckets=1), "cggr's compacted backward with every token at full depth"),
    "light": Arm("eager", dict(num_buckets=2, depths=(1.0, 0.75)), "cggr, 2 buckets at depths 1 and 0.75"),
    "skip": Arm("eager", dict(policy="random", inactive="skip", placement="per_block", dense_ends=1),
                "cggr, skip semantics, per-block random subsets, first and last block dense (cggr's defaults, "
                "spelled out)"),
    "stop": Arm("eager", dict(policy="random", inactive="stop"),
                "cggr, the seed's routing: stop semantics, 4 random buckets at nested depths (same work as cggr)"),
    "compile+cggr": Arm("compile", dict(policy="random"), "cggr attached, then torch.compile(model)"),
    "liger+cggr": Arm("liger", dict(policy="random"), "Liger's patches, then cggr attached"),
    "cggr+unbiased": Arm("eager", dict(policy="random", estimator="unbiased"),
                         "cggr's defaults with the kept rows reweighted by 1/pi (estimator='unbiased')"),
    "cggr+graphs": Arm("eager", dict(policy="random"), "cggr's defaults, the compacted backward's stages replayed "
                       "from CUDA graphs (CGGR_CUDA_GRAPHS=1)", env=(("CGGR_CUDA_GRAPHS", "1"),)),
    "liger+graphs": Arm("liger", dict(policy="random"), "Liger's patches, then cggr attached, its stages replayed "
                        "from CUDA graphs (CGGR_CUDA_GRAPHS=1)", env=(("CGGR_CUDA_GRAPHS", "1"),)),
    "cggr+block": Arm("eager", dict(policy="random", estimator="unbiased", importance="block"),
                      "cggr, each routed block's rows drawn in its backward by its output-gradient norms, reweighted"),
    "liger+unbiased": Arm("liger", dict(policy="random", estimator="unbiased"),
                          "Liger's patches, then cggr with the kept rows reweighted by 1/pi"),
    "liger+full": Arm("liger", dict(num_buckets=1), "Liger's patches, then cggr with every token at full depth"),
    "liger+light": Arm("liger", dict(num_buckets=2, depths=(1.0, 0.75)), "Liger's patches, then cggr's 2 buckets"),
    "liger+skip": Arm("liger", dict(policy="random", inactive="skip", placement="per_block", dense_ends=1),
                      "Liger's patches, then cggr with skip semantics (as skip)"),
    "difficulty": Arm("eager", dict(policy="difficulty"), "cggr, 4 buckets at nested depths, routing by difficulty "
                      "(the seed's rule), skip semantics"),
    "generic": Arm("eager", dict(backward="generic"), "cggr's per-linear routed backward only"),
    "mask": Arm("eager", dict(mode="mask", policy="difficulty"), "mask mode: gates gradients, saves nothing"),
}
DENSE_ARMS = [name for name, arm in ARMS.items() if arm.cggr is None]
# Names earlier files use: "dense" was HF eager; "cggr" was difficulty routing and "random" random routing.
LEGACY_ORDER = ["dense", "random"]


class Skipped(Exception):
    """The arm cannot run here (not a failure of the arm): recorded as skipped, with the reason."""


def planned_depth_fraction(options: dict | None, layers: int) -> float:
    """Mean active fraction of the block stack per token (equal-size buckets, docs/design.md §1.5's target depths)."""
    if options is None:
        return 1.0
    k = options.get("num_buckets", 4)
    if not isinstance(k, int) or k < 1:
        return None  # not a valid configuration: cggr.attach says why
    fractions = options.get("depths") or [(k - b) / k for b in range(k)]
    blocks = [max(1, min(layers, math.ceil(layers * f - 1e-9))) for f in fractions]
    return sum(blocks) / (len(blocks) * layers)


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
    hidden, layers, heads, mlp, _, _ = shape or MODELS[name]
    return build_family(model_type(name), hidden, layers, heads, mlp, seed=seed, dtype=dtype, device=device)


def _family_settings(kind: str, head_dim: int) -> dict:
    """The family's own settings at full size, where the registry's tiny config has the tests' ones."""
    if kind == "gemma3_text":  # Gemma 3's: q scaled by the head dim, a 512-token window on 5 layers of every 6
        return dict(query_pre_attn_scalar=head_dim, sliding_window=512, sliding_window_pattern=6)
    return {}


def build_family(kind, hidden, layers, heads, mlp, seed=0, dtype=torch.bfloat16, device="cuda"):
    """An HF causal LM of the registry's family ``kind`` (``cggr.families.FAMILIES``) of this shape, random weights:
    its tiny config with these sizes (as many key/value heads as heads), SDPA attention, no KV cache."""
    import transformers as tf

    from cggr.families import FAMILIES

    family = FAMILIES[kind]
    config = dict(family.tiny, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  vocab_size=VOCAB, use_cache=False)
    if kind == "gpt2":
        config.update(n_inner=mlp, n_positions=4096)
    else:
        head_dim = hidden // heads
        config.update(intermediate_size=mlp, num_key_value_heads=heads, head_dim=head_dim, max_position_embeddings=4096,
                      tie_word_embeddings=False, **_family_settings(kind, head_dim))
    cfg = getattr(tf, family.config)(**config)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(tf, family.causal_lm)(cfg)
    return model.to(dtype).train()


def apply_liger(model, device):
    """Liger-Kernel's patches on this model instance (:func:`cggr_lab.liger.apply_liger`; each arm has its own
    process, so the process-wide patches need no undo)."""
    if device != "cuda":
        raise Skipped("Liger-Kernel's Triton kernels need a CUDA device")
    try:
        cggr_lab_liger.apply_liger(model)
    except ImportError as e:
        raise RuntimeError(f"liger-kernel is not installed ({e}); pip install liger-kernel") from e
    except LookupError as e:
        raise Skipped(str(e)) from None


def arm_options(arm: str) -> dict | None:
    """The ``cggr.attach`` options of ``arm`` (4 buckets at target depth from the first step unless the arm
    says otherwise), or None for a dense arm."""
    spec = ARMS[arm].cggr
    return None if spec is None else dict(dict(num_buckets=4, warmup_steps=0), **spec)


def run_arm(name, arm, steps, warmup, checkpointing, profile_dir=None, precision="bf16", device="cuda",
            shape=None, accum=1, loop=False):
    """Measure one arm in this process; returns its record (no speedups: those need the whole group).

    ``shape`` ``(batch, seq)``: the micro-batch (default the model's); ``accum``: micro-batches per optimizer step;
    ``loop``: also time the training loop as a user runs it (:func:`loop_step_ms`)."""
    import cggr

    hidden, layers, heads, mlp, batch, seq = MODELS[name]
    batch, seq = shape or (batch, seq)
    spec = ARMS[arm]
    # "bf16": bf16 weights; "autocast": fp32 weights under bf16 autocast (the HF Trainer's bf16=True)
    autocast = precision == "autocast"
    record = dict(model=name, batch=batch, seq=seq, accum=accum, arm=arm, arm_doc=spec.doc, checkpointing=checkpointing,
                  precision=precision, steps=steps, warmup=warmup,
                  cggr_options=arm_options(arm),
                  planned_depth_fraction=planned_depth_fraction(spec.cggr, layers))
    fraction = record["planned_depth_fraction"]
    record["flop_ratio_ceiling"] = None  # dense arms: no routing, no ceiling
    if spec.cggr is not None and fraction is not None:
        record["flop_ratio_ceiling"] = round(flop_ratio_ceiling(hidden, layers, mlp, seq, VOCAB, fraction,
                                                                2 if model_type(name) == "gpt2" else 3), 3)
    stage = "build"
    try:
        model = build(name, dtype=torch.float32 if autocast else torch.bfloat16, device=device)
        amp = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if autocast else None
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.base == "liger":
            stage = "liger"
            apply_liger(model, device)
        router = None
        if spec.cggr is not None:
            stage = "cggr.attach"
            router = cggr.attach(model, **record["cggr_options"])
            record["routing"] = routing_record(router)
            # Which blocks the attach-time check admitted to the compacted backward (the others run the generic
            # per-linear one): "24/24" is the fast path everywhere.
            blocks = router.compact_blocks
            record["compacted_blocks"] = f"{sum(f is not None for f in blocks)}/{len(blocks)}"
        stepped = model
        if spec.base == "compile":
            stage = "torch.compile"
            stepped = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        g = torch.Generator(device=device).manual_seed(1)
        batches = [torch.randint(0, VOCAB, (batch, seq), device=device, generator=g) for _ in range(4)]
        cuda = device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, warm_s = [], []
        for i in range(warmup + steps):
            stage = "warm-up step" if i < warmup else "timed step"
            ids = [batches[(i * accum + j) % len(batches)] for j in range(accum)]
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            train_step(stepped, ids, opt, router, amp)
            if cuda:
                end.record()
                torch.cuda.synchronize()
            if i < warmup:  # wall-clock seconds: compilation is host time
                warm_s.append(time.perf_counter() - t0)
            else:
                times.append(start.elapsed_time(end) if cuda else 1e3 * (time.perf_counter() - t0))
        stage = "phase timing"
        phases = phase_times(stepped, batches, opt, router, amp, cuda) if accum == 1 else {}
        if loop:
            stage = "training loop"
            record["loop_step_ms"] = loop_step_ms(stepped, model, opt, router, amp, batch, seq, accum, steps, device)
        if profile_dir:
            stage = "profile"
            record["profile"] = _profile(stepped, batches, opt, router, amp, profile_dir,
                                         f"{name} {arm} ckpt={checkpointing}")
        stage = "router.metrics"
        metrics = router.metrics() if router is not None else {}
        if spec.env:
            from cggr.compact.graphs import graph_stats

            record["arm_env"] = dict(spec.env)
            record["cuda_graphs"] = graph_stats()  # whether the stages replayed, and how often
    except Skipped as e:
        return dict(record, skipped=str(e))
    except Exception as e:  # noqa: BLE001 - a failing arm is a result: recorded, not fatal to the run
        traceback.print_exc()
        message = f"{type(e).__name__}: {e}".strip()
        return dict(record, error=message[:4000], failed_at=stage)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    med = statistics.median(times)
    return dict(record, step_ms_median=round(med, 3), step_ms_min=round(min(times), 3),
                step_ms=[round(t, 3) for t in times], warmup_s=[round(t, 3) for t in warm_s],
                tokens_per_s=round(accum * batch * seq / (med / 1e3)),
                peak_mem_gib=None if peak is None else round(peak, 3),
                **phases,
                mean_depth_fraction=metrics.get("mean_depth_fraction"),
                backward_flops_skipped=metrics.get("backward_flops_skipped"))


PHASES = ("forward", "backward", "optimizer")


def loop_step_ms(stepped, model, opt, router, amp, batch, seq, accum, steps, device, log_every=10) -> float:
    """The training loop as a user runs it, timed over ``steps`` optimizer steps after 3 untimed ones: batches
    from host memory (pinned, copied without blocking), ``accum`` micro-batches per step, a cosine learning-rate
    scheduler, the loss read on the host every ``log_every`` steps, no other synchronisation (the isolated step
    of :func:`run_arm` synchronises around every step instead). Returns the mean milliseconds per step."""
    g = torch.Generator().manual_seed(2)
    host = [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(8)]
    if device == "cuda":
        host = [x.pin_memory() for x in host]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / 1e4))))
    cuda = device == "cuda"
    t0 = None
    for step in range(3 + steps):
        if step == 3:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        micro = [host[(step * accum + j) % len(host)].to(device, non_blocking=True) for j in range(accum)]
        loss = train_step(stepped, micro, opt, router, amp)
        sched.step()
        if step % log_every == 0:
            loss.item()  # what a logging loop does: one read-back every few steps
    if cuda:
        torch.cuda.synchronize()
    return round(1e3 * (time.perf_counter() - t0) / steps, 3)


def phase_times(model, batches, opt, router, amp, cuda, steps=5):
    """Where one step's time goes: the median over ``steps`` more steps of each phase's device time
    (``phase_ms``: between CUDA events recorded as the phase is issued; forward includes the loss, optimizer
    includes the router's curriculum step) and of the host's time to issue it (``issue_ms``: when it is close
    to the device time the phase is host-bound, its kernels launched no faster than they run)."""
    device_ms = {p: [] for p in PHASES}
    issue_ms = {p: [] for p in PHASES}
    for i in range(steps):
        events, clock = [], []

        def mark(phase):
            clock.append(time.perf_counter())
            if cuda:
                events.append(torch.cuda.Event(enable_timing=True))
                events[-1].record()

        mark("start")
        train_step(model, batches[i % len(batches)], opt, router, amp, mark=mark)
        if cuda:
            torch.cuda.synchronize()
        for j, p in enumerate(PHASES):
            issue_ms[p].append(1e3 * (clock[j + 1] - clock[j]))
            device_ms[p].append(events[j].elapsed_time(events[j + 1]) if cuda else issue_ms[p][-1])
    med = lambda xs: round(statistics.median(xs), 3)
    return dict(phase_ms={p: med(device_ms[p]) for p in PHASES}, issue_ms={p: med(issue_ms[p]) for p in PHASES})


# Kernel name -> kind, first match wins: where a profiled step's device time goes (``_profile``'s summary).
KERNEL_KINDS = (
    ("attention", ("sdpa", "flash", "fmha", "attention", "cudnn")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "splitkreduce", "sm90_", "sm80_")),
    ("loss", ("cross_entropy", "softmax", "nll_loss")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    # Triton kernels (cggr's, Liger's, Inductor's fusions) are row-wise work, with any gather fused in.
    ("row-wise (Triton, Liger, Inductor)", ("triton", "_rms_norm", "_swiglu", "_rope", "rows_backward", "liger")),
    ("gather/scatter", ("index", "gather", "scatter")),
    ("copies and fills", ("copy", "fill", "memset", "memcpy", "cat")),
    ("elementwise and reductions", ("elementwise", "reduce")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def _profile(model, batches, opt, router, amp, profile_dir, title, steps=2):
    """Profile ``steps`` whole training steps: the kernel table goes to ``profile_dir``; returns the per-step
    device time by kind of kernel (:data:`KERNEL_KINDS`) with the step's wall time, for the record."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for ids in batches[:steps]:
            train_step(model, ids, opt, router, amp)
        torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    averages = prof.key_averages()
    kinds: dict[str, float] = {}
    for e in averages:
        if e.device_type == DeviceType.CUDA:
            us = getattr(e, "self_device_time_total", None) or e.self_cuda_time_total
            kind = kernel_kind(e.key)
            kinds[kind] = kinds.get(kind, 0.0) + us / 1e3 / steps
    kinds = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))  # largest first
    busy = sum(kinds.values())
    table = (averages.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=60)
             + "\nby host time:\n" + averages.table(sort_by="self_cpu_time_total", row_limit=15,
                                                     max_name_column_width=60))
    summary = "\n".join(f"  {k:<40} {ms:8.2f} ms" for k, ms in kinds.items())
    os.makedirs(profile_dir, exist_ok=True)
    with open(os.path.join(profile_dir, f"profile-{title.split()[0]}.txt"), "a") as f:
        f.write(f"\n=== {title}: {steps} training steps (forward, backward, optimizer), CUDA time by kernel\n"
                f"per step: kernels {busy:.2f} ms of {wall_ms:.2f} ms wall (under the profiler)\n{summary}\n{table}\n")
    return dict(steps=steps, wall_ms=round(wall_ms, 3), kernel_ms=round(busy, 3),
                kernel_ms_by_kind={k: round(v, 3) for k, v in kinds.items()})


def add_speedups(group):
    """Set ``speedup_vs_dense`` (vs HF eager) and ``speedup_vs_best_dense`` (vs the fastest dense arm that ran)
    on every measured record of one configuration (model, checkpointing, precision, micro-batch, accumulation);
    where the training loop was timed too, ``loop_speedup_vs_best_dense`` against the dense arm fastest there."""
    loops = {r["arm"]: r["loop_step_ms"] for r in group if r.get("loop_step_ms")}
    dense_loops = {a: ms for a, ms in loops.items() if a in DENSE_ARMS}
    if dense_loops:
        best_loop = min(dense_loops, key=dense_loops.get)
        for r in group:
            if r.get("loop_step_ms"):
                r["loop_best_dense_arm"] = best_loop
                r["loop_speedup_vs_best_dense"] = round(dense_loops[best_loop] / r["loop_step_ms"], 4)
    measured = {r["arm"]: r["step_ms_median"] for r in group if r.get("step_ms_median")}
    eager = measured.get("eager")
    dense = {a: ms for a, ms in measured.items() if a in DENSE_ARMS}
    best = min(dense, key=dense.get) if dense else None
    for r in group:
        ms = r.get("step_ms_median")
        r["speedup_vs_dense"] = round(eager / ms, 4) if eager and ms else None
        r["best_dense_arm"] = best
        r["dense_arms_measured"] = sorted(dense, key=DENSE_ARMS.index)
        r["speedup_vs_best_dense"] = round(dense[best] / ms, 4) if best and ms else None
    return group


def environment(device="cuda"):
    """The provenance every record carries (``cggr_lab.provenance``): the device under the key ``gpu``, plus the
    CUDA and Liger-Kernel versions the speed arms depend on, and ``row_kernels``: ``CGGR_ROW_KERNELS`` (what
    computes the compacted Llama backward's rotary and SwiGLU backward), which every arm's process inherits."""
    from importlib import metadata

    from cggr.env import row_kernels

    env = provenance(device=device if device == "cpu" or torch.cuda.is_available() else "cpu")
    env["gpu"] = env.pop("device")
    if not env["gpu"].startswith("NVIDIA") and device == "cpu":
        env["gpu"], env["cpu"] = "cpu", env["gpu"]  # a CPU smoke run: the processor goes under its own key
    env["cuda"] = torch.version.cuda
    env["row_kernels"] = row_kernels()
    try:
        env["liger_kernel"] = metadata.version("liger-kernel")
    except metadata.PackageNotFoundError:
        env["liger_kernel"] = None
    return env


def _order(r):
    arms = list(ARMS) + LEGACY_ORDER
    return (r.get("precision", "bf16") != "bf16", list(MODELS).index(r["model"]) if r["model"] in MODELS else 99,
            bool(r.get("checkpointing")), arms.index(r["arm"]) if r["arm"] in arms else 99)


def _shape(text: str | None) -> tuple[int, int] | None:
    """``"32x2048"`` -> ``(32, 2048)``; None -> None."""
    if not text:
        return None
    try:
        batch, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shape must be BxS (e.g. 16x1024), got {text!r}") from None
    if batch < 1 or seq < 1:
        raise ValueError(f"--shape must be BxS with positive sizes, got {text!r}")
    return batch, seq


def _child(a, path):
    """Run one arm (``--models`` and ``--arms`` name exactly one each) and write its record to ``path``."""
    ck = {"off": False, "on": True}[a.checkpointing]
    rec = run_arm(a.models, a.arms, a.steps, a.warmup, ck, a.profile_dir if a.models in a.profile.split(",") else None,
                  a.precision, a.device, _shape(a.shape), a.accum, a.loop)
    with open(path, "w") as f:
        json.dump(rec, f)


def measure(a, name, arm, ck):
    """One arm in a fresh process; its record, or a failed record when the process died without one."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "record.json")
        cmd = [sys.executable, "-m", "benchmarks.speed", "--child", path, "--models", name, "--arms", arm,
               "--checkpointing", "on" if ck else "off", "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--precision", a.precision, "--device", a.device, "--profile", a.profile,
               "--profile-dir", a.profile_dir or a.out, "--accum", str(a.accum)]
        cmd += (["--shape", a.shape] if a.shape else []) + (["--loop"] if a.loop else [])
        try:
            proc = subprocess.run(cmd, timeout=a.arm_timeout, cwd=ROOT, env=dict(os.environ, **dict(ARMS[arm].env)))
            error = f"the arm's process exited with code {proc.returncode} without a result (see its log)"
        except subprocess.TimeoutExpired:
            error = f"the arm's process ran past --arm-timeout {a.arm_timeout:g} s and was stopped"
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    hidden, layers, heads, mlp, batch, seq = MODELS[name]
    batch, seq = _shape(a.shape) or (batch, seq)
    return dict(model=name, batch=batch, seq=seq, accum=a.accum, arm=arm, arm_doc=ARMS[arm].doc, checkpointing=ck,
                precision=a.precision, steps=a.steps, warmup=a.warmup, error=error, failed_at="process")


def run_group(a, env, name, ck, arms, group, records, save):
    """Measure ``arms`` of one configuration, one process each, saving the results after every arm."""
    for arm in arms:
        t0 = time.time()
        rec = measure(a, name, arm, ck)
        rec.update(env)
        group.append(rec)
        records.append(rec)
        add_speedups(group)
        save()  # after every arm: a run stopped by a time limit keeps what it measured
        peak = "" if rec.get("peak_mem_gib") is None else f", peak {rec['peak_mem_gib']:.2f} GiB"
        state = (f"{rec['step_ms_median']:.1f} ms{peak}" if rec.get("step_ms_median") else
                 f"SKIPPED ({rec['skipped']})" if rec.get("skipped") else
                 f"FAILED at {rec.get('failed_at')}: {rec['error'].splitlines()[0][:200]}")
        print(f"== {name} ckpt={ck} {arm}: {state} ({time.time() - t0:.0f}s)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="125M,350M,1B,gpt2-124M", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--arms", default="eager,compile,liger,cggr/full,light,compile+cggr,liger+cggr",
                   help="comma-separated, in the order they run; '/' separates tiers: every model runs the first "
                        "tier before any model runs the next (a time limit then cuts the least important arms). "
                        "Arms: " + "; ".join(f"{k} = {v.doc}" for k, v in ARMS.items()))
    p.add_argument("--steps", type=int, default=12, help="timed steps per arm (the median is reported)")
    p.add_argument("--warmup", type=int, default=6, help="untimed steps first (compilation happens here)")
    p.add_argument("--checkpointing", default="off", choices=["off", "on", "both"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "autocast"],
                   help="bf16 weights, or fp32 weights under bf16 autocast (the HF Trainer's bf16=True)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the smoke test (tiny model)")
    p.add_argument("--arm-timeout", type=float, default=900.0, help="seconds before one arm's process is stopped")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--profile", default="", help="comma-separated models whose arms are also profiled (a kernel "
                   "table per arm into --profile-dir, device time by kind of kernel into the record)")
    p.add_argument("--profile-dir", default=None, help="where profile tables go (default --out)")
    p.add_argument("--shape", default=None, help="micro-batch BxS (e.g. 32x2048) for every model (default: each "
                                                 "model's own)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    p.add_argument("--loop", action="store_true",
                   help="also time the training loop as a user runs it (host batches, scheduler, a loss read every "
                        "10 steps, no per-step synchronisation): loop_step_ms and loop_speedup_vs_best_dense")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one arm, write its record here
    a = p.parse_args(argv)
    models = a.models.split(",")
    tiers = [tier.split(",") for tier in a.arms.split("/")]
    arms = [arm for tier in tiers for arm in tier]
    for kind, names, known in (("--models", models, MODELS), ("--arms", arms, ARMS)):
        unknown = [n for n in names if n not in known]
        if unknown:
            p.error(f"{kind}: unknown {', '.join(map(repr, unknown))}; allowed: {', '.join(known)}")
    if a.steps < 1 or a.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {a.steps} and {a.warmup}")
    if a.accum < 1:
        p.error(f"--accum must be >= 1, got {a.accum}")
    try:
        _shape(a.shape)
    except ValueError as e:
        p.error(str(e))
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu for the smoke test)")
    if a.child:
        return _child(a, a.child)
    env = environment(a.device)
    os.makedirs(a.out, exist_ok=True)
    slug = env["gpu"].lower().replace(" ", "-")
    path = os.path.join(a.out, f"speed-{slug}.json")
    earlier = []
    if os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
    # A new record replaces an earlier one of the same configuration in the same file.
    key = lambda r: (r["model"], r["arm"], bool(r.get("checkpointing")), r.get("precision", "bf16"), r.get("batch"),
                     r.get("seq"), r.get("accum", 1))
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[a.checkpointing]
    records = []

    def save():
        fresh = {key(r) for r in records}
        out = sorted([r for r in earlier if key(r) not in fresh] + records, key=_order)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        return out

    groups = {}  # (model, checkpointing): its records so far; the best dense arm is the best of the group
    for tier in tiers:  # every model runs the first tier before any runs the second
        for name in models:
            for ck in ckpts:
                run_group(a, env, name, ck, tier, groups.setdefault((name, ck), []), records, save)
    table = speed_table(save())  # the table of docs/results.md, from the same function
    with open(os.path.join(a.out, f"speed-{slug}.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print()
    print(speed_summary(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
