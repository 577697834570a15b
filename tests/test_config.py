"""Every error a user can make names the argument and the allowed values."""

import copy
import dataclasses
import pickle

import pytest
import torch

import cggr
import cggr.config
from tests.tiny import TinyLM


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
    r = cggr.attach(TinyLM(), num_buckets=3, warmup_steps=0, leak_rate=1.0, mode="mask", policy="sampled",
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


# ---------------------------------------------------------------- the defaults and their automatic resolution
SEED = dict(inactive="stop", placement="nested", dense_ends=0)  # the seed's routing


@pytest.mark.parametrize("kwargs,expected", [
    (dict(), ("skip", "per_block", 1)),  # the default: skip, per-block, one dense block at each end
    (dict(policy="difficulty"), ("skip", "nested", 0)),
    (dict(policy="sampled"), ("skip", "nested", 0)),
    (dict(buckets="global"), ("skip", "nested", 0)),
    (dict(inactive="stop"), ("stop", "nested", 0)),  # the seed's routing: one argument away
    (dict(inactive="stop", policy="difficulty"), ("stop", "nested", 0)),
    (dict(num_buckets=1), ("skip", "nested", 0)),  # every token at full depth: no per-block draws
    (dict(num_buckets=1, depths=(0.5,)), ("skip", "per_block", 1)),
    (dict(mode="mask"), ("skip", "per_block", 1)),
    (dict(leak_rate=0.25), ("skip", "per_block", 1)),
    (dict(dense_ends=2), ("skip", "per_block", 2)),
    (dict(dense_ends=0), ("skip", "per_block", 0)),
    (dict(block_fractions=(1.0, 0.5, 0.5, 1.0)), ("skip", "per_block", 0)),
    (dict(placement="nested"), ("skip", "nested", 0)),
    (dict(placement="per_block"), ("skip", "per_block", 1)),
    (dict(placement="auto", dense_ends=None), ("skip", "per_block", 1)),
])
def test_defaults_resolve(kwargs, expected):
    config = cggr.RoutingConfig(**kwargs)
    assert (config.inactive, config.placement, config.dense_ends) == expected
    router = cggr.attach(TinyLM(), **kwargs)
    assert (router.config.inactive, router.config.placement, router.config.dense_ends) == expected
    assert (router._planner.config.placement == "per_block") == (expected[1] == "per_block")
    assert f"inactive={expected[0]!r}, placement={expected[1]!r}, dense_ends={expected[2]}" in repr(router)


def test_inactive_stop_alone_is_the_seeds_routing():
    assert cggr.RoutingConfig(inactive="stop") == cggr.RoutingConfig(**SEED)
    assert cggr.RoutingConfig(inactive="stop", policy="difficulty") == cggr.RoutingConfig(policy="difficulty", **SEED)


def test_resolved_values_read_as_plain_values():
    config = cggr.RoutingConfig()
    assert config.placement == "per_block" and config.dense_ends == 1 and config.placement != "auto"
    assert "placement='per_block', dense_ends=1" in repr(config)
    assert hash(config) == hash(cggr.RoutingConfig(placement="per_block", dense_ends=1))
    assert config == cggr.RoutingConfig(placement="per_block", dense_ends=1)
    import json

    import yaml

    # asdict gives the plain values (JSON, YAML's safe dumper): such a dict makes an explicit config
    plain = dataclasses.asdict(config)
    assert type(plain["placement"]) is str and type(plain["dense_ends"]) is int
    assert '"placement": "per_block", "dense_ends": 1' in json.dumps(plain)
    assert "placement: per_block" in yaml.safe_dump(plain)
    assert cggr.RoutingConfig(**plain) == config
    with pytest.raises(ValueError, match="needs policy='random'"):
        cggr.RoutingConfig(**{**plain, "policy": "difficulty"})


@pytest.mark.parametrize("copy_fn", [
    lambda c, **kw: c.replace(**kw),
    lambda c, **kw: dataclasses.replace(c, **kw),
    lambda c, **kw: cggr.config.resolve_config(c, kw),
    lambda c, **kw: pickle.loads(pickle.dumps(c)).replace(**kw),
    lambda c, **kw: copy.deepcopy(c).replace(**kw),
    lambda c, **kw: copy.copy(c).replace(**kw),
    lambda c, **kw: cggr.RoutingConfig(**{**{f: getattr(c, f) for f in cggr.config.OPTION_NAMES}, **kw}),
], ids=["method", "dataclasses", "resolve_config", "pickle", "deepcopy", "copy", "by_name"])
def test_replace_resolves_automatic_values_anew(copy_fn):
    default = cggr.RoutingConfig()
    for kw in (dict(policy="difficulty"), dict(policy="sampled"), dict(inactive="stop"), dict(buckets="global"),
               dict(num_buckets=1)):
        c = copy_fn(default, **kw)
        assert (c.placement, c.dense_ends) == ("nested", 0), kw
        back = copy_fn(c, **{k: getattr(default, k) for k in kw})  # and back to the default
        assert (back.placement, back.dense_ends) == ("per_block", 1), kw
    assert copy_fn(cggr.RoutingConfig(policy="difficulty"), policy="random").placement == "per_block"
    assert copy_fn(default, inactive="stop") == cggr.RoutingConfig(**SEED)
    assert copy_fn(default, seed=3).placement == "per_block"
    # values the user gave are kept, and checked against the new options
    assert copy_fn(cggr.RoutingConfig(placement="nested"), policy="random").placement == "nested"
    assert copy_fn(cggr.RoutingConfig(dense_ends=2), seed=1).dense_ends == 2
    assert copy_fn(default, placement="nested").dense_ends == 0
    with pytest.raises(ValueError, match="needs policy='random'"):
        copy_fn(cggr.RoutingConfig(placement="per_block"), policy="difficulty")
    with pytest.raises(ValueError, match=r"need placement='per_block' \(placement='auto' chose 'nested' here: "
                                         r"inactive='stop'\)"):
        copy_fn(cggr.RoutingConfig(dense_ends=1), inactive="stop")


@pytest.mark.parametrize("kwargs,match", [
    (dict(placement="everywhere"), r"placement must be one of \('auto', 'nested', 'per_block'\), got 'everywhere'"),
    (dict(placement=None), r"placement must be one of \('auto', 'nested', 'per_block'\)"),
    (dict(dense_ends=-1), "dense_ends must be an integer >= 0"),
    (dict(dense_ends=1.5), "dense_ends must be an integer >= 0"),
    (dict(dense_ends=True), "dense_ends must be an integer >= 0"),
    (dict(inactive="pass"), r"inactive must be one of \('stop', 'skip'\)"),
    (dict(placement="per_block", inactive="stop"), "placement='per_block' needs inactive='skip'"),
    (dict(placement="per_block", policy="difficulty"), "needs policy='random', got policy='difficulty'"),
    (dict(placement="per_block", buckets="global"), "needs buckets='local'"),
    (dict(placement="nested", dense_ends=1), r"need placement='per_block'$"),
    (dict(placement="nested", block_fractions=(1.0,) * 4), r"need placement='per_block'$"),
    (dict(dense_ends=1, policy="difficulty"),
     r"need placement='per_block' \(placement='auto' chose 'nested' here: policy='difficulty'\)"),
    (dict(block_fractions=(1.0,) * 4, buckets="global"),
     r"need placement='per_block' \(placement='auto' chose 'nested' here: buckets='global'\)"),
])
def test_placement_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cggr.RoutingConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        cggr.attach(TinyLM(), **kwargs)


# ---------------------------------------------------------------- numbers are numbers (issue 27)
# Every numeric option, with a value of the right range: a bool or a string in its place is refused.
NUMERIC = dict(num_buckets=2, warmup_steps=3, leak_rate=0.5, depths=(1.0, 0.5, 0.25, 0.125), ignore_index=1, seed=1,
               label_shift=1, handback_steps=1, total_steps=3, dense_ends=1, block_fractions=(1.0, 0.5, 0.5, 1.0),
               importance_mix=0.5, variance_budget=0.025, variance_every=10)
# The options a numeric option needs beside it to mean something (else it is refused as ignored).
CONTEXT = dict(handback_steps=dict(total_steps=5), importance_mix=dict(estimator="unbiased", importance="block"),
               variance_budget=dict(estimator="unbiased"), variance_every=dict(estimator="unbiased", variance_budget=0.1))


def test_every_numeric_option_is_in_the_bool_check():
    """A new numeric option must join NUMERIC (and so the checks below)."""
    fields = {f.name: f for f in dataclasses.fields(cggr.RoutingConfig)}
    numeric = {name for name, f in fields.items() if any(t in str(f.type) for t in ("int", "float"))}
    assert numeric == set(NUMERIC)


@pytest.mark.parametrize("name", sorted(NUMERIC))
@pytest.mark.parametrize("bad", ["bool", "str"])
def test_numeric_options_refuse_bools_and_strings(name, bad):
    good = NUMERIC[name]
    others = CONTEXT.get(name, {})
    cggr.RoutingConfig(**others, **{name: good})  # the value itself is fine
    if isinstance(good, tuple):
        value = (True,) + good[1:] if bad == "bool" else tuple(str(v) for v in good)
    else:
        value = True if bad == "bool" else str(good)
    with pytest.raises(ValueError, match=name):
        cggr.RoutingConfig(**others, **{name: value})


@pytest.mark.parametrize("kwargs", [
    dict(leak_rate=True), dict(leak_rate=False), dict(leak_rate="0.5"), dict(depths="1", num_buckets=1),
    dict(block_fractions="1111"), dict(block_fractions=(1.0, False, 0.5, 1.0)), dict(depths=(1.0, 0.5, False, 0.1)),
])
def test_no_bool_or_string_is_taken_as_a_number(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be"):
        cggr.attach(TinyLM(), **kwargs)


def test_numpy_and_tensor_numbers_are_numbers_but_their_bools_are_not():
    np = pytest.importorskip("numpy")
    assert cggr.RoutingConfig(leak_rate=np.float32(0.25)).leak_rate == 0.25
    assert cggr.RoutingConfig(block_fractions=np.array([1.0, 0.5, 0.5, 1.0])).block_fractions == (1.0, 0.5, 0.5, 1.0)
    assert cggr.RoutingConfig(leak_rate=torch.tensor(0.5)).leak_rate == 0.5
    for bad in (np.True_, torch.tensor(True)):
        with pytest.raises(ValueError, match="leak_rate must be a number"):
            cggr.RoutingConfig(leak_rate=bad)
    with pytest.raises(ValueError, match="block_fractions"):
        cggr.RoutingConfig(block_fractions=np.array([True, False, True, True]))


# ---------------------------------------------------------------- no option silently ignored (issue 27)
@pytest.mark.parametrize("kwargs,match", [
    (dict(dense_ends=1, block_fractions=(1.0, 0.5, 0.5, 1.0)),
     r"dense_ends=1 and block_fractions cannot be combined.*give them 1.0"),
    (dict(dense_ends=2, placement="per_block", block_fractions=(1.0, 0.5, 0.5, 1.0)),
     "dense_ends=2 and block_fractions cannot be combined"),
    (dict(num_buckets=2, block_fractions=(1.0, 0.5, 0.5, 1.0)), "num_buckets=2 and block_fractions cannot be combined"),
    (dict(num_buckets=1, block_fractions=(1.0, 0.5, 0.5, 1.0)), "num_buckets=1 and block_fractions"),
    (dict(depths=(1.0, 0.75, 0.5, 0.25), block_fractions=(1.0, 0.5, 0.5, 1.0)),
     r"depths=\(1.0, 0.75, 0.5, 0.25\) and block_fractions cannot be combined"),
    (dict(scorer="margin"), "scorer='margin' has no effect under policy='random'"),
    (dict(scorer="entropy", policy="random", placement="nested"), "scorer='entropy' has no effect"),
])
def test_options_that_would_be_ignored_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cggr.RoutingConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        cggr.attach(TinyLM(), **kwargs)


def test_the_options_block_fractions_uses_are_accepted_with_it():
    fractions = (1.0, 0.5, 0.5, 1.0)
    c = cggr.RoutingConfig(block_fractions=fractions, dense_ends=0, warmup_steps=10, handback_steps=2, total_steps=20)
    assert (c.placement, c.dense_ends, c.block_fractions) == ("per_block", 0, fractions)
    # an automatic dense_ends resolves anew (to 0) when block_fractions comes later; a given one is refused
    assert cggr.RoutingConfig().replace(block_fractions=fractions).dense_ends == 0
    with pytest.raises(ValueError, match="dense_ends=1 and block_fractions"):
        cggr.RoutingConfig(dense_ends=1).replace(block_fractions=fractions)
    assert cggr.RoutingConfig(policy="difficulty", scorer="margin").scorer == "margin"
    assert cggr.RoutingConfig(policy="sampled", scorer="entropy").scorer == "entropy"


# ---------------------------------------------------------------- config= by keyword (issue 27)
def test_config_by_keyword_as_the_docstrings_show():
    config = cggr.RoutingConfig(num_buckets=2, warmup_steps=0)
    assert cggr.attach(TinyLM(), config=config).config == config
    assert cggr.attach(TinyLM(), config=config, seed=3).config == config.replace(seed=3)
    assert cggr.CGGRWrapper(TinyLM(), config=config).router.config == config
    assert cggr.attach(TinyLM(), config=None).config == cggr.RoutingConfig()
    assert cggr.attach(model=TinyLM(), config=config).config == config
    assert cggr.CGGRWrapper(model=TinyLM(), config=config).router.config == config
    with pytest.raises(TypeError, match="config must be a cggr.RoutingConfig"):
        cggr.attach(TinyLM(), config={"num_buckets": 2})
    with pytest.raises(TypeError, match="multiple values for argument 'config'"):
        cggr.attach(TinyLM(), config, config=config)
