"""Compacted routed backwards: per kind of block, a backward that works on the block's active rows only.

A compacted backward replaces a whole block's backward by one that works on the block's active rows only
(docs/design.md §3.1: per-linear sparsity alone cannot approach the FLOP ratio). Where things are:

* :mod:`.backward`: :class:`CompactedBackward`, the record of one (recognise, weights, inputs, Functions);
* :mod:`.decoder`: the rotary decoder layers (Llama and its relatives), one module per family naming its
  layout: :mod:`.llama`, :mod:`.qwen3`, :mod:`.gemma3`, :mod:`.olmo2`, :mod:`.phi3`; :mod:`.gpt2`: GPT-2's blocks;
* :mod:`.pointwise` (row-wise pieces) and :mod:`.attention` (the dense attention backward) they share;
* :mod:`.forward`: :class:`CompactedForward`, the forward installed on such a block;
* :mod:`.verify`: the attach-time proof that a block computes what the Functions compute
  (:func:`~cggr.compact.verify.compact_decision`), so that layers with a known layer's modules but other
  maths (Granite's multipliers, interleaved rotary, layers without rotary) take the generic path, with a warning.

Which model family takes which compacted backward is :mod:`cggr.families`' to say. The compacted backwards are
first-order only: they refuse ``create_graph=True``.
"""

from .backward import CompactedBackward
from .forward import CompactedForward

__all__ = ["CompactedBackward", "CompactedForward"]
