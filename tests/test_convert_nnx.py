"""mabn_jax.nnx.replace_batchnorm: every nnx.BatchNorm of a model's graph, wherever
it is held, becomes a centered MABN carrying the BatchNorm's parameters and
statistics, so inference is unchanged and mabn_jax.nnx.value_and_grad trains it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mabn_jax.nnx


class Holder(nnx.Module):
    """BatchNorms in every kind of place an NNX model keeps submodules."""

    def __init__(self, rngs):
        bn = lambda **kw: nnx.BatchNorm(4, momentum=0.8, rngs=rngs, **kw)
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.attr = bn(epsilon=1e-3)
        self.shared = self.attr  # the same layer twice
        self.plain_list = nnx.data([bn(), nnx.Linear(4, 4, rngs=rngs)])
        self.plain_dict = nnx.data({"a": bn()})
        self.plain_tuple = nnx.data((bn(),))
        self.nnx_list = nnx.List([bn()])
        self.nnx_dict = nnx.Dict({"b": bn(use_bias=False)})
        self.seq = nnx.Sequential(bn(use_scale=False), nnx.relu)

    def __call__(self, x):
        x = self.attr(self.linear(x))
        x = self.plain_list[1](self.plain_list[0](x))
        for layer in (
            self.plain_dict["a"],
            self.plain_tuple[0],
            self.nnx_list[0],
            self.nnx_dict["b"],
            self.seq,
        ):
            x = layer(x)
        return x.sum(-1)


def pretrained():
    model = Holder(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (6, 3)) * 2 + 1
    for i in range(20):  # BN training steps: running statistics of x's distribution
        model(x + 0.1 * jax.random.normal(jax.random.key(i + 2), x.shape))
    model.eval()
    return model, x


def norms(model):
    return [
        (path, type(m).__name__)
        for path, m in nnx.iter_modules(model)
        if isinstance(m, (nnx.BatchNorm, mabn_jax.nnx.MABN))
    ]


def test_every_batchnorm_is_replaced_where_it_is_held_and_inference_is_unchanged():
    model, x = pretrained()
    before = model(x)
    stats = {
        path: (m.mean[...], m.var[...])
        for path, m in nnx.iter_modules(model)
        if isinstance(m, nnx.BatchNorm)
    }
    config = dict(buffer_size=4, warmup_steps=2, renorm_start=3)
    assert mabn_jax.nnx.replace_batchnorm(model, **config) is model
    found = norms(model)
    assert len(found) == 7 and {kind for _, kind in found} == {"MABN"}, found
    assert model.shared is model.attr  # a shared layer stays shared
    np.testing.assert_allclose(model(x), before, rtol=1e-6, atol=1e-6 * float(abs(before).max()))
    layer = model.attr
    mean, var = stats[("attr",)]
    np.testing.assert_array_equal(layer.ema_mean[...], mean)
    np.testing.assert_array_equal(layer.var_window[...], np.broadcast_to(var, (4, 4)))
    assert (layer.epsilon, layer.momentum, layer.centered, int(layer.step[...])) == (
        1e-3,
        0.8,
        True,
        4,
    )
    assert model.nnx_dict["b"].bias is None and model.seq.layers[0].scale is None


def test_replaced_model_trains_with_the_one_line_step():
    model, x = pretrained()
    # Made before the replacement: the parameters stay the same variables, same paths.
    optimizer = nnx.Optimizer(model, optax.sgd(0.01), wrt=nnx.Param)
    mabn_jax.nnx.replace_batchnorm(model, buffer_size=4, warmup_steps=2, renorm_start=3)
    model.train()
    target = jnp.arange(6.0)

    @nnx.jit
    def step(model, optimizer, x):
        loss_fn = lambda m: ((m(x) - target) ** 2).mean()
        loss, grads = mabn_jax.nnx.value_and_grad(loss_fn)(model)  # was nnx.value_and_grad
        optimizer.update(model, grads)
        return loss

    # Seven BNs in a row on one batch of 6: the loss is not monotone within the
    # first window (the gradient moves from frozen BN's to MABN's), but falls.
    losses = [float(step(model, optimizer, x)) for _ in range(8)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    state = nnx.state(model, nnx.BatchStat)
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(state))
    assert int(model.attr.step[...]) == 4 + 8 and int(model.attr.skipped[...]) == 0


def test_misuse_is_refused_by_name():
    model, _ = pretrained()
    with pytest.raises(ValueError, match="centered=False"):
        mabn_jax.nnx.replace_batchnorm(model, centered=False)
    with pytest.raises(TypeError, match="'epsilon' is taken from each batch norm"):
        mabn_jax.nnx.replace_batchnorm(model, epsilon=1e-3)
    with pytest.raises(TypeError, match="bufer_size"):
        mabn_jax.nnx.replace_batchnorm(model, bufer_size=4)
    with pytest.raises(TypeError, match="itself an nnx.BatchNorm"):
        mabn_jax.nnx.replace_batchnorm(model.attr)
    with pytest.raises(TypeError, match="mabn_jax.replace_batchnorm"):
        mabn_jax.nnx.replace_batchnorm(object())
    assert {kind for _, kind in norms(model)} == {"BatchNorm"}  # nothing half-replaced
