"""cggr.routing: the routing state a forward decides and its backward carries (nested and per-block)."""

import pytest
import torch

from cggr.bucketing import curriculum_depths, target_depths
from cggr.routing import Routing, block_counts, nested_active_counts, nested_rows, per_block_counts


def _nested_active(depth: torch.Tensor, L: int) -> torch.Tensor:
    """The definition: block i sees token t active when depth[t] > L - 1 - i."""
    flat = depth.reshape(-1)
    return torch.stack([flat > L - 1 - i for i in range(L)])


@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed={s}")
@pytest.mark.parametrize("L,n", [(1, 1), (3, 7), (5, 13), (8, 33)])
def test_nested_active_sets_follow_the_depth(seed, L, n):
    g = torch.Generator().manual_seed(seed)
    depth = torch.randint(0, L + 1, (n,), generator=g)
    r = Routing.from_depth(depth, num_layers=L)
    active = _nested_active(depth, L)
    assert r.active_counts_tensor().tolist() == active.sum(1).tolist()
    for i in range(L):
        assert sorted(r.active_rows(i).tolist()) == torch.nonzero(active[i]).reshape(-1).tolist()
        assert torch.equal(r.inactive_mask(i), ~active[i])
        assert r.active_count(i) == int(active[i].sum())


@pytest.mark.parametrize("seed", [0, 1], ids=lambda s: f"seed={s}")
def test_per_block_active_sets_and_depth(seed):
    g = torch.Generator().manual_seed(seed)
    block_active = torch.rand(4, 2, 5, generator=g) < 0.5
    r = Routing.from_block_active(block_active)
    assert r.skip and r.depth.shape == (2, 5) and torch.equal(r.depth, block_active.long().sum(0))
    for i in range(4):
        assert r.active_rows(i).tolist() == torch.nonzero(block_active[i].reshape(-1)).reshape(-1).tolist()
        assert torch.equal(r.inactive_mask(i), ~block_active[i].reshape(-1))


@pytest.mark.parametrize("inactive", ["stop", "skip"])
@pytest.mark.parametrize("leak", [0.0, 0.25])
def test_gate_and_block_input_grad(inactive, leak):
    depth = torch.tensor([[3, 1, 0, 2]])
    r = Routing.from_depth(depth, num_layers=3, leak_rate=leak, inactive=inactive)
    g = torch.arange(1.0, 13.0).view(1, 4, 3)
    for i in range(3):
        inactive_rows = (depth.reshape(-1) <= 2 - i).view(1, 4, 1)
        assert torch.equal(r.gate(g, i), torch.where(inactive_rows, leak * g, g))
        dx = torch.where(inactive_rows, torch.zeros_like(g), -g)  # a block backward: zero on inactive rows
        want = torch.where(inactive_rows, g, dx) if inactive == "skip" else dx
        assert torch.equal(r.block_input_grad(dx, g, i), want)


@pytest.mark.parametrize("n,L,depths", [(0, 4, [4, 3, 2, 1]), (1, 4, [4, 3, 2, 1]), (33, 4, [4, 3, 2, 1]),
                                        (100, 12, [12, 9, 6, 3]), (7, 3, [3, 3])])
def test_nested_rows_keep_the_depth_of_exact_buckets(n, L, depths):
    """Host counts (block_counts) and device depths agree when the depths are those of the buckets; each block's
    rows are a prefix of the order, the tokens of that block's depth."""
    K = len(depths)
    ranks = torch.randperm(n)
    bucket = ranks * K // max(n, 1)
    depth = torch.tensor(depths)[bucket] if n else torch.zeros(0, dtype=torch.long)
    counts = block_counts(n, L, depths)
    placed, order = nested_rows(depth.clone(), torch.tensor(counts), L)
    assert torch.equal(placed, depth) and nested_active_counts(placed, L).tolist() == counts
    r = Routing(num_layers=L).decide(placed, counts=counts, order=order)
    assert r.counts_known and r.active_counts_tensor().tolist() == counts
    for i in range(L):
        assert sorted(r.active_rows(i).tolist()) == torch.nonzero(depth > L - 1 - i).reshape(-1).tolist()


def test_nested_rows_give_raised_tokens_only_the_room_the_counts_leave():
    """Tokens raised to full depth (non-finite logits) beyond the room of the counts keep less depth, and the
    depth says how much: the counts are kept exactly."""
    depth = torch.tensor([3, 3, 3, 1, 0])
    placed, order = nested_rows(depth, torch.tensor([2, 2, 3]), 3)
    assert nested_active_counts(placed, 3).tolist() == [2, 2, 3] and placed.tolist() == [3, 3, 1, 0, 0]
    assert order[:3].tolist() == [0, 1, 2]


@pytest.mark.parametrize("n,L,ends", [(30, 8, 0), (30, 8, 1), (30, 8, 2), (5, 3, 1), (9, 2, 1), (0, 4, 1)])
def test_per_block_counts_keep_the_nested_work(n, L, ends):
    nested = block_counts(n, L, [L, (3 * L + 3) // 4, L // 2 or 1, 1])
    counts = per_block_counts(n, L, nested, dense_ends=ends)
    assert len(counts) == L and all(0 <= c <= n for c in counts)
    e = min(ends, (L - 1) // 2)  # at least one block stays routed (these budgets pay for the ends)
    assert counts[:e] == [n] * e and counts[L - e:] == [n] * e
    middle = counts[e:L - e]
    assert max(middle) - min(middle) <= 1
    assert sum(counts) == sum(nested)


@pytest.mark.parametrize("L,ends,expected", [(1, 1, [10]), (2, 1, [7, 8]), (2, 3, [7, 8]), (3, 1, [10, 0, 10]),
                                             (4, 2, [10, 3, 3, 10]), (5, 2, [10, 3, 4, 4, 10])])
def test_dense_ends_leave_at_least_one_routed_block(L, ends, expected):
    """A stack too short for its dense ends routes its middle (or every block) instead of none: the default
    dense_ends=1 on a 2-block stack keeps the nested routing's work, spread over both blocks. Where the budget
    pays for fewer dense blocks than asked (5 blocks, 31 rows: not 4 dense blocks of 10), fewer are dense."""
    n = 10
    nested = block_counts(n, L, [L, (3 * L + 3) // 4, L // 2 or 1, 1])
    assert per_block_counts(n, L, nested, dense_ends=ends) == expected
    assert sum(expected) == sum(nested)


def test_dense_ends_never_overspend_a_small_budget():
    """The probe's case: 2 buckets at depths (0.5, 0.25) on 4 blocks, 48 valid tokens: nested routes 72 rows;
    one dense block at each end would take 96. No end is dense, and the 4 blocks share the 72."""
    nested = block_counts(48, 4, target_depths(4, 2, (0.5, 0.25)))
    assert sum(nested) == 72
    assert per_block_counts(48, 4, nested, dense_ends=1) == [18, 18, 18, 18]


def test_per_block_counts_total_equals_the_nested_total_property():
    """Over many stacks, bucket depths, curricula, token counts and dense ends: the per-block total is the nested
    total, every block in [0, n], the dense ends the most that fit (asked for, at most (L - 1) // 2, paid for
    by the total), the middle even to one row."""
    g = torch.Generator().manual_seed(27)

    def draw(high):  # an integer in [0, high)
        return int(torch.randint(0, high, (), generator=g))

    cut = 0
    for _ in range(3000):
        L, K, n, asked = 1 + draw(24), 1 + draw(8), draw(300), draw(5)
        depths = None
        if draw(2):
            depths = sorted({0.05 + 0.95 * float(torch.rand((), generator=g)) for _ in range(K)}, reverse=True)
            K = len(depths)
        progress = float(torch.rand((), generator=g)) if draw(2) else 1.0
        nested = block_counts(n, L, curriculum_depths(target_depths(L, K, depths), L, progress))
        counts = per_block_counts(n, L, nested, dense_ends=asked)
        case = (L, K, depths, n, asked, progress, counts)
        assert len(counts) == L and all(0 <= c <= n for c in counts), case
        assert sum(counts) == sum(nested), case
        e = 0
        while e < min(asked, (L - 1) // 2) and 2 * (e + 1) * n <= sum(nested):
            e += 1
        if n:
            assert counts[:e] == [n] * e and counts[L - e:] == [n] * e, case
            middle = counts[e:L - e]
            assert max(middle) - min(middle) <= 1, case
        cut += n > 0 and e < min(asked, (L - 1) // 2)  # the budget paid for fewer dense ends than asked
    assert cut > 100  # small budgets were among the cases drawn


def test_per_block_counts_from_fractions():
    assert per_block_counts(10, 3, [], fractions=(1.0, 0.25, 0.0)) == [10, 3, 0]


def test_backward_before_the_routing_is_decided_is_a_clear_error():
    r = Routing(num_layers=2)
    with pytest.raises(RuntimeError, match="before the routing of its forward was decided"):
        r.active_count(0)
    with pytest.raises(ValueError, match="2 counts for 3 blocks"):
        Routing(num_layers=3).decide(torch.zeros(3, dtype=torch.long), counts=[1, 2])
    with pytest.raises(ValueError, match="1 block_rows for 3 blocks"):
        Routing(num_layers=3).decide(torch.zeros(3, dtype=torch.long), block_rows=[torch.arange(2)])


def test_each_stage_writes_its_part_through_one_method():
    """Forward start: the constructor; during the forward: record_compacted; forward end: decide, once; the
    parts are read-only, the metrics a copy."""
    r = Routing(num_layers=3, inactive="skip")
    assert not r.ready and r.compact_blocks == frozenset() and r.depth is None
    r.record_compacted(1)
    assert r.compact_blocks == {1} and r.took_compacted(1) and not r.took_compacted(0)
    depth = torch.tensor([[3, 1, 0, 2]])
    metrics = {"valid_tokens": torch.tensor(3)}
    assert r.decide(depth, metrics=metrics) is r and r.ready and r.depth is depth
    with pytest.raises(RuntimeError, match="decided once"):
        r.decide(depth)
    for part in ("depth", "block_active", "branch_weight", "backward_draws", "probe", "metrics", "compact_blocks"):
        with pytest.raises(AttributeError):
            setattr(r, part, None)
    r.metrics["valid_tokens"] = torch.tensor(0)
    assert int(r.metrics["valid_tokens"]) == 3
