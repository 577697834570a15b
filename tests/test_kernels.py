"""The scoring and bucketing Triton kernels against their PyTorch references, on random and adversarial inputs.

(The gate kernel is tested in test_gate.py, beside its reference.)

By default the kernels run on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, set below before Triton is imported). On a GPU
machine ``TRITON_INTERPRET=0 pytest tests/test_kernels.py`` runs the same
tests on CUDA.
"""

from __future__ import annotations

import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from cggr.bucketing import rank_buckets_reference  # noqa: E402
from cggr.kernels.bucketing import _rank_buckets, rank_buckets_triton  # noqa: E402
from cggr.kernels.scoring import _entropy_confidence, entropy_confidence_triton as _triton_scores  # noqa: E402
from cggr.scoring import Scores  # noqa: E402


def entropy_confidence_triton(x):
    return Scores(*_triton_scores(x))
from cggr.scoring import entropy_confidence_reference  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
if not INTERPRET and DEVICE == "cpu":
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

# The interpreter's numpy arithmetic warns on inf - inf, log(0) and the like; the kernels expect them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(*key) -> torch.Generator:
    """A fresh, reproducible seed per test case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# --------------------------------------------------------------------------- scoring

# (rtol, atol) on each of difficulty / entropy / confidence. Both sides upcast
# the same inputs to fp32, so only summation order (and, on a GPU, the fast
# exp) separates them; half-precision logits span a wider range of exponents.
SCORE_TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (1e-3, 1e-5)}


def _assert_scores(got, ref, dtype, shape):
    rtol, atol = SCORE_TOL[dtype]
    for name, g, r in zip(("difficulty", "entropy", "confidence"), got, ref):
        assert g.dtype == torch.float32 and tuple(g.shape) == tuple(shape), name
        assert torch.equal(torch.isnan(g), torch.isnan(r)), f"{name}: NaN positions differ"
        torch.testing.assert_close(g.cpu(), r.cpu(), rtol=rtol, atol=atol, equal_nan=True, msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 7), (37, 1000), (5, 4099)])
def test_scoring_matches_reference(rows, vocab, dtype):
    x = (torch.randn(rows, vocab, generator=_gen(rows, vocab, dtype)) * 3.0).to(dtype).to(DEVICE)
    _assert_scores(entropy_confidence_triton(x), entropy_confidence_reference(x), dtype, (rows,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scoring_nonfinite_and_masked_rows(dtype):
    V = 300
    x = torch.randn(10, V, generator=_gen("nonfinite", dtype)) * 4.0
    x[0, 17] = float("nan")                 # NaN anywhere -> NaN row
    x[1, -1] = float("inf")                 # +inf -> NaN row
    x[2] = float("-inf")                    # nothing finite -> NaN row
    x[3, ::2] = float("-inf")               # masked vocabulary entries contribute nothing
    x[4, :] = float("-inf")
    x[4, 250] = 2.5                         # a single finite entry: entropy 0, confidence 1
    x[5, :200] = float("-inf")              # -inf first, finite later (rescaling from an empty state)
    x[6, 3] = float("-inf")
    x[6, 5] = float("nan")                  # NaN together with -inf
    x[7] *= 1e4                             # extreme logits: one-hot distributions
    x[8, 0] = float("inf")
    x[8, 1] = float("-inf")
    x = x.to(dtype).to(DEVICE)
    ref = entropy_confidence_reference(x)
    assert ref.entropy[[0, 1, 2, 6, 8]].isnan().all()
    for block_v in (None, 64):              # one chunk, and several chunks per row
        got = entropy_confidence_triton(x) if block_v is None else Scores(*_entropy_confidence(x, block_v=block_v))
        _assert_scores(got, ref, dtype, (10,))
    assert float(got.entropy[4]) == 0.0 and float(got.confidence[4]) == 1.0


@pytest.mark.parametrize("order", ["ascending", "descending", "random"])
def test_scoring_online_rescaling(order):
    """Many chunks per row with a running max that keeps rising (or never does)."""
    x = torch.randn(6, 1000, generator=_gen("rescale", order)) * 5.0
    if order != "random":
        x = x.sort(dim=-1, descending=order == "descending").values
    x[0] += 300.0  # large offsets must cancel exactly as in the reference
    x = x.to(DEVICE)
    _assert_scores(Scores(*_entropy_confidence(x, block_v=16)), entropy_confidence_reference(x), torch.float32, (6,))


def test_scoring_shapes_and_strides():
    g = _gen("strides")
    base = torch.randn(4, 6, 2 * 130, generator=g).to(DEVICE)
    cases = [
        base[..., :130],                    # strided rows, contiguous vocabulary: read in place
        base[..., ::2],                     # strided vocabulary: copied
        base.transpose(0, 1)[..., :77],     # leading dims that do not flatten to one stride
        base[1, 2, :50],                    # 1-D logits: one row, 0-D outputs
    ]
    for x in cases:
        _assert_scores(entropy_confidence_triton(x), entropy_confidence_reference(x), torch.float32, x.shape[:-1])
    empty = torch.zeros(0, 5, 9, device=DEVICE)
    assert entropy_confidence_triton(empty).difficulty.shape == (0, 5)
    with pytest.raises(TypeError):
        entropy_confidence_triton(torch.ones(3, 4, dtype=torch.long, device=DEVICE))


# --------------------------------------------------------------------------- bucketing

def _check_buckets(scores, valid, K, exact=False, **kw):
    """The contract of docs/design.md §1.4: exact bucket sizes, <= 1% of n off per boundary."""
    got = (_rank_buckets(scores, valid, K, **kw) if kw else rank_buckets_triton(scores, valid, K)).cpu()
    ref = rank_buckets_reference(scores.cpu(), valid.cpu(), K)
    assert got.dtype == torch.long and got.shape == scores.shape
    ok = valid.cpu().bool()
    assert torch.equal(got[~ok], torch.full_like(got[~ok], -1)), "invalid tokens must be -1"
    n = int(ok.sum())
    sizes = torch.bincount(got[ok], minlength=K)
    assert torch.equal(sizes, torch.bincount(ref[ok], minlength=K)), "bucket sizes differ from the exact ranks"
    for k in range(1, K):
        off = int(((got[ok] < k) != (ref[ok] < k)).sum())
        assert off <= 0.01 * n, f"boundary {k}: {off} of {n} tokens on the wrong side"
    if exact:
        assert torch.equal(got, ref)
    return got


@pytest.mark.parametrize("K", [1, 2, 4, 7])
@pytest.mark.parametrize("n", [1, 3, 37, 1000, 20000])
def test_buckets_random(n, K):
    g = _gen("buckets", n, K)
    scores = torch.randn(n, generator=g) * 3.0
    valid = torch.rand(n, generator=g) > 0.2
    # This implementation is exact (radix selection), beyond the 1% contract.
    _check_buckets(scores.to(DEVICE), valid.to(DEVICE), K, exact=True)


@pytest.mark.parametrize("n", [1, 2, 5, 3000])
def test_buckets_all_tied(n):
    """Ties follow token order, as in the stable reference: the result is exactly the reference."""
    scores = torch.full((n,), 0.25, device=DEVICE)
    _check_buckets(scores, torch.ones(n, dtype=torch.bool, device=DEVICE), 4, exact=True)
    valid = torch.rand(n, generator=_gen("tied", n)) > 0.3
    _check_buckets(scores, valid.to(DEVICE), 4, exact=True)


def test_buckets_ties_across_programs():
    """Small blocks and few programs: tie positions carried across blocks and programs.

    On a GPU the programs meet at grid barriers of one cooperative launch, or
    (``cooperative=False``, as in the interpreter) at the ends of one launch per phase.
    """
    n = 2000
    g = _gen("ties-programs")
    scores = torch.randint(0, 3, (n,), generator=g).float()
    valid = torch.rand(n, generator=g) > 0.1
    for block, programs, coop in ((128, 3, None), (256, 8, None), (512, 1, None), (128, 4, False)):
        _check_buckets(scores.to(DEVICE), valid.to(DEVICE), 5, exact=True, block=block, max_programs=programs,
                       cooperative=coop)
    _check_buckets(torch.zeros(n, device=DEVICE), valid.to(DEVICE), 4, exact=True, block=128, max_programs=5)


def test_buckets_outliers():
    """Outliers that would squeeze a [min, max] histogram into one bin, and keys spanning all exponents."""
    g = _gen("outliers")
    n = 4000
    s = torch.rand(n, generator=g)
    s[:5] = 1e30
    s[5:9] = -1e30
    s[9] = 3.4e38
    _check_buckets(s.to(DEVICE), torch.ones(n, dtype=torch.bool, device=DEVICE), 4, exact=True)
    wide = torch.sign(torch.randn(n, generator=g)) * 10.0 ** (torch.rand(n, generator=g) * 70 - 35)
    _check_buckets(wide.to(DEVICE), torch.rand(n, generator=g).to(DEVICE) > 0.1, 8, exact=True)
    _check_buckets(wide.to(DEVICE), torch.ones(n, dtype=torch.bool, device=DEVICE), 8, exact=True,
                   block=1024, max_programs=4)
    # Values that differ only in their last mantissa bits, with many duplicates.
    ulp = 1.0 + torch.randint(0, 600, (n,), generator=g).float() * 2.0**-23
    _check_buckets(ulp.to(DEVICE), torch.ones(n, dtype=torch.bool, device=DEVICE), 4, exact=True)


def test_buckets_nonfinite():
    """NaN, +inf and -inf rank hardest (tied, in token order); -0 ties with +0."""
    g = _gen("nonfinite-buckets")
    n = 3000
    s = torch.randn(n, generator=g)
    s[::7] = float("nan")
    s[3::11] = float("inf")
    s[5::13] = float("-inf")
    s[1::17] = -0.0
    s[2::17] = 0.0
    valid = torch.rand(n, generator=g) > 0.1
    got = _check_buckets(s.to(DEVICE), valid.to(DEVICE), 4, exact=True)
    assert (got[~torch.isfinite(s) & valid][:100] == 0).all()
    _check_buckets(s.to(DEVICE), valid.to(DEVICE), 4, exact=True, block=256, max_programs=4)
    every = torch.full((50,), float("nan"))
    _check_buckets(every.to(DEVICE), torch.ones(50, dtype=torch.bool, device=DEVICE), 3, exact=True)


def test_buckets_degenerate():
    s = torch.randn(500, generator=_gen("degenerate")).to(DEVICE)
    out = rank_buckets_triton(s, torch.zeros(500, dtype=torch.bool, device=DEVICE), 4)
    assert (out == -1).all()
    one = torch.zeros(500, dtype=torch.bool)
    one[123] = True
    out = _check_buckets(s, one.to(DEVICE), 4, exact=True)
    assert int(out[123]) == 0 and int((out >= 0).sum()) == 1
    for v in (True, False):
        _check_buckets(torch.tensor([0.5], device=DEVICE), torch.tensor([v], device=DEVICE), 4, exact=True)
    assert rank_buckets_triton(torch.zeros(0, device=DEVICE), torch.zeros(0, dtype=torch.bool, device=DEVICE), 4).numel() == 0
    with pytest.raises(ValueError):
        rank_buckets_triton(s, torch.ones(499, dtype=torch.bool, device=DEVICE), 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_buckets_dtypes_and_shapes(dtype):
    g = _gen("dtype-buckets", dtype)
    scores = (torch.randn(3, 7, 29, generator=g) * 2).to(dtype)  # half types: many ties
    valid = (torch.rand(3, 7, 29, generator=g) > 0.25).to(torch.int32)  # a numeric mask
    _check_buckets(scores.to(DEVICE), valid.to(DEVICE), 4, exact=True)

