"""Gemma 3's text decoder layer (HF ``Gemma3DecoderLayer``, model_type ``gemma3_text``).

Sandwich norms: ``h = x + post_attention_layernorm(attn(...))`` with q/k/v from ``input_layernorm(x)``, and
``y = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``. Every norm is Gemma's
``((1 + w) * x_hat).to(dtype)``, q and k are normed over each head before the rotary, the MLP's gate is
tanh-GELU (GeGLU), and the attention scales by ``query_pre_attn_scalar ** -0.5``. Sliding-window layers alternate
with global ones (``layer_types``): the model passes each layer the mask and the rotary tables of its type, so
the layer's call carries both. The embedding's ``sqrt(hidden_size)`` scale is outside the layers.
"""

from .decoder import DecoderLayout, decoder_backward
from .pointwise import RMSNormKind

LAYOUT = DecoderLayout(norm=RMSNormKind(offset=1.0, weight_in_fp32=True), mlp_norm="pre_feedforward_layernorm",
                       attention_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm",
                       qk_norm="head", activation="gelu_tanh")
BACKWARD = decoder_backward("gemma3", LAYOUT)
