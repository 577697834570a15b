"""Integrations: the HF Trainer callback, gradient accumulation, PEFT/LoRA, HF activation checkpointing,
``python -m cggr.env_report``. Routed gradients are compared with ``cggr.reference_routing`` on a copy of the
model taken before attaching (a deep copy of an attached model shares its routing)."""

import copy
import logging
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

import cggr
from cggr.adapters import find_layer_stack
from tests.tiny import TokenDataset, flat_grads, hf_model, routed_as

TOL = 1e-5
VOCAB = 97


def _assert_equal_grads(g_fast, g_ref):
    scale = max(v.norm().item() for v in g_ref.values())
    for name, ref in g_ref.items():
        err = (g_fast[name] - ref).norm().item() / max(ref.norm().item(), 1e-3 * scale)
        assert err < TOL, f"{name}: relative error {err:.2e}"


def _reference_backward(ref_model, batches_and_routings, scale=1.0):
    """Backward of every (inputs, routing) through ``ref_model`` under the reference of that routing (as
    :func:`tiny.routed_as` gives it)."""
    _, blocks = find_layer_stack(ref_model)
    for inputs, how in batches_and_routings:
        with cggr.reference_routing(blocks, **how):
            (ref_model(**inputs).loss * scale).backward()


def _batch(seed, batch=2, seq=12, pad_from=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    am = torch.ones_like(ids)
    labels = ids.clone()
    if pad_from is not None:
        am[0, pad_from:] = 0
        labels[0, pad_from:] = -100
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


# The committed core has one routed backward; a core with ``attach(..., backward=)`` has the generic per-linear one
# and a compacted per-family one ("auto", taken by Llama blocks). Both are checked where they exist.
_HAS_BACKWARD_OPTION = "backward" in cggr.config.OPTION_NAMES
_BACKWARDS = ["generic", "auto"] if _HAS_BACKWARD_OPTION else [None]


def _attach(model, backward, **kw):
    return cggr.attach(model, **kw) if backward is None else cggr.attach(model, backward=backward, **kw)


# --------------------------------------------------------------------------- HF Trainer
def _Tokens(n=32, seq=12, seed=0):
    return TokenDataset(VOCAB, n, seq, seed)


class _Probe:
    """Counts events and records what a reporter ahead of the cggr callback receives."""

    def __init__(self, callback):
        from transformers import TrainerCallback

        probe = self
        self.step_ends = self.substep_ends = 0
        self.step_at_begin = None
        self.logged_keys: set[str] = set()

        class Events(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if probe.step_at_begin is None:  # the curriculum step training (re)starts from
                    probe.step_at_begin = callback.router.metrics()["step"]

            def on_step_end(self, *a, **kw):
                probe.step_ends += 1

            def on_substep_end(self, *a, **kw):
                probe.substep_ends += 1

            def on_log(self, args, state, control, logs=None, **kw):
                probe.logged_keys |= set(logs)

        self.callback = Events()


def _train(output_dir, resume=None, install=False, max_steps=6, **options):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    from cggr.integrations import CGGRCallback

    model = hf_model("llama", seed=1)
    callback = CGGRCallback(num_buckets=4, warmup_steps=4, **options)
    probe = _Probe(callback)
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, save_steps=3,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    # The probe comes first, where reporting integrations are; install() moves the cggr callback ahead of it.
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[probe.callback, callback])
    if install:
        callback.install(trainer)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer, callback, probe, len(forwards)


def _train_logs(trainer):
    return {e["step"]: e for e in trainer.state.log_history if "loss" in e}


def test_trainer_callback_steps_logs_and_resume(tmp_path):
    out = tmp_path / "run"
    trainer, callback, probe, forwards = _train(out, install=True)
    model = trainer.model
    router = callback.router
    assert router is not None and router.model is model and model._cggr_router is router
    assert router.layer_path == "model.layers"
    # one curriculum step per optimizer step: 6 steps of 2 accumulated micro-batches
    assert forwards == 12 and probe.step_ends == 6 and probe.substep_ends == 6
    assert router.metrics()["step"] == 6 == trainer.state.global_step
    logs = _train_logs(trainer)
    assert sorted(logs) == [1, 2, 3, 4, 5, 6]
    for step, entry in logs.items():
        assert entry["cggr/step"] == step
        assert {"cggr/mean_depth_fraction", "cggr/backward_flops_skipped", "cggr/valid_tokens"} <= set(entry)
    assert logs[1]["cggr/mean_depth_fraction"] > logs[6]["cggr/mean_depth_fraction"]  # the curriculum moved
    assert "cggr/mean_depth_fraction" in probe.logged_keys  # install() put cggr ahead of the reporters
    saved = torch.load(out / "checkpoint-3" / "cggr_state.pt", weights_only=True)
    assert int(saved["step_count"]) == 3

    # Resume from checkpoint-3 (a fresh model and callback): step 3 at train begin, 6 at the end, same logs.
    resumed, callback2, probe2, forwards2 = _train(out, resume=str(out / "checkpoint-3"))
    assert probe2.step_at_begin == 3
    assert forwards2 == 6 and callback2.router.metrics()["step"] == 6 == resumed.state.global_step
    logs2 = _train_logs(resumed)  # steps 1-3 come from the checkpoint's trainer_state.json
    assert sorted(logs2) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # without install(), log_history still gets the metrics
        for key in ("loss", "cggr/step", "cggr/mean_depth_fraction", "cggr/backward_flops_skipped"):
            assert logs2[step][key] == pytest.approx(logs[step][key], rel=1e-5), (step, key)

    # A checkpoint without cggr_state.pt (saved without the callback): the step comes from global_step.
    os.remove(out / "checkpoint-3" / "cggr_state.pt")
    _, callback3, probe3, _ = _train(out, resume=str(out / "checkpoint-3"))
    assert probe3.step_at_begin == 3 and callback3.router.metrics()["step"] == 6


def test_callback_handback_takes_the_trainer_length(tmp_path):
    """handback_steps without total_steps: the Trainer's max_steps is the length of training."""
    trainer, callback, _, _ = _train(tmp_path, max_steps=5, handback_steps=2)
    assert callback.router.config.total_steps == 5 and callback.router.config.handback_steps == 2
    assert callback.router.bucket_depths() == [4, 4, 4, 4]  # handed back: full depth at the end


def test_callback_unwraps_ddp_and_never_attaches_twice(tmp_path, caplog):
    pytest.importorskip("transformers")
    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState

    from cggr.integrations import CGGRCallback

    args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None)
    state, control = TrainerState(), TrainerControl()
    model = hf_model("llama")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        cb = CGGRCallback(warmup_steps=10)
        cb.on_train_begin(args, state, control, model=ddp)
        router = cb.router
        assert router.model is model
        cb.on_step_end(args, state, control)
        state.global_step = 1
        cb.on_train_begin(args, state, control, model=ddp)  # a second train(): same router, step kept
        assert cb.router is router and router.metrics()["step"] == 1
    finally:
        dist.destroy_process_group()

    other = hf_model("llama")
    mine = cggr.attach(other, warmup_steps=3)
    cb2 = CGGRCallback(warmup_steps=10)
    cb2.on_train_begin(args, TrainerState(), control, model=other)
    assert cb2.router is mine  # the user's router is reused, nothing attached twice

    # A checkpoint whose router state disagrees with the Trainer's global_step: global_step wins, with a warning.
    (tmp_path / "checkpoint-3").mkdir()
    torch.save({"step_count": torch.tensor(5)}, tmp_path / "checkpoint-3" / "cggr_state.pt")
    resumed = TrainerState()
    resumed.global_step = 3
    with caplog.at_level(logging.WARNING, logger="cggr"):
        cb2.on_train_begin(args, resumed, control, model=other)
    assert mine.metrics()["step"] == 3 and "global_step 3" in caplog.text

    with pytest.raises(TypeError, match="cggr.attach"):
        CGGRCallback(num_bucket=4)
    with pytest.raises(ValueError, match="policy"):
        CGGRCallback(policy="nope")
    with pytest.raises(ValueError, match="buckets must be one of"):
        CGGRCallback(buckets="everywhere")
    assert CGGRCallback(buckets="global").attach_kwargs["buckets"] == "global"


# --------------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("backward", _BACKWARDS)
def test_gradient_accumulation_routes_each_micro_batch(backward):
    """Two micro-batches, each routed from its own logits: accumulated grads = sum of reference grads."""
    model = hf_model("llama", seed=2)
    ref = copy.deepcopy(model)  # before attaching
    router = _attach(model, backward, warmup_steps=0)
    micro = [_batch(10, seq=12, pad_from=8), _batch(11, seq=9)]
    depths, routings = [], []
    for inputs in micro:
        (model(**inputs).loss / len(micro)).backward()
        depths.append(router.routing.depth.clone())
        routings.append(routed_as(router))
    assert depths[0].shape != depths[1].shape
    assert (depths[0][0, 7:] == 0).all()  # padding and the positions predicting it
    assert all(d.min() < router.num_layers for d in depths)
    _reference_backward(ref, zip(micro, routings), scale=1 / len(micro))
    _assert_equal_grads(flat_grads(model), flat_grads(ref))


# --------------------------------------------------------------------------- PEFT / LoRA
def test_peft_lora_adapter_gradients_equal_reference():
    peft = pytest.importorskip("peft")
    base = hf_model("llama", seed=3)
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: A gets grads
    model = peft.get_peft_model(base, lora)
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0)
    # find_layer_stack reaches the decoder layers through the PEFT wrapper (by the generic search)
    assert router.layer_path == "base_model.model.model.layers"
    assert router.blocks == list(base.model.layers)
    assert router.label_shift == 1
    inputs = _batch(12, seq=12, pad_from=9)
    model(**inputs).loss.backward()
    depth = router.routing.depth
    assert depth.min() < router.num_layers
    _reference_backward(ref, [(inputs, routed_as(router))])
    trainable = flat_grads(model)
    assert trainable and all("lora_" in n for n in trainable)
    _assert_equal_grads(trainable, flat_grads(ref))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    bottom_a = next(n for n in trainable if "layers.0." in n and "lora_A" in n)
    assert trainable[bottom_a].abs().sum() > 0


@pytest.mark.parametrize("backward", _BACKWARDS)
def test_attach_before_peft_wrapping_keeps_the_forward(backward):
    """``cggr.attach`` first, ``get_peft_model`` second: the routed training forward must still be the model's."""
    peft = pytest.importorskip("peft")
    lora = dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    base = hf_model("llama", seed=5)
    plain_base = copy.deepcopy(base)
    _attach(base, backward, warmup_steps=0)
    torch.manual_seed(0)
    model = peft.get_peft_model(base, peft.LoraConfig(**lora))
    torch.manual_seed(0)
    plain = peft.get_peft_model(plain_base, peft.LoraConfig(**lora))
    inputs = _batch(13)
    loss = model(**inputs).loss
    assert loss.item() == pytest.approx(plain(**inputs).loss.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


# --------------------------------------------------------------------------- activation checkpointing
def _checkpointed_model(reentrant: bool, backward):
    model = hf_model("llama", seed=4)
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model, ref, _attach(model, backward, warmup_steps=0)


def _checkpointed_case(reentrant: bool, order: str, backward):
    model, ref, router = _checkpointed_model(reentrant, backward)
    micro = [_batch(20, seq=12, pad_from=10), _batch(21, seq=12)]
    routings = []
    if order == "sequential":  # forward, backward, forward, backward (what the Trainer does)
        for inputs in micro:
            model(**inputs).loss.backward()
            routings.append(router.routing)
    elif order == "interleaved":  # both forwards, then one backward
        losses = []
        for inputs in micro:
            losses.append(model(**inputs).loss)
            routings.append(router.routing)
        sum(losses).backward()
    else:  # "eval_between": an evaluation forward between a training forward and its backward
        micro = micro[:1]
        loss = model(**micro[0]).loss
        routings.append(router.routing)
        with torch.no_grad():
            model(input_ids=micro[0]["input_ids"][:, :5])
        loss.backward()
    assert min(r.depth.min().item() for r in routings) < router.num_layers
    _reference_backward(ref, [(inputs, routed_as(router, r)) for inputs, r in zip(micro, routings)])
    _assert_equal_grads(flat_grads(model), flat_grads(ref))


def _case(reentrant, order, backward):
    return pytest.param(reentrant, order, backward, id=f"{backward}-reentrant={reentrant}-{order}")


# The recompute of a checkpointed block must use the routing of the forward it replays, whatever ran in between.
_CASES = [_case(reentrant, order, b) for b in _BACKWARDS for reentrant in (False, True)
          for order in ("sequential", "interleaved", "eval_between")]


@pytest.mark.parametrize("reentrant,order,backward", _CASES)
def test_hf_gradient_checkpointing_equals_reference(reentrant, order, backward):
    _checkpointed_case(reentrant, order, backward)


@pytest.mark.parametrize("backward", _BACKWARDS)
def test_hf_gradient_checkpointing_stays_on_when_routed(backward):
    """Checkpointing stays on: through HF's checkpoint function (generic path), or routed inside the
    compacted block, which then keeps only its input for the backward."""
    model, _, router = _checkpointed_model(False, backward)
    calls, outputs = [], []
    for block in router.blocks:
        ckpt = block._gradient_checkpointing_func
        block._gradient_checkpointing_func = lambda fn, *a, _c=ckpt, **k: (calls.append(1), _c(fn, *a, **k))[1]
        block.register_forward_hook(lambda m, a, out: outputs.append(type(out.grad_fn).__name__))
    model(**_batch(22)).loss.backward()
    if backward == "auto" and router.compact_blocks[0] is not None:
        assert calls == [] and set(outputs) == {"DecoderBlockRoutedCheckpointedBackward"}
    else:
        assert len(calls) == router.num_layers


# --------------------------------------------------------------------------- env report, lazy imports
def test_env_report_runs():
    from cggr.env_report import env_report

    report = env_report()
    for key in ("python", "platform", "torch", "triton", "transformers", "cuda", "gpus", "cggr"):
        assert isinstance(report[key], str) and report[key]
    assert report["cggr"] == cggr.__version__
    out = subprocess.run([sys.executable, "-m", "cggr.env_report"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "torch:" in out.stdout and "gpus:" in out.stdout and "transformers:" in out.stdout


def test_importing_cggr_does_not_need_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import cggr, cggr.integrations, cggr.env_report\n"
            "try:\n    from cggr.integrations import CGGRCallback\nexcept ImportError:\n    print('lazy')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lazy"


def test_callback_options_resolve_the_defaults_for_their_own_options():
    """The callbacks fill in total_steps late (handback): the automatic placement is resolved for the options the
    callback attaches with, not frozen at the defaults'."""
    from cggr.integrations.hf import CGGRCallback

    def resolved(config):
        return config.inactive, config.placement, config.dense_ends

    assert resolved(CGGRCallback().options.resolve(None)) == ("skip", "per_block", 1)
    assert resolved(CGGRCallback(policy="difficulty").options.resolve(None)) == ("skip", "nested", 0)
    assert resolved(CGGRCallback(cggr.RoutingConfig(), inactive="stop").options.resolve(None)) == ("stop", "nested", 0)
    by_name = CGGRCallback(policy="sampled").options.by_name
    assert (by_name["placement"], by_name["dense_ends"]) == ("nested", 0)
    assert cggr.RoutingConfig(**{**CGGRCallback().options.by_name, "policy": "difficulty"}).placement == "nested"
    handback = CGGRCallback(cggr.RoutingConfig(policy="difficulty"), policy="random", handback_steps=2).options
    assert resolved(handback.resolve(10)) == ("skip", "per_block", 1) and handback.resolve(10).total_steps == 10
    seed = CGGRCallback(cggr.RoutingConfig(inactive="stop"), handback_steps=2).options.resolve(10)
    assert resolved(seed) == ("stop", "nested", 0)


def test_callback_takes_config_by_keyword_and_refuses_a_non_bool_switch():
    from cggr.integrations import CGGRCallback

    config = cggr.RoutingConfig(num_buckets=2, warmup_steps=5)
    assert CGGRCallback(config=config).options.resolve(None) == config
    assert CGGRCallback(config=config, seed=4).options.resolve(None) == config.replace(seed=4)
    assert CGGRCallback(config).options.resolve(None) == config
    for bad in ("no", 0, None):
        with pytest.raises(ValueError, match="CGGRCallback: log_metrics must be True or False"):
            CGGRCallback(log_metrics=bad)
