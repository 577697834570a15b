"""Every error a user can make names the argument and the allowed values."""

import pytest
import torch

import cggr
from tiny import TinyLM


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_buckets=0), "num_buckets must be an integer >= 1"),
    (dict(num_buckets=2.5), "num_buckets"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0"),
    (dict(leak_rate=1.5), r"leak_rate must be a number in \[0, 1\]"),
    (dict(leak_rate=-0.1), "leak_rate"),
    (dict(leak_rate="high"), "leak_rate"),
    (dict(mode="dense"), r"mode must be one of \('sparse', 'mask'\)"),
    (dict(policy="loss"), r"policy must be one of \('difficulty', 'random', 'sampled'\)"),
    (dict(handback_steps=10), "handback_steps=10 needs total_steps"),
    (dict(handback_steps=10, total_steps=5), "handback_steps=10 needs total_steps"),
    (dict(handback_steps=-1, total_steps=5), "handback_steps must be an integer >= 0"),
    (dict(total_steps=0), "total_steps must be None or an integer >= 1"),
    (dict(scorer="xent"), r"scorer must be one of"),
    (dict(depths=[0.5, 0.75, 0.25, 0.1]), "strictly decreasing"),
    (dict(depths=[1.0, 0.5]), "num_buckets=4"),
    (dict(depths=[1.2, 0.5, 0.25, 0.1]), r"\(0, 1\]"),
    (dict(depths=[1.0, 0.5, 0.25, 0.0]), r"\(0, 1\]"),
    (dict(depths=0.5), "depths"),
    (dict(label_shift=2), "label_shift"),
    (dict(buckets="all"), r"buckets must be one of \('local', 'global'\)"),
    (dict(layers="transformer.h"), "no attribute path 'transformer.h'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cggr.attach(TinyLM(), **kwargs)
    with pytest.raises(ValueError, match=match):
        cggr.CGGRWrapper(TinyLM(), **kwargs)


def test_valid_arguments():
    r = cggr.attach(TinyLM(), num_buckets=3, warmup_steps=0, leak_rate=1.0, mode="mask", policy="random",
                    depths=(1.0, 0.5, 0.2), scorer="margin", buckets="global")
    assert r.targets == [4, 2, 1]


def test_wrappers_are_refused_with_the_right_order_in_the_message():
    with pytest.raises(ValueError, match="attach cggr to the model first"):
        cggr.attach(torch.nn.DataParallel(TinyLM()))
    compiled = torch.compile(TinyLM(), backend="eager")
    with pytest.raises(ValueError, match="torch.compile"):
        cggr.attach(compiled)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ignore_index=None), "ignore_index must be an integer"),
    (dict(ignore_index=1.5), "ignore_index must be an integer"),
    (dict(num_buckets=10**6), r"num_buckets must be an integer in \[1, 256\]"),
    (dict(label_shift=True), "label_shift"),
])
def test_more_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cggr.attach(TinyLM(), **kwargs)


def test_config_object_and_overrides():
    config = cggr.RoutingConfig(num_buckets=2, warmup_steps=0, policy="difficulty")
    router = cggr.attach(TinyLM(), config, seed=3)
    assert router.config == cggr.RoutingConfig(num_buckets=2, warmup_steps=0, policy="difficulty", seed=3)
    wrapper = cggr.CGGRWrapper(TinyLM(), config)
    assert wrapper.router.config == config


def test_unknown_option_and_positional_option_name_the_fix():
    with pytest.raises(TypeError, match="unknown cggr option.*'num_bucket'.*num_buckets"):
        cggr.attach(TinyLM(), num_bucket=4)
    with pytest.raises(TypeError, match=r"options go by name: cggr.attach\(..., num_buckets=4\)"):
        cggr.attach(TinyLM(), 4)


def test_every_option_has_a_docstring():
    import ast
    import inspect

    import cggr.config as config_module

    tree = ast.parse(inspect.getsource(config_module.RoutingConfig))
    body = tree.body[0].body
    documented = {a.target.id for a, d in zip(body, body[1:])
                  if isinstance(a, ast.AnnAssign) and isinstance(d, ast.Expr) and isinstance(d.value, ast.Constant)}
    assert documented == set(config_module.OPTION_NAMES)
