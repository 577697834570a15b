"""The difficulty score against a direct softmax computation."""

import math

import pytest
import torch

from cggr.scoring import Scores, entropy_confidence_reference, score_difficulty


def _naive(logits):
    p = torch.softmax(logits.double(), -1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    conf = p.max(-1).values
    return (ent - conf).float(), ent.float(), conf.float()


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 33), (4, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_softmax_definition(shape, dtype):
    torch.manual_seed(sum(shape))
    logits = (torch.randn(shape) * 3).to(dtype)
    d, ent, conf = score_difficulty(logits)
    nd, nent, nconf = _naive(logits.float())
    assert d.dtype == torch.float32 and d.shape == shape[:-1]
    torch.testing.assert_close(ent, nent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conf, nconf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d, nd, rtol=1e-5, atol=1e-5)


def test_known_values():
    uniform = torch.zeros(1, 8)
    d, ent, conf = score_difficulty(uniform)
    assert ent.item() == pytest.approx(math.log(8), abs=1e-6)
    assert conf.item() == pytest.approx(1 / 8, abs=1e-7)
    peaked = torch.tensor([[100.0, 0.0, 0.0]])
    d, ent, conf = score_difficulty(peaked)
    assert conf.item() == pytest.approx(1.0) and d.item() == pytest.approx(-1.0, abs=1e-6)
    assert score_difficulty(uniform).difficulty > d  # uniform is harder


def test_nonfinite_rows_are_nan_and_masked_entries_are_fine():
    x = torch.randn(5, 6)
    x[0, 1] = float("nan")
    x[1, 2] = float("inf")
    x[2, :] = float("-inf")
    x[3, :4] = float("-inf")  # a masked vocabulary: a valid distribution over 2 entries
    d, ent, conf = score_difficulty(x)
    assert torch.isnan(d[:3]).all() and torch.isnan(ent[:3]).all() and torch.isnan(conf[:3]).all()
    nd, nent, nconf = _naive(x[3:4, 4:])
    torch.testing.assert_close(d[3:4], nd, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(d[3:]).all()


def test_chunking_does_not_change_results():
    x = torch.randn(37, 11)
    a = entropy_confidence_reference(x, chunk_rows=5)
    b = entropy_confidence_reference(x, chunk_rows=4096)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


def test_other_scorers():
    x = torch.randn(4, 9)
    base = score_difficulty(x)
    assert isinstance(base, Scores)
    torch.testing.assert_close(score_difficulty(x, "entropy").difficulty, base.entropy)
    torch.testing.assert_close(score_difficulty(x, "margin").difficulty, 1 - base.confidence)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scorer must be one of"):
        score_difficulty(torch.randn(2, 3), "loss")
    with pytest.raises(TypeError, match="floating-point"):
        score_difficulty(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocabulary"):
        score_difficulty(torch.randn(2, 0))


def test_scores_unpack_as_a_triple_and_carry_the_loss_gradient_norm_beside():
    """``d, ent, conf = scores`` keeps working; a fused loss's loss-gradient norms ride along (``grad_norm``),
    through the other scorers too, and are None where nobody asked for them."""
    import pickle

    from cggr.scoring import Scores, scores_for

    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(5151))
    plain = score_difficulty(logits)
    d, ent, conf = plain
    assert plain.grad_norm is None and len(plain) == 3
    g = torch.rand(3, 5)
    carried = plain.with_grad_norm(g)
    assert isinstance(carried, Scores) and len(carried) == 3 and torch.equal(carried.grad_norm, g)
    assert all(torch.equal(a, b) for a, b in zip(carried, plain))
    for scorer in ("entropy", "margin", "entropy_confidence"):
        assert torch.equal(scores_for(carried, scorer).grad_norm, g)
        assert scores_for(plain, scorer).grad_norm is None
    assert carried.with_grad_norm(None).grad_norm is None
    again = pickle.loads(pickle.dumps(carried))
    assert torch.equal(again.grad_norm, g) and all(torch.equal(a, b) for a, b in zip(again, plain))
