"""A model with an MABN layer frozen in inference mode still trains with the helper.

Fine-tuning often freezes some norm layers (``use_running_average=True``)
while others train. The frozen layer's batch_stats come back unchanged from
the training apply; the helper must leave them so, not treat them as a
misuse of record_backward_stats (which raised eagerly and, under jit,
poisoned the frozen layer with NaN).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = mabn_jax.MABN(use_running_average=False, name="train")(x)
        return mabn_jax.MABN(use_running_average=True, centered=True, name="frozen")(x)


X = jnp.arange(12.0).reshape(4, 3) - 5.0


def _step(variables):
    def loss_fn(params):
        y, updates = Net().apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, X, mutable=["batch_stats"]
        )
        return jnp.sum(y**2), updates

    grad_fn = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=variables["batch_stats"])
    (_, updates), _ = grad_fn(variables["params"])
    return updates["batch_stats"]


def test_frozen_layer_is_left_as_it_is():
    # Under jit (eagerly the same skip applies; it used to raise instead of poisoning).
    variables = jax.jit(Net().init)(jax.random.key(0), X)
    new = jax.jit(_step)(variables)
    for k, v in new["frozen"].items():
        np.testing.assert_array_equal(v, variables["batch_stats"]["frozen"][k], err_msg=k)
    assert int(new["train"]["step"]) == 1
    assert np.isfinite(new["train"]["psi_window"]).all()
    assert not np.array_equal(
        new["train"]["psi_window"], variables["batch_stats"]["train"]["psi_window"]
    )


def test_low_level_record_of_the_old_tree_with_this_steps_gradients_raises():
    # Passing the old batch_stats as the new ones, with the gradients of a real
    # training apply, is a misuse the low-level function keeps catching: only a
    # layer whose state is unchanged AND whose probes got no gradient is frozen.
    stats = jax.jit(Net().init)(jax.random.key(0), X)["batch_stats"]
    params = jax.jit(Net().init)(jax.random.key(0), X)["params"]

    def loss(probes):
        y, _ = Net().apply(
            {"params": params, "batch_stats": stats, mabn_jax.PROBES: probes},
            X,
            mutable=["batch_stats"],
        )
        return jnp.sum(y**2)

    grads = jax.grad(loss)(mabn_jax.init_probes(stats))
    assert np.abs(grads["train"]["psi"]).max() > 0
    with pytest.raises(ValueError, match="not one training apply apart"):
        mabn_jax.record_backward_stats(stats, grads, previous=stats)
