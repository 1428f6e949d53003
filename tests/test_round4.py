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


@pytest.mark.parametrize("centered, other", [(False, 2), (True, 16)])
def test_replace_of_config_resolves_the_default_window_again(centered, other):
    """Case 5: dataclasses.replace(config, centered=...) gets the other variant's default."""
    config = mabn_jax.MABNConfig(centered=centered)
    assert dataclasses.replace(config, centered=not centered).window == other
    explicit = mabn_jax.MABNConfig(centered=centered, buffer_size=5)
    assert dataclasses.replace(explicit, centered=not centered).window == 5
    assert config == mabn_jax.MABNConfig(centered=centered, buffer_size=config.window)


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
