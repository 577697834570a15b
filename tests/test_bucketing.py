"""Buckets by exact rank, bucket depths and the curriculum."""

import math

import pytest
import torch

import cggr
from cggr.bucketing import (assign_depths, buckets_to_depths, curriculum_depths, random_buckets, rank_buckets,
                            rank_buckets_global, rank_buckets_reference, target_depths)
from tests.tiny import TinyLM


@pytest.mark.parametrize("n,k", [(1, 4), (7, 4), (100, 4), (101, 3), (1000, 7), (13, 1)])
def test_exact_rank_buckets(n, k):
    g = torch.Generator().manual_seed(n * 31 + k)
    scores = torch.randn(n, generator=g)
    valid = torch.rand(n, generator=g) > 0.2
    b = rank_buckets(scores, valid, k)
    assert (b[~valid] == -1).all()
    idx = valid.nonzero().squeeze(1)
    order = idx[torch.argsort(scores[idx], descending=True)]
    m = idx.numel()
    expected = torch.tensor([r * k // m for r in range(m)], dtype=torch.long)
    assert torch.equal(b[order], expected)
    # bucket 0 holds the hardest tokens
    if m >= k > 1:
        assert scores[b == 0].min() >= scores[b == k - 1].max()


def test_ties_nonfinite_and_shapes():
    scores = torch.tensor([[1.0, float("nan"), 1.0, 1.0], [float("-inf"), 1.0, float("inf"), 0.0]])
    valid = torch.ones_like(scores, dtype=torch.bool)
    b = rank_buckets_reference(scores, valid, 4)
    assert b.shape == scores.shape
    # non-finite scores are hardest, ties in token order: nan (1), -inf (4), +inf (6), then the four 1.0
    # (0, 2, 3, 5), then 0.0 (7); 8 tokens, 2 per bucket
    assert b.reshape(-1).tolist() == [1, 0, 2, 2, 0, 3, 1, 3]


def test_all_invalid_and_empty():
    b = rank_buckets(torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.bool), 4)
    assert (b == -1).all()
    assert rank_buckets(torch.randn(0), torch.zeros(0, dtype=torch.bool), 4).numel() == 0


def test_random_policy_same_sizes_different_members():
    valid = torch.rand(400) > 0.1
    g = torch.Generator().manual_seed(0)
    a = random_buckets(valid, 4, g)
    b = random_buckets(valid, 4, g)
    sizes = lambda x: torch.bincount(x[x >= 0], minlength=4)
    scores = torch.randn(400)
    assert torch.equal(sizes(a), sizes(rank_buckets(scores, valid, 4)))
    assert torch.equal(sizes(a), sizes(b)) and not torch.equal(a, b)
    assert (a[~valid] == -1).all()


def test_target_depths():
    assert target_depths(12, 4) == [12, 9, 6, 3]
    assert target_depths(10, 4) == [10, 8, 5, 3]  # ceil(L*(K-k)/K)
    assert target_depths(2, 5) == [2, 2, 2, 1, 1]
    assert target_depths(12, 3, depths=[1.0, 0.5, 0.1]) == [12, 6, 2]


def test_curriculum():
    t = target_depths(12, 4)
    assert curriculum_depths(t, 12, 0.0) == [12, 12, 12, 12]
    assert curriculum_depths(t, 12, 1.0) == t
    for p in (0.1, 0.25, 0.5, 0.9):
        assert curriculum_depths(t, 12, p) == [math.floor(12 - p * (12 - d) + 0.5) for d in t]
    assert curriculum_depths(t, 12, 0.5) == [12, 11, 9, 8]  # 10.5 rounds half up
    assert curriculum_depths(t, 12, 7.0) == t  # progress is clamped


def test_curriculum_fractions():
    """Per-block fractions follow the curriculum as depths do: dense at progress 0, the given ones at 1."""
    from cggr.bucketing import curriculum_fractions

    f = (1.0, 0.5, 0.25, 0.0)
    assert curriculum_fractions(f, 0.0) == [1.0, 1.0, 1.0, 1.0]
    assert curriculum_fractions(f, 1.0) == list(f)
    assert curriculum_fractions(f, 0.5) == [1.0, 0.75, 0.625, 0.5]
    assert curriculum_fractions(f, 3.0) == list(f) and curriculum_fractions(f, -1.0) == [1.0] * 4  # clamped


def test_assign_depths_end_to_end():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4])
    valid = torch.ones(8, dtype=torch.bool)
    valid[0] = False
    d = assign_depths(scores, valid, num_layers=8, num_buckets=4)
    # valid ranked 0.9, 0.8, 0.7, 0.5, 0.4, 0.3, 0.2 -> buckets floor(r*4/7) = 0,0,1,1,2,2,3 -> depths 8,6,4,2
    assert d.tolist() == [0, 8, 6, 4, 6, 2, 8, 4]
    assert torch.equal(buckets_to_depths(torch.tensor([-1, 0, 3]), [8, 6, 4, 2]), torch.tensor([0, 8, 2]))


# --------------------------------------------------------------------------- sampled policy, schedule

@pytest.mark.parametrize("n,k", [(1, 4), (9, 4), (1000, 4), (777, 3)])
def test_sampled_buckets_sizes_and_bias(n, k):
    from cggr.bucketing import sampled_buckets

    g = torch.Generator().manual_seed(n + k)
    scores = torch.randn(n, generator=g)
    valid = torch.rand(n, generator=g) > 0.1
    b = sampled_buckets(scores, valid, k, torch.Generator().manual_seed(1))
    exact = rank_buckets(scores, valid, k)
    assert (b[~valid] == -1).all()
    # Same bucket sizes as the difficulty ranking.
    assert torch.equal(torch.bincount(b[valid], minlength=k), torch.bincount(exact[valid], minlength=k))
    if n >= 1000:
        # Harder tokens land in deeper buckets more often, but not always (it is a draw).
        means = [scores[b == j].mean().item() for j in range(k)]
        assert means == sorted(means, reverse=True)
        assert 0.2 < (b[valid] == exact[valid]).float().mean().item() < 0.9


def test_random_and_sampled_buckets_non_finite_and_all_invalid():
    from cggr.bucketing import sampled_buckets

    scores = torch.tensor([float("nan"), 1.0, float("-inf"), float("inf"), 0.0])
    b = sampled_buckets(scores, torch.ones(5, dtype=torch.bool), 2, torch.Generator().manual_seed(0))
    assert b.tolist() == [0, 1, 0, 0, 1]  # non-finite scores are the hardest under every policy
    r = random_buckets(torch.ones(5, dtype=torch.bool), 2, torch.Generator().manual_seed(0), scores=scores)
    assert r.tolist() == [0, 1, 0, 0, 1]
    none = sampled_buckets(scores, torch.zeros(5, dtype=torch.bool), 2)
    assert (none == -1).all()


def test_schedule_progress():
    from cggr.bucketing import schedule_progress

    assert schedule_progress(0, 0) == 1.0
    assert [schedule_progress(s, 4) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    # Hand-back: back to full depth (progress 0) linearly over the last 4 of 20 steps.
    assert [schedule_progress(s, 4, 20, 4) for s in (10, 16, 18, 20)] == [1.0, 1.0, 0.5, 0.0]
    # Fractions of a wall-clock budget work the same.
    assert schedule_progress(0.95, 0.2, 1.0, 0.1) == pytest.approx(0.5)


def test_global_buckets_of_one_rank_equal_the_reference():
    """The radix selection of rank_buckets_global, exact on one rank (tests/test_distributed.py runs two)."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    g = torch.Generator().manual_seed(0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for trial in range(60):
            n, k = int(torch.randint(0, 300, (), generator=g)), int(torch.randint(1, 9, (), generator=g))
            scores = torch.randn(n, generator=g) if trial % 2 else torch.randint(-3, 3, (n,), generator=g).float()
            scores[: min(n, 5)] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0])[: min(n, 5)]
            valid = torch.rand(n, generator=g) < 0.8
            assert torch.equal(rank_buckets_global(scores, valid, k), rank_buckets_reference(scores, valid, k))
    finally:
        dist.destroy_process_group()


def test_global_buckets_without_a_process_group_are_local():
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    depths = []
    for buckets in ("local", "global"):
        torch.manual_seed(0)
        model = TinyLM()
        router = cggr.attach(model, warmup_steps=0, buckets=buckets, placement="nested")
        model(ids).sum().backward()
        depths.append(router.routing.depth)
    assert torch.equal(*depths)


@pytest.mark.parametrize("seed", range(6))
def test_block_counts_from_the_host_equal_the_device_counts(seed):
    """The sparse backward's row counts come from the number of valid tokens alone (no read-back)."""
    from cggr.routing import Routing, block_counts

    g = torch.Generator().manual_seed(seed)
    L = int(torch.randint(1, 13, (), generator=g))
    K = int(torch.randint(1, 9, (), generator=g))
    n_rows = int(torch.randint(1, 300, (), generator=g))
    depths = (None if seed % 2 else torch.rand(K, generator=g).tolist())  # user fractions, in any order
    progress = float(torch.rand((), generator=g))
    bucket_depths = curriculum_depths(target_depths(L, K, depths), L, progress)
    valid = torch.rand(n_rows, generator=g) > float(torch.rand((), generator=g))
    for policy in (rank_buckets(torch.randn(n_rows, generator=g), valid, K), random_buckets(valid, K, g)):
        r = Routing.from_depth(buckets_to_depths(policy, bucket_depths), num_layers=L)
        assert block_counts(int(valid.sum()), L, bucket_depths) == r.active_counts_tensor().tolist()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_layers=0), ValueError, "num_layers must be an integer >= 1"),
    (dict(num_buckets=0), ValueError, "num_buckets must be an integer"),
    (dict(depths=[0.5]), ValueError, "depths must be a sequence of num_buckets=4"),
    (dict(progress=1.5), ValueError, r"progress must be a number in \[0, 1\]"),
    (dict(progress=True), ValueError, r"progress must be a number in \[0, 1\], got True"),
    (dict(progress="0.5"), ValueError, r"progress must be a number in \[0, 1\]"),
    (dict(depths=[True, 0.5, 0.25, 0.1]), ValueError, "depths must be a sequence"),
    (dict(valid="all"), ValueError, "valid must be a bool tensor"),
    (dict(valid=torch.ones(3, dtype=torch.bool)), ValueError, "valid must be a bool tensor shaped like scores"),
    (dict(scores=torch.ones(2, 5, dtype=torch.long)), TypeError, "scores must be a floating-point tensor"),
])
def test_assign_depths_validates_its_arguments(kwargs, error, match):
    args = dict(scores=torch.randn(2, 5), valid=torch.ones(2, 5, dtype=torch.bool), num_layers=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        assign_depths(**args)
