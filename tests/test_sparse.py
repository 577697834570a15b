"""cggr.sparse: the generic routed backward under double backward (``create_graph=True``), against the
reference routing; every routed op's first-order gradient is compared elsewhere (tests/test_router.py)."""

import copy

import pytest
import torch

import cggr
from cggr.adapters import find_layer_stack
from tiny import flat_grads, hf_model, rel_err


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small run several times faster on one thread on a busy CI host
    yield
    torch.set_num_threads(threads)


def _penalty(model, params, ids):
    """A gradient penalty: the squared norm of the loss's gradient, differentiated again."""
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return loss, sum(g.pow(2).sum() for g in grads)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("seed", [5, 808], ids=lambda s: f"seed{s}")
def test_double_backward_through_the_generic_path_equals_reference(kind, seed):
    model = hf_model(kind, layers=3, seed=seed)
    model.config._attn_implementation = "eager"  # twice-differentiable attention
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0, backward="generic", seed=seed)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    loss, penalty = _penalty(model, params, ids)
    penalty.backward()
    depth = router.routing.depth
    assert depth.min() < 3 and not router.routing.compact_blocks  # routed, through RoutedLinear and GateRows
    with cggr.reference_routing(find_layer_stack(ref)[1], depth):
        ref_loss, ref_penalty = _penalty(ref, [p for p in ref.parameters() if p.requires_grad], ids)
        ref_penalty.backward()
    assert rel_err(penalty.detach(), ref_penalty.detach()) < 1e-5
    got, want = flat_grads(model), flat_grads(ref)
    scale = max(v.norm().item() for v in want.values())
    for name in want:
        err = (got[name] - want[name]).norm().item() / max(want[name].norm().item(), 1e-3 * scale)
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
