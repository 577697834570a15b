"""cggr under real 2-process data parallelism on CPU (gloo): DDP and FSDP2 (``fully_shard``).

One spawn of two ranks runs every case once (module fixture); the tests read its results. Each case:
a fresh tiny HF Llama (same seed on both ranks), an undistributed deep copy as the reference, cggr
attached before (``right``) or after (``wrong``) the wrapper, one forward/backward per rank on the rank's
own micro-batch (per-rank routing). The data-parallel gradient (DDP: the all-reduced ``.grad``; FSDP2:
``.grad.full_tensor()``) must equal ``sum_r grad(loss_r under routing_r) / world`` computed on the
reference with :func:`cggr.reference_routing` and every rank's ``router.routing.depth``.

Data: rank 0 has all 22 predictable positions valid; rank 1 has 3 (``uneven``) or none (``allinvalid``):
ranks route different numbers of tokens and must neither deadlock nor hang.

Global buckets (``buckets="global"``): :func:`cggr.bucketing.rank_buckets_global` on each rank must give the
buckets that single-process bucketing of both ranks' tokens, concatenated in rank order, gives (ties, non-finite
scores, a rank without valid tokens, ranks of different sizes); and a routed DDP / FSDP2 step with global buckets
must route by those buckets and give the reference's averaged gradients.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from cggr.routing import block_counts, per_block_counts

WORLD = 2
TOL = 1e-5
HANG_TIMEOUT_S = 120
NORM = 24.0  # fixed loss normaliser: an all-invalid rank keeps a finite loss (HF's mean would be NaN)

CASES = [f"{d}/{b}/{o}/{data}/local"
         for d in ("ddp", "fsdp2") for b in ("auto", "generic")
         for o, data in (("right", "uneven"), ("right", "allinvalid"), ("wrong", "uneven"))]
CASES += [f"{d}/auto/right/{data}/global" for d in ("ddp", "fsdp2") for data in ("uneven", "allinvalid")]
BUCKET_CASES = [f"buckets/{data}" for data in ("random", "ties", "allinvalid", "empty")]
# Skip semantics with per-block placement, each rank drawing its own subsets (compacted and generic backward);
# with the kept rows reweighted (estimator="unbiased"), and drawn in each block's backward (importance="block").
PER_BLOCK = {"skip": {}, "unbiased": dict(estimator="unbiased"), "block": dict(estimator="unbiased", importance="block")}
SKIP_CASES = [f"{d}/{b}/right/uneven/{how}" for d in ("ddp", "fsdp2") for b in ("auto", "generic") for how in PER_BLOCK]


def _batch(rank: int, data: str):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    labels = ids.clone()
    if rank == 1:
        labels[:] = -100
        if data == "uneven":
            labels[0, 3:6] = ids[0, 3:6]
    return ids, labels


def _loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum") / NORM


def _bucket_case(rank: int, world: int, data: str) -> dict:
    """Global buckets on each rank against single-process bucketing of the concatenation, for several K."""
    from cggr.bucketing import rank_buckets_global, rank_buckets_reference

    g = torch.Generator().manual_seed(7 + rank)
    n = (300, 0 if data == "empty" else 171)[rank]  # ranks hold different numbers of tokens
    scores = torch.randn(n, generator=g) if data != "ties" else torch.randint(-2, 3, (n,), generator=g).float()
    scores[: min(n, 4)] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])[: min(n, 4)]
    valid = torch.rand(n, generator=g) < 0.9
    if rank == 1 and data == "allinvalid":
        valid[:] = False
    out = {}
    everyone = [None] * world
    dist.all_gather_object(everyone, (scores, valid))
    all_scores = torch.cat([s for s, _ in everyone])
    all_valid = torch.cat([v for _, v in everyone])
    start = sum(len(s) for s, _ in everyone[:rank])
    shape = (n,) if rank == 0 else (n, 1)  # any token shape; buckets come back in it
    for K in (1, 2, 4, 7):
        mine = rank_buckets_global(scores.reshape(shape), valid.reshape(shape), K)
        want = rank_buckets_reference(all_scores, all_valid, K)[start:start + n]
        out[f"K{K}_mismatches"] = int((mine.reshape(-1) != want).sum())
        out[f"K{K}_shape_kept"] = tuple(mine.shape) == shape
    out["n_valid_all"] = int(all_valid.sum())
    return out


def _run_case(rank: int, world: int, kind: str, backward: str, order: str, data: str, buckets: str) -> dict:
    import cggr
    from cggr.adapters import find_layer_stack
    from cggr.bucketing import buckets_to_depths, rank_buckets_reference
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tests.tiny import hf_model

    torch.manual_seed(0)
    model = hf_model("llama", layers=2)
    ref = copy.deepcopy(model)

    def wrap(m):
        if kind == "ddp":
            return DDP(m)
        for layer in m.model.layers:
            fully_shard(layer)
        fully_shard(m)
        return m

    options = dict(warmup_steps=0, num_buckets=2, backward=backward, buckets=buckets, policy="difficulty")
    if buckets in PER_BLOCK:
        options.update(buckets="local", policy="random", inactive="skip", placement="per_block", **PER_BLOCK[buckets])
    if order == "right":
        router = cggr.attach(model, **options)
        wrapped = wrap(model)
    else:
        wrapped = wrap(model)
        try:
            router = cggr.attach(wrapped, warmup_steps=0, num_buckets=2, backward=backward, buckets=buckets,
                                 policy="difficulty")
        except ValueError as e:  # DDP: refused, cggr must go on first
            return dict(refused=str(e))
    ids, labels = _batch(rank, data)

    saved_params = []  # parameters autograd saved in forward (FSDP2: the unsharded ones)

    def pack(t):
        if isinstance(t, nn.Parameter):
            saved_params.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = wrapped(input_ids=ids, labels=labels)
    freed = sum(1 for t in saved_params if t.untyped_storage().size() == 0)
    _loss(out.logits, labels).backward()

    r = router.routing
    depth = r.depth
    valid = torch.zeros_like(labels, dtype=torch.bool)  # HF causal LM: logits at t predict labels[t+1]
    valid[:, :-1] = labels[:, 1:] != -100
    grads = {}
    for n, p in model.named_parameters():
        g = torch.zeros(p.shape) if p.grad is None else p.grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        grads[n.removeprefix("module.")] = g.detach().clone()

    everyone = [None] * world
    per_block = r.block_active.view(-1, *depth.shape) if r.block_active is not None else None
    weights = r.branch_weight.view(-1, *depth.shape) if r.branch_weight is not None else None
    dist.all_gather_object(everyone, (ids, labels, depth, cggr.score_difficulty(out.logits.detach()).difficulty, valid,
                                      per_block, weights))
    # The depths the buckets of all ranks' tokens ranked together (global) or each rank's own (local) give.
    if buckets in PER_BLOCK:
        expected = depth  # per-block subsets: checked below by the reference gradients of every rank's own sets
    elif buckets == "global":
        keys, oks = (torch.cat([e[i].reshape(-1) for e in everyone]) for i in (3, 4))
        expected = buckets_to_depths(rank_buckets_reference(keys, oks, 2), router.bucket_depths())
        expected = expected[rank * depth.numel():(rank + 1) * depth.numel()].reshape(depth.shape)
    else:
        expected = buckets_to_depths(rank_buckets_reference(everyone[rank][3], valid, 2), router.bucket_depths())
    _, ref_blocks = find_layer_stack(ref)
    for ids_r, labels_r, depth_r, _, _, per_block_r, weights_r in everyone:
        how = (dict(depth=depth_r, inactive=router.config.inactive) if per_block_r is None else
               dict(inactive="skip", block_active=per_block_r, branch_weight=weights_r))
        with cggr.reference_routing(ref_blocks, **how):
            _loss(ref(input_ids=ids_r, labels=labels_r).logits, labels_r).backward()
    ref_grads = {n: p.grad / world for n, p in ref.named_parameters()}
    scale = max(v.norm().item() for v in ref_grads.values())
    errs = {n: (grads[n] - v).norm().item() / max(v.norm().item(), 1e-3 * scale) for n, v in ref_grads.items()}
    worst = max(errs, key=errs.get)
    return dict(max_err=errs[worst], worst=worst, compact=sorted(r.compact_blocks),
                active=[r.active_count(i) for i in range(router.num_layers)], n_valid=int(valid.sum()),
                depth_as_bucketed=bool(torch.equal(depth, expected)),
                depth_matches_labels=bool((depth[~valid] == 0).all() and (depth[valid] > 0).all()),
                invalid_depth_zero=bool((depth[~valid] == 0).all()),
                label_shift=router.label_shift, saved_params=len(saved_params), freed_after_forward=freed,
                finite=all(bool(torch.isfinite(g).all()) for g in grads.values()))


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for case in BUCKET_CASES + CASES + SKIP_CASES:
            t0 = time.time()
            try:
                run = _bucket_case if case.startswith("buckets/") else _run_case
                results[case] = dict(ok=True, **run(rank, world, *case.split("/")[1 if run is _bucket_case else 0:]))
            except Exception as e:  # recorded, then the next case
                results[case] = dict(ok=False, error=f"{type(e).__name__}: {e}", tb=traceback.format_exc())
            results[case]["seconds"] = round(time.time() - t0, 3)
            with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
                json.dump(results, f, default=str)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    outdir = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), outdir), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.time() + HANG_TIMEOUT_S
    hung = False
    while not ctx.join(timeout=2):
        if time.time() > deadline:
            hung = True
            for p in ctx.processes:
                p.kill()
            break
    out = []
    for rank in range(WORLD):
        path = os.path.join(outdir, f"rank{rank}.json")
        out.append(json.load(open(path)) if os.path.exists(path) else {})
    return {"hung": hung, "ranks": out}


def _case(results, case):
    assert not results["hung"], "the 2-rank run hung"
    per_rank = [r.get(case) for r in results["ranks"]]
    for rank, res in enumerate(per_rank):
        assert res is not None, f"rank {rank} never finished {case} (deadlock or crash)"
        assert res["ok"], f"rank {rank} {case}: {res['error']}\n{res['tb']}"
    return per_rank


RIGHT = [c for c in CASES if "/right/" in c]
WRONG = [c for c in CASES if "/wrong/" in c]


@pytest.mark.parametrize("case", BUCKET_CASES)
def test_global_buckets_equal_single_process_bucketing_of_all_ranks(results, case):
    """Exact (docs/design.md §1.4 allows 1 % of n per boundary): ties in rank order, an empty or all-invalid
    rank too."""
    for rank, res in enumerate(_case(results, case)):
        for K in (1, 2, 4, 7):
            assert res[f"K{K}_mismatches"] == 0, f"rank {rank}, K={K}: {res[f'K{K}_mismatches']} tokens differ"
            assert res[f"K{K}_shape_kept"]


@pytest.mark.parametrize("case", RIGHT)
def test_data_parallel_gradients_equal_reference(results, case):
    """attach first, then DDP / fully_shard: per-rank routing, averaged grads == reference, no hang."""
    for rank, res in enumerate(_case(results, case)):
        assert res["max_err"] < TOL, f"rank {rank}: {res['worst']} relative error {res['max_err']:.2e}"
        assert res["finite"]
        assert res["depth_matches_labels"]
        assert res["depth_as_bucketed"], f"rank {rank}: depths are not those of {case.split('/')[-1]} buckets"
        assert res["compact"] == ([0, 1] if "/auto/" in case else [])
    r0, r1 = _case(results, case)
    uneven = "/uneven/" in case
    assert r0["n_valid"] == 22 and r1["n_valid"] == (3 if uneven else 0)
    if case.endswith("/local"):
        assert r1["active"] == ([2, 3] if uneven else [0, 0])  # half of rank 1's own 3 tokens at full depth
    else:
        n = r0["n_valid"] + r1["n_valid"]
        assert r0["active"][0] + r1["active"][0] == (n + 1) // 2  # half of both ranks' valid tokens at full depth


@pytest.mark.parametrize("case", SKIP_CASES)
def test_data_parallel_skip_semantics_gradients_equal_reference(results, case):
    """Skip semantics, per-block subsets drawn on each rank (their rows reweighted by 1/pi, or drawn in each
    block's backward): averaged grads == the reference of each rank's sets and weights."""
    for rank, res in enumerate(_case(results, case)):
        assert res["max_err"] < TOL, f"rank {rank}: {res['worst']} relative error {res['max_err']:.2e}"
        assert res["finite"] and res["invalid_depth_zero"]  # a valid token may be active in no block here
        assert res["compact"] == ([0, 1] if "/auto/" in case else [])
        # each rank's own subsets, of exactly the nested routing's total work on its own valid tokens
        n = res["n_valid"]
        assert res["active"] == per_block_counts(n, 2, block_counts(n, 2, [2, 1]))


@pytest.mark.parametrize("case", [c for c in RIGHT if c.startswith("fsdp2")])
def test_fsdp2_reshard_frees_saved_weights_and_backward_reunshards(results, case):
    """FSDP2 frees the unsharded weights the routed Functions saved; its pre-backward all-gather refills the
    same storage before the Function's backward reads it (gradients above match the reference)."""
    for res in _case(results, case):
        assert res["saved_params"] > 0
        assert res["freed_after_forward"] >= res["saved_params"] - 1  # all but the root's (not resharded)


@pytest.mark.parametrize("case", [c for c in WRONG if c.startswith("fsdp2")])
def test_fsdp2_wrong_order_is_equivalent(results, case):
    """attach(fully_shard(model)) keeps the model's class: same routing and gradients as the right order."""
    for rank, res in enumerate(_case(results, case)):
        assert res["max_err"] < TOL, f"rank {rank}: {res['worst']} relative error {res['max_err']:.2e}"
        assert res["depth_matches_labels"] and res["label_shift"] == 1
        assert res["compact"] == ([0, 1] if "/auto/" in case else [])


@pytest.mark.parametrize("case", [c for c in WRONG if c.startswith("ddp")])
def test_ddp_wrong_order_is_refused(results, case):
    """attach(DDP(model)) would route the wrong tokens (the wrapper hides the label shift): a clear error."""
    for res in _case(results, case):
        assert "attach cggr to the model first" in res["refused"]
