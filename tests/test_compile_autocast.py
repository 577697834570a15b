"""``torch.compile`` and CPU bf16 autocast with cggr attached.

(a) A compiled model (``backend="aot_eager"``: fast on the CPU; cggr's hooks break the graph, see
    ``test_compile_graph_breaks``) routes and gives the gradients of an identical eager copy under the reference
    routing of the same depth (``router.routing.depth``).
(b) ``torch.autocast("cpu", dtype=torch.bfloat16)`` with fp32 weights: the compacted backward declines autocast,
    so the generic per-linear path runs; routed gradients match the fp32 reference at bf16 tolerance.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import cggr
from cggr.adapters import find_layer_stack
from tests.tiny import BACKWARD_KINDS, TinyLM, flat_grads, hf_model, rel_err, routed_as

VOCAB = 97
_HAS_BACKWARD_OPTION = "backward" in cggr.config.OPTION_NAMES
_BACKWARDS = ["generic", "auto"] if _HAS_BACKWARD_OPTION else [None]


def _attach(model, backward, **kw):
    return cggr.attach(model, **kw) if backward is None else cggr.attach(model, backward=backward, **kw)


def _hf_batch(seed=0, batch=2, seq=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a few tokens without a target: depth 0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _tiny_loss(model, ids, targets):
    return F.cross_entropy(model(ids).reshape(-1, VOCAB), targets.reshape(-1))


def _assert_close(g_fast, g_ref, tol):
    scale = max(v.norm().item() for v in g_ref.values())
    for name, ref in g_ref.items():
        err = (g_fast[name] - ref).norm().item() / max(ref.norm().item(), 1e-3 * scale)
        assert err < tol, f"{name}: relative error {err:.2e}"


def _reference_grads(ref_model, how, loss_fn):
    """``how``: the routing, as :func:`tiny.routed_as` gives it."""
    _, blocks = find_layer_stack(ref_model)
    with cggr.reference_routing(blocks, **how):
        loss_fn(ref_model).backward()
    return flat_grads(ref_model)


def _routed_depth_is_mixed(depth, num_layers):
    """Some tokens routed through every block, some stopped short: the routing is not trivial."""
    return bool((depth == num_layers).any()) and bool((depth < num_layers).any())


# --------------------------------------------------------------------------- (a) torch.compile
@pytest.mark.parametrize("backward", _BACKWARDS)
def test_compiled_hf_llama_matches_eager_reference(backward):
    torch._dynamo.reset()
    model = hf_model("llama", layers=2, seed=3)  # two blocks keep compilation short
    ref = copy.deepcopy(model)  # before attaching
    router = _attach(model, backward, num_buckets=2, warmup_steps=0)
    compiled = torch.compile(model, backend="aot_eager")
    batch = _hf_batch()
    compiled(**batch).loss.backward()
    depth = router.routing.depth.clone()
    assert depth.shape == batch["input_ids"].shape and _routed_depth_is_mixed(depth, router.num_layers)
    assert (depth[0, :2] == 0).all()  # next label is -100
    g_ref = _reference_grads(ref, routed_as(router), lambda m: m(**batch).loss)
    _assert_close(flat_grads(model), g_ref, 1e-5)
    # a second step (new routing, the curriculum stepped) reuses the compiled code and stays exact
    router.step()
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    batch2 = _hf_batch(seed=1)
    compiled(**batch2).loss.backward()
    g_ref2 = _reference_grads(ref, routed_as(router), lambda m: m(**batch2).loss)
    _assert_close(flat_grads(model), g_ref2, 1e-5)


def test_compiled_tiny_lm_matches_eager_reference():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM(vocab=VOCAB, layers=2)
    ref = copy.deepcopy(model)
    router = cggr.attach(model, num_buckets=2, warmup_steps=0)
    compiled = torch.compile(model, backend="aot_eager")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    targets = torch.randint(0, VOCAB, (2, 16), generator=g)
    _tiny_loss(compiled, ids, targets).backward()
    depth = router.routing.depth.clone()
    assert _routed_depth_is_mixed(depth, router.num_layers)
    g_ref = _reference_grads(ref, routed_as(router), lambda m: _tiny_loss(m, ids, targets))
    _assert_close(flat_grads(model), g_ref, 1e-5)


def test_compile_graph_breaks():
    """Documents that cggr's hooks break dynamo's graph without failing: the router's host reads
    (``int()`` of the non-finite count on the CPU, ``.tolist()`` of the active counts in ``Routing.plan``) are
    data-dependent, so dynamo splits the model around the post-forward hook; the results still match (above)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM(vocab=VOCAB, layers=2)
    cggr.attach(model, num_buckets=2, warmup_steps=0)
    explanation = torch._dynamo.explain(model)(torch.randint(0, VOCAB, (2, 12)))
    assert explanation.graph_count >= 1
    reasons = {str(getattr(b, "reason", b)).splitlines()[0] for b in explanation.break_reasons}
    print(f"\ngraphs={explanation.graph_count} graph_breaks={explanation.graph_break_count}: {sorted(reasons)}")


# --------------------------------------------------------------------------- (b) bf16 autocast on the CPU
def test_fp16_autocast_fallback_is_announced_once(caplog, monkeypatch):
    """fp16 autocast misses the (bf16) fast path: the user is told once, with the fix; the generic path runs."""
    import cggr.compact.forward as compacted_forward

    monkeypatch.setattr(compacted_forward, "_warned_dtype", False)
    model = hf_model("llama", seed=4)
    router = cggr.attach(model, num_buckets=4, warmup_steps=0)
    batch = _hf_batch(seed=2)
    with caplog.at_level("WARNING", logger="cggr"):
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.float16):
                model(**batch).loss.backward()
    said = [r.getMessage() for r in caplog.records if "compacted backward runs in bf16" in r.getMessage()]
    assert len(said) == 1 and "autocast to torch.float16" in said[0] and "bf16=True" in said[0]
    assert not router.routing.compact_blocks


@pytest.mark.parametrize("kind,backward,checkpointing", [
    ("llama", "generic", False), *[(kind, "auto", ckpt) for ckpt in (False, True) for kind in BACKWARD_KINDS]])
def test_bf16_autocast_hf_close_to_fp32_reference(kind, backward, checkpointing):
    """bf16 autocast over fp32 weights: the compacted backward (in bf16, on casts of the weights; routed
    checkpointing too) and the generic one stay within bf16 tolerance of the fp32 reference: 3e-2, or for a family
    that bf16 conditions worse (q/k norms: Gemma 3, OLMo 2) twice what HF's own autocast gives under the
    reference routing (the compacted block runs its residual stream in bf16 where HF's autocast keeps it fp32)."""
    model = hf_model(kind, seed=4)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = copy.deepcopy(model)
    hf_bf16 = copy.deepcopy(model)
    router = cggr.attach(model, num_buckets=4, warmup_steps=0, backward=backward)
    batch = _hf_batch(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    depth = router.routing.depth.clone()
    assert _routed_depth_is_mixed(depth, router.num_layers)
    assert router.routing.compact_blocks == (set(range(router.num_layers)) if backward == "auto" else set())
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    g_ref = _reference_grads(ref, routed_as(router), lambda m: m(**batch).loss)  # fp32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g_hf = _reference_grads(hf_bf16, routed_as(router), lambda m: m(**batch).loss)
    g = flat_grads(model)
    scale = max(v.norm().item() for v in g_ref.values())
    near = [name for name, r in g_ref.items() if r.norm().item() >= 1e-3 * scale]  # else relative error is noise
    tol = max(3e-2, 2 * max(rel_err(g_hf[name], g_ref[name]) for name in near))
    for name in near:
        assert rel_err(g[name], g_ref[name]) < tol, f"{name}: relative error {rel_err(g[name], g_ref[name]):.2e}"


def test_bf16_autocast_tiny_lm_close_to_fp32_reference():
    torch.manual_seed(1)
    model = TinyLM(vocab=VOCAB)
    ref = copy.deepcopy(model)
    router = cggr.attach(model, num_buckets=4, warmup_steps=0)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    targets = torch.randint(0, VOCAB, (2, 16), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _tiny_loss(model, ids, targets)
    loss.backward()
    g_ref = _reference_grads(ref, routed_as(router), lambda m: _tiny_loss(m, ids, targets))
    grads = flat_grads(model)
    scale = max(v.norm().item() for v in g_ref.values())
    for name, r in g_ref.items():
        if r.norm().item() < 1e-3 * scale:
            continue
        assert rel_err(grads[name], r) < 3e-2, f"{name}: relative error {rel_err(grads[name], r):.2e}"


@pytest.mark.parametrize("inactive", ["stop", "skip"])
def test_inductor_compiled_tiny_lm_matches_eager_reference(inactive):
    """The default backend (Inductor, CPU C++ code) compiles the model around cggr's hooks and routed ops; two
    steps (two routings) are exact against the reference."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM(vocab=VOCAB, layers=2)
    ref = copy.deepcopy(model)
    router = cggr.attach(model, num_buckets=2, warmup_steps=0, **({} if inactive == "skip" else dict(inactive=inactive)))
    compiled = torch.compile(model)
    g = torch.Generator().manual_seed(5)
    for step in range(2):
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        targets = torch.randint(0, VOCAB, (2, 16), generator=g)
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        _tiny_loss(compiled, ids, targets).backward()
        depth = router.routing.depth.clone()
        assert _routed_depth_is_mixed(depth, router.num_layers)
        assert router.config.placement == ("nested" if inactive == "stop" else "per_block")  # stop: the seed's
        with cggr.reference_routing(find_layer_stack(ref)[1], **routed_as(router)):
            _tiny_loss(ref, ids, targets).backward()
        _assert_close(flat_grads(model), flat_grads(ref), 1e-5)
        router.step()


@pytest.mark.parametrize("attached", [False, True], ids=["plain", "attached"])
def test_compiled_hf_model_does_not_recompile_every_step(attached):
    """Importing (and attaching) cggr must not make dynamo recompile an HF model each call: HF's forward builds
    module lists (``self.layers[:n]``), so anything cggr hooks into module registration would change under
    the compiled frame. Found on the H200: the compile arm ran at eager speed after the recompile limit."""
    torch._dynamo.reset()
    model = hf_model("llama", layers=2, seed=1)
    if attached:
        cggr.attach(model, warmup_steps=0)
    compiled = torch.compile(model, backend="aot_eager")
    batches = [_hf_batch(seed=s) for s in range(3)]
    compiled(**batches[0]).loss.backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in batches[1:]:
            compiled(**batch).loss.backward()
