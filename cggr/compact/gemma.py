"""Gemma's decoder layer (HF ``GemmaDecoderLayer``, the first Gemma): Llama's structure with Gemma's maths.

``h = x + o_proj(attn(...))`` with q/k/v from ``input_layernorm(x)``, ``y = h + mlp(post_attention_layernorm(h))``;
its RMSNorms are ``((1 + w) * x_hat).to(dtype)`` and its MLP's gate is tanh-GELU (GeGLU). The embedding's
``sqrt(hidden_size)`` scale is outside the layers.
"""

from .decoder import DecoderLayout, decoder_backward
from .gemma3 import LAYOUT as GEMMA3_LAYOUT

LAYOUT = DecoderLayout(norm=GEMMA3_LAYOUT.norm, activation="gelu_tanh")
BACKWARD = decoder_backward("gemma", LAYOUT)
