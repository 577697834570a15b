"""OLMo 2's decoder layer (HF ``Olmo2DecoderLayer``): post-norms, no norm of the input.

``h = x + post_attention_layernorm(attn(...))`` with q/k/v projected from ``x`` itself and q and k normed over
the projection's whole width (``q_norm`` of ``heads * head_dim``) before the rotary; then
``y = h + post_feedforward_layernorm(mlp(h))``. Its RMSNorm multiplies in fp32 and rounds after,
``(w * x_hat).to(dtype)``.
"""

from .decoder import DecoderLayout, decoder_backward
from .pointwise import RMSNormKind

LAYOUT = DecoderLayout(norm=RMSNormKind(weight_in_fp32=True), input_norm=None, mlp_norm=None,
                       attention_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm",
                       qk_norm="width")
BACKWARD = decoder_backward("olmo2", LAYOUT)
