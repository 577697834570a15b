"""cggr.hf_loss: ``fused_loss=True`` gives HF's loss and gradients without logits, and routes as the logits would.

Every comparison is against the plain HF model (a deep copy without cggr, or with cggr and ``fused_loss=False``
under the same routing), on tiny random-init models in fp32 and bf16.
"""

import copy
import inspect
import io
import pickle

import pytest
import torch
import torch.nn as nn

import cggr
from cggr.adapters import find_layer_stack
from cggr.hf_loss import fused_loss_target
from cggr.scoring import score_difficulty
from tests.tiny import BACKWARD_KINDS, DENSE_KINDS, MOE_KINDS, TinyLM, flat_grads, hf_model

V = 97
# Relative error (against the largest gradient's norm) allowed between two computations of one quantity.
# fp32: both sides sum the same products in another order (chunked logits, fp32 accumulation): <= 6e-7 measured.
# bf16: HF casts d loss / d logits to bf16 before the head's matmuls, the fused loss accumulates the weight
# gradient in fp32 first, and cggr's compacted backward (taken without position_ids) rounds at other places than
# autograd: <= 1.3e-2 measured against HF (3.1e-2 for a q/k norm's weight of 8 entries, Qwen 3), <= 3e-3
# against cggr with HF's loss.
TOL = {torch.float32: 5e-6, torch.bfloat16: 5e-2}
# Loss: fp32 <= 2e-7 measured; bf16 <= 4e-5 (the hidden states reach the head through other bf16 roundings).
LOSS_TOL = {torch.float32: 1e-6, torch.bfloat16: 2e-4}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _model(kind, seed, dtype):
    return hf_model(kind, layers=3, vocab=V, seed=seed).to(dtype)


def _takes_the_fused_loss(kind) -> bool:
    """Whether ``fused_loss=True`` takes the family's loss (not where its forward transforms the logits)."""
    with torch.device("meta"):
        model = hf_model(kind, layers=1, vocab=V)
    try:
        fused_loss_target(model)
    except ValueError:
        return False
    return True


FUSED_KINDS = [k for k in DENSE_KINDS if _takes_the_fused_loss(k)]
REFUSED_KINDS = [k for k in DENSE_KINDS if k not in FUSED_KINDS]  # softcapped or scaled logits


def _batch(seed, case="labels=inputs"):
    """``(ids, kwargs)`` of one training forward: 3 x 11 tokens; ``padded``: right padding masked out of the
    attention and the loss, a prompt masked out of the loss, explicit position ids; ``num_items``: HF's
    gradient-accumulation count (the Trainer's ``num_items_in_batch``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 11), generator=g)
    kwargs = dict(labels=ids.clone())
    if case in ("padded", "num_items"):
        mask = torch.ones_like(ids)
        mask[0, 7:] = 0
        kwargs["labels"][0, 7:] = -100
        kwargs["labels"][2, :3] = -100
        kwargs.update(attention_mask=mask, position_ids=torch.arange(11).expand(3, 11))
    if case == "num_items":
        kwargs["num_items_in_batch"] = torch.tensor(57)  # larger than this micro-batch's 24 valid labels
    return ids, kwargs


def _assert_close(got, want, tol, what=""):
    scale = max(v.float().norm().item() for v in want.values())
    for name, w in want.items():
        err = (got[name].float() - w.float()).norm().item() / max(w.float().norm().item(), 1e-3 * scale)
        assert err < tol, f"{what}{name}: relative error {err:.2e}"


# --------------------------------------------------------------------------- loss and gradients = HF's


@pytest.mark.parametrize("case", ["labels=inputs", "padded", "num_items"])
@pytest.mark.parametrize("kind", FUSED_KINDS)
@DTYPES
def test_loss_and_gradients_equal_plain_hf(kind, case, dtype):
    """With every valid token at full depth (one bucket) the fused loss's loss and every gradient are those of
    plain HF under the reference routing (invalid tokens, depth 0, pass no gradient into the blocks). Every
    family whose loss the fused loss takes; a seed of each family's own."""
    seed = FUSED_KINDS.index(kind)
    model = _model(kind, seed, dtype)
    plain = copy.deepcopy(model)
    unfused = copy.deepcopy(model)
    router = cggr.attach(model, num_buckets=1, warmup_steps=0, fused_loss=True)
    cggr.attach(unfused, num_buckets=1, warmup_steps=0)
    ids, kwargs = _batch(seed, case)
    out = model(input_ids=ids, **kwargs)
    assert out.logits is None and out.loss.dtype == torch.float32
    with cggr.reference_routing(find_layer_stack(plain)[1], router.routing.depth):
        want = plain(input_ids=ids, **kwargs)
        want.loss.backward()
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=LOSS_TOL[dtype])
    out.loss.backward()
    unfused(input_ids=ids, **kwargs).loss.backward()
    _assert_close(flat_grads(model), flat_grads(plain), TOL[dtype], "vs HF: ")
    # Against the same cggr backward with HF's loss, only the loss differs.
    _assert_close(flat_grads(model), flat_grads(unfused), TOL[dtype], "vs cggr with HF's loss: ")


@pytest.mark.parametrize("kind", MOE_KINDS)
@DTYPES
def test_moe_aux_loss_is_added_as_hf_adds_it(kind, dtype):
    seed = 3 + MOE_KINDS.index(kind)
    model = hf_model(kind, layers=2, vocab=V, seed=seed).to(dtype)
    plain = copy.deepcopy(model)
    router = cggr.attach(model, num_buckets=1, warmup_steps=0, fused_loss=True)
    ids, kwargs = _batch(seed, "padded")
    out = model(input_ids=ids, **kwargs)
    with cggr.reference_routing(find_layer_stack(plain)[1], router.routing.depth):
        want = plain(input_ids=ids, **kwargs)
        want.loss.backward()
    assert out.logits is None and out.aux_loss is not None
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=LOSS_TOL[dtype])
    out.loss.backward()
    _assert_close(flat_grads(model), flat_grads(plain), TOL[dtype])


# --------------------------------------------------------------------------- routing = routing by the logits


@pytest.mark.parametrize("policy", ["random", "difficulty", "sampled"])
@pytest.mark.parametrize("kind", BACKWARD_KINDS)
@DTYPES
def test_routed_gradients_and_scores_equal_routing_by_logits(kind, policy, dtype, monkeypatch):
    """Under each policy the fused loss's scores are the logits' scores, so the routing (depth of every token)
    is the same, and the routed gradients equal those of the same model routed with HF's loss (a family of each
    compacted backward, a seed of its own)."""
    seed = 5 * BACKWARD_KINDS.index(kind)
    offered = []
    take_scores = cggr.Router.take_scores
    monkeypatch.setattr(cggr.Router, "take_scores", lambda router, s: (offered.append(s), take_scores(router, s)))
    model = _model(kind, seed, dtype)
    twin = copy.deepcopy(model)
    options = dict(warmup_steps=0, policy=policy, seed=seed)
    router = cggr.attach(model, fused_loss=True, **options)
    twin_router = cggr.attach(twin, **options)
    ids, kwargs = _batch(seed, "padded")
    model(input_ids=ids, **kwargs).loss.backward()
    out = twin(input_ids=ids, **kwargs)
    out.loss.backward()
    (scores,) = offered
    want = score_difficulty(out.logits.detach())
    for got_t, want_t in zip(scores, want):
        torch.testing.assert_close(got_t, want_t, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-6)
    assert torch.equal(router.routing.depth, twin_router.routing.depth)
    assert router.metrics()["mean_depth_fraction"] < 1
    _assert_close(flat_grads(model), flat_grads(twin), TOL[dtype])


@pytest.mark.parametrize("setting", ["bf16 autocast", "checkpointing"])
@pytest.mark.parametrize("kind", BACKWARD_KINDS)
def test_autocast_and_checkpointing_as_with_hf_loss(kind, setting):
    """fp32 weights under bf16 autocast (the HF Trainer's bf16=True; the head's input is cast as lm_head would
    cast it), and HF's activation checkpointing inside the model's own forward."""
    import contextlib
    import warnings

    model = _model(kind, 6, torch.float32)
    if setting == "checkpointing":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    twin = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0, policy="difficulty", fused_loss=True, seed=6)
    twin_router = cggr.attach(twin, warmup_steps=0, policy="difficulty", seed=6)
    ids, kwargs = _batch(6, "padded" if setting == "checkpointing" else "labels=inputs")
    amp = setting == "bf16 autocast"
    with torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
        out = model(input_ids=ids, **kwargs)
        want = twin(input_ids=ids, **kwargs)
    assert out.logits is None
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=LOSS_TOL[torch.bfloat16 if amp else torch.float32])
    out.loss.backward()
    want.loss.backward()
    assert torch.equal(router.routing.depth, twin_router.routing.depth)
    _assert_close(flat_grads(model), flat_grads(twin), TOL[torch.bfloat16 if amp else torch.float32])


# --------------------------------------------------------------------------- the original forward elsewhere


@pytest.mark.parametrize("kind", BACKWARD_KINDS)
def test_eval_no_grad_and_label_free_forwards_return_logits(kind):
    model = _model(kind, 0, torch.float32)
    plain = copy.deepcopy(model)
    cggr.attach(model, warmup_steps=0, fused_loss=True)
    ids, kwargs = _batch(0, "padded")
    no_labels = {k: v for k, v in kwargs.items() if k != "labels"}
    torch.testing.assert_close(model(input_ids=ids, **no_labels).logits, plain(input_ids=ids, **no_labels).logits)
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
        want = plain(input_ids=ids, **kwargs)
    torch.testing.assert_close(out.logits, want.logits)
    torch.testing.assert_close(out.loss, want.loss)
    model.eval()
    plain.eval()
    out = model(input_ids=ids, **kwargs)
    assert out.logits is not None and out.loss.grad_fn is not None
    torch.testing.assert_close(out.loss, plain(input_ids=ids, **kwargs).loss)
    model.train()
    plain.train()
    # logits_to_keep with labels: the original forward, whatever it does with them (here: HF raises or not alike).
    for keep in (0, 4):
        try:
            want = plain(input_ids=ids, labels=ids, logits_to_keep=keep, shift_labels=ids[:, -keep:] if keep else None)
        except Exception as e:  # noqa: BLE001 - the same call must fail the same way
            with pytest.raises(type(e)):
                model(input_ids=ids, labels=ids, logits_to_keep=keep, shift_labels=ids[:, -keep:] if keep else None)
            continue
        got = model(input_ids=ids, labels=ids, logits_to_keep=keep, shift_labels=ids[:, -keep:] if keep else None)
        assert (got.logits is None) == (keep == 0)
        torch.testing.assert_close(got.loss, want.loss)


def test_positional_arguments_return_dict_and_the_signature():
    model = _model("llama", 0, torch.float32)
    plain = copy.deepcopy(model)
    cggr.attach(model, warmup_steps=0, fused_loss=True)
    ids, kwargs = _batch(1, "padded")
    # HF's positional order: input_ids, attention_mask; a tuple without logits when return_dict=False.
    got = model(ids, kwargs["attention_mask"], labels=kwargs["labels"], use_cache=False, return_dict=False)
    want = plain(ids, kwargs["attention_mask"], labels=kwargs["labels"], use_cache=False, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(want) - 1  # no logits
    torch.testing.assert_close(got[0], want[0])
    # The HF Trainer reads the forward's signature (dataset columns, loss kwargs): it is the model's own.
    assert inspect.signature(model.forward) == inspect.signature(plain.forward)


# --------------------------------------------------------------------------- lifecycle


def test_deepcopy_pickle_and_detach():
    model = _model("llama", 2, torch.float32)
    router = cggr.attach(model, warmup_steps=0, fused_loss=True, seed=2)
    ids, kwargs = _batch(2)
    twin = copy.deepcopy(model)
    assert twin.forward.model is twin and model.forward.model is model
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert pickle.loads(pickle.dumps(model)).forward.model is not model
    out = model(input_ids=ids, **kwargs)
    out.loss.backward()
    for other in (twin, loaded):
        got = other(input_ids=ids, **kwargs)
        assert got.logits is None and got.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
        got.loss.backward()
        assert torch.equal(other._cggr_router.routing.depth, router.routing.depth)
        _assert_close(flat_grads(other), flat_grads(model), 1e-6)
    router.detach()
    assert "forward" not in model.__dict__ and model(input_ids=ids, **kwargs).logits is not None
    wrapped = cggr.CGGRWrapper(model, warmup_steps=0, fused_loss=True)
    assert wrapped(input_ids=ids, **kwargs).logits is None
    assert wrapped.unwrap() is model and "forward" not in model.__dict__


def test_peft_model_takes_the_fused_loss_in_its_causal_lm():
    """attach on a PEFT model: the causal LM inside gets the fused forward; adapter gradients equal those of
    the same routing with HF's loss, and detach gives the inner model its own forward back."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(_model("llama", 4, torch.float32), lora)
    twin = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0, policy="difficulty", fused_loss=True)
    twin_router = cggr.attach(twin, warmup_steps=0, policy="difficulty")
    ids, kwargs = _batch(4, "padded")
    out = model(input_ids=ids, **kwargs)
    assert out.logits is None
    out.loss.backward()
    twin(input_ids=ids, **kwargs).loss.backward()
    assert torch.equal(router.routing.depth, twin_router.routing.depth)
    grads = flat_grads(model)
    assert grads and all("lora_" in n for n in grads)
    _assert_close(grads, flat_grads(twin), TOL[torch.float32])
    inner = model.base_model.model
    assert isinstance(inner.__dict__.get("forward"), cggr.hf_loss.FusedLossForward)
    router.detach()
    assert "forward" not in inner.__dict__


def _trainer_run(tmp_path, bf16=False, **options):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    import warnings

    from transformers import Trainer, TrainingArguments

    from cggr.integrations import CGGRCallback
    from tests.tiny import TokenDataset

    model = _model("llama", 5, torch.float32)
    seen = []  # (num_items_in_batch passed, logits returned)
    model.register_forward_hook(lambda m, a, kw, out: seen.append((kw.get("num_items_in_batch"),
                                                                    out.logits is not None)), with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
                             save_strategy="no", bf16=bf16)
    callback = CGGRCallback(warmup_steps=0, policy="difficulty", **options)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(V, 8, 10, seed=5), callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return model, seen


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16 mixed precision"])
def test_hf_trainer_with_gradient_accumulation_passes_num_items_and_trains_alike(tmp_path, bf16):
    """The Trainer passes num_items_in_batch to a forward that takes **kwargs (ours has the model's signature):
    with SGD and no clipping, a loss scaled otherwise than HF's would move the weights differently. With
    ``bf16=True`` accelerate has wrapped the model's forward in its autocast before the callback attaches: the
    fused forward calls that wrapper and computes the loss in the autocast the head ran in."""
    fused, seen = _trainer_run(tmp_path / "fused", bf16, fused_loss=True)
    plain, _ = _trainer_run(tmp_path / "plain", bf16)
    assert [(int(n), logits) for n, logits in seen] == [(2 * 2 * 9, False)] * 4  # 2 x 2 sequences of 9 labels
    if bf16:
        assert fused.forward.previous is not None  # accelerate's mixed-precision wrapper, kept inside
    want = dict(plain.named_parameters())
    _assert_close({n: p.detach() for n, p in fused.named_parameters()},
                  {n: p.detach() for n, p in want.items()}, TOL[torch.bfloat16 if bf16 else torch.float32])


class _CountingForward:
    """A forward installed on the instance before cggr (as accelerate's mixed-precision wrapper is)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return type(self.model).forward(self.model, *args, **kwargs)


def test_a_forward_replaced_before_attach_is_called_inside_and_restored():
    model = _model("gpt2", 7, torch.float32)
    plain = copy.deepcopy(model)
    model.forward = before = _CountingForward(model)
    router = cggr.attach(model, num_buckets=1, warmup_steps=0, fused_loss=True)
    ids, kwargs = _batch(7)
    out = model(input_ids=ids, **kwargs)
    assert out.logits is None and before.calls == 1
    assert out.loss.item() == pytest.approx(plain(input_ids=ids, **kwargs).loss.item(), rel=LOSS_TOL[torch.float32])
    router.detach()
    assert model.forward is before


# --------------------------------------------------------------------------- refusals


class _DoubledLogits(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return 2 * self.linear(x)


@pytest.mark.parametrize("case,match", [
    *[(kind, r"its forward \w+ its logits .* after lm_head \(\w+=") for kind in REFUSED_KINDS],
    ("non-linear head", r"plain nn\.Linear.*got _DoubledLogits"),
    ("not a causal LM", r"needs a Hugging Face causal LM .*got TinyLM"),
    ("another loss", r"has another loss function"),
])
def test_refused_where_the_loss_would_not_be_hf_s(case, match):
    if case in REFUSED_KINDS:
        model = hf_model(case, layers=2, vocab=V)
    elif case == "not a causal LM":
        model = TinyLM()
    else:
        model = _model("llama", 0, torch.float32)
        if case == "non-linear head":
            model.lm_head = _DoubledLogits(model.lm_head)
        else:
            model.loss_function = lambda logits, labels, **kw: logits.sum()
    hooks = (dict(model._forward_hooks), dict(model._forward_pre_hooks))
    with pytest.raises(ValueError, match=match) as info:
        cggr.attach(model, fused_loss=True)
    assert "cggr: fused_loss=True" in str(info.value) and "fused_loss=False" in str(info.value)
    # Refused before anything was installed: the model is as it was, and attaching without the option works.
    assert (dict(model._forward_hooks), dict(model._forward_pre_hooks)) == hooks
    assert getattr(model, "_cggr_router", None) is None
    cggr.attach(model).detach()


def test_a_forward_that_changes_the_logits_after_the_head_raises():
    from transformers import LlamaForCausalLM

    class ScaledForCausalLM(LlamaForCausalLM):  # a family the attach-time checks do not know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out["logits"] = out.logits * 0.5
            return out

    model = _model("llama", 0, torch.float32)
    model.__class__ = ScaledForCausalLM
    cggr.attach(model, fused_loss=True)
    ids, kwargs = _batch(0)
    with pytest.raises(RuntimeError, match=r"fused_loss=True: ScaledForCausalLM's forward changed its logits"):
        model(input_ids=ids, **kwargs)
    assert "forward" not in model.lm_head.__dict__  # the head is itself again after the failed call
    with torch.no_grad():
        assert model(input_ids=ids, **kwargs).logits is not None


@pytest.mark.parametrize("value", ["yes", 1, None, 0.0])
def test_bad_values_name_the_option(value):
    with pytest.raises(ValueError, match=r"fused_loss must be True or False, got"):
        cggr.RoutingConfig(fused_loss=value)
    with pytest.raises(ValueError, match=r"fused_loss must be True or False"):
        cggr.attach(TinyLM(), fused_loss=value)
    from cggr.integrations.hf import CGGRCallback

    with pytest.raises(ValueError, match=r"fused_loss must be True or False"):
        CGGRCallback(fused_loss=value)
    assert CGGRCallback(fused_loss=True).options.by_name["fused_loss"] is True
