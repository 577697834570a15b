"""``CGGRLightningCallback``: cggr in a PyTorch Lightning ``Trainer`` with one argument.

    trainer = L.Trainer(max_steps=1000, accumulate_grad_batches=4,
                        callbacks=[CGGRLightningCallback(num_buckets=4, warmup_steps=200)])

What the callback does, hook by hook:

* ``setup`` (stage ``"fit"``), or ``on_fit_start`` when the model is only
  built in ``configure_model``: attaches the router to the model that returns
  the logits: ``pl_module.<model_attr>`` (a dotted path; by default the
  LightningModule's ``model`` attribute when it is an ``nn.Module``, else the
  LightningModule itself, whose ``forward`` must then return logits).
  ``training_step`` must run that module's forward (``self.model(...)`` or
  ``self(...)``) with ``input_ids`` / ``labels`` / ``attention_mask`` as usual.
  A model that already has a router keeps it; nothing is attached twice.
* ``on_train_start``: sets the curriculum step to ``trainer.global_step``
  (restored by Lightning when ``fit(ckpt_path=...)`` resumes); the router
  state saved in the checkpoint is checked against it.
* ``on_train_batch_end``: ``router.step()`` once per optimizer step, i.e. only
  for a batch after which ``trainer.global_step`` moved, so that
  ``accumulate_grad_batches`` micro-batches advance the curriculum once.
  On the batches where Lightning writes to its loggers (every
  ``log_every_n_steps`` optimizer steps) the router's metrics are logged
  with ``pl_module.log_dict`` under ``cggr/`` names: one host synchronisation
  per logging step, none per micro-batch.
* ``state_dict`` / ``load_state_dict``: the router's state (the curriculum
  step) goes into Lightning checkpoints with the callback state.
* ``teardown``: detaches the router (``detach_on_teardown=False`` keeps it).

Lightning is imported when this module is; ``lightning`` is preferred and the
older ``pytorch_lightning`` package is accepted when it is the only one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.nn as nn

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("CGGRLightningCallback needs PyTorch Lightning: pip install lightning") from e

from ..config import RoutingConfig
from ..router import Router, attach
from ..wrapper import CGGRWrapper
from ._common import METRIC_PREFIX, CallbackOptions, check_flags, unwrap_model

logger = logging.getLogger("cggr")





class CGGRLightningCallback(Callback):
    """Routes the backward pass of a Lightning ``Trainer``'s model with cggr.

    Takes the options of :func:`cggr.attach`: a :class:`cggr.RoutingConfig` and/or
    its fields by name (``num_buckets=4``, ``warmup_steps=200``, ...);
    ``warmup_steps`` counts optimizer steps.

    Args:
        model_attr: dotted attribute path from the LightningModule to the model
            whose forward returns logits. ``None`` (default): ``"model"`` when
            that attribute is an ``nn.Module``, else the LightningModule
            itself; ``""`` always means the LightningModule.
        log_metrics: ``False`` logs nothing.
        detach_on_teardown: ``False`` leaves the router attached after ``fit``.

    The router is ``callback.router`` once ``fit`` has begun.
    """

    def __init__(self, config: RoutingConfig | None = None, *,
                 model_attr: str | None = None, log_metrics: bool = True, detach_on_teardown: bool = True,
                 **overrides: Any):
        self.options = CallbackOptions("CGGRLightningCallback", config, overrides)
        check_flags("CGGRLightningCallback", log_metrics=log_metrics, detach_on_teardown=detach_on_teardown)
        if model_attr is not None and not isinstance(model_attr, str):
            raise ValueError(f"CGGRLightningCallback: model_attr must be None or a dotted attribute path (a str), "
                             f"got {model_attr!r}")
        self.model_attr = model_attr
        self.log_metrics = log_metrics
        self.detach_on_teardown = detach_on_teardown
        self.router: Router | None = None
        self._owns_router = False
        self._pending_state: dict | None = None  # loaded from a checkpoint before the router existed
        self._loaded_step: int | None = None
        self._seen_global_step: int | None = None
        self._trainer = None  # set at setup: handback_steps may need its length of training

    @property
    def attach_kwargs(self) -> dict[str, Any]:
        """The cggr options this callback attaches with, by name."""
        return self.options.by_name

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**{f.name: getattr(self.options.checked, f.name)
                                           for f in dataclasses.fields(self.options.checked)
                                           if isinstance(getattr(self.options.checked, f.name),
                                                         (int, float, str, bool, type(None)))})

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._trainer = trainer
            self._maybe_attach(pl_module, required=False)  # the model may only exist after configure_model

    def on_fit_start(self, trainer, pl_module) -> None:
        self._trainer = trainer
        self._maybe_attach(pl_module, required=True)

    def on_train_start(self, trainer, pl_module) -> None:
        router = self._maybe_attach(pl_module, required=True)
        step = int(trainer.global_step)
        if self._loaded_step is not None and self._loaded_step != step:
            logger.warning("cggr: the checkpoint's router state is at step %d but Lightning resumes at "
                           "global_step %d; the curriculum follows global_step", self._loaded_step, step)
        if router.metrics()["step"] != step:
            router.load_state_dict({**router.state_dict(), "step_count": torch.tensor(step, dtype=torch.long)})
        self._seen_global_step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        router = self.router
        if router is None:
            return
        step = int(trainer.global_step)
        seen = step if self._seen_global_step is None else self._seen_global_step
        if step == seen:
            return  # a micro-batch of an unfinished accumulation cycle: no optimizer step yet
        for _ in range(step - seen):  # one per optimizer step (several optimizers step several times)
            router.step()
        self._seen_global_step = step
        if self.log_metrics and self._should_log(trainer):
            metrics = {METRIC_PREFIX + k: float(v) for k, v in router.metrics().items()}
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, logger=True, batch_size=1)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.detach_on_teardown and self.router is not None and self._owns_router:
            self.router.detach()  # callback.router stays readable (metrics, state_dict)
            self._owns_router = False

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.router is None:
            return {} if self._pending_state is None else {"router": dict(self._pending_state)}
        return {"router": {k: v.detach().cpu().clone() for k, v in self.router.state_dict().items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("router")
        if saved is None:
            return
        self._loaded_step = int(saved.get("step_count", -1))
        if self.router is not None:
            self.router.load_state_dict(saved)
        else:
            self._pending_state = dict(saved)

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _should_log(trainer) -> bool:
        """Whether Lightning writes to its loggers after this batch (every ``log_every_n_steps`` optimizer steps)."""
        n = int(getattr(trainer, "log_every_n_steps", 50) or 0)
        if n <= 0:
            return False
        if getattr(trainer, "fast_dev_run", False) or getattr(trainer, "should_stop", False):
            return True
        return trainer.global_step % n == 0 or (trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps)

    def _target(self, pl_module: nn.Module) -> nn.Module | None:
        attr = self.model_attr
        if attr is None:
            inner = getattr(pl_module, "model", None)
            return inner if isinstance(inner, nn.Module) else pl_module
        obj = pl_module
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        if not isinstance(obj, nn.Module):
            raise TypeError(f"CGGRLightningCallback: pl_module.{attr} is a {type(obj).__name__}, not an nn.Module")
        return obj

    def _max_steps(self) -> int | None:
        trainer = self._trainer
        if trainer is None:
            return None
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            return int(trainer.estimated_stepping_batches)
        except Exception:  # the length of training is unknown (infinite or not set up yet)
            return None

    def _maybe_attach(self, pl_module: nn.Module, required: bool) -> Router | None:
        target = self._target(pl_module)
        if target is None:
            if required:
                raise AttributeError(f"CGGRLightningCallback: the LightningModule has no attribute "
                                     f"{self.model_attr!r} (model_attr)")
            return None
        target = unwrap_model(target)
        if self.router is not None:
            if self.router.model is target and getattr(target, "_cggr_router", None) is self.router:
                return self.router
            if self._owns_router:
                self.router.detach()
            previous_state = self.router.state_dict()
            self.router = None
        else:
            previous_state = None
        existing = target.router if isinstance(target, CGGRWrapper) else getattr(target, "_cggr_router", None)
        if isinstance(existing, Router):
            logger.warning("cggr: the model already has a router (%s); CGGRLightningCallback uses it and ignores "
                           "its own options", existing.extra_repr())
            self.router, self._owns_router = existing, False
        else:
            self.router, self._owns_router = attach(target, self.options.resolve(self._max_steps())), True
        state = self._pending_state if self._pending_state is not None else previous_state
        if state is not None:
            self.router.load_state_dict(state)
            self._pending_state = None
        return self.router
