"""BatchRenorm: nn.BatchNorm while r = 1, d = 0; r and d clipped; no gradient through them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import mabn_jax
from mabn_jax import batch_renorm as BR

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


def test_equals_batchnorm_while_r_is_1_and_d_is_0():
    kw = dict(momentum=0.9, epsilon=1e-3)
    x, dy = _data()
    brn = BR.BatchRenorm(warmup_steps=3, r_max=2.0, d_max=1.0, **kw)
    bn = nn.BatchNorm(**kw)
    key = jax.random.key(0)
    vb = bn.init(key, x[0], use_running_average=False)
    params = {"scale": jnp.linspace(0.5, 2.0, 5), "bias": jnp.linspace(-1.0, 1.0, 5)}
    vb = {"params": params, "batch_stats": vb["batch_stats"]}
    vr = brn.init(key, x[0], use_running_average=False)
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
    np.testing.assert_allclose(brn.apply(vr, x[0], use_running_average=True),
                               bn.apply(vb, x[0], use_running_average=True), rtol=1e-6, atol=1e-6)
    # After warm-up r and d act: the outputs part ways with BatchNorm.
    _, yr, _, _ = step_r(vr, x[0] * 4 + 3, dy[0])
    _, yb, _, _ = step_b(vb, x[0] * 4 + 3, dy[0])
    assert not np.allclose(yr, yb, atol=1e-2)


def test_clip_schedule_ramps_from_batchnorm_to_the_limits():
    steps = jnp.arange(8)
    r, d = BR.clip_schedule(steps, 3.0, 5.0, warmup_steps=2, ramp_steps=4)
    np.testing.assert_allclose(r, [1, 1, 1.5, 2, 2.5, 3, 3, 3])
    np.testing.assert_allclose(d, [0, 0, 1.25, 2.5, 3.75, 5, 5, 5])
    r, d = BR.clip_schedule(steps, 3.0, 5.0, warmup_steps=2, ramp_steps=0)
    np.testing.assert_allclose(r, [1, 1, 3, 3, 3, 3, 3, 3])


def test_r_and_d_are_clipped_and_receive_no_gradient():
    mean_b = jnp.array([0.0, 10.0, -10.0, 0.1])
    var_b = jnp.array([100.0, 1.0, 1e-4, 1.0])
    zeros, ones = jnp.zeros(4), jnp.ones(4)
    r, d = BR.renorm_factors(mean_b, var_b, zeros, ones, 3.0, 5.0, 0.0)
    np.testing.assert_allclose(r, [3.0, 1.0, 1 / 3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(d, [0.0, 5.0, -5.0, 0.1], rtol=1e-6)
    grads = jax.grad(lambda *a: jnp.sum(sum(BR.renorm_factors(*a, 3.0, 5.0, 1e-5))),
                     argnums=(0, 1, 2, 3))(mean_b, var_b, zeros, ones)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)

    # Through the layer: dx is the gradient of γ((x − μ_B)/σ_B · r + d) + β with r, d constants.
    x, dy = _data(1, seed=1)
    x, dy = x[0], dy[0]
    state = BR.init_state((5,))._replace(step=jnp.asarray(10, jnp.int32))
    kw = dict(r_max=1.2, d_max=0.1, epsilon=1e-5)
    _, _, stats = BR.batch_renorm_train(x, None, None, state, **kw)
    assert np.all(np.abs(stats["d"]) <= 0.1 + 1e-7) and np.any(np.abs(stats["d"]) > 0.099)
    assert np.all((stats["r"] >= 1 / 1.2 - 1e-6) & (stats["r"] <= 1.2 + 1e-6))
    gx = jax.grad(lambda x: jnp.sum(BR.batch_renorm_train(x, None, None, state, **kw)[0] * dy))(x)

    def by_hand(x):
        mu, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
        return jnp.sum(((x - mu) / jnp.sqrt(var + 1e-5) * stats["r"] + stats["d"]) * dy)
    np.testing.assert_allclose(gx, jax.grad(by_hand)(x), rtol=1e-4, atol=1e-5)


def test_bad_attributes_raise_naming_them():
    with pytest.raises(ValueError, match="r_max"):
        BR.BatchRenorm(r_max=0.5).init(jax.random.key(0), jnp.ones((2, 3)), use_running_average=False)
    assert mabn_jax.BatchRenorm is BR.BatchRenorm
