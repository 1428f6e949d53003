"""Every hyper-parameter accepts the types it should and refuses the rest, by name.

The rules are restated here independently of ``mabn_jax/_config.py``: integer
settings take Python and NumPy integers (never bools: ``True`` is an int to
Python, not a window length), float settings take any real number but bools,
switches take bools. Hypothesis draws values of many types for every field;
each is checked on the config dataclass, the linen module and the NNX module.
"""

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import mabn_jax
import mabn_jax.nnx

INF = math.inf
# field -> (kind, low, high, low_open, high_open); ranges are inclusive unless open.
MABN_RULES = {
    "momentum": ("float", 0.0, 1.0, False, True),
    "epsilon": ("float", 0.0, INF, True, False),
    "buffer_size": ("int?", 1, 2**22, False, False),  # None: the variant's default
    "warmup_steps": ("int", 0, 2**22, False, False),
    "renorm_start": ("int", 0, 2**22, False, False),
    "r_max": ("float", 1.0, INF, False, False),
    "d_max": ("float", 0.0, INF, False, False),
    "norm_batch_size": ("int?", 1, INF, False, False),
    "centered": ("bool",),
    "use_fast_variance": ("bool",),
    "force_float32_reductions": ("bool",),
}
BRN_RULES = {
    "momentum": ("float", 0.0, 1.0, False, True),
    "epsilon": ("float", 0.0, INF, True, False),
    "r_max": ("float", 1.0, INF, False, False),
    "d_max": ("float", 0.0, INF, False, False),
    "warmup_steps": ("int", 0, 2**22, False, False),
    "ramp_steps": ("int", 0, 2**22, False, False),
    "renorm_momentum": ("float?", 0.0, 1.0, False, True),
    "r_min": ("float?", 0.0, 1.0, False, False),
    "d_ramp_steps": ("int?", 0, 2**22, False, False),
    "norm_batch_size": ("int?", 1, INF, False, False),
    "use_fast_variance": ("bool",),
    "force_float32_reductions": ("bool",),
    "average_stddev": ("bool",),
}
# What None becomes where it stands for a default (the plain MABN's window).
RESOLVED = {"buffer_size": 16}

VALUES = st.one_of(
    st.integers(-5, 2**23),
    st.integers(-3, 40).map(np.int64),
    st.integers(0, 40).map(np.int32),
    st.integers(0, 40).map(np.uint8),
    st.booleans(),
    st.booleans().map(np.bool_),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(-2, 20).map(np.float32),
    st.sampled_from([None, "4", "x", (1,), [2], np.array(3), np.array(0.5), jnp.asarray(3)]),
)


def expected(rule, value):
    """(accepted, canonical value) by the rule."""
    kind = rule[0]
    if value is None:
        return kind.endswith("?"), None
    if kind == "bool":
        ok = isinstance(value, (bool, np.bool_))
        return ok, bool(value) if ok else None
    _, low, high, low_open, high_open = rule
    is_bool = isinstance(value, (bool, np.bool_))
    if kind.startswith("int"):
        if is_bool or not isinstance(value, numbers.Integral):
            return False, None
    elif is_bool or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        return False, None
    v = float(value) if kind.startswith("float") else int(value)
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    return ok, v if ok else None


def check(config_cls, rules, layer, field, value):
    ok, canonical = expected(rules[field], value)
    if value is None and config_cls is mabn_jax.MABNConfig:
        canonical = RESOLVED.get(field)
    if ok:
        config = config_cls(**{field: value})
        got = getattr(config, field)
        # A resolved default window is an int that remembers it was a default (so
        # that dataclasses.replace(config, centered=...) resolves it anew).
        kind = int if value is None and field == "buffer_size" else type(canonical)
        assert got == canonical and type(got) is type(canonical) or isinstance(got, kind), (
            field,
            value,
            got,
        )
        hash(config)  # stays a valid static argument
    else:
        with pytest.raises(ValueError, match=rf"^{layer}: {field}=.* is invalid; {field} must"):
            config_cls(**{field: value})
    return ok


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(sorted(MABN_RULES)), value=VALUES)
def test_mabn_config_types(field, value):
    check(mabn_jax.MABNConfig, MABN_RULES, "MABN", field, value)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(BRN_RULES)), value=VALUES)
def test_batch_renorm_config_types(field, value):
    check(mabn_jax.BatchRenormConfig, BRN_RULES, "BatchRenorm", field, value)


def test_rules_cover_every_hyperparameter():
    """A new field must get a rule here (axis_name/groups/ghost_ema are checked below)."""
    others = {"axis_name", "axis_index_groups", "ghost_ema"}
    for cls, rules in ((mabn_jax.MABNConfig, MABN_RULES), (mabn_jax.BatchRenormConfig, BRN_RULES)):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields - others == set(rules), cls.__name__


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(sorted(MABN_RULES)), value=VALUES)
def test_modules_validate_like_the_config(field, value):
    """The linen and NNX modules accept and refuse exactly what the config does."""
    ok, _ = expected(MABN_RULES[field], value)
    build = (
        lambda: mabn_jax.MABN(**{field: value}),
        lambda: mabn_jax.nnx.MABN(3, rngs=nnx.Rngs(0), **{field: value}),
    )
    for make in build:
        if ok:
            make()
        else:
            with pytest.raises(ValueError, match=rf"{field}=.* is invalid"):
                make()


def test_the_other_fields():
    mabn_jax.MABNConfig(ghost_ema="group")
    with pytest.raises(ValueError, match="ghost_ema='steps' is invalid; ghost_ema must be 'step'"):
        mabn_jax.MABNConfig(ghost_ema="steps")
    config = mabn_jax.MABNConfig(axis_name="batch", axis_index_groups=np.array([[0, 1], [2, 3]]))
    assert config.axis_index_groups == ((0, 1), (2, 3))  # hashable
    hash(config)


@pytest.mark.parametrize("centered, m", [(False, 16), (True, 2)])
def test_default_window_per_variant(centered, m):
    """buffer_size=None (the default) stores 16 steps; the plain layer averages
    16, the centered one clip(⌈16 / positions⌉, 2, 16), 2 on this 4×4 input
    (docs/centered.md), which the linen layer stores (it sees the input at
    init; NNX stores 16). An explicit buffer_size wins in all three."""
    x = jnp.ones((2, 4, 4, 3))
    names = ("mean_window", "var_window", "g_window") if centered else ("x2_window",)
    for given_m, want in ((None, m), (16, 16), (5, 5)):
        kw = dict(centered=centered, buffer_size=given_m)
        config = mabn_jax.MABNConfig(**kw)
        assert (config.buffer_size, config.window_length(16)) == (given_m or 16, want)
        linen = mabn_jax.MABN(use_running_average=True, **kw)
        stats = linen.init(jax.random.key(0), x)["batch_stats"]
        layer = mabn_jax.nnx.MABN(3, rngs=nnx.Rngs(0), **kw)
        assert layer.buffer_size == (given_m or 16)
        for name in names + ("psi_window",):
            assert stats[name].shape == (want, 3), name
            assert getattr(layer, name)[...].shape == (given_m or 16, 3), name
