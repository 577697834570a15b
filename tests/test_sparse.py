"""The generic routed backward (:mod:`cggr.sparse`): ``RoutedLinear`` and ``GateRows`` against the reference.

The reference is docs/design.md §1.8's in its plainest form: the plain op, with the
output rows of tokens inactive in the block replaced by ``λ·y + (1-λ)·y.detach()``
(``y.detach()`` when λ = 0); and, for whole stacks, ``cggr.reference_routing``'s
hooks. Block ``i`` of ``L`` sees token ``t`` active when ``depth[t] > L - 1 - i``.
"""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

import cggr
from cggr import reference_routing
from cggr.adapters import find_layer_stack
from cggr.routing import Routing
from cggr.sparse import GateRows, RoutedLinear
from tests.tiny import DENSE_KINDS, flat_grads, hf_model, rel_err, routed_as

SEEDS = [0, 1, 2]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
L = 3
LEAK = 0.25  # a power of two: exact in every dtype, so the leaky rows' gradient is exact on both sides
# (batch, seq) of the tokens: odd counts, and one 2-D input of 13 rows (batch None).
TOKENS = [(1, 1), (2, 7), (None, 13)]

# Tolerance per dtype, relative to the magnitude of the terms (|g| |W| for an input gradient, |g|^T |x| for a
# weight gradient, sum |g| for a bias gradient). Both sides run the same matmuls, the routed one on the active
# rows only, so only the order of the sums may differ; a half-precision matmul rounds its fp32 accumulation once
# (one rounding apart at most: bf16 2^-8, fp16 2^-11 relative). Largest error measured over these tests with
# seeds 0-19: fp64 1.2 x 2^-52, fp32 1.2 x 2^-23, bf16 0 (bit-equal, bf16 autocast included), fp16 0.22 x 2^-11.
# Tolerances: about four times that, and one rounding for the half types (the BLAS may order its sums otherwise).
TOL = {torch.float64: 1e-15, torch.float32: 5e-7, torch.bfloat16: 2**-8, torch.float16: 2**-11}


def _seed_id(s):
    return f"seed={s}"


def _gen(seed, *key) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(repr(key).encode()))


def _depths(n: int, block_index: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Token depths that make every row of block ``block_index`` active, none, or some (random)."""
    threshold = L - 1 - block_index
    some = torch.randint(0, L + 1, (n,), generator=g)
    if n > 1:  # at least one row on each side
        some[0], some[1] = threshold + 1, threshold
    return {"all": torch.full((n,), threshold + 1), "none": torch.full((n,), threshold), "some": some}


def _frozen(y: torch.Tensor, depth: torch.Tensor, block_index: int, leak: float) -> torch.Tensor:
    """``y`` with the rows of tokens inactive in ``block_index`` constants (times ``leak`` in the gradient)."""
    inactive = (depth.reshape(-1) <= L - 1 - block_index).reshape(*y.shape[:-1], 1)
    # λ·y + (1-λ)·y.detach(), written so that its value is y exactly (its gradient is λ times y's)
    frozen = y.detach() + leak * (y - y.detach()) if leak > 0 else y.detach()
    return torch.where(inactive, frozen, y)


def _grad(out, inputs, grad_out, **kw):
    """``torch.autograd.grad``, with zeros where ``out`` does not depend on an input (or on nothing at all)."""
    if not out.requires_grad:
        return [torch.zeros_like(i) for i in inputs]
    gs = torch.autograd.grad(out, inputs, grad_out, allow_unused=True, **kw)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(gs, inputs)]


def _plain_linear(x, w, b, in_out):
    if in_out:  # HF Conv1D: x @ W + b, W stored [in, out]
        y2 = x.reshape(-1, x.shape[-1]) @ w if b is None else torch.addmm(b, x.reshape(-1, x.shape[-1]), w)
        return y2.reshape(*x.shape[:-1], w.shape[1])
    return F.linear(x, w, b)


def _close(got, ref, tol, scale, what):
    assert got.dtype == ref.dtype and got.shape == ref.shape, f"{what}: {got.dtype}{tuple(got.shape)}"
    err = float((got.double() - ref.double()).abs().max()) if got.numel() else 0.0
    assert err <= tol * float(scale), f"{what}: error {err:.3g}, allowed {tol:.3g} x {float(scale):.3g}"


def _linear_inputs(g, tokens, din, dout, dtype, in_out, bias):
    B, S = tokens
    shape = (B, S, din) if B is not None else (S, din)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn((din, dout) if in_out else (dout, din), generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(dout, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    gy = torch.randn(*shape[:-1], dout, generator=g, dtype=torch.float64).to(dtype)
    return x, w.requires_grad_(), b, gy


def _linear_scales(x, w, gy, in_out):
    """Magnitudes of the terms of the input, weight and bias gradients (see TOL)."""
    g2, x2 = gy.detach().double().abs().reshape(-1, gy.shape[-1]), x.detach().double().abs().reshape(-1, x.shape[-1])
    w_oi = w.detach().double().abs()
    w_oi = w_oi.t() if in_out else w_oi
    return (g2 @ w_oi).max(), (g2.t() @ x2).max(), g2.sum(0).max()


# --------------------------------------------------------------------------- RoutedLinear

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("leak", [0.0, LEAK], ids=lambda v: f"leak={v}")
@pytest.mark.parametrize("bias", [True, False], ids=lambda v: f"bias={v}")
@pytest.mark.parametrize("in_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_routed_linear_matches_detached_rows(seed, in_out, bias, leak, dtype):
    for tokens in TOKENS:
        for din, dout in [(5, 7), (13, 3)]:
            for block_index in range(L):
                g = _gen(seed, "linear", tokens, din, dout, block_index, in_out, bias, leak, dtype)
                x, w, b, gy = _linear_inputs(g, tokens, din, dout, dtype, in_out, bias)
                n = gy.numel() // dout
                for name, depth in _depths(n, block_index, g).items():
                    r = Routing.from_depth(depth.reshape(gy.shape[:-1]), num_layers=L, leak_rate=leak)
                    what = f"tokens={tokens} {din}->{dout} block={block_index} {name}"
                    y = RoutedLinear.apply(x, w, b, r, block_index, in_out)
                    y_ref = _frozen(_plain_linear(x, w, b, in_out), depth, block_index, leak)
                    assert torch.equal(y, y_ref), what  # the forward is the plain op itself
                    params = (x, w) if b is None else (x, w, b)
                    got = _grad(y, params, gy)
                    ref = _grad(y_ref, params, gy)
                    for name_p, a, e, s in zip("xwb", got, ref, _linear_scales(x, w, gy, in_out)):
                        _close(a, e, TOL[dtype], s, f"d{name_p} {what}")


@pytest.mark.parametrize("in_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_routed_linear_under_bf16_autocast(seed, in_out):
    """fp32 input and weights under CPU bf16 autocast: the matmuls run in bf16, the gradients come back fp32."""
    for tokens in TOKENS:
        for leak in (0.0, LEAK):
            block_index = 1
            g = _gen(seed, "autocast", tokens, in_out, leak)
            x, w, b, gy = _linear_inputs(g, tokens, 5, 7, torch.float32, in_out, True)
            n = gy.numel() // 7
            for name, depth in _depths(n, block_index, g).items():
                r = Routing.from_depth(depth, num_layers=L, leak_rate=leak)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = RoutedLinear.apply(x, w, b, r, block_index, in_out)
                    y_ref = _frozen(_plain_linear(x, w, b, in_out), depth, block_index, leak)
                assert y.dtype == y_ref.dtype == torch.bfloat16
                assert torch.equal(y, y_ref), name
                got = _grad(y, (x, w, b), gy.bfloat16())
                ref = _grad(y_ref, (x, w, b), gy.bfloat16())
                for p, a, e, s in zip("xwb", got, ref, _linear_scales(x, w, gy, in_out)):
                    assert a.dtype == torch.float32
                    _close(a, e, TOL[torch.bfloat16], s, f"d{p} tokens={tokens} leak={leak} {name}")


@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_routed_linear_frozen_weight_or_input(seed):
    """Only the gradients asked for are computed (a frozen base weight under LoRA, an input without grad)."""
    g = _gen(seed, "frozen")
    x, w, b, gy = _linear_inputs(g, (2, 7), 5, 7, torch.float64, False, True)
    depth = _depths(14, 0, g)["some"]
    r = Routing.from_depth(depth, num_layers=L)
    w.requires_grad_(False)
    (gx,) = _grad(RoutedLinear.apply(x, w, b.detach(), r, 0, False), (x,), gy)
    (gx_ref,) = _grad(_frozen(F.linear(x, w, b.detach()), depth, 0, 0.0), (x,), gy)
    _close(gx, gx_ref, TOL[torch.float64], _linear_scales(x, w, gy, False)[0], "dx, frozen weight")
    w.requires_grad_(True)
    (gw,) = _grad(RoutedLinear.apply(x.detach(), w, None, r, 0, False), (w,), gy)
    (gw_ref,) = _grad(_frozen(F.linear(x.detach(), w), depth, 0, 0.0), (w,), gy)
    _close(gw, gw_ref, TOL[torch.float64], _linear_scales(x, w, gy, False)[1], "dw, input without grad")


def test_routed_linear_row_count_mismatch_is_a_clear_error():
    r = Routing.from_depth(torch.tensor([0, 1, 2, 3, 3]), num_layers=L)
    x = torch.randn(6, 4, requires_grad=True)
    y = RoutedLinear.apply(x, torch.randn(3, 4), None, r, 1, False)
    with pytest.raises(RuntimeError, match="routed linear in block 1 saw 6 rows but the batch has 5 tokens"):
        y.sum().backward()


# --------------------------------------------------------------------------- GateRows

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("leak", [0.0, LEAK], ids=lambda v: f"leak={v}")
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_gate_rows_matches_detached_rows(seed, leak, dtype):
    for tokens in TOKENS:
        for H in (1, 6, 17):
            for block_index in range(L):
                g = _gen(seed, "gate", tokens, H, block_index, leak, dtype)
                B, S = tokens
                shape = (B, S, H) if B is not None else (S, H)
                h = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
                gy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
                for name, depth in _depths(h.numel() // H, block_index, g).items():
                    r = Routing.from_depth(depth, num_layers=L, leak_rate=leak)
                    what = f"tokens={tokens} H={H} block={block_index} {name}"
                    y = GateRows.apply(h, r, block_index)
                    assert torch.equal(y, h) and y.data_ptr() != h.data_ptr(), what  # identity, not a view
                    (got,) = _grad(y, (h,), gy)
                    (ref,) = _grad(_frozen(h, depth, block_index, leak), (h,), gy)
                    assert torch.equal(got, ref), what  # one multiply by 1, 0 or a power of two: exact


def test_gate_rows_row_count_mismatch_is_a_clear_error():
    r = Routing.from_depth(torch.tensor([0, 1, 2, 3, 3]), num_layers=L)
    h = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="block 2 output has 6 rows but the batch has 5 tokens"):
        GateRows.apply(h, r, 2).sum().backward()


# --------------------------------------------------------------------------- whole stacks against the hooks

class _Block(nn.Module):
    """A block made of one routable linear and a nonlinearity (so gradients differ row by row)."""

    def __init__(self, d: int, in_out: bool):
        super().__init__()
        self.proj = Conv1D(d, d) if in_out else nn.Linear(d, d)

    def forward(self, h):
        return h + torch.tanh(self.proj(h))


def _routed_stack(blocks, h, r, mode, in_out):
    """The fast path by hand: RoutedLinear for each block's linear (sparse mode), GateRows on each block output."""
    for i, blk in enumerate(blocks):
        if mode == "sparse":
            out = h + torch.tanh(RoutedLinear.apply(h, blk.proj.weight, blk.proj.bias, r, i, in_out))
        else:
            out = blk(h)
        h = GateRows.apply(out, r, i)
    return h


@pytest.mark.parametrize("mode", ["sparse", "mask"])
@pytest.mark.parametrize("leak", [0.0, LEAK], ids=lambda v: f"leak={v}")
@pytest.mark.parametrize("in_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_stack_matches_reference_routing(seed, in_out, leak, mode):
    g = _gen(seed, "stack", in_out, leak, mode)
    blocks = nn.ModuleList(_Block(9, in_out) for _ in range(L)).double()
    with torch.no_grad():
        for p in blocks.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(3, 5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    depth = torch.randint(0, L + 1, (3, 5), generator=g)
    gy = torch.randn(3, 5, 9, generator=g, dtype=torch.float64)
    params = (x, *blocks.parameters())
    r = Routing.from_depth(depth, num_layers=L, leak_rate=leak)
    got = _grad(_routed_stack(blocks, x, r, mode, in_out), params, gy)
    with reference_routing(list(blocks), depth, mode=mode, leak_rate=leak):
        h = x
        for blk in blocks:
            h = blk(h)
    ref = _grad(h, params, gy)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)  # fp64: only the order of sums differs


# --------------------------------------------------------------------------- double backward

def _second_order(forward, params, gy):
    """Gradients of ``|first-order gradients|^2`` (a gradient penalty), through a create_graph backward."""
    first = _grad(forward(), params, gy, create_graph=True)
    penalty = sum((f ** 2).sum() for f in first)
    return _grad(penalty, params, torch.ones(()))


@pytest.mark.parametrize("leak", [0.0, LEAK], ids=lambda v: f"leak={v}")
@pytest.mark.parametrize("bias", [True, False], ids=lambda v: f"bias={v}")
@pytest.mark.parametrize("in_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_double_backward_routed_linear(seed, in_out, bias, leak):
    """A gradient penalty through RoutedLinear (followed by tanh, so second derivatives are not zero)."""
    for block_index in range(L):
        g = _gen(seed, "double", in_out, bias, leak, block_index)
        x, w, b, gy = _linear_inputs(g, (2, 7), 5, 7, torch.float64, in_out, bias)
        params = (x, w) if b is None else (x, w, b)
        for name, depth in _depths(14, block_index, g).items():
            r = Routing.from_depth(depth.reshape(2, 7), num_layers=L, leak_rate=leak)
            got = _second_order(lambda: torch.tanh(RoutedLinear.apply(x, w, b, r, block_index, in_out)), params, gy)
            ref = _second_order(lambda: torch.tanh(_frozen(_plain_linear(x, w, b, in_out), depth, block_index, leak)),
                                params, gy)
            for p, a, e in zip("xwb", got, ref):
                torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12,
                                           msg=lambda m: f"d{p} block={block_index} {name}: {m}")


@pytest.mark.parametrize("leak", [0.0, LEAK], ids=lambda v: f"leak={v}")
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_double_backward_gate_rows(seed, leak):
    """A gradient penalty through GateRows on the output of a linear and tanh."""
    for block_index in range(L):
        g = _gen(seed, "double-gate", leak, block_index)
        x, w, b, gy = _linear_inputs(g, (2, 7), 5, 7, torch.float64, False, True)
        for name, depth in _depths(14, block_index, g).items():
            r = Routing.from_depth(depth.reshape(2, 7), num_layers=L, leak_rate=leak)
            got = _second_order(lambda: GateRows.apply(torch.tanh(F.linear(x, w, b)), r, block_index), (x, w, b), gy)
            ref = _second_order(lambda: _frozen(torch.tanh(F.linear(x, w, b)), depth, block_index, leak), (x, w, b), gy)
            for p, a, e in zip("xwb", got, ref):
                torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12,
                                           msg=lambda m: f"d{p} block={block_index} {name}: {m}")


def test_double_backward_through_a_cast_is_refused():
    """Under autocast the saved copies are casts made inside the forward: no graph leads back to the weights."""
    x = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    r = Routing.from_depth(torch.tensor([0, 1, 2, 3, 3]), num_layers=L)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = RoutedLinear.apply(x, w, None, r, 1, False)
    with pytest.raises(RuntimeError, match="double backward .* not supported when its forward cast"):
        torch.autograd.grad(torch.tanh(y).sum(), (x, w), create_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = RoutedLinear.apply(x, w, None, r, 1, False)
    gx, gw = torch.autograd.grad(torch.tanh(y).sum(), (x, w))  # a plain backward is fine
    assert gx.dtype == gw.dtype == torch.float32


# ---------------------------------------------------------------- double backward through whole models

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


@pytest.mark.parametrize("kind", DENSE_KINDS)
@pytest.mark.parametrize("inactive", ["skip", "stop"])  # the default (SkipRows) and the seed's (GateRows)
def test_double_backward_through_the_generic_path_equals_reference(kind, inactive):
    """Every dense family of the registry (a seed of each its own)."""
    seed = 5 + 803 * DENSE_KINDS.index(kind)
    model = hf_model(kind, layers=3, seed=seed)
    model.config._attn_implementation = "eager"  # twice-differentiable attention
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0, backward="generic", seed=seed, inactive=inactive)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    loss, penalty = _penalty(model, params, ids)
    penalty.backward()
    depth = router.routing.depth
    assert depth.min() < 3 and not router.routing.compact_blocks  # routed, through RoutedLinear and the gate
    with cggr.reference_routing(find_layer_stack(ref)[1], **routed_as(router)):
        ref_loss, ref_penalty = _penalty(ref, [p for p in ref.parameters() if p.requires_grad], ids)
        ref_penalty.backward()
    assert rel_err(penalty.detach(), ref_penalty.detach()) < 1e-5
    got, want = flat_grads(model), flat_grads(ref)
    scale = max(v.norm().item() for v in want.values())
    for name in want:
        err = (got[name] - want[name]).norm().item() / max(want[name].norm().item(), 1e-3 * scale)
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
