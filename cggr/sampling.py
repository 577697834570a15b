"""Fixed-size sampling of rows with known inclusion probabilities (docs/design.md §1.13).

Each block ``b`` of a batch keeps exactly ``k_b`` of its valid rows (tokens), drawn on the device with no host
synchronisation, and every kept row carries the weight that makes the weighted sum of the kept rows an
unbiased estimate of the sum over all valid rows (Horvitz-Thompson: ``w = 1/pi``). Three schemes:

* :func:`uniform`: exactly ``k`` of the ``n`` valid rows, every ``k``-subset equally likely; ``pi = k/n``.
* :func:`systematic`: systematic pi-ps sampling (random order, then a lattice of spacing 1 with a uniform
  offset laid over the cumulative ``pi``); the inclusion probabilities are exactly the ``pi`` of
  :func:`inclusion_probabilities`.
* :func:`priority`: priority sampling (Duffield, Lund, Thorup 2007); unbiased in a conditional sense, see there.

:func:`mixed_importance` mixes an importance with uniform (``g + alpha * mean(g)``) so that no weight explodes;
:func:`draw` is the one call a router needs (mix, then draw). :func:`variance_ratio` and
:func:`smallest_k_for_budget` are the bookkeeping of a variance-budget mode (VCAS-like): the only host
synchronisation of this module (outside the slow references) is at the end of :func:`smallest_k_for_budget`.

Shapes: rows are flat indices ``0..N-1`` along the last dimension. ``importance`` and ``valid`` are ``[N]``
(shared by every block) or ``[L, N]``; ``k`` is one host int or a host sequence of ``L`` ints. Draws always
return ``[L, N]`` tensors (``L = 1`` when neither input is batched). Every ``k_b`` must not exceed the number
of valid rows of its block (the planner knows that number on the host); a larger ``k_b`` keeps every valid
row and leaves ``Draw.rows[b]`` padded with rows that are not kept (their ``mask`` is False).

Conventions for the importance ``g`` (all schemes): rows with ``valid`` False are never kept and get
``pi = 0``; negative values count as 0; non-finite values (nan, +-inf) count as the largest finite importance
of the block's valid rows (1 where no valid row has a positive finite one): an unknown importance is treated
as the hardest, as non-finite logits are (docs/design.md §1.3). A block whose valid importance is all
zero is drawn uniformly.

Every draw has a slow reference (``*_reference``: Python loops over rows, one block at a time) that the tests
compare with, drawing the same random numbers from a generator seeded alike.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

SCHEMES = ("uniform", "systematic", "priority")
Scheme = Literal["uniform", "systematic", "priority"]

# Internal precision: every probability, cumulative sum and weight is computed in float64 (the tensors are
# [L, N] with N the rows of one step, so this costs little), so that sum(pi) = k holds to a relative ~1e-13
# and the systematic draw's interval ends are off by about ulp(k) (~2e-12 at k = 16384) at most.
_F64 = torch.float64


@dataclass
class Draw:
    """The rows one draw keeps, per block.

    Attributes:
        mask: ``[L, N]`` bool, the kept rows (never an invalid one).
        weight: ``[L, N]`` float32, the estimator weight of each kept row (``1/pi``, or priority sampling's
            ``max(1, tau/g)``), **0 on rows not kept**: ``(weight * f).sum(-1)`` is the block's estimate of
            ``f`` summed over its valid rows.
        rows: ``L`` int64 device tensors, block ``b``'s ``k_b`` kept flat row indices (no particular order).
    """

    mask: torch.Tensor
    weight: torch.Tensor
    rows: list[torch.Tensor]

    def row_weights(self) -> list[torch.Tensor]:
        """Each block's weights in the order of its ``rows`` (a gather, no synchronisation)."""
        return [self.weight[b].index_select(0, r) for b, r in enumerate(self.rows)]


# ---------------------------------------------------------------------------------------------------------
# Arguments


def _blocks(x: torch.Tensor, valid: torch.Tensor, k, *, name: str = "importance"):
    """``x`` and ``valid`` as ``[L, N]`` (broadcast views), the host list of ``L`` counts, and whether the
    caller's input was batched."""
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise TypeError(f"cggr.sampling: valid must be a bool tensor, got "
                        f"{getattr(valid, 'dtype', type(valid).__name__)}")
    if x.dim() not in (1, 2) or valid.dim() not in (1, 2):
        raise ValueError(f"cggr.sampling: {name} and valid must be [N] or [L, N], got {tuple(x.shape)} and "
                         f"{tuple(valid.shape)}")
    if x.shape[-1] != valid.shape[-1]:
        raise ValueError(f"cggr.sampling: {name} has {x.shape[-1]} rows but valid has {valid.shape[-1]}")
    if isinstance(k, Sequence) and not isinstance(k, str):
        counts = list(k)
    elif isinstance(k, numbers.Integral) and not isinstance(k, bool):
        counts = None
    else:
        raise TypeError(f"cggr.sampling: k must be a host int or a sequence of host ints, got {type(k).__name__}")
    batched = x.dim() == 2 or valid.dim() == 2 or counts is not None
    sizes = {t.shape[0] for t in (x, valid) if t.dim() == 2}
    if counts is not None:
        sizes.add(len(counts))
    if len(sizes) > 1:
        raise ValueError(f"cggr.sampling: the number of blocks differs between {name} {tuple(x.shape)}, "
                         f"valid {tuple(valid.shape)} and k (len {len(counts) if counts is not None else '-'})")
    L = sizes.pop() if sizes else 1
    if counts is None:
        counts = [k] * L
    for c in counts:
        if not isinstance(c, numbers.Integral) or isinstance(c, bool) or c < 0:
            raise ValueError(f"cggr.sampling: k must hold non-negative host ints (one per block), got {c!r}")
    N = x.shape[-1]
    return x.expand(L, N), valid.to(x.device).expand(L, N), counts, batched


def _on_device(counts: list, device: torch.device) -> torch.Tensor:
    """The host ints ``counts`` as a ``[L, 1]`` float64 tensor on ``device``, without a synchronisation (a copy
    from pinned memory queued behind the work already there; pageable memory would block the host)."""
    host = torch.tensor(counts, dtype=_F64).view(-1, 1)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _sanitized(importance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """float64 importance, >= 0, non-finite values replaced by the block's largest finite valid one (1 where
    there is none above 0), 0 on invalid rows."""
    g = importance.to(_F64)
    finite = torch.isfinite(g)
    g = torch.where(finite, g.clamp_min(0), 0.0)
    largest = torch.where(valid, g, 0.0).amax(-1, keepdim=True)
    g = torch.where(finite, g, torch.where(largest > 0, largest, 1.0))
    return torch.where(valid, g, 0.0)


def _check_alpha(alpha) -> None:
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or math.isnan(alpha) or alpha < 0:
        raise ValueError(f"cggr.sampling: alpha must be a host float >= 0 (math.inf for uniform), got {alpha!r}")


# ---------------------------------------------------------------------------------------------------------
# Importance and inclusion probabilities


def mixed_importance(importance: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """``g + alpha * mean(g)`` over each block's ``n`` valid rows (docs/design.md §1.13), so that no weight explodes:
    the mixed total is ``(1 + alpha) * n * mean(g)`` and capping only raises the uncapped rows' ``c``, so the
    pi-ps design of ``k`` rows gives every valid row ``pi >= min(1, alpha/(1 + alpha) * k/n)``: no weight
    ``1/pi`` exceeds ``max(1, (1 + 1/alpha) * n/k)`` (``alpha = 1``: twice the uniform weight).

    ``alpha = math.inf``, or a block whose valid importance is all zero, gives uniform importance (1 on valid
    rows). ``alpha = 0`` returns the sanitized importance (module docstring). float64, 0 on invalid rows, the
    shape of ``importance`` broadcast with ``valid``.
    """
    _check_alpha(alpha)
    g = _sanitized(importance, valid)
    ones = valid.to(_F64).expand_as(g)
    if math.isinf(alpha):
        return ones
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    mean = g.sum(-1, keepdim=True) / n
    return torch.where(mean > 0, g + alpha * mean * ones, ones)


def _sorted_design(g: torch.Tensor, valid: torch.Tensor):
    """What the pi-ps solution needs for any k: the valid importance sorted descending (invalid rows last, as
    0), its suffix sums ``rest[:, j] = sum_{i >= j} sorted[:, i]`` (``rest[:, N] = 0``), and the valid count."""
    ordered = torch.where(valid, g, -1.0).sort(dim=-1, descending=True).values.clamp_min(0)
    rest = F.pad(ordered.flip(-1).cumsum(-1).flip(-1), (0, 1))  # summed from the small end: accurate
    return ordered, rest, valid.sum(-1, keepdim=True).to(_F64)


def _pips(g: torch.Tensor, valid: torch.Tensor, design, k: torch.Tensor) -> torch.Tensor:
    """pi-ps inclusion probabilities of ``[L, N]`` importance ``g`` for the ``[L, 1]`` counts ``k``.

    With ``g`` sorted descending (``g_0 >= g_1 >= ...``) and ``m`` rows capped at 1, the rest get
    ``c * g_j`` with ``c = (k - m) / rest_m``. Row ``j`` is capped exactly when ``f(j) = g_j (k - j) - rest_j``
    is positive for it and every row before it: ``f(j) <= 0`` implies ``f(j+1) <= (k-j-1)(g_{j+1} - g_j) <= 0``
    (f changes sign once), ``f(k-1) = -rest_k <= 0`` (so ``m < k``), a capped row has ``c g_j > 1`` and an
    uncapped one ``c g_j <= 1``, so ``pi = min(1, c g)`` row by row, and tied rows never straddle the cap. This
    is the fixed point of iterative capping (:func:`inclusion_probabilities_reference`), in O(N log N) with no
    loop. When the positive rows run out (``rest_m = 0``: fewer than ``k`` rows have ``g > 0``) they all get 1
    and the zero rows share the remaining ``k - m`` equally: the limit ``alpha -> 0+`` of mixing.
    """
    ordered, rest, n = design
    N = g.shape[-1]
    j = torch.arange(N, device=g.device, dtype=_F64)
    capped = (ordered * (k - j) - rest[:, :N] > 0) & (j < k) & (j < n)
    m = capped.long().cumprod(-1).sum(-1, keepdim=True)  # the leading run (exact arithmetic: all of them)
    remaining = rest.gather(-1, m)
    m = m.to(_F64)
    left = k - m
    scaled = torch.clamp(g * (left / torch.where(remaining > 0, remaining, 1.0)), max=1.0)
    zero_share = left / (n - m).clamp_min(1)
    pi = torch.where(remaining > 0, scaled, torch.where(g > 0, 1.0, zero_share))
    pi = torch.where(k >= n, 1.0, pi)
    return torch.where(valid, pi, 0.0)


def inclusion_probabilities(importance: torch.Tensor, valid: torch.Tensor, k) -> torch.Tensor:
    """The pi-ps inclusion probabilities of a fixed-size design of ``k`` rows per block.

    ``pi_t = min(1, c * g_t)`` on valid rows with ``c`` such that ``sum(pi) = k`` (rows whose ``c * g_t``
    would exceed 1 are capped at 1 and ``c`` re-solved for the rest), 0 on invalid rows. Exact, by a sort
    (see :func:`_pips`), batched over blocks, no host synchronisation. Edge cases: ``k = 0`` gives 0;
    ``k >= n_valid`` gives 1 on every valid row; all-zero importance gives ``k/n_valid`` (uniform); fewer than
    ``k`` rows with ``g > 0``: those get 1 and the zero rows share the rest equally (rows with ``g = 0`` are
    otherwise unreachable: mix first, :func:`mixed_importance`); tied importances get equal ``pi``. Importance
    conventions (invalid, negative, non-finite) in the module docstring.

    Returns:
        float64, ``[L, N]`` when ``importance`` or ``valid`` is 2-D or ``k`` a sequence, else ``[N]``.
    """
    x, valid2, counts, batched = _blocks(importance, valid, k)
    g = _sanitized(x, valid2)
    pi = _pips(g, valid2, _sorted_design(g, valid2), _on_device(counts, g.device))
    return pi if batched else pi[0]


# ---------------------------------------------------------------------------------------------------------
# Draws: random numbers (shared with the references) -> a key per row -> each block's top k_b keys


def _rand(shape, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device, dtype=_F64)


def _uniform_noise(L: int, N: int, generator, device) -> torch.Tensor:
    """One key per row, in [0, 1)."""
    return _rand((L, N), generator, device)


def _systematic_noise(L: int, N: int, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys whose ascending order is each block's random row order, and each block's lattice offset in [0, 1)."""
    return _rand((L, N), generator, device), _rand((L, 1), generator, device)


def _priority_noise(L: int, N: int, generator, device) -> torch.Tensor:
    """One uniform number per row in (0, 1] (priorities divide by it)."""
    return 1.0 - _rand((L, N), generator, device)


def _keep_top(key: torch.Tensor, valid: torch.Tensor, counts: list, k: torch.Tensor):
    """Each block keeps its ``k_b`` largest keys (invalid rows carry keys below every valid one). Returns the
    mask, the rows, and the keys sorted descending."""
    L, N = key.shape
    ordered, order = key.sort(dim=-1, descending=True)
    position = torch.empty_like(order).scatter_(-1, order, torch.arange(N, device=key.device).expand(L, N))
    mask = (position < k) & valid
    return mask, [order[b, :c] for b, c in enumerate(counts)], ordered


def uniform(valid: torch.Tensor, k, generator: torch.Generator | None = None) -> Draw:
    """Exactly ``k_b`` of block ``b``'s ``n_b`` valid rows, every subset of that size equally likely (the keys
    are i.i.d. uniform; the top ``k_b`` of them are kept). ``pi = k_b / n_b``, weight ``n_b / k_b``.

    This is today's per-block placement draw (:meth:`cggr.plan.Planner._place_per_block`) with weights.
    """
    _, valid2, counts, _ = _blocks(valid, valid, k, name="valid")
    L, N = valid2.shape
    return _uniform_from_noise(valid2, counts, _uniform_noise(L, N, generator, valid2.device))


def _uniform_from_noise(valid: torch.Tensor, counts: list, noise: torch.Tensor) -> Draw:
    k = _on_device(counts, valid.device)
    mask, rows, _ = _keep_top(torch.where(valid, noise, -1.0), valid, counts, k)
    n = valid.sum(-1, keepdim=True).to(_F64)
    weight = torch.where(mask, n / torch.minimum(k, n).clamp_min(1), 0.0)  # k >= n: every row, weight 1
    return Draw(mask, weight.float(), rows)


def systematic(importance: torch.Tensor, valid: torch.Tensor, k, generator: torch.Generator | None = None
               ) -> Draw:
    """Systematic pi-ps sampling: exactly ``k_b`` rows per block, row ``t`` kept with probability exactly
    ``pi_t`` of :func:`inclusion_probabilities`, weight ``1/pi_t``.

    The block's rows are put in a random order; each row owns an interval of length ``pi_t`` of ``[0, k)``
    (the cumulative ``pi`` in that order); the lattice ``u, u+1, ..., u+k-1`` with ``u ~ U[0, 1)`` keeps the rows
    whose interval holds a point. An interval of length ``pi_t <= 1`` holds at most one point, with
    probability ``pi_t`` whatever the order, so the first-order inclusion probabilities are exact for any
    order; the random order only spreads the second-order ones (rows adjacent in a fixed order would be
    dependent). Exactly ``k`` points lie in ``[0, k)``. In float64 the cumulative sums are off by about
    ``ulp(k)``: the inclusion probabilities are exact to that, and a capped row's interval can hold two points
    (or the last point fall past the end) with a probability of that order per row; the selection is then
    repaired to exactly ``k`` distinct valid rows (the unselected row of largest ``pi`` fills the gap), so the
    size is exact by construction.
    """
    x, valid2, counts, _ = _blocks(importance, valid, k)
    L, N = x.shape
    return _systematic_from_noise(x, valid2, counts, *_systematic_noise(L, N, generator, x.device))


def _systematic_from_noise(importance, valid, counts, order_keys, offset) -> Draw:
    g = _sanitized(importance, valid)
    k = _on_device(counts, g.device)
    pi = _pips(g, valid, _sorted_design(g, valid), k)
    order = order_keys.argsort(dim=-1)
    cum = pi.gather(-1, order).cumsum(-1)
    total = cum[:, -1:]
    cum = cum * torch.where(total > 0, k / torch.where(total > 0, total, 1.0), 0.0)  # ends at k exactly
    before = F.pad(cum[:, :-1], (1, 0))
    # Lattice points u + j (j = 0, 1, ...) in [before, cum): ceil(cum - u) - ceil(before - u).
    hits = torch.ceil(cum - offset) - torch.ceil(before - offset)
    hit = torch.zeros_like(pi).scatter_(-1, order, hits.clamp(0, 1))
    eligible = valid & (pi > 0)
    mask, rows, _ = _keep_top(torch.where(eligible, 2.0 * hit + pi, -1.0), eligible, counts, k)
    weight = torch.where(mask, 1.0 / torch.where(mask, pi, 1.0), 0.0)
    return Draw(mask, weight.float(), rows)


def priority(importance: torch.Tensor, valid: torch.Tensor, k, generator: torch.Generator | None = None
             ) -> Draw:
    """Priority sampling (Duffield, Lund, Thorup 2007): row ``t`` gets the priority ``q_t = g_t / u_t`` with
    ``u_t ~ U(0, 1]`` i.i.d.; each block keeps its ``k_b`` largest priorities; with ``tau`` the ``(k_b+1)``-th
    largest priority, a kept row's weight is ``max(1, tau / g_t)``.

    In which sense it is unbiased: fix row ``t`` and the other rows' ``u``; let ``tau'_t`` be the ``k``-th
    largest priority among the others. Row ``t`` is kept iff ``g_t / u_t > tau'_t``, i.e. with conditional
    probability ``min(1, g_t / tau'_t)``, and when it is kept ``tau'_t = tau``, so its weight is exactly
    ``1 / P(kept | the others)``. Hence ``E[weight_t * kept_t] = 1`` for every row with ``g_t > 0``, and
    ``sum_kept weight_t f_t`` is an unbiased estimate of ``sum_t f_t`` for any ``f`` fixed before the draw
    (DLT also show the per-row terms are uncorrelated). The unconditional inclusion probability
    ``E[min(1, g_t / tau'_t)]`` has no closed form and is not ``pi`` of :func:`inclusion_probabilities`; the
    weight is not ``1/`` it. The draw is not a pi-ps design: it is close to one for large ``n``.

    Rows with ``g_t = 0`` come after every positive one, in random order (the limit ``alpha -> 0+`` of
    mixing): when fewer than ``k_b + 1`` rows are positive, the positive ones are kept with weight 1 and the
    zero rows are priority-sampled among themselves as if of equal importance (weight ``1/u*``, ``u*`` the
    ``(k_b+1)``-th smallest ``u`` among them); otherwise zero rows are never kept (mix first). A block whose
    valid importance is all zero is therefore a uniform draw. With ``k_b >= n_valid`` every valid row is kept
    with weight 1.
    """
    x, valid2, counts, _ = _blocks(importance, valid, k)
    L, N = x.shape
    return _priority_from_noise(x, valid2, counts, _priority_noise(L, N, generator, x.device))


def _priority_from_noise(importance, valid, counts, u) -> Draw:
    g = _sanitized(importance, valid)
    k = _on_device(counts, g.device)
    positive = g > 0
    # Positive rows by g/u in (0, inf); zero rows after them by -u in [-1, 0); invalid rows at -2.
    key = torch.where(valid, torch.where(positive, g / u, -u), -2.0)
    mask, rows, ordered = _keep_top(key, valid, counts, k)
    threshold = F.pad(ordered, (0, 1), value=-2.0).gather(-1, k.long().clamp_max(ordered.shape[-1]))
    positive_weight = torch.clamp(threshold.clamp_min(0) / torch.where(positive, g, 1.0), min=1.0)
    zero_tier = (threshold < 0) & (threshold >= -1)  # the (k+1)-th row is a zero row: its u is -threshold
    zero_weight = torch.where(zero_tier, 1.0 / torch.where(zero_tier, -threshold, 1.0), 1.0)
    weight = torch.where(mask, torch.where(positive, positive_weight, zero_weight), 0.0)
    return Draw(mask, weight.float(), rows)


def draw(scheme: Scheme, importance: torch.Tensor | None, valid: torch.Tensor, k, *, alpha: float = 1.0,
         generator: torch.Generator | None = None) -> Draw:
    """One call for a router: :func:`mixed_importance` (``alpha``; the team's sampling probes used 1, i.e.
    half-and-half) then the ``scheme``'s draw. ``importance`` is ignored (may be None) for ``"uniform"``."""
    if scheme not in SCHEMES:
        raise ValueError(f"cggr.sampling: scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "uniform":
        return uniform(valid, k, generator)
    if importance is None:
        raise ValueError(f"cggr.sampling: scheme {scheme!r} needs an importance tensor")
    g = mixed_importance(importance, valid, alpha)
    return (systematic if scheme == "systematic" else priority)(g, valid, k, generator)


# ---------------------------------------------------------------------------------------------------------
# Variance bookkeeping (a variance-budget mode)


def variance_ratio(sizes: torch.Tensor, pi: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Variance the sampling adds to a Horvitz-Thompson sum, relative to the sum of squares:
    ``sum_t (1/pi_t - 1) s_t^2 / sum_t s_t^2`` per block (over valid rows), on the device.

    ``s_t`` is the size of row ``t``'s contribution (e.g. the norm of its gradient row). The numerator is the
    variance of ``sum_t (kept_t / pi_t) x_t`` with ``|x_t| = s_t`` under *Poisson* sampling (independent rows)
    with these ``pi``: it is used as the approximation of the fixed-size design, whose exact variance also
    involves the second-order inclusion probabilities (e.g. for a uniform draw of ``k`` of ``n`` it is
    ``(n/k - 1) * n/(n-1) * sum_t |x_t - mean x|^2``: only the spread around the mean counts). The
    denominator is the scale of the minibatch's own noise when rows are independent with a mean small against
    their spread: the ratio then reads as "added variance / SGD variance", the quantity VCAS budgets.
    A row with ``s_t > 0`` and ``pi_t = 0`` makes the ratio inf (the sum cannot be estimated); all ``s = 0``
    gives 0; non-finite sizes give a non-finite ratio (a budget then keeps every row).

    Returns float64 of shape ``sizes.shape[:-1]`` broadcast with ``pi``.
    """
    s2 = sizes.to(_F64).square()
    if valid is not None:
        s2 = torch.where(valid, s2, 0.0)
    added = torch.where(s2 > 0, (1.0 / pi.to(_F64) - 1.0) * s2, 0.0)
    total = s2.sum(-1)
    return torch.where(total > 0, added.sum(-1) / torch.where(total > 0, total, 1.0), 0.0)


def smallest_k_for_budget(sizes: torch.Tensor, valid: torch.Tensor, tau: float, alpha: float,
                          importance: torch.Tensor | None = None) -> int | list[int]:
    """The smallest ``k`` per block whose pi-ps design on the mixed importance (:func:`mixed_importance` of
    ``importance`` with ``alpha``, as :func:`draw` would use; ``importance`` None: the ``sizes`` themselves)
    keeps :func:`variance_ratio` of ``sizes`` ``<= tau``.

    The ratio does not increase with ``k`` (every ``pi_t`` grows with ``k``), and it is 0 at ``k = n_valid``,
    so a bisection over ``[0, n_valid]`` finds it: all blocks at once, on the device, a fixed
    ``ceil(log2(N + 1))`` steps, one sort. **Synchronises once** (the answer is read back as host ints, which
    the draws need); meant for every few hundred steps, not the draw path.

    Returns an int, or a list of ``L`` ints when ``sizes`` or ``valid`` is 2-D.
    """
    if not isinstance(tau, numbers.Real) or isinstance(tau, bool) or math.isnan(tau) or tau < 0:
        raise ValueError(f"cggr.sampling: tau must be a host float >= 0, got {tau!r}")
    batched = sizes.dim() == 2 or valid.dim() == 2
    x, valid2, _, _ = _blocks(sizes, valid, 0, name="sizes")
    g = mixed_importance(x if importance is None else importance.expand_as(x), valid2, alpha)
    design = _sorted_design(g, valid2)
    n = design[2]
    low, high = torch.zeros_like(n), n.clone()
    for _ in range(x.shape[-1].bit_length()):
        middle = torch.div(low + high, 2, rounding_mode="floor")
        fits = variance_ratio(x, _pips(g, valid2, design, middle), valid2) <= tau
        high = torch.where(fits[:, None], middle, high)
        low = torch.where(fits[:, None], low, middle + 1)
    ks = high.long().view(-1).tolist()  # the one synchronisation
    return ks if batched else ks[0]


# ---------------------------------------------------------------------------------------------------------
# Slow references: Python loops over the rows of one block at a time, the same random numbers.


def _block_lists(importance, valid, k):
    x, valid2, counts, batched = _blocks(importance, valid, k)
    return x.to(_F64).tolist(), valid2.tolist(), counts, batched


def _sanitized_reference(g: list, ok: list) -> list:
    finite = [v for v, o in zip(g, ok) if o and math.isfinite(v)]
    largest = max([max(v, 0.0) for v in finite], default=0.0)
    fill = largest if largest > 0 else 1.0
    return [(max(v, 0.0) if math.isfinite(v) else fill) if o else 0.0 for v, o in zip(g, ok)]


def _pips_reference(g: list, ok: list, k: int) -> list:
    """Iterative capping: cap every row with c*g >= 1, re-solve c on the rest, until none is added."""
    n = sum(ok)
    if k >= n:
        return [1.0 if o else 0.0 for o in ok]
    rows = [t for t in range(len(g)) if ok[t]]
    capped: set = set()
    while True:
        rest = sum(g[t] for t in rows if t not in capped)
        if rest == 0:
            break
        c = (k - len(capped)) / rest
        new = {t for t in rows if t not in capped and c * g[t] >= 1}
        if not new:
            break
        capped |= new
    pi = [0.0] * len(g)
    for t in rows:
        if t in capped:
            pi[t] = 1.0
        elif rest > 0:
            pi[t] = c * g[t]
        else:  # every positive row capped: the zero rows share what is left
            pi[t] = 1.0 if g[t] > 0 else (k - len(capped)) / (n - len(capped))
    return pi


def inclusion_probabilities_reference(importance: torch.Tensor, valid: torch.Tensor, k) -> torch.Tensor:
    """:func:`inclusion_probabilities` by iterative capping, one block at a time in Python floats."""
    g, ok, counts, batched = _block_lists(importance, valid, k)
    pi = [_pips_reference(_sanitized_reference(g[b], ok[b]), ok[b], counts[b]) for b in range(len(counts))]
    out = torch.tensor(pi, dtype=_F64)
    return out if batched else out[0]


def _draw_from_rows(kept: list, weights: list, N: int, device) -> Draw:
    mask = torch.zeros(len(kept), N, dtype=torch.bool)
    weight = torch.zeros(len(kept), N, dtype=torch.float32)
    for b, (rows, w) in enumerate(zip(kept, weights)):
        for t, wt in zip(rows, w):
            mask[b, t], weight[b, t] = True, wt
    return Draw(mask.to(device), weight.to(device), [torch.tensor(r, dtype=torch.long, device=device) for r in kept])


def uniform_reference(valid: torch.Tensor, k, generator: torch.Generator | None = None) -> Draw:
    """:func:`uniform`: sort each block's valid rows by their key, keep the ``k`` largest, weight ``n/k``."""
    _, ok, counts, _ = _block_lists(valid.to(_F64), valid, k)
    L, N = len(counts), valid.shape[-1]
    keys = _uniform_noise(L, N, generator, valid.device).tolist()
    kept, weights = [], []
    for b in range(L):
        rows = sorted((t for t in range(N) if ok[b][t]), key=lambda t: keys[b][t], reverse=True)[:counts[b]]
        kept.append(rows)
        weights.append([sum(ok[b]) / max(1, min(counts[b], sum(ok[b])))] * len(rows))
    return _draw_from_rows(kept, weights, N, valid.device)


def systematic_reference(importance: torch.Tensor, valid: torch.Tensor, k,
                         generator: torch.Generator | None = None) -> Draw:
    """:func:`systematic`: walk the rows in the random order, keep a row when a lattice point ``u + j`` falls
    in ``[cum_before, cum_before + pi_t)`` (the cumulative sum rescaled to end at ``k``)."""
    g, ok, counts, _ = _block_lists(importance, valid, k)
    L, N = len(counts), len(g[0])
    order_keys, offset = _systematic_noise(L, N, generator, importance.device)
    order_keys, offset = order_keys.tolist(), offset.view(-1).tolist()
    kept, weights = [], []
    for b in range(L):
        pi = _pips_reference(_sanitized_reference(g[b], ok[b]), ok[b], counts[b])
        order = sorted(range(N), key=lambda t: order_keys[b][t])
        total = math.fsum(pi)
        scale = counts[b] / total if total > 0 else 0.0
        rows, cum, j = [], 0.0, 0
        for t in order:
            before, cum = cum, cum + pi[t] * scale
            while j < counts[b] and offset[b] + j < before:
                j += 1
            if j < counts[b] and before <= offset[b] + j < cum:
                rows.append(t)
        kept.append(rows)
        weights.append([1.0 / pi[t] for t in rows])
    return _draw_from_rows(kept, weights, N, importance.device)


def priority_reference(importance: torch.Tensor, valid: torch.Tensor, k,
                       generator: torch.Generator | None = None) -> Draw:
    """:func:`priority`: positive rows ranked by ``g/u``, then zero rows by ``u`` ascending; keep ``k``;
    weights from the first row left out."""
    g, ok, counts, _ = _block_lists(importance, valid, k)
    L, N = len(counts), len(g[0])
    u = _priority_noise(L, N, generator, importance.device).tolist()
    kept, weights = [], []
    for b in range(L):
        gb = _sanitized_reference(g[b], ok[b])
        positive = sorted((t for t in range(N) if ok[b][t] and gb[t] > 0), key=lambda t: gb[t] / u[b][t],
                          reverse=True)
        zero = sorted((t for t in range(N) if ok[b][t] and gb[t] == 0), key=lambda t: u[b][t])
        ranked = positive + zero
        rows, first_out = ranked[:counts[b]], ranked[counts[b]:counts[b] + 1]
        w = []
        for t in rows:
            if not first_out:
                w.append(1.0)
            elif gb[first_out[0]] > 0:  # a positive row is the first left out: tau = its priority
                w.append(max(1.0, gb[first_out[0]] / u[b][first_out[0]] / gb[t]))
            else:  # a zero row is: positive rows are certain, zero rows weigh 1/u of that row
                w.append(1.0 if gb[t] > 0 else 1.0 / u[b][first_out[0]])
        kept.append(rows)
        weights.append(w)
    return _draw_from_rows(kept, weights, N, importance.device)
