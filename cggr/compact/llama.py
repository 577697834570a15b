"""Llama's decoder layer (HF ``LlamaDecoderLayer``; Mistral's and Qwen 2's are the same maths).

``h = x + o_proj(attn(rope(q, k), v))`` with q/k/v projected from ``input_layernorm(x)``, then
``y = h + down(silu(gate(r)) * up(r))`` with ``r = post_attention_layernorm(h)``; RMSNorms ``w * x_hat.to(dtype)``.
Biases on q/k/v (Qwen 2) or on every projection are read where the layer has them. Liger-Kernel's RMSNorm
(offset 0, "llama" casting) and SwiGLU MLP compute the same maths with fused kernels, and its RoPE through the
variant that reads the first half of cos/sin; the attach-time check decides.
"""

from .decoder import DecoderLayout, decoder_backward

LAYOUT = DecoderLayout()
BACKWARD = decoder_backward("llama", LAYOUT)
