"""Token difficulty from the model's own logits (docs/design.md §1.3).

``D_t = Entropy(P_t) - Confidence(P_t)`` with ``P_t = softmax(logits_t)``,
entropy in nats and confidence ``max_v P_t(v)``; higher is harder. Always in
fp32, whatever the logits' dtype.

Written with the one-pass ("online softmax") quantities the Triton kernel
uses, so that the reference and the kernel compute the same function:

    m = max_v x_v                    (row maximum)
    s = sum_v exp(x_v - m)           (so confidence = exp(m - m) / s = 1 / s)
    t = sum_v exp(x_v - m) (x_v - m)
    entropy = log(s) - t / s

Entries equal to ``-inf`` are legitimate (a masked vocabulary entry) and
contribute nothing. A row with a NaN or ``+inf`` entry, or with every entry
``-inf``, has no distribution: its three outputs are NaN, and the router
treats the token as hardest (full depth).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SCORERS = ("entropy_confidence", "entropy", "margin")


class Scores(NamedTuple):
    """Per-token scores, fp32, shaped like ``logits.shape[:-1]``: a triple (``d, ent, conf = scores``)."""

    difficulty: torch.Tensor
    entropy: torch.Tensor
    confidence: torch.Tensor
    # Not a field, so that the triple unpacks as it always did: each token's loss-gradient norm
    # ``||softmax(z) - onehot(y)||`` (:func:`loss_gradient_norm`) where the labels were known and it was asked for
    # (a fused loss with ``grad_norm=True``; :meth:`with_grad_norm`), else None.
    grad_norm = None

    def with_grad_norm(self, grad_norm: torch.Tensor | None) -> "Scores":
        """These scores carrying ``grad_norm`` (None: the scores alone)."""
        if grad_norm is None:
            return Scores(*self)
        out = _ScoresWithGradNorm(*self)
        out.grad_norm = grad_norm
        return out


class _ScoresWithGradNorm(Scores):
    """:class:`Scores` with ``grad_norm`` set (a tuple subclass with an instance dict; made by
    :meth:`Scores.with_grad_norm`)."""


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {type(logits).__name__}"
                        + (f" of dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else ""))
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")


@torch.no_grad()
def entropy_confidence_reference(logits: torch.Tensor, chunk_rows: int = 4096) -> Scores:
    """Plain PyTorch reference: one row of logits at a time in fp32.

    Processes ``chunk_rows`` rows at once so that an fp32 copy of a large
    logits tensor is never materialised.
    """
    _check_logits(logits)
    lead = logits.shape[:-1]
    x_all = logits.reshape(-1, logits.shape[-1])
    outs = []
    for x in x_all.split(chunk_rows):
        x = x.float()
        bad = torch.isnan(x).any(-1) | (x == float("inf")).any(-1)
        m = x.amax(-1, keepdim=True)
        bad |= m.squeeze(-1) == float("-inf")
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        z = x - m
        e = torch.exp(z)
        s = e.sum(-1)
        t = torch.where(e > 0, e * z, torch.zeros_like(z)).sum(-1)
        ent = torch.log(s) - t / s
        conf = 1.0 / s
        nan = torch.full_like(s, float("nan"))
        ent = torch.where(bad, nan, ent)
        conf = torch.where(bad, nan, conf)
        outs.append(torch.stack([ent - conf, ent, conf]))
    out = torch.cat(outs, dim=1) if outs else logits.new_zeros((3, 0), dtype=torch.float32)
    d, ent, conf = (o.reshape(lead) for o in out)
    return Scores(d, ent, conf)


def _use_triton(logits: torch.Tensor) -> bool:
    if not logits.is_cuda:
        return False
    from .kernels import triton_available

    return triton_available()


@torch.no_grad()
def score_difficulty(logits: torch.Tensor, scorer: str = "entropy_confidence") -> Scores:
    """Score every token's difficulty from its logits.

    Args:
        logits: ``[..., vocab]`` tensor of any float dtype.
        scorer: ``"entropy_confidence"`` (the default, docs/design.md §1.3),
            ``"entropy"`` (entropy alone) or ``"margin"`` (``1 - confidence``).
    Returns:
        :class:`Scores` with fp32 tensors shaped ``logits.shape[:-1]``; NaN
        marks a token whose logits were not finite.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    _check_logits(logits)
    if _use_triton(logits):
        from .kernels.scoring import entropy_confidence_triton

        scores = Scores(*entropy_confidence_triton(logits))
    else:
        scores = entropy_confidence_reference(logits)
    return scores_for(scores, scorer)


def scores_for(scores: Scores, scorer: str) -> Scores:
    """``scores`` (entropy-minus-confidence difficulty) with the difficulty of ``scorer``."""
    if scorer == "entropy":
        return Scores(scores.entropy, scores.entropy, scores.confidence).with_grad_norm(scores.grad_norm)
    if scorer == "margin":
        return Scores(1.0 - scores.confidence, scores.entropy, scores.confidence).with_grad_norm(scores.grad_norm)
    return scores


@torch.no_grad()
def loss_gradient_norm(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                       chunk_rows: int = 2048) -> torch.Tensor:
    """``||softmax(z_t) - onehot(y_t)||_2`` of every token, fp32, shaped like ``targets``: the size of the
    cross-entropy's gradient at the token's logits (small exactly when the model is confident and right).

    From ``sum_v p_v^2 = exp(logsumexp(2z) - 2 logsumexp(z))``: ``g^2 = sum p^2 - 2 p_y + 1``. ``chunk_rows`` rows
    at a time in fp32 (no fp32 copy of the whole logits). NaN where the target is ``ignore_index`` or out of range,
    or the logits row is not finite.
    """
    _check_logits(logits)
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have the logits' shape without the vocabulary, {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    V = logits.shape[-1]
    x_all, y_all = logits.reshape(-1, V), targets.reshape(-1).to(logits.device)
    out = torch.empty(y_all.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, y_all.numel(), chunk_rows):
        x = x_all[start:start + chunk_rows].float()
        y = y_all[start:start + chunk_rows]
        ok = (y != ignore_index) & (y >= 0) & (y < V)
        lse = torch.logsumexp(x, -1)
        sum_p2 = torch.exp(torch.logsumexp(2 * x, -1) - 2 * lse)
        p_y = torch.exp(x.gather(-1, torch.where(ok, y, 0).unsqueeze(-1)).squeeze(-1) - lse)
        g = (sum_p2 - 2 * p_y + 1).clamp_min(0).sqrt()
        out[start:start + chunk_rows] = torch.where(ok, g, float("nan"))
    return out.view(targets.shape)

