"""Tiny random-init models for the tests: a handwritten transformer and HF configs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cggr.families import FAMILIES


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


def hf_model(kind: str, layers: int = 4, vocab: int = 97, seed: int = 0, **config):
    """The tiny random-init HF causal LM of the family registry's record ``kind`` (a ``model_type``), in fp32,
    eager attention, train mode; ``config``: arguments that override the record's tiny config."""
    import transformers as tf

    family = FAMILIES[kind]
    torch.manual_seed(seed)
    cfg = getattr(tf, family.config)(**{**family.tiny, "num_hidden_layers": layers, "vocab_size": vocab, **config})
    model = getattr(tf, family.causal_lm)(cfg)
    model.config._attn_implementation = "eager"
    return model.float().train()


# The registry's families as tests parametrize over them: a family added is a family tested.
FAMILY_KINDS = list(FAMILIES)
DENSE_KINDS = [k for k, f in FAMILIES.items() if not f.moe]  # MoE families: tests/test_moe.py
MOE_KINDS = [k for k, f in FAMILIES.items() if f.moe]
COMPACTED_KINDS = [k for k, f in FAMILIES.items() if f.backward is not None]


def compacted_kind(backward_name: str) -> str:
    """The first model_type of the registry whose blocks take the compacted backward ``backward_name``."""
    return next(k for k, f in FAMILIES.items() if f.backward is not None and f.backward.name == backward_name)


# One family per compacted backward (Llama, Qwen 3, Gemma 3, OLMo 2, Phi-3, GPT-2): for tests of what the router
# does around a block's backward rather than of the backward itself.
BACKWARD_KINDS = list(dict.fromkeys(compacted_kind(f.backward.name) for f in FAMILIES.values() if f.backward))


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
