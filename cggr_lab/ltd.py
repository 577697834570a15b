"""Random layerwise token dropping (random-LTD, Yao et al. 2022): the peer arm of ``cggr bench quality``.

DeepSpeed's random-LTD, written for the harness's Hugging Face Llama models (a
benchmark arm, not a library mode). In every *middle* decoder layer (all but
the first and the last), each sequence keeps a random subset of ``k`` of its
``S`` tokens, the same ``k`` for every sequence (a multiple of 8, see
:func:`kept_tokens`), drawn afresh for every layer and every training step. The layer runs, forward and backward, on the kept
tokens only:

* the kept rows are gathered into a ``[B, k, D]`` tensor in their original
  order (the drawn positions are sorted), with the rotary ``cos``/``sin`` and
  the position ids gathered at their original positions;
* attention among the kept tokens is causal by original position: a 4-D mask
  (eager attention, or any mask HF builds) is restricted to the kept rows and
  columns; with no mask (SDPA, unpadded) SDPA's ``is_causal`` on the sorted
  sub-sequence is exactly "attend to kept tokens at earlier or equal original
  positions";
* the dropped tokens' hidden states pass through the layer unchanged: the
  layer's outputs are scattered back into the full ``[B, S, D]`` tensor.

The kept fraction rises linearly from ``start_keep`` to 1 over the first
``ramp`` of the budget (random-LTD's schedule), so training ends dense; it is a
function of the elapsed budget fraction, set before every step by
:func:`cggr_lab.training.train_arm` (``set_fraction``). In eval mode every layer
runs dense. :class:`RandomLTD` installs itself by replacing the middle layers'
``forward`` on the instances (parameter names and the state dict are
unchanged) and :meth:`RandomLTD.detach` restores them.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_ATTENTION = ("sdpa", "eager")


def keep_fraction(fraction: float, start_keep: float, ramp: float) -> float:
    """Kept fraction of the tokens of a middle layer at elapsed budget ``fraction``: ``start_keep`` at 0,
    rising linearly to 1 at ``ramp``, 1 afterwards."""
    return start_keep + (1.0 - start_keep) * min(1.0, max(0.0, fraction) / ramp)


KEEP_MULTIPLE = 8  # kept token counts are multiples of this: tensor-core friendly matmul shapes


def kept_tokens(keep: float, seq_len: int) -> int:
    """Tokens kept per sequence: ``keep * seq_len`` rounded to the nearest multiple of 8 (halves up), at
    least 8 and at most ``seq_len``; all of them at ``keep >= 1``. Multiples of 8 keep the gathered
    ``[B, k, D]`` matmuls and attention on tensor-core friendly shapes, and change ``k`` (a new shape)
    only every 8 tokens of the schedule."""
    if keep >= 1.0:
        return seq_len
    k = KEEP_MULTIPLE * math.floor(keep * seq_len / KEEP_MULTIPLE + 0.5)
    return min(seq_len, max(KEEP_MULTIPLE, k))


def _take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, idx[b]]`` for ``t`` of shape ``[1 or B, S, ...]`` and ``idx`` ``[B, k]`` (a gather, no loop)."""
    B, k = idx.shape
    t = t.expand(B, *t.shape[1:])
    index = idx.view(B, k, *([1] * (t.dim() - 2))).expand(B, k, *t.shape[2:])
    return t.gather(1, index)


def _take_mask(mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A ``[1 or B, H, S, S]`` attention mask restricted to the kept queries and keys: ``[B, H, k, k]``."""
    B, k = idx.shape
    mask = mask.expand(B, *mask.shape[1:])
    H, S = mask.shape[1], mask.shape[3]
    rows = mask.gather(2, idx.view(B, 1, k, 1).expand(B, H, k, S))
    return rows.gather(3, idx.view(B, 1, 1, k).expand(B, H, k, k))


class RandomLTD:
    """Random-LTD on the middle decoder layers of a HF Llama-style causal LM (``model.model.layers``).

    ``start_keep`` in (0, 1]: kept fraction at the start; ``ramp`` in (0, 1]: fraction of the budget over
    which it rises to 1; ``seed``: the token draws. ``last_indices[i]``: the kept positions ``[B, k]`` of
    middle layer ``i``'s last training forward (for tests and inspection).
    """

    def __init__(self, model: torch.nn.Module, start_keep: float = 0.5, ramp: float = 0.7, seed: int = 0):
        if not 0.0 < start_keep <= 1.0:
            raise ValueError(f"random-LTD: start_keep must be in (0, 1], got {start_keep}")
        if not 0.0 < ramp <= 1.0:
            raise ValueError(f"random-LTD: ramp must be in (0, 1], got {ramp}")
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise TypeError(f"random-LTD wraps a HF causal LM with decoder layers at model.model.layers; "
                            f"{type(model).__name__} has none")
        if len(layers) < 3:
            raise ValueError(f"random-LTD keeps the first and last layers dense and needs at least 3 layers, "
                             f"the model has {len(layers)}")
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"random-LTD supports attention implementations {list(SUPPORTED_ATTENTION)} (their "
                             f"masks are restricted exactly to the kept tokens), the model uses {impl!r}")
        if getattr(model.model, "gradient_checkpointing", False):
            raise ValueError("random-LTD draws tokens in the forward: gradient checkpointing would recompute "
                             "with another draw; turn it off")
        self.model, self.start_keep, self.ramp, self.seed = model, float(start_keep), float(ramp), int(seed)
        self.keep = self.start_keep
        self.last_indices: dict[int, torch.Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._rows_run = self._rows_total = 0
        self._layers = list(layers)
        self._middle = list(range(1, len(layers) - 1))
        for i in self._middle:
            layer = layers[i]
            if "forward" in vars(layer):
                raise RuntimeError(f"random-LTD: layer {i} already has a patched forward (attached twice?)")
            layer.forward = self._make_forward(i, layer.forward)
        self._attached = True

    # ----------------------------------------------------------------- schedule

    def set_fraction(self, fraction: float) -> None:
        """Set the kept fraction from the elapsed budget fraction (before each training step)."""
        self.keep = keep_fraction(fraction, self.start_keep, self.ramp)

    def metrics(self) -> dict[str, float]:
        """The kept fraction, and the fraction of (token, layer) pairs computed since the last call
        (forward and backward, all layers counted) as ``mean_depth_fraction``."""
        out = {"keep_fraction": self.keep}
        if self._rows_total:
            out["mean_depth_fraction"] = self._rows_run / self._rows_total
        self._rows_run = self._rows_total = 0
        return out

    def detach(self) -> None:
        """Restore the layers' own ``forward``."""
        if self._attached:
            for i in self._middle:
                del self._layers[i].forward
            self._attached = False

    # ----------------------------------------------------------------- the wrapped layer

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
            g.manual_seed(self.seed)
        return g

    def draw(self, batch: int, seq_len: int, k: int, device: torch.device) -> torch.Tensor:
        """Kept positions ``[batch, k]``: a uniform random ``k``-subset of each row, sorted ascending."""
        u = torch.rand(batch, seq_len, generator=self._generator(device), device=device)
        return u.topk(k, dim=1, sorted=False).indices.sort(dim=1).values

    def _make_forward(self, index: int, forward):
        def ltd_forward(hidden_states, *args, attention_mask=None, position_ids=None, position_embeddings=None,
                        **kwargs):
            B, S, D = hidden_states.shape
            training = self._layers[index].training
            k = kept_tokens(self.keep, S) if training else S
            if training:
                self._count(index, B * S, B * k)
            if k >= S:
                return forward(hidden_states, *args, attention_mask=attention_mask, position_ids=position_ids,
                               position_embeddings=position_embeddings, **kwargs)
            if args:
                raise TypeError(f"random-LTD: layer {index} got unexpected positional arguments")
            if kwargs.get("use_cache") or kwargs.get("cache") is not None:
                raise ValueError("random-LTD drops tokens in training only; it cannot fill a KV cache")
            if position_embeddings is None:
                raise ValueError("random-LTD needs the rotary position_embeddings passed to the decoder layer")
            if attention_mask is not None and attention_mask.dim() != 4:
                raise ValueError(f"random-LTD: expected a 4-D attention mask or None, got shape "
                                 f"{tuple(attention_mask.shape)}")
            idx = self.draw(B, S, k, hidden_states.device)
            self.last_indices[index] = idx
            kept = _take_rows(hidden_states, idx)
            cos, sin = position_embeddings
            if position_ids is None:
                position_ids = torch.arange(S, device=hidden_states.device).unsqueeze(0)
            out = forward(kept, attention_mask=None if attention_mask is None else _take_mask(attention_mask, idx),
                          position_ids=_take_rows(position_ids, idx),
                          position_embeddings=(_take_rows(cos, idx), _take_rows(sin, idx)), **kwargs)
            if not isinstance(out, torch.Tensor) or out.shape != kept.shape:
                raise TypeError(f"random-LTD: layer {index} must return a [B, k, D] tensor, got "
                                f"{type(out).__name__}")
            return hidden_states.scatter(1, idx.unsqueeze(-1).expand(B, k, D), out)

        return ltd_forward

    def _count(self, index: int, total: int, run: int) -> None:
        # Every layer counts as computed for all rows except the middle ones' dropped rows.
        layers = len(self._layers)
        if index == self._middle[0]:
            self._rows_total += layers * total
            self._rows_run += (layers - len(self._middle)) * total
        self._rows_run += run
