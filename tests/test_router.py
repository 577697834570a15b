"""The routed backward against the reference of docs/design.md §1.8 (forward hooks that detach inactive rows)."""

import copy
import logging
import re

import pytest
import torch
import torch.nn.functional as F

import cggr
from cggr.adapters import find_layer_stack
from cggr.families import FAMILIES
from tests.tiny import (BACKWARD_KINDS, COMPACTED_KINDS, DENSE_KINDS, MOE_KINDS, TinyLM, flat_grads, hf_model,
                        rel_err, routed_as)

TOL = 1e-5
# Every dense family of the registry (MoE ones: tests/test_moe.py), the handwritten model, and Llama's and GPT-2's
# blocks through the generic backward (backward="generic").
MODELS = ["tiny", *DENSE_KINDS, "llama-generic", "gpt2-generic"]
CASES = [  # mode, leak_rate, curriculum progress
    ("sparse", 0.0, 1.0), ("sparse", 0.0, 0.5), ("sparse", 0.0, 0.0), ("sparse", 0.25, 1.0),
    ("mask", 0.0, 1.0), ("mask", 0.0, 0.4), ("mask", 0.3, 1.0),
]


def _build(kind, seed):
    torch.manual_seed(seed)
    return TinyLM() if kind == "tiny" else hf_model(kind.replace("-generic", ""), seed=seed)


def _compacted(kind) -> bool:
    """Whether ``kind``'s blocks take a compacted backward (its family's, and not forced generic)."""
    family = FAMILIES.get(kind)
    return family is not None and family.backward is not None


def _loss(kind, model, ids, labels=None, attention_mask=None):
    if kind == "tiny":
        return F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    return model(input_ids=ids, labels=labels if labels is not None else ids, attention_mask=attention_mask).loss


def _routed_and_reference(kind, mode, leak, progress, seed, policy="difficulty", padded=False, **options):
    model = _build(kind, seed)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (3, 13), generator=g)
    labels = attention_mask = None
    if padded:
        attention_mask = torch.ones_like(ids)
        attention_mask[0, 9:] = 0
        labels = ids.clone()
        labels[0, 9:] = -100
        labels[1, :4] = -100  # a prompt masked out of the loss
    backward = "generic" if kind.endswith("-generic") else "auto"
    router = cggr.attach(model, warmup_steps=8, mode=mode, leak_rate=leak, policy=policy, seed=seed,
                         backward=backward, **options)
    for _ in range(round(progress * 8)):
        router.step()
    _loss(kind, model, ids, labels, attention_mask).backward()
    depth = router.routing.depth
    _, ref_blocks = find_layer_stack(ref)
    with cggr.reference_routing(ref_blocks, mode=mode, leak_rate=leak, **routed_as(router)):
        _loss(kind, ref, ids, labels, attention_mask).backward()
    return router, flat_grads(model), flat_grads(ref), depth


def _assert_equal_grads(g_fast, g_ref):
    scale = max(v.norm().item() for v in g_ref.values())
    for name, ref in g_ref.items():
        err = (g_fast[name] - ref).norm().item() / max(ref.norm().item(), 1e-3 * scale)
        assert err < TOL, f"{name}: relative error {err:.2e}"


# The defaults (random policy: per-block subsets, dense ends, skip) and the seed's routing (difficulty, nested, stop).
ROUTINGS = {"default": dict(policy="random"), "seed": dict(policy="difficulty", inactive="stop")}


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("mode,leak,progress", CASES)
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_gradients_equal_reference(kind, mode, leak, progress, routing):
    seed = torch.randint(0, 10_000, ()).item()
    router, g_fast, g_ref, depth = _routed_and_reference(kind, mode, leak, progress, seed, **ROUTINGS[routing])
    assert router.config.placement == ("per_block" if routing == "default" else "nested")
    _assert_equal_grads(g_fast, g_ref)
    compact = _compacted(kind) and mode == "sparse" and leak == 0
    assert router.routing.compact_blocks == (set(range(router.num_layers)) if compact else set())
    if progress == 1.0:
        assert depth.min() < router.num_layers  # routing really happened


@pytest.mark.parametrize("kind", [*COMPACTED_KINDS, "llama-generic"])
def test_padding_and_prompt_masks_give_depth_zero(kind):
    router, g_fast, g_ref, depth = _routed_and_reference(kind, "sparse", 0.0, 1.0, seed=3, padded=True)
    _assert_equal_grads(g_fast, g_ref)
    assert (depth[0, 8:] == 0).all()  # position 8 predicts padding at 9; 9.. are padding
    assert (depth[1, :3] == 0).all()  # positions predicting the masked prompt
    assert (depth[:, -1] == 0).all()  # the last position has no label
    assert (depth[2, :-1] > 0).all()


def test_random_policy_matches_reference():
    router, g_fast, g_ref, depth = _routed_and_reference("llama", "sparse", 0.0, 1.0, seed=5, policy="random")
    _assert_equal_grads(g_fast, g_ref)


def test_routed_gradients_differ_from_dense():
    torch.manual_seed(0)
    model = hf_model("llama")
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 61, (2, 16))
    cggr.attach(model, warmup_steps=0)
    _loss("llama", model, ids).backward()
    _loss("llama", dense, ids).backward()
    g_r, g_d = flat_grads(model), flat_grads(dense)
    bottom = "model.layers.0.mlp.down_proj.weight"
    top_head = "lm_head.weight"
    assert rel_err(g_r[bottom], g_d[bottom]) > 0.05
    assert rel_err(g_r[top_head], g_d[top_head]) < 1e-6  # the head is above the routed stack


def _rows_reaching_matmul(loss):
    """Run ``loss.backward()`` and return the leading size of every ``@`` operand it multiplies."""
    rows = []
    real_mm = torch.Tensor.__matmul__

    def spy(a, b):
        rows.append(a.shape[0])
        return real_mm(a, b)

    torch.Tensor.__matmul__ = spy
    try:
        loss.backward()
    finally:
        torch.Tensor.__matmul__ = real_mm
    return rows


def test_linear_backward_skips_inactive_rows():
    """The routed linear's matmuls run on the active rows only: count the rows that reach mm."""
    torch.manual_seed(0)
    model = TinyLM(layers=4)
    router = cggr.attach(model, warmup_steps=0)
    ids = torch.randint(0, 61, (2, 16))
    loss = _loss("tiny", model, ids)
    rows = _rows_reaching_matmul(loss)
    n = ids.numel()
    counts = [router.routing.active_count(i) for i in range(4)]
    low = min(counts)  # the defaults: the end blocks dense, the middle ones routed
    assert low < max(counts) == n
    # ga @ w (input grad) and ga.t() @ x (weight grad: rows of ga.t() = out features) per linear
    assert min(r for r in rows if r in counts) < n
    assert sum(1 for r in rows if r == low) >= 6  # 6 linears in a block of the fewest rows, on its active rows


def test_eval_mode_is_a_noop():
    torch.manual_seed(0)
    model = hf_model("llama")
    plain = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0)
    model.eval()
    plain.eval()
    ids = torch.randint(0, 61, (2, 9))
    _loss("llama", model, ids).backward()
    _loss("llama", plain, ids).backward()
    assert router.routing is None
    g1, g2 = flat_grads(model), flat_grads(plain)
    assert all(torch.equal(g1[n], g2[n]) for n in g2)
    with torch.no_grad():
        model.train()
        model(input_ids=ids)
    assert router.routing is None  # no routing without autograd


def test_detach_restores_model():
    torch.manual_seed(0)
    model = hf_model("gpt2")
    plain = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0)
    assert router.detach() is model
    ids = torch.randint(0, 61, (2, 9))
    _loss("gpt2", model, ids).backward()
    _loss("gpt2", plain, ids).backward()
    g1, g2 = flat_grads(model), flat_grads(plain)
    assert all(torch.equal(g1[n], g2[n]) for n in g2)
    assert not any("forward" in m.__dict__ for m in model.modules())
    cggr.attach(model)  # can attach again after detaching


def test_attach_twice_is_refused():
    model = TinyLM()
    cggr.attach(model)
    with pytest.raises(ValueError, match="already attached"):
        cggr.attach(model)


def test_each_backward_uses_its_own_forward_routing():
    """Two forwards, then both backwards: no routing leaks from the later batch into the earlier one."""
    torch.manual_seed(0)
    model = TinyLM()
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0)
    ids1, ids2 = torch.randint(0, 61, (2, 2, 10))
    l1 = _loss("tiny", model, ids1)
    r1 = router.routing
    l2 = _loss("tiny", model, ids2)
    r2 = router.routing
    assert not torch.equal(r1.depth, r2.depth)
    (l1 + l2).backward()
    for ids, r in ((ids1, r1), (ids2, r2)):
        with cggr.reference_routing(list(ref.blocks), **routed_as(router, r)):
            _loss("tiny", ref, ids).backward()
    _assert_equal_grads(flat_grads(model), flat_grads(ref))


@pytest.mark.parametrize("depths", [None, [0.75, 0.5, 0.25, 0.25 / 2]])
def test_nonfinite_logits_route_at_full_depth(caplog, depths):
    torch.manual_seed(0)
    model = TinyLM()
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0, depths=depths, inactive="stop")  # nested depths: the seed's
    poison = {"on": True}

    def hook(module, args, out):
        out = out.clone()
        if poison["on"]:
            out[0, 2, 5] = float("nan")
            out[1, 4, 0] = float("inf")
        return out

    model.head.register_forward_hook(hook)
    ids = torch.randint(0, 61, (2, 8))
    with caplog.at_level(logging.WARNING, logger="cggr"):
        logits = model(ids)
        logits.nan_to_num(0.0, 0.0, 0.0).sum().backward()
        logits = model(ids)
    depth = router.routing.depth
    warnings = [r.message for r in caplog.records if "non-finite" in r.message]
    assert len(warnings) == 1
    if depths is None:
        assert depth[0, 2] == 4 and depth[1, 4] == 4  # the hardest bucket, at full depth
    else:
        # Full depth would go beyond every bucket's target (3): the blocks' row counts follow the bucket sizes
        # and leave no room below, so they keep 3, and the depth and the warning say so.
        assert depth[0, 2] == 3 and depth[1, 4] == 3 and "got less" in warnings[0]
    assert router.metrics()["nonfinite_tokens"] == 2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # The gradient is the reference's for the depths the routing reports, also where they fell short.
    ref.head.register_forward_hook(hook)
    model.zero_grad()
    logits.nan_to_num(0.0, 0.0, 0.0).sum().backward()
    with cggr.reference_routing(list(ref.blocks), depth):
        ref(ids).nan_to_num(0.0, 0.0, 0.0).sum().backward()
    _assert_equal_grads(flat_grads(model), flat_grads(ref))


@pytest.mark.parametrize("kind", ["tiny", *BACKWARD_KINDS, "llama-generic"])
def test_no_count_is_read_back_from_the_device(kind, monkeypatch):
    """Per-rank buckets: every block's count comes from the number of valid tokens (docs/design.md §3.3: nothing is
    read back after the forward; the one read waits only for the mask, read before the forward's work)."""
    from cggr.routing import Routing

    def refuse(self):
        raise AssertionError("counts read back from the device")

    monkeypatch.setattr(Routing, "_plan", refuse)
    router, g_fast, g_ref, depth = _routed_and_reference(kind, "sparse", 0.0, 1.0, seed=5, padded=kind != "tiny")
    assert router.routing.counts_known
    _assert_equal_grads(g_fast, g_ref)


def test_all_tokens_invalid_is_not_an_error():
    torch.manual_seed(0)
    model = hf_model("llama")
    router = cggr.attach(model, warmup_steps=0)
    ids = torch.randint(0, 61, (2, 7))
    out = model(input_ids=ids, labels=torch.full_like(ids, -100))
    assert (router.routing.depth == 0).all()
    out.logits.sum().backward()  # a loss that still depends on the logits
    m = router.metrics()
    assert m["valid_tokens"] == 0 and m["mean_depth_fraction"] == 0
    for n, p in model.named_parameters():
        if ".layers." in n and p.grad is not None:
            assert torch.count_nonzero(p.grad) == 0, n


def test_single_token_batch():
    torch.manual_seed(0)
    model = TinyLM()
    router = cggr.attach(model, warmup_steps=0)
    ids = torch.randint(0, 61, (1, 1))
    _loss("tiny", model, ids).backward()
    assert router.routing.depth.tolist() == [[4]]  # the only token is the hardest


def test_explicit_valid_mask_kwarg():
    torch.manual_seed(0)
    model = TinyLM()
    router = cggr.attach(model, warmup_steps=0)
    ids = torch.randint(0, 61, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    model(ids, cggr_valid_mask=mask)
    assert (router.routing.depth[1, 3:] == 0).all() and (router.routing.depth[0] > 0).all()
    with pytest.raises(ValueError, match="cggr_valid_mask"):
        model(ids, cggr_valid_mask=mask[:, :5])


def test_mismatched_logits_shape_is_a_clear_error():
    torch.manual_seed(0)
    model = hf_model("llama")
    cggr.attach(model)
    ids = torch.randint(0, 61, (2, 9))
    with pytest.raises(ValueError, match="leading shape"):
        model(input_ids=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 8, dtype=torch.long))


def test_block_with_other_parametrised_layers_falls_back_to_mask(caplog):
    class ConvBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(32, 32, 1)
            self.fc = torch.nn.Linear(32, 32)

        def forward(self, x):
            return x + self.fc(self.conv(x.transpose(1, 2)).transpose(1, 2))

    torch.manual_seed(0)
    model = TinyLM(layers=3)
    model.blocks[1] = ConvBlock()
    ref = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="cggr"):
        router = cggr.attach(model, warmup_steps=0)
    assert router.sparse_blocks == [True, False, True]
    assert any("blocks.1" in r.message and "conv" in r.message for r in caplog.records)
    ids = torch.randint(0, 61, (2, 8))
    _loss("tiny", model, ids).backward()
    with cggr.reference_routing(list(ref.blocks), mode=["sparse", "mask", "sparse"], **routed_as(router)):
        _loss("tiny", ref, ids).backward()
    _assert_equal_grads(flat_grads(model), flat_grads(ref))


def test_more_buckets_than_blocks_warns_and_collapses(caplog):
    with caplog.at_level(logging.WARNING, logger="cggr"):
        router = cggr.attach(TinyLM(layers=2), num_buckets=5, warmup_steps=0, inactive="stop")  # nested depths
    assert router.targets == [2, 2, 2, 1, 1]
    assert any("num_buckets=5" in r.message for r in caplog.records)
    model = router.model
    _loss("tiny", model, torch.randint(0, 61, (2, 10))).backward()
    assert set(router.routing.depth.unique().tolist()) == {1, 2}


def test_compacted_llama_backward_runs_on_active_rows():
    torch.manual_seed(0)
    model = hf_model("llama", layers=4)
    router = cggr.attach(model, warmup_steps=0)
    ids = torch.randint(0, 61, (3, 11))  # 33 rows: no feature size of the tiny model is 33
    loss = _loss("llama", model, ids)
    rows = _rows_reaching_matmul(loss)
    n = ids.numel() - 3  # the last position of each sequence has no label
    counts = [router.routing.active_count(i) for i in range(4)]
    low = min(counts)  # the defaults: the end blocks dense, the middle ones routed
    assert low < n and counts[0] == counts[-1] == n
    assert rows.count(low) >= 4  # dm, dr2 (2), do, dr1 (3) ... of a routed block on its active rows only
    assert ids.numel() not in rows  # no projection backward ran on all rows


def test_compacted_path_falls_back_where_it_cannot_run():
    torch.manual_seed(0)
    model = hf_model("llama", layers=2)
    router = cggr.attach(model, warmup_steps=0)
    ids = torch.randint(0, 61, (2, 8))
    with torch.autocast("cpu", dtype=torch.float16):
        model(input_ids=ids, labels=ids)
    assert router.routing.compact_blocks == set()  # fp16 autocast: the generic path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    assert router.routing.compact_blocks == {0, 1}  # bf16 autocast: compacted, in bf16
    model(input_ids=ids, labels=ids, use_cache=True)
    assert router.routing.compact_blocks == set()  # an explicit KV cache: the generic path
    model(input_ids=ids, labels=ids)
    assert router.routing.compact_blocks == {0, 1}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gpt2_with_activation_checkpointing_takes_routed_checkpointing_and_stays_exact(reentrant):
    """HF checkpointing on: each GPT-2 block checkpoints itself, routed (only its input is kept)."""
    torch.manual_seed(0)
    model = hf_model("gpt2")
    ref = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    router = cggr.attach(model, warmup_steps=0)
    outputs = []
    for block in router.blocks:
        block.register_forward_hook(
            lambda m, a, out: outputs.append(type((out[0] if isinstance(out, tuple) else out).grad_fn).__name__))
    ids = torch.randint(0, 61, (3, 12))
    _loss("gpt2", model, ids).backward()
    assert router.routing.compact_blocks == set(range(router.num_layers))
    assert set(outputs) == {"GPT2BlockRoutedCheckpointedBackward"}
    assert router.routing.depth.min() < router.num_layers
    with cggr.reference_routing(find_layer_stack(ref)[1], **routed_as(router)):
        _loss("gpt2", ref, ids).backward()
    _assert_equal_grads(flat_grads(model), flat_grads(ref))


def test_random_policy_draws_differ_between_ranks_and_repeat_after_resume(monkeypatch):
    ids = torch.randint(0, 61, (4, 16))

    def depth_on(rank):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
        torch.manual_seed(0)
        model = TinyLM()
        router = cggr.attach(model, warmup_steps=0, policy="random", seed=3)
        model(ids)
        return router.routing.depth

    assert torch.equal(depth_on(0), depth_on(0))
    assert not torch.equal(depth_on(0), depth_on(1))


def test_handback_and_set_progress():
    """Depths follow warm-up, hand-back and a progress set from outside (a wall-clock schedule)."""
    model = TinyLM(layers=4)
    router = cggr.attach(model, num_buckets=4, warmup_steps=2, handback_steps=2, total_steps=8)
    seen = []
    for _ in range(9):
        seen.append(router.bucket_depths())
        router.step()
    assert seen[0] == [4, 4, 4, 4] and seen[2] == [4, 3, 2, 1] and seen[6] == [4, 3, 2, 1]
    assert seen[7] == [4, 4, 3, 3] and seen[8] == [4, 4, 4, 4]
    router.set_progress(1.0)
    assert router.bucket_depths() == [4, 3, 2, 1]
    router.set_progress(None)
    assert router.bucket_depths() == [4, 4, 4, 4]
    with pytest.raises(ValueError, match=r"progress must be None or a number in \[0, 1\]"):
        router.set_progress(1.5)


def test_sampled_policy_routes_like_reference():
    """The sampled policy only picks buckets: the backward is the reference's for the depths it chose."""
    torch.manual_seed(3)
    model = TinyLM(layers=4)
    x = torch.randint(0, 61, (2, 9))
    router = cggr.attach(model, num_buckets=4, warmup_steps=0, policy="sampled", seed=5)
    model(x).float().pow(2).mean().backward()
    depth = router.routing.depth
    assert sorted(torch.bincount(depth.reshape(-1), minlength=5).tolist()) == [0, 4, 4, 5, 5]
    got = flat_grads(model)
    how = routed_as(router)
    router.detach()
    model.zero_grad()
    with cggr.reference_routing(list(model.blocks), **how):
        model(x).float().pow(2).mean().backward()
    want = flat_grads(model)
    assert max(rel_err(got[n], want[n]) for n in want) < 1e-5


@pytest.mark.parametrize("kind", BACKWARD_KINDS)
def test_one_bucket_is_dense_training(kind):
    """num_buckets=1 (the README's no-routing fast path): with a label on every token, the gradients of
    plain dense training, through cggr's compacted backward."""
    model = hf_model(kind, seed=5)
    ref = copy.deepcopy(model)
    router = cggr.attach(model, num_buckets=1, warmup_steps=0, policy="random")
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    assert router.routing.compact_blocks == set(range(router.num_layers))
    ref(input_ids=ids, labels=ids).loss.backward()
    got, want = flat_grads(model), flat_grads(ref)
    for n in want:
        assert (rel_err(got[n], want[n]) < 1e-5) if want[n].norm() > 0 else got[n].norm() == 0, n


# ---------------------------------------------------------------- never silently wrong: lifecycle
def test_routing_is_not_live_after_the_forward():
    """A block called directly after a routed forward is the plain block (no stale routing)."""
    torch.manual_seed(0)
    model = hf_model("llama")
    plain = copy.deepcopy(model)
    cggr.attach(model, warmup_steps=0)
    ids = torch.randint(0, 61, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    x = torch.randn(2, 9, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    pos = torch.arange(9)[None].expand(2, -1)
    pe = model.model.rotary_emb(x, pos)
    block, ref_block = model.model.layers[0], plain.model.layers[0]
    out = block(x, position_embeddings=pe)
    out = out[0] if isinstance(out, tuple) else out
    ref = ref_block(x_ref, position_embeddings=pe)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert model._cggr_router.current_routing() is None


def test_routing_is_cleared_when_the_forward_raises():
    model = TinyLM()
    router = cggr.attach(model, warmup_steps=0)
    with pytest.raises(IndexError):
        model(torch.full((2, 5), 10_000))  # out of the embedding's range
    assert router.current_routing() is None


@pytest.mark.parametrize("kind", BACKWARD_KINDS)
def test_peft_after_attach_reinstalls_the_routing_and_stays_exact(kind, caplog):
    """get_peft_model after attach adds modules cggr never patched: the routing is installed anew on them, and
    the LoRA gradients equal the reference's."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = hf_model(kind)
    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    targets = [t for t in ("q_proj", "v_proj", "qkv_proj", "c_attn") if t in names]  # the family's attention inputs
    lora = dict(r=4, target_modules=targets, init_lora_weights=False)
    plain_base = copy.deepcopy(base)
    router = cggr.attach(base, warmup_steps=0)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, peft.LoraConfig(**lora))
    torch.manual_seed(1)
    ref = peft.get_peft_model(plain_base, peft.LoraConfig(**lora))
    ids = torch.randint(0, 61, (2, 9))
    with caplog.at_level(logging.WARNING, logger="cggr"):
        model(input_ids=ids, labels=ids).loss.backward()
    assert "installed its routing on them anew" in caplog.text
    with cggr.reference_routing(find_layer_stack(ref.base_model.model)[1], **routed_as(router)):
        ref(input_ids=ids, labels=ids).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    want = {n: p.grad for n, p in ref.named_parameters() if "lora_" in n}
    assert got and got.keys() == want.keys()
    for n in want:
        assert rel_err(got[n], want[n]) < TOL, n


def test_causal_lm_inside_another_module_needs_label_shift():
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = hf_model("llama")

        def forward(self, input_ids, labels=None):
            return self.lm(input_ids=input_ids, labels=labels)

    ids = torch.randint(0, 61, (2, 7))
    cggr.attach(holder := Holder())
    with pytest.raises(ValueError, match="pass label_shift=1 or label_shift=0"):
        holder(ids, labels=ids)
    holder(ids)  # no labels: no shift needed
    holder._cggr_router.detach()
    router = cggr.attach(holder, label_shift=1, warmup_steps=0)
    labels = ids.clone()
    labels[:, 4:] = -100
    holder(ids, labels=labels)
    # logits at t predict labels[t+1]: positions 0..2 have a label after them
    assert (router.routing.depth[:, :3] > 0).all() and (router.routing.depth[:, 3:] == 0).all()


def test_return_dict_false_with_labels_finds_the_logits():
    torch.manual_seed(0)
    model = hf_model("llama")
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0, policy="difficulty")
    ids = torch.randint(0, 61, (2, 7))
    loss, logits = model(input_ids=ids, labels=ids, return_dict=False)[:2]
    assert logits.shape == (2, 7, 97) and loss.dim() == 0
    loss.backward()
    with cggr.reference_routing(find_layer_stack(ref)[1], **routed_as(router)):
        ref(input_ids=ids, labels=ids).loss.backward()
    _assert_equal_grads(flat_grads(model), flat_grads(ref))


def test_fused_loss_without_logits_routes_with_the_random_policy_only():
    class LossOnly(TinyLM):
        def forward(self, input_ids):
            return F.cross_entropy(super().forward(input_ids).flatten(0, 1), input_ids.flatten())

    torch.manual_seed(0)
    model = LossOnly()
    router = cggr.attach(model, warmup_steps=0)
    ids = torch.randint(0, 61, (2, 8))
    model(ids).backward()
    assert router.routing.depth.shape == (2, 8) and (router.routing.depth > 0).all()
    router.detach()
    cggr.attach(model, policy="difficulty")
    with pytest.raises(TypeError, match="policy='difficulty' scores tokens from the model's logits"):
        model(ids)


def test_position_ids_keep_hf_attention_for_packed_sequences(caplog):
    """With restarting position_ids HF builds a block-diagonal mask only without a KV cache: cggr must not
    switch the cache off behind the user's back (the logits would change)."""
    torch.manual_seed(0)
    model = hf_model("llama")
    plain = copy.deepcopy(model)
    cggr.attach(model, warmup_steps=0)
    ids = torch.randint(0, 61, (1, 10))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    with caplog.at_level(logging.WARNING, logger="cggr"):
        got = model(input_ids=ids, position_ids=pos).logits
    torch.testing.assert_close(got, plain(input_ids=ids, position_ids=pos).logits)
    assert "position_ids are given" in caplog.text


def test_describe_says_which_backward_each_block_takes():
    model = hf_model("llama", layers=2)
    router = cggr.attach(model, warmup_steps=0)
    text = router.describe()
    assert text.count("compacted (llama)") == 2 and "model_type 'llama'" in text
    ids = torch.randint(0, 61, (2, 5))
    model(input_ids=ids, labels=ids)
    assert router.describe().count("last forward: compacted") == 2
    generic = cggr.attach(hf_model("gpt_neox", layers=2))
    assert "no compacted backward" in generic.describe()


# ---------------------------------------------------------------- skip semantics and per-block placement
SKIP_CASES = [  # placement, dense_ends, leak_rate
    ("nested", 0, 0.0), ("per_block", 0, 0.0), ("per_block", 1, 0.0), ("nested", 0, 0.25), ("per_block", 1, 0.3),
]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("placement,dense_ends,leak", SKIP_CASES)
@pytest.mark.parametrize("seed", [0, 1], ids=lambda s: f"seed={s}")
def test_skip_semantics_gradients_equal_reference(kind, placement, dense_ends, leak, seed):
    model = _build(kind, seed)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (3, 11), generator=g)
    backward = "generic" if kind.endswith("-generic") else "auto"
    router = cggr.attach(model, warmup_steps=0, inactive="skip", placement=placement, dense_ends=dense_ends,
                         leak_rate=leak, seed=seed, backward=backward)
    _loss(kind, model, ids).backward()
    r = router.routing
    _, ref_blocks = find_layer_stack(ref)
    how = dict(block_active=r.block_active.view(-1, *ids.shape)) if placement == "per_block" else dict(depth=r.depth)
    with cggr.reference_routing(ref_blocks, inactive="skip", leak_rate=leak, **how):
        _loss(kind, ref, ids).backward()
    _assert_equal_grads(flat_grads(model), flat_grads(ref))
    if placement == "per_block":
        counts = r.block_active.sum(1).tolist()
        n = int(r.metrics["valid_tokens"])  # HF models: the last position of each row has no label
        if dense_ends:
            assert counts[0] == counts[-1] == n
        # the same total backward work as nested routing at the same depths
        nested = cggr.routing.block_counts(n, router.num_layers, router.bucket_depths())
        assert sum(counts) == sum(nested)


def test_skip_semantics_reaches_the_embedding_of_every_token():
    """The point of skip: a token cut in the top blocks still gets gradient at the bottom (stop gives none)."""
    torch.manual_seed(0)
    ids = torch.arange(40).view(2, 20)
    grads = {}
    for inactive in ("stop", "skip"):
        model = TinyLM(vocab=61)
        torch.manual_seed(0)
        model = TinyLM(vocab=61)
        cggr.attach(model, warmup_steps=0, inactive=inactive, seed=3)
        _loss("tiny", model, ids).backward()
        grads[inactive] = model.emb.weight.grad[ids.flatten()].norm(dim=1)
    assert (grads["skip"] > 0).all()
    assert (grads["stop"] == 0).any()


def test_per_block_placement_is_fresh_each_step_and_exact_in_size():
    torch.manual_seed(0)
    model = TinyLM(layers=6)
    router = cggr.attach(model, warmup_steps=0, inactive="skip", placement="per_block", dense_ends=1)
    ids = torch.randint(0, 61, (2, 16))
    labels_mask = torch.ones(2, 16, dtype=torch.bool)
    labels_mask[1, 10:] = False
    seen = []
    for _ in range(2):
        model(ids, cggr_valid_mask=labels_mask)
        seen.append(router.routing.block_active.clone())
        router.step()
    a, b = seen
    assert not torch.equal(a, b)
    n = int(labels_mask.sum())
    assert a[0].sum() == a[-1].sum() == n and not a[:, ~labels_mask.flatten()].any()
    middle = a[1:-1].sum(1)
    assert middle.max() - middle.min() <= 1  # evenly spread


@pytest.mark.parametrize("kwargs,match", [
    (dict(placement="per_block", inactive="stop"), "needs inactive='skip'"),
    (dict(placement="per_block", inactive="skip", policy="difficulty"), "needs policy='random'"),
    (dict(dense_ends=1, inactive="stop"), "need placement='per_block'"),
    (dict(dense_ends=1, placement="nested"), "need placement='per_block'"),
    (dict(inactive="pass"), r"inactive must be one of \('stop', 'skip'\)"),
    (dict(placement="per_block", inactive="skip", block_fractions=[1.0, 0.5]), "block_fractions has 2 fractions"),
])
def test_skip_and_placement_options_are_checked(kwargs, match):
    model = TinyLM()
    with pytest.raises(ValueError, match=match):
        cggr.attach(model, **kwargs)
        model(torch.randint(0, 61, (2, 5)))


class _FusedLossLM(TinyLM):
    """A model of one's own whose forward computes cggr's fused loss and returns it in the form ``returns`` names
    (no logits), or its logits (``returns="logits"``)."""

    def __init__(self, returns: str):
        super().__init__()
        self.returns = returns

    def forward(self, input_ids, labels=None):
        from cggr.loss import linear_cross_entropy

        x = self.emb(input_ids)
        for b in self.blocks:
            x = b(x)
        h = self.norm(x)
        if self.returns == "logits":
            return self.head(h)
        out = linear_cross_entropy(h, self.head.weight, labels)
        return {"loss with scores": out, "dict": {"loss": out.loss, "scores": out.scores},
                "tuple": (out.loss, out.scores), "loss only": out.loss}[self.returns]


def _loss_of(out) -> torch.Tensor:
    return out["loss"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("returns", ["loss with scores", "dict", "tuple"])
def test_fused_loss_scores_route_by_difficulty_without_logits(returns):
    """A forward that returns cggr's fused loss with its scores (no logits) is routed by those scores, exactly as
    the same model returning logits is routed by scores of its logits: the scores reach the router through the
    forward's output, as logits do."""
    torch.manual_seed(0)
    model = _FusedLossLM(returns)
    twin = copy.deepcopy(model)
    twin.returns = "logits"
    ids = torch.randint(0, 61, (3, 10))
    router = cggr.attach(model, warmup_steps=0, policy="difficulty")
    _loss_of(model(ids, labels=ids)).backward()
    twin_router = cggr.attach(twin, warmup_steps=0, policy="difficulty")
    F.cross_entropy(twin(ids).flatten(0, 1), ids.flatten()).backward()
    assert torch.equal(router.routing.depth, twin_router.routing.depth)
    assert router.metrics()["mean_depth_fraction"] < 1
    _assert_equal_grads(flat_grads(model), flat_grads(twin))
    assert router.metrics()["mean_entropy"] == pytest.approx(twin_router.metrics()["mean_entropy"], rel=1e-5)


def test_fused_loss_scores_not_returned_are_not_seen():
    """The fused loss hands its scores to nobody: a forward that returns only the loss is routed by its valid
    tokens under the random policy, and a scoring policy refuses it, saying to return the scores."""
    torch.manual_seed(0)
    model = _FusedLossLM("loss only")
    ids = torch.randint(0, 61, (3, 10))
    router = cggr.attach(model, warmup_steps=0)
    model(ids, labels=ids).backward()
    assert router.metrics()["mean_depth_fraction"] < 1 and "mean_entropy" not in router.metrics()
    router.detach()
    cggr.attach(model, warmup_steps=0, policy="difficulty")
    with pytest.raises(TypeError, match=r"returns its scores with the loss \(return linear_cross_entropy"):
        model(ids, labels=ids)


@pytest.mark.parametrize("kind,checkpointing", [
    *[(kind, "nonreentrant") for kind in COMPACTED_KINDS], ("llama", "reentrant"), ("gpt_neox", "nonreentrant"),
    ("llama-generic", "reentrant"), *[(kind, None) for kind in MOE_KINDS]])
def test_skip_semantics_with_checkpointing_and_moe_equal_reference(kind, checkpointing):
    """Skip semantics through routed activation checkpointing (every compacted family's checkpointed Function,
    and HF's own) and MoE blocks."""
    import warnings

    model = _build(kind, 3)
    ref = copy.deepcopy(model)
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    backward = "generic" if kind.endswith("-generic") else "auto"
    router = cggr.attach(model, warmup_steps=0, inactive="skip", placement="per_block", dense_ends=1, seed=3,
                         backward=backward)
    model(input_ids=ids, labels=ids).loss.backward()
    r = router.routing
    assert bool(r.compact_blocks) == _compacted(kind)  # the compacted families' blocks checkpointed themselves
    with cggr.reference_routing(find_layer_stack(ref)[1], inactive="skip", block_active=r.block_active.view(-1, 2, 9)):
        ref(input_ids=ids, labels=ids).loss.backward()
    _assert_equal_grads(flat_grads(model), flat_grads(ref))


@pytest.mark.parametrize("kind", ["tiny", *COMPACTED_KINDS])
def test_the_defaults_equal_the_reference(kind):
    """``cggr.attach(model)`` and nothing else (skip semantics, per-block random subsets, one dense block at each
    end, the curriculum part-way) against the reference given the same per-block active sets."""
    model = _build(kind, 5)
    ref = copy.deepcopy(model)
    router = cggr.attach(model)
    assert (router.config.inactive, router.config.placement, router.config.dense_ends) == ("skip", "per_block", 1)
    for _ in range(700):  # 70 % of the default warm-up: depths part-way to their targets
        router.step()
    ids = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(5))
    _loss(kind, model, ids).backward()
    r = router.routing
    counts = r.block_active.sum(1).tolist()
    n = int(r.metrics["valid_tokens"])
    assert counts[0] == counts[-1] == n and max(counts[1:-1]) < n  # dense ends, routed middle
    with cggr.reference_routing(find_layer_stack(ref)[1], inactive="skip",
                                block_active=r.block_active.view(-1, *ids.shape)):
        _loss(kind, ref, ids).backward()
    _assert_equal_grads(flat_grads(model), flat_grads(ref))
    if kind != "tiny":
        assert len(router.routing.compact_blocks) == router.num_layers  # the compacted backward, verified


def test_the_defaults_on_a_two_block_stack_route_both_blocks():
    """Too short for a dense block at each end: both blocks routed, the nested routing's work kept."""
    torch.manual_seed(0)
    model = TinyLM(layers=2)
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0)
    ids = torch.randint(0, 61, (2, 16))
    _loss("tiny", model, ids).backward()
    r = router.routing
    counts = r.block_active.sum(1).tolist()
    assert counts == [24, 24]  # 32 tokens at nested depths 2, 2, 1, 1: 48 rows, spread over both blocks
    with cggr.reference_routing(find_layer_stack(ref)[1], inactive="skip", block_active=r.block_active.view(2, 2, 16)):
        _loss("tiny", ref, ids).backward()
    _assert_equal_grads(flat_grads(model), flat_grads(ref))


# ---------------------------------------------------------------- bad inputs refused (issue 27)
@pytest.mark.parametrize("bad", ["x", True, None.__class__, 1.5, -0.1, float("nan"), [0.5]],
                         ids=["str", "bool", "type", "above", "below", "nan", "list"])
def test_set_progress_names_its_argument_and_the_allowed_values(bad):
    router = cggr.attach(TinyLM())
    with pytest.raises(ValueError, match=r"set_progress: progress must be None or a number in \[0, 1\].*got "):
        router.set_progress(bad)
    assert router._progress_override is None  # nothing was set
    router.set_progress(0.25)
    assert router.progress == 0.25


class _Outer(torch.nn.Module):
    """A module holding a routable model (as an HF causal LM holds its base model, or a LightningModule its model)."""

    def __init__(self, inner):
        super().__init__()
        self.model = inner

    def forward(self, ids):
        return self.model(ids)


def _nestings():
    """For every way two routers nest: ``() -> (attach the first: () -> its router, attach the second, what the
    second's refusal names)``."""
    def attach(module, **options):
        return lambda: cggr.attach(module, **options)

    def inner_then_outer():
        m = _Outer(TinyLM())
        return attach(m.model), attach(m), "its submodule 'model' (TinyLM) already carries a cggr router"

    def outer_then_inner():
        m = _Outer(TinyLM())
        return attach(m), attach(m.model), "it is the submodule 'model' of the _Outer that already carries a cggr router"

    def deep_descendant():
        m = _Outer(_Outer(TinyLM()))
        return attach(m.model.model), attach(m), "its submodule 'model.model' (TinyLM)"

    def two_parents_one_model():  # siblings that share the routed blocks: neither contains the other
        lm = TinyLM()
        return attach(_Outer(lm)), attach(_Outer(lm)), "its blocks are the blocks 'model.blocks' of the _Outer"

    def shared_stack():  # another model built around the same block list
        a, b = TinyLM(), TinyLM()
        b.blocks = a.blocks
        return attach(a), attach(b), "its blocks are the blocks 'blocks' of the TinyLM"

    def ancestor_routing_another_stack():  # the outer router routes a stack outside the inner module
        m = _Outer(TinyLM())
        m.encoder = TinyLM()
        return attach(m, layers="encoder.blocks"), attach(m.model), "it is the submodule 'model' of the _Outer"

    def wrapper_then_its_parent():
        wrapped = cggr.CGGRWrapper(TinyLM())
        return lambda: wrapped.router, attach(_Outer(wrapped)), "its submodule 'model.model' (TinyLM)"

    def same_module():
        lm = TinyLM()
        return attach(lm), lambda: cggr.CGGRWrapper(lm), "cggr is already attached to this model (TinyLM)"

    return [inner_then_outer, outer_then_inner, deep_descendant, two_parents_one_model, shared_stack,
            ancestor_routing_another_stack, wrapper_then_its_parent, same_module]


@pytest.mark.parametrize("nesting", _nestings(), ids=lambda f: f.__name__)
def test_a_second_router_on_nested_modules_is_refused(nesting):
    """Two routers on one backward give gradients that match neither routing: the second attach is refused,
    naming the module that carries the first and how to detach it; after detaching, the second attaches."""
    attach_first, attach_second, names = nesting()
    router = attach_first()
    with pytest.raises(ValueError, match=re.escape(names) + r".*call \.detach\(\).*_cggr_router"):
        attach_second()
    router.detach()
    attach_second()


def test_nested_routers_are_refused_for_copies_and_checked_per_live_router():
    """A deep copy of a routed model routes its copy: a router nested with the copy is refused too; routers on
    unrelated models, and detached ones, are no obstacle."""
    m = _Outer(TinyLM())
    cggr.attach(m)
    twin = copy.deepcopy(m)
    assert twin._cggr_router is not m._cggr_router
    with pytest.raises(ValueError, match="submodule 'model' of the _Outer"):
        cggr.attach(twin.model)
    twin._cggr_router.detach()
    cggr.attach(twin.model)  # the copy's router is gone: the inner module takes one
    cggr.attach(_Outer(TinyLM()).model)  # an unrelated model


# ---------------------------------------------------------------- block_fractions follow the curriculum (issue 27)
def test_block_fractions_follow_warmup_handback_and_set_progress():
    fractions = (1.0, 0.5, 0.25, 0.0)
    model = TinyLM(layers=4)
    router = cggr.attach(model, block_fractions=fractions, warmup_steps=4, handback_steps=2, total_steps=10)
    ids = torch.randint(0, 61, (2, 10))
    n = ids.numel()

    def counts():
        model(ids)
        return router.routing.block_active.sum(1).tolist()

    def expected(p):  # round half up, as per_block_counts
        return [int((1 - p * (1 - f)) * n + 0.5) for f in fractions]

    seen = []
    for _ in range(11):
        seen.append(counts())
        router.step()
    assert seen[0] == [n] * 4  # warm-up starts dense, as the bucket depths do
    assert seen[2] == expected(0.5) == [20, 15, 13, 10]
    assert seen[4] == seen[8] == [20, 10, 5, 0]  # the given fractions
    assert seen[9] == expected(0.5) and seen[10] == [n] * 4  # handed back
    router.set_progress(0.75)
    assert counts() == expected(0.75)
    router.set_progress(None)
    assert counts() == [n] * 4
    at_once = cggr.attach(TinyLM(layers=4), block_fractions=fractions, warmup_steps=0)
    at_once.model(ids)
    assert at_once.routing.block_active.sum(1).tolist() == [20, 10, 5, 0]


def test_block_fractions_mid_warmup_equal_the_reference():
    torch.manual_seed(4)
    model = TinyLM(layers=4)
    ref = copy.deepcopy(model)
    router = cggr.attach(model, block_fractions=(0.75, 0.5, 0.25, 1.0), warmup_steps=4, seed=2)
    router.step()
    ids = torch.randint(0, 61, (3, 7))
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    assert router.routing.block_active.sum(1).tolist() == [int((1 - 0.25 * (1 - f)) * 21 + 0.5) for f in
                                                           (0.75, 0.5, 0.25, 1.0)]
    with cggr.reference_routing(list(ref.blocks), **routed_as(router)):
        F.cross_entropy(ref(ids).flatten(0, 1), ids.flatten()).backward()
    _assert_equal_grads(flat_grads(model), flat_grads(ref))


def test_block_fractions_of_the_wrong_length_are_refused_at_attach():
    with pytest.raises(ValueError, match="block_fractions has 2 fractions for a stack of 4 blocks: give one per block"):
        cggr.attach(TinyLM(layers=4), block_fractions=(1.0, 0.5))


@pytest.mark.parametrize("kwargs,match", [
    (dict(leak_rate=True), r"leak_rate must be a number in \[0, 1\], got True"),
    (dict(leak_rate=2.0), r"leak_rate must be a number in \[0, 1\]"),
    (dict(mode="dense"), r"mode must be one of \('sparse', 'mask'\)"),
    (dict(mode=["sparse", "mask"]), r"one per block \(4\)"),
])
def test_reference_routing_refuses_what_it_would_misread(kwargs, match):
    """The reference took leak_rate=True as 1.0 and any mode but 'sparse' as 'mask'."""
    model = TinyLM(layers=4)
    with pytest.raises(ValueError, match=match):
        with cggr.reference_routing(list(model.blocks), torch.zeros(2, 3, dtype=torch.long), **kwargs):
            pass


def test_router_built_directly_takes_a_config_only():
    with pytest.raises(TypeError, match=r"Router\(model, config\) takes a cggr.RoutingConfig, got NoneType"):
        cggr.Router(TinyLM(), None)
    assert cggr.Router(TinyLM(), cggr.RoutingConfig(num_buckets=2)).config.num_buckets == 2
