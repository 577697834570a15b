"""The model families cggr knows: one record per HF ``config.model_type``, in one table.

A record says where the model keeps its block stack, how its labels align, which compacted backward its blocks
take (or none: the generic routed backward), and the tiny random-init model its tests build. Supporting a
family is one record here, plus, for a compacted backward, one module under :mod:`cggr.compact` naming its
layer's layout (docs/adding-a-family.md). The tests parametrize over this table, and the README's
supported-models table is rendered from it (:func:`supported_models_table`).

Even where a record names a compacted backward, each block type is checked against the model's own layer at
attach (:mod:`cggr.compact.verify`); a block that differs takes the generic backward, with a warning naming the
reason. Models outside the table get the generic search for their stack and every compacted backward's
structural test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .compact import gemma, gemma3, gpt2, llama, olmo2, phi3, qwen3
from .compact.backward import CompactedBackward


@dataclass(frozen=True)
class Family:
    """What cggr knows of one HF model family."""

    model_type: str
    """HF ``config.model_type``: the key of :data:`FAMILIES`."""
    causal_lm: str
    """The ``transformers`` class users train (``LlamaForCausalLM``)."""
    config: str
    """Its ``transformers`` config class."""
    tiny: Mapping = field(default_factory=dict)
    """Config arguments of the tiny random-init model the tests build (``tests.tiny.hf_model`` adds the number of
    layers and the vocabulary size): small, and with whatever makes the family's own paths run (a sliding window
    shorter than the tests' sequences, alternating layer types)."""
    stack: str = "model.layers"
    """Attribute path of the block stack, relative to the ``*ForCausalLM`` model (the bare base model's path is
    the same without its first part)."""
    label_shift: int = 1
    """1: the LM-head model's logits at t predict ``labels[t+1]`` (HF causal LMs shift labels inside)."""
    backward: CompactedBackward | None = None
    """The compacted backward its blocks take, or None: the generic routed backward."""
    moe: bool = False
    """Mixture-of-experts blocks (HF's fused experts): the generic backward replays the experts on active rows."""
    notes: str = ""
    """What sets the family apart, for the README's table."""


_LLAMA_SIZES = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=128)
_MOE_SIZES = dict(_LLAMA_SIZES, intermediate_size=48, num_experts_per_tok=2, output_router_logits=True,
                  router_aux_loss_coef=0.1)
_NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
_MOE = "mixture of experts: routers gated, the experts' backward run for the active tokens (cggr/moe.py)"

_RECORDS = [
    Family("llama", "LlamaForCausalLM", "LlamaConfig", _LLAMA_SIZES, backward=llama.BACKWARD,
           notes="grouped-query attention; Liger-Kernel's patches admitted (its RoPE through a variant)"),
    Family("mistral", "MistralForCausalLM", "MistralConfig", dict(_LLAMA_SIZES, sliding_window=None),
           backward=llama.BACKWARD, notes="Llama's layer; a sliding window comes in HF's mask"),
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", _LLAMA_SIZES, backward=llama.BACKWARD,
           notes="Llama's layer with q/k/v biases"),
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3Config", dict(_LLAMA_SIZES, head_dim=8), backward=qwen3.BACKWARD,
           notes="RMSNorm of q and k per head"),
    Family("gemma3_text", "Gemma3ForCausalLM", "Gemma3TextConfig",
           dict(_LLAMA_SIZES, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, sliding_window_pattern=2,
                pad_token_id=0),
           backward=gemma3.BACKWARD,
           notes="(1 + w) norms, sandwich norms, q/k norms, GeGLU; sliding-window layers alternate with global ones"),
    Family("gemma", "GemmaForCausalLM", "GemmaConfig", dict(_LLAMA_SIZES, head_dim=8, pad_token_id=0),
           backward=gemma.BACKWARD, notes="(1 + w) norms, GeGLU"),
    Family("olmo2", "Olmo2ForCausalLM", "Olmo2Config", dict(_LLAMA_SIZES, pad_token_id=0), backward=olmo2.BACKWARD,
           notes="post-norms (no input norm); q/k norms over the projection's width"),
    Family("phi3", "Phi3ForCausalLM", "Phi3Config", dict(_LLAMA_SIZES, pad_token_id=0, bos_token_id=1, eos_token_id=2),
           backward=phi3.BACKWARD,
           notes="fused qkv_proj and gate_up_proj; partial rotary (Phi-4-mini) takes the generic backward"),
    Family("gpt2", "GPT2LMHeadModel", "GPT2Config",
           dict(hidden_size=32, num_attention_heads=4, n_positions=128, **_NO_DROPOUT), stack="transformer.h",
           backward=gpt2.BACKWARD, notes="HF Conv1D layers; compacted when dropout is off (or in eval mode)"),
    Family("mixtral", "MixtralForCausalLM", "MixtralConfig", dict(_MOE_SIZES, num_local_experts=4, sliding_window=None),
           moe=True, notes=_MOE),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig",
           dict(_MOE_SIZES, num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                decoder_sparse_step=1, mlp_only_layers=[]),
           moe=True, notes=f"{_MOE}; a shared expert"),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig",
           dict(_MOE_SIZES, head_dim=8, num_experts=4, moe_intermediate_size=24, decoder_sparse_step=1,
                mlp_only_layers=[]),
           moe=True, notes=_MOE),
    Family("olmoe", "OlmoeForCausalLM", "OlmoeConfig",
           dict(_MOE_SIZES, num_experts=4, pad_token_id=0, eos_token_id=1, bos_token_id=None),
           moe=True, notes=_MOE),
    Family("gemma2", "Gemma2ForCausalLM", "Gemma2Config",
           dict(_LLAMA_SIZES, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, pad_token_id=0),
           notes="attention logit softcapping"),
    Family("phi", "PhiForCausalLM", "PhiConfig",
           dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=128,
                resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2),
           notes="parallel attention and MLP, LayerNorm, partial rotary"),
    Family("olmo", "OlmoForCausalLM", "OlmoConfig", dict(_LLAMA_SIZES, pad_token_id=0, eos_token_id=1),
           notes="LayerNorm without parameters"),
    Family("granite", "GraniteForCausalLM", "GraniteConfig", _LLAMA_SIZES,
           notes="residual and attention multipliers (Llama's modules, other maths)"),
    Family("smollm3", "SmolLM3ForCausalLM", "SmolLM3Config",
           dict(_LLAMA_SIZES, pad_token_id=0, bos_token_id=1, eos_token_id=2),
           notes="layers without rotary (Llama's modules, other maths)"),
    Family("ernie4_5", "Ernie4_5ForCausalLM", "Ernie4_5Config", dict(_LLAMA_SIZES, pad_token_id=0),
           notes="rotary on interleaved pairs (Llama's modules, other maths)"),
    Family("cohere", "CohereForCausalLM", "CohereConfig",
           dict(_LLAMA_SIZES, pad_token_id=0, bos_token_id=1, eos_token_id=2),
           notes="LayerNorm, parallel attention and MLP, scaled logits"),
    Family("gptj", "GPTJForCausalLM", "GPTJConfig",
           dict(hidden_size=32, num_attention_heads=4, rotary_dim=4, n_positions=128, bos_token_id=1,
                eos_token_id=2, **_NO_DROPOUT),
           stack="transformer.h", notes="parallel attention and MLP"),
    Family("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig",
           dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=128,
                hidden_dropout=0.0, attention_dropout=0.0),
           stack="gpt_neox.layers", notes="parallel attention and MLP, LayerNorm"),
    Family("opt", "OPTForCausalLM", "OPTConfig",
           dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                dropout=0.0, attention_dropout=0.0, pad_token_id=1),
           stack="model.decoder.layers", notes="LayerNorm, ReLU MLP"),
]

FAMILIES: dict[str, Family] = {f.model_type: f for f in _RECORDS}
"""Every known family by ``model_type``, compacted ones first."""


def compacted_backwards() -> list[CompactedBackward]:
    """Every compacted backward a family takes, once each, in the table's order: the candidates a model of no
    known family is tested against."""
    found: list[CompactedBackward] = []
    for f in FAMILIES.values():
        if f.backward is not None and f.backward not in found:
            found.append(f.backward)
    return found


def supported_models_table() -> str:
    """The README's supported-models table (between ``<!-- generated:supported-models -->`` markers)."""
    lines = ["| model_type | class | backward | label shift | notes |", "|---|---|---|---|---|"]
    for f in FAMILIES.values():
        backward = f"compacted ({f.backward.name})" if f.backward is not None else "generic"
        lines.append(f"| `{f.model_type}` | `{f.causal_lm}` | {backward} | {f.label_shift} | {f.notes} |")
    lines.append("| any other model | the longest outermost `nn.ModuleList` of blocks, or `layers=` | generic (or a "
                 "compacted backward whose structure and attach-time check its blocks pass) | 1 for `*ForCausalLM`, "
                 "else 0 | blocks with parametrised layers other than linears and norms fall back to mask mode |")
    return "\n".join(lines)
