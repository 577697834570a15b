"""The gradient row gate (:mod:`cggr.gate`) and its Triton kernel (:mod:`cggr.kernels.gate`).

``gate_rows_reference`` against a row-by-row loop that says the semantics in
the plainest way, then the kernel against the reference. The kernel runs on
the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set below before
Triton is imported); on a GPU machine ``TRITON_INTERPRET=0 pytest
tests/test_gate.py`` runs the same tests on CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from cggr.env import triton_interpret  # noqa: E402
from cggr.gate import gate_rows, gate_rows_reference  # noqa: E402

INTERPRET = triton_interpret()
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_kernel = pytest.mark.skipif(not HAS_TRITON or (not INTERPRET and DEVICE == "cpu"),
                                  reason="the Triton kernel needs triton, and TRITON_INTERPRET=1 or a CUDA device")

SEEDS = [0, 1, 2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _seed_id(s):
    return f"seed={s}"


def _gen(*key) -> torch.Generator:
    """A fresh, reproducible seed per test case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# --------------------------------------------------------------------------- semantics of the reference

def _gate_by_loop(grad, depth, threshold, leak_rate):
    """Row r of ``grad`` (``depth.numel()`` rows) as is when ``depth[r] > threshold``, else times ``leak_rate``
    rounded to ``grad``'s dtype (as ``torch.full((), leak_rate, dtype=...)`` rounds it)."""
    rows = grad.reshape(depth.numel(), -1)
    leak = torch.tensor(leak_rate, dtype=grad.dtype)
    out = [row.clone() if int(d) > threshold else row * leak for row, d in zip(rows, depth.reshape(-1))]
    return torch.stack(out).reshape(grad.shape)


SHAPES = [(1, 1), (3, 7), (13, 5), (2, 5, 13), (7, 1, 3)]


@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_reference_keeps_rows_above_threshold_and_scales_the_rest(seed, dtype):
    for shape in SHAPES:
        g = _gen("semantics", seed, shape, dtype)
        grad = torch.randn(shape, generator=g).to(dtype)
        depth = torch.randint(0, 5, shape[:-1], generator=g)
        before = grad.clone()
        for threshold in (-1, 0, 2, 4):
            for leak in (0.0, 0.3, 1.0):
                out = gate_rows_reference(grad, depth, threshold, leak)
                assert out.shape == grad.shape and out.dtype == dtype and out.data_ptr() != grad.data_ptr()
                # One multiply per element on both sides: bit-exact.
                assert torch.equal(out, _gate_by_loop(grad, depth, threshold, leak)), (shape, threshold, leak)
                assert torch.equal(gate_rows(grad, depth, threshold, leak), out)  # the CPU dispatch is the reference
        assert torch.equal(grad, before), "the gate must not modify its input"
        # Every row active (threshold below every depth): a copy; none and leak 0: zeros.
        assert torch.equal(gate_rows_reference(grad, depth, -1, 0.0), grad)
        assert not gate_rows_reference(grad, depth, 10, 0.0).any()


@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_reference_depth_layouts(seed):
    """Depth of any integer (or bool) dtype and any shape with one entry per row; grad in any layout."""
    g = _gen("layouts", seed)
    grad = torch.randn(3, 11, 5, generator=g)
    depth = torch.randint(0, 4, (3, 11), generator=g)
    want = _gate_by_loop(grad, depth, 1, 0.25)
    for d in (depth.to(torch.int32), depth.to(torch.uint8), depth.reshape(-1), depth.reshape(11, 3)):
        assert torch.equal(gate_rows_reference(grad, d, 1, 0.25), _gate_by_loop(grad, d, 1, 0.25))
    assert torch.equal(gate_rows_reference(grad, depth.to(torch.int32), 1, 0.25), want)
    # A non-contiguous grad: its rows are those of its own (logical) layout.
    t = torch.randn(11, 3, 5, generator=g).transpose(0, 1)
    assert torch.equal(gate_rows_reference(t, depth, 2, 0.5), _gate_by_loop(t.contiguous(), depth, 2, 0.5))
    # bool depth: True (1) is active when threshold is 0.
    active = depth > 1
    assert torch.equal(gate_rows_reference(grad, active, 0, 0.0), grad * active.unsqueeze(-1))


def test_reference_empty_and_mismatched():
    empty = gate_rows_reference(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), 0, 0.0)
    assert empty.shape == (0, 5)
    no_width = gate_rows_reference(torch.zeros(4, 0), torch.ones(4, dtype=torch.long), 0, 0.0)
    assert no_width.shape == (4, 0)
    with pytest.raises(ValueError, match=r"grad of shape \(10, 3\) does not split into 4 rows"):
        gate_rows_reference(torch.randn(10, 3), torch.zeros(4, dtype=torch.long), 0, 0.0)
    with pytest.raises(ValueError, match="does not split into 0 rows"):
        gate_rows_reference(torch.randn(2, 3), torch.zeros(0, dtype=torch.long), 0, 0.0)


@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_reference_is_differentiable_and_its_own_adjoint(seed):
    """The gate is a diagonal scaling: its gradient is the same gate, and a create_graph backward flows through it."""
    g = _gen("adjoint", seed)
    grad = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    depth = torch.randint(0, 4, (7,), generator=g)
    v = torch.randn(7, 6, generator=g, dtype=torch.float64)
    (back,) = torch.autograd.grad(gate_rows(grad, depth, 1, 0.3), grad, v)
    assert torch.equal(back, gate_rows_reference(v, depth, 1, 0.3))


# --------------------------------------------------------------------------- the Triton kernel

def _kernel():
    from cggr.kernels.gate import gate_rows_triton

    return gate_rows_triton


def _assert_gate(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape and got.is_contiguous()
    if INTERPRET and got.dtype == torch.bfloat16:
        # The interpreter rounds fp32 -> bf16 toward zero (CUDA rounds to nearest
        # even and is bit-exact): allow one bf16 ulp there.
        torch.testing.assert_close(got.cpu(), ref.cpu(), rtol=2**-7, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(got.cpu(), ref.cpu(), rtol=0, atol=0, equal_nan=True)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (37, 5), (3, 11, 130), (4, 2500)])
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_gate_matches_reference(seed, shape, dtype):
    gate_rows_triton = _kernel()
    g = _gen("gate", shape, dtype, seed)
    grad = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    depth = torch.randint(0, 6, shape[:-1], generator=g).to(DEVICE)
    for threshold in (-1, 0, 2, 5):
        for leak in (0.0, 0.3):
            _assert_gate(gate_rows_triton(grad, depth, threshold, leak), gate_rows_reference(grad, depth, threshold, leak))


@needs_kernel
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy: inf * 0
def test_gate_layouts_and_specials():
    gate_rows_triton = _kernel()
    g = _gen("gate-layouts")
    grad = torch.randn(8, 12, 64, generator=g).to(DEVICE)
    depth = torch.randint(0, 4, (12, 8), generator=g, dtype=torch.int32).to(DEVICE)
    t = grad.transpose(0, 1)  # non-contiguous, [12, 8, 64] rows
    _assert_gate(gate_rows_triton(t, depth, 1, 0.5), gate_rows_reference(t, depth, 1, 0.5))
    flat = torch.randn(12 * 8 * 64, generator=g).to(DEVICE)  # rows inferred from depth.numel()
    _assert_gate(gate_rows_triton(flat, depth, 2, 0.0), gate_rows_reference(flat, depth, 2, 0.0))
    special = torch.tensor([[float("inf"), float("nan"), -0.0, 1.0]] * 3, device=DEVICE)
    d = torch.tensor([0, 5, 1], device=DEVICE)
    _assert_gate(gate_rows_triton(special, d, 1, 0.0), gate_rows_reference(special, d, 1, 0.0))
    out = gate_rows_triton(grad, depth.T, 10, 0.0)
    assert out.data_ptr() != grad.data_ptr() and not out.any()
    with pytest.raises(ValueError):
        gate_rows_triton(torch.randn(10, 3, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE), 0, 0.0)


@needs_kernel
def test_gate_kernel_empty_and_bool_depth():
    gate_rows_triton = _kernel()
    empty = torch.zeros(0, 5, device=DEVICE)
    assert gate_rows_triton(empty, torch.zeros(0, dtype=torch.long, device=DEVICE), 0, 0.0).shape == (0, 5)
    with pytest.raises(ValueError, match="does not split into 0 rows"):
        gate_rows_triton(torch.randn(2, 3, device=DEVICE), torch.zeros(0, dtype=torch.long, device=DEVICE), 0, 0.0)
    grad = torch.randn(9, 7, generator=_gen("bool")).to(DEVICE)
    active = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 1], dtype=torch.bool, device=DEVICE)
    _assert_gate(gate_rows_triton(grad, active, 0, 0.25), gate_rows_reference(grad, active, 0, 0.25))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the dispatch to the kernel happens on CUDA only")
def test_cuda_dispatch_stays_differentiable_for_double_backward():
    """On CUDA ``gate_rows`` takes the (non-differentiable) kernel, except where its result must carry a graph."""
    g = _gen("cuda-dispatch")
    grad = torch.randn(7, 6, generator=g).cuda().requires_grad_()
    depth = torch.randint(0, 4, (7,), generator=g).cuda()
    out = gate_rows(grad, depth, 1, 0.3)
    assert out.requires_grad
    (back,) = torch.autograd.grad(out, grad, torch.ones_like(out))
    assert torch.equal(back.cpu(), gate_rows_reference(torch.ones(7, 6), depth.cpu(), 1, 0.3))
    with torch.no_grad():  # the kernel (rounding as the reference does: bit-exact on CUDA)
        assert torch.equal(gate_rows(grad, depth, 1, 0.3), gate_rows_reference(grad, depth, 1, 0.3))
