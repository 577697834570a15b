"""Qwen 3's decoder layer (HF ``Qwen3DecoderLayer``): Llama's, with an RMSNorm of q and of k over each head
(``q_norm``/``k_norm``, one weight of ``head_dim``) between the projections and the rotary.

Qwen 3 sets a sliding window on some layers (``layer_types``); HF puts it in the layer's mask.
"""

from .decoder import DecoderLayout, decoder_backward

LAYOUT = DecoderLayout(qk_norm="head")
BACKWARD = decoder_backward("qwen3", LAYOUT)
