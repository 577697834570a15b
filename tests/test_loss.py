"""cggr.loss: the fused linear cross-entropy (both per-chunk backends) against its reference.

The Triton backend runs on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, set below before Triton is imported); on a GPU machine
``TRITON_INTERPRET=0 pytest tests/test_loss.py`` runs the same tests on CUDA.
The PyTorch backend (what the CPU uses) runs with or without Triton.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cggr.loss as cl  # noqa: E402
from cggr.loss import LossWithScores, linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402
from cggr.scoring import Scores  # noqa: E402

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # not installed, or broken
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
TRITON_OK = HAVE_TRITON and (INTERPRET or DEVICE == "cuda")

# The interpreter's numpy arithmetic warns on inf - inf, log(0) and the like; the kernel expects them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Backends of the per-chunk row computation: PyTorch, Triton with its default
# block (one block per row at these vocabularies), Triton with 64-wide blocks
# (several blocks per row: exercises the online-softmax rescaling).
BACKENDS = ["torch", "triton", "triton-block64"]


def _backend(monkeypatch, backend: str) -> None:
    if backend == "torch":
        monkeypatch.setattr(cl, "_use_triton", lambda t: False)
        return
    if not TRITON_OK:
        pytest.skip("Triton kernels need triton and TRITON_INTERPRET=1 or a CUDA device")
    from cggr.kernels.linear_ce import linear_ce_rows_triton

    op = linear_ce_rows_triton if backend == "triton" else functools.partial(linear_ce_rows_triton, block_v=64)
    monkeypatch.setattr(cl, "_use_triton", lambda t: True)
    monkeypatch.setattr(cl, "_rows_op", lambda use: op if use else cl._rows_torch)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Loss and scores, (rtol, atol). Both sides compute the same logits in the
# input dtype (one GEMM row by row; on the CPU chunking rows does not change a
# row's dot products) and everything after in fp32, so only fp32 summation
# order separates them: the dtype does not matter.
LOSS_TOL = (1e-5, 1e-5)

# Gradients: |got - ref| <= rtol * |ref| + atol * max|ref|. Both sides round
# the fp32 logits gradient to the input dtype, but compute it by different
# formulas (softmax - onehot here, log_softmax's backward there), so an entry
# near a rounding boundary lands one ulp apart; the GEMMs (and the bias sum)
# that follow add V (or N) such entries, whose absolute sum exceeds the result
# where softmax and onehot cancel, and round again. Measured worst over these
# cases and 30 more seeds of the (37, 24, 300) case: bf16 3.1 x 2^-8, fp16
# 2.9 x 2^-11, fp32 1.5e-6 (relative to max|ref|); the tolerances allow 8 ulps.
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (8 * 2.0**-11, 8 * 2.0**-11),
            torch.bfloat16: (8 * 2.0**-8, 8 * 2.0**-8)}


def _assert_close_scaled(got, ref, dtype, name):
    assert got.dtype == ref.dtype and got.shape == ref.shape, name
    got, ref = got.float().cpu(), ref.float().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{name}: NaN positions differ"
    fin = torch.isfinite(ref)
    assert torch.equal(got[~fin & ~ref.isnan()], ref[~fin & ~ref.isnan()]), f"{name}: infinities differ"
    if not fin.any():
        return
    rtol, atol = GRAD_TOL[dtype]
    scale = ref[fin].abs().max()
    err = (got[fin] - ref[fin]).abs()
    bound = rtol * ref[fin].abs() + atol * scale + 1e-30
    assert bool((err <= bound).all()), f"{name}: max err {float(err.max()):.3g}, max|ref| {float(scale):.3g}"


def _assert_loss_scores(got: LossWithScores, ref: LossWithScores, shape):
    assert isinstance(got, LossWithScores) and isinstance(got.scores, Scores)
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss.detach().cpu(), ref.loss.detach().cpu(), rtol=LOSS_TOL[0], atol=LOSS_TOL[1],
                               equal_nan=True, msg="loss")
    for name, g, r in zip(Scores._fields, got.scores, ref.scores):
        assert (g is None) == (r is None), name
        if g is None:
            continue
        assert g.dtype == torch.float32 and tuple(g.shape) == tuple(shape), name
        assert not g.requires_grad, f"{name} must be detached"
        assert torch.equal(torch.isnan(g), torch.isnan(r)), f"{name}: NaN positions differ"
        torch.testing.assert_close(g.cpu(), r.cpu(), rtol=LOSS_TOL[0], atol=LOSS_TOL[1], equal_nan=True, msg=name)


def _inputs(seed, lead, D, V, dtype, bias=True, ignore_frac=0.2):
    g = _gen(seed)
    hidden = torch.randn(*lead, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.5 * 2.0
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, lead, generator=g)
    labels[torch.rand(lead, generator=g) < ignore_frac] = -100
    cast = [t.to(dtype).to(DEVICE).requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    return cast[0], cast[1], cast[2], labels.to(DEVICE)


def _check(seed, lead, D, V, dtype, reduction, chunk_rows=None, bias=True, shift_labels=False, ignore_frac=0.2,
           grad_seed=None):
    h, w, b, y = _inputs(seed, lead, D, V, dtype, bias, ignore_frac)
    params = [t for t in (h, w, b) if t is not None]
    got = linear_cross_entropy(h, w, y, b, reduction=reduction, shift_labels=shift_labels, chunk_rows=chunk_rows)
    ref = linear_cross_entropy_reference(h, w, y, b, reduction=reduction, shift_labels=shift_labels)
    _assert_loss_scores(got, ref, lead)
    # A random incoming gradient (a scalar for mean/sum) checks the scaling in the backward.
    g = torch.randn(ref.loss.shape, generator=_gen(seed + 1 if grad_seed is None else grad_seed)).to(DEVICE)
    if not torch.isfinite(ref.loss).all():
        return got, ref
    g_got = torch.autograd.grad(got.loss, params, g)
    g_ref = torch.autograd.grad(ref.loss, params, g)
    for name, a, r in zip(("hidden", "weight", "bias"), g_got, g_ref):
        _assert_close_scaled(a, r, dtype, f"grad {name}")
    return got, ref


# --------------------------------------------------------------------------- against the reference

SHAPES = [
    # lead, D, V, chunk_rows
    ((1,), 1, 1, None),          # one token, one class
    ((5,), 3, 7, 2),             # chunk that does not divide N
    ((37,), 24, 300, 8),         # odd N, V not a power of two, 5 chunks (last one of 5 rows)
    ((3, 11), 17, 257, 16),      # batch x sequence, V just above a power of two
    ((37,), 24, 129, None),      # default chunking
]
# The interpreter is slow: the Triton backends run fewer seeds, and 64-wide
# blocks (which only matter when V > 64) run on fewer rows.
CASES = (
    [("torch", *shape, seed) for shape in SHAPES for seed in (11, 12)]
    + [("triton", *shape, 13) for shape in SHAPES[:4]]
    + [("triton-block64", (9,), 24, 300, 4, 14), ("triton-block64", (2, 5), 17, 257, 3, 15)]
)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,lead,D,V,chunk_rows,seed", CASES, ids=lambda x: str(x).replace(" ", ""))
def test_matches_reference(backend, lead, D, V, chunk_rows, seed, dtype, reduction, monkeypatch):
    _backend(monkeypatch, backend)
    _check(seed, lead, D, V, dtype, reduction, chunk_rows)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,seed", [("torch", 31), ("triton", 32), ("triton-block64", 33)])
def test_grad_norm_matches_the_autograd_definition(backend, seed, dtype, reduction, monkeypatch):
    """``grad_norm=True``: each token's ``||softmax(z) - onehot(y)||`` (importance="loss" routing), read from the
    gradient the chunk holds (mean/sum) or recomputed from its logits (none), equal to the norm of autograd's
    gradient of the token's loss at its logits; NaN at ignored labels; the loss and other scores unchanged."""
    _backend(monkeypatch, backend)
    for lead, D, V, chunk_rows, shift in (((3, 11), 17, 257, 16, True), ((37,), 24, 129, 5, False)):
        h, w, b, y = _inputs(seed, lead, D, V, dtype)
        got = linear_cross_entropy(h, w, y, b, reduction=reduction, chunk_rows=chunk_rows, shift_labels=shift,
                                   grad_norm=True)
        ref = linear_cross_entropy_reference(h, w, y, b, reduction=reduction, shift_labels=shift, grad_norm=True)
        plain = linear_cross_entropy(h, w, y, b, reduction=reduction, chunk_rows=chunk_rows, shift_labels=shift)
        assert plain.scores.grad_norm is None and torch.equal(plain.loss, got.loss)
        g, r = got.scores.grad_norm, ref.scores.grad_norm
        assert g.dtype == torch.float32 and g.shape == y.shape and torch.equal(g.isnan(), r.isnan())
        assert bool(r.isnan().any()) and bool((~r.isnan()).any())  # ignored labels and scored ones both seen
        # Half precision: the fused path reads the gradient rounded to the input dtype.
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(g.cpu(), r.cpu(), rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("seed", [21])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_partial_requires_grad(backend, dtype, seed, monkeypatch):
    _backend(monkeypatch, backend)
    _check(seed, (2, 9), 24, 300, dtype, "mean", chunk_rows=7, bias=False)
    # A frozen head (only hidden needs a gradient) and a frozen body (only the head does).
    h, w, b, y = _inputs(seed, (13,), 8, 50, dtype)
    for frozen in ("weight", "hidden"):
        hh = h.detach().requires_grad_(frozen != "hidden")
        ww = w.detach().requires_grad_(frozen != "weight")
        got = linear_cross_entropy(hh, ww, y, b, chunk_rows=4)
        ref = linear_cross_entropy_reference(hh, ww, y, b)
        live = [t for t in (hh, ww, b) if t.requires_grad]
        for a, r in zip(torch.autograd.grad(got.loss, live), torch.autograd.grad(ref.loss, live)):
            _assert_close_scaled(a, r, dtype, f"frozen {frozen}")


@pytest.mark.parametrize("seed", [31, 32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_labels_is_hf_convention(backend, seed, monkeypatch):
    _backend(monkeypatch, backend)
    got, _ = _check(seed, (3, 10), 16, 97, torch.float32, "mean", chunk_rows=6, shift_labels=True)
    h, w, b, y = _inputs(seed, (3, 10), 16, 97, torch.float32)
    logits = F.linear(h, w, b)
    # Hugging Face's causal-LM loss on materialised logits, when transformers is there; else its rule written out.
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss

        hf = ForCausalLMLoss(logits, y, vocab_size=97)
    except ImportError:
        hf = F.cross_entropy(logits[:, :-1].reshape(-1, 97).float(), y[:, 1:].reshape(-1))
    torch.testing.assert_close(got.loss, hf, rtol=1e-5, atol=1e-6)
    # Same as shifting by hand, and the last position is still scored.
    manual = linear_cross_entropy(h[:, :-1], w, y[:, 1:], b)
    torch.testing.assert_close(got.loss, manual.loss, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got.scores.difficulty[:, -1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_and_degenerate_batches(backend, monkeypatch):
    _backend(monkeypatch, backend)
    # A custom ignore index inside the vocabulary (e.g. a pad token id).
    h, w, b, y = _inputs(41, (20,), 12, 60, torch.float32, ignore_frac=0.0)
    y[::3] = 5
    got = linear_cross_entropy(h, w, y, b, ignore_index=5, chunk_rows=7)
    ref = linear_cross_entropy_reference(h, w, y, b, ignore_index=5)
    _assert_loss_scores(got, ref, (20,))
    none = linear_cross_entropy(h, w, y, b, ignore_index=5, reduction="none")
    assert torch.equal(none.loss[::3], torch.zeros(7, device=DEVICE)) and (none.loss[1::3] > 0).all()

    # Every token ignored: mean is NaN (F.cross_entropy's 0/0) with zero gradients, sum is 0; scores still there.
    y_all = torch.full_like(y, -100)
    for reduction in ("mean", "sum"):
        got = linear_cross_entropy(h, w, y_all, b, reduction=reduction, chunk_rows=7)
        ref = linear_cross_entropy_reference(h, w, y_all, b, reduction=reduction)
        _assert_loss_scores(got, ref, (20,))
        assert got.loss.isnan().item() == (reduction == "mean")
        for a, r in zip(torch.autograd.grad(got.loss, (h, w, b)), torch.autograd.grad(ref.loss, (h, w, b))):
            assert torch.equal(a, torch.zeros_like(a)) and torch.equal(r, torch.zeros_like(r))
        assert torch.isfinite(got.scores.entropy).all()

    # Empty input: shapes as F.cross_entropy gives them; zero weight gradients.
    he = torch.zeros(0, 7, 12, device=DEVICE, requires_grad=True)
    ye = torch.zeros(0, 7, dtype=torch.long, device=DEVICE)
    for reduction in ("mean", "sum", "none"):
        got = linear_cross_entropy(he, w, ye, b, reduction=reduction)
        ref = linear_cross_entropy_reference(he, w, ye, b, reduction=reduction)
        _assert_loss_scores(got, ref, (0, 7))
        if reduction == "sum":
            gh, gw, gb = torch.autograd.grad(got.loss, (he, w, b))
            assert gh.shape == he.shape
            assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_and_infinite_loss(backend, dtype, monkeypatch):
    """-inf bias entries mask vocabulary: zero probability, zero gradient; a label on one has an infinite loss."""
    _backend(monkeypatch, backend)
    h, w, b, y = _inputs(51, (9,), 8, 70, dtype, ignore_frac=0.0)
    with torch.no_grad():
        b[::4] = float("-inf")
    y[y % 4 == 0] += 1                              # labels on unmasked entries...
    y[2] = 8                                        # ...except one: its loss is +inf
    y[6] = -100
    got = linear_cross_entropy(h, w, y, b, reduction="none", chunk_rows=4)
    ref = linear_cross_entropy_reference(h, w, y, b, reduction="none")
    _assert_loss_scores(got, ref, (9,))
    assert got.loss[2] == float("inf") and torch.isfinite(got.scores.difficulty).all()
    gr = torch.randn(9, generator=_gen(52)).to(DEVICE)
    g_got = torch.autograd.grad(got.loss, (h, w, b), gr)
    g_ref = torch.autograd.grad(ref.loss, (h, w, b), gr)
    for name, a, r in zip(("hidden", "weight", "bias"), g_got, g_ref):
        _assert_close_scaled(a, r, dtype, f"grad {name}")
    masked = [v for v in range(0, 70, 4) if v != 8]  # entry 8 is row 2's label: its gradient is -1 there
    assert torch.equal(g_got[2][masked], torch.zeros_like(g_got[2][masked]))
    assert torch.equal(g_got[1][masked], torch.zeros_like(g_got[1][masked]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_rows(backend, dtype, monkeypatch):
    """NaN hidden rows have no distribution: NaN scores, and a NaN loss unless ignored."""
    _backend(monkeypatch, backend)
    h, w, b, y = _inputs(53, (9,), 8, 70, dtype, ignore_frac=0.0)
    with torch.no_grad():
        h[5] = float("nan")                         # a valid NaN row: NaN loss, scores, gradient
        h[7] = float("nan")
    y[7] = -100                                     # an ignored NaN row: NaN scores, no loss
    got = linear_cross_entropy(h, w, y, b, reduction="none", chunk_rows=4)
    ref = linear_cross_entropy_reference(h, w, y, b, reduction="none")
    _assert_loss_scores(got, ref, (9,))
    assert got.loss[5].isnan() and got.loss[7] == 0
    assert got.scores.difficulty[[5, 7]].isnan().all()
    assert torch.isfinite(got.scores.difficulty[[0, 1, 2, 3, 4, 6, 8]]).all()

    keep = [0, 1, 2, 3, 4, 6, 8]
    gr = torch.zeros(9, device=DEVICE)
    gr[keep] = torch.randn(len(keep), generator=_gen(54)).to(DEVICE)
    g_got = torch.autograd.grad(got.loss, (h, w, b), gr)
    g_ref = torch.autograd.grad(ref.loss, (h, w, b), gr)
    # A valid NaN row's gradient is NaN on both sides, even with a zero incoming gradient (0 * NaN). For an
    # ignored NaN row F.cross_entropy gives NaN too; the fused loss gives exact zeros (the loss ignores the row).
    # Both sides' weight and bias gradients are NaN (the NaN rows enter their sums).
    assert g_got[0][5].isnan().all() and g_ref[0][5].isnan().all()
    assert torch.equal(g_got[0][7], torch.zeros_like(g_got[0][7])) and g_ref[0][7].isnan().all()
    _assert_close_scaled(g_got[0][keep], g_ref[0][keep], dtype, "grad hidden (finite rows)")
    assert g_got[1].isnan().any() and g_ref[1].isnan().any()


def _row_reference(x, labels, scale, ignore_index):
    """Per-row F.cross_entropy on fp32 logits, and its gradient times ``scale``."""
    x32 = x.float().detach().requires_grad_()
    loss = F.cross_entropy(x32, labels, ignore_index=ignore_index, reduction="none")
    (grad,) = torch.autograd.grad(loss, x32, scale.expand(len(labels)).float())
    return loss.detach(), grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_op_adversarial_rows(backend, dtype, monkeypatch):
    """The per-chunk computation on hand-made logits (both backends), against F.cross_entropy row by row."""
    _backend(monkeypatch, backend)
    op = cl._rows_op(cl._use_triton(torch.empty(0, device=DEVICE)))
    V = 300
    x = torch.randn(12, V, generator=_gen(61)) * 4.0
    labels = torch.randint(0, V, (12,), generator=_gen(62))
    x[0, 17] = float("nan")                 # NaN anywhere -> NaN row
    x[1, -1] = float("inf")                 # +inf -> NaN row
    x[2] = float("-inf")                    # nothing finite -> NaN row
    x[3, ::2] = float("-inf")               # masked entries
    labels[3] = 1
    x[4, :] = float("-inf")
    x[4, 250] = 2.5                         # one finite entry, the label: loss 0, entropy 0
    labels[4] = 250
    x[5, :200] = float("-inf")              # -inf first, finite later (rescaling from an empty state)
    labels[5] = 299
    x[6] *= 1e3                             # extreme logits: one-hot distributions
    x[7] += 300.0                           # large offsets cancel
    x[8, 0] = float("nan")
    labels[8] = -100                        # an ignored NaN row: zero loss, zero gradient
    labels[9] = -100                        # an ignored finite row: zero gradient
    x = x.to(dtype).to(DEVICE)
    labels = labels.to(DEVICE)
    for scale in (torch.tensor([0.25]), torch.randn(12, generator=_gen(63))):
        scale = scale.to(DEVICE)
        buf = x.clone()
        out = torch.empty(4, 12, device=DEVICE)
        op(buf, labels, scale, -100, True, out[0], out[1], out[2], out[3])
        loss_ref, grad_ref = _row_reference(x, labels, scale, -100)
        grad_ref[8] = 0.0                   # documented difference: F.cross_entropy gives NaN here
        torch.testing.assert_close(out[0].cpu(), loss_ref.cpu(), rtol=LOSS_TOL[0], atol=LOSS_TOL[1], equal_nan=True)
        assert torch.equal(out[0].isnan(), loss_ref.isnan())
        _assert_close_scaled(buf.float(), grad_ref.to(dtype).float(), dtype, "row gradient")
        # Without the gradient pass the logits are left alone.
        buf2 = x.clone()
        op(buf2, labels, scale, -100, False, out[0], out[1], out[2], out[3])
        assert torch.equal(buf2.view(torch.uint8), x.view(torch.uint8))
    assert float(out[0, 4]) == 0.0 and float(out[2, 4]) == 0.0 and float(out[3, 4]) == 1.0
    assert out[1:, [0, 1, 2, 8]].isnan().all() and torch.isfinite(out[1:, [3, 4, 5, 6, 7, 9]]).all()


# --------------------------------------------------------------------------- autograd behaviour


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_and_no_grad(backend, monkeypatch):
    _backend(monkeypatch, backend)
    h, w, b, y = _inputs(71, (15,), 10, 40, torch.float32)
    got = linear_cross_entropy(h, w, y, b, chunk_rows=4)
    g1 = torch.autograd.grad(got.loss, (h, w, b), retain_graph=True)
    g2 = torch.autograd.grad(got.loss * 1.0, (h, w, b), torch.tensor(3.0, device=DEVICE))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(3.0 * a, c)
    with torch.no_grad():
        ng = linear_cross_entropy(h, w, y, b)
    assert ng.loss.grad_fn is None
    torch.testing.assert_close(ng.loss, got.loss.detach())
    assert ng.scores.grad_norm is None and got.scores.grad_norm is None  # not asked for
    for a, c in zip(ng.scores[:3], got.scores[:3]):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_strided_inputs(backend, monkeypatch):
    """hidden and labels as views whose leading dimensions do not flatten to one stride; a transposed weight."""
    _backend(monkeypatch, backend)
    h, w, b, y = _inputs(91, (4, 6), 12, 50, torch.float32)
    ht, yt = h.transpose(0, 1), y.t()
    wt = w.detach().t().contiguous().t().requires_grad_()      # same values, column-major
    got = linear_cross_entropy(ht, wt, yt, b, reduction="none", chunk_rows=5)
    ref = linear_cross_entropy_reference(ht, wt, yt, b, reduction="none")
    _assert_loss_scores(got, ref, (6, 4))
    gr = torch.randn(6, 4, generator=_gen(92)).to(DEVICE)
    g_got = torch.autograd.grad(got.loss, (h, wt, b), gr)
    g_ref = torch.autograd.grad(ref.loss, (h, wt, b), gr)
    for name, a, r in zip(("hidden", "weight", "bias"), g_got, g_ref):
        _assert_close_scaled(a, r, torch.float32, f"grad {name}")


def test_hf_causal_lm_loss_and_gradients(monkeypatch):
    """On a tiny HF Llama: the model's own loss (labels shifted inside) and every parameter's gradient."""
    pytest.importorskip("transformers")
    from tests.tiny import hf_model

    _backend(monkeypatch, "torch")
    model = hf_model("llama", layers=2, vocab=97)
    g = _gen(101)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100                                        # e.g. a masked prompt
    out = model(input_ids=ids, labels=labels)
    ref_grads = torch.autograd.grad(out.loss, list(model.parameters()))
    hidden = model.model(input_ids=ids).last_hidden_state
    got = linear_cross_entropy(hidden, model.lm_head.weight, labels, shift_labels=True, chunk_rows=5)
    torch.testing.assert_close(got.loss, out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.scores.difficulty, cl.entropy_confidence_reference(out.logits).difficulty,
                               rtol=1e-5, atol=1e-6)
    for p, a, r in zip(model.parameters(), torch.autograd.grad(got.loss, list(model.parameters())), ref_grads):
        _assert_close_scaled(a, r, torch.float32, f"grad {tuple(p.shape)}")


def test_autocast_matches_reference(monkeypatch):
    """Under CPU autocast (bf16) fp32 parameters are cast as F.linear would cast them."""
    _backend(monkeypatch, "torch")
    h, w, b, y = _inputs(81, (2, 7), 16, 90, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, y, b, chunk_rows=5)
        ref = linear_cross_entropy_reference(h, w, y, b)
    _assert_loss_scores(got, ref, (2, 7))
    for a, r in zip(torch.autograd.grad(got.loss, (h, w, b)), torch.autograd.grad(ref.loss, (h, w, b))):
        assert a.dtype == torch.float32
        _assert_close_scaled(a, r, torch.bfloat16, "autocast grad")


@pytest.mark.parametrize("seed", [82, 83], ids=lambda s: f"seed={s}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_autocast_takes_a_half_precision_hidden_and_an_fp32_head(backend, dtype, seed, monkeypatch):
    """What the dtype error recommends works: a half-precision hidden state and the fp32 LM head (a model under
    mixed precision) under torch.autocast, computed in the autocast dtype as F.linear would, equal the reference."""
    _backend(monkeypatch, backend)
    h, w, b, y = _inputs(seed, (3, 5), 16, 70, torch.float32)
    h = h.detach().to(dtype).requires_grad_()
    with torch.autocast(DEVICE, dtype=dtype):
        got = linear_cross_entropy(h, w, y, b, chunk_rows=4)
        ref = linear_cross_entropy_reference(h, w, y, b)
    _assert_loss_scores(got, ref, (3, 5))
    for name, a, r in zip(("hidden", "weight", "bias"), torch.autograd.grad(got.loss, (h, w, b)),
                          torch.autograd.grad(ref.loss, (h, w, b))):
        assert a.dtype == r.dtype == (dtype if name == "hidden" else torch.float32), name
        _assert_close_scaled(a, r, dtype, f"autocast grad {name}")


def test_dtype_mismatch_outside_autocast_names_the_fix_and_fp64_stays_fp64_under_it():
    h, w, b, y = _inputs(84, (6,), 8, 20, torch.float32)
    for fn in (linear_cross_entropy, linear_cross_entropy_reference):
        with pytest.raises(TypeError, match=r"weight's dtype \(torch.float32\) must equal hidden's "
                                            r"\(torch.bfloat16\); cast one, or run under torch.autocast"):
            fn(h.to(torch.bfloat16), w, y, b)
    # autocast leaves fp64 alone (F.linear computes in fp64 there): so does the fused loss
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = linear_cross_entropy(h64, w64, y, b64)
        ref = linear_cross_entropy_reference(h64, w64, y, b64)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-12, atol=1e-12)
    assert torch.autograd.grad(got.loss, h64)[0].dtype == torch.float64


# Systematic scale of the hidden-state gradient against the reference's (which divides in fp32 and rounds each
# entry once): with 1/57 rounded to bf16 (fp16) before scaling, measured 8e-4 to 1.1e-3 (1.5e-4 to 1.9e-4) over
# seeds 91-94; with the division folded into the forward, 0 (the same roundings as the reference).
SCALE_TOL = {torch.float32: 1e-6, torch.float16: 3e-5, torch.bfloat16: 2e-4}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_items", [57, "tensor"])
@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_num_items_divides_the_sum_without_biasing_half_precision_gradients(backend, num_items, dtype, monkeypatch):
    """``reduction="sum", num_items=n`` is the reference's ``sum / n`` (HF's num_items_in_batch), and in half
    precision the gradients are not all scaled by a rounded copy of 1/n (2^-9 off in bf16 for n = 57)."""
    _backend(monkeypatch, backend)
    n = torch.tensor(57) if num_items == "tensor" else num_items
    h, w, b, y = _inputs(91, (256,), 32, 200, dtype)
    got = linear_cross_entropy(h, w, y, b, reduction="sum", num_items=n, chunk_rows=16)
    ref = linear_cross_entropy_reference(h, w, y, b, reduction="sum", num_items=n)
    _assert_loss_scores(got, ref, (256,))
    g_got = torch.autograd.grad(got.loss, (h, w, b))
    g_ref = torch.autograd.grad(ref.loss, (h, w, b))
    for name, a, r in zip(("hidden", "weight", "bias"), g_got, g_ref):
        _assert_close_scaled(a, r, dtype, f"grad {name}")
    if backend != "torch" and INTERPRET and dtype == torch.bfloat16:
        return  # Triton's interpreter truncates fp32 -> bf16 (-0.28 % on average: a bias of its own); GPUs round
    a, r = g_got[0].double().cpu(), g_ref[0].double().cpu()
    ratio = float((a * r).sum() / (r * r).sum())
    assert abs(ratio - 1) < SCALE_TOL[dtype], f"grad hidden scaled by {ratio:.6f}"


def test_default_chunk_rows():
    assert cl._default_chunk_rows(16384, 32000, 2048) == 1024   # logits chunk = hidden in elements
    assert cl._default_chunk_rows(16384, 32000, 1024) == 512
    assert cl._default_chunk_rows(10, 5, 64) == 16            # small vocabulary: everything at once (rounded up)
    assert cl._default_chunk_rows(0, 5, 64) == 1


# --------------------------------------------------------------------------- errors


def test_argument_errors():
    h = torch.randn(4, 8)
    w = torch.randn(10, 8)
    y = torch.randint(0, 10, (4,))
    cases = [
        (dict(hidden=h.long()), TypeError, "hidden"),
        (dict(hidden=torch.tensor(1.0)), ValueError, "hidden"),
        (dict(weight=torch.randn(10, 8, 1)), ValueError, "weight"),
        (dict(weight=torch.randn(10, 7)), ValueError, "weight.shape"),
        (dict(weight=torch.randn(0, 8)), ValueError, "weight"),
        (dict(weight=w.double()), TypeError, "weight's dtype"),
        (dict(bias=torch.randn(9)), ValueError, "bias"),
        (dict(bias=torch.randn(10).half()), TypeError, "bias's dtype"),
        (dict(labels=y.float()), TypeError, "labels"),
        (dict(labels=y[:3]), ValueError, "labels"),
        (dict(labels=torch.tensor([0, 1, 10, 2])), ValueError, r"labels must be in \[0, 10\)"),
        (dict(labels=torch.tensor([0, -1, 3, 2])), ValueError, "labels must be in"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(shift_labels=1), TypeError, "shift_labels"),
        (dict(hidden=torch.randn(8), labels=torch.tensor(1), shift_labels=True), ValueError, "shift_labels"),
        (dict(chunk_rows=0), ValueError, "chunk_rows"),
        (dict(chunk_rows=2.0), ValueError, "chunk_rows"),
        (dict(num_items=4), ValueError, "num_items divides the summed loss: it needs reduction='sum'"),
        (dict(num_items=0, reduction="sum"), ValueError, "num_items must be"),
        (dict(num_items=True, reduction="sum"), ValueError, "num_items must be"),
        (dict(num_items=torch.tensor([2, 3]), reduction="sum"), ValueError, "num_items must be"),
    ]
    for over, exc, match in cases:
        kw = dict(hidden=h, weight=w, labels=y, bias=None)
        kw.update(over)
        with pytest.raises(exc, match=match):
            linear_cross_entropy(kw.pop("hidden"), kw.pop("weight"), kw.pop("labels"), kw.pop("bias"), **kw)
    # A 1-D hidden is one token: 0-d labels and scores.
    one = linear_cross_entropy(torch.randn(8), w, torch.tensor(3), reduction="none")
    assert one.loss.shape == () and one.scores.difficulty.shape == ()
