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
