"""cggr.plan: one step's routing decided from its inputs (no hooks): sizes, placement, seeds, non-finite scores."""

import pytest
import torch

from cggr.config import RoutingConfig
from cggr.plan import Planner
from cggr.routing import Routing, block_counts


def _decide(config, L, valid, logits=None, seed=0, progress=1.0, num_valid=None):
    planner = Planner(config, L, [True] * L)
    r = Routing(num_layers=L, leak_rate=config.leak_rate, inactive=config.inactive)
    return planner.decide_into(r, valid, logits, progress=progress, draw_seed=seed, num_valid=num_valid)


@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed={s}")
@pytest.mark.parametrize("policy", ["random", "difficulty", "sampled"])
def test_nested_counts_match_the_buckets(seed, policy):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(3, 11, generator=g) < 0.8
    logits = torch.randn(3, 11, 17, generator=g)
    r, nonfinite = _decide(RoutingConfig(policy=policy, warmup_steps=0, placement="nested"), 6, valid, logits, seed=seed)
    n = int(valid.sum())
    assert r.active_counts_tensor().tolist() == block_counts(n, 6, [6, 5, 3, 2])
    assert (r.depth[~valid] == 0).all() and (r.depth[valid] > 0).all()
    assert nonfinite.tolist() == [0, 0]


def test_random_policy_needs_no_logits_and_draws_by_seed():
    valid = torch.ones(2, 9, dtype=torch.bool)
    a, _ = _decide(RoutingConfig(warmup_steps=0), 4, valid, None, seed=1)
    b, _ = _decide(RoutingConfig(warmup_steps=0), 4, valid, None, seed=1)
    c, _ = _decide(RoutingConfig(warmup_steps=0), 4, valid, None, seed=2)
    assert torch.equal(a.depth, b.depth) and not torch.equal(a.depth, c.depth)
    assert "mean_entropy" not in a.metrics  # no logits, no score metrics


@pytest.mark.parametrize("seed", [0, 1], ids=lambda s: f"seed={s}")
@pytest.mark.parametrize("ends", [0, 1, 2])
def test_per_block_placement_exact_sizes(seed, ends):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(2, 13, generator=g) < 0.7
    config = RoutingConfig(warmup_steps=0, inactive="skip", placement="per_block", dense_ends=ends)
    r, _ = _decide(config, 6, valid, None, seed=seed)
    n = int(valid.sum())
    counts = r.block_active.sum(1).tolist()
    assert counts[:ends] == [n] * ends and counts[6 - ends:] == [n] * ends
    assert sum(counts) == sum(block_counts(n, 6, [6, 5, 3, 2]))  # the nested routing's work, never more
    assert not r.block_active[:, ~valid.reshape(-1)].any()
    assert [r.active_count(i) for i in range(6)] == counts
    assert r.skip


def test_nonfinite_logits_are_reported_and_active_everywhere():
    valid = torch.ones(1, 8, dtype=torch.bool)
    logits = torch.randn(1, 8, 5)
    logits[0, 3, 0] = float("nan")
    r, nonfinite = _decide(RoutingConfig(warmup_steps=0), 4, valid, logits)
    assert nonfinite.tolist() == [1, 0] and r.depth[0, 3] == 4
    config = RoutingConfig(warmup_steps=0, inactive="skip", placement="per_block")
    r, nonfinite = _decide(config, 4, valid, logits)
    assert r.block_active[:, 3].all() and nonfinite.tolist()[0] == 1
