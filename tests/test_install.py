"""cggr.install: what attach installs works on copies and pickles, and is refused where it would be wrong."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cggr
from cggr.adapters import find_layer_stack
from tests.tiny import BACKWARD_KINDS, TinyBlock, TinyLM, flat_grads, hf_model, rel_err, routed_as


def _tiny_loss(model, ids):
    return F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def _reference_grads(model, router, loss_fn):
    ref = copy.deepcopy(model)
    if getattr(ref, "_cggr_router", None) is not None:
        ref._cggr_router.detach()
    ref.zero_grad(set_to_none=True)
    with cggr.reference_routing(find_layer_stack(ref)[1], **routed_as(router)):
        loss_fn(ref).backward()
    return flat_grads(ref)


def _assert_close(got, want, tol=1e-5):
    for name, w in want.items():
        assert rel_err(got[name], w) < tol if w.norm() > 0 else got[name].norm() < 1e-6, name


@pytest.mark.parametrize("kind", ["tiny", *BACKWARD_KINDS])  # the handwritten model, one family per compacted backward
@pytest.mark.parametrize("seed", [0, 1], ids=lambda s: f"seed={s}")
def test_deepcopy_of_an_attached_model_routes_the_copy(kind, seed):
    torch.manual_seed(seed)
    model = TinyLM() if kind == "tiny" else hf_model(kind, seed=seed)
    cggr.attach(model, warmup_steps=0, seed=seed)
    twin = copy.deepcopy(model)
    with torch.no_grad():  # the copy's weights differ: a forward bound to the original would show it
        for p in twin.parameters():
            p.mul_(1.5)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(seed))
    loss_fn = (lambda m: _tiny_loss(m, ids)) if kind == "tiny" else (lambda m: m(input_ids=ids, labels=ids).loss)
    loss_fn(twin).backward()
    assert all(p.grad is None for p in model.parameters()), "gradients reached the original model"
    router = twin._cggr_router
    assert router is not model._cggr_router and router.model is twin
    _assert_close(flat_grads(twin), _reference_grads(twin, router, loss_fn))


@pytest.mark.parametrize("kind", ["tiny", *BACKWARD_KINDS])
def test_pickled_attached_model_trains_exactly(kind):
    torch.manual_seed(0)
    model = TinyLM() if kind == "tiny" else hf_model(kind)
    cggr.attach(model, warmup_steps=0)
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(3))
    loss_fn = (lambda m: _tiny_loss(m, ids)) if kind == "tiny" else (lambda m: m(input_ids=ids, labels=ids).loss)
    loss_fn(model).backward()  # a forward in flight leaves nothing that cannot be pickled
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded.zero_grad(set_to_none=True)
    loss_fn(loaded).backward()
    router = loaded._cggr_router
    assert router.model is loaded
    _assert_close(flat_grads(loaded), _reference_grads(loaded, router, loss_fn))
    assert pickle.loads(pickle.dumps(router.config)) == router.config


def test_weight_shared_stack_is_refused():
    model = TinyLM(layers=1)
    block = model.blocks[0]
    model.blocks = nn.ModuleList([block] * 4)
    with pytest.raises(ValueError, match="weight-shared"):
        cggr.attach(model)


def test_linear_shared_between_blocks_is_refused():
    model = TinyLM(layers=2)
    model.blocks[1].q = model.blocks[0].q
    with pytest.raises(ValueError, match="the same module Linear is in blocks 0 and 1"):
        cggr.attach(model)


class _SeqFirstLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(61, 16)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0) for _ in range(2))
        self.head = nn.Linear(16, 61)

    def forward(self, input_ids):
        x = self.emb(input_ids).transpose(0, 1)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.transpose(0, 1))


def test_sequence_first_attention_is_refused():
    with pytest.raises(ValueError, match="batch_first=False"):
        cggr.attach(_SeqFirstLM())


class _TransposingBlock(TinyBlock):
    """Works on [S, B, D] rows: the routed rows would be in another order than the tokens."""

    def forward(self, x):
        return super().forward(x.transpose(0, 1)).transpose(0, 1)


def test_block_rows_in_another_order_than_the_tokens_are_a_clear_error():
    class SeqFirst(TinyLM):
        def forward(self, input_ids):
            x = self.emb(input_ids).transpose(0, 1)
            for b in self.blocks:
                x = b(x)
            return self.head(self.norm(x.transpose(0, 1)))

    model = SeqFirst()
    model.blocks = nn.ModuleList(_TransposingBlock(32, 4) for _ in range(4))
    cggr.attach(model)
    with pytest.raises(ValueError, match=r"sequence-first"):
        model(torch.randint(0, 61, (2, 5)))


def test_named_tuple_block_output_is_routed():
    from typing import NamedTuple

    class Out(NamedTuple):
        hidden: torch.Tensor
        aux: int

    class NTBlock(TinyBlock):
        def forward(self, x):
            return Out(super().forward(x), 7)

    class NTLM(TinyLM):
        def forward(self, input_ids):
            x = self.emb(input_ids)
            for b in self.blocks:
                x = b(x).hidden
            return self.head(self.norm(x))

    torch.manual_seed(0)
    model = NTLM()
    model.blocks = nn.ModuleList(NTBlock(32, 4) for _ in range(4))
    cggr.attach(model, warmup_steps=0)
    ids = torch.randint(0, 61, (2, 6))
    _tiny_loss(model, ids).backward()
    _assert_close(flat_grads(model), _reference_grads(model, model._cggr_router,
                                                     lambda m: _tiny_loss(m, ids)))


# --------------------------------------------------------------------------- the router as the installation sees it


class _GivenRouting:
    """The smallest router an installation runs with: the InstalledRouter protocol and nothing else; it routes
    every training forward by one routing given beforehand and records what the installed pieces call."""

    def __init__(self, routing):
        self.routing, self.running, self.calls = routing, None, []

    def start_forward(self, model, args, kwargs):
        self.calls.append("start_forward")
        self.running = self.routing if model.training and torch.is_grad_enabled() else None
        return args, kwargs

    def plan_forward(self, model, args, kwargs, output):
        self.calls.append("plan_forward")

    def close_forward(self, model, args, output):
        self.calls.append("close_forward")
        self.running = None

    def current_routing(self):
        return self.running

    def routing_of(self, routing):
        raise AssertionError("no block here checkpoints")

    def check_block_rows(self, name, h):
        self.calls.append("check_block_rows")

    def take_scores(self, scores):
        raise AssertionError("no fused loss here")


@pytest.mark.parametrize("kind", ["tiny", *BACKWARD_KINDS])
def test_an_installation_needs_only_the_installed_router_protocol(kind):
    """Everything attach installs (the model's hooks, routed linears, block gates, compacted forwards) calls the
    router only through cggr.install.InstalledRouter: a plain object with those methods routes the model's
    backward as the reference does with the same routing, and is done with the routing when the forward ends."""
    from cggr.install import InstalledRouter, Installation
    from cggr.routing import Routing

    torch.manual_seed(4)
    model = TinyLM() if kind == "tiny" else hf_model(kind, seed=4)
    ref = copy.deepcopy(model)
    blocks = find_layer_stack(model)[1]
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(4))
    block_active = torch.rand(len(blocks), 2, 7, generator=torch.Generator().manual_seed(5)) < 0.5
    fake = _GivenRouting(Routing.from_block_active(block_active, inactive="skip"))
    assert isinstance(fake, InstalledRouter)
    config = cggr.RoutingConfig(inactive="skip", placement="per_block")
    installation = Installation(fake, model, blocks, [f"block {i}" for i in range(len(blocks))], config)
    # use_cache=False: the router's start_forward turns HF's KV cache off (a cache keeps blocks off the compacted path)
    loss = (lambda m: _tiny_loss(m, ids)) if kind == "tiny" else (
        lambda m: m(input_ids=ids, labels=ids, use_cache=False).loss)
    loss(model).backward()
    assert fake.calls[0] == "start_forward" and fake.calls[-2:] == ["plan_forward", "close_forward"]
    assert fake.running is None
    assert bool(fake.routing.compact_blocks) == any(installation.compact_blocks)  # the compacted ones said so
    with cggr.reference_routing(find_layer_stack(ref)[1], inactive="skip", block_active=block_active):
        loss(ref).backward()
    _assert_close(flat_grads(model), flat_grads(ref))
    installation.remove()
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_the_hooks_are_the_routers_public_methods():
    """The model's hooks are the router's start_forward / plan_forward / close_forward, the optimizer's its
    after_optimizer_step: public methods of the protocol, no private method of another object."""
    from cggr.install import InstalledRouter

    model = TinyLM()
    router = cggr.attach(model, warmup_steps=0)
    assert isinstance(router, InstalledRouter)
    hooks = [*model._forward_pre_hooks.values(), *model._forward_hooks.values()]
    assert [h.__name__ for h in hooks] == ["start_forward", "plan_forward", "close_forward"]
    assert all(h.__self__ is router for h in hooks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = router.attach_optimizer(opt)
    (hook,) = opt._optimizer_step_post_hooks.values()
    assert hook.__name__ == "after_optimizer_step" and hook.__self__ is router
    _tiny_loss(model, torch.randint(0, 61, (2, 5))).backward()
    opt.step()
    assert router.metrics()["step"] == 1.0
    handle.remove()
    router.detach()
    assert not model._forward_pre_hooks and not model._forward_hooks
