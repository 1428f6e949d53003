"""Where the spec says the custom VJP is a true gradient, it equals autodiff.

With buffer_size = 1 (or inside warm-up) and r = 1, the non-centered layer is
z = x / sqrt(mean(x²) + ε) and the centered one is exactly nn.BatchNorm. After
the window fills it is deliberately *not* a gradient; the centered variant's
whole trajectory is pinned to a NumPy transcription of the spec instead.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax
from layer_step import layer_step

EPS = 1e-5


def _data(key, shape, n):
    kx, kd, ks = jax.random.split(jax.random.key(key), 3)
    scales = 0.5 + 2.0 * jax.random.uniform(ks, (n, 1, 1, 1, shape[-1]))
    x = jax.random.normal(kx, (n,) + shape) * scales + 0.3
    dy = jax.random.normal(kd, (n,) + shape)
    return x, dy


def _rms_norm_ref(x, scale, bias):
    axes = tuple(range(x.ndim - 1))
    return x / jnp.sqrt(jnp.mean(x * x, axes) + EPS) * scale + bias


@jax.jit
def _ref_vjp(x, scale, bias, dy):
    y, vjp = jax.vjp(_rms_norm_ref, x, scale, bias)
    return y, vjp(dy)


@pytest.mark.parametrize("buffer_size,warmup", [(1, 0), (4, 100)])
def test_noncentered_equals_autodiff_in_batch_phase(buffer_size, warmup):
    """m = 1, or every step inside warm-up: ∂L/∂x is jax.grad of the RMS norm."""
    mod = mabn_jax.MABN(use_running_average=False, buffer_size=buffer_size,
                        warmup_steps=warmup, renorm_start=50)
    xs, dys = _data(0, (2, 3, 3, 4), 8)
    variables = mod.init(jax.random.key(1), xs[0])
    params = {"scale": jnp.linspace(0.5, 1.5, 4), "bias": jnp.linspace(-0.2, 0.2, 4)}
    bs, step = variables["batch_stats"], layer_step(mod)
    for x, dy in zip(xs, dys):
        y, dx, dp, bs = step(params, bs, x, dy)
        y_ref, (dx_ref, ds_ref, db_ref) = _ref_vjp(x, params["scale"], params["bias"], dy)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dp["scale"], ds_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dp["bias"], db_ref, rtol=1e-5, atol=1e-5)


def test_noncentered_is_not_a_gradient_once_the_window_is_used():
    """After warm-up with m > 1 the backward uses the Ψ window: it must differ."""
    mod = mabn_jax.MABN(use_running_average=False, buffer_size=4, warmup_steps=0)
    xs, dys = _data(2, (2, 3, 3, 4), 6)
    variables = mod.init(jax.random.key(1), xs[0])
    bs, step = variables["batch_stats"], layer_step(mod)
    for x, dy in zip(xs, dys):
        _, dx, _, bs = step(variables["params"], bs, x, dy)
    # Same forward statistics as the window but batch Ψ: plain autodiff of z = x·inv.
    inv = jax.lax.rsqrt(bs["x2_window"].mean(0) + EPS)
    assert not np.allclose(dx, dys[-1] - x * inv * jnp.mean(dys[-1] * x * inv, (0, 1, 2)) * inv,
                           atol=1e-3)


@pytest.mark.parametrize("buffer_size,warmup", [(1, 0), (4, 100)])
def test_centered_equals_flax_batchnorm(buffer_size, warmup):
    """m = 1 or warm-up, r = 1, d = 0: outputs, gradients and EMA equal nn.BatchNorm."""
    kwargs = dict(momentum=0.9, epsilon=EPS)
    mod = mabn_jax.MABN(use_running_average=False, centered=True, buffer_size=buffer_size,
                        warmup_steps=warmup, renorm_start=50, **kwargs)
    bn = nn.BatchNorm(use_running_average=False, **kwargs)
    xs, dys = _data(3, (2, 3, 3, 4), 8)
    variables = mod.init(jax.random.key(1), xs[0])
    params = {"scale": jnp.linspace(0.5, 1.5, 4), "bias": jnp.linspace(-0.2, 0.2, 4)}
    bn_stats = bn.init(jax.random.key(1), xs[0])["batch_stats"]
    bs, step = variables["batch_stats"], layer_step(mod)

    @jax.jit
    @functools.partial(jax.value_and_grad, argnums=(0, 1), has_aux=True)
    def bn_grad(x, params, bn_stats, dy):
        y, upd = bn.apply({"params": params, "batch_stats": bn_stats}, x, mutable=["batch_stats"])
        return jnp.sum(y * dy), (y, upd["batch_stats"])

    for x, dy in zip(xs, dys):
        y, dx, dp, bs = step(params, bs, x, dy)
        (_, (y_ref, bn_stats)), (dx_ref, dp_ref) = bn_grad(x, params, bn_stats, dy)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
        for k in ("scale", "bias"):
            np.testing.assert_allclose(dp[k], dp_ref[k], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(bs["ema_mean"], bn_stats["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bs["ema_var"], bn_stats["var"], rtol=1e-5, atol=1e-6)


def _centered_reference(x, dy, gamma, beta, m, warm, start, r_max, d_max, alpha):
    """The spec's centered variant, step by step in float64 NumPy."""
    C = gamma.size
    mw, vw, gw, pw = (np.zeros((m, C)) for _ in range(4))
    ema_mean, ema_var = np.zeros(C), np.ones(C)
    out = []
    for i in range(len(x)):
        t, xi, dyi = i + 1, x[i], dy[i]
        ax = tuple(range(xi.ndim - 1))
        mu_b, var_b = xi.mean(ax), xi.var(ax)
        slot, batch = t % m, (t <= m or t < warm)
        mw[slot], vw[slot] = mu_b, var_b
        mu, var = (mu_b, var_b) if batch else (mw.mean(0), vw.mean(0))
        s = np.sqrt(var + EPS)
        z = (xi - mu) / s
        if t > max(start, warm):
            r = np.clip(s / np.sqrt(ema_var + EPS), 1 / r_max, r_max)
            d = np.clip((mu - ema_mean) / np.sqrt(ema_var + EPS), -d_max, d_max)
        else:
            r, d = np.ones(C), np.zeros(C)
        y = gamma * (r * z + d) + beta
        ema_mean = alpha * ema_mean + (1 - alpha) * mu
        ema_var = alpha * ema_var + (1 - alpha) * var
        gh = dyi * gamma * r
        g_b, psi_b = gh.mean(ax), (gh * z).mean(ax)
        gw[slot], pw[slot] = g_b, psi_b
        g, psi = (g_b, psi_b) if batch else (gw.mean(0), pw.mean(0))
        dx = (gh - g - z * psi) / s
        out.append(dict(y=y, dx=dx, dscale=(dyi * (r * z + d)).sum(ax), dbias=dyi.sum(ax),
                        ema_mean=ema_mean.copy(), ema_var=ema_var.copy(), mean_window=mw.copy(),
                        var_window=vw.copy(), g_window=gw.copy(), psi_window=pw.copy()))
    return out


def test_centered_trajectory_matches_spec_in_float64():
    """All phases of the centered variant, with r and d clipped, to 1e-9."""
    cfg = dict(buffer_size=3, warmup_steps=4, renorm_start=8, r_max=1.5, d_max=0.5, momentum=0.8)
    rng = np.random.default_rng(0)
    T, C = 20, 3
    scale = np.where(np.arange(T) < 12, 1.0, 4.0)[:, None] * (1 + rng.random((T, C)))
    shift = np.where(np.arange(T) < 15, 0.0, 3.0)[:, None] + rng.normal(size=(T, C))
    x = rng.normal(size=(T, 2, 2, 2, C)) * scale[:, None, None, None] + shift[:, None, None, None]
    dy = rng.normal(size=x.shape)
    gamma, beta = 1 + rng.random(C), rng.normal(size=C)
    ref = _centered_reference(x, dy, gamma, beta, cfg["buffer_size"], cfg["warmup_steps"],
                              cfg["renorm_start"], cfg["r_max"], cfg["d_max"], cfg["momentum"])
    with jax.enable_x64(True):
        mod = mabn_jax.MABN(use_running_average=False, centered=True,
                            param_dtype=jnp.float64, **cfg)
        variables = mod.init(jax.random.key(0), jnp.asarray(x[0]))
        params = {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)}
        bs, step = variables["batch_stats"], layer_step(mod)
        clipped_r = clipped_d = False
        for i in range(T):
            y, dx, dp, bs = step(params, bs, jnp.asarray(x[i]), jnp.asarray(dy[i]))
            ours = dict(y=y, dx=dx, dscale=dp["scale"], dbias=dp["bias"], **bs)
            for k, v in ref[i].items():
                np.testing.assert_allclose(ours[k], v, rtol=1e-9, atol=1e-12, err_msg=f"t={i + 1} {k}")
            if i + 1 > cfg["renorm_start"]:
                mu = bs["mean_window"].mean(0)
                clipped_d |= bool((np.abs(mu - ref[i - 1]["ema_mean"]) / np.sqrt(
                    ref[i - 1]["ema_var"] + EPS) > cfg["d_max"]).any())
                clipped_r |= bool((np.sqrt(bs["var_window"].mean(0) + EPS) / np.sqrt(
                    ref[i - 1]["ema_var"] + EPS) > cfg["r_max"]).any())
        assert step._cache_size() == 1
    assert clipped_r and clipped_d, "the trajectory must exercise both clips"
