"""Stage 1 of a step's routing: which tokens a forward has, which are valid, and where its logits (or the
scores of a fused loss) are.

A token is valid when its attention mask is 1 and its label is not the ignore
index (docs/design.md §1.2). Everything here reads the forward's arguments and output
only; nothing here holds state.
"""

from __future__ import annotations

from typing import Any

import torch

from .scoring import Scores


def input_tokens_shape(args: tuple, kwargs: dict) -> torch.Size | None:
    """The token grid of a forward call (``input_ids``' shape, or ``inputs_embeds`` without its last dim)."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    if isinstance(ids, torch.Tensor):
        return ids.shape
    emb = kwargs.get("inputs_embeds")
    if isinstance(emb, torch.Tensor):
        return emb.shape[:-1]
    return None


def input_device(args: tuple, kwargs: dict) -> torch.device | None:
    for t in (kwargs.get("input_ids"), args[0] if args else None, kwargs.get("inputs_embeds")):
        if isinstance(t, torch.Tensor):
            return t.device
    return None


def valid_tokens(shape: torch.Size, device: torch.device, *, attention_mask=None, labels=None,
                 label_shift: int | None = 0, ignore_index: int = -100, extra=None, extra_name: str = "") -> torch.Tensor:
    """Bool mask of the valid tokens, shaped ``shape``.

    ``attention_mask`` counts only when it has one entry per token (4-D masks say nothing about padding);
    ``labels`` only when integer and one per token, shifted left by ``label_shift``; ``extra`` (the user's
    own mask, passed as ``extra_name``) must match ``shape``. ``label_shift=None`` (unknown) with labels given
    is refused: guessing would route the wrong tokens silently.
    """
    valid = torch.ones(shape, dtype=torch.bool, device=device)
    am = attention_mask
    if isinstance(am, torch.Tensor) and am.dim() == len(shape):
        if am.shape != shape:
            raise ValueError(f"cggr: attention_mask has shape {tuple(am.shape)} but the input tokens have shape "
                             f"{tuple(shape)}")
        valid &= am.to(device) != 0
    if isinstance(labels, torch.Tensor) and labels.dim() == len(shape) and not labels.is_floating_point():
        valid &= label_targets(labels.to(device), shape, label_shift, ignore_index) != ignore_index
    if extra is not None:
        extra = torch.as_tensor(extra, device=device)
        if extra.shape != shape:
            raise ValueError(f"cggr: {extra_name} has shape {tuple(extra.shape)}, the input tokens {tuple(shape)}")
        valid &= extra.bool()
    return valid


def label_targets(labels: torch.Tensor, shape: torch.Size, label_shift: int | None, ignore_index: int
                  ) -> torch.Tensor:
    """The label each position's logits are scored against, shaped ``shape``: ``labels[t + 1]`` with
    ``label_shift=1`` (HF causal LMs; the last position gets ``ignore_index``), else ``labels[t]``."""
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"cggr: labels have shape {tuple(labels.shape)}, the input tokens {tuple(shape)}")
    if label_shift is None:
        raise ValueError("cggr: this model holds a Hugging Face causal LM inside a module of another class, so "
                         "cggr cannot tell whether its logits at position t predict labels[t+1] (HF shifts "
                         "the labels inside) or labels[t]; pass label_shift=1 or label_shift=0 to cggr.attach")
    if not label_shift:
        return labels
    targets = torch.full_like(labels, ignore_index)
    targets[..., :-1] = labels[..., 1:]
    return targets


def find_logits(output: Any, tokens_shape: torch.Size | None) -> torch.Tensor | None:
    """The logits in a forward's output, or None when it has none (a fused loss returns only the loss).

    A tensor, ``.logits``, ``["logits"]``, or the tuple item that has one row per token (HF's
    ``return_dict=False`` puts the loss first when labels are given).
    """
    if isinstance(output, torch.Tensor):
        return output if output.dim() >= 1 else None
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, dict):
        logits = output.get("logits")
        return logits if isinstance(logits, torch.Tensor) else None
    if isinstance(output, (tuple, list)):
        tensors = [t for t in output if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.is_floating_point()]
        if tokens_shape is not None:
            tensors = [t for t in tensors if tuple(t.shape[:-1]) == tuple(tokens_shape)]
        return tensors[0] if tensors else None
    return None


def find_scores(output: Any) -> Scores | None:
    """The per-token scores a fused loss computed in the forward and the forward returned, or None.

    ``output`` a :class:`~cggr.scoring.Scores`, or with ``.scores`` / ``["scores"]`` holding one (the
    ``LossWithScores`` of :func:`cggr.loss.linear_cross_entropy`, a dict or ModelOutput beside the loss), or a
    tuple or list with such an item.
    """

    def scores_in(item: Any) -> Scores | None:
        if isinstance(item, Scores):
            return item
        found = item.get("scores") if isinstance(item, dict) else getattr(item, "scores", None)
        return found if isinstance(found, Scores) else None

    found = scores_in(output)
    if found is None and isinstance(output, (tuple, list)):
        found = next((s for s in map(scores_in, output) if s is not None), None)
    return found


def no_logits_error(output: Any, tokens_shape: torch.Size | None, policy: str) -> TypeError:
    return TypeError(
        f"cggr: policy={policy!r} scores tokens from the model's logits, but the forward returned none: it must "
        "return a tensor, an object with .logits, or a tuple with a [..., vocab] tensor of one row per input token"
        + (f" (input tokens {tuple(tokens_shape)})" if tokens_shape is not None else "")
        + f"; got {type(output).__name__}. With a fused loss (Liger, Cut Cross-Entropy, TRL's fused LM head) use "
        "policy='random', which needs no logits, or cggr's fused loss, which computes the scores: "
        "attach(model, fused_loss=True) on an HF causal LM, or cggr.loss.linear_cross_entropy in your forward, "
        "which then returns its scores with the loss (return linear_cross_entropy(...), or .scores beside the loss)")
