"""Regenerate the generated sections of the documentation: result tables from the committed JSON files, the
options table from ``RoutingConfig``.

A generated section sits between ``<!-- KIND:NAME -->`` and ``<!-- /KIND:NAME -->``, and :data:`TARGETS` says
which sections each file holds:

* docs/results.md: every result table and summary (``results:NAME``, rebuilt from
  ``benchmarks/results/NAME-*.json``; the quality ones from ``benchmarks/results/quality/``);
* README.md: the short results summary (``results:speed-headline``, ``results:quality-headline``), the
  options table (``generated:options``: every field of ``RoutingConfig`` in cggr/config.py, with its default and
  its docstring, :mod:`benchmarks.options_table`) and the supported models (``generated:supported-models``,
  from the family registry, :func:`cggr.families.supported_models_table`).

Generated text writes its links relative to the repository root; each file gets them rebased to its folder.
After committing results JSON, or after adding or changing an option of ``RoutingConfig``, run:

    python -m benchmarks.report          # rewrite every generated section in place
    python -m benchmarks.report --check  # exit 1 if any file is stale (tests/test_report.py runs it)
"""

from __future__ import annotations

if not __package__:  # run by path: this folder would shadow installed packages (benchmarks/__init__.py)
    raise SystemExit("run it from the repository root as a module: python -m benchmarks.report ...")

import argparse
import glob
import json
import os
import re
import sys

from benchmarks.options_table import options_table
from cggr.families import supported_models_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _load(prefix):
    records = []
    for path in sorted(glob.glob(os.path.join(RESULTS, f"{prefix}-*.json"))):
        with open(path) as f:
            data = json.load(f)
        records += data if isinstance(data, list) else [data]
    return records


def _source_line(records):
    seen = {(r.get("gpu"), r.get("torch"), r.get("triton"), r.get("git_rev")) for r in records}
    parts = [f"{g}, torch {t}, Triton {tr}, rev {(rev or '?')[:10]}" for g, t, tr, rev in sorted(seen, key=str)]
    return "Measured on " + "; ".join(parts) + "."


def _cell(v, fmt, suffix=""):
    return "—" if v is None else format(v, fmt) + suffix


def _speed_model(r):
    accum = r.get("accum", 1)
    return (r["model"] + (" (fp32 weights, bf16 autocast)" if r.get("precision") == "autocast" else "")
            + (f", {r['batch']}x{r['seq']} x {accum} micro-batches a step" if accum > 1 else ""))


def speed_table(records):
    """The speed table: every arm against HF eager and against the fastest dense arm of its run.

    Failed and skipped arms get a row that says so and a numbered note with the error or the reason.
    Records from runs before the compile and Liger arms have no best-dense figure: "—", and a note.
    """
    if not records:
        return "_No speed results committed yet._"
    lines = ["| model | tokens/step | act. ckpt | arm | step ms (median) | tokens/s | peak GiB | vs HF eager | "
             "vs best dense | FLOP-ratio ceiling |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    notes, legacy = {}, set()  # note text -> number; (gpu, rev) of runs measured against HF eager only
    for r in records:
        head = f"| {_speed_model(r)} | {r['batch']}x{r['seq']} | {'on' if r.get('checkpointing') else 'off'} | {r['arm']} |"
        if r.get("step_ms_median") is None:
            if r.get("skipped"):
                text, word = f"{r['arm']}: skipped: {r['skipped']}", "skipped"
            else:
                first = (r.get("error") or "no result").splitlines()[0]
                text = f"{r['arm']}: failed at {r.get('failed_at', '?')}: {first[:240]}{'…' if len(first) > 240 else ''}"
                word = "failed"
            n = notes.setdefault(text, len(notes) + 1)
            lines.append(f"{head} {word} [{n}] | — | — | — | — | {_cell(r.get('flop_ratio_ceiling'), '.2f', 'x')} |")
            continue
        if "speedup_vs_best_dense" in r:
            best = _cell(r["speedup_vs_best_dense"], ".3f", "x")
            if r["arm"] == r.get("best_dense_arm"):
                best += " (best dense)"
        else:
            best = "—"
            legacy.add((r.get("gpu"), (r.get("git_rev") or "?")[:7]))
        lines.append(f"{head} {r['step_ms_median']:.1f} | {r['tokens_per_s']:,} | {_cell(r.get('peak_mem_gib'), '.2f')} | "
                     f"{_cell(r.get('speedup_vs_dense'), '.3f', 'x')} | {best} | "
                     f"{_cell(r.get('flop_ratio_ceiling'), '.2f', 'x')} |")
    out = ["\n".join(lines), ""]
    out += [f"[{n}] {text}" + "  " * (n < len(notes)) for text, n in notes.items()]
    if legacy:
        runs = "; ".join(f"{gpu}, rev {rev}" for gpu, rev in sorted(legacy, key=str))
        out += ["" if notes else None, f"Rows with — under *vs best dense* come from runs whose only dense arm was HF eager "
                f"(`dense`), measured against HF eager only ({runs}); there `cggr` routed by difficulty and `random` at "
                "random."]
    out += ["", _speed_source_line(records)]
    return "\n".join(line for line in out if line is not None)


def _speed_source_line(records):
    seen = {(r.get("gpu"), r.get("torch"), r.get("transformers"), r.get("triton"), r.get("liger_kernel"), r.get("git_rev"))
            for r in records}
    parts = []
    for gpu, t, tf, tr, liger, rev in sorted(seen, key=str):
        extra = (f", transformers {tf}" if tf else "") + (f", Liger-Kernel {liger}" if liger else "")
        parts.append(f"{gpu}, torch {t}{extra}, Triton {tr}, rev {(rev or '?')[:10]}")
    return "Measured on " + "; ".join(parts) + "."


def speed_summary(records):
    """A short table (model, arm, step ms, against HF eager and against the best dense arm), printed last."""
    lines = ["| model | arm | step ms | vs HF eager | vs best dense |", "|---|---|---:|---:|---:|"]
    for r in records:
        ms = r.get("step_ms_median")
        state = (f"{ms:.1f}" if ms is not None else "skipped" if r.get("skipped") else "failed")
        best = _cell(r.get("speedup_vs_best_dense"), ".3f", "x")
        if ms is not None and r["arm"] == r.get("best_dense_arm"):
            best += " (best dense)"
        lines.append(f"| {_speed_model(r)}{' ckpt' if r.get('checkpointing') else ''} | {r['arm']} | {state} | "
                     f"{_cell(r.get('speedup_vs_dense'), '.3f', 'x')} | {best} |")
    return "\n".join(lines)


# The arms a user of cggr's defaults runs: cggr on HF's model, on Liger's, or under torch.compile.
ROUTED_DEFAULT_ARMS = ("cggr", "liger+cggr", "compile+cggr")


def speed_headline(records):
    """The speed headline's sentence (README and docs/results.md): cggr's step (its defaults; on whichever base
    ran fastest: HF's model, Liger's or torch.compile's) against the fastest dense arm of the same run."""
    # One run = one GPU and revision: ratios are quoted only against the dense arms of the same run.
    config = lambda r: (r.get("gpu"), r.get("git_rev"), r["model"], bool(r.get("checkpointing")),
                        r.get("precision", "bf16"))
    measured = {config(r) + (r["arm"],): r for r in records if r.get("step_ms_median") is not None}
    fastest = {}  # config -> the fastest routed-default arm of that configuration
    for r in records:
        if r["arm"] in ROUTED_DEFAULT_ARMS and r.get("speedup_vs_best_dense") is not None:
            if config(r) not in fastest or r["step_ms_median"] < fastest[config(r)]["step_ms_median"]:
                fastest[config(r)] = r
    runs = {}
    for r in fastest.values():
        best = measured[config(r) + (r["best_dense_arm"],)]
        arm = "" if r["arm"] == "cggr" else f"{r['arm']}, "
        # Where the training loop was timed too (speed.py --loop), its ratio against the dense arm fastest there.
        loop = (f"; in the training loop {r['loop_speedup_vs_best_dense']:.2f}x against {r['loop_best_dense_arm']}"
                if r.get("loop_speedup_vs_best_dense") else "")
        # A strong dense arm the run did not reach is named: the ratio is against the fastest of those measured.
        unmeasured = [a for a in ("compile", "liger") if a not in r.get("dense_arms_measured", (a,))]
        missing = f"; {' and '.join(unmeasured)} not measured" if unmeasured else ""
        runs.setdefault((r.get("gpu"), (r.get("git_rev") or "?")[:7]), []).append(
            f"{r['speedup_vs_best_dense']:.2f}x ({_speed_model(r)}{', act. ckpt' if r.get('checkpointing') else ''}: "
            f"{arm}{r['step_ms_median']:.1f} ms against {best['arm']}'s {best['step_ms_median']:.1f} ms{loop}{missing})")
    if not runs:
        return ("_No committed speed run has the `torch.compile` and Liger-Kernel dense arms yet: the speedups above "
                "are against HF eager only._")
    return "\n\n".join(f"On {gpu} (rev {rev}), against the fastest dense arm of the same run (HF eager, `torch.compile` "
                        f"or Liger-Kernel), a cggr step with 4 buckets at target depth runs at {', '.join(parts)}."
                        for (gpu, rev), parts in sorted(runs.items(), key=str))


PHASE_KINDS = ("matmul", "attention", "row-wise (Triton, Liger, Inductor)")


def speed_phases_table(records):
    """Where a step's time goes, per arm (records of ``speed.py`` with ``phase_ms``): each phase's device time,
    the host's time to issue the backward (close to its device time: host-bound), and, for profiled arms, the
    device time of the main kinds of kernel (``speed.KERNEL_KINDS``) and of all kernels."""
    rows = [r for r in records if r.get("phase_ms")]
    if not rows:
        return "_No committed speed run has per-phase times yet._"
    lines = ["| model | arm | step ms | forward | backward | optimizer | backward issued in | matmul | attention | "
             "row-wise | other kernels | all kernels |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ph, issue = r["phase_ms"], r.get("issue_ms") or {}
        kinds = (r.get("profile") or {}).get("kernel_ms_by_kind")
        if kinds:
            main = [kinds.get(k, 0.0) for k in PHASE_KINDS]
            total = (r.get("profile") or {}).get("kernel_ms", sum(kinds.values()))
            prof = [f"{v:.1f}" for v in main] + [f"{total - sum(main):.1f}", f"{total:.1f}"]
        else:
            prof = ["—"] * 5
        lines.append(f"| {_speed_model(r)} | {r['arm']} | {r['step_ms_median']:.1f} | {ph['forward']:.1f} | "
                     f"{ph['backward']:.1f} | {ph['optimizer']:.1f} | {_cell(issue.get('backward'), '.1f')} | "
                     + " | ".join(prof) + " |")
    return "\n".join(lines) + "\n\n" + _speed_source_line(rows)


def _gpu(r) -> str:
    return (r.get("gpu") or "?").removeprefix("NVIDIA ")


def parallel_table(records) -> str:
    if not records:
        return "_No data-parallel results committed yet._"
    lines = ["| GPU | model | parallel | ranks | tokens/step (global) | arm | step ms (median, slowest rank) | tokens/s | "
             "peak GiB (fullest rank) | vs HF eager | vs best dense |", "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    checks, notes = [], []
    for r in records:
        if r["arm"] == "gradient_check":
            semantics = f" ({r['semantics']} semantics)" if r.get("semantics") else ""
            checks.append(f"- {_gpu(r)} {r['model']} {r['parallel']} x{r['world_size']}{semantics}: routed gradients vs one "
                          f"process on the global batch, worst relative error {r['worst_rel_err']:.2e} "
                          f"({'within' if r['ok'] else 'ABOVE'} {r['tolerance']:g})")
            continue
        head = f"| {_gpu(r)} | {r['model']} | {r['parallel']} | {r['world_size']} | {r['world_size']}x{r['batch']}x{r['seq']} | {r['arm']} |"
        if not r.get("step_ms_median"):
            why = f"skipped: {r['skipped']}" if r.get("skipped") else f"failed: {r.get('error', '?').splitlines()[0][:160]}"
            notes.append(f"[{len(notes) + 1}] {r['parallel']} {r['arm']}: {why}")
            lines.append(head + f" {'skipped' if r.get('skipped') else 'failed'} [{len(notes)}] | | | | |")
            continue
        peak = "—" if r.get("peak_mem_gib") is None else f"{r['peak_mem_gib']:.2f}"
        best = r.get("speedup_vs_best_dense")
        best = "—" if best is None else f"{best:.3f}x ({r['best_dense_arm']})"
        eager = r.get("speedup_vs_dense")
        lines.append(head + f" {r['step_ms_median']:.1f} | {r['tokens_per_s']:,} | {peak} | "
                     f"{'—' if eager is None else f'{eager:.3f}x'} | {best} |")
    return "\n".join(lines + [""] + notes + ([""] if notes else []) + checks + ["", _source_line(records)])


def kernels_table(records):
    if not records:
        return "_No kernel results committed yet._"
    lines = ["| kernel | shape | dtype | Triton ms (median, with launch) | GPU time ms | GB/s | eager PyTorch ms | "
             "torch.compile ms | max rel. error |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]

    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    for r in records:
        shape = "x".join(map(str, r["shape"])) if isinstance(r["shape"], (list, tuple)) else r["shape"]
        lines.append(f"| {r['kernel']} | {shape} | {r['dtype']} | {f(r.get('ms_median'), '.3f')} | "
                     f"{f(r.get('kernel_ms'), '.3f')} | {f(r.get('gb_per_s'), '.0f')} | {f(r.get('reference_ms'), '.3f')} | "
                     f"{f(r.get('compiled_ms'), '.3f')} | {f(r.get('max_rel_err'), '.1e')} |")
    return "\n".join(lines) + "\n\n" + _source_line(records)


def demo_table(records):
    if not records:
        return "_No demo results committed yet._"
    out = []
    for run in records:
        lines = ["| arm | step ms (median) | tokens/s | final val loss | speedup vs dense | mean depth fraction |",
                 "|---|---:|---:|---:|---:|---:|"]
        for a in run["arms"]:
            depth = a.get("mean_depth_fraction")
            name = a["arm"] if a.get("policy") in (None, a["arm"]) else f"{a['arm']} ({a['policy']})"
            lines.append(f"| {name} | {a['step_ms_median']:.1f} | {a['tokens_per_s']:,.0f} | {a['final_val_loss']:.3f} | "
                         f"{a['speedup_vs_dense']:.3f}x | {'—' if depth is None else format(depth, '.3f')} |")
        out.append(f"`{run.get('command', 'cggr demo')}` on {run.get('device', '?')}:\n\n" + "\n".join(lines))
    return "\n\n".join(out)


def _compile_seconds(arm):
    """Seconds of the first steps far above the median step: torch.compile inside the budget (runs before
    the bench warmed every arm's routing up outside the budget)."""
    ms = arm.get("step_ms") or []
    med = sorted(ms)[len(ms) // 2] if ms else 0
    return sum(t - med for t in ms[:5] if t > 20 * med) / 1e3


def _tokens_per_step(cfg: dict) -> str:
    """A run's tokens per optimizer step: ``BxS`` for one micro-batch, ``T (BxS x A)`` with accumulation."""
    micro = f"{cfg['batch_size']}x{cfg['seq_len']}"
    accum = cfg.get("accum", 1)
    return micro if accum == 1 else f"{cfg['tokens_per_step']} ({micro} x {accum})"


def quality_table(records):
    if not records:
        return "_No quality results committed yet._"
    out = []
    for run in records:
        cfg, s = run["config"], run["summary"]
        budget = cfg["budget"]
        budget = f"{budget['steps']} steps" if budget.get("steps") else f"{budget['seconds']:g} s of training"
        corpus = run["data"][run["corpus"]]["source"].split("/")[-1]
        plot = run["_file"].replace(".json", ".png")
        # Files since the compile and liger dense arms name the best dense arm, the reference of the comparison.
        best = s.get("best_dense_arm")
        lines = [f"**{run['regime']}** — {cfg['model']} (d{cfg['d_model']} L{cfg['layers']}), {_tokens_per_step(cfg)}"
                 f" tokens/step, {budget} per arm, trained on {corpus}; {run['device']}, rev "
                 f"{(run.get('git_rev') or '?')[:7]}" + _merged_note(run) + f" ([plot]({plot}))", ""]
        if best is None:
            lines += ["| arm | steps | ms/step | speed vs dense | mean depth | final val loss | vs dense | "
                      "time to dense's final loss |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        else:
            lines += ["| arm | steps | ms/step | speed vs HF eager | speed vs best dense | mean depth | final val loss | "
                      "vs best dense | time to best dense's final loss | best dense's time to this loss |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        x = lambda v: "—" if v is None else f"{v:.2f}x"  # noqa: E731
        notes = []
        for arm in run["arms"]:
            if "error" in arm:  # an arm that failed: no row, a note
                notes.append(f"{arm['arm']}: failed at {arm['failed_at']}: {arm['error'].splitlines()[0]}")
                continue
            a = s["arms"][arm["arm"]]
            reach = "never" if a["time_to_dense_final_vs_dense"] is None else f"{a['time_to_dense_final_vs_dense']:.2f}x"
            name = arm["arm"]
            lost = _compile_seconds(arm)
            if lost > 1:
                name += " ¹"
                notes.append(f"¹ {arm['arm']}: its first steps took {lost:.0f} s more than its steady steps inside the "
                             "budget (compilation or first-use kernel tuning); not a fair wall-clock figure.")
            speed = x(a["speedup_vs_dense"]) + ("" if best is None else f" | {x(a['speedup_vs_best_dense'])}")
            behind = "" if best is None else f" {x(a.get('dense_time_to_this_final_vs_dense'))} |"
            lines.append(f"| {name} | {a['steps']} | {a['step_ms_median']:.1f} | {speed} | "
                         f"{a['mean_depth_fraction']:.2f} | {a['final_val_loss']:.4f} | {a['delta_vs_dense']:+.4f} | "
                         f"{reach} |{behind}")
        if best is None:
            spread = s.get("dense_seed_spread")
            lines += ["", ("Dense seed-to-seed spread (max - min of the final losses): " + (
                f"{spread:.4f}." if spread is not None else "not measured (one dense seed)."))] + notes
        else:
            rule = ("the fastest step: at equal steps the dense arms differ by rounding only"
                    if s.get("best_dense_by") == "step_ms_median" else "the lowest final loss")
            spreads = "; ".join(
                f"{b} {v:.4f} (seeds {', '.join(map(str, s['dense_seeds_by_base'][b]))})" if v is not None
                else f"{b} not measured (one seed)" for b, v in s["dense_seed_spread_by_base"].items())
            lines += ["", f"Reference: the best dense arm of seed 0, `{best}` ({rule}; final loss "
                          f"{s['dense_final_val_loss']:.4f}). Dense seed-to-seed spread (max - min of the final "
                          f"losses) per base: {spreads}."] + notes
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _merged_note(run) -> str:
    """What the heading says of a file whose arms ran in separate processes (``cggr bench quality --merge``)."""
    parts = run.get("merged_from")
    if not parts:
        return ""
    return f"; its arms ran in {len(parts)} processes, each alone on its GPU, merged by `--merge`"


def _load_quality(_name):
    records = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "quality", "quality-*.json"))):
        with open(path) as f:
            records.append(dict(json.load(f), _file=os.path.relpath(path, ROOT)))
    return records


def hf_trainer_table(records):
    if not records:
        return "_No HF Trainer example results committed yet._"
    out = []
    for run in records:
        a = run["args"]
        by_arm = {r["arm"]: r for r in run["results"]}
        plain, routed = by_arm["plain"], by_arm["cggr"]
        out.append(f"On {run['device']} (`--steps {a['steps']} --batch-size {a['batch_size']} --policy {a['policy']}`, "
                   f"rev {(run.get('git_rev') or '?')[:7]}): {plain['step_ms_median']:.1f} ms/step plain, "
                   f"{routed['step_ms_median']:.1f} ms/step with the callback "
                   f"({plain['step_ms_median'] / routed['step_ms_median']:.2f}x), final training loss "
                   f"{plain['final_train_loss']:.2f} against {routed['final_train_loss']:.2f}.")
    return "\n\n".join(out)


def _quality_runs(records):
    """The equal wall-clock runs measured against the best dense arm (HF eager, ``torch.compile``, Liger-Kernel),
    with their routed arms (cggr's policies; not dense, not the random-LTD peer) that did not fail."""
    runs = []
    for run in records:
        s = run["summary"]
        if not s.get("best_dense_arm") or not run["config"]["budget"].get("seconds"):
            continue
        routed = [a["arm"] for a in run["arms"] if "error" not in a and a.get("policy") in ROUTING_POLICIES]
        runs.append((run, [(name, s["arms"][name]) for name in routed]))
    return runs


# The policies of cggr's router (an arm with one of them is a routed arm).
ROUTING_POLICIES = ("random", "difficulty", "sampled")


def quality_summary(records):
    """One row per equal wall-clock run against the best dense arm: its routed arm closest to the best dense
    arm's final loss, and whether any routed arm reached that loss within its budget."""
    runs = _quality_runs(records)
    if not runs:
        return "_No committed quality run compares routed arms with the best dense arm at equal wall-clock yet._"
    lines = ["| run | best dense arm | its seed spread | routed arms | reached its final loss | closest routed arm | "
             "its final loss vs best dense | best dense's time to that loss |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for run, routed in runs:
        cfg, s = run["config"], run["summary"]
        base = s["arms"][s["best_dense_arm"]]["backend"]
        spread = s["dense_seed_spread_by_base"].get(base)
        seeds = len(s["dense_seeds_by_base"].get(base, ()))
        spread = "—" if spread is None else f"{spread:.3f} ({seeds} seeds)"
        label = (f"[{cfg['model']} {run['regime']}, {_tokens_per_step(cfg)} tokens/step, "
                 f"{cfg['budget']['seconds']:g} s]({run['_file']})")
        reached = sum(a["time_to_dense_final_vs_dense"] is not None for _, a in routed)
        if routed:
            name, a = min(routed, key=lambda na: na[1]["delta_vs_dense"])
            t = a.get("dense_time_to_this_final_vs_dense")
            closest = f"`{name}` | {a['delta_vs_dense']:+.3f} | {'—' if t is None else f'{t:.2f}x'}"
        else:
            closest = "— | — | —"
        lines.append(f"| {label} | `{s['best_dense_arm']}` | {spread} | {len(routed)} | {reached} | {closest} |")
    return "\n".join(lines)


def quality_headline(records):
    """The README's quality verdict in one sentence, counted from the same runs as :func:`quality_summary`."""
    runs = _quality_runs(records)
    if not runs:
        return "_No committed quality run compares routed arms with the best dense arm at equal wall-clock yet._"
    arms = [(run, name, a) for run, routed in runs for name, a in routed]
    reached = sum(a["time_to_dense_final_vs_dense"] is not None for _, _, a in arms)
    run, name, a = min(arms, key=lambda x: x[2]["delta_vs_dense"])
    cfg = run["config"]
    verdict = ("none of them reached" if reached == 0 else f"{reached} of them reached")
    return (f"At equal wall-clock against the fastest dense arm of each run, in {len(runs)} committed runs with "
            f"{len(arms)} routed arms, {verdict} the best dense arm's final validation loss within its budget; the "
            f"closest ended {a['delta_vs_dense']:+.3f} above it ({cfg['model']} {run['regime']}, "
            f"{_tokens_per_step(cfg)} tokens per step, `{name}`).")


TABLES = {"speed": speed_table, "speed-headline": speed_headline, "speed-phases": speed_phases_table,
          "parallel": parallel_table, "kernels": kernels_table, "demo": demo_table, "quality": quality_table,
          "quality-summary": quality_summary, "quality-headline": quality_headline, "hf-trainer": hf_trainer_table}
LOADERS = {"quality": _load_quality, "quality-summary": _load_quality, "quality-headline": _load_quality,
           "speed-headline": lambda _name: _load("speed"), "speed-phases": lambda _name: _load("speed")}

# Every generated section: its marker -> a function building its text (links relative to the repository root).
SECTIONS = {f"results:{name}": (lambda name=name, fn=fn: fn(LOADERS.get(name, _load)(name)))
            for name, fn in TABLES.items()}
SECTIONS["generated:options"] = options_table
SECTIONS["generated:supported-models"] = supported_models_table

# Which file holds which generated sections. A listed marker missing from its file is an error: a table dropped
# from the documentation by an edit must not go unnoticed.
TARGETS = {
    "docs/results.md": tuple(f"results:{name}" for name in TABLES),
    "README.md": ("results:speed-headline", "results:quality-headline", "generated:options",
                  "generated:supported-models"),
}


def _rebase_links(text: str, folder: str) -> str:
    """Markdown links written relative to the repository root, made relative to ``folder`` (a path in it)."""
    if not folder:
        return text

    def rebase(m):
        target = m.group(2)
        if re.match(r"[a-z]+:|/|#", target):
            return m.group(0)
        return m.group(1) + os.path.relpath(target, folder).replace(os.sep, "/") + m.group(3)

    return re.sub(r"(\]\()([^)\s]+)(\))", rebase, text)


def render(text: str, sections=None, folder: str = "", built: dict | None = None) -> str:
    """``text`` with every section of ``sections`` (default: all of :data:`SECTIONS`) rebuilt; ``folder`` is the
    file's folder in the repository (for links); ``built`` caches section texts between files."""
    built = {} if built is None else built
    for key in SECTIONS if sections is None else sections:
        pattern = re.compile(rf"(<!-- {re.escape(key)} -->\n)(?:.*?\n)?(<!-- /{re.escape(key)} -->)", re.S)
        if not pattern.search(text):
            if sections is None:
                continue
            raise ValueError(f"no generated section {key!r} (<!-- {key} --> ... <!-- /{key} -->)")
        if key not in built:
            built[key] = SECTIONS[key]()
        body = _rebase_links(built[key], folder)
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help=f"fail if a generated section of {' or '.join(TARGETS)} differs from the regenerated one")
    a = p.parse_args(argv)
    built, stale = {}, []
    for rel, sections in TARGETS.items():
        path = os.path.join(ROOT, rel)
        with open(path) as f:
            old = f.read()
        try:
            new = render(old, sections, os.path.dirname(rel), built)
        except ValueError as e:
            print(f"{rel}: {e}", file=sys.stderr)
            return 1
        if new == old:
            continue
        stale.append(rel)
        if not a.check:
            with open(path, "w") as f:
                f.write(new)
    if a.check and stale:
        print(f"stale generated sections in {', '.join(stale)}: run python -m benchmarks.report", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
