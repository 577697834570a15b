"""Model adapters: where a model keeps its block stack, how its labels align, which modules route.

What cggr knows of each HF model family is one record of :data:`cggr.families.FAMILIES`, keyed by
``config.model_type``. Models outside the table get the generic search: the longest outermost
``nn.ModuleList`` of blocks, or a ``ValueError`` listing the candidates when that is ambiguous or there is none.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch.nn as nn

from .families import FAMILIES, Family


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def family_of(model: nn.Module) -> Family | None:
    """The registry's record for ``model``, or None for a model outside it (structural detection then)."""
    return FAMILIES.get(model_type(model))


# Modules with their own parameters that the sparse routed backward handles.
_LINEAR_CLASS_NAMES = ("Linear", "Conv1D")


def is_routable_linear(m: nn.Module) -> bool:
    """``nn.Linear`` or HF's ``Conv1D`` (weight stored ``[in, out]``)."""
    if isinstance(m, nn.Linear):
        return True
    return type(m).__name__ == "Conv1D" and hasattr(m, "weight") and getattr(m, "weight").dim() == 2


def weight_in_out(m: nn.Module) -> bool:
    return not isinstance(m, nn.Linear)


# HF's mixture-of-experts layers (transformers >= 5: Mixtral, Qwen2-MoE, OLMoE, ...) are two modules
# besides linears: a top-k router and the fused experts. Both work row by row (one row per token in,
# one out), which is what lets sparse mode treat their inactive rows as constants.
_EXPERTS_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def is_moe_router(m: nn.Module) -> bool:
    """HF's ``*TopKRouter``: expert logits by one linear of each token row (a 2-D ``weight``), then a
    per-row softmax and top-k; it returns ``(router_logits, router_scores, router_indices)``."""
    w = getattr(m, "weight", None)
    return (type(m).__name__.endswith("TopKRouter") and isinstance(w, nn.Parameter) and w.dim() == 2
            and [n for n, _ in m.named_parameters()] == ["weight"])


def is_fused_experts(m: nn.Module) -> bool:
    """HF's fused experts: 3-D expert weights (``gate_up_proj``, ``down_proj``), called as
    ``experts(hidden_states, top_k_index, top_k_weights)`` on ``[tokens, hidden]`` rows.

    Expert-parallel experts are excluded: their forward exchanges tokens between ranks.
    """
    if getattr(m, "_is_expert_parallel", False) or next(m.parameters(), None) is None:
        return False
    try:
        params = list(inspect.signature(m.forward).parameters)
    except (TypeError, ValueError):
        return False
    return tuple(params[:3]) == _EXPERTS_ARGS and all(p.dim() == 3 for p in m.parameters())


def is_moe_module(m: nn.Module) -> bool:
    return is_moe_router(m) or is_fused_experts(m)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(m).__name__


def unsupported_parametrised_modules(block: nn.Module) -> list[str]:
    """Names of submodules holding parameters that are neither linears, norms nor HF MoE modules.

    Sparse mode treats every linear's (and MoE router's and experts') output
    rows of an inactive token as constants; a block with other parametrised
    layers cannot be routed that way and falls back to mask mode. So does a
    list of experts (transformers 4 MoE): each expert's linears see only the
    rows sent to it, not one row per token.
    """
    bad = []
    for name, m in block.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "experts":
            bad.append(f"{name} (a list of experts)")
        if next(m.parameters(recurse=False), None) is None:
            continue
        if is_routable_linear(m) or _is_norm(m) or is_moe_module(m):
            continue
        bad.append(f"{name or '<block>'} ({type(m).__name__})")
    return bad


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def _candidate_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Outermost ``nn.ModuleList``s holding parametrised modules (lists nested in a block, such as
    MoE experts, are not stacks)."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and any(True for _ in m.parameters())]
    names = [n for n, _ in found]
    return [(n, m) for n, m in found if not any(o != n and n.startswith(o + ".") for o in names)]


def find_layer_stack(model: nn.Module, layers=None) -> tuple[str, list[nn.Module]]:
    """The block stack to route, bottom block first, and where it was found.

    Args:
        model: the model whose forward returns logits.
        layers: override: an attribute path (``"model.layers"``), an
            ``nn.ModuleList`` or a sequence of modules.
    """
    if layers is not None:
        if isinstance(layers, str):
            stack = _get_path(model, layers)
            if stack is None:
                raise ValueError(f"layers={layers!r}: the model has no attribute path {layers!r}")
            return layers, _as_blocks(stack, layers)
        return "<given>", _as_blocks(layers, "layers")

    family = family_of(model)
    if family is not None:
        path = family.stack
        # The registry's path is relative to the *ForCausalLM model; also accept the bare base model.
        for p in (path, path.split(".", 1)[1] if "." in path else path):
            stack = _get_path(model, p)
            if isinstance(stack, nn.ModuleList):
                return p, list(stack)

    candidates = _candidate_stacks(model)
    if not candidates:
        raise ValueError(
            "cggr could not find a stack of transformer blocks (an nn.ModuleList of blocks) "
            "in this model; pass layers='attribute.path' or a list of blocks")
    longest = max(len(m) for _, m in candidates)
    best = [(n, m) for n, m in candidates if len(m) == longest]
    if len(best) > 1:
        listing = ", ".join(f"{n!r} ({len(m)} x {type(m[0]).__name__})" for n, m in candidates)
        raise ValueError(
            f"cggr found several equally plausible block stacks: {listing}; pass layers= one of these paths")
    name, stack = best[0]
    return name, list(stack)


def _as_blocks(stack, what: str) -> list[nn.Module]:
    if isinstance(stack, nn.Module) and not isinstance(stack, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"{what} must be an nn.ModuleList, nn.Sequential or a list of modules, got {type(stack).__name__}")
    blocks = list(stack)
    if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise ValueError(f"{what} must hold at least one nn.Module block")
    return blocks


_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _is_causal_lm(m: nn.Module) -> bool:
    return type(m).__name__.endswith(_CAUSAL_LM_SUFFIXES)


def _peft_inner(model: nn.Module) -> nn.Module | None:
    """The model a PEFT wrapper holds (``PeftModelForCausalLM.base_model.model``: the wrapper is no HF model),
    else None."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return None
    inner = getattr(base, "model", None)
    return inner if isinstance(inner, nn.Module) and inner is not model else None


def find_causal_lm(model: nn.Module) -> nn.Module | None:
    """The HF causal LM (``*ForCausalLM`` / ``*LMHeadModel``) whose forward computes ``model``'s loss: ``model``
    itself or the one inside a PEFT wrapper; None for any other module."""
    inner = _peft_inner(model)
    if inner is not None and _is_causal_lm(inner):
        return inner
    return model if _is_causal_lm(model) else None


def default_label_shift(model: nn.Module) -> int | None:
    """1 where logits at position t predict label t+1 (HF causal LMs shift labels inside), 0 where they
    predict label t, None where it cannot be known: a module of another class that holds an HF causal LM
    (it may or may not shift the labels it passes on), which must then say ``label_shift=``."""
    if _is_causal_lm(model):
        family = family_of(model)
        return family.label_shift if family is not None else 1
    inner = _peft_inner(model)
    if inner is not None:
        return default_label_shift(inner)
    if any(_is_causal_lm(m) for m in model.modules()):
        return None
    return 0


def block_names(model: nn.Module, blocks: Sequence[nn.Module]) -> list[str]:
    ids = {id(b): i for i, b in enumerate(blocks)}
    names = [f"block {i}" for i in range(len(blocks))]
    for n, m in model.named_modules():
        if id(m) in ids:
            names[ids[id(m)]] = n
    return names
