"""Phi-3's decoder layer (HF ``Phi3DecoderLayer``): Llama's maths with fused projections.

One ``qkv_proj`` (q, then k, then v along its output) and one ``gate_up_proj`` (the gate's half first), both
without bias; residual dropouts, which must be off (p = 0, or eval mode) for the compacted path. Partial rotary
(``partial_rotary_factor`` < 1, Phi-4-mini) rotates part of each head: such calls take the generic backward.
"""

from .decoder import DecoderLayout, decoder_backward

LAYOUT = DecoderLayout(fused_qkv=True, fused_gate_up=True)
BACKWARD = decoder_backward("phi3", LAYOUT)
