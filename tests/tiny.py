"""Tiny random-init models for the tests: a handwritten transformer and HF configs."""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyBlock(nn.Module):
    """Pre-norm block: causal attention (separate q/k/v) and a GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)  # a key bias has an exactly-zero gradient: pure noise
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 3 * d)
        self.down = nn.Linear(3 * d, d)

    def forward(self, x):
        B, S, D = x.shape
        h = self.norm1(x)
        q, k, v = (t.view(B, S, self.heads, -1).transpose(1, 2) for t in (self.q(h), self.k(h), self.v(h)))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, D)
        x = x + self.o(a)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    """Returns logits ``[B, S, V]``; labels are aligned by the caller (no shift)."""

    def __init__(self, vocab: int = 61, d: int = 32, layers: int = 4, heads: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(TinyBlock(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def hf_model(kind: str, layers: int = 4, vocab: int = 97, seed: int = 0):
    """A tiny random-init HF causal LM in fp32 (eager attention, no dropout)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab)
    if kind == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=128, sliding_window=None, **common)
        model = tf.MistralForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                               max_position_embeddings=128, hidden_dropout=0.0, attention_dropout=0.0, **common)
        model = tf.GPTNeoXForCausalLM(cfg)
    elif kind in MOE_KINDS:
        model = _hf_moe(tf, kind, layers, common)
    else:
        raise ValueError(kind)
    model.config._attn_implementation = "eager"
    return model.float().train()


MOE_KINDS = ("mixtral", "qwen2_moe", "olmoe")


def _hf_moe(tf, kind, layers, common):
    """4 experts, top-2, with the router's auxiliary loss in ``out.loss`` (and ``out.aux_loss``)."""
    moe = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=2,
               output_router_logits=True, router_aux_loss_coef=0.1, **common)
    if kind == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, sliding_window=None, **moe))
    if kind == "qwen2_moe":  # every layer sparse, with the shared expert and its gate
        return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=24,
                                                        shared_expert_intermediate_size=40, decoder_sparse_step=1,
                                                        mlp_only_layers=[], **moe))
    return tf.OlmoeForCausalLM(tf.OlmoeConfig(num_experts=4, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                                              **moe))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def flat_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences as HF Trainer / Lightning batches (labels = input ids, no padding)."""

    def __init__(self, vocab: int, n: int = 32, seq: int = 12, seed: int = 0):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def routed_as(router, routing=None) -> dict:
    """:func:`cggr.reference_routing`'s routing arguments for ``routing`` (default: ``router``'s last forward)
    under the router's config: the depths (nested placement) or each block's active tokens (per-block), and the
    inactive semantics."""
    r = router.routing if routing is None else routing
    how = dict(inactive=router.config.inactive)
    if r.block_active is not None:
        how["block_active"] = r.block_active.view(-1, *r.depth.shape)
    else:
        how["depth"] = r.depth
    return how
