"""The training loop shared by ``cggr demo`` and ``cggr bench quality``.

One arm = one model trained on a stream of batches for a *budget*: a number of
optimizer steps (equal-step comparisons) or a number of training seconds
(equal wall-clock comparisons). Everything that changes over training is a
function of the elapsed fraction ``f`` of that budget (steps done / steps, or
seconds spent / seconds), so the same schedule fits both kinds of budget:

* learning rate: linear warm-up over ``lr_warmup`` of the budget, then cosine
  decay to 10 % at ``f = 1``;
* cggr curriculum (routed arms): :func:`cggr.bucketing.schedule_progress` of
  ``f`` with the arm's warm-up and hand-back fractions, set on the router with
  ``Router.set_progress`` before every step (the router still counts steps);
* random-LTD (the ``ltd`` arms, :mod:`cggr_lab.ltd`): the kept token fraction of
  the middle layers, set with ``RandomLTD.set_fraction(f)`` before every step;
* validation: at ``f = 0`` and each time ``f`` crosses one of ``eval_at``.

An optimizer step may accumulate the gradients of ``accum`` micro-batches
(each one its own forward, with its own routing, and backward of its loss
divided by ``accum``): the tokens per step are ``accum`` micro-batches' worth.

Step time covers the forward, backward, optimizer step and scheduler, with a
device synchronisation on both sides; evaluation is not timed, so "seconds"
means training seconds.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from cggr.bucketing import schedule_progress


@dataclass(frozen=True)
class Budget:
    """How long an arm trains: ``steps`` optimizer steps or ``seconds`` of training time."""

    steps: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.seconds is None):
            raise ValueError("a budget is either steps or seconds, exactly one of them")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"seconds must be > 0, got {self.seconds}")

    def fraction(self, steps_done: int, seconds_done: float) -> float:
        if self.steps is not None:
            return min(1.0, steps_done / self.steps)
        return min(1.0, seconds_done / self.seconds)

    def describe(self) -> str:
        return f"{self.steps} steps" if self.steps is not None else f"{self.seconds:g} s"


def build_llama(d_model: int, layers: int, heads: int, vocab_size: int, seq_len: int, eot: int):
    """A Llama-style config and random-init model (MLP width ``64*ceil(8d/3/64)``: 2048 for d768)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=64 * math.ceil(8 * d_model / 3 / 64),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=seq_len, tie_word_embeddings=False, use_cache=False,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=None)
    return config, LlamaForCausalLM(config)


def lr_factor(fraction: float, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the budget, cosine decay to 10 % at the end."""
    if fraction < warmup:
        return max(fraction / warmup, 1e-3)
    progress = min(1.0, (fraction - warmup) / max(1e-9, 1.0 - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay 0.1 on matrices only, betas (0.9, 0.95)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


@torch.no_grad()
def val_loss(model: torch.nn.Module, batches: Sequence[torch.Tensor], device: torch.device) -> float:
    """Mean loss over fixed validation batches, in eval mode (no routing)."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x in batches:
        x = x.to(device, non_blocking=True)
        total += model(input_ids=x, labels=x).loss.double()
    model.train()
    return total.item() / len(batches)


def free_memory(device: torch.device) -> None:
    """Collect the last arm's model and optimizer and hand cached GPU memory back, so arms start equal."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: torch.nn.Module, ids: torch.Tensor | Sequence[torch.Tensor], opt: torch.optim.Optimizer,
               router=None, autocast=None, mark=None) -> torch.Tensor:
    """One language-model training step on ``ids`` (labels = inputs, HF's loss), or on a sequence of
    micro-batches whose gradients accumulate: per micro-batch a forward (under ``autocast()`` when given) and
    the backward of its loss divided by their number; then the optimizer step and the curriculum step.
    Returns the (mean) loss, a device scalar.

    The step every cggr loop and benchmark times (the timing, and any synchronisation, stay the caller's).
    ``mark(phase)``, when given, is called as each phase has been issued ("forward", "backward", "optimizer";
    forward and backward once per micro-batch): the speed benchmark's per-phase timing
    (:func:`benchmarks.speed.phase_times`) records its events there.
    """
    mark = mark or (lambda phase: None)
    micro = [ids] if isinstance(ids, torch.Tensor) else list(ids)
    total = None
    for x in micro:
        if autocast is None:
            loss = model(input_ids=x, labels=x).loss
        else:
            with autocast():
                loss = model(input_ids=x, labels=x).loss
        mark("forward")
        (loss / len(micro) if len(micro) > 1 else loss).backward()
        mark("backward")
        total = loss.detach() if total is None else total + loss.detach()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if router is not None:
        router.step()
    mark("optimizer")
    return total / len(micro)


def train_arm(model: torch.nn.Module, batches: Iterator[torch.Tensor], val_batches: Sequence[torch.Tensor], *,
              budget: Budget, lr: float, lr_warmup: float = 0.1, router=None, routing_warmup: float = 0.2,
              routing_handback: float = 0.0, token_drop=None, eval_at: Sequence[float] = (), device: torch.device,
              desc: str = "train", eval_model: torch.nn.Module | None = None, accum: int = 1) -> dict:
    """Train ``model`` in place for ``budget``; returns its curves and per-step records. Each optimizer step
    accumulates ``accum`` micro-batches of ``batches``.

    ``router`` (from ``cggr.attach``, or None for dense) gets its curriculum
    progress from the budget fraction: full depth at the start, target depths
    after ``routing_warmup`` of the budget, back to full depth linearly over the
    last ``routing_handback`` of it. ``token_drop`` (a :class:`cggr_lab.ltd.RandomLTD`, or None) gets the
    budget fraction before every step; its metrics are recorded like a router's. ``eval_model`` (default
    ``model``) is the module validation runs: ``torch.compile(m)`` trains and ``m`` validates (the same
    weights; evaluation is not timed, and an eval graph would be one more compilation).
    """
    from tqdm.auto import tqdm

    opt = adamw(model, lr)
    targets = sorted({float(f) for f in eval_at if 0.0 < f < 1.0}) + [1.0]
    evaluated = model if eval_model is None else eval_model
    curve = {"step": [0], "train_seconds": [0.0], "val_loss": [val_loss(evaluated, val_batches, device)]}
    step_ms, train_loss, metrics, depth_progress = [], [], [], []
    elapsed, step, fraction = 0.0, 0, 0.0
    total = budget.steps if budget.steps is not None else None
    # Bars only on a terminal (disable=None): a log file gets the one-line summaries instead.
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5, file=sys.stderr,
               disable=None)
    while fraction < 1.0:
        # A step budget knows where this step ends: its rate rises to the peak at the warm-up's last step.
        lr_at = budget.fraction(step + 1, elapsed) if budget.steps is not None else fraction
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(lr_at, lr_warmup)
        if router is not None:
            p = schedule_progress(fraction, routing_warmup, 1.0, routing_handback)
            router.set_progress(p)
            depth_progress.append(p)
        if token_drop is not None:
            token_drop.set_fraction(fraction)
        x = [next(batches).to(device, non_blocking=True) for _ in range(accum)]
        sync(device)
        t0 = time.perf_counter()
        if token_drop is not None and hasattr(token_drop, "before_step"):
            # An arm's own work before the step, timed: VCAS's variance probe (cggr_lab.vcas) draws its batches here.
            token_drop.before_step(batches)
        loss = train_step(model, x, opt, router)
        sync(device)
        dt = time.perf_counter() - t0
        elapsed += dt
        step += 1
        step_ms.append(1e3 * dt)
        train_loss.append(loss.item())
        if router is not None or token_drop is not None:
            metrics.append({k: float(v) for t in (router, token_drop) if t is not None
                            for k, v in t.metrics().items()})
        fraction = budget.fraction(step, elapsed)
        if fraction >= targets[0] or fraction >= 1.0:
            while targets and fraction >= targets[0]:
                targets.pop(0)
            curve["step"].append(step)
            curve["train_seconds"].append(elapsed)
            curve["val_loss"].append(val_loss(evaluated, val_batches, device))
            bar.set_postfix(loss=f"{train_loss[-1]:.3f}", val=f"{curve['val_loss'][-1]:.3f}")
        bar.update(1)
    bar.close()
    if router is not None:
        router.set_progress(None)
    depth = [m["mean_depth_fraction"] for m in metrics if "mean_depth_fraction" in m]
    return {
        **curve,
        "steps": step,
        "accum": accum,
        "step_ms": step_ms,
        "train_loss": train_loss,
        "router_metrics": metrics,
        "routing_progress": depth_progress,
        "final_val_loss": curve["val_loss"][-1],
        "train_seconds_total": elapsed,
        # Averaged over every training step, schedule included; dense is 1 by definition.
        # random-LTD: the fraction of (token, layer) pairs computed, forward and backward.
        "mean_depth_fraction": statistics.fmean(depth) if depth else (
            1.0 if router is None and token_drop is None else None),
    }


def median_step_ms(step_ms: Sequence[float], skip: int = 3) -> float:
    """Median step time without the first ``skip`` steps (compilation, allocator warm-up)."""
    tail = list(step_ms[skip:]) or list(step_ms)
    return statistics.median(tail)


def first_reach(xs: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """The first ``x`` at which the curve reaches ``target`` (linear between evaluations), or None."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(xs[0])
            x0, x1, l0 = xs[i - 1], xs[i], losses[i - 1]
            return float(x0 + (x1 - x0) * (l0 - target) / max(l0 - loss, 1e-12))
    return None
