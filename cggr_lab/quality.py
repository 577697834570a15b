"""``cggr bench quality``: does routed training reach dense's validation loss sooner?

Every arm of a regime starts from the SAME weights and sees the SAME batches in
the same order (dense arms with another ``seed`` excepted: they measure the
seed-to-seed spread), with the same optimizer and schedule; only the routing
differs. Regimes (docs/design.md §4):

* ``pretrain``  -- from random weights on corpus A (``--data``);
* ``continued`` -- from a dense-pretrained checkpoint, more training on corpus A
  (its second pass: the checkpoint saw it once);
* ``finetune``  -- from the same checkpoint, training on corpus B
  (``--finetune-data``), validated on B.

The checkpoint is trained by this command (dense, ``--pretrain-steps`` on A)
and cached beside the tokenizer (``$CGGR_CACHE``); nothing is downloaded.
Validation uses held-out *documents*. The budget is ``--steps`` (equal-step
comparison) or ``--seconds`` of training time per arm (equal wall-clock: the
learning-rate and routing schedules are defined on the elapsed fraction of the
budget, see :mod:`cggr_lab.training`).

Arms are named by a spec: a base (``dense``, ``difficulty``, ``random``,
``sampled``) and options after slashes, e.g. ``random/handback=0.25``,
``difficulty/scorer=margin``, ``dense/seed=1``, ``random/depths=1:0.5``:

* ``seed``     -- initial weights (pretrain), data order and random routing;
* ``buckets``  -- number of buckets (default 4), ``depths`` -- their target depth
  fractions, hardest first, colon-separated (default ``(K-k)/K``);
* ``warmup``   -- curriculum warm-up as a fraction of the budget (default 0.2);
* ``handback`` -- fraction of the budget at the end over which depth returns to
  full (default 0);
* ``mode``     -- ``sparse`` or ``mask``; ``scorer`` -- a scorer of
  :mod:`cggr.scoring`;
* ``inactive`` -- ``skip`` (cggr's default) or ``stop``; ``placement`` --
  ``auto`` (the default), ``nested`` or ``per_block``; ``dense_ends`` -- blocks
  kept dense at each end (per-block; default 1). An arm without them runs
  cggr's defaults (``random``: skip semantics, per-block random subsets, one
  dense block at each end; ``difficulty``, ``sampled``: skip semantics, nested
  depths); ``random/inactive=stop`` is the seed's routing (stop semantics,
  nested depths);
* ``estimator``, ``importance``, ``sampler``, ``importance_mix``, ``variance_budget``, ``variance_every`` --
  the sampling options of per-block placement (:class:`cggr.RoutingConfig`), e.g.
  ``random/estimator=unbiased/importance=block``;
* ``tokens`` -- this arm's tokens per step as a fraction of the run's (fewer accumulated micro-batches;
  its learning rate follows the same rule), e.g. ``dense/tokens=0.25``: the honest control for routing at
  large batches is often a smaller batch;
* ``compile=1`` -- ``torch.compile(model)`` (default mode), after cggr is attached; ``liger=1`` --
  Liger-Kernel's patches on the model instance (its fused linear cross-entropy included), before cggr is
  attached: a CUDA device and ``liger-kernel`` needed, and a routed arm must use policy ``random`` (the
  fused loss returns no logits to score). One of the two per arm, e.g. ``dense/compile=1/seed=1``,
  ``random/liger=1``.

The base ``ltd`` is the peer a user would pick instead of cggr: DeepSpeed's
random layerwise token dropping (:mod:`cggr_lab.ltd`; no cggr routing). Its
options: ``keep`` -- kept token fraction of the middle layers at the start
(default 0.5), ``ramp`` -- fraction of the budget over which it rises to all
tokens (default 0.7), ``seed``, ``liger`` (not ``compile``: its per-layer draws
would break and recompile the graph); e.g. ``ltd/keep=0.5/ramp=0.8/seed=1``. Its
"mean depth" is the fraction of (token, layer) pairs computed, forward and
backward.

The base ``vcas`` is the other peer: VCAS's variance-controlled unbiased
backward sampling (:mod:`cggr_lab.vcas`; no cggr routing): whole sequences
dropped from the backward at layer outputs, token rows from the linears' weight
gradients, both reweighted, their ratios adapted every ``every`` steps by a
variance probe on extra batches of the training stream, inside the timed step.
Its options: ``tau`` -- acceptable sampling variance over SGD variance (default
0.025, both samplers), ``every`` -- steps between probes (default
``max(1, steps // 50)`` for ``--steps``, 100 for ``--seconds``), ``seed``; e.g.
``vcas/tau=0.05/every=20``. Its "mean depth" is the fraction of (sequence,
layer) pairs whose backward ran; its record holds ``vcas`` (the mean activation
and weight-gradient kept fractions, the probes' history and batches).

Every arm first runs untimed forward and backward passes on its own model (no
optimizer step): compilation, Liger's kernel builds and cggr's compiled pieces
stay outside its budget. Validation runs the uncompiled module.

The reference is the **best dense arm** (docs/design.md §4): among the dense arms of
seed 0, one per base (HF eager, compile, liger), the lowest final validation
loss at equal wall-clock, the fastest step at equal steps (where they differ by
rounding only). Losses, time to its final loss and ``speedup_vs_best_dense`` are
against it; ``speedup_vs_dense`` stays against HF eager. The defaults run on a
CPU in about a minute, so they have no compiled arm (Inductor on a CPU takes
20-40 s per arm); on a GPU, compare against the strong baselines, eager arms
first (a compile arm resets Dynamo, and the routed arms after it recompile
cggr's pieces in their warm-up)::

    --arms dense,random,random/inactive=stop,ltd,dense/compile=1,
           dense/compile=1/seed=1,dense/compile=1/seed=2,random/compile=1,dense/liger=1,random/liger=1

Tokens per step are an axis: ``--tokens-per-step 32K,128K,512K`` runs the regimes once per size, each
optimizer step accumulating ``T / (batch_size * seq_len)`` micro-batches (every micro-batch draws its own
routing), into a file per size. The learning rate follows one rule for every arm (``--lr-scaling``,
default ``sqrt``): the preset's rate is the rate at one micro-batch, scaled by the square root of the
micro-batches per step (square-root scaling for Adam), at most ``--lr-max-scale`` times it (default 4).
A verdict wants runs of at least 300 optimizer steps: the summary lists the arms that ran fewer
(``short_arms``) and the table says so.

``--devices cuda:0,cuda:1`` runs the arms on several GPUs at the same time (arms dealt round-robin, each in
a process of its own, one after another on each GPU), and merges their files into one comparison (``--merge FILES`` merges files run apart). Step times of
different GPUs are compared then: put the arms you compare on the same kind of GPU.

Output (``--out``): ``quality-<tag>.json`` per regime (curves, configuration,
versions, git revision; rewritten after every arm with ``"partial": true`` until
the regime ends; an arm that fails is recorded with its error and the run goes
on) and ``quality-<tag>.png`` (validation loss against
steps and against training seconds); a table per regime is printed last.
``benchmarks/report.py`` turns committed JSON into the tables of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from .liger import apply_liger

REGIMES = ("pretrain", "continued", "finetune")
LTD_POLICY = "random-ltd"  # the ``policy`` recorded for ltd arms (they attach no cggr router)
VCAS_POLICY = "vcas"  # the ``policy`` recorded for vcas arms (no cggr router either)
BASES = {"dense": None, "difficulty": "difficulty", "random": "random", "sampled": "sampled", "ltd": LTD_POLICY,
         "vcas": VCAS_POLICY}
DEFAULT_ARMS = "dense,dense/seed=1,difficulty,random,sampled"

# Model presets: Llama-style, bf16 weights on CUDA. "125M" is the speed benchmark's configuration
# (d768, 12 layers, 12 heads, MLP 2048) with a 16384-token BPE vocabulary (docs/design.md §4).
MODELS = {
    "tiny": dict(d_model=64, layers=4, heads=4, batch_size=4, seq_len=64, vocab_size=1024, lr=3e-3),
    "small": dict(d_model=512, layers=8, heads=8, batch_size=16, seq_len=512, vocab_size=16384, lr=1e-3),
    "125M": dict(d_model=768, layers=12, heads=12, batch_size=16, seq_len=1024, vocab_size=16384, lr=6e-4),
    # The speed benchmark's 350M (d1024, 24 layers, 16 heads; MLP 2752 here against its 2816), GPT-3
    # Medium's learning rate.
    "350M": dict(d_model=1024, layers=24, heads=16, batch_size=16, seq_len=1024, vocab_size=16384, lr=3e-4),
}
# Peak learning rate of each regime relative to the model's (a checkpoint wants gentler steps).
REGIME_LR = {"pretrain": 1.0, "continued": 0.5, "finetune": 1 / 3}

_ARM_OPTIONS = {"seed", "buckets", "depths", "warmup", "handback", "mode", "scorer", "inactive", "placement",
                "dense_ends", "compile", "liger", "tokens", "estimator", "importance", "sampler", "importance_mix",
                "variance_budget", "variance_every"}
# A verdict wants at least this many optimizer steps per arm; the summary names the arms that ran fewer.
MIN_VERDICT_STEPS = 300
_LTD_OPTIONS = {"seed": 0, "keep": 0.5, "ramp": 0.7}
_VCAS_OPTIONS = ("every", "seed", "tau")
# How an arm's model runs, besides the routing: "eager" (plain HF), "compile" (torch.compile(model), after
# cggr is attached) or "liger" (Liger-Kernel's patches on the instance, before cggr is attached).
BACKENDS = ("eager", "compile", "liger")


def _set_backend(arm: dict, spec: str, key: str, value: str) -> None:
    """``compile=1`` / ``liger=1`` (``=0``: eager, the default): one backend per arm."""
    if value not in ("0", "1"):
        raise ValueError(f"--arms: bad value in {key}={value!r} of {spec!r}: {key} takes 0 or 1")
    if value == "1":
        if arm["backend"] != "eager" and arm["backend"] != key:
            raise ValueError(f"--arms: {spec!r}: compile=1 and liger=1 together are not offered (one dense "
                             f"base per arm: {', '.join(BACKENDS)}); pick one")
        arm["backend"] = key


def _parse_ltd(spec: str, options: list[str]) -> dict:
    arm = {"name": spec.strip(), "policy": LTD_POLICY, "seed": 0, "warmup": 0.0, "handback": 0.0, "attach": {},
           "backend": "eager", "ltd": {"start_keep": _LTD_OPTIONS["keep"], "ramp": _LTD_OPTIONS["ramp"]}}
    for opt in options:
        key, sep, value = opt.partition("=")
        if sep and key == "compile":
            raise ValueError(f"--arms: {spec!r}: compile is not offered for ltd arms (random-LTD draws its "
                             f"tokens with a generator in every layer's forward and changes the kept count "
                             f"as it trains: graph breaks and recompilations, no fair compiled arm)")
        if sep and key == "liger":
            _set_backend(arm, spec, key, value)
            continue
        if not sep or key not in _LTD_OPTIONS:
            raise ValueError(f"--arms: option {opt!r} of {spec!r} must be key=value with key in "
                             f"{sorted(set(_LTD_OPTIONS) | {'liger'})} (an ltd arm)")
        try:
            if key == "seed":
                arm["seed"] = int(value)
                continue
            x = float(value)
        except ValueError:
            raise ValueError(f"--arms: bad value in {opt!r} of {spec!r}: a number") from None
        if not 0.0 < x <= 1.0:
            raise ValueError(f"--arms: {opt!r} of {spec!r}: {key} must be in (0, 1]")
        arm["ltd"]["start_keep" if key == "keep" else "ramp"] = x
    return arm


def _parse_vcas(spec: str, options: list[str]) -> dict:
    """A ``vcas`` arm: ``tau`` (> 0), ``every`` (>= 1; None until :func:`resolve_config` knows the budget), ``seed``."""
    arm = {"name": spec.strip(), "policy": VCAS_POLICY, "seed": 0, "warmup": 0.0, "handback": 0.0, "attach": {},
           "backend": "eager", "vcas": {"tau": 0.025, "every": None}}
    for opt in options:
        key, sep, value = opt.partition("=")
        if sep and key in ("compile", "liger"):
            raise ValueError(f"--arms: {spec!r}: {key} is not offered for vcas arms (VCAS replaces the decoder "
                             f"linears' backward and draws in it; its arm runs eager)")
        if not sep or key not in _VCAS_OPTIONS:
            raise ValueError(f"--arms: option {opt!r} of {spec!r} must be key=value with key in "
                             f"{list(_VCAS_OPTIONS)} (a vcas arm)")
        try:
            x = float(value) if key == "tau" else int(value)
        except ValueError:
            raise ValueError(f"--arms: bad value in {opt!r} of {spec!r}: {'a number' if key == 'tau' else 'an int'}"
                             ) from None
        if key == "seed":
            arm["seed"] = x
        elif key == "tau" and not 0.0 < x < float("inf"):
            raise ValueError(f"--arms: {opt!r} of {spec!r}: tau must be a number > 0")
        elif key == "every" and x < 1:
            raise ValueError(f"--arms: {opt!r} of {spec!r}: every must be an int >= 1 (steps between probes)")
        else:
            arm["vcas"][key] = x
    return arm


def _arm_options(arm: dict) -> dict:
    """The options an arm's record shows: random-LTD's or VCAS's, else cggr's attach arguments."""
    return arm.get("ltd", arm.get("vcas", arm["attach"]))


def parse_arm(spec: str) -> dict:
    """An arm spec (see the module docstring) -> its settings; ``ValueError`` naming what is wrong."""
    base, *options = spec.strip().split("/")
    if base not in BASES:
        raise ValueError(f"--arms: {spec!r} must start with one of {list(BASES)}")
    if base == "ltd":
        return _parse_ltd(spec, options)
    if base == "vcas":
        return _parse_vcas(spec, options)
    arm = {"name": spec.strip(), "policy": BASES[base], "seed": 0, "warmup": 0.2, "handback": 0.0, "attach": {},
           "backend": "eager", "tokens": 1.0}
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep or key not in _ARM_OPTIONS:
            raise ValueError(f"--arms: option {opt!r} of {spec!r} must be key=value with key in "
                             f"{sorted(_ARM_OPTIONS)}")
        if key in ("compile", "liger"):
            _set_backend(arm, spec, key, value)
            continue
        try:
            if key == "seed":
                arm["seed"] = int(value)
            elif key in ("warmup", "handback"):
                arm[key] = float(value)
                if not 0.0 <= arm[key] <= 1.0:
                    raise ValueError
            elif key == "buckets":
                arm["attach"]["num_buckets"] = int(value)
            elif key == "depths":
                arm["attach"]["depths"] = tuple(float(v) for v in value.split(":"))
            elif key in ("dense_ends", "variance_every"):
                arm["attach"][key] = int(value)
            elif key in ("importance_mix", "variance_budget"):
                arm["attach"][key] = float(value)
            elif key == "tokens":
                arm["tokens"] = float(value)
                if not 0.0 < arm["tokens"] <= 1.0:
                    raise ValueError
            else:
                arm["attach"][key] = value
        except ValueError:
            raise ValueError(f"--arms: bad value in {opt!r} of {spec!r}") from None
    if arm["policy"] is None and (arm["attach"] or arm["handback"] or "warmup=" in spec):
        raise ValueError(f"--arms: {spec!r}: a dense arm takes only seed=, tokens=, compile= and liger=")
    if arm["backend"] == "liger" and arm["policy"] not in (None, "random"):
        raise ValueError(f"--arms: {spec!r}: liger=1 needs policy random (base random): Liger's fused linear "
                         f"cross-entropy returns no logits, and {base} ranks tokens by scores from them")
    if arm["warmup"] + arm["handback"] > 1.0:
        raise ValueError(f"--arms: {spec!r}: warmup + handback must not exceed the whole budget")
    if arm["policy"] is not None:
        if "depths" in arm["attach"] and "num_buckets" not in arm["attach"]:
            arm["attach"]["num_buckets"] = len(arm["attach"]["depths"])
        from cggr.config import RoutingConfig

        try:
            RoutingConfig(policy=arm["policy"], **arm["attach"])  # the library's own checks, now
        except ValueError as e:
            raise ValueError(f"--arms: {spec!r}: {e}") from None
    return arm


def add_quality_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("what to compare")
    g.add_argument("--regimes", default="pretrain", help=f"comma list from {','.join(REGIMES)} (default pretrain)")
    g.add_argument("--arms", default=DEFAULT_ARMS,
                   help=f"comma list of arm specs: a base ({', '.join(BASES)}) and /key=value options (seed, "
                        f"buckets, depths=1:0.75, warmup, handback as budget fractions, mode, scorer, inactive, "
                        f"placement, dense_ends, compile=1 or liger=1 for the strong dense baselines), e.g. "
                        f"random/handback=0.3, dense/compile=1; ltd takes keep, ramp, seed, liger, e.g. "
                        f"ltd/keep=0.5/ramp=0.7; vcas takes tau, every, seed, e.g. vcas/tau=0.025 "
                        f"(default {DEFAULT_ARMS})")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--steps", type=int, help="equal-step budget: optimizer steps per arm (default 300)")
    b.add_argument("--seconds", type=float, help="equal wall-clock budget: training seconds per arm")
    m = p.add_argument_group("model and data")
    m.add_argument("--model", default=None, choices=list(MODELS),
                   help="model preset (default: 125M on CUDA, tiny on CPU)")
    for name in ("d_model", "layers", "heads", "batch_size", "seq_len", "vocab_size"):
        m.add_argument("--" + name.replace("_", "-"), type=int, help="override the preset")
    m.add_argument("--lr", type=float, help="peak AdamW learning rate of pretraining at one micro-batch per step "
                                            "(override the preset)")
    m.add_argument("--tokens-per-step", default=None,
                   help="comma list of tokens per optimizer step (32K = 32768), each a multiple of batch_size x "
                        "seq_len: gradient accumulation, one run per size (default: one micro-batch)")
    m.add_argument("--lr-scaling", default="sqrt", choices=("sqrt", "none"),
                   help="learning rate at T tokens per step: the preset's times sqrt(micro-batches per step) (sqrt, "
                        "the default) or the preset's (none); the same rule for every arm")
    m.add_argument("--lr-max-scale", type=float, default=4.0,
                   help="sqrt scaling raises the learning rate at most this many times (default 4)")
    m.add_argument("--data", help="corpus A: text file, folder of text files or .xz (default: Python stdlib)")
    m.add_argument("--corpus", help="corpus A as a tokenized folder (train.bin, val.bin, tokenizer.json: "
                                    "python -m cggr_lab.corpus build/unpack), streamed from a memory map; "
                                    "instead of --data, and its tokenizer's vocabulary replaces --vocab-size")
    m.add_argument("--finetune-data", help="corpus B for the finetune regime (required by it)")
    m.add_argument("--pretrain-steps", type=int, default=None,
                   help="dense steps of the cached checkpoint for continued/finetune (default: --steps, or 300)")
    r = p.add_argument_group("run")
    r.add_argument("--evals", type=int, default=12, help="validations per arm besides step 0 (default 12)")
    r.add_argument("--eval-batches", type=int, default=8, help="fixed validation batches (default 8)")
    r.add_argument("--out", default="cggr-out", help="folder for the JSON and PNG files (default ./cggr-out)")
    r.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    r.add_argument("--tag", default="", help="extra text in the output file names")
    r.add_argument("--devices", metavar="LIST",
                   help="run the arms on several devices at the same time (e.g. cuda:0,cuda:1), dealt round-robin in "
                        "the order given, each arm in a process of its own that sees only its GPU, one after "
                        "another on each device; then merge the results as --merge does; cpu entries share the "
                        "host's cores, so their timings interfere")
    r.add_argument("--merge", nargs="+", metavar="JSON",
                   help="train nothing: merge result files of one regime whose arms ran in separate processes "
                        "(one per GPU, same configuration) into one file in --out, summary recomputed")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    from .training import Budget

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = args.model or ("125M" if device.type == "cuda" else "tiny")
    cfg = dict(MODELS[model], model=model)
    for key in ("d_model", "layers", "heads", "batch_size", "seq_len", "vocab_size", "lr"):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    if not regimes or any(r not in REGIMES for r in regimes) or len(set(regimes)) != len(regimes):
        raise ValueError(f"--regimes must be distinct names from {list(REGIMES)}, got {args.regimes!r}")
    if getattr(args, "corpus", None) and args.data:
        raise ValueError("--corpus and --data both name corpus A: give one")
    if "finetune" in regimes and not args.finetune_data:
        raise ValueError("--regimes finetune needs --finetune-data (corpus B: a file, folder or .xz)")
    arms = [parse_arm(s) for s in args.arms.split(",") if s.strip()]
    names = [a["name"] for a in arms]
    if not arms or len(set(names)) != len(names):
        raise ValueError(f"--arms must be distinct arm specs, got {args.arms!r}")
    liger = [a["name"] for a in arms if a["backend"] == "liger"]
    if liger:
        _check_liger(device, liger[0])
    if cfg["layers"] < 3 and any("ltd" in a for a in arms):
        raise ValueError(f"--arms: an ltd arm keeps the first and last layers dense and needs --layers >= 3, "
                         f"got {cfg['layers']}")
    if cfg["d_model"] % cfg["heads"]:
        raise ValueError(f"--d-model {cfg['d_model']} is not divisible by --heads {cfg['heads']}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.seconds is not None and not args.seconds > 0:
        raise ValueError(f"--seconds must be > 0, got {args.seconds}")
    if args.pretrain_steps is not None and args.pretrain_steps < 1:
        raise ValueError(f"--pretrain-steps must be >= 1, got {args.pretrain_steps}")
    steps = args.steps if args.steps is not None or args.seconds is not None else 300
    budget = Budget(steps=steps if args.seconds is None else None, seconds=args.seconds)
    if args.evals < 1 or args.eval_batches < 1:
        raise ValueError("--evals and --eval-batches must be >= 1")
    pretrain_steps = args.pretrain_steps or (budget.steps or 300)
    micro = cfg["batch_size"] * cfg["seq_len"]
    sizes = [micro] if not getattr(args, "tokens_per_step", None) else _token_counts(args.tokens_per_step)
    for size in sizes:
        if size % micro:
            raise ValueError(f"--tokens-per-step: {size} is not a multiple of batch_size x seq_len = {micro}")
        for a in arms:
            micro_batches = size // micro * a.get("tokens", 1.0)
            if micro_batches < 1 or abs(micro_batches - round(micro_batches)) > 1e-9:
                raise ValueError(f"--arms: {a['name']!r}: tokens={a['tokens']:g} of {size} tokens per step is "
                                 f"{micro_batches:g} micro-batches of {micro} tokens: it must be a whole number >= 1")
    scaling = getattr(args, "lr_scaling", "sqrt")
    max_scale = getattr(args, "lr_max_scale", 4.0)
    if not max_scale >= 1.0:
        raise ValueError(f"--lr-max-scale must be >= 1, got {max_scale}")
    for arm in arms:  # a vcas arm's probe interval defaults from the budget (cggr_lab.vcas.default_every)
        if "vcas" in arm and arm["vcas"]["every"] is None:
            from .vcas import default_every

            arm["vcas"]["every"] = default_every(budget.steps)
    return dict(cfg, device=str(device), regimes=regimes, arms=arms, budget=budget, evals=args.evals,
                tokens_per_step_axis=sizes, lr_scaling=scaling, lr_max_scale=max_scale,
                eval_batches=args.eval_batches, data=args.data, finetune_data=args.finetune_data,
                corpus=getattr(args, "corpus", None),
                pretrain_steps=pretrain_steps, out=args.out, tag=args.tag, lr_warmup=0.05)


def _token_counts(text: str) -> list[int]:
    """``"32K,128K,1M"`` -> token counts (K = 1024, M = 1024**2: batches are powers of two)."""
    out = []
    for item in (t.strip() for t in str(text).split(",") if t.strip()):
        scale = {"K": 1024, "M": 1024 ** 2}.get(item[-1].upper(), 1)
        try:
            value = int(item[:-1] if scale > 1 else item) * scale
        except ValueError:
            raise ValueError(f"--tokens-per-step: {item!r} is not a token count (e.g. 32768, 32K or 1M)") from None
        if value < 1:
            raise ValueError(f"--tokens-per-step: {item!r} must be positive")
        out.append(value)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"--tokens-per-step must list distinct token counts, got {text!r}")
    return out


def lr_at(cfg: dict, tokens_per_step: int) -> float:
    """The rule every arm's learning rate follows: the preset's (at one micro-batch per step) times
    sqrt(micro-batches per step) under ``lr_scaling="sqrt"``, at most ``lr_max_scale`` times it."""
    micro_batches = tokens_per_step / (cfg["batch_size"] * cfg["seq_len"])
    scale = math.sqrt(micro_batches) if cfg.get("lr_scaling", "sqrt") == "sqrt" else 1.0
    return cfg["lr"] * min(scale, cfg.get("lr_max_scale", 4.0))


def with_tokens_per_step(cfg: dict, tokens: int) -> dict:
    """``cfg`` for one size of the tokens-per-step axis: its accumulation, and the size in the file names."""
    micro = cfg["batch_size"] * cfg["seq_len"]
    tag = cfg["tag"]
    if len(cfg["tokens_per_step_axis"]) > 1 or tokens != micro:
        tag = "-".join(x for x in (f"tps{_short_count(tokens)}", tag) if x)
    return dict(cfg, tokens_per_step=tokens, accum=tokens // micro, tag=tag)


def _short_count(n: int) -> str:
    for unit, size in (("M", 1024 ** 2), ("K", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _check_liger(device: torch.device, name: str) -> None:
    """A liger=1 arm can run here: a CUDA device and liger-kernel installed (said before anything trains)."""
    import importlib.util

    if device.type != "cuda":
        raise ValueError(f"--arms: {name!r}: liger=1 needs a CUDA device (Liger-Kernel's kernels are Triton "
                         f"kernels for the GPU); this run is on {device}")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError(f"--arms: {name!r}: liger=1 needs liger-kernel, which is not installed "
                         f"(pip install liger-kernel)")


def _apply_liger(model: torch.nn.Module):
    """:func:`cggr_lab.liger.apply_liger` (returns its undo: the arms after this one, built in the same process,
    run without Liger), its missing-family error naming the arm option."""
    try:
        return apply_liger(model)
    except LookupError as e:
        raise ValueError(f"liger=1: {e}") from None


# --------------------------------------------------------------------------- data and checkpoint

def _corpus(source, tokenizer_docs_seed: int = 0):
    from . import data

    docs = data.load_documents(source)
    train, val = data.split_documents(docs, val_fraction=0.05, seed=tokenizer_docs_seed)
    if not val:
        raise ValueError(f"corpus {source or 'python-stdlib'} needs at least two documents")
    return train, val


def _prepare(cfg: dict) -> dict:
    """Tokenizer (trained on A's training documents) and the token streams of A and B."""
    from . import data

    t0 = time.perf_counter()
    if cfg.get("corpus"):
        # A tokenized corpus folder: the streams stay on disk (memory maps), only batches are read.
        import json

        from .corpus import load_tokenizer

        root = Path(cfg["corpus"])
        tok = load_tokenizer(root)
        meta = json.loads((root / "meta.json").read_text())
        out = {"tokenizer": tok, "eot": data.eot_id(tok), "vocab": tok.get_vocab_size(),
               "A": (root / "train.bin", root / "val.bin")}
        info = {"A": {"source": str(root), "train_tokens": _stream_len(out["A"][0]),
                      "val_tokens": _stream_len(out["A"][1]), "meta": {k: meta.get(k) for k in ("sources", "seed")}}}
    else:
        train_a, val_a = _corpus(cfg["data"])
        tok = data.train_tokenizer(train_a, cfg["vocab_size"])
        out = {"tokenizer": tok, "eot": data.eot_id(tok), "vocab": tok.get_vocab_size(),
               "A": (data.encode_documents(tok, train_a), data.encode_documents(tok, val_a))}
        info = {"A": {"source": cfg["data"] or "python-stdlib", "train_documents": len(train_a),
                      "val_documents": len(val_a), "train_tokens": out["A"][0].numel(),
                      "val_tokens": out["A"][1].numel()}}
    if "finetune" in cfg["regimes"]:
        train_b, val_b = _corpus(cfg["finetune_data"])
        out["B"] = (data.encode_documents(tok, train_b), data.encode_documents(tok, val_b))
        info["B"] = {"source": cfg["finetune_data"], "train_documents": len(train_b),
                     "val_documents": len(val_b), "train_tokens": out["B"][0].numel(),
                     "val_tokens": out["B"][1].numel()}
    info["prep_seconds"] = time.perf_counter() - t0
    out["info"] = info
    return out


def _stream_len(stream) -> int:
    """Tokens in a stream: a tensor, or a token file of a tokenized corpus folder (its dtype from meta.json)."""
    if isinstance(stream, torch.Tensor):
        return stream.numel()
    from .corpus import _stream

    return int(_stream(stream, None).size)


def _train_batches(cfg: dict, stream, seed: int):
    """Training batches of a stream: in memory (``TokenBatches``) or streamed from a memory map."""
    from . import data

    if isinstance(stream, torch.Tensor):
        return data.TokenBatches(stream, cfg["batch_size"], cfg["seq_len"], seed=seed)
    from .corpus import MemmapBatches

    return MemmapBatches(stream, cfg["batch_size"], cfg["seq_len"], seed=seed)


def _model(cfg: dict, prep: dict, seed: int, state: dict | None = None):
    """A model of the configuration in training mode on the device: random weights from ``seed``, or ``state``."""
    from .training import build_llama

    torch.manual_seed(seed)
    _, model = build_llama(cfg["d_model"], cfg["layers"], cfg["heads"], prep["vocab"], cfg["seq_len"], prep["eot"])
    if state is not None:
        model.load_state_dict(state)
    device = torch.device(cfg["device"])
    # bf16 weights on CUDA, no autocast: every arm the same, and cggr's compacted backward applies.
    return model.to(device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).train()


def _checkpoint(cfg: dict, prep: dict) -> tuple[dict, dict]:
    """Weights of a dense model pretrained on A for ``pretrain_steps`` (trained once, then cached)."""
    from . import data
    from .training import Budget, train_arm

    first = prep["A"][0] if isinstance(prep["A"][0], torch.Tensor) else str(prep["A"][0])
    key = data._key("quality-checkpoint", prep["tokenizer"].to_str(), _stream_len(prep["A"][0]),
                    int(first[:4096].sum()) if isinstance(first, torch.Tensor) else first, cfg["d_model"], cfg["layers"], cfg["heads"], cfg["seq_len"],
                    cfg["batch_size"], cfg["lr"], cfg["pretrain_steps"], cfg["device"].split(":")[0])
    path = data.resolve_cache_dir() / f"checkpoint-{key}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return saved["state"], dict(saved["info"], cache_hit=True)
    model = _model(cfg, prep, seed=0)
    batches = _train_batches(cfg, prep["A"][0], seed=0)
    print(f"checkpoint: dense pretraining on A for {cfg['pretrain_steps']} steps (cached afterwards)", flush=True)
    r = train_arm(model, iter(batches), _val_batches(cfg, prep["A"][1]), budget=Budget(steps=cfg["pretrain_steps"]),
                  lr=cfg["lr"], lr_warmup=cfg["lr_warmup"], device=torch.device(cfg["device"]),
                  desc="checkpoint")
    info = {"pretrain_steps": cfg["pretrain_steps"], "val_loss_on_A": r["final_val_loss"],
            "epochs_of_A": batches.epochs_used, "train_seconds": r["train_seconds_total"]}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    data._atomic_write(path, lambda tmp: torch.save({"state": state, "info": info}, tmp))
    del model
    return state, dict(info, cache_hit=False)


def _val_batches(cfg: dict, stream: torch.Tensor) -> list[torch.Tensor]:
    from . import data

    if not isinstance(stream, torch.Tensor):
        from .corpus import memmap_eval_batches

        return memmap_eval_batches(stream, cfg["batch_size"], cfg["seq_len"], cfg["eval_batches"])
    return data.eval_batches(stream, cfg["batch_size"], cfg["seq_len"], cfg["eval_batches"])


# --------------------------------------------------------------------------- one regime

def run_regime(regime: str, cfg: dict, prep: dict, on_arm=None) -> dict:
    """Train every arm of ``regime``; returns the regime's result. ``on_arm(result)`` is called with the result
    so far after each arm (the command writes its JSON there, so a timeout keeps the arms that finished).
    An arm that raises (Inductor on a routed model, say) is recorded with its error and the stage it
    failed at, printed, and left out of the summary; the next arm runs."""
    from .training import free_memory

    device = torch.device(cfg["device"])
    corpus = "B" if regime == "finetune" else "A"
    train_stream, val_stream = prep[corpus]
    val = _val_batches(cfg, val_stream)
    checkpoint_info, start_state = None, None
    if regime != "pretrain":
        start_state, checkpoint_info = _checkpoint(cfg, prep)
    lr = cfg["lr"] * REGIME_LR[regime]
    budget = cfg["budget"]
    results = []
    for arm in cfg["arms"]:
        stage = ["build"]
        try:
            r = _run_arm(arm, regime, cfg, prep, start_state, checkpoint_info, train_stream, val, lr, stage)
        except Exception as e:  # noqa: BLE001 - a failing arm is a result: recorded, not fatal to the run
            traceback.print_exc()
            message = f"{type(e).__name__}: {e}".strip()[:4000]
            print(f"{regime:>9} {arm['name']:<28} FAILED at {stage[0]}: {message.splitlines()[0]}", file=sys.stderr,
                  flush=True)
            r = {"arm": arm["name"], "policy": arm["policy"], "seed": arm["seed"],
                 "options": _arm_options(arm), "backend": arm.get("backend", "eager"),
                 "error": message, "failed_at": stage[0]}
        results.append(r)
        free_memory(device)
        if on_arm is not None:
            on_arm(_regime_result(regime, corpus, lr, checkpoint_info, results, budget))
    return _regime_result(regime, corpus, lr, checkpoint_info, results, budget)


def _regime_result(regime, corpus, lr, checkpoint_info, results, budget) -> dict:
    return {"regime": regime, "corpus": corpus, "lr": lr, "checkpoint": checkpoint_info,
            "arms": list(results), "summary": summarise(results, equal_steps=budget.steps is not None)}


def _run_arm(arm, regime, cfg, prep, start_state, checkpoint_info, train_stream, val, lr, stage: list) -> dict:
    """Prepare (Liger, cggr or random-LTD, torch.compile), warm up and train one arm; its record.
    ``stage[0]`` says what it is doing (for the record of a failure); the model is undone on the way out."""
    from .training import median_step_ms, train_arm

    device = torch.device(cfg["device"])
    model = _model(cfg, prep, seed=arm["seed"], state=start_state)
    router = token_drop = unpatch = None
    backend = arm.get("backend", "eager")
    try:
        if backend == "liger":  # Liger first: it replaces modules and the forward that cggr then wraps
            stage[0] = "liger"
            unpatch = _apply_liger(model)
        if "ltd" in arm:
            from .ltd import RandomLTD

            stage[0] = "random-LTD"
            token_drop = RandomLTD(model, seed=arm["seed"], **arm["ltd"])
        elif "vcas" in arm:
            from .vcas import VCAS

            stage[0] = "vcas"
            o = arm["vcas"]
            token_drop = VCAS(model, tau_act=o["tau"], tau_weight=o["tau"], every=o["every"], seed=arm["seed"])
        elif arm["policy"] is not None:
            import cggr

            stage[0] = "cggr.attach"
            router = cggr.attach(model, policy=arm["policy"], seed=arm["seed"], **arm["attach"])
        stepped = model
        if backend == "compile":  # after cggr.attach: cggr goes on the model before any wrapper
            stage[0] = "torch.compile"
            torch._dynamo.reset()  # this arm compiles afresh: no cache limits reached by earlier arms
            stepped = torch.compile(model)
        # The continued regime's data order differs from the checkpoint's pass over A.
        order_seed = arm["seed"] + (1000 if regime == "continued" else 0)
        batches = _train_batches(cfg, train_stream, seed=order_seed)
        stage[0] = "warm-up"
        x = next(iter(_train_batches(cfg, train_stream, seed=order_seed)))
        warm_seconds = _warm_up_arm(stepped, x, device, router, token_drop)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stage[0] = "training"
        eval_at = [k / cfg["evals"] for k in range(1, cfg["evals"])]
        # This arm's tokens per step (a fraction of the run's for tokens=F arms) and its learning rate by the rule.
        accum = round(cfg.get("accum", 1) * arm.get("tokens", 1.0))
        tokens = accum * cfg["batch_size"] * cfg["seq_len"]
        arm_lr = lr_at(cfg, tokens) * lr / cfg["lr"]  # lr: the regime's rate at one micro-batch
        r = train_arm(stepped, iter(batches), val, budget=cfg["budget"], lr=arm_lr, lr_warmup=cfg["lr_warmup"],
                      router=router, routing_warmup=arm["warmup"], routing_handback=arm["handback"],
                      token_drop=token_drop, eval_at=eval_at, device=device, desc=f"{regime}:{arm['name']}",
                      eval_model=model, accum=accum)
    finally:
        if router is not None:
            router.detach()
        if token_drop is not None:
            token_drop.detach()
        if unpatch is not None:
            unpatch()
    epochs = batches.epochs_used + (checkpoint_info["epochs_of_A"] if regime == "continued" else 0.0)
    if router is not None:  # the routing the arm ran, defaults resolved (an arm spec names only what it sets)
        from .provenance import routing_record

        r["routing"] = routing_record(router)
    if "vcas" in arm:  # how much backward work it skipped, and how its ratios moved
        r["vcas"] = _vcas_record(token_drop, r["router_metrics"])
    r.update(arm=arm["name"], policy=arm["policy"], seed=arm["seed"], options=_arm_options(arm),
             backend=backend, untimed_warmup_seconds=warm_seconds, tokens_per_step=tokens, lr=arm_lr,
             warmup=arm["warmup"], handback=arm["handback"], epochs_of_training_data=epochs,
             step_ms_median=median_step_ms(r["step_ms"]),
             peak_memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None)
    print(f"{regime:>9} {arm['name']:<28} steps {r['steps']:>5} x {tokens:>7} tok  val {r['final_val_loss']:.4f}  "
          f"{r['step_ms_median']:.1f} ms/step  depth {r['mean_depth_fraction']:.3f}  "
          f"data epochs {epochs:.2f}", flush=True)
    if epochs > 2.0 + 1e-9:
        print(f"warning: {regime}/{arm['name']} repeated its training data {epochs:.2f} times (> 2)",
              file=sys.stderr)
    return r


def _vcas_record(vcas, step_metrics: list[dict]) -> dict:
    """A vcas arm's record: the mean over its training steps of the kept fractions (sequences per layer whose
    backward ran; rows of the kept sequences that entered the linears' weight gradients) and its final state
    and probe history (:meth:`cggr_lab.vcas.VCAS.summary`)."""
    import statistics

    def mean(key):
        values = [m[key] for m in step_metrics if key in m]
        return statistics.fmean(values) if values else None

    return {"mean_act_fraction": mean("act_fraction"), "mean_weight_fraction": mean("weight_fraction"),
            **vcas.summary()}


def _warm_up_arm(model, x: torch.Tensor, device: torch.device, router=None, token_drop=None) -> float:
    """Untimed forward and backward passes of the arm's own model, before its budget starts: Inductor
    compiles a compile arm's training graphs (validation runs the uncompiled module: nothing to compile
    there), Liger's Triton kernels compile on first use, and cggr's compiled pieces recompile if an
    earlier compile arm reset Dynamo. No optimizer step: the weights stay as they were. A routed arm runs
    at progress 0, 0.5 and 1 (the shapes its steps will see), which draws routing from its generator; a
    random-LTD arm runs at its starting keep. Returns the seconds spent."""
    from .training import sync

    t0 = time.perf_counter()
    x = x.to(device)
    for p in (0.0, 0.5, 1.0) if router is not None else (None,):
        if router is not None:
            router.set_progress(p)
        if token_drop is not None:
            token_drop.set_fraction(0.0)
        model(input_ids=x, labels=x).loss.backward()
    model.zero_grad(set_to_none=True)
    if router is not None:
        router.set_progress(None)
    if token_drop is not None:
        token_drop.metrics()  # drop the warm-up's counts: the first step's metrics are its own
    sync(device)
    return time.perf_counter() - t0


def summarise(arms: list[dict], equal_steps: bool = False) -> dict:
    """Final losses against the best dense arm: its final loss is the target; seed spreads; time and steps
    to reach the target; speed against HF eager and against the best dense arm.

    The best dense arm is chosen among the dense arms of seed 0 (the weights and data order every other
    arm shares; all dense arms when none has seed 0), one per base (eager, compile, liger): at equal
    wall-clock (``equal_steps`` false) the lowest final validation loss, ties to the faster step; at equal
    steps the fastest step, since the bases then run the same updates on the same batches and their
    final losses differ by rounding only. ``speedup_vs_dense`` stays against HF eager (seed 0), as in
    earlier files; ``dense_seed_spread`` is the spread of the best arm's base, ``dense_seed_spread_by_base``
    that of every base (max - min of the final losses of all its seeds; None for one seed).
    """
    from .training import first_reach

    failed = {a["arm"]: f"failed at {a['failed_at']}: {a['error']}" for a in arms if "error" in a}
    arms = [a for a in arms if "error" not in a]
    dense = [a for a in arms if a["policy"] is None]
    if not dense:
        return {"failed_arms": failed} if failed else {}
    base = lambda a: a.get("backend", "eager")  # noqa: E731 - files before the compile and liger arms: eager
    # The best dense arm runs the run's tokens per step: a dense arm with fewer (tokens=F) is a control, shown
    # beside it (does a smaller batch use the same compute better?), not the reference.
    full = max(a.get("tokens_per_step") or 0 for a in dense)
    dense_full = [a for a in dense if (a.get("tokens_per_step") or 0) == full]
    candidates = [a for a in dense_full if a["seed"] == 0] or dense_full
    if equal_steps:
        ref = min(candidates, key=lambda a: a["step_ms_median"])
    else:
        ref = min(candidates, key=lambda a: (a["final_val_loss"], a["step_ms_median"]))
    eager = next((a for a in dense if base(a) == "eager" and a["seed"] == 0), None)
    target = ref["final_val_loss"]
    spreads, seeds = {}, {}
    for b in BACKENDS:
        finals = [a["final_val_loss"] for a in dense_full if base(a) == b]
        if finals:
            spreads[b] = (max(finals) - min(finals)) if len(finals) > 1 else None
            seeds[b] = sorted(a["seed"] for a in dense_full if base(a) == b)
    out = {"best_dense_arm": ref["arm"], "best_dense_by": "step_ms_median" if equal_steps else "final_val_loss",
           "short_arms": [a["arm"] for a in arms if a["steps"] < MIN_VERDICT_STEPS],
           "eager_dense_arm": None if eager is None else eager["arm"],
           "dense_final_val_loss": target, "dense_seed_spread": spreads[base(ref)],
           "dense_seed_spread_by_base": spreads, "dense_seeds_by_base": seeds,
           "dense_seconds": ref["train_seconds_total"], "dense_steps": ref["steps"], "arms": {},
           "failed_arms": failed}
    for a in arms:
        t = first_reach(a["train_seconds"], a["val_loss"], target)
        s = first_reach(a["step"], a["val_loss"], target)
        out["arms"][a["arm"]] = {
            "backend": base(a),
            "final_val_loss": a["final_val_loss"],
            "delta_vs_dense": a["final_val_loss"] - target,
            "steps": a["steps"],
            "tokens_per_step": a.get("tokens_per_step"),
            "step_ms_median": a["step_ms_median"],
            "speedup_vs_dense": None if eager is None else eager["step_ms_median"] / a["step_ms_median"],
            "speedup_vs_best_dense": ref["step_ms_median"] / a["step_ms_median"],
            "mean_depth_fraction": a["mean_depth_fraction"],
            "seconds_to_dense_final": t,
            "time_to_dense_final_vs_dense": _fraction(t, ref["train_seconds_total"]),
            "steps_to_dense_final": s,
            # The other way round, for an arm that never gets there: when the best dense arm passed this arm's
            # final loss, as a fraction of its budget (1 or None: not ahead of it). Mid-schedule, so its
            # learning rate was still high: a dense run given that shorter budget would be lower still.
            "dense_time_to_this_final_vs_dense": _fraction(first_reach(ref["train_seconds"], ref["val_loss"],
                                                                       a["final_val_loss"]),
                                                           ref["train_seconds_total"]),
        }
    return out


def _fraction(seconds: float | None, total: float) -> float | None:
    return None if seconds is None else seconds / total


def _spread_note(s: dict) -> str:
    """``dense seed spread: eager 0.0123 (seeds 0,1), compile one seed`` from a summary."""
    by_base = s.get("dense_seed_spread_by_base")
    if by_base is None:  # a file from before the per-base spread
        spread = s["dense_seed_spread"]
        return f"dense seed spread {spread:.4f}" if spread is not None else "one dense seed: no spread measured"
    parts = []
    for b, spread in by_base.items():
        seeds = s["dense_seeds_by_base"][b]
        parts.append(f"{b} {spread:.4f} (seeds {','.join(map(str, seeds))})" if spread is not None
                     else f"{b} one seed")
    return "dense seed spread: " + ", ".join(parts)


def format_table(result: dict) -> str:
    s = result["summary"]
    failed = [f"failed: {name}: {why.splitlines()[0]}" for name, why in s.get("failed_arms", {}).items()]
    if "arms" not in s:
        return "\n".join([f"[{result['regime']}]", "(no dense arm ran: nothing to compare)"] + failed)
    header = ("arm", "steps", "ms/step", "speed vs eager", "speed vs best dense", "mean depth", "final val loss",
              "vs best dense", "time to best dense's final loss", "best dense's time to this loss")
    x = lambda v: "—" if v is None else f"{v:.2f}x"  # noqa: E731
    rows = []
    for name, a in s["arms"].items():
        rows.append((name, str(a["steps"]), f"{a['step_ms_median']:.1f}", x(a["speedup_vs_dense"]),
                     x(a.get("speedup_vs_best_dense")), f"{a['mean_depth_fraction']:.2f}",
                     f"{a['final_val_loss']:.4f}", f"{a['delta_vs_dense']:+.4f}",
                     "never" if a["time_to_dense_final_vs_dense"] is None else x(a["time_to_dense_final_vs_dense"]),
                     x(a.get("dense_time_to_this_final_vs_dense"))))
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    best = s.get("best_dense_arm", "dense")
    rule = "the fastest, equal steps" if s.get("best_dense_by") == "step_ms_median" else "lowest final loss"
    short = s.get("short_arms") or []
    note = ([f"short: {', '.join(short)} ran fewer than {MIN_VERDICT_STEPS} optimizer steps (a lead, not a verdict)"]
            if short else [])
    return "\n".join([f"[{result['regime']}]", line(header), line(["-" * w for w in widths])]
                     + [line(r) for r in rows]
                     + [f"best dense arm: {best} ({rule}, final val loss {s['dense_final_val_loss']:.4f}); "
                        f"{_spread_note(s)}; time is training seconds, best dense = 1.00x"] + note + failed)


def _plot(result: dict, cfg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4))
    for r in result["arms"]:
        if "error" in r:
            continue
        style = "--" if r["policy"] is None and r["seed"] else "-"
        a.plot(r["step"], r["val_loss"], style, marker="o", ms=2.5, label=r["arm"])
        b.plot(r["train_seconds"], r["val_loss"], style, marker="o", ms=2.5, label=r["arm"])
    a.set_xlabel("step")
    b.set_xlabel("training wall-clock (s, evaluation excluded)")
    losses = [v for r in result["arms"] if "error" not in r for v in r["val_loss"][1:]]
    if losses:
        lo, hi = min(losses), sorted(losses)[int(0.9 * (len(losses) - 1))]
        for ax in (a, b):
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-6), hi + 0.1 * (hi - lo + 1e-6))
    for ax in (a, b):
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    tokens = cfg.get("tokens_per_step") or cfg["batch_size"] * cfg["seq_len"]
    fig.suptitle(f"cggr quality, {result['regime']}: {cfg['model']} (d{cfg['d_model']} L{cfg['layers']}), "
                 f"{tokens} tokens/step ({cfg['batch_size']}x{cfg['seq_len']} micro-batches), "
                 f"{cfg['budget'].describe()} per arm, "
                 f"{cfg['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- entry point

def run_quality(args: argparse.Namespace) -> list[dict]:
    from .provenance import provenance

    if getattr(args, "merge", None):
        return [merge_results(args.merge, Path(args.out), args.tag, command=getattr(args, "command_line", None))]
    if getattr(args, "devices", None):
        return run_on_devices(args)
    cfg = resolve_config(args)
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    prep = _prepare(cfg)
    info = prep["info"]
    print(f"data: A {info['A']['source']} {info['A']['train_tokens']:,} train / {info['A']['val_tokens']:,} val "
          f"tokens" + (f"; B {info['B']['source']} {info['B']['train_tokens']:,} / {info['B']['val_tokens']:,}"
                       if "B" in info else "") + f"; {info['prep_seconds']:.1f}s", flush=True)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    records, tables = [], []
    prov = provenance(getattr(args, "command_line", None), device=device)
    for tokens in cfg["tokens_per_step_axis"]:
        records += _run_size(with_tokens_per_step(cfg, tokens), prep, info, prov, out, tables)
    print()
    print("\n\n".join(tables))
    return records


def _run_size(cfg: dict, prep: dict, info: dict, prov: dict, out: Path, tables: list) -> list[dict]:
    """Every regime at one size of the tokens-per-step axis; their records (tables appended to ``tables``)."""
    records = []
    config = {**{k: v for k, v in cfg.items() if k not in ("budget", "arms")},
              "budget": {"steps": cfg["budget"].steps, "seconds": cfg["budget"].seconds},
              "arms": [a["name"] for a in cfg["arms"]]}
    for regime in cfg["regimes"]:
        tag = _result_name(regime, cfg["model"], info, cfg["budget"], cfg["tag"])

        def save(result: dict, partial: bool, path: Path = out / f"{tag}.json") -> dict:
            record = {**prov, "config": config, "data": info, **result}
            if partial:  # written after every arm: a run cut short keeps the arms that finished
                record["partial"] = True
            path.write_text(json.dumps(record, indent=1, default=str) + "\n")
            return record

        result = run_regime(regime, cfg, prep, on_arm=lambda r: save(r, partial=True))
        record = save(result, partial=False)
        _plot(result, cfg, out / f"{tag}.png")
        records.append(record)
        tables.append(format_table(result))
        print(f"wrote {out / tag}.json and .png", flush=True)
    return records


def _result_name(regime: str, model: str, data_info: dict, budget, tag: str) -> str:
    """``quality-<regime>-<model>-<corpus>-<budget>[-<tag>]``: the file name of a regime's result."""
    corpus = Path(data_info["B" if regime == "finetune" else "A"]["source"]).name.split(".")[0] or "corpus"
    return "-".join(x for x in ("quality", regime, model, corpus, budget.describe().replace(" ", ""), tag) if x)


def _device_list(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",") if d.strip()]
    for d in devices:
        if d != "cpu" and d != "cuda" and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise ValueError(f"--devices: {d!r} is not a device: give cpu, cuda or cuda:N, comma-separated")
    gpus = [d for d in devices if d != "cpu"]
    if len(set(gpus)) != len(gpus) or ("cuda" in gpus and len(gpus) > 1):
        raise ValueError(f"--devices {text!r} names a GPU twice: two arms on one GPU would time each other")
    if len(devices) < 2:
        raise ValueError(f"--devices needs at least two devices, got {text!r} (for one, use --device)")
    return devices


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` less the given options and their values (``--x v`` and ``--x=v``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not a.startswith("--") or a.split("=", 1)[0] not in options:
            out.append(a)
    return out


def run_on_devices(args: argparse.Namespace) -> list[dict]:
    """``--devices``: the arms dealt round-robin over the devices, each arm in a ``cggr bench quality`` process of
    its own (a GPU entry runs with ``CUDA_VISIBLE_DEVICES`` set to it alone: Triton and Liger launch on the
    current device); every device runs its arms one after another, the devices at the same time. Then each
    regime's files are merged (:func:`merge_results`) into ``--out``. A checkpoint the continued and finetune
    regimes need is trained first, here, so the processes share it from the cache.

    One process per arm, not per device: an arm that follows another in one process inherits its compiled
    code, caches and allocator state, and on 4 H200s the same routed configuration ran 11 % slower as the
    fourth arm of its process than as the first (89.7 against 99.9 ms per step), which an equal wall-clock
    comparison counts against it. The cause was not isolated (the process's state, or the GPU or host after
    minutes of load); a fresh process per arm removes the first. Arms that fail are named after the others
    are merged."""
    import shlex
    import subprocess
    import threading

    devices = _device_list(args.devices)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    devices = devices[:len(arms)]
    if len(devices) < 2:
        raise ValueError(f"--devices: {len(arms)} arm(s) need no second device; use --device")
    cfg = resolve_config(argparse.Namespace(**{**vars(args), "device": devices[0]}))  # checks every option first
    if any(r != "pretrain" for r in cfg["regimes"]):
        _checkpoint(cfg, _prepare(cfg))
    line = getattr(args, "command_line", None) or "cggr bench quality"
    base = _without(shlex.split(line)[3:], ("--devices", "--arms", "--out", "--device", "--tag", "--merge"))
    out = Path(args.out)
    # parts[k]: the folder of arm k (dealt to device k mod len(devices)); failed: what went wrong, by arm.
    parts = [out / "parts" / f"{k:02d}-{devices[k % len(devices)].replace(':', '')}" for k in range(len(arms))]
    failed: dict[int, str] = {}
    print_lock = threading.Lock()

    def run_device(i: int, device: str) -> None:
        env = dict(os.environ)
        if device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = device[5:]
        for k in range(i, len(arms), len(devices)):
            parts[k].mkdir(parents=True, exist_ok=True)
            argv = [*base, "--arms", arms[k], "--device", device.split(":")[0], "--out", str(parts[k]),
                    "--tag", args.tag]
            with print_lock:
                print(f"{device}: cggr bench quality {shlex.join(argv)} > {parts[k] / 'run.log'}", flush=True)
            with open(parts[k] / "run.log", "w") as log:
                rc = subprocess.run([sys.executable, "-m", "cggr", "bench", "quality", *argv], stdout=log,
                                    stderr=subprocess.STDOUT, env=env).returncode
            if rc != 0:
                failed[k] = f"{arms[k]} on {device} (exit {rc}; log {parts[k] / 'run.log'})"

    threads = [threading.Thread(target=run_device, args=(i, d)) for i, d in enumerate(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [k for k in range(len(arms)) if k not in failed]
    records = []
    for tokens in cfg["tokens_per_step_axis"]:
        size = with_tokens_per_step(cfg, tokens)
        for regime in cfg["regimes"]:
            files = []
            for k in done:
                found = [f for f in sorted(parts[k].glob("quality-*.json"))
                         if (lambda r: r["regime"] == regime and r["config"].get("tokens_per_step", tokens) == tokens)(
                             json.loads(f.read_text()))]
                if len(found) != 1:
                    raise RuntimeError(f"--devices: expected one {regime} result at {tokens} tokens per step in "
                                       f"{parts[k]}, found {len(found)}")
                files += found
            if files:
                records.append(merge_results([str(f) for f in files], out, size["tag"], command=line,
                                             arm_order=arms))
    if failed:
        raise RuntimeError(f"--devices: {len(failed)} arm(s) failed: {'; '.join(failed[k] for k in sorted(failed))}; "
                           f"the other arms are merged in {out}")
    return records


# What must agree between the files of one merged comparison: everything that changes what an arm learns
# or how its time is counted (the device may differ: one GPU per process, recorded per arm).
_MERGE_KEYS = ("model", "d_model", "layers", "heads", "batch_size", "seq_len", "vocab_size", "lr", "budget",
               "evals", "eval_batches", "data", "corpus", "finetune_data", "pretrain_steps", "lr_warmup",
               "tokens_per_step", "lr_scaling", "lr_max_scale")


def merge_results(paths: list[str], out: Path, tag: str = "", command: str | None = None,
                  arm_order: list[str] | None = None) -> dict:
    """One result from files of the same regime and configuration whose arms ran in separate processes
    (``CUDA_VISIBLE_DEVICES=0`` and ``=1`` on one host, say): arms concatenated in file order, each
    recording the file, device and revision it came from; the summary recomputed over all of them.
    Writes ``quality-<regime>-...-<tag>.json`` and ``.png`` in ``out`` (its ``command`` and ``timestamp``
    are the merge's; the runs' are under ``merged_from``); refuses files that differ in regime or
    configuration, partial files and repeated arm names."""
    from .provenance import provenance
    from .training import Budget

    records = [json.loads(Path(p).read_text()) for p in paths]
    if len(records) < 2:
        raise ValueError(f"--merge needs at least two result files, got {len(records)}")
    first = records[0]
    for p, r in zip(paths, records):
        if r.get("partial"):
            raise ValueError(f"--merge: {p} is partial (its run was cut short); merge finished files only")
        if r["regime"] != first["regime"]:
            raise ValueError(f"--merge: {p} is regime {r['regime']!r}, {paths[0]} is {first['regime']!r}")
        differ = [k for k in _MERGE_KEYS if r["config"].get(k) != first["config"].get(k)]
        if differ:
            raise ValueError(f"--merge: {p} and {paths[0]} differ in {', '.join(differ)}: not one comparison")
    arms, sources = [], []
    for p, r in zip(paths, records):
        source = {"file": Path(p).name, "device": r["device"], "git_rev": r["git_rev"], "timestamp": r["timestamp"]}
        arms += [{**a, "source": source} for a in r["arms"]]
        sources.append({**source, "command": r["command"], "arms": [a["arm"] for a in r["arms"]]})
    if arm_order is not None:  # the order the arms were given in, not the order of the files
        arms.sort(key=lambda a: arm_order.index(a["arm"]) if a["arm"] in arm_order else len(arm_order))
    names = [a["arm"] for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"--merge: arm names repeat across the files: {sorted({n for n in names if names.count(n) > 1})}")
    budget = Budget(**first["config"]["budget"])
    result = {"regime": first["regime"], "corpus": first["corpus"], "lr": first["lr"],
              "checkpoint": first["checkpoint"], "arms": arms,
              "summary": summarise(arms, equal_steps=budget.steps is not None)}
    config = dict(first["config"], arms=names)
    devices = sorted({r["device"] for r in records})
    prov = provenance(command)  # the merge's own command and time (one git query)
    record = {**{k: first[k] for k in first if k not in ("config", "data", "regime", "corpus", "lr", "checkpoint",
                                                          "arms", "summary", "partial")},
              "device": devices[0] if len(devices) == 1 else " + ".join(devices),
              "git_rev": first["git_rev"] if len({r["git_rev"] for r in records}) == 1 else "mixed",
              "command": prov["command"], "timestamp": prov["timestamp"],
              "merged_from": sources, "config": config, "data": first["data"], **result}
    out.mkdir(parents=True, exist_ok=True)
    name = _result_name(first["regime"], config["model"], first["data"], budget, tag)
    (out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    _plot(result, dict(config, budget=budget, device=record["device"]), out / f"{name}.png")
    print(f"merged {len(paths)} files ({len(arms)} arms) into {out / name}.json and .png\n")
    print(format_table(result))
    return record


def main(argv: list[str] | None = None) -> None:
    """``python -m cggr_lab.quality``: the same as ``cggr bench quality``."""
    import shlex

    parser = add_quality_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    args.command_line = "cggr bench quality " + shlex.join(sys.argv[1:] if argv is None else argv)
    run_quality(args)


if __name__ == "__main__":
    main()
