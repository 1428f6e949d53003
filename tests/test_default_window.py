"""The centered layer's default window (issue 30, item 16): ``buffer_size=None``
stores 16 steps and averages the last ``m = clip(⌈16 / positions⌉, 2, 16)``.

Such a layer must train exactly like one whose window *is* ``m`` steps
(``buffer_size=m``): same outputs, input gradients, γ/β gradients and forward
statistics at every step, through the batch phase, the window phase, the
ring buffer's wrap and renormalization, with and without ghost batches. Only
the stored windows differ (16 rows against m).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mabn_jax
from mabn_jax import functional as F

C = 3
STEPS = 40  # past the 16-row ring's second wrap
KW = dict(warmup_steps=4, renorm_start=10, r_max=1.5, d_max=0.5, momentum=0.8, centered=True)


def _run(config, x, dy):
    """Per step: (y, dx, dscale, dbias, forward statistics) of a functional loop."""
    scale = jnp.asarray([1.5, 0.7, -1.0], jnp.float32)
    bias = jnp.asarray([0.1, -0.2, 0.3], jnp.float32)

    @jax.jit
    def step(state, x, dy):
        def loss(x, scale, bias, probes):
            y, new, stats = F.mabn_train_with_stats(x, scale, bias, state, probes, config)
            return jnp.sum(y * dy), (y, new, stats)

        (_, (y, new, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
            x, scale, bias, F.init_probes(state)
        )
        new = F.record_backward_stats(new, grads[3], previous=state)
        return new, (y, *grads[:3], stats)

    state = F.init_state((C,), config)
    out = []
    for t in range(STEPS):
        state, got = step(state, x[t], dy[t])
        out.append(jax.device_get(got))
    return state, out


@pytest.mark.parametrize(
    "spatial,m,ghost",
    [((1, 1), 16, None), ((1, 2), 8, None), ((2, 2), 4, None), ((3, 3), 2, None), ((2, 2), 4, 2)],
)
def test_default_window_trains_like_a_window_of_its_length(spatial, m, ghost):
    default = F.MABNConfig(norm_batch_size=ghost, **KW)
    assert default.window == 16 and default.window_length(spatial[0] * spatial[1]) == m
    explicit = F.MABNConfig(buffer_size=m, norm_batch_size=ghost, **KW)
    rng = np.random.default_rng(m)
    n = 4
    scales = np.exp(rng.normal(0.0, 1.0, (STEPS, 1, 1, 1, C)))
    x = jnp.asarray(rng.normal(0.3, 1.0, (STEPS, n, *spatial, C)) * scales, jnp.float32)
    dy = jnp.asarray(rng.normal(0.0, 1.0, (STEPS, n, *spatial, C)), jnp.float32)
    state_d, got = _run(default, x, dy)
    state_e, want = _run(explicit, x, dy)
    for t, (a, b) in enumerate(zip(got, want)):
        for u, v in zip(a[:4], b[:4]):  # y, dx, dscale, dbias
            np.testing.assert_allclose(u, v, rtol=2e-5, atol=2e-6, err_msg=f"step {t + 1}")
        for key in b[4]:
            np.testing.assert_allclose(a[4][key], b[4][key], rtol=2e-5, atol=2e-6, err_msg=key)
    assert state_d.psi_window.shape == (16, C) and state_e.psi_window.shape == (m, C)
    np.testing.assert_allclose(state_d.ema_var, state_e.ema_var, rtol=2e-5)


def test_window_length_follows_the_layer_and_replace():
    plain = mabn_jax.MABNConfig(centered=False)
    assert [plain.window_length(p) for p in (1, 4, 64)] == [16, 16, 16]
    centered = dataclasses.replace(plain, centered=True)
    assert [centered.window_length(p) for p in (1, 4, 64)] == [16, 4, 2]
    assert dataclasses.replace(centered, centered=False).window_length(64) == 16
    fixed = mabn_jax.MABNConfig(centered=True, buffer_size=8)
    assert fixed.window == 8 and fixed.window_length(64) == 8
    # A default window and the same number given are different configs (jit's
    # static arguments: they must not share a trace).
    sixteen = mabn_jax.MABNConfig(centered=True, buffer_size=16)
    assert sixteen.window_length(64) == 16 and sixteen != centered
    assert len({sixteen, centered, mabn_jax.MABNConfig(centered=True)}) == 2


def _linen_steps(stats, xs):
    """Linen training steps of one default centered layer from ``stats``: the outputs."""
    layer = mabn_jax.MABN(use_running_average=False, centered=True, warmup_steps=0)
    params = layer.init(jax.random.key(0), xs[0])["params"]
    outs = []
    for x in xs:

        def loss(params, stats=stats, x=x):
            y, updates = layer.apply(
                {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
            )
            return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape)), (y, updates)

        (_, (y, updates)), _ = mabn_jax.value_and_grad(loss, has_aux=True, batch_stats=stats)(
            params
        )
        stats = updates["batch_stats"]
        outs.append(np.asarray(y))
    return outs, stats


def test_linen_stores_the_steps_it_reads_and_takes_sixteen_rows():
    """linen sees the input at init and stores m rows; NNX (and a converted BN)
    stores 16. Either state trains the same way in either layer."""
    conv, dense = jnp.ones((2, 4, 4, C)), jnp.ones((2, C))
    init = lambda x: mabn_jax.MABN(use_running_average=False, centered=True).init(
        jax.random.key(0), x
    )["batch_stats"]
    assert init(conv)["psi_window"].shape == (2, C)  # m = 2 at 4×4
    assert init(dense)["psi_window"].shape == (16, C)  # m = 16 on dense features
    layer = mabn_jax.nnx.MABN(C, centered=True, rngs=nnx.Rngs(0))
    assert layer.mean_window[...].shape == layer.g_window[...].shape == (16, C)

    xs = jnp.asarray(np.random.default_rng(1).normal(0.5, 1.0, (8, 2, 4, 4, C)), jnp.float32)
    sixteen = {k: v[...] for k, v in nnx.state(layer, nnx.BatchStat).items()}
    got, after = _linen_steps(sixteen, xs)
    want, _ = _linen_steps(init(conv), xs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert after["psi_window"].shape == (16, C)

    old = {k: (v[:2] if k.endswith("window") else v) for k, v in init(dense).items()}
    with pytest.raises(ValueError, match="buffer_size=2 to keep"):
        _linen_steps(old, jnp.ones((1, 2, C)))


def test_dense_and_conv_layers_of_one_model_get_their_own_windows():
    """In one model a 4×4 conv's layer averages 2 steps and the dense layer
    after it 16: the model trains as the one with those windows set."""

    class Net(nn.Module):
        windows: tuple = (None, None)

        @nn.compact
        def __call__(self, x):
            kw = dict(use_running_average=False, centered=True, warmup_steps=0, momentum=0.8)
            h = nn.Conv(2, (3, 3))(x)
            h = mabn_jax.MABN(buffer_size=self.windows[0], **kw)(h)
            h = nn.Dense(3)(h.reshape(h.shape[0], -1))
            return mabn_jax.MABN(buffer_size=self.windows[1], **kw)(h)

    def train(net, xs):
        variables = net.init(jax.random.key(0), xs[0])
        params, stats = variables["params"], variables["batch_stats"]

        @jax.jit
        def step(params, stats, x):
            def loss(params):
                y, updates = net.apply(
                    {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
                )
                return jnp.sum(jnp.sin(y)), updates

            (value, updates), grads = mabn_jax.value_and_grad(
                loss, has_aux=True, batch_stats=stats
            )(params)
            params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
            return params, updates["batch_stats"], value

        losses = []
        for x in xs:
            params, stats, value = step(params, stats, x)
            losses.append(float(value))
        return np.array(losses), stats

    xs = jnp.asarray(np.random.default_rng(0).normal(0.5, 1.0, (24, 2, 4, 4, 1)), jnp.float32)
    got, stats = train(Net(), xs)
    want, _ = train(Net((2, 16)), xs)
    wrong, _ = train(Net((16, 16)), xs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(got - wrong).max() > 1e-3  # the windows do matter here
    assert stats["MABN_0"]["mean_window"].shape == (2, 2)
    assert stats["MABN_1"]["mean_window"].shape == (16, 3)
