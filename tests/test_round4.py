"""Round 4 of adversarial use: each case works or fails loudly, naming the fix."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import mabn_jax
import mabn_jax.nnx


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))


X = jnp.arange(6.0).reshape(2, 3)


def _bn_variables(**stats):
    variables = jax.tree.map(lambda a: a, Net().init(jax.random.key(0), X, train=False))
    variables["batch_stats"]["BatchNorm_0"].update(stats)
    return variables


@pytest.mark.parametrize(
    "name, value, says",
    [
        ("var", -5e-6, "var[2] = -5e-06"),
        ("var", np.nan, "var[2] = nan"),
        ("mean", np.inf, "mean[2]"),
    ],
)
def test_corrupt_pretrained_statistics_are_refused_by_name(name, value, says):
    """Case 3: a negative or non-finite running statistic names the layer and entry."""
    variables = _bn_variables()
    entry = variables["batch_stats"]["BatchNorm_0"]
    entry[name] = entry[name].at[2].set(value)
    with pytest.raises(ValueError, match=f"'BatchNorm_0'.*{re.escape(says)}"):
        mabn_jax.convert_batchnorm_variables(
            mabn_jax.replace_batchnorm(Net()), variables, X, train=False
        )
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    bn = model.layers[1]
    getattr(bn, name).set_value(getattr(bn, name)[...].at[2].set(value))
    with pytest.raises(ValueError, match=f"'layers/1'.*{re.escape(says)}"):
        mabn_jax.nnx.replace_batchnorm(model)
    assert isinstance(model.layers[1], nnx.BatchNorm)  # nothing replaced


def test_nnx_second_replace_is_a_no_op_or_loud():
    """Case 4: the same config again changes nothing; another one raises."""
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    mabn_jax.nnx.replace_batchnorm(model, buffer_size=4)
    layer = model.layers[1]
    assert mabn_jax.nnx.replace_batchnorm(model, buffer_size=4) is model
    assert model.layers[1] is layer
    with pytest.raises(ValueError, match="already replaced.*buffer_size=4"):
        mabn_jax.nnx.replace_batchnorm(model, buffer_size=8)
    with pytest.raises(ValueError, match="holds no nnx.BatchNorm"):
        mabn_jax.nnx.replace_batchnorm(nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0))))
    # A model's own MABN of another configuration beside a BatchNorm is no earlier
    # replacement: the BatchNorm is replaced, the MABN left as it is.
    mixed = nnx.Sequential(
        mabn_jax.nnx.MABN(3, centered=False, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    )
    own = mixed.layers[0]
    mabn_jax.nnx.replace_batchnorm(mixed)
    assert mixed.layers[0] is own and not own.centered
    assert isinstance(mixed.layers[1], mabn_jax.nnx.MABN) and mixed.layers[1].centered


@pytest.mark.parametrize("centered", [False, True])
def test_replace_of_config_resolves_the_default_window_again(centered):
    """Case 5: dataclasses.replace(config, centered=...) gets the other variant's
    default: the centered layer's window sized per layer (2 at 8×8 positions),
    the plain layer's 16."""
    config = mabn_jax.MABNConfig(centered=centered)
    other = dataclasses.replace(config, centered=not centered)
    assert other.window_length(64) == (2 if other.centered else 16)
    assert other == mabn_jax.MABNConfig(centered=not centered)
    explicit = mabn_jax.MABNConfig(centered=centered, buffer_size=5)
    assert dataclasses.replace(explicit, centered=not centered).window_length(64) == 5


def test_linen_replace_twice_is_a_no_op_or_loud():
    """Case 7: replace_batchnorm(replace_batchnorm(model)) is the same model."""
    once = mabn_jax.replace_batchnorm(Net())
    twice = mabn_jax.replace_batchnorm(once)
    assert twice is once
    variables = twice.init(jax.random.key(0), X, train=False)
    assert "mean_window" in variables["batch_stats"]["BatchNorm_0"]
    with pytest.raises(ValueError, match=r"replaced.module"):
        mabn_jax.replace_batchnorm(once, buffer_size=3)


def test_convert_errors_say_what_to_pass():
    """Case 12: an extra entry in a BatchNorm's stats, and params-only variables."""
    model = mabn_jax.replace_batchnorm(Net())
    variables = _bn_variables(count=jnp.zeros(()))
    with pytest.raises(ValueError, match=r"'BatchNorm_0'.*besides 'mean' and 'var': \['count'\]"):
        mabn_jax.convert_batchnorm_variables(model, variables, X, train=False)
    with pytest.raises(ValueError, match=r"not variables\['params'\].*needs no conversion"):
        mabn_jax.convert_batchnorm_variables(model, {"params": {}}, X, train=False)


def test_nnx_jax_checkpoint_of_the_loss_names_nnx_remat():
    """Case 13: a JAX transform of an NNX loss drops the state update; the error names
    the NNX transform to use."""
    model = nnx.Sequential(
        mabn_jax.nnx.CenteredLinear(3, 4, rngs=nnx.Rngs(0)), mabn_jax.nnx.MABN(4, rngs=nnx.Rngs(0))
    )

    def loss(m):
        return (m(X) ** 2).mean()

    with pytest.raises(ValueError, match=r"jax\.checkpoint.*nnx\.remat"):
        mabn_jax.nnx.value_and_grad(jax.checkpoint(loss))(model)


class Small(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = mabn_jax.CenteredDense(4)(x)
        return mabn_jax.MABN(use_running_average=not train, buffer_size=4)(x)


def _views():
    model = Small()
    x1 = jax.random.normal(jax.random.key(0), (4, 3))
    variables = model.init(jax.random.key(1), x1, train=False)
    bs = variables["batch_stats"]

    def apply(params, x):
        return model.apply(
            {"params": params, "batch_stats": bs}, x, train=True, mutable=["batch_stats"]
        )

    return variables["params"], bs, apply, x1, 2 * x1 + 1


def _loss_cases():
    params, bs, apply, x1, x2 = _views()

    def two_jits(p):  # each view through its own jax.jit
        (y1, u1), (y2, _) = jax.jit(apply)(p, x1), jax.jit(apply)(p, x2)
        return (y1**2).mean() + (y2**2).mean(), u1

    def vmapped(p):  # both views through jax.vmap, one view's update returned
        ys, us = jax.vmap(apply, (None, 0))(p, jnp.stack([x1, x2]))
        return (ys**2).mean(), jax.tree.map(lambda a: a[0], us)

    def frozen_in_jit(p):  # γ/β frozen by stop_gradient, the apply jitted in the loss
        p = {**p, "MABN_0": jax.lax.stop_gradient(p["MABN_0"])}
        y, u = jax.jit(apply)(p, x1)
        return (y**2).mean(), u

    def frozen_in_checkpoint(p):
        p = {**p, "MABN_0": jax.lax.stop_gradient(p["MABN_0"])}
        y, u = jax.checkpoint(apply)(p, x1)
        return (y**2).mean(), u

    return (
        params,
        bs,
        {
            "two_jits": (two_jits, "applied in training mode 2 times"),
            "vmap": (vmapped, "applied in training mode 2 times"),
            "frozen_jit": (frozen_in_jit, "probes received no gradient.*optax.masked"),
            "frozen_checkpoint": (frozen_in_checkpoint, "probes received no gradient"),
        },
    )


@pytest.mark.parametrize("case", ["two_jits", "vmap", "frozen_jit", "frozen_checkpoint"])
def test_views_and_freezing_under_transforms_are_loud(case):
    """Cases 1 and 2: two views through inner jits or a vmap (their Ψ_B would be
    summed), γ/β frozen by stop_gradient inside a transform (Ψ_B would be 0).
    Eagerly: ValueError naming the cause; under jit: the statistics are NaN, so
    the next training loss is NaN instead of silently wrong."""
    params, bs, cases = _loss_cases()
    loss, says = cases[case]
    grad_fn = mabn_jax.value_and_grad(loss, has_aux=True, batch_stats=bs)
    with pytest.raises(ValueError, match=says):
        grad_fn(params)
    (_, updates), _ = jax.jit(grad_fn)(params)
    assert not np.isfinite(updates["batch_stats"]["MABN_0"]["psi_window"]).all()


def test_one_view_in_an_inner_jit_still_trains():
    """The same loss with one jitted apply records Ψ_B as the plain loss does."""
    params, bs, apply, x1, _ = _views()

    def jitted(p):
        y, u = jax.jit(apply)(p, x1)
        return (y**2).mean(), u

    def plain(p):
        y, u = apply(p, x1)
        return (y**2).mean(), u

    got = mabn_jax.value_and_grad(jitted, has_aux=True, batch_stats=bs)(params)
    want = mabn_jax.value_and_grad(plain, has_aux=True, batch_stats=bs)(params)
    np.testing.assert_allclose(
        got[0][1]["batch_stats"]["MABN_0"]["psi_window"],
        want[0][1]["batch_stats"]["MABN_0"]["psi_window"],
        rtol=1e-6,
    )


def test_nnx_two_views_each_in_its_own_nnx_jit_are_loud():
    """Case 1, NNX: each view through its own nnx.jit call; the helper counts the
    layer's uses (before: NaN loss and a skipped step, with no message)."""
    model = nnx.Sequential(
        mabn_jax.nnx.CenteredLinear(3, 4, rngs=nnx.Rngs(0)),
        mabn_jax.nnx.MABN(4, buffer_size=4, rngs=nnx.Rngs(0)),
    )
    x1 = jax.random.normal(jax.random.key(0), (4, 3))
    apply = nnx.jit(lambda m, x: m(x))

    def loss(m):
        return (apply(m, x1) ** 2).mean() + (apply(m, 2 * x1 + 1) ** 2).mean()

    with pytest.raises(ValueError, match="applied in training mode 2 times"):
        mabn_jax.nnx.value_and_grad(loss)(model)
    assert not hasattr(model.layers[1], "uses_probe")  # detached after the error
    loss_one = lambda m: (apply(m, x1) ** 2).mean()  # noqa: E731
    mabn_jax.nnx.value_and_grad(loss_one)(model)  # one view: trains
    assert np.isfinite(model.layers[1].psi_window[...]).all()
    assert int(model.layers[1].step[...]) == 1


class _Tuned(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4)(x)
        return mabn_jax.MABN(use_running_average=False, buffer_size=4, name="norm")(x)


def _tuned_setup():
    variables = _Tuned().init(jax.random.key(0), X)
    return variables["params"], variables["batch_stats"]


def _tuned_loss(batch_stats, merge=lambda p: p, penalty=lambda p: 0.0):
    def loss(params):
        y, updates = _Tuned().apply(
            {"params": merge(params), "batch_stats": batch_stats}, X, mutable=["batch_stats"]
        )
        return jnp.sum(y**2) + penalty(params), updates

    return loss


def test_frozen_and_trainable_params_merged_in_the_loss_train():
    """Case 8: ``{**frozen, **trainable}`` with the norm frozen trains as the whole
    params do: the same loss, the Dense gradient and the recorded state."""
    params, stats = _tuned_setup()
    frozen, trainable = {"norm": params["norm"]}, {"Dense_0": params["Dense_0"]}
    merged = _tuned_loss(stats, merge=lambda p: {**frozen, **p})
    (loss, updates), grads = mabn_jax.value_and_grad(merged, has_aux=True, batch_stats=stats)(
        trainable
    )
    whole = mabn_jax.value_and_grad(_tuned_loss(stats), has_aux=True, batch_stats=stats)
    (want_loss, want_updates), want_grads = whole(params)
    assert sorted(grads) == ["Dense_0"]
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        (grads["Dense_0"], updates),
        (want_grads["Dense_0"], want_updates),
    )


def test_l2sp_against_pretrained_params_names_without_probes():
    """Case 10: tree_map of the loss's params against pretrained ones fails with a
    note naming mabn_jax.without_probes, and works with it."""
    params, stats = _tuned_setup()
    pretrained = jax.tree.map(lambda a: a + 0.1, params)
    l2 = lambda p: sum(
        jax.tree.leaves(jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), p, pretrained))
    )
    naive = _tuned_loss(stats, penalty=l2)
    with pytest.raises(ValueError) as info:
        mabn_jax.value_and_grad(naive, has_aux=True, batch_stats=stats)(params)
    assert any("mabn_jax.without_probes(params)" in n for n in info.value.__notes__)
    fixed = _tuned_loss(stats, penalty=lambda p: l2(mabn_jax.without_probes(p)))
    (loss, _), grads = mabn_jax.value_and_grad(fixed, has_aux=True, batch_stats=stats)(params)
    (plain, _), plain_grads = mabn_jax.value_and_grad(
        _tuned_loss(stats), has_aux=True, batch_stats=stats
    )(params)
    np.testing.assert_allclose(loss - plain, l2(params), rtol=1e-5)
    jax.tree.map(  # d/dp of sum (p - p0)^2 = 2 (p - p0) = -0.2
        lambda g, g0: np.testing.assert_allclose(g - g0, -0.2, rtol=1e-4), grads, plain_grads
    )


@pytest.mark.parametrize("jit", [False, True])
def test_helper_built_once_with_the_first_batch_stats_trains(jit):
    """Case 11: built once outside the loop with a fixed batch_stats=, then called
    with each step's tree (eagerly, or jitted once): it records against the tree
    it is called with, as a helper built in each step does (before: a blame
    eagerly, NaN under jit); with two such trees and neither the given one it
    raises naming the fix."""
    params, stats = _tuned_setup()

    def loss(params, batch_stats):
        return _tuned_loss(batch_stats)(params)

    once = mabn_jax.value_and_grad(loss, has_aux=True, batch_stats=stats)
    once = jax.jit(once) if jit else once
    got, want = stats, stats
    for _ in range(3):
        (_, updates), grads = once(params, got)
        got = updates["batch_stats"]
        fresh = mabn_jax.value_and_grad(loss, has_aux=True, batch_stats=want)
        # Compiled as `once` is: the comparison is of the records, not of eager
        # against compiled rounding (the gradient's ~4e-6 entries come out of
        # cancellations of terms near 1, which round differently when fused).
        fresh = jax.jit(fresh) if jit else fresh
        (_, fresh_updates), fresh_grads = fresh(params, want)
        want = fresh_updates["batch_stats"]
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
            (grads, got),
            (fresh_grads, want),
        )
    assert np.isfinite(got["norm"]["psi_window"]).all()

    def two(params, a, b):
        return loss(params, a)

    with pytest.raises(ValueError, match="several batch_stats trees.*inside the train step"):
        mabn_jax.value_and_grad(two, has_aux=True, batch_stats=stats)(params, got, want)


def _nnx_small():
    return nnx.Sequential(
        mabn_jax.nnx.CenteredLinear(3, 4, rngs=nnx.Rngs(0)),
        mabn_jax.nnx.MABN(4, buffer_size=4, rngs=nnx.Rngs(0)),
    )


def _freeze_params(m):  # γ/β frozen by stop_gradient of the norm's Params
    norm = m.layers[1]
    norm.scale.set_value(jax.lax.stop_gradient(norm.scale[...]))
    norm.bias.set_value(jax.lax.stop_gradient(norm.bias[...]))
    return m


def _freeze_state(m):  # stop_gradient over the whole state, probes included
    nnx.update(m, jax.lax.stop_gradient(nnx.state(m)))
    return m


@pytest.mark.parametrize("transform", [nnx.jit, nnx.remat])
def test_nnx_freezing_under_transforms_records_or_is_loud(transform):
    """Case 2, NNX: γ/β frozen by stop_gradient of their Params before nnx.jit /
    nnx.remat record the unfrozen Ψ_B (the probes are variables of their own);
    a stop_gradient over the whole state, which cuts the probes, raises eagerly
    and gives NaN statistics under nnx.jit (before: Ψ_B recorded as 0)."""
    x = jax.random.normal(jax.random.key(0), (4, 3))
    apply = transform(lambda m: (m(x) ** 2).mean())
    want, got = _nnx_small(), _nnx_small()
    for _ in range(2):
        mabn_jax.nnx.value_and_grad(lambda m: (m(x) ** 2).mean())(want)
        mabn_jax.nnx.value_and_grad(lambda m: apply(_freeze_params(m)))(got)
    # One run eager, one under the transform: float32 rounding of two compilations.
    np.testing.assert_allclose(
        got.layers[1].psi_window[...], want.layers[1].psi_window[...], rtol=1e-6
    )
    cut = lambda m: apply(_freeze_state(m))
    with pytest.raises(ValueError, match="probes received no gradient.*nnx.Param"):
        mabn_jax.nnx.value_and_grad(cut)(_nnx_small())
    model = _nnx_small()
    nnx.jit(mabn_jax.nnx.value_and_grad(cut))(model)
    assert not np.isfinite(model.layers[1].psi_window[...]).all()
