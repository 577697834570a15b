"""VCAS (Wang, Chen, Zhu, ICLR 2024): variance-controlled adaptive sampling, a peer arm of ``cggr bench quality``.

VCAS makes the backward pass cheaper by *sampling* it, unbiasedly, and keeps the
variance the sampling adds small against the minibatch's own (SGD) variance. It is
ported here from the authors' code (thu-ml/VCAS at 0bc7d08) onto the harness's
Hugging Face Llama models, as a benchmark arm (no cggr routing). Two samplers, one
controller:

**1. Activation-gradient sampling, per sequence, at each decoder layer's output.**
The output of layer ``l`` (after its MLP residual add) is an identity in the
forward; in the backward its gradient ``G`` (``[B, S, D]``) is thinned:

* each sequence ``b`` gets ``pi_b = min(1, c * ||G_b||)`` (pi-ps, capped) with
  ``sum_b pi_b = k = max(1, int(B * rho_l))`` (:func:`cggr.sampling.inclusion_probabilities`);
* each sequence is kept independently with probability ``pi_b`` (Poisson
  sampling: the number kept is random, ``k`` on average), a kept one's gradient
  is multiplied by ``1/pi_b``, a dropped one's is zeroed, residual stream included:
  a dropped sequence sends no gradient to any lower layer or to its embeddings.
  ``E[sampled G] = G`` (Horvitz-Thompson);
* the sampler of layer ``l`` acts only at the top layer and where ``rho_l`` is
  strictly below the layer above's (the schedule is non-decreasing toward the top,
  so sampling is nested: survivors are re-drawn lower down, from norms that already
  carry the ``1/pi`` of the draws above, and the weights compound).

**2. Weight-gradient sampling inside every linear of the decoder layers** (q, k,
v, o, gate, up, down). With ``G`` the linear's output gradient and ``X`` its input,
flattened to the token rows ``j`` of the sequences still kept:

* ``dX = G W`` exactly, for every row of the kept sequences (zero for the
  dropped ones);
* ``dW = sum_j G_j^T X_j`` is estimated from a Poisson pi-ps draw of rows by
  leverage score ``s_j = ||G_j|| ||X_j||`` at ratio ``nu`` (``k = int(K * nu)`` of the
  ``K`` rows on average), each kept row weighted ``1/pi_j``: ``E[dW] = dW``. Where
  ``k >= K`` or ``k == 0`` the weight gradient is exact (as their code does). The
  bias gradient is exact.

**3. The controller**, every ``every`` training steps (F; their default 100, and
their README asks for F at most 1/50 of the run: the harness uses
:func:`default_every`). It draws ``M = 2`` more batches from the training stream
and, for each, runs one forward and, on its graph, one **exact** backward and
``M`` **sampled** backwards (activation sampling only; weight gradients exact on
the kept rows). It measures, per linear, on a fresh random 1 % subset of the
weight's entries scaled up to the whole tensor:

* the SGD variance: the variance of the exact gradient across the ``M`` batches
  (``M/(M-1)`` corrected);
* the activation-sampling variance: ``||g_sampled - g_exact||^2``, averaged over
  the ``M x M`` sampled backwards;
* the weight-sampling variance, analytically at the current ``nu``:
  ``sum_j (1/pi_j - 1) ||G_j||^2 ||X_j||^2`` (the Poisson variance, summed over entries),
  averaged likewise;
* per layer, from the exact backward's per-sequence norms, the *candidate ratio*
  at a norm share ``s'``: the smallest fraction of sequences whose largest norms
  hold ``s'`` of the total (:func:`top_share_fraction`).

Then (``tau = 0.025`` for both): if summed activation variance / summed SGD variance
exceeds ``tau``, the global norm share ``s`` rises by 0.01, else it falls by 0.01
(clipped to [0, 1]); the new per-layer schedule is the candidate ratios measured at
the *new* ``s``, made non-decreasing toward the top (a running maximum from the
bottom), and ``rho = 0.6 rho + 0.4 new``. Each linear's ``nu`` is divided by 0.95 where
its weight variance / SGD variance exceeds ``tau``, else multiplied by 0.95. The run
starts exact: ``s = 1``, every ``rho = 1`` and ``nu = 1``.

Where this differs from their code, on purpose:

* *Schedule names.* Their code measures ``act_ratio_up_sched`` at ``s - 0.01`` and
  ``act_ratio_down_sched`` at ``s + 0.01``, then applies "up" when ``s`` rises: read
  literally the schedule moves against ``s`` for a round. Here the schedule applied
  is the one measured at the new ``s``, as the names intend.
* *Probe randomness.* Their probe calls ``set_seed(i)`` before every backward of
  batch ``i`` (so that BERT's dropout masks agree between its exact and sampled
  passes), which also makes the ``M`` sampled repetitions draw the same random
  numbers: they are one draw counted ``M`` times. Here each probe batch has one
  forward (Llama has no dropout) whose graph serves the exact and the ``M``
  sampled backwards, and the samplers draw fresh numbers every time, so the
  repetitions are independent.
* *Nothing kept.* Where a Poisson draw keeps no sequence, their sampler passes the
  gradient on unsampled (a bias of ``P(none) * G``); here it is zero, as the
  Horvitz-Thompson estimator says, so the estimate stays unbiased.
* ``k = max(1, int(B * rho))`` sequences: a ratio that floors to 0 keeps one on
  average (theirs, with ``k = 0``, keeps none and then passes everything).

**What it saves, and what stays dense.** Only the decoder linears' backward
shrinks: their ``dX`` and ``dW`` GEMMs run on the gathered rows of the kept sequences,
and ``dW`` on the leverage-sampled rows only. Everything else in a layer's backward
still runs on the whole batch, dropped sequences' zero gradients included: the
attention backward (SDPA or eager), the RMSNorms, SiLU, rotary embeddings and the
residual adds. The embeddings, final norm and ``lm_head`` are exact. Each active
activation sampler and each sampled linear reads its kept count back to the host
(one synchronisation each: the gathered shapes depend on it). The probe's extra
forward and backward passes are part of the arm's step time (the training loop
calls :meth:`VCAS.before_step` inside the timed step), and its batches are drawn
from the training stream, so they count in the arm's data epochs.

:class:`VCAS` installs itself by replacing the decoder linears' ``forward`` on the
instances and a forward hook on each decoder layer (parameter names and the state
dict are unchanged); :meth:`VCAS.detach` restores them. Outside autograd
(validation under ``torch.no_grad``) every linear runs its plain forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cggr.sampling import inclusion_probabilities, variance_ratio

# Their defaults (vcas/sample_args.py).
TAU = 0.025  # act_var_tau and w_var_tau: acceptable sampling variance / SGD variance
EVERY = 100  # cal_var_freq: training steps between probes
S_STEP = 0.01  # s_update_step: change of the norm share s per probe
WEIGHT_RATIO_MUL = 0.95  # w_ratio_mul: change of each nu per probe, x or / this
SCHEDULE_DECAY = 0.6  # act_sched_decay: rho = decay * rho + (1 - decay) * new
PROBE_BATCHES = 2  # cal_var_m: M
PARAM_SAMPLE_RATIO = 0.01  # param_sample_ratio: the share of weight entries the probe measures

# What a backward does, set around each backward by the probe.
_TRAIN = "train"  # a training step: both samplers draw
_EXACT = "exact"  # the probe's exact backward: nothing sampled; each sampler records its per-sequence norms
_SAMPLED = "sampled"  # the probe's sampled backward: sequences drawn, dW exact on the kept rows, weight variance


def default_every(steps: int | None) -> int:
    """Training steps between probes when none is given: ``max(1, steps // 50)`` for a budget of ``steps`` (their
    README asks for at most 1/50 of the run), else (a budget in seconds, whose step count is unknown) 100,
    their default."""
    return max(1, steps // 50) if steps is not None else EVERY


def _pips(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``pi = min(1, c * scores)`` with ``sum pi = k`` over the ``[N]`` rows, float64
    (:func:`cggr.sampling.inclusion_probabilities`; every row valid)."""
    return inclusion_probabilities(scores, torch.ones_like(scores, dtype=torch.bool), k)


def poisson_pips(scores: torch.Tensor, k: int, generator: torch.Generator | None = None):
    """Poisson pi-ps sampling (their ``soft_topk``): the pi-ps probabilities of ``k`` rows (:func:`_pips`), then
    each row kept independently with probability ``pi``. Returns ``(pi, keep)``, both ``[N]``; the number
    kept is random with mean ``k``."""
    pi = _pips(scores, k)
    u = torch.rand(pi.shape, generator=generator, device=pi.device, dtype=pi.dtype)
    return pi, u < pi


def top_share_fraction(norms: torch.Tensor, share: float) -> float:
    """The smallest fraction of rows whose largest ``norms`` sum to ``share`` of the total (their
    ``find_top_sum``): at least one row (``1/N``), at most all (1). A host float (synchronises)."""
    values = norms.double().flatten().sort(descending=True).values
    count = int((values.cumsum(0) < share * values.sum()).sum().item()) + 1
    return min(count / values.numel(), 1.0)


def sampled_weight_gradient(grad_rows: torch.Tensor, input_rows: torch.Tensor, k: int,
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """``dW = sum_j G_j^T X_j`` over the ``K`` rows of ``grad_rows`` (``G``, ``[K, out]``) and ``input_rows``
    (``X``, ``[K, in]``), estimated from a Poisson pi-ps draw of ``k`` rows on average by leverage score
    ``||G_j|| ||X_j||``, each kept row weighted ``1/pi_j`` (their ``leverage_k``): unbiased. Exact where
    ``k >= K`` or ``k == 0``. The GEMM runs on the kept rows only (gathered; the count is read back to the
    host). Returns ``(dW, rows used)``."""
    K = grad_rows.shape[0]
    if k >= K or k == 0:
        return grad_rows.t() @ input_rows, K
    pi, keep = poisson_pips(_row_norms(grad_rows) * _row_norms(input_rows), k, generator)
    rows = keep.nonzero().squeeze(1)  # synchronises: the gathered GEMM's shape
    weights = (1.0 / pi.index_select(0, rows)).to(torch.float32)[:, None]
    weighted = (grad_rows.index_select(0, rows) * weights).to(grad_rows.dtype)  # 1/pi applied in float32
    return weighted.t() @ input_rows.index_select(0, rows), rows.numel()


def weight_gradient_variance(grad_rows: torch.Tensor, input_rows: torch.Tensor, k: int) -> torch.Tensor:
    """The variance, summed over the entries of ``dW = sum_j G_j^T X_j``, that Poisson pi-ps sampling of ``k`` of
    the ``K`` rows by leverage score adds: ``sum_j (1/pi_j - 1) ||G_j||^2 ||X_j||^2`` (their
    ``cal_leverage_var``). 0 where the draw is exact (``k >= K`` or ``k == 0``). A float64 device scalar."""
    K = grad_rows.shape[0]
    if k >= K or k == 0:
        return torch.zeros((), dtype=torch.float64, device=grad_rows.device)
    scores = _row_norms(grad_rows) * _row_norms(input_rows)
    # variance_ratio's numerator is sum (1/pi - 1) s^2: scale its ratio back by sum s^2.
    return variance_ratio(scores, _pips(scores, k)) * scores.double().square().sum()


def _row_norms(rows: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row of ``[K, C]`` rows, accumulated in float32."""
    return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)


@dataclass
class VarianceEstimate:
    """What one probe measured, normalised (their ``calculate``): per linear, the SGD variance of its weight
    gradient and the variances the activation and weight sampling add (all summed over the tensor's entries);
    per layer, the candidate ratios at the norm shares ``s_up = min(1, s + 0.01)`` and
    ``s_down = max(0, s - 0.01)``, averaged over the probe batches."""

    sgd_var: list[float]
    act_var: list[float]
    weight_var: list[float]
    ratios_up: list[float]
    ratios_down: list[float]


class _ActivationSampler(torch.autograd.Function):
    """Identity in the forward; the activation-gradient sampler of decoder layer ``index`` in the backward."""

    @staticmethod
    def forward(ctx, hidden, vcas, index):
        ctx.vcas, ctx.index = vcas, index
        return hidden

    @staticmethod
    def backward(ctx, grad):
        return ctx.vcas._sample_activation_gradient(ctx.index, grad), None, None


class _SampledLinear(torch.autograd.Function):
    """``F.linear`` in the forward; in the backward, ``dX`` on the kept sequences and a sampled ``dW``."""

    @staticmethod
    def forward(ctx, x, weight, bias, vcas, index):
        ctx.save_for_backward(x, weight)
        ctx.vcas, ctx.index, ctx.has_bias = vcas, index, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w = ctx.vcas._linear_backward(ctx.index, x, weight, grad, need_x, need_w)
        grad_b = grad.sum(tuple(range(grad.dim() - 1))) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b, None, None


class VCAS:
    """VCAS on the decoder layers of a HF Llama-style causal LM (``model.model.layers``); see the module docstring.

    ``tau_act``, ``tau_weight``: acceptable activation / weight sampling variance over the SGD variance (0.025);
    ``every``: training steps between probes (F); ``seed``: the samplers' and the probe's subsets' random
    numbers; ``probe_batches``: M (>= 2: the SGD variance is measured across them); ``param_sample_ratio``:
    the share of each weight's entries the probe measures. State: ``s`` (the norm share), ``act_ratios``
    (``rho`` per layer, bottom first), ``weight_ratios`` (``nu`` per linear, in :attr:`linear_names` order),
    ``history`` (one record per probe), ``probe_batches_used``.

    The training loop calls :meth:`before_step` with its batch iterator inside every timed step (the probe
    runs there, every ``every`` steps), :meth:`set_fraction` (a no-op: VCAS adapts from measurements, not
    from the budget) and :meth:`metrics`.
    """

    def __init__(self, model: torch.nn.Module, tau_act: float = TAU, tau_weight: float = TAU, every: int = EVERY,
                 seed: int = 0, probe_batches: int = PROBE_BATCHES, param_sample_ratio: float = PARAM_SAMPLE_RATIO):
        for name, tau in (("tau_act", tau_act), ("tau_weight", tau_weight)):
            if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
                raise ValueError(f"VCAS: {name} must be a number > 0, got {tau!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"VCAS: every must be an int >= 1 (training steps between probes), got {every!r}")
        if isinstance(probe_batches, bool) or not isinstance(probe_batches, int) or probe_batches < 2:
            raise ValueError(f"VCAS: probe_batches must be an int >= 2 (the SGD variance is measured across "
                             f"them), got {probe_batches!r}")
        if not 0.0 < param_sample_ratio <= 1.0:
            raise ValueError(f"VCAS: param_sample_ratio must be in (0, 1], got {param_sample_ratio!r}")
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
            raise TypeError(f"VCAS wraps a HF causal LM with decoder layers at model.model.layers; "
                            f"{type(model).__name__} has none")
        if getattr(model.model, "gradient_checkpointing", False):
            raise ValueError("VCAS draws in the backward and keeps per-backward state: turn gradient "
                             "checkpointing off")
        self.model = model
        self.tau_act, self.tau_weight, self.every, self.seed = float(tau_act), float(tau_weight), every, int(seed)
        self.probe_batches, self.param_sample_ratio = probe_batches, float(param_sample_ratio)
        self._layers = list(layers)
        # The decoder linears, bottom layer first, each layer's in module order (q, k, v, o, gate, up, down).
        self._linears: list[torch.nn.Linear] = []
        self.linear_names: list[str] = []
        for i, layer in enumerate(self._layers):
            for name, module in layer.named_modules():
                if isinstance(module, torch.nn.Linear):
                    if "forward" in vars(module):
                        raise RuntimeError(f"VCAS: linear {i}.{name} already has a patched forward (attached twice, "
                                           f"or with another arm?)")
                    self._linears.append(module)
                    self.linear_names.append(f"{i}.{name}")
        if not self._linears:
            raise TypeError("VCAS: the decoder layers hold no nn.Linear to sample")
        device = self._linears[0].weight.device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(self.seed)
        # The controller's state: the run starts exact.
        self.s = 1.0
        self.act_ratios = [1.0] * len(self._layers)
        self.weight_ratios = [1.0] * len(self._linears)
        self.history: list[dict] = []
        self.probe_batches_used = 0
        self._steps = 0
        # Per-backward state: the mode, and the kept sequences (None: all) that the samplers above have left.
        self._mode = _TRAIN
        self._kept: torch.Tensor | None = None
        self._batch = 0  # the batch size the samplers saw (the linears' inputs must share it)
        self._probe_norms: list[list[torch.Tensor]] | None = None  # the exact probe backward's norms, per layer
        self._probe_weight_var: list[torch.Tensor] | None = None  # the sampled probe backwards' dW variance
        # Counts for metrics(): (sequence, layer) pairs with a backward, and rows entering dW of the kept rows.
        self._act_run = self._act_total = self._dw_rows = self._dw_total = self._probe_batches_step = 0
        self._hooks = [layer.register_forward_hook(self._make_output_hook(i)) for i, layer in enumerate(self._layers)]
        for index, linear in enumerate(self._linears):
            linear.forward = self._make_linear_forward(index, linear)
        self._attached = True

    # ----------------------------------------------------------------- the training loop's calls

    def set_fraction(self, fraction: float) -> None:
        """A no-op (VCAS's ratios follow its measurements, not the budget); the loop's common call."""

    def before_step(self, batches) -> None:
        """Called by the training loop inside each timed step, before its forward: every ``every``-th call
        (the ``every``-th step, the ``2 every``-th, ...; their ``completed_steps % F == 0``) runs the variance
        probe on ``probe_batches`` more batches drawn from ``batches`` and adapts the ratios."""
        self._steps += 1
        if self._steps % self.every == 0:
            self.adapt(self.probe(batches))

    def metrics(self) -> dict[str, float]:
        """Since the last call, over the training backwards (the probe's excluded): ``act_fraction``, the fraction
        of (sequence, decoder layer) pairs whose backward ran (also as ``mean_depth_fraction``, the harness's
        column); ``weight_fraction``, the rows that entered the linears' ``dW`` over the rows of the kept
        sequences; ``s``, the norm share now; ``probe_batches``, the batches a probe drew."""
        out = {"s": self.s, "probe_batches": float(self._probe_batches_step)}
        if self._act_total:
            out["act_fraction"] = out["mean_depth_fraction"] = self._act_run / self._act_total
        if self._dw_total:
            out["weight_fraction"] = self._dw_rows / self._dw_total
        self._act_run = self._act_total = self._dw_rows = self._dw_total = self._probe_batches_step = 0
        return out

    def summary(self) -> dict:
        """The state at the end, for the arm's record: the norm share, the ratios, the probes' history."""
        return {"every": self.every, "tau_act": self.tau_act, "tau_weight": self.tau_weight,
                "probe_rounds": len(self.history), "probe_batches": self.probe_batches_used, "s": self.s,
                "act_ratios": list(self.act_ratios),
                "weight_ratios": dict(zip(self.linear_names, self.weight_ratios)), "history": list(self.history)}

    def detach(self) -> None:
        """Restore the linears' own ``forward`` and remove the layer hooks."""
        if self._attached:
            for linear in self._linears:
                del linear.forward
            for h in self._hooks:
                h.remove()
            self._attached = False

    # ----------------------------------------------------------------- installation

    def _make_output_hook(self, index: int):
        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return output
            if isinstance(output, tuple):  # older transformers: (hidden_states, ...)
                return (_ActivationSampler.apply(output[0], self, index),) + output[1:]
            return _ActivationSampler.apply(output, self, index)

        return hook

    def _make_linear_forward(self, index: int, linear: torch.nn.Linear):
        def vcas_forward(x):
            if not torch.is_grad_enabled():
                return F.linear(x, linear.weight, linear.bias)
            if torch.is_autocast_enabled(x.device.type):
                raise RuntimeError("VCAS's sampled linears do not run under autocast (their backward would mix "
                                   "dtypes); train in the weights' dtype, as the harness does (bf16 on CUDA)")
            return _SampledLinear.apply(x, linear.weight, linear.bias, self, index)

        return vcas_forward

    # ----------------------------------------------------------------- 1. activation-gradient sampling

    def _sample_activation_gradient(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        """The backward of layer ``index``'s output: the sampled gradient (module docstring, 1). Sets the kept
        sequences that the linears of this layer and of the layers below read."""
        B = self._batch = grad.shape[0]
        if self._mode == _EXACT:
            self._kept = None
            if self._probe_norms is not None:
                self._probe_norms[index].append(_sequence_norms(grad))
            return grad
        top = index == len(self._layers) - 1
        if top or self.act_ratios[index] < self.act_ratios[index + 1]:
            k = max(1, int(B * self.act_ratios[index]))
            if k >= B:
                self._kept = None
            else:
                norms = _sequence_norms(grad)
                pi, keep = poisson_pips(norms, k, self._generator)
                # A sequence already dropped above (norm 0; drawn only where fewer than k have a gradient) stays
                # dropped: its gradient is 0 either way, and the linears below need not compute it.
                keep &= norms > 0
                self._kept = keep.nonzero().squeeze(1)  # synchronises: the gathered shapes need the count
                scale = torch.where(keep, 1.0 / pi, 0.0).to(torch.float32)
                grad = (grad * scale.view(B, *([1] * (grad.dim() - 1)))).to(grad.dtype)
        if self._mode == _TRAIN:
            self._act_total += B
            self._act_run += B if self._kept is None else self._kept.numel()
        return grad

    # ----------------------------------------------------------------- 2. the linears' backward

    def _linear_backward(self, index: int, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                         need_x: bool, need_w: bool):
        """``(dX, dW)`` of linear ``index`` (module docstring, 2): both on the kept sequences' rows only, ``dW``
        sampled by leverage score in a training backward, exact in the probe's."""
        kept = self._kept
        if kept is not None and (x.dim() < 3 or x.shape[0] != self._batch):
            raise RuntimeError(f"VCAS: linear {self.linear_names[index]} got an input of shape {tuple(x.shape)}; "
                               f"per-sequence sampling needs [batch={self._batch}, tokens, features]")
        if kept is not None:  # gather the kept sequences: the GEMMs below run on their rows only
            g, xs = grad.index_select(0, kept), x.index_select(0, kept)
        else:
            g, xs = grad, x
        g2, x2 = g.reshape(-1, g.shape[-1]), xs.reshape(-1, xs.shape[-1])
        grad_x = grad_w = None
        if need_x:
            rows = (g2 @ weight).view(*xs.shape[:-1], weight.shape[1])
            grad_x = rows if kept is None else torch.zeros_like(x).index_copy_(0, kept, rows)
        if need_w:
            grad_w = self._weight_gradient(index, g2, x2)
        return grad_x, grad_w

    def _weight_gradient(self, index: int, g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """``dW`` of linear ``index`` from its kept rows: sampled at ``nu`` in training, exact in the probe."""
        k = int(g2.shape[0] * self.weight_ratios[index])
        if self._mode != _TRAIN:  # the probe's sampled backwards also add up what sampling at nu would add
            if self._mode == _SAMPLED and self._probe_weight_var is not None:
                self._probe_weight_var[index] += weight_gradient_variance(g2, x2, k)
            return g2.t() @ x2
        grad_w, rows = sampled_weight_gradient(g2, x2, k, self._generator)
        self._dw_rows += rows
        self._dw_total += g2.shape[0]
        return grad_w

    # ----------------------------------------------------------------- 3. the controller

    def probe(self, batches) -> VarianceEstimate:
        """Measure the variances on ``probe_batches`` more batches drawn from ``batches`` (module docstring, 3).
        Reads gradients with ``torch.autograd.grad``: the parameters' ``.grad`` is left as it was."""
        M = self.probe_batches
        weights = [lin.weight for lin in self._linears]
        device = weights[0].device
        subsets = [torch.randperm(w.numel(), generator=self._generator, device=device)[
                   :max(1, int(w.numel() * self.param_sample_ratio))] for w in weights]
        scalars = lambda: [torch.zeros((), dtype=torch.float64, device=device) for _ in weights]  # noqa: E731
        act_sq, self._probe_weight_var = scalars(), scalars()
        total = [torch.zeros(idx.numel(), dtype=torch.float64, device=device) for idx in subsets]  # per entry
        total_sq = [t.clone() for t in total]
        self._probe_norms = [[] for _ in self._layers]
        try:
            for _ in range(M):
                x = next(batches).to(device, non_blocking=True)
                self.probe_batches_used += 1
                self._probe_batches_step += 1
                loss = self._loss(x)
                self._mode = _EXACT
                exact = _entries(torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True), subsets)
                for i, e in enumerate(exact):
                    total[i] += e
                    total_sq[i] += e.square()
                self._mode = _SAMPLED
                for r in range(M):
                    sampled = _entries(torch.autograd.grad(loss, weights, retain_graph=r < M - 1, allow_unused=True),
                                       subsets)
                    for i, (a, e) in enumerate(zip(sampled, exact)):
                        act_sq[i] += (a - e).square().sum()
        finally:
            self._mode, self._kept = _TRAIN, None
        # Per entry, the unbiased variance across the M batches (their sum(E[g^2] - E[g]^2) * M/(M-1)), summed.
        subset_var = [((sq - t * t / M) / (M - 1)).sum() for t, sq in zip(total, total_sq)]
        share = [idx.numel() / w.numel() for idx, w in zip(subsets, weights)]  # scale the subset to the tensor
        sgd, act, wvar = (torch.stack(t).tolist() for t in (subset_var, act_sq, self._probe_weight_var))
        s_up, s_down = min(1.0, self.s + S_STEP), max(0.0, self.s - S_STEP)
        estimate = VarianceEstimate(
            sgd_var=[v / f for v, f in zip(sgd, share)],
            act_var=[v / (M * M) / f for v, f in zip(act, share)],
            weight_var=[v / (M * M) for v in wvar],
            ratios_up=[sum(top_share_fraction(n, s_up) for n in norms) / M for norms in self._probe_norms],
            ratios_down=[sum(top_share_fraction(n, s_down) for n in norms) / M for norms in self._probe_norms])
        self._probe_norms = self._probe_weight_var = None
        return estimate

    def adapt(self, est: VarianceEstimate) -> None:
        """Their update rule (module docstring, 3): move ``s`` by 0.01 against ``tau_act``, the per-layer ``rho``
        toward the candidate ratios at the new ``s`` (non-decreasing toward the top, smoothed 0.6/0.4), each
        ``nu`` by x/÷ 0.95 against ``tau_weight``. Appends a record to ``history``."""
        act_ratio = _ratio(sum(est.act_var), sum(est.sgd_var))
        if act_ratio > self.tau_act:  # the activation sampling adds too much: keep more of the gradient norm
            self.s = min(1.0, self.s + S_STEP)
            new = list(est.ratios_up)
        else:
            self.s = max(0.0, self.s - S_STEP)
            new = list(est.ratios_down)
        for i in range(1, len(new)):  # non-decreasing toward the top: the bottom layers keep the fewest
            new[i] = max(new[i], new[i - 1])
        self.act_ratios = [SCHEDULE_DECAY * r + (1.0 - SCHEDULE_DECAY) * n for r, n in zip(self.act_ratios, new)]
        weight_ratios = [_ratio(w, g) for w, g in zip(est.weight_var, est.sgd_var)]
        self.weight_ratios = [nu / WEIGHT_RATIO_MUL if r > self.tau_weight else nu * WEIGHT_RATIO_MUL
                              for nu, r in zip(self.weight_ratios, weight_ratios)]
        self.history.append({
            "step": self._steps, "s": self.s, "act_var_over_sgd_var": act_ratio,
            "weight_var_over_sgd_var_mean": sum(weight_ratios) / len(weight_ratios),
            "act_ratio_mean": sum(self.act_ratios) / len(self.act_ratios),
            "act_ratio_bottom": self.act_ratios[0], "act_ratio_top": self.act_ratios[-1],
            "weight_ratio_mean": sum(min(1.0, nu) for nu in self.weight_ratios) / len(self.weight_ratios)})

    def _loss(self, ids: torch.Tensor) -> torch.Tensor:
        """The harness's language-model loss (labels = inputs, HF shifts them)."""
        return self.model(input_ids=ids, labels=ids).loss


def _sequence_norms(grad: torch.Tensor) -> torch.Tensor:
    """One L2 norm per batch element over all its tokens and features, accumulated in float32."""
    return torch.linalg.vector_norm(grad.flatten(1), dim=1, dtype=torch.float32)


def _entries(grads, subsets) -> list[torch.Tensor]:
    """The probe's measured entries of each weight gradient, float64 (a gradient autograd did not reach: 0)."""
    return [torch.zeros(idx.numel(), dtype=torch.float64, device=idx.device) if g is None
            else g.flatten().index_select(0, idx).double() for g, idx in zip(grads, subsets)]


def _ratio(var: float, sgd_var: float) -> float:
    """``var / sgd_var``; an SGD variance of 0 reads as inf where the sampling adds any, else 0."""
    if sgd_var > 0:
        return var / sgd_var
    return math.inf if var > 0 else 0.0
