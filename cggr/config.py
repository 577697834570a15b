"""Every option of cggr, in one typed object validated in one place.

:class:`RoutingConfig` is the single source of the options and their defaults:
:func:`cggr.attach`, :class:`cggr.CGGRWrapper` and both training callbacks take
``config=RoutingConfig(...)`` and/or the same fields as keyword overrides, and
nothing restates a default elsewhere. Every error a user can make here is a
``ValueError`` naming the argument and the allowed values.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence, get_args

from .scoring import SCORERS

Mode = Literal["sparse", "mask"]
Policy = Literal["random", "difficulty", "sampled"]
Scorer = Literal["entropy_confidence", "entropy", "margin"]
Backward = Literal["auto", "generic"]
Buckets = Literal["local", "global"]
Inactive = Literal["stop", "skip"]
Placement = Literal["auto", "nested", "per_block"]
Estimator = Literal["plain", "unbiased"]
Importance = Literal["uniform", "loss", "block"]
Sampler = Literal["systematic", "priority"]

MODES = get_args(Mode)
POLICIES = ("difficulty", "random", "sampled")  # the bucketing of each: cggr.bucketing.POLICY_FNS
BACKWARDS = get_args(Backward)
BUCKETS = get_args(Buckets)
INACTIVE = get_args(Inactive)
PLACEMENTS = get_args(Placement)
ESTIMATORS = get_args(Estimator)
IMPORTANCES = get_args(Importance)
SAMPLERS = get_args(Sampler)
assert set(get_args(Policy)) == set(POLICIES) and set(get_args(Scorer)) == set(SCORERS)

# More buckets than this make no sense for any stack (each bucket is a depth, and depths are whole blocks)
# and cost host time and memory per step that grows with the count.
MAX_BUCKETS = 256


@dataclass(frozen=True)
class RoutingConfig:
    """The options of one router. Build it directly or pass its fields to :func:`cggr.attach`."""

    num_buckets: int = 4
    """K: valid tokens are split into K equal buckets; bucket k's target depth is ``ceil(L*(K-k)/K)`` blocks
    (K = 4: 100/75/50/25 % of the stack). 1 means every token at full depth (cggr's backward, no routing)."""

    warmup_steps: int = 1000
    """Curriculum length in optimizer steps: depths fall linearly from full to the targets (0 = at once); with
    ``block_fractions``, each block's fraction falls linearly from 1 to its given value."""

    leak_rate: float = 0.0
    """λ in [0, 1] (a number: a bool or a string is refused): inactive rows carry λ times their gradient
    instead of none. Any λ > 0 makes every row dense again in the backward, so it costs the whole saving."""

    mode: Mode = "sparse"
    """``"sparse"``: exact token-sparse backward (inactive rows of every linear inside a block are constants);
    ``"mask"``: only block outputs are gated (no saving; the fallback for blocks sparse mode cannot route)."""

    policy: Policy = "random"
    """Which tokens go into which bucket: ``"random"`` (uniformly at random, fresh each step; needs no logits),
    ``"difficulty"`` (ranked by the scorer, hardest deepest: the seed's rule) or ``"sampled"`` (random, deep
    buckets likelier for harder tokens)."""

    depths: tuple[float, ...] | None = None
    """Target depth fraction of each bucket, hardest first, strictly decreasing in (0, 1]; None = (K-k)/K.
    Numbers only (a bool or a string is refused); refused together with ``block_fractions``, which replaces
    the buckets."""

    scorer: Scorer = "entropy_confidence"
    """Difficulty score of a token from its logits: entropy minus confidence, entropy, or margin (1 - max p).
    It ranks tokens under ``policy="difficulty"`` or ``"sampled"``; ``policy="random"`` draws tokens without
    scores, so another scorer than the default is refused there (it would change nothing)."""

    ignore_index: int = -100
    """Label value of tokens without a target: such tokens get depth 0 and take no part in bucketing."""

    seed: int = 0
    """Seed of the random policies (combined with the data-parallel rank, the step and the micro-batch)."""

    label_shift: int | None = None
    """1 when logits at position t predict ``labels[t+1]`` (HF causal LMs shift labels inside), 0 when they
    predict ``labels[t]``; None = from the model family table (refused where it cannot be known)."""

    backward: Backward = "auto"
    """``"auto"``: a block takes its family's compacted backward where one exists and is verified equal to the
    block at attach; ``"generic"``: always the per-linear routed backward (also supports double backward)."""

    buckets: Buckets = "local"
    """``"local"``: each data-parallel rank buckets its own tokens; ``"global"``: the valid tokens of all ranks
    of the default process group are ranked together (three small all-reduces per forward)."""

    handback_steps: int = 0
    """Over the last ``handback_steps`` of ``total_steps`` the depths (or ``block_fractions``) return linearly
    to full (0 = never)."""

    total_steps: int | None = None
    """Length of training in optimizer steps (needed by ``handback_steps``; the callbacks fill it in)."""

    inactive: Inactive = "skip"
    """What an inactive row means in a block: ``"skip"`` (the default: its gradient passes unchanged along the
    residual stream to the block's input; only the block's own work for it is skipped) or ``"stop"`` (the
    seed's: its gradient stops there, so the blocks below and the embedding get none from it).
    ``inactive="stop"`` alone gives the seed's routing back (``placement="auto"`` then resolves to nested)."""

    placement: Placement = "auto"
    """Where a token is active: ``"nested"`` (the seed's: a token of depth d in the top d blocks),
    ``"per_block"`` (each block draws its own random subset of exactly ``round(f_b * n)`` valid tokens, fresh
    each step; needs ``inactive="skip"``, the random policy and ``buckets="local"``; the fractions keep the
    nested routing's total work unless ``block_fractions`` gives them) or ``"auto"`` (the default):
    ``"per_block"`` where it applies (skip, random, local buckets) unless every token is at full depth anyway
    (one bucket at depth 1, where nested does the same without the per-block draws), else ``"nested"``.
    ``config.placement`` holds the resolved value; :meth:`replace` resolves an automatic choice anew."""

    dense_ends: int | None = None
    """Per-block placement: this many blocks at each end of the stack (bottom and top) keep every valid token;
    the middle blocks share the rest of the work. None (the default) = 1 under per-block placement without
    ``block_fractions``, else 0 (``config.dense_ends`` holds the resolved value). At most ``(L - 1) // 2``
    are kept at each end of an ``L``-block stack, so at least one block stays routed (a 2-block stack routes
    both of its blocks). The total never exceeds the nested routing's (the work budget of the buckets and
    curriculum): where ``2 * dense_ends`` whole blocks of valid tokens would, fewer blocks at each end are
    dense (none when not even one at each end fits), and every block shares the budget. Refused with
    ``block_fractions`` (which gives every block's fraction: give the end blocks 1.0 there)."""

    block_fractions: tuple[float, ...] | None = None
    """Per-block placement: the active fraction ``f_b`` of each block, bottom first, one per block in [0, 1]
    (numbers; None = from the buckets and curriculum). They replace the buckets (``num_buckets`` other than
    its default and ``depths`` are refused with them) but follow the curriculum: at progress ``p`` (warm-up,
    hand-back, :meth:`cggr.Router.set_progress`) block ``b`` keeps ``1 - p * (1 - f_b)`` of the valid tokens,
    so every block is dense at the start of warm-up (``warmup_steps=0``: the fractions at once)."""

    layers: Any = None
    """The block stack: an attribute path (``"model.layers"``), an ``nn.ModuleList`` or a list of blocks;
    None = from the model family table, else the longest outermost ``nn.ModuleList`` of blocks."""

    fused_loss: bool = False
    """HF causal LMs: training forwards with labels compute HF's loss with cggr's fused linear cross-entropy
    (:func:`cggr.loss.linear_cross_entropy`, no ``[tokens, vocab]`` logits; ``out.logits`` is None) and route by
    the per-token scores it computes. Eval and label-free forwards are unchanged. Refused where the model's
    forward does more than ``lm_head`` and cross-entropy (logit softcapping or scales, a non-Linear head)."""

    estimator: Estimator = "plain"
    """Per-block placement: what a kept row's gradient is worth in a routed block. ``"plain"`` (the default): its
    gradient as it is, so a block's branch sees the sum over its subset (a smaller, biased step).
    ``"unbiased"``: multiplied by ``1/pi``, the row's inclusion probability (Horvitz-Thompson; ``n/k`` for a
    uniform draw of ``k`` of ``n`` tokens) on its way into the block's branch, while the residual stream carries
    it unweighted: the gradients of the branch's row-local parts (query and output projections, MLP, norms) are
    unbiased estimates of dense training's, noisier; the attention's key and value rows of dropped tokens stay
    constants, so their gradient path keeps a bias of about the kept fraction (docs/design.md)."""

    importance: Importance = "uniform"
    """Per-block placement: how each routed block draws its ``k_b`` kept rows. ``"uniform"`` (the default): every
    subset of that size equally likely. ``"loss"``: inclusion probability rising with the size of the token's
    gradient at the logits, ``||softmax(z_t) - onehot(y_t)||`` (small exactly when the model is confident and
    right; needs the labels in the forward, or ``fused_loss=True``). ``"block"``: rising with the norm of the
    block's own output-gradient row, drawn in the backward as that gradient arrives. Non-uniform draws need
    ``estimator="unbiased"``: selecting hard tokens without reweighting measured worst of all."""

    importance_mix: float = 1.0
    """alpha >= 0 of a non-uniform ``importance``: rows are drawn by ``g_t + alpha * mean(g)``, so no row's
    probability falls near 0 and no weight explodes (every weight is at most ``(1 + 1/alpha) n/k``);
    ``float("inf")`` is uniform."""

    sampler: Sampler = "systematic"
    """Fixed-size draw of a non-uniform ``importance``: ``"systematic"`` (systematic pi-ps: exact inclusion
    probabilities) or ``"priority"`` (priority sampling: unbiased conditionally on the other rows' threshold)."""

    variance_budget: float | None = None
    """tau > 0: each routed block's kept fraction is chosen so that the variance its sampling adds to the
    block's gradient stays within tau times the minibatch's own (VCAS's criterion; VCAS uses 0.025), measured
    from the block's output-gradient rows every ``variance_every`` optimizer steps; the backward work follows
    from the budget instead of the buckets (per-block placement; until the first measurement every row is kept).
    None (the default): the fractions come from the buckets or ``block_fractions``."""

    variance_every: int = 100
    """Optimizer steps between two measurements of ``variance_budget`` (each costs one host synchronisation)."""

    def __post_init__(self) -> None:
        _check_int("num_buckets", self.num_buckets, 1)
        if self.num_buckets > MAX_BUCKETS:
            raise ValueError(f"num_buckets must be an integer in [1, {MAX_BUCKETS}], got {self.num_buckets!r}")
        _check_int("warmup_steps", self.warmup_steps, 0)
        leak = as_number(self.leak_rate)
        if not (0.0 <= leak <= 1.0):
            raise ValueError(f"leak_rate must be a number in [0, 1], got {self.leak_rate!r}")
        object.__setattr__(self, "leak_rate", leak)
        _check_choice("mode", self.mode, MODES)
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("scorer", self.scorer, SCORERS)
        if self.depths is not None:
            object.__setattr__(self, "depths", _check_depths(self.depths, self.num_buckets))
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be an integer (the label of tokens without a target, usually "
                             f"-100), got {self.ignore_index!r}")
        if self.label_shift not in (None, 0, 1) or isinstance(self.label_shift, bool):
            raise ValueError(f"label_shift must be None (auto), 0 or 1, got {self.label_shift!r}")
        _check_choice("backward", self.backward, BACKWARDS)
        _check_int("handback_steps", self.handback_steps, 0)
        if self.total_steps is not None:
            if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
                raise ValueError(f"total_steps must be None or an integer >= 1, got {self.total_steps!r}")
        if self.handback_steps and (self.total_steps is None or self.handback_steps > self.total_steps):
            raise ValueError(f"handback_steps={self.handback_steps} needs total_steps (the length of training, in "
                             f"optimizer steps) >= handback_steps, got total_steps={self.total_steps!r}")
        _check_choice("buckets", self.buckets, BUCKETS)
        _check_choice("inactive", self.inactive, INACTIVE)
        _check_choice("placement", self.placement, PLACEMENTS)
        if self.dense_ends is not None:
            _check_int("dense_ends", self.dense_ends, 0)
        if self.block_fractions is not None:
            fr = as_numbers(self.block_fractions)
            if not fr or not all(0.0 <= f <= 1.0 for f in fr):
                raise ValueError(f"block_fractions must be a sequence of fractions in [0, 1], one per block (bottom "
                                 f"first), got {self.block_fractions!r}")
            object.__setattr__(self, "block_fractions", fr)
        _check_choice("estimator", self.estimator, ESTIMATORS)
        _check_choice("importance", self.importance, IMPORTANCES)
        _check_choice("sampler", self.sampler, SAMPLERS)
        mix = as_number(self.importance_mix)
        if not mix >= 0:
            raise ValueError(f"importance_mix must be a number >= 0 (float('inf') for uniform), got "
                             f"{self.importance_mix!r}")
        object.__setattr__(self, "importance_mix", mix)
        if self.variance_budget is not None:
            tau = as_number(self.variance_budget)
            if not 0 < tau < math.inf:
                raise ValueError(f"variance_budget must be None or a number > 0 (VCAS uses 0.025), got "
                                 f"{self.variance_budget!r}")
            object.__setattr__(self, "variance_budget", tau)
        _check_int("variance_every", self.variance_every, 1)
        self._resolve_placement()
        sampling = self._sampling_options()
        if sampling and self.placement != "per_block":
            raise ValueError(f"{', '.join(sampling)}: these options reweight or draw the kept rows of per-block "
                             f"placement and need placement='per_block' (got placement={self.placement!r}"
                             + (f", chosen by 'auto' for {self._why_nested()}" if self._why_nested() else "") + ")")
        if self.importance != "uniform" and self.estimator != "unbiased":
            raise ValueError(f"importance={self.importance!r} draws hard tokens likelier; without reweighting that "
                             "biases every block toward them (it measured worst of all sampling choices): it needs "
                             "estimator='unbiased'")
        if self.estimator == "unbiased" and self.leak_rate > 0:
            raise ValueError("estimator='unbiased' reweights the kept rows of sparse blocks; leak_rate > 0 keeps "
                             "every row: use one of them")
        if self.variance_budget is not None and self.estimator != "unbiased":
            raise ValueError("variance_budget bounds the variance of an unbiased estimate of the gradient: it needs "
                             "estimator='unbiased'")
        if self.variance_budget is not None and self.block_fractions is not None:
            raise ValueError("variance_budget and block_fractions both set each block's kept fraction: give one")
        if self.placement == "per_block":
            if self.inactive != "skip":
                raise ValueError("placement='per_block' needs inactive='skip': under 'stop' a row cut in a block gets no "
                                 "gradient in any block below it, so per-block subsets would not be what they say")
            if self.policy != "random":
                raise ValueError(f"placement='per_block' draws each block's tokens at random; it needs policy='random', "
                                 f"got policy={self.policy!r}")
            if self.buckets != "local":
                raise ValueError("placement='per_block' draws each rank's tokens on that rank; it needs buckets='local'")
        elif self.dense_ends or self.block_fractions is not None:
            why = (f" (placement='auto' chose 'nested' here: {self._why_nested()})"
                   if isinstance(self.placement, _Auto) else "")
            raise ValueError("dense_ends and block_fractions choose per-block active fractions: they need "
                             f"placement='per_block'{why}")
        self._refuse_ignored_options()
        if not isinstance(self.fused_loss, bool):
            raise ValueError(f"fused_loss must be True or False, got {self.fused_loss!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def _refuse_ignored_options(self) -> None:
        """Options that would change nothing next to the others given: refused, never silently ignored."""
        if self.block_fractions is not None:
            if not isinstance(self.dense_ends, _Auto) and self.dense_ends:
                raise ValueError(f"dense_ends={self.dense_ends} and block_fractions cannot be combined: "
                                 "block_fractions gives every block's fraction, the end blocks' too (give them 1.0 "
                                 "there to keep them dense), so dense_ends would be ignored")
            bucket_option = ("depths" if self.depths is not None
                             else "num_buckets" if self.num_buckets != _DEFAULT_NUM_BUCKETS else None)
            if bucket_option is not None:
                raise ValueError(f"{bucket_option}={getattr(self, bucket_option)!r} and block_fractions cannot be "
                                 "combined: block_fractions replaces the buckets' depths (each block keeps its "
                                 f"fraction, after the curriculum), so {bucket_option} would be ignored")
        if self.variance_budget is not None:
            bucket_option = ("depths" if self.depths is not None
                             else "num_buckets" if self.num_buckets != _DEFAULT_NUM_BUCKETS else None)
            if bucket_option is not None:
                raise ValueError(f"{bucket_option}={getattr(self, bucket_option)!r} and variance_budget cannot be "
                                 "combined: the budget sets every routed block's fraction, so the buckets' depths "
                                 "would be ignored")
        elif self.variance_every != _DEFAULT_VARIANCE_EVERY:
            raise ValueError(f"variance_every={self.variance_every} spaces the measurements of variance_budget, which "
                             "is not set: give variance_budget too")
        if self.importance == "uniform":
            for name, default in (("sampler", _DEFAULT_SAMPLER), ("importance_mix", _DEFAULT_IMPORTANCE_MIX)):
                if getattr(self, name) != default:
                    raise ValueError(f"{name}={getattr(self, name)!r} shapes the draws of importance='loss' or "
                                     "'block'; with importance='uniform' it would be ignored")
        if self.policy == "random" and self.scorer != _DEFAULT_SCORER:
            raise ValueError(f"scorer={self.scorer!r} has no effect under policy='random' (tokens are drawn without "
                             "scores); the scorer ranks tokens under policy='difficulty' or 'sampled'")

    def _resolve_placement(self) -> None:
        """``placement="auto"`` and ``dense_ends=None`` -> their values for this config. A resolved value is
        stored marked (:class:`_AutoStr`, :class:`_AutoInt`: equal to the plain value in every use), so that a
        copy made by :meth:`replace` or :func:`dataclasses.replace`, which passes the old values on, resolves it
        anew for its own options; a value the user gives is plain and kept (and checked)."""
        placement = self.placement
        if placement == "auto" or isinstance(placement, _Auto):
            explicit_per_block = (self.block_fractions is not None or bool(self._sampling_options())
                                  or (self.dense_ends is not None and not isinstance(self.dense_ends, _Auto)
                                      and self.dense_ends > 0))
            if self._why_nested() is None and (explicit_per_block or not self._dense_anyway()):
                placement = _AutoStr("per_block")
            else:
                placement = _AutoStr("nested")
            object.__setattr__(self, "placement", placement)
        if self.dense_ends is None or isinstance(self.dense_ends, _Auto):
            auto_ends = 1 if placement == "per_block" and self.block_fractions is None else 0
            object.__setattr__(self, "dense_ends", _AutoInt(auto_ends))

    def _sampling_options(self) -> list[str]:
        """The options given that only per-block placement has (their names as given, for messages)."""
        out = [f"estimator={self.estimator!r}"] if self.estimator != "plain" else []
        out += [f"importance={self.importance!r}"] if self.importance != "uniform" else []
        return out + ([f"variance_budget={self.variance_budget!r}"] if self.variance_budget is not None else [])

    def _why_nested(self) -> str | None:
        """Why per-block placement cannot apply to this config (None: it can)."""
        if self.inactive != "skip":
            return f"inactive={self.inactive!r}"
        if self.policy != "random":
            return f"policy={self.policy!r}"
        if self.buckets != "local":
            return f"buckets={self.buckets!r}"
        return None

    def _dense_anyway(self) -> bool:
        """Every token at full depth in every block (one bucket at depth 1): no placement routes anything."""
        return self.num_buckets == 1 and (self.depths is None or self.depths[0] >= 1.0)

    def __deepcopy__(self, memo) -> "RoutingConfig":
        """A deep copy (of a model the router is attached to, say) keeps which values were resolved automatically;
        :func:`dataclasses.asdict` gives the plain values (for JSON, YAML: an explicit config)."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            object.__setattr__(new, f.name, value if isinstance(value, _Auto) else copy.deepcopy(value, memo))
        return new

    def replace(self, **overrides: Any) -> "RoutingConfig":
        """A copy with ``overrides`` applied (validated); an unknown name is a TypeError listing the options."""
        unknown = sorted(set(overrides) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown cggr option(s) {', '.join(map(repr, unknown))}; the options are: "
                            f"{', '.join(OPTION_NAMES)}")
        return dataclasses.replace(self, **overrides) if overrides else self


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RoutingConfig))
_DEFAULT_NUM_BUCKETS = RoutingConfig.num_buckets
_DEFAULT_SCORER = RoutingConfig.scorer
_DEFAULT_SAMPLER = RoutingConfig.sampler
_DEFAULT_IMPORTANCE_MIX = RoutingConfig.importance_mix
_DEFAULT_VARIANCE_EVERY = RoutingConfig.variance_every


def resolve_config(config: RoutingConfig | None, overrides: dict[str, Any], owner: str = "cggr.attach"
                   ) -> RoutingConfig:
    """``config`` (default: every default) with keyword ``overrides`` applied: what every entry point calls."""
    if config is not None and not isinstance(config, RoutingConfig):
        raise TypeError(f"{owner}: config must be a cggr.RoutingConfig or None, got {type(config).__name__} "
                        f"(options go by name: {owner}(..., num_buckets=4))")
    try:
        return (config or RoutingConfig()).replace(**overrides)
    except TypeError as e:
        raise TypeError(f"{owner}: {e} ({owner} takes the options of cggr.attach)" if owner != "cggr.attach"
                        else f"{owner}: {e}") from None


class _Auto:
    """Marks a value that ``placement="auto"`` / ``dense_ends=None`` resolved to (see
    :meth:`RoutingConfig._resolve_placement`). A subclass names the plain type it marks in ``_plain_type``."""

    __slots__ = ()
    _plain_type: type

    def _plain(self):
        return self._plain_type(self)

    def __repr__(self) -> str:  # shown as the plain value
        return repr(self._plain())

    def __reduce__(self):  # pickle and copy keep the mark
        return type(self), (self._plain(),)

    def __deepcopy__(self, memo):  # dataclasses.asdict deep-copies values: it gives the plain value
        return self._plain()


class _AutoStr(_Auto, str):
    _plain_type = str


class _AutoInt(_Auto, int):
    _plain_type = int


def _is_bool(value) -> bool:
    """A Python, NumPy or 0-d torch bool: never taken as the number 0 or 1."""
    return isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def as_number(value) -> float:
    """``value`` as a float; NaN (which every range check refuses) for what is no number: a bool, a string."""
    if _is_bool(value) or isinstance(value, (str, bytes)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def as_numbers(values) -> tuple[float, ...]:
    """A sequence of numbers as floats; ``(nan,)`` for what is none (a string is no sequence of numbers)."""
    if isinstance(values, (str, bytes)):
        return (math.nan,)
    try:
        return tuple(as_number(v) for v in values)
    except TypeError:
        return (math.nan,)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_depths(depths: Sequence[float], num_buckets: int) -> tuple[float, ...]:
    msg = ("depths must be a sequence of num_buckets={k} fractions, strictly decreasing, "
           "each in (0, 1] (hardest bucket first), got {d!r}")
    fr = as_numbers(depths)
    ok = (len(fr) == num_buckets and all(0.0 < f <= 1.0 for f in fr)
          and all(a > b for a, b in zip(fr, fr[1:])))
    if not ok:
        raise ValueError(msg.format(k=num_buckets, d=depths))
    return fr
