"""Where the spec says the custom VJP is a true gradient, it equals autodiff.

With buffer_size = 1 (or inside warm-up) and r = 1, the non-centered layer is
z = x / sqrt(mean(x²) + ε) and the centered one is exactly nn.BatchNorm (with
the same variance formula: MABN's default is the two-pass variance). After the
window fills it is deliberately *not* a gradient; the centered variant's whole
trajectory is pinned to a float64 NumPy transcription of the spec instead.

Higher-order derivatives (issue 12): inside warm-up they are those of the
reference formula (Hessian-vector products, jax.hessian, gradient penalties);
in the window phase (renormalization active or not) they are the derivatives
of MABN's first-order gradient rule. Forward mode of a training-mode layer is
refused with a TypeError.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_step import layer_step

import mabn_jax
from mabn_jax import functional as F

EPS = 1e-5


def _data(seed, shape, n):
    # NumPy, not jax.random: eager JAX ops would each compile (slow on CPU CI).
    rng = np.random.default_rng(seed)
    scales = 0.5 + 2.0 * rng.random((n, 1, 1, 1, shape[-1]))
    x = rng.standard_normal((n,) + shape) * scales + 0.3
    dy = rng.standard_normal((n,) + shape)
    return jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32)


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
    mod = mabn_jax.MABN(
        use_running_average=False,
        buffer_size=buffer_size,
        warmup_steps=warmup,
        renorm_start=50,
        centered=False,
    )
    xs, dys = _data(0, (2, 3, 3, 4), 8)
    variables = jax.jit(mod.init)(jax.random.key(1), xs[0])
    params = {"scale": jnp.linspace(0.5, 1.5, 4), "bias": jnp.linspace(-0.2, 0.2, 4)}
    bs, step = variables["batch_stats"], layer_step(mod)
    for x, dy in zip(xs, dys):
        y, dx, dp, bs = step(params, bs, x, dy)
        y_ref, (dx_ref, ds_ref, db_ref) = _ref_vjp(x, params["scale"], params["bias"], dy)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dp["scale"], ds_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dp["bias"], db_ref, rtol=1e-5, atol=1e-5)
    assert int(bs["step"]) == len(xs)


def test_noncentered_is_not_a_gradient_once_the_window_is_used():
    """After warm-up with m > 1 the backward is the spec's rule with the Ψ window,
    which differs from autodiff of the forward function the layer computed."""
    m = 4
    mod = mabn_jax.MABN(use_running_average=False, buffer_size=m, warmup_steps=0, centered=False)
    xs, dys = _data(2, (2, 3, 3, 4), 6)
    variables = jax.jit(mod.init)(jax.random.key(1), xs[0])
    bs, step = variables["batch_stats"], layer_step(mod)
    for x, dy in zip(xs[:-1], dys[:-1]):
        _, _, _, bs = step(variables["params"], bs, x, dy)
    x, dy, before = xs[-1], dys[-1], bs
    _, dx, _, bs = step(variables["params"], bs, x, dy)
    assert int(bs["step"]) == 6 > m  # window phase; r = 1 (renorm_start = 1000)
    x, dy, bs, before = jax.device_get((x, dy, bs, before))
    axes = (0, 1, 2)
    # The spec's rule: χ̃², Ψ̃ are window means (this step's values included).
    inv = 1 / np.sqrt(bs["x2_window"].mean(0) + EPS)
    z = x * inv
    np.testing.assert_allclose(bs["psi_window"][6 % m], np.mean(dy * z, axes), rtol=1e-5)
    rule = (dy - z * bs["psi_window"].mean(0)) * inv
    np.testing.assert_allclose(dx, rule, rtol=1e-4, atol=1e-5)
    # Autodiff of the forward the layer computed: z = x / sqrt(window mean + ε),
    # with this step's χ²_B = mean(x²) in its slot and the older slots fixed.
    others = np.delete(before["x2_window"], 6 % m, axis=0).sum(0)

    def forward(x):
        return x * jax.lax.rsqrt((others + jnp.mean(x * x, axes)) / m + EPS)

    y_fwd, autodiff = jax.jit(lambda x, dy: (forward(x), jax.vjp(forward, x)[1](dy)[0]))(x, dy)
    np.testing.assert_allclose(y_fwd, z, rtol=1e-5)
    assert not np.allclose(dx, autodiff, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fast_variance", [False, True])
@pytest.mark.parametrize("buffer_size,warmup", [(1, 0), (4, 100)])
def test_centered_equals_flax_batchnorm(buffer_size, warmup, fast_variance):
    """m = 1 or warm-up, r = 1, d = 0: outputs, gradients and EMA equal nn.BatchNorm
    configured with the same variance formula."""
    kwargs = dict(momentum=0.9, epsilon=EPS, use_fast_variance=fast_variance)
    mod = mabn_jax.MABN(
        use_running_average=False,
        centered=True,
        buffer_size=buffer_size,
        warmup_steps=warmup,
        renorm_start=50,
        **kwargs,
    )
    bn = nn.BatchNorm(use_running_average=False, **kwargs)
    xs, dys = _data(3, (2, 3, 3, 4), 8)
    variables = jax.jit(mod.init)(jax.random.key(1), xs[0])
    params = {"scale": jnp.linspace(0.5, 1.5, 4), "bias": jnp.linspace(-0.2, 0.2, 4)}
    bn_stats = jax.jit(bn.init)(jax.random.key(1), xs[0])["batch_stats"]
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


def test_centered_default_is_the_two_pass_variance():
    """A large mean against a small spread in float32: the default MABN matches
    nn.BatchNorm(use_fast_variance=False); the one-pass variance cancels."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(300.0 + 0.05 * rng.standard_normal((8, 4)), jnp.float32)
    mod = mabn_jax.MABN(use_running_average=False, centered=True)
    assert mod.use_fast_variance is False
    variables = jax.jit(mod.init)(jax.random.key(0), x)
    probes = mabn_jax.init_probes(variables["batch_stats"])
    y = jax.jit(lambda v, x: mod.apply(v, x, mutable=["batch_stats"])[0])(
        {**variables, mabn_jax.PROBES: probes}, x
    )
    outs = {}
    for fast in (False, True):
        bn = nn.BatchNorm(use_running_average=False, epsilon=EPS, use_fast_variance=fast)
        bv = jax.jit(bn.init)(jax.random.key(0), x)
        outs[fast] = jax.jit(lambda v, x, bn=bn: bn.apply(v, x, mutable=["batch_stats"])[0])(bv, x)
    exact = np.asarray(x, np.float64)
    exact = (exact - exact.mean(0)) / np.sqrt(exact.var(0) + EPS)
    np.testing.assert_allclose(y, exact, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(y, outs[False], rtol=1e-4, atol=1e-4)
    assert not np.allclose(outs[True], exact, rtol=1e-1, atol=1e-1)


def _centered_reference(x, dy, gamma, beta, m, warm, start, r_max, d_max, alpha):
    """The spec's centered variant (with its correction), step by step in float64 NumPy.

    Windows hold each step's mean μ_B and two-pass variance σ²_B; in the window
    phase μ̃ is the mean of the mean window and σ̃² the window mean of each
    step's second moment about μ̃, σ²_w + (μ_w − μ̃)² (law of total variance).
    Also returns the unclipped r and d, to check which clips the data reaches.
    """
    C = gamma.size
    mean_w, var_w, g_w, psi_w = (np.zeros((m, C)) for _ in range(4))
    ema_mean, ema_var = np.zeros(C), np.ones(C)
    out = []
    for i in range(len(x)):
        t, xi, dyi = i + 1, x[i], dy[i]
        ax = tuple(range(xi.ndim - 1))
        n = np.prod([xi.shape[a] for a in ax])
        mu_b = xi.sum(ax) / n
        var_b = ((xi - mu_b) ** 2).sum(ax) / n
        slot = t % m
        batch_phase = t <= m or t < warm
        mean_w[slot], var_w[slot] = mu_b, var_b
        if batch_phase:
            mu, var = mu_b, var_b
        else:
            mu = mean_w.sum(0) / m
            var = (var_w + (mean_w - mu) ** 2).sum(0) / m
        sigma = np.sqrt(var + EPS)
        z = (xi - mu) / sigma
        ema_sigma = np.sqrt(ema_var + EPS)
        r_raw, d_raw = sigma / ema_sigma, (mu - ema_mean) / ema_sigma
        if t > max(start, warm):
            r, d = np.clip(r_raw, 1 / r_max, r_max), np.clip(d_raw, -d_max, d_max)
        else:
            r, d = np.ones(C), np.zeros(C)
        y = gamma * (r * z + d) + beta
        ema_mean = alpha * ema_mean + (1 - alpha) * mu
        ema_var = alpha * ema_var + (1 - alpha) * var
        ghat = dyi * gamma * r
        g_b, psi_b = ghat.sum(ax) / n, (ghat * z).sum(ax) / n
        g_w[slot], psi_w[slot] = g_b, psi_b
        g, psi = (g_b, psi_b) if batch_phase else (g_w.sum(0) / m, psi_w.sum(0) / m)
        dx = (ghat - g - z * psi) / sigma
        out.append(
            dict(
                y=y,
                dx=dx,
                dscale=(dyi * (r * z + d)).sum(ax),
                dbias=dyi.sum(ax),
                ema_mean=ema_mean.copy(),
                ema_var=ema_var.copy(),
                mean_window=mean_w.copy(),
                var_window=var_w.copy(),
                g_window=g_w.copy(),
                psi_window=psi_w.copy(),
                r_raw=r_raw if t > max(start, warm) else None,
                d_raw=d_raw,
                batch=batch_phase,
            )
        )
    return out


def test_centered_trajectory_matches_spec_in_float64():
    """Every phase of the centered variant (batch, window, r = 1, r and d clipped at
    both ends), every output, gradient and state leaf, to 1e-9 relative."""
    cfg = dict(buffer_size=3, warmup_steps=5, renorm_start=8, r_max=1.5, d_max=0.5, momentum=0.8)
    rng = np.random.default_rng(0)
    T, C = 26, 3
    t = np.arange(1, T + 1)[:, None]
    # Scale up x4 on steps 13-16 (r > r_max), down x0.1 on 19-21 (r < 1/r_max);
    # shift +3 on 15-17 (d > d_max), -3 on 23-26 (d < -d_max); channels differ.
    scale = (
        np.where((t >= 13) & (t <= 16), 4.0, 1.0)
        * np.where((t >= 19) & (t <= 21), 0.1, 1.0)
        * (1 + rng.random((T, C)))
    )
    shift = (
        np.where((t >= 15) & (t <= 17), 3.0, 0.0)
        - np.where(t >= 23, 3.0, 0.0)
        + 0.3 * rng.normal(size=(T, C))
    )
    x = rng.normal(size=(T, 2, 2, 2, C)) * scale[:, None, None, None] + shift[:, None, None, None]
    dy = rng.normal(size=x.shape)
    gamma, beta = 1 + rng.random(C), rng.normal(size=C)
    ref = _centered_reference(
        x,
        dy,
        gamma,
        beta,
        cfg["buffer_size"],
        cfg["warmup_steps"],
        cfg["renorm_start"],
        cfg["r_max"],
        cfg["d_max"],
        cfg["momentum"],
    )
    # The trajectory crosses every phase and both ends of both clips.
    phases = [(s["batch"], s["r_raw"] is not None) for s in ref]
    assert (True, False) in phases and (False, False) in phases and (False, True) in phases
    r_raw = np.stack([s["r_raw"] for s in ref if s["r_raw"] is not None])
    d_raw = np.stack([s["d_raw"] for s in ref if s["r_raw"] is not None])
    assert (r_raw > cfg["r_max"]).any() and (r_raw < 1 / cfg["r_max"]).any()
    assert (d_raw > cfg["d_max"]).any() and (d_raw < -cfg["d_max"]).any()
    assert (
        (np.abs(np.log(r_raw)) < np.log(cfg["r_max"])) & (np.abs(d_raw) < cfg["d_max"])
    ).any()  # and unclipped renorm steps
    keys = [k for k in ref[0] if k not in ("r_raw", "d_raw", "batch")]
    worst = dict.fromkeys(keys, 0.0)
    with jax.enable_x64(True):
        mod = mabn_jax.MABN(
            use_running_average=False, centered=True, param_dtype=jnp.float64, **cfg
        )
        variables = jax.jit(mod.init)(jax.random.key(0), jnp.asarray(x[0]))
        params = {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)}
        bs, step = variables["batch_stats"], layer_step(mod)
        for i in range(T):
            y, dx, dp, bs = step(params, bs, jnp.asarray(x[i]), jnp.asarray(dy[i]))
            ours = jax.device_get(dict(y=y, dx=dx, dscale=dp["scale"], dbias=dp["bias"], **bs))
            assert ours["y"].dtype == np.float64 and int(ours["step"]) == i + 1
            for k in keys:
                np.testing.assert_allclose(
                    ours[k], ref[i][k], rtol=1e-9, atol=0, err_msg=f"t={i + 1} {k}"
                )
                worst[k] = max(
                    worst[k],
                    float(
                        np.max(np.abs(ours[k] - ref[i][k]) / np.maximum(np.abs(ref[i][k]), 1e-300))
                    ),
                )
        assert step._cache_size() == 1
    print("worst relative error per key:", worst)


# --- Higher-order derivatives (issue 12) -------------------------------------------

N, K, C = 6, 3, 2


def _problem(seed=0):
    """x = u @ W feeds the layer; the loss Σ a·sin(y) is not linear in y."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(N, K)) + 0.5
    w, v = rng.normal(size=(K, C)), rng.normal(size=(K, C))
    a = rng.normal(size=(N, C))
    gamma, beta = 1 + rng.random(C), rng.normal(size=C)
    return [jnp.asarray(arr, jnp.float64) for arr in (u, w, v, a, gamma, beta)]


def _reference(centered):
    """The formula the layer is inside warm-up with r = 1 (two-pass variance)."""

    def norm(x, gamma, beta):
        if centered:
            mu = x.mean(0)
            return gamma * (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(0) + EPS) + beta
        return gamma * x / jnp.sqrt((x * x).mean(0) + EPS) + beta

    return norm


@functools.lru_cache
def _recorded_step(config):
    """A jitted functional training step that records its backward statistics."""

    @jax.jit
    def step(state, x, dy):
        def loss(probes):
            y, new = F.mabn_train(x, None, None, state, probes, config)
            return jnp.sum(y * dy), new

        probe_grads, new = jax.grad(loss, has_aux=True)(F.init_probes(state))
        return F.record_backward_stats(new, probe_grads, previous=state)

    return step


def _advanced_state(config, steps, seed=1):
    """A state after ``steps`` recorded training steps on random data."""
    rng = np.random.default_rng(seed)
    state = F.init_state((C,), config, jnp.float64)
    for _ in range(steps):
        x = rng.normal(size=(N, C)) * 1.5 + 0.4
        state = _recorded_step(config)(state, jnp.asarray(x), jnp.asarray(rng.normal(size=(N, C))))
    assert int(state.step) == steps and bool(np.all(np.isfinite(state.psi_window)))
    return state


def _config(centered):
    """m = 3, warm-up until t = 6, no renormalization in the steps used (r = 1)."""
    return F.MABNConfig(
        buffer_size=3, warmup_steps=6, renorm_start=1000, centered=centered, epsilon=EPS
    )


def _layer(config, state):
    def norm(x, gamma, beta):
        return F.mabn_train(x, gamma, beta, state, F.init_probes(state), config)[0]

    return norm


def _rel(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("centered", [False, True])
def test_second_derivatives_inside_warmup_equal_the_reference(centered):
    """Inside warm-up (t > m, so not only the first steps) with r = 1: HVP,
    jax.hessian and a gradient penalty through a training-mode layer equal those
    of the reference formula, in float64, to 1e-12."""
    with jax.enable_x64(True):
        config = _config(centered)
        state = _advanced_state(config, 4)  # the layer's step is t = 5: m < t < warmup
        u, w, v, a, gamma, beta = _problem()

        @jax.jit
        def derivatives(state):
            out = {}
            for name, norm in (("mabn", _layer(config, state)), ("ref", _reference(centered))):
                loss = lambda w, gamma, norm=norm: jnp.sum(a * jnp.sin(norm(u @ w, gamma, beta)))
                loss_x = lambda x, norm=norm: jnp.sum(a * jnp.sin(norm(x, gamma, beta)))
                penalty = lambda w, loss_x=loss_x: jnp.sum(jax.grad(loss_x)(u @ w) ** 2)
                out[name] = dict(
                    grad=jax.grad(loss, argnums=(0, 1))(w, gamma),
                    hvp=jax.jvp(lambda w: jax.grad(loss)(w, gamma), (w,), (v,))[1],
                    hessian=jax.hessian(loss, argnums=(0, 1))(w, gamma),
                    penalty=jax.grad(penalty)(w),
                )
            return out

        errors = jax.device_get(derivatives(state))
        worst = {}
        for key, ours in errors["mabn"].items():
            for o, r in zip(jax.tree.leaves(ours), jax.tree.leaves(errors["ref"][key])):
                assert np.shape(o) == np.shape(r) and np.max(np.abs(r)) > 1e-3
                worst[key] = max(worst.get(key, 0.0), _rel(o, r))
        print(f"centered={centered} worst norm-relative error:", worst)
        assert max(worst.values()) <= 1e-12, worst


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("centered", [False, True])
def test_second_derivatives_in_the_window_phase_are_those_of_the_gradient_rule(centered, renorm):
    """After warm-up (m > 1) the first-order gradient is MABN's rule, not autodiff;
    jax.jvp of jax.grad is the derivative of that rule as a function of W (state
    fixed): it matches a central difference of the rule, and differs from the
    second derivative of the forward function. With renormalization active the rule
    scales ĝ by r (and shifts by d), which move with W like the other statistics."""
    with jax.enable_x64(True):
        config = _config(centered)
        if renorm:
            config = dataclasses.replace(config, renorm_start=config.warmup_steps)
        m = config.buffer_size
        state = _advanced_state(config, 6)  # t = 7 >= warmup, > m: windows in use
        u, w, v, a, gamma, beta = _problem(2)
        norm = _layer(config, state)
        loss = lambda w: jnp.sum(a * jnp.sin(norm(u @ w, gamma, beta)))
        rule = jax.grad(loss)
        h = 1e-5
        # The forward the layer computed: window means with this step's statistics
        # in slot t mod m. Its (autodiff) gradient and Hessian are not MABN's.
        keep = (np.arange(m) != (int(state.step) + 1) % m)[:, None]

        def forward(x):
            if not centered:
                mu = 0.0
                var = (jnp.where(keep, state.var_window, 0).sum(0) + (x * x).mean(0)) / m
            else:
                mean_b = x.mean(0)
                means = jnp.where(keep, state.mean_window, mean_b)
                vars_ = jnp.where(keep, state.var_window, ((x - mean_b) ** 2).mean(0))
                mu = means.mean(0)
                var = (vars_ + (means - mu) ** 2).mean(0)
            r, d = 1.0, 0.0
            if renorm:
                sigma = jnp.sqrt(state.ema_var + EPS)
                r = jnp.clip(jnp.sqrt(var + EPS) / sigma, 1 / config.r_max, config.r_max)
                if centered:
                    d = jnp.clip((mu - state.ema_mean) / sigma, -config.d_max, config.d_max)
            return gamma * (r * (x - mu) / jnp.sqrt(var + EPS) + d) + beta

        loss_fwd = lambda w: jnp.sum(a * jnp.sin(forward(u @ w)))

        @jax.jit
        def derivatives(w, v):
            return dict(
                hvp=jax.jvp(rule, (w,), (v,))[1],
                central=(rule(w + h * v) - rule(w - h * v)) / (2 * h),
                y_fwd=forward(u @ w),
                y=norm(u @ w, gamma, beta),
                grad_fwd=jax.grad(loss_fwd)(w),
                grad_rule=rule(w),
                hvp_fwd=jax.jvp(jax.grad(loss_fwd), (w,), (v,))[1],
                stats=F.mabn_train_with_stats(
                    u @ w, gamma, beta, state, F.init_probes(state), config
                )[2],
            )

        out = jax.device_get(derivatives(w, v))
        r = out["stats"]["r"]
        if renorm:  # r acts, unclipped, so it moves with W
            assert np.all((np.abs(r - 1) > 0.1) & (r < config.r_max) & (r > 1 / config.r_max)), r
        else:
            np.testing.assert_array_equal(r, 1.0)
        hvp = out["hvp"]
        err = _rel(hvp, out["central"])
        print(f"centered={centered} renorm={renorm} HVP vs central difference of the rule:", err)
        assert err <= 1e-7, err
        y_fwd, y, grad_fwd, grad_rule, hvp_fwd = (
            out[k] for k in ("y_fwd", "y", "grad_fwd", "grad_rule", "hvp_fwd")
        )
        np.testing.assert_allclose(y_fwd, y, rtol=1e-12)
        assert _rel(grad_fwd, grad_rule) > 1e-3
        assert _rel(hvp_fwd, hvp) > 1e-3


@pytest.mark.parametrize("centered", [False, True])
def test_forward_mode_of_a_training_layer_raises_naming_mabn(centered):
    """jax.jvp / jax.jacfwd of a training-mode layer: a TypeError that names MABN and
    the modes that work; inference mode is differentiable in forward mode."""
    mod = mabn_jax.MABN(centered=centered, buffer_size=2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    variables = jax.jit(functools.partial(mod.init, use_running_average=False))(
        jax.random.key(0), x
    )
    probes = mabn_jax.init_probes(variables["batch_stats"])

    def train(x):
        return mod.apply(
            {**variables, mabn_jax.PROBES: probes},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )[0]

    # Reverse mode is fine.
    assert jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(train(x)))))(x).shape == x.shape

    def check_message(transform):
        with pytest.raises(TypeError) as info:
            transform()
        message = str(info.value)
        for phrase in ("MABN", "reverse-mode", "inference mode", "use_running_average=True"):
            assert phrase in message, message

    tangent = jnp.ones_like(x)
    check_message(lambda: jax.jit(jax.jacfwd(train))(x))  # at trace time, nothing compiles
    # Forward mode staged by jit fails when XLA lowers the program, outside the layer's
    # code, with JAX's own message; it must still fail, never return a tangent.
    for staged in (
        lambda: jax.jit(lambda x: jax.jvp(train, (x,), (tangent,)))(x),
        lambda: jax.jvp(jax.jit(train), (x,), (tangent,)),
    ):
        with pytest.raises(TypeError, match="forward-mode|MABN"):
            staged()

    # Inference mode is one affine map per channel: forward mode works and is exact.
    state = _advanced_state_f32(mod, variables, x)
    infer = lambda x: mod.apply(state, x, use_running_average=True)
    tangent = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    y, dy, jac_fwd, jac_rev, y_direct = jax.jit(
        lambda x, t: (
            *jax.jvp(infer, (x,), (t,)),
            jax.jacfwd(infer)(x),
            jax.jacrev(infer)(x),
            infer(x),
        )
    )(x, tangent)
    bs = state["batch_stats"]
    ema = bs["ema_var"] if centered else bs["ema_x2"]
    assert not np.allclose(ema, 1.0)  # a state that moved away from its init
    np.testing.assert_allclose(dy, tangent / np.sqrt(ema + EPS), rtol=1e-6)
    np.testing.assert_allclose(jac_fwd, jac_rev, rtol=1e-6)
    np.testing.assert_allclose(y, y_direct)


@pytest.mark.slow  # eager: every op of the forward compiles on CPU before the error
def test_eager_jvp_of_a_training_layer_raises_naming_mabn():
    mod = mabn_jax.MABN(use_running_average=False, buffer_size=2, centered=False)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    variables = jax.jit(mod.init)(jax.random.key(0), x)
    probes = mabn_jax.init_probes(variables["batch_stats"])

    def train(x):
        return mod.apply({**variables, mabn_jax.PROBES: probes}, x, mutable=["batch_stats"])[0]

    with pytest.raises(TypeError) as info:
        jax.jvp(train, (x,), (jnp.ones_like(x),))
    for phrase in ("MABN", "reverse-mode", "inference mode", "use_running_average=True"):
        assert phrase in str(info.value), str(info.value)


def _advanced_state_f32(mod, variables, x):
    """Variables after two recorded training steps (the EMA away from 1)."""

    @jax.jit
    def step(bs, x):
        def loss(params):
            y, upd = mod.apply(
                {"params": params, "batch_stats": bs},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(y)), upd

        (_, upd), _ = mabn_jax.value_and_grad(loss, has_aux=True, batch_stats=bs)(
            variables["params"]
        )
        return upd["batch_stats"]

    bs = variables["batch_stats"]
    for scale in (3.0, 0.5):
        bs = step(bs, x * scale)
    return {"params": variables["params"], "batch_stats": bs}
