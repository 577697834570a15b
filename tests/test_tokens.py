"""cggr.tokens: valid tokens and where a forward's logits (or its fused loss's scores) are."""

from collections import namedtuple

import pytest
import torch

from cggr.loss import LossWithScores
from cggr.scoring import Scores
from cggr.tokens import find_logits, find_scores, input_tokens_shape, valid_tokens


def test_valid_tokens_combine_mask_labels_and_extra():
    shape = torch.Size([2, 5])
    am = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[5, 6, -100, -100, -100], [-100, 1, 2, 3, 4]])
    extra = torch.tensor([[True] * 5, [True, True, True, True, False]])
    v = valid_tokens(shape, torch.device("cpu"), attention_mask=am, labels=labels, label_shift=1, extra=extra,
                     extra_name="mask")
    # shift 1: position t is valid when labels[t+1] is a target; the last position never is
    assert v.tolist() == [[True, False, False, False, False], [True, True, True, True, False]]
    v0 = valid_tokens(shape, torch.device("cpu"), labels=labels, label_shift=0)
    assert torch.equal(v0, labels != -100)


def test_valid_tokens_errors():
    shape = torch.Size([2, 3])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        valid_tokens(shape, torch.device("cpu"), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="pass label_shift=1 or label_shift=0"):
        valid_tokens(shape, torch.device("cpu"), labels=torch.zeros(2, 3, dtype=torch.long), label_shift=None)
    with pytest.raises(ValueError, match="my_mask has shape"):
        valid_tokens(shape, torch.device("cpu"), extra=torch.ones(3), extra_name="my_mask")
    # a 4-D attention mask says nothing about padding: every token stays valid
    assert valid_tokens(shape, torch.device("cpu"), attention_mask=torch.zeros(2, 1, 3, 3)).all()


def test_find_logits_in_every_output_form():
    logits = torch.randn(2, 3, 7)
    loss = torch.tensor(1.0)
    Out = namedtuple("Out", "loss logits")
    shape = torch.Size([2, 3])
    assert find_logits(logits, shape) is logits
    assert find_logits(Out(loss, logits), shape) is logits
    assert find_logits({"loss": loss, "logits": logits}, shape) is logits
    assert find_logits((loss, logits, torch.randn(2, 3)), shape) is logits  # return_dict=False: loss first
    assert find_logits((loss,), shape) is None and find_logits(loss, shape) is None
    assert find_logits({"loss": loss, "logits": None}, shape) is None  # a fused loss


def test_find_scores_in_every_output_form():
    """A fused loss's scores, returned by the forward: as they are, in its LossWithScores, beside the loss in a
    dict, an object or a tuple; nothing else passes for them (HF's generate outputs hold a tuple as .scores)."""
    scores = Scores(*torch.randn(3, 2, 5))
    loss = torch.tensor(1.0)
    Out = namedtuple("Out", "loss scores")
    for output in (scores, LossWithScores(loss, scores), {"loss": loss, "scores": scores}, Out(loss, scores),
                   (loss, scores), [loss, LossWithScores(loss, scores)]):
        assert find_scores(output) is scores, type(output).__name__
    for output in (loss, (loss,), {"loss": loss, "logits": torch.randn(2, 5, 7)}, Out(loss, tuple(scores)),
                   {"scores": torch.randn(2, 5)}, None):
        assert find_scores(output) is None, output


def test_input_tokens_shape():
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert input_tokens_shape((ids,), {}) == (2, 5)
    assert input_tokens_shape((), {"inputs_embeds": torch.zeros(3, 4, 8)}) == (3, 4)
    assert input_tokens_shape((torch.zeros(2, 5),), {}) is None
