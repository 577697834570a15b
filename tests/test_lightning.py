"""The PyTorch Lightning callback: attach, one curriculum step per optimizer step under gradient accumulation,
``cggr/`` metrics at the log interval, checkpoint save + resume of the curriculum step, detach at teardown."""

import logging
import warnings

import pytest
import torch

pytest.importorskip("transformers")
try:
    import lightning.pytorch as pl
except ImportError:
    pl = pytest.importorskip("pytorch_lightning")

from tests.tiny import TokenDataset, hf_model  # noqa: E402

VOCAB = 97


def _Tokens(n=32, seq=12, seed=0):
    return TokenDataset(VOCAB, n, seq, seed)


class _LitLM(pl.LightningModule):
    """A LightningModule that wraps a tiny HF Llama as ``self.model``."""

    def __init__(self):
        super().__init__()
        self.model = hf_model("llama", seed=1)
        self.forwards = 0
        self.optimizer_steps = 0

    def training_step(self, batch, batch_idx):
        self.forwards += 1
        loss = self.model(**batch).loss
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def optimizer_step(self, *args, **kwargs):
        self.optimizer_steps += 1
        return super().optimizer_step(*args, **kwargs)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Tokens(), batch_size=2, shuffle=False)


class _MemoryLogger(pl.loggers.Logger):
    """Keeps every ``log_metrics`` call: (step, metrics)."""

    def __init__(self):
        super().__init__()
        self.records = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))


def _fit(tmp_path, max_steps, ckpt_path=None, log_every_n_steps=1, **cb_kwargs):
    from cggr.integrations import CGGRLightningCallback

    module = _LitLM()
    callback = CGGRLightningCallback(num_buckets=4, warmup_steps=4, **cb_kwargs)
    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step_at_start"] = callback.router.metrics()["step"]
            seen["attached"] = getattr(pl_module.model, "_cggr_router", None) is callback.router

        def on_train_end(self, trainer, pl_module):
            seen["attached_at_end"] = getattr(pl_module.model, "_cggr_router", None) is callback.router
            seen["step_at_end"] = callback.router.metrics()["step"]

    log = _MemoryLogger()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1,
                                        save_last=False)
    trainer = pl.Trainer(max_steps=max_steps, accumulate_grad_batches=2, accelerator="cpu", devices=1,
                         logger=log, log_every_n_steps=log_every_n_steps, callbacks=[callback, Probe(), ckpt],
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module, callback, log, seen


def _cggr_records(log):
    return {step: m for step, m in log.records if any(k.startswith("cggr/") for k in m)}


def test_lightning_callback_steps_logs_checkpoint_and_resume(tmp_path):
    trainer, module, callback, log, seen = _fit(tmp_path, max_steps=4)
    router = callback.router
    assert router is not None and router.model is module.model and router.layer_path == "model.layers"
    assert seen["attached"] and seen["attached_at_end"] and seen["step_at_start"] == 0
    # 4 optimizer steps of 2 accumulated micro-batches: the curriculum steps once per optimizer step
    assert module.forwards == 8 and module.optimizer_steps == 4 == trainer.global_step
    assert seen["step_at_end"] == 4 == router.metrics()["step"]
    # teardown detached the router from the model; the callback keeps it readable
    assert getattr(module.model, "_cggr_router", None) is None

    records = _cggr_records(log)
    assert sorted(records) == [0, 1, 2, 3]  # Lightning's logger step counts finished optimizer steps from 0
    for logger_step, m in records.items():
        assert m["cggr/step"] == logger_step + 1
        assert {"cggr/mean_depth_fraction", "cggr/backward_flops_skipped", "cggr/valid_tokens"} <= set(m)
    assert records[0]["cggr/mean_depth_fraction"] > records[3]["cggr/mean_depth_fraction"]  # the curriculum moved
    assert trainer.callback_metrics["cggr/step"].item() == 4

    # The checkpoint at optimizer step 2 holds the router state in the callback state.
    path = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("CGGRLightningCallback")]
    assert int(state["router"]["step_count"]) == 2

    # Resume from it (a fresh module and callback): step 2 at train start, 4 at the end, same metrics.
    trainer2, module2, callback2, log2, seen2 = _fit(tmp_path / "resume", max_steps=4, ckpt_path=str(path))
    assert seen2["step_at_start"] == 2 and trainer2.global_step == 4
    assert module2.forwards == 4 and callback2.router.metrics()["step"] == 4
    records2 = _cggr_records(log2)
    assert sorted(records2) == [2, 3]
    for step in (2, 3):
        for key in ("cggr/step", "cggr/mean_depth_fraction", "cggr/backward_flops_skipped"):
            assert records2[step][key] == pytest.approx(records[step][key], rel=1e-5), (step, key)


def test_lightning_callback_logs_at_the_log_interval_only(tmp_path):
    _, _, callback, log, _ = _fit(tmp_path, max_steps=4, log_every_n_steps=2)
    records = _cggr_records(log)
    assert sorted(records) == [1, 3] and records[3]["cggr/step"] == 4  # optimizer steps 2 and 4
    assert callback.router.metrics()["step"] == 4


def test_lightning_callback_options():
    from cggr.integrations import CGGRLightningCallback

    with pytest.raises(TypeError, match="options of cggr.attach"):
        CGGRLightningCallback(bogus=1)
    module = _LitLM()
    cb = CGGRLightningCallback(warmup_steps=3, model_attr="model")
    cb.load_state_dict({"router": {"step_count": torch.tensor(2)}})  # a checkpoint read before the model exists
    cb.setup(None, module, "fit")
    assert cb.router.model is module.model and cb.router.metrics()["step"] == 2
    assert int(cb.state_dict()["router"]["step_count"]) == 2
    cb.teardown(None, module, "fit")
    assert getattr(module.model, "_cggr_router", None) is None
    with pytest.raises(AttributeError, match="model_attr"):
        CGGRLightningCallback(model_attr="missing").on_fit_start(None, module)


def test_lightning_callback_handback_takes_max_steps(tmp_path):
    """handback_steps without total_steps: the Trainer's max_steps is the length of training."""
    _, _, callback, _, _ = _fit(tmp_path, max_steps=6, handback_steps=2, detach_on_teardown=False)
    assert callback.router.config.total_steps == 6 and callback.router.config.handback_steps == 2
    assert callback.router.bucket_depths() == [4, 4, 4, 4]  # handed back: full depth at the end


def test_lightning_callback_takes_config_by_keyword_and_refuses_bad_switches():
    import cggr
    from cggr.integrations import CGGRLightningCallback

    config = cggr.RoutingConfig(num_buckets=2, warmup_steps=5)
    assert CGGRLightningCallback(config=config).options.resolve(None) == config
    assert CGGRLightningCallback(config).options.resolve(None) == config
    for name, bad in (("log_metrics", "no"), ("detach_on_teardown", 1)):
        with pytest.raises(ValueError, match=f"CGGRLightningCallback: {name} must be True or False"):
            CGGRLightningCallback(**{name: bad})
    with pytest.raises(ValueError, match="model_attr must be None or a dotted attribute path"):
        CGGRLightningCallback(model_attr=["model"])
