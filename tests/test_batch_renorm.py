"""BatchRenorm: nn.BatchNorm while r = 1, d = 0 (with the same variance formula:
two-pass by default); r and d clipped; no gradient through them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import mabn_jax
from mabn_jax import _stats
from mabn_jax import functional as F

X_SHAPE = (4, 3, 3, 5)


def _data(steps=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 2.0, (steps,) + X_SHAPE).astype(np.float32)
    dy = rng.normal(0.0, 1.0, (steps,) + X_SHAPE).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(dy)


def _train_step(module):
    @jax.jit
    def step(variables, x, dy):
        def loss(params, x):
            y, up = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 x, use_running_average=False, mutable=["batch_stats"])
            return jnp.sum(y * dy), (y, up["batch_stats"])
        (_, (y, stats)), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            variables["params"], x)
        return {"params": variables["params"], "batch_stats": stats}, y, gp, gx
    return step


@pytest.mark.parametrize("fast_variance", [False, True])
def test_equals_batchnorm_while_r_is_1_and_d_is_0(fast_variance):
    kw = dict(momentum=0.9, epsilon=1e-3, use_fast_variance=fast_variance)
    x, dy = _data()
    brn = mabn_jax.BatchRenorm(warmup_steps=3, r_max=2.0, d_max=1.0, **kw)
    bn = nn.BatchNorm(**kw)
    key = jax.random.key(0)
    vb = jax.jit(functools.partial(bn.init, use_running_average=False))(key, x[0])
    params = {"scale": jnp.linspace(0.5, 2.0, 5), "bias": jnp.linspace(-1.0, 1.0, 5)}
    vb = {"params": params, "batch_stats": vb["batch_stats"]}
    vr = jax.jit(functools.partial(brn.init, use_running_average=False))(key, x[0])
    vr = {"params": params, "batch_stats": vr["batch_stats"]}
    step_b, step_r = _train_step(bn), _train_step(brn)
    for t in range(3):
        vb, yb, gpb, gxb = step_b(vb, x[t], dy[t])
        vr, yr, gpr, gxr = step_r(vr, x[t], dy[t])
        np.testing.assert_allclose(yr, yb, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(gxr, gxb, rtol=1e-5, atol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), gpr, gpb)
        for k in ("mean", "var"):
            np.testing.assert_allclose(vr["batch_stats"][k], vb["batch_stats"][k], rtol=1e-6)
    assert int(vr["batch_stats"]["step"]) == 3
    np.testing.assert_allclose(brn.apply(vr, x[0], use_running_average=True),
                               bn.apply(vb, x[0], use_running_average=True), rtol=1e-6, atol=1e-6)
    # After warm-up r and d act: the outputs part ways with BatchNorm.
    _, yr, _, _ = step_r(vr, x[0] * 4 + 3, dy[0])
    _, yb, _, _ = step_b(vb, x[0] * 4 + 3, dy[0])
    assert not np.allclose(yr, yb, atol=1e-2)


def test_default_variance_is_two_pass():
    """A large mean against a small spread in float32: BatchRenorm's default
    matches the exact variance (as nn.BatchNorm(use_fast_variance=False))."""
    assert mabn_jax.BatchRenorm().use_fast_variance is False
    assert F.BatchRenormConfig().use_fast_variance is False
    rng = np.random.default_rng(4)
    x = jnp.asarray(300.0 + 0.05 * rng.standard_normal((8, 4)), jnp.float32)
    exact = np.asarray(x, np.float64)
    exact = (exact - exact.mean(0)) / np.sqrt(exact.var(0) + 1e-5)
    state = F.init_batch_renorm_state((4,))
    # warmup_steps=1: the first step is batch norm (r = 1, d = 0).
    out = {fast: jax.jit(lambda x, s, fast=fast: F.batch_renorm_train(
        x, None, None, s, F.BatchRenormConfig(use_fast_variance=fast, warmup_steps=1))[0])(
            x, state) for fast in (False, True)}
    np.testing.assert_allclose(out[False], exact, rtol=1e-3, atol=1e-3)
    assert not np.allclose(out[True], exact, rtol=1e-1, atol=1e-1)


def test_clip_schedule_ramps_from_batchnorm_to_the_limits():
    steps = jnp.arange(8.0)
    config = F.BatchRenormConfig(r_max=3.0, d_max=5.0, warmup_steps=2, ramp_steps=4)
    r, d = F.clip_schedule(steps, config)
    np.testing.assert_allclose(r, [1, 1, 1.5, 2, 2.5, 3, 3, 3])
    np.testing.assert_allclose(d, [0, 0, 1.25, 2.5, 3.75, 5, 5, 5])
    r, d = F.clip_schedule(steps, F.BatchRenormConfig(r_max=3.0, d_max=5.0, warmup_steps=2))
    np.testing.assert_allclose(r, [1, 1, 3, 3, 3, 3, 3, 3])
    np.testing.assert_allclose(d, [0, 0, 5, 5, 5, 5, 5, 5])


def test_r_and_d_are_clipped_and_receive_no_gradient():
    mean_b = jnp.array([0.0, 10.0, -10.0, 0.1])
    var_b = jnp.array([100.0, 1.0, 1e-4, 1.0])
    zeros, ones = jnp.zeros(4), jnp.ones(4)
    factors = lambda var, ema_var, mean, ema_mean, epsilon: _stats.renorm_factors(
        var, ema_var, mean, ema_mean, r_max=3.0, d_max=5.0, epsilon=epsilon,
        active=jnp.asarray(True))
    r, d = factors(var_b, ones, mean_b, zeros, 0.0)
    np.testing.assert_allclose(r, [3.0, 1.0, 1 / 3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(d, [0.0, 5.0, -5.0, 0.1], rtol=1e-6)
    grads = jax.grad(lambda *a: jnp.sum(sum(factors(*a, 1e-5))),
                     argnums=(0, 1, 2, 3))(var_b, ones, mean_b, zeros)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)

    # Through the layer: dx is the gradient of γ((x − μ_B)/σ_B · r + d) + β with r, d constants.
    x, dy = _data(1, seed=1)
    x, dy = x[0], dy[0]
    state = F.init_batch_renorm_state((5,))._replace(step=jnp.asarray(10.0))
    config = F.BatchRenormConfig(r_max=1.2, d_max=0.1, epsilon=1e-5)
    stats = jax.jit(lambda x: F.batch_renorm_train(x, None, None, state, config)[2])(x)
    assert np.all(np.abs(stats["d"]) <= 0.1 + 1e-7) and np.any(np.abs(stats["d"]) > 0.099)
    assert np.all((stats["r"] >= 1 / 1.2 - 1e-6) & (stats["r"] <= 1.2 + 1e-6))
    gx = jax.jit(jax.grad(
        lambda x: jnp.sum(F.batch_renorm_train(x, None, None, state, config)[0] * dy)))(x)

    def by_hand(x):
        mu, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
        return jnp.sum(((x - mu) / jnp.sqrt(var + 1e-5) * stats["r"] + stats["d"]) * dy)
    np.testing.assert_allclose(gx, jax.jit(jax.grad(by_hand))(x), rtol=1e-4, atol=1e-5)


def test_bad_attributes_raise_naming_them():
    with pytest.raises(ValueError, match="BatchRenorm: r_max=0.5 is invalid"):
        mabn_jax.BatchRenorm(r_max=0.5)
    with pytest.raises(ValueError, match="BatchRenorm: ramp_steps=True is invalid"):
        F.BatchRenormConfig(ramp_steps=True)
    assert mabn_jax.BatchRenormConfig is F.BatchRenormConfig


@pytest.mark.parametrize("ramp_steps", [0, 3])
def test_infinite_clips_mean_no_clipping_and_no_nan(ramp_steps):
    """r_max = d_max = inf (Keras' default: no clipping) in warm-up, ramp and after:
    r = 1, d = 0 before the ramp, the unclipped factors once it has started."""
    inf = float("inf")
    config = F.BatchRenormConfig(r_max=inf, d_max=inf, warmup_steps=2, ramp_steps=ramp_steps,
                                 momentum=0.5)
    r_max, d_max = F.clip_schedule(jnp.arange(6.0), config)
    np.testing.assert_array_equal(r_max, [1, 1, inf, inf, inf, inf])
    np.testing.assert_array_equal(d_max, [0, 0, inf, inf, inf, inf])
    x, _ = _data(6, seed=2)
    # Jumps in scale and shift, far outside the paper's clips [1/3, 3] and [-5, 5].
    scale = jnp.array([1.0, 2.0, 30.0, 0.01, 1.0, 50.0])[:, None, None, None, None]
    x = x * scale + jnp.array([3.0, 3.0, 80.0, -80.0, 3.0, 3.0])[:, None, None, None, None]
    unclipped = []
    step = jax.jit(lambda x, s: F.batch_renorm_train(x, None, None, s, config))
    state = F.init_batch_renorm_state((5,))
    for t in range(6):
        y, new_state, stats = step(x[t], state)
        assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(v)) for v in new_state)
        sigma = np.sqrt(np.asarray(state.renorm_var) + config.epsilon)
        raw_r = np.sqrt(np.asarray(stats["sigma2_B"]) + config.epsilon) / sigma
        raw_d = (np.asarray(stats["mu_B"]) - np.asarray(state.renorm_mean)) / sigma
        want_r, want_d = (raw_r, raw_d) if t >= 2 else (np.ones(5), np.zeros(5))
        np.testing.assert_allclose(stats["r"], want_r, rtol=1e-6)
        np.testing.assert_allclose(stats["d"], want_d, rtol=1e-6, atol=1e-7)
        if t >= 2:
            unclipped.append((raw_r.max() > 3, raw_r.min() < 1 / 3, np.abs(raw_d).max() > 5))
        state = new_state
    assert np.all(np.any(unclipped, axis=0))  # each clip would have acted
