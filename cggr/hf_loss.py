"""cggr's fused loss inside a Hugging Face causal LM's forward (``RoutingConfig.fused_loss``).

An HF causal LM computes ``logits = lm_head(hidden)`` for every token, upcasts them to fp32 and takes the
cross-entropy of the shifted labels: with a large vocabulary those ``[tokens, vocab]`` logits are among the
largest tensors of a training step, and routing only reads them to score tokens. With ``fused_loss=True``,
:func:`cggr.attach` replaces the causal LM's forward, on the instance, by :class:`FusedLossForward`. In a
training forward with labels it

1. runs the model's own forward with ``labels=None``, its ``lm_head`` standing aside for that call (a capture
   of the head's input, returned in place of the logits);
2. computes :func:`cggr.loss.linear_cross_entropy` of those hidden states, the head's weight and bias and the
   labels (shifted as the family table says HF shifts them), ``mean`` over valid labels, or ``sum`` divided by
   HF's ``num_items_in_batch``; plus an MoE model's auxiliary loss exactly as HF adds it;
3. returns the model's own output type with ``loss`` set and ``logits=None``.

The loss's per-token scores go to the router that installed this forward (:meth:`cggr.router.Router.take_scores`,
the one method of the router it calls), which routes the running forward by them: every policy routes as it
would by the logits. Anything else (eval, ``no_grad``, no labels, ``logits_to_keep``)
calls the original forward unchanged.

Running the model's own forward keeps its argument handling (each family's names, caches, attention masks,
``output_router_logits``, any kwargs) exactly as it is. What happens to the logits after ``lm_head`` is checked,
not assumed: :func:`fused_loss_target` refuses, at attach, families known to transform them (softcapping,
logit scales), a head that is not a plain ``nn.Linear`` and a replaced loss function; and at every call the
output's logits must be the very tensor the capture returned, unmodified, or the call raises. A forward already
replaced on the instance (accelerate's mixed-precision wrapper, which the HF Trainer installs with ``bf16=True``)
is the one called, and the loss runs in the autocast state the head ran in.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from .adapters import default_label_shift, find_causal_lm
from .loss import linear_cross_entropy

# Config (or model) attributes of HF families whose forward changes the logits after lm_head.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": "softcaps its logits (Gemma 2 / 3)",
    "logit_scale": "scales its logits (Cohere)",
    "logits_scaling": "divides its logits by a scale (Granite)",
}


def _refuse(why: str) -> ValueError:
    return ValueError(f"cggr: fused_loss=True {why}; attach with fused_loss=False (HF's own loss, from the logits)")


def _head_of(lm: nn.Module) -> nn.Module | None:
    get = getattr(lm, "get_output_embeddings", None)
    return get() if callable(get) else getattr(lm, "lm_head", None)


def _check_head(lm: nn.Module, head) -> None:
    name = type(lm).__name__
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise _refuse(f"needs {name}'s output head to be a plain nn.Linear (its weight and bias are all the fused "
                      f"loss uses), got {type(head).__name__}")
    if "forward" in head.__dict__:
        raise _refuse(f"needs {name}'s lm_head to run nn.Linear's forward, but its forward was replaced on the "
                      "instance (an accelerate offloading hook, say)")


def _uses_hf_causal_lm_loss(lm: nn.Module) -> bool:
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING

    if "_loss_function" in lm.__dict__ or inspect.getattr_static(type(lm), "loss_function", None) \
            is not PreTrainedModel.__dict__.get("loss_function"):
        return False
    loss_type = getattr(lm, "loss_type", None)
    causal = LOSS_MAPPING["ForCausalLM"]
    return LOSS_MAPPING.get(loss_type, causal) is causal


def fused_loss_target(model: nn.Module) -> nn.Module:
    """The HF causal LM (``model`` or the one inside a PEFT wrapper) whose forward takes the fused loss.

    Raises ``ValueError`` naming ``fused_loss`` where the fused loss would not be HF's loss.
    """
    lm = find_causal_lm(model)
    if lm is None:
        raise _refuse(f"needs a Hugging Face causal LM (a *ForCausalLM / *LMHeadModel with an nn.Linear lm_head, "
                      f"or a PEFT model around one), got {type(model).__name__}; a model of your own can call "
                      "cggr.loss.linear_cross_entropy in its forward instead")
    name = type(lm).__name__
    config = getattr(lm, "config", None)
    for attr, what in _LOGIT_TRANSFORMS.items():
        value = getattr(config, attr, None)
        if value is None:
            value = getattr(lm, attr, None)
        if value is not None:
            raise _refuse(f"cannot take {name}'s loss: its forward {what} after lm_head ({attr}={value!r}), which "
                          "the fused loss does not")
    _check_head(lm, _head_of(lm))
    if not _uses_hf_causal_lm_loss(lm):
        raise _refuse(f"computes HF's causal-LM cross-entropy (ForCausalLMLoss), but {name} has another loss "
                      f"function (loss_type={getattr(lm, 'loss_type', None)!r} or a loss_function set on it)")
    return lm


class _HeadCapture:
    """Stands in for ``lm_head.forward`` during one call: keeps the head's input and the autocast state the head
    would have run in (a wrapper's included, such as accelerate's mixed precision); returns the input as logits."""

    def __init__(self):
        self.calls = 0
        self.hidden: torch.Tensor | None = None
        self.version = -1
        self.autocast: tuple[bool, torch.dtype] | None = None

    def __call__(self, hidden, *args, **kwargs):
        self.calls += 1
        if args or kwargs or not isinstance(hidden, torch.Tensor):
            raise TypeError("cggr: fused_loss=True: the model called its lm_head with arguments other than one "
                            "tensor of hidden states; attach with fused_loss=False")
        self.hidden, self.version = hidden, hidden._version
        device = hidden.device.type
        self.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return hidden

    def hidden_for(self, out, name: str) -> torch.Tensor:
        """The head's input, once checked that the forward passed the head's output through untouched."""
        if self.calls != 1:
            raise RuntimeError(f"cggr: fused_loss=True: {name}'s forward called its lm_head {self.calls} times, not "
                               "once; attach with fused_loss=False")
        logits = getattr(out, "logits", None)
        if logits is not self.hidden or logits._version != self.version:
            raise RuntimeError(f"cggr: fused_loss=True: {name}'s forward changed its logits after lm_head (a "
                               "softcap, a scale, a cast, ...), which the fused loss does not; attach with "
                               "fused_loss=False")
        return self.hidden


class FusedLossForward:
    """A causal LM's forward with cggr's fused loss in training calls with labels (see the module docstring).

    A module-level object, not a closure, so that ``copy.deepcopy`` and ``pickle`` of the model work; its
    signature is the model's own (the HF Trainer reads it to choose dataset columns and loss kwargs).
    """

    def __init__(self, model: nn.Module, router, grad_norm: bool = False):
        self.model = model
        # The router that installed this forward (:class:`cggr.install.InstalledRouter`): it takes the loss's
        # per-token scores for the running forward (``take_scores``, the one method called here).
        self.router = router
        self.shift_labels = default_label_shift(model) == 1
        self.grad_norm = grad_norm  # also score each token's loss-gradient norm (importance="loss" routing)
        # An instance-level forward installed before (accelerate's mixed-precision wrapper, say), called inside
        # this one and put back by detach; else None, and the class's forward is called with the model.
        self.previous = model.__dict__.get("forward")

    @property
    def __signature__(self) -> inspect.Signature:
        if self.previous is not None:
            try:
                return inspect.signature(self.previous)
            except (TypeError, ValueError):
                pass
        return inspect.signature(type(self.model).forward.__get__(self.model))

    def plain(self, *args, **kwargs):
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        m = self.model
        if not (m.training and torch.is_grad_enabled()):
            return self.plain(*args, **kwargs)
        named = kwargs
        if args:
            try:
                named = self.__signature__.bind(*args, **kwargs).arguments
            except TypeError:
                return self.plain(*args, **kwargs)  # raises the forward's own error
            var_kw = [p.name for p in self.__signature__.parameters.values() if p.kind is p.VAR_KEYWORD]
            named = {**{k: v for k, v in named.items() if k not in var_kw},
                     **{k: v for n in var_kw for k, v in named.get(n, {}).items()}}
        labels = named.get("labels")
        keep = named.get("logits_to_keep", 0)
        if not isinstance(labels, torch.Tensor) or not (isinstance(keep, int) and keep == 0):
            return self.plain(*args, **kwargs)
        return self._fused(dict(named), labels)

    def _fused(self, kwargs: dict, labels: torch.Tensor):
        from transformers.utils import ModelOutput

        m = self.model
        name = type(m).__name__
        config = getattr(m, "config", None)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(config, "return_dict", True) is not False
        head = _head_of(m)
        _check_head(m, head)
        capture = _HeadCapture()
        head.forward = capture
        try:
            out = self.plain(**{**kwargs, "labels": None, "return_dict": True})
        finally:
            head.__dict__.pop("forward", None)
        if not isinstance(out, ModelOutput):
            raise RuntimeError(f"cggr: fused_loss=True: {name}'s forward returned {type(out).__name__}, not a "
                               "transformers ModelOutput; attach with fused_loss=False")
        hidden = capture.hidden_for(out, name)
        weight, bias = head.weight, head.bias
        amp, amp_dtype = capture.autocast
        if amp and hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)  # lm_head would run in the autocast dtype; the loss casts both there
        # As HF's ForCausalLMLoss: pre-shifted ``shift_labels`` when given, ``ignore_index`` from the kwargs.
        given_shifted = kwargs.get("shift_labels")
        target, shift = (given_shifted, False) if given_shifted is not None else (labels, self.shift_labels)
        num_items = kwargs.get("num_items_in_batch")
        with torch.autocast(hidden.device.type, dtype=amp_dtype, enabled=amp):  # as lm_head ran
            loss, scores = linear_cross_entropy(hidden, weight, target.to(hidden.device), bias,
                                                ignore_index=kwargs.get("ignore_index", -100),
                                                reduction="mean" if num_items is None else "sum", shift_labels=shift,
                                                num_items=num_items, grad_norm=self.grad_norm)
        self.router.take_scores(scores)
        aux = getattr(out, "aux_loss", None)
        if aux is not None:  # MoE: HF adds router_aux_loss_coef * aux_loss to the loss when labels are given
            coef = getattr(m, "router_aux_loss_coef", None)
            if coef is None:
                raise RuntimeError(f"cggr: fused_loss=True: {name}'s forward returned an aux_loss but the model has "
                                   "no router_aux_loss_coef to add it with as HF does; attach with fused_loss=False")
            loss = loss + coef * aux.to(loss.device)
        out = type(out)(**{**dict(out.items()), "loss": loss, "logits": None})
        return out if return_dict else out.to_tuple()
