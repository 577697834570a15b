"""``CGGRCallback``: cggr in a Hugging Face ``Trainer`` with one argument.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[CGGRCallback(num_buckets=4, warmup_steps=200)])

What the callback does, event by event:

* ``on_train_begin``: attaches the router to the Trainer's model (the module
  under any DDP / DataParallel / DeepSpeed wrapper; a PEFT model stays as it
  is, its forward is the one that returns logits). A model that already has a
  router, and a second ``train()`` call, reuse the router: nothing is attached
  twice. The curriculum step is then set to ``state.global_step``, which the
  Trainer has already restored when it resumes from a checkpoint; the
  checkpoint's ``cggr_state.pt``, when there is one, is loaded and checked
  against it.
* ``on_step_end`` (once per optimizer step, however many micro-batches are
  accumulated): ``router.step()``. So the curriculum step always equals the
  Trainer's ``global_step``; don't also call ``router.attach_optimizer``.
* ``on_log``: adds ``router.metrics()`` (the last training forward's routing)
  to the training logs under ``cggr/`` names. That is one host
  synchronisation per logging step, none per micro-batch. Evaluation logs
  are left alone.
* ``on_save``: writes the router's ``state_dict()`` to
  ``<checkpoint folder>/cggr_state.pt``.

Reporting integrations (W&B, TensorBoard, ... from ``report_to``) are put
ahead of user callbacks, so they receive ``on_log`` before this callback has
added its metrics; ``callback.install(trainer)`` moves the callback in front
of them. ``trainer.state.log_history`` gets the metrics either way.

Each micro-batch is routed from its own logits; its backward uses that
routing, and gradient accumulation sums those routed gradients.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn as nn
from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import RoutingConfig
from ..router import Router, attach
from ..wrapper import CGGRWrapper
from ._common import METRIC_PREFIX, CallbackOptions, check_flags, unwrap_model

logger = logging.getLogger("cggr")

CGGR_STATE_NAME = "cggr_state.pt"


# Keys that mark the logs of an evaluation (``metric_key_prefix`` of Trainer.evaluate/predict).
_EVAL_PREFIXES = ("eval_", "test_")



class CGGRCallback(TrainerCallback):
    """Routes the backward pass of a ``transformers.Trainer``'s model with cggr.

    Takes the options of :func:`cggr.attach`: a :class:`cggr.RoutingConfig` and/or
    its fields by name (``num_buckets=4``, ``warmup_steps=200``, ...);
    ``warmup_steps`` counts optimizer steps. ``log_metrics=False`` leaves the logs alone.

    The router is ``callback.router`` once training has begun. It stays
    attached after training; ``callback.router.detach()`` removes it.
    """

    def __init__(self, config: RoutingConfig | None = None, *,
                 log_metrics: bool = True, **overrides: Any):
        self.options = CallbackOptions("CGGRCallback", config, overrides)
        check_flags("CGGRCallback", log_metrics=log_metrics)
        self.log_metrics = log_metrics
        self.router: Router | None = None

    @property
    def attach_kwargs(self) -> dict[str, Any]:
        """The cggr options this callback attaches with, by name."""
        return self.options.by_name

    def install(self, trainer) -> "CGGRCallback":
        """Add this callback to ``trainer`` ahead of the reporting integrations, so they log ``cggr/`` metrics."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        first = 1 if callbacks and isinstance(callbacks[0], DefaultFlowCallback) else 0
        callbacks.insert(first, self)
        return self

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("CGGRCallback: the Trainer passed no model to on_train_begin")
        router = self._router_for(unwrap_model(model), state.max_steps)
        self._restore_step(router, args, state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.router is not None:
            self.router.step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_metrics or self.router is None or logs is None:
            return
        if any(k.startswith(_EVAL_PREFIXES) for k in logs):
            return  # no training forward behind an evaluation's logs
        metrics = {METRIC_PREFIX + k: v for k, v in self.router.metrics().items()}
        # Trainer.log appended a copy of ``logs`` to the history before calling the callbacks.
        history = state.log_history
        if history and history[-1].get("step") == state.global_step and all(k in history[-1] for k in logs):
            history[-1].update(metrics)
        logs.update(metrics)

    def on_save(self, args, state, control, **kwargs):
        if self.router is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            logger.warning("cggr: checkpoint folder %s not found; the router state was not saved", folder)
            return
        torch.save(self.router.state_dict(), os.path.join(folder, CGGR_STATE_NAME))

    # --------------------------------------------------------------- helpers
    def _router_for(self, model: nn.Module, max_steps: int | None = None) -> Router:
        if self.router is not None:
            if self.router.model is model:
                return self.router  # a second train() on the same model
            self.router.detach()  # the Trainer has a new model (model_init): route that one
            self.router = None
        existing = model.router if isinstance(model, CGGRWrapper) else getattr(model, "_cggr_router", None)
        if isinstance(existing, Router):
            logger.warning("cggr: the model already has a router (%s); CGGRCallback uses it and ignores its own "
                           "options", existing.extra_repr())
            self.router = existing
        else:
            self.router = attach(model, self.options.resolve(max_steps))
        return self.router

    def _restore_step(self, router: Router, args, state) -> None:
        """Set the curriculum step to the Trainer's ``global_step`` (restored by the Trainer on resume)."""
        step = int(state.global_step)
        saved = self._saved_state(args, step) if step > 0 else None
        if saved is not None:
            saved_step = int(saved.get("step_count", -1))
            if saved_step == step:
                router.load_state_dict(saved)
                return
            logger.warning("cggr: the checkpoint's router state is at step %d but the Trainer resumes at "
                           "global_step %d; the curriculum follows global_step", saved_step, step)
        router.load_state_dict({**router.state_dict(), "step_count": torch.tensor(step, dtype=torch.long)})

    @staticmethod
    def _saved_state(args, step: int) -> dict | None:
        folders = []
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            folders.append(args.resume_from_checkpoint)
        folders.append(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}"))
        for folder in folders:
            path = os.path.join(folder, CGGR_STATE_NAME)
            if os.path.isfile(path):
                return torch.load(path, map_location="cpu", weights_only=True)
        return None
