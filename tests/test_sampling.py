"""Fixed-size sampling schemes (cggr/sampling.py): exact inclusion probabilities against iterative capping, every
draw against its slow reference on the same random numbers, exact sizes, inclusion frequencies by counting,
Horvitz-Thompson unbiasedness by Monte Carlo (all repetitions in one batched call), the variance bookkeeping,
and a draw path with no host synchronisation."""

import ast
import inspect
import math
import time

import pytest
import torch

from cggr import sampling as S

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
DRAWS = {"systematic": (S.systematic, S.systematic_reference), "priority": (S.priority, S.priority_reference)}


def _importance(N, seed, dtype=torch.float32, zeros=0.0, ties=False):
    """Heavy-tailed importance (so that pi-ps caps rows), optionally with zero rows and ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, generator=g) ** 4 * torch.exp(2 * torch.randn(N, generator=g))
    if ties:
        x = (x * 4).round() / 4
    if zeros:
        x = torch.where(torch.rand(N, generator=g) < zeros, 0.0, x)
    return x.to(dtype)


def _valid(N, seed, p=0.2, L=None):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.rand((N,) if L is None else (L, N), generator=g) > p


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# Inclusion probabilities


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,seed", [(1, 3), (7, 41), (37, 905), (101, 77), (333, 12345)])
@pytest.mark.parametrize("ties,zeros", [(False, 0.0), (True, 0.3)])
def test_inclusion_probabilities_equal_iterative_capping(N, seed, dtype, ties, zeros):
    imp = _importance(N, seed, dtype, zeros=zeros, ties=ties)
    valid = _valid(N, seed)
    n = int(valid.sum())
    ks = sorted({0, 1, n // 3, n // 2, max(n - 1, 0), n, n + 2})
    pi = S.inclusion_probabilities(imp, valid, ks)  # one call, a block per k
    ref = S.inclusion_probabilities_reference(imp, valid, ks)
    assert pi.shape == (len(ks), N) and pi.dtype == torch.float64
    torch.testing.assert_close(pi, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pi.sum(1), torch.tensor([float(min(k, n)) for k in ks], dtype=torch.float64))
    assert (pi >= 0).all() and (pi <= 1).all() and (pi[:, ~valid] == 0).all()
    # Unbatched call, one k: the same row of probabilities.
    torch.testing.assert_close(S.inclusion_probabilities(imp, valid, ks[-2]), pi[-2])
    # Ties get equal probabilities.
    g = imp.double()
    for a in range(N):
        same = valid & valid[a] & (g == g[a])
        assert (pi[:, same] == pi[:, a:a + 1]).all()


def test_capping_is_exercised_and_exact():
    g = torch.tensor([100.0, 50.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    valid = torch.ones(7, dtype=torch.bool)
    pi = S.inclusion_probabilities(g, valid, 3)
    # Two rows capped; the remaining k - 2 = 1 shared in proportion to 4.5.
    expected = torch.tensor([1, 1, 1 / 4.5, 1 / 4.5, 1 / 4.5, 1 / 4.5, 0.5 / 4.5], dtype=torch.float64)
    torch.testing.assert_close(pi, expected)


def test_inclusion_probability_edge_cases():
    valid = torch.tensor([True, True, False, True, True, True])
    zero = torch.zeros(6)
    # All-zero importance: uniform over the 5 valid rows.
    torch.testing.assert_close(S.inclusion_probabilities(zero, valid, 2), torch.where(valid, 0.4, 0.0).double())
    # k = 0 and k >= n_valid.
    g = torch.tensor([3.0, 1.0, 9.0, 0.5, 2.0, 0.0])
    assert (S.inclusion_probabilities(g, valid, 0) == 0).all()
    assert torch.equal(S.inclusion_probabilities(g, valid, 5), valid.double())
    assert torch.equal(S.inclusion_probabilities(g, valid, 9), valid.double())
    # Fewer positive rows than k: the positive ones are certain, the zero rows share the rest equally ...
    g2 = torch.tensor([3.0, 0.0, 9.0, 0.0, 2.0, 0.0])
    pi = S.inclusion_probabilities(g2, valid, 3)
    third = 1 / 3  # rows 0 and 4 are the valid positive ones (row 2 is invalid): 3 - 2 over three zero rows
    torch.testing.assert_close(pi, torch.tensor([1, third, 0, third, 1, third], dtype=torch.float64))
    # ... which is the limit of mixing with a vanishing alpha.
    torch.testing.assert_close(S.inclusion_probabilities(S.mixed_importance(g2, valid, 1e-12), valid, 3), pi)
    # Zero rows are unreachable when the positive ones suffice.
    assert S.inclusion_probabilities(g2, valid, 1)[[1, 3, 5]].eq(0).all()
    # No valid row at all.
    assert (S.inclusion_probabilities(g, torch.zeros(6, dtype=torch.bool), 2) == 0).all()


def test_nonfinite_and_negative_importance():
    valid = torch.tensor([True, True, True, True, False])
    g = torch.tensor([1.0, float("nan"), 4.0, -2.0, float("inf")])
    # nan counts as the largest finite valid importance (4), the negative one as 0; the invalid inf is ignored.
    as_if = torch.tensor([1.0, 4.0, 4.0, 0.0, 0.0])
    for k in (1, 2, 3):
        torch.testing.assert_close(S.inclusion_probabilities(g, valid, k), S.inclusion_probabilities(as_if, valid, k))
    # Only non-finite values: uniform.
    nan = torch.full((5,), float("nan"))
    torch.testing.assert_close(S.inclusion_probabilities(nan, valid, 2), torch.where(valid, 0.5, 0.0).double())


def test_mixed_importance():
    valid = torch.tensor([[True, True, False, True], [True, False, False, True]])
    g = torch.tensor([2.0, 0.0, 100.0, 4.0])
    mixed = S.mixed_importance(g, valid, 0.5)
    torch.testing.assert_close(mixed, torch.tensor([[3.0, 1.0, 0.0, 5.0], [3.5, 0.0, 0.0, 5.5]], dtype=torch.float64))
    assert torch.equal(S.mixed_importance(g, valid, math.inf), valid.double())
    assert torch.equal(S.mixed_importance(torch.zeros(4), valid, 1.0), valid.double())
    torch.testing.assert_close(S.mixed_importance(g, valid, 0.0), torch.where(valid, g, 0.0).double())
    # Mixed, every valid row is reachable and no weight exceeds (1 + 1/alpha) n/k.
    imp, v = _importance(201, 8, zeros=0.5), _valid(201, 8)
    n, k, alpha = int(v.sum()), 20, 0.25
    pi = S.inclusion_probabilities(S.mixed_importance(imp, v, alpha), v, k)
    assert (pi[v] > 0).all() and (1 / pi[v]).max() <= (1 + 1 / alpha) * n / k + 1e-9
    for bad in (-1.0, float("nan"), torch.tensor(1.0), True):
        with pytest.raises(ValueError, match="alpha"):
            S.mixed_importance(g, valid, bad)


# ----------------------------------------------------------------------------------------------------------
# Draws against their references, exact sizes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,L,seed", [(1, 1, 5), (13, 3, 2718), (64, 4, 99), (117, 5, 31337)])
@pytest.mark.parametrize("scheme", ["uniform", "systematic", "priority"])
def test_draw_equals_reference(scheme, N, L, seed, dtype):
    valid = _valid(N, seed, L=L)
    valid[0] = _valid(N, seed + 7)
    imp = torch.stack([_importance(N, seed + b, dtype, zeros=0.3 * (b % 2), ties=b == 2) for b in range(L)])
    n = valid.sum(1).tolist()
    ks = [min(n[b], [0, 1, n[b] // 2, n[b] - 1, n[b]][b % 5]) for b in range(L)]
    ks = [max(k, 0) for k in ks]
    if scheme == "uniform":
        fast, ref = S.uniform(valid, ks, _gen(seed)), S.uniform_reference(valid, ks, _gen(seed))
    else:
        fn, slow = DRAWS[scheme]
        fast, ref = fn(imp, valid, ks, _gen(seed)), slow(imp, valid, ks, _gen(seed))
    assert torch.equal(fast.mask, ref.mask)
    torch.testing.assert_close(fast.weight, ref.weight, rtol=1e-6, atol=0)
    assert fast.mask.sum(1).tolist() == ks and [r.numel() for r in fast.rows] == ks
    for b in range(L):
        assert sorted(fast.rows[b].tolist()) == sorted(ref.rows[b].tolist()) == fast.mask[b].nonzero().view(-1).tolist()
    assert not (fast.mask & ~valid).any()
    assert (fast.weight[fast.mask] >= 1).all() and (fast.weight[~fast.mask] == 0).all()
    for b, w in enumerate(fast.row_weights()):
        assert torch.equal(w, fast.weight[b, fast.rows[b]])


@pytest.mark.parametrize("scheme", ["uniform", "systematic", "priority"])
@pytest.mark.parametrize("N,seed", [(29, 606), (257, 4242)])
def test_exact_size_never_invalid(scheme, N, seed):
    R = 500
    valid = _valid(N, seed, p=0.4)
    n = int(valid.sum())
    imp = _importance(N, seed, zeros=0.3)
    for k in (1, n // 3, n - 1, n):
        d = S.draw(scheme, imp, valid, [k] * R, alpha=0.0, generator=_gen(seed + k))
        assert (d.mask.sum(1) == k).all() and not (d.mask & ~valid).any()
        assert all(r.numel() == k for r in d.rows) and all(valid[r].all() for r in d.rows)
    # k larger than the valid rows: every valid row, never an invalid one.
    d = S.draw(scheme, imp, valid, n + 3, alpha=1.0, generator=_gen(seed))
    assert torch.equal(d.mask[0], valid) and (d.weight[0][valid] == 1).all()


def test_draw_dispatch():
    imp, valid = _importance(51, 3), _valid(51, 3)
    d = S.draw("systematic", imp, valid, 9, alpha=0.5, generator=_gen(1))
    e = S.systematic(S.mixed_importance(imp, valid, 0.5), valid, 9, _gen(1))
    assert torch.equal(d.mask, e.mask) and torch.equal(d.weight, e.weight)
    d = S.draw("priority", imp, valid, 9, alpha=0.5, generator=_gen(1))
    e = S.priority(S.mixed_importance(imp, valid, 0.5), valid, 9, _gen(1))
    assert torch.equal(d.mask, e.mask) and torch.equal(d.weight, e.weight)
    d = S.draw("uniform", None, valid, 9, generator=_gen(1))
    assert torch.equal(d.mask, S.uniform(valid, 9, _gen(1)).mask)
    assert torch.equal(d.weight[d.mask], torch.full((9,), int(valid.sum()) / 9))


# ----------------------------------------------------------------------------------------------------------
# Monte Carlo: inclusion frequencies by counting, unbiasedness (R repetitions in one batched call)


def _repeat(scheme, imp, valid, k, R, seed, alpha):
    return S.draw(scheme, imp, valid, [k] * R, alpha=alpha, generator=_gen(seed))


@pytest.mark.parametrize("scheme", ["uniform", "systematic"])
@pytest.mark.parametrize("N,k,alpha,seed", [(37, 6, 0.0, 1009), (23, 11, 0.3, 5150), (64, 40, 0.0, 777)])
def test_inclusion_frequencies_by_counting(scheme, N, k, alpha, seed):
    R = 4000
    imp, valid = _importance(N, seed, zeros=0.2), _valid(N, seed)
    d = _repeat(scheme, imp, valid, k, R, seed, alpha)
    if scheme == "uniform":
        pi = torch.where(valid, k / valid.sum(), 0.0).double()
    else:
        pi = S.inclusion_probabilities(S.mixed_importance(imp, valid, alpha), valid, k)
        assert (pi == 1).any() and (pi[valid] < 1).any()  # capped and uncapped rows both counted
    freq = d.mask.double().mean(0)
    bound = 5 * (pi * (1 - pi) / R).sqrt() + 1.0 / R  # 5 binomial standard deviations
    assert ((freq - pi).abs() <= bound).all(), (freq - pi).abs().max()
    assert (freq[pi == 0] == 0).all() and (freq[pi == 1] == 1).all()


@pytest.mark.parametrize("scheme", ["uniform", "systematic", "priority"])
@pytest.mark.parametrize("N,k,alpha,zeros,seed", [(41, 7, 1.0, 0.0, 314), (30, 5, 0.2, 0.4, 2718),
                                                  (19, 15, 0.0, 0.0, 1618), (25, 12, 0.0, 0.6, 4669)])
def test_horvitz_thompson_unbiased(scheme, N, k, alpha, zeros, seed):
    """E[sum_t weight_t f_t] = sum_t f_t for random f; and row by row E[weight_t] = 1 (every f at once).
    The last case has fewer positive rows than k without mixing (priority's zero tier)."""
    R = 6000
    imp, valid = _importance(N, seed, zeros=zeros), _valid(N, seed)
    d = _repeat(scheme, imp, valid, k, R, seed, alpha)
    w = d.weight.double()
    reach = S.inclusion_probabilities(S.mixed_importance(imp, valid, alpha), valid, k) > 0
    if scheme == "uniform":
        reach = valid
    f = torch.randn(N, generator=_gen(seed + 1), dtype=torch.float64) * 3 + 1
    f = torch.where(reach, f, 0.0)  # unreachable rows (pi = 0, no mixing) cannot be estimated
    estimates = (w * f).sum(1)
    se = estimates.std() / math.sqrt(R)
    assert abs(estimates.mean() - f.sum()) <= 5 * se + 1e-9, (estimates.mean(), f.sum(), se)
    row_mean, row_se = w.mean(0), w.std(0) / math.sqrt(R)
    assert ((row_mean - 1).abs()[reach] <= 5 * row_se[reach] + 1e-9).all()
    assert (w[:, ~reach] == 0).all()


def test_priority_weights_follow_the_threshold():
    """With equal importance, priority sampling is a uniform draw whose kept rows all weigh tau/g = 1/u*."""
    valid = torch.ones(10, dtype=torch.bool)
    d = S.priority(torch.ones(10), valid, [3] * 200, _gen(9))
    w = d.weight[d.mask].view(200, 3)
    assert (w == w[:, :1]).all() and (w >= 1).all()


# ----------------------------------------------------------------------------------------------------------
# Variance bookkeeping


def test_variance_ratio_is_the_poisson_variance():
    N, R, seed = 29, 20000, 2024
    g = _gen(seed)
    x = torch.randn(N, 3, generator=g, dtype=torch.float64) * torch.rand(N, 1, generator=g, dtype=torch.float64)
    valid = torch.rand(N, generator=g) > 0.1
    x = torch.where(valid[:, None], x, 0.0)
    s = x.norm(dim=1)
    pi = S.inclusion_probabilities(S.mixed_importance(s, valid, 0.5), valid, 8)
    kept = torch.rand(R, N, generator=g, dtype=torch.float64) < pi  # Poisson sampling, independent rows
    estimate = torch.einsum("rn,nd->rd", kept / torch.where(valid, pi, 1.0), x)
    mc = (estimate - x.sum(0)).square().sum(1).mean() / s.square().sum()
    ratio = S.variance_ratio(s, pi, valid)
    assert ratio.shape == () and abs(mc / ratio - 1) < 0.1, (mc, ratio)
    # The fixed-size uniform draw's exact variance (the docstring's formula), and how it differs from Poisson.
    n, k = int(valid.sum()), 8
    d = S.uniform(valid, [k] * R, _gen(seed))
    estimate = d.weight.double() @ x
    mc = (estimate - x.sum(0)).square().sum(1).mean()
    spread = (x[valid] - x[valid].mean(0)).square().sum()
    assert abs(mc / ((n / k - 1) * n / (n - 1) * spread) - 1) < 0.1


def test_variance_ratio_edge_cases():
    s = torch.tensor([1.0, 2.0, 0.0])
    assert S.variance_ratio(s, torch.tensor([1.0, 1.0, 0.0])) == 0  # s = 0 where pi = 0: nothing lost
    assert S.variance_ratio(s, torch.tensor([1.0, 0.0, 1.0])) == math.inf
    assert S.variance_ratio(torch.zeros(3), torch.full((3,), 0.5)) == 0
    torch.testing.assert_close(S.variance_ratio(s, torch.tensor([0.5, 0.25, 1.0])), torch.tensor((1 + 3 * 4) / 5.0,
                                                                                                   dtype=torch.float64))
    # Batched, with valid rows: the invalid row's size is ignored.
    v = torch.tensor([[True, True, False], [True, False, True]])
    r = S.variance_ratio(torch.tensor([1.0, 1.0, 9.0]), torch.full((2, 3), 0.5), v)
    torch.testing.assert_close(r, torch.tensor([1.0, 1.0], dtype=torch.float64))


def _ratio_reference(s, pi, ok):
    total = sum(x * x for x, o in zip(s, ok) if o)
    added = sum((1 / p - 1) * x * x if p > 0 else math.inf for x, p, o in zip(s, pi, ok) if o and x > 0)
    return added / total if total > 0 else 0.0


@pytest.mark.parametrize("N,seed", [(23, 8128), (61, 496)])
def test_smallest_k_for_budget_is_the_smallest(N, seed):
    L = 3
    valid = _valid(N, seed, L=L)
    sizes = torch.stack([_importance(N, seed + b, zeros=0.2 * b) for b in range(L)])
    for tau, alpha in ((0.0, 1.0), (0.025, 1.0), (0.3, 0.0), (2.0, 0.5), (1e9, 1.0)):
        got = S.smallest_k_for_budget(sizes, valid, tau, alpha)
        mixed = S.mixed_importance(sizes, valid, alpha)
        for b in range(L):
            n, ok = int(valid[b].sum()), valid[b].tolist()
            ratios = [_ratio_reference(sizes[b].double().tolist(),
                                       S.inclusion_probabilities_reference(mixed[b], valid[b], k).tolist(), ok)
                      for k in range(n + 1)]
            assert all(a >= b_ - 1e-12 for a, b_ in zip(ratios, ratios[1:]))  # the ratio falls with k
            assert got[b] == next(k for k, r in enumerate(ratios) if r <= tau), (tau, alpha, b, ratios)
    # A design drawn by another importance (importance="loss" budgets the block's own gradient norms, drawn by
    # the loss's) and the uniform one (alpha = inf: n/k - 1 <= tau).
    other = _importance(N, seed + 99, zeros=0.1)
    for tau, alpha in ((0.025, 1.0), (0.5, 0.0), (0.3, math.inf)):
        got = S.smallest_k_for_budget(sizes, valid, tau, alpha, importance=other)
        mixed = S.mixed_importance(other.expand(L, N), valid, alpha)
        for b in range(L):
            n, ok = int(valid[b].sum()), valid[b].tolist()
            ratios = [_ratio_reference(sizes[b].double().tolist(),
                                       S.inclusion_probabilities_reference(mixed[b], valid[b], k).tolist(), ok)
                      for k in range(n + 1)]
            assert got[b] == next(k for k, r in enumerate(ratios) if r <= tau), (tau, alpha, b)
            if math.isinf(alpha) and (sizes[b] * valid[b]).abs().sum() > 0:
                assert got[b] == math.ceil(n / (1 + tau) - 1e-9)
    single = S.smallest_k_for_budget(sizes[0], valid[0], 0.1, 1.0)
    assert isinstance(single, int) and single == S.smallest_k_for_budget(sizes, valid, 0.1, 1.0)[0]
    with pytest.raises(ValueError, match="tau"):
        S.smallest_k_for_budget(sizes, valid, -0.1, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Arguments, structure, speed


def test_argument_errors():
    imp, valid = torch.rand(8), torch.ones(8, dtype=torch.bool)
    with pytest.raises(ValueError, match="non-negative host ints"):
        S.systematic(imp, valid, -1)
    with pytest.raises(ValueError, match="non-negative host ints"):
        S.priority(imp, valid, [2, 1.5])
    with pytest.raises(TypeError, match="k must be a host int"):
        S.uniform(valid, torch.tensor(3))
    with pytest.raises(ValueError, match="number of blocks"):
        S.systematic(torch.rand(3, 8), valid, [1, 2])
    with pytest.raises(TypeError, match="valid must be a bool tensor"):
        S.inclusion_probabilities(imp, valid.float(), 2)
    with pytest.raises(ValueError, match="rows"):
        S.inclusion_probabilities(imp, torch.ones(9, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="scheme must be one of"):
        S.draw("sampford", imp, valid, 2)
    with pytest.raises(ValueError, match="needs an importance"):
        S.draw("priority", None, valid, 2)


# Functions that run on the draw path (and everything of the module they call): no host synchronisation.
DRAW_PATH = ["inclusion_probabilities", "mixed_importance", "uniform", "systematic", "priority", "draw",
             "variance_ratio", "Draw"]
SYNCING_METHODS = {"item", "tolist", "cpu", "numpy", "synchronize", "nonzero", "any", "all", "equal", "allclose"}
CASTS = {"int", "float", "bool"}


def test_no_host_synchronisation_in_the_draw_path():
    """On the CPU a synchronisation cannot be observed, so the structure is checked: no reading of a device
    value on the host (``.item()``, ``.tolist()``, ``int(...)``, a data-dependent shape such as ``nonzero``,
    a tensor made from host values straight onto a device) in any function the draw path reaches."""
    tree = ast.parse(inspect.getsource(S))
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    reached, todo = set(), list(DRAW_PATH)
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        todo += [n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name) and n.id in defs]
    assert "smallest_k_for_budget" not in reached and not any(r.endswith("_reference") for r in reached)
    assert {"_pips", "_keep_top", "_on_device", "_sanitized"} <= reached
    offences = []
    for name in reached:
        for node in ast.walk(defs[name]):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in SYNCING_METHODS:
                offences.append(f"{name}: .{f.attr}()")
            if isinstance(f, ast.Name) and f.id in CASTS:
                offences.append(f"{name}: {f.id}()")
            if isinstance(f, ast.Attribute) and f.attr == "tensor" and any(k.arg == "device" for k in node.keywords):
                offences.append(f"{name}: torch.tensor(..., device=...)")
            if isinstance(f, ast.Attribute) and f.attr == "to" and any(
                    k.arg == "non_blocking" for k in node.keywords) and "pin_memory" not in ast.unparse(f):
                offences.append(f"{name}: a non-blocking copy from memory that is not pinned")
        # Python conditions only on host values: no tensor method calls in if/while/assert/ternary tests.
        for node in ast.walk(defs[name]):
            if isinstance(node, (ast.If, ast.While, ast.Assert, ast.IfExp)):
                for call in ast.walk(node.test):
                    if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
                        owner = ast.unparse(call.func.value)
                        if owner != "math" and call.func.attr != "dim":
                            offences.append(f"{name}: a condition calls {ast.unparse(call.func)}")
    assert not offences, offences


@pytest.mark.parametrize("scheme", ["uniform", "systematic", "priority"])
def test_speed_on_cpu(scheme):
    L, N = 16, 16384
    imp, valid = torch.rand(L, N), torch.rand(L, N) > 0.1
    ks = [N // 4 + 37 * b for b in range(L)]
    S.draw(scheme, imp, valid, ks, generator=_gen(0))  # warm-up
    best = math.inf
    for seed in range(3):
        start = time.perf_counter()
        d = S.draw(scheme, imp, valid, ks, generator=_gen(seed))
        best = min(best, time.perf_counter() - start)
    assert d.mask.sum(1).tolist() == ks
    assert best < 1.0, f"{scheme}: a [16, 16384] draw took {best:.3f} s"
