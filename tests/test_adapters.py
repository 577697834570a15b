"""Finding the block stack of each supported family, and clear errors when it is ambiguous."""

import pytest
import torch.nn as nn

from cggr.adapters import (default_label_shift, family_of, find_layer_stack, is_fused_experts, is_moe_router,
                           unsupported_parametrised_modules)
from cggr.families import FAMILIES
from tests.tiny import FAMILY_KINDS, MOE_KINDS, TinyLM, hf_model


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_every_registry_family_is_found_as_its_record_says(kind):
    """The record's model_type, class and stack path are the real model's; the stack is found there, in the
    causal LM and in its bare base model."""
    m = hf_model(kind, layers=3)
    record = FAMILIES[kind]
    assert m.config.model_type == kind and type(m).__name__ == record.causal_lm and family_of(m) is record
    found, blocks = find_layer_stack(m)
    assert found == record.stack and len(blocks) == 3
    assert default_label_shift(m) == record.label_shift == 1
    base = m.get_submodule(record.stack.split(".", 1)[0])
    assert find_layer_stack(base)[1] == blocks


def test_bare_base_model_and_generic_search():
    m = hf_model("llama", layers=2)
    assert find_layer_stack(m.model)[0] == "layers"
    assert find_layer_stack(TinyLM(layers=5))[0] == "blocks"
    assert default_label_shift(TinyLM()) == 0


def test_layers_override():
    m = TinyLM(layers=3)
    assert find_layer_stack(m, layers="blocks")[1] == list(m.blocks)
    assert find_layer_stack(m, layers=m.blocks[:2])[1] == list(m.blocks[:2])
    with pytest.raises(ValueError, match="layers must"):
        find_layer_stack(m, layers=m.norm)


def test_ambiguous_and_missing_stacks_list_candidates():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.dec = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    with pytest.raises(ValueError, match="'enc'.*'dec'|'dec'.*'enc'"):
        find_layer_stack(Two())
    with pytest.raises(ValueError, match="could not find"):
        find_layer_stack(nn.Sequential(nn.Linear(2, 2)))


def test_nested_lists_are_not_stacks():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(8))

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(2))

    assert find_layer_stack(MoE())[0] == "layers"


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_moe_modules_are_recognised(kind):
    block = hf_model(kind, layers=1).model.layers[0]
    assert is_moe_router(block.mlp.gate) and is_fused_experts(block.mlp.experts)
    assert not is_moe_router(block.mlp.experts) and not is_fused_experts(block.mlp.gate)
    assert unsupported_parametrised_modules(block) == []
