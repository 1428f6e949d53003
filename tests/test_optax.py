"""mabn_jax.optax.centralize: a plain Conv with a centered stored kernel and the
centralizing optimizer has CenteredConv's effective weights, step by step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import mabn_jax
import mabn_jax.optax


class Net(nn.Module):
    conv: type = nn.Conv

    @nn.compact
    def __call__(self, x, train: bool):
        x = self.conv(6, (3, 3), use_bias=False, name="conv", param_dtype=jnp.float64)(x)
        x = mabn_jax.MABN(
            use_running_average=not train,
            buffer_size=4,
            warmup_steps=3,
            renorm_start=5,
            param_dtype=jnp.float64,
            name="norm",
        )(x)
        return nn.Dense(3, name="head", param_dtype=jnp.float64)(nn.relu(x).mean((1, 2)))


def _mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, "key", None) == "conv" for k in path), params
    )


OPTIMIZERS = {
    "sgd-momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adamw": lambda: optax.adamw(3e-3, weight_decay=0.1),
    "schedule": lambda: optax.sgd(
        optax.cosine_decay_schedule(0.1, 100), nesterov=True, momentum=0.5
    ),
}


def _run(model, params, tx, steps=100):
    batch_stats = model.init(jax.random.key(0), jnp.ones((2, 6, 6, 2)), train=False)["batch_stats"]
    opt_state = tx.init(params)
    keys = jax.random.split(jax.random.key(1), steps)

    @jax.jit
    def step(params, batch_stats, opt_state, key):
        x = jax.random.normal(key, (2, 6, 6, 2), jnp.float64)
        y = jax.random.randint(key, (2,), 0, 3)

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

        (loss, updates), grads = mabn_jax.value_and_grad(
            loss_fn, has_aux=True, batch_stats=batch_stats
        )(params)
        u, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, u), updates["batch_stats"], opt_state, loss

    kernels, losses = [], []
    for key in keys:
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, key)
        kernels.append(params["conv"]["kernel"])
        losses.append(loss)
    return np.stack(kernels), np.array(losses)


@pytest.mark.parametrize(
    "name, center_updates",
    [(name, True) for name in sorted(OPTIMIZERS)] + [("sgd-momentum", False), ("schedule", False)],
)
def test_centralized_conv_has_centered_convs_effective_weights(name, center_updates):
    with jax.enable_x64(True):
        init = Net(mabn_jax.CenteredConv).init(
            jax.random.key(2), jnp.ones((2, 6, 6, 2)), train=False
        )["params"]
        stored, ref_losses = _run(Net(mabn_jax.CenteredConv), init, OPTIMIZERS[name]())
        tx = mabn_jax.optax.centralize(OPTIMIZERS[name](), _mask, center_updates=center_updates)
        kernels, losses = _run(Net(nn.Conv), mabn_jax.optax.center(init, _mask), tx)
        effective = np.asarray(jax.vmap(mabn_jax.center_kernel)(stored))
        np.testing.assert_allclose(kernels, effective, rtol=0, atol=1e-12)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-12)
        assert np.abs(kernels.reshape(100, -1, 6).mean(1)).max() < 1e-15  # stays centered
        assert np.abs(effective - stored).max() > 1e-3  # CenteredConv's stored kernel is not


def test_adam_needs_its_updates_centered():
    """Without center_updates, Adam's elementwise update leaves the kernel uncentered."""
    params = mabn_jax.optax.center({"kernel": jnp.array([[1.0], [3.0], [2.0]])}, {"kernel": True})
    tx = mabn_jax.optax.centralize(optax.adam(0.1), {"kernel": True}, center_updates=False)
    updates, _ = tx.update({"kernel": jnp.array([[1.0], [0.0], [0.0]])}, tx.init(params), params)
    assert abs(float(optax.apply_updates(params, updates)["kernel"].sum())) > 1e-3


def test_mask_must_fit_and_mark_kernels():
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "norm": {"scale": jnp.ones(4)}}
    with pytest.raises(ValueError, match="structure of the params"):
        mabn_jax.optax.center(params, {"conv": True})
    with pytest.raises(ValueError, match=r"only kernels \(rank >= 2"):
        mabn_jax.optax.center(params, lambda p: jax.tree.map(lambda _: True, p))
