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
            y, up = module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )
            return jnp.sum(y * dy), (y, up["batch_stats"])

        (_, (y, stats)), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            variables["params"], x
        )
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
    np.testing.assert_allclose(
        brn.apply(vr, x[0], use_running_average=True),
        bn.apply(vb, x[0], use_running_average=True),
        rtol=1e-6,
        atol=1e-6,
    )
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
    out = {
        fast: jax.jit(
            lambda x, s, fast=fast: F.batch_renorm_train(
                x, None, None, s, F.BatchRenormConfig(use_fast_variance=fast, warmup_steps=1)
            )[0]
        )(x, state)
        for fast in (False, True)
    }
    np.testing.assert_allclose(out[False], exact, rtol=1e-3, atol=1e-3)
    assert not np.allclose(out[True], exact, rtol=1e-1, atol=1e-1)


def test_clip_schedule_ramps_from_batchnorm_to_the_limits():
    steps = jnp.arange(8.0)
    config = F.BatchRenormConfig(r_max=3.0, d_max=5.0, warmup_steps=2, ramp_steps=4)
    clips = F.clip_schedule(steps, config)
    np.testing.assert_allclose(clips.r_max, [1, 1, 1.5, 2, 2.5, 3, 3, 3])
    np.testing.assert_allclose(clips.r_min, 1 / clips.r_max)
    np.testing.assert_allclose(clips.d_max, [0, 0, 1.25, 2.5, 3.75, 5, 5, 5])
    clips = F.clip_schedule(steps, F.BatchRenormConfig(r_max=3.0, d_max=5.0, warmup_steps=2))
    np.testing.assert_allclose(clips.r_max, [1, 1, 3, 3, 3, 3, 3, 3])
    np.testing.assert_allclose(clips.d_max, [0, 0, 5, 5, 5, 5, 5, 5])
    # Separate ramps for r and d, and a lower clip of r other than 1/r_max.
    clips = F.clip_schedule(
        steps,
        F.BatchRenormConfig(
            r_max=3.0, d_max=5.0, r_min=0.0, warmup_steps=2, ramp_steps=4, d_ramp_steps=2
        ),
    )
    np.testing.assert_allclose(clips.r_max, [1, 1, 1.5, 2, 2.5, 3, 3, 3])
    np.testing.assert_allclose(clips.r_min, [1, 1, 0.75, 0.5, 0.25, 0, 0, 0])
    np.testing.assert_allclose(clips.d_max, [0, 0, 2.5, 5, 5, 5, 5, 5])


def test_the_papers_schedule():
    """Ioffe 2017, §4: batch norm for the first 5000 steps, then r_max reaches 3
    at step 40k and d_max reaches 5 at step 25k (1-based step counts)."""
    config = F.BatchRenormConfig(warmup_steps=5000, ramp_steps=35_000, d_ramp_steps=20_000)
    # clip_schedule(k) is for the (k + 1)-th training step.
    clips = F.clip_schedule(jnp.array([4999.0, 5000, 24_998, 24_999, 39_998, 39_999]), config)
    np.testing.assert_allclose(
        clips.r_max,
        [1, 1 + 2 / 35_000, 1 + 2 * 19_999 / 35_000, 1 + 2 * 20_000 / 35_000, 3 - 2 / 35_000, 3],
        rtol=1e-6,
    )
    np.testing.assert_allclose(clips.d_max, [0, 5 / 20_000, 5 - 5 / 20_000, 5, 5, 5], rtol=1e-6)


def test_r_and_d_are_clipped_and_receive_no_gradient():
    mean_b = jnp.array([0.0, 10.0, -10.0, 0.1])
    var_b = jnp.array([100.0, 1.0, 1e-4, 1.0])
    zeros, ones = jnp.zeros(4), jnp.ones(4)
    factors = lambda var, ema_var, mean, ema_mean, epsilon: _stats.renorm_factors(
        var,
        ema_var,
        mean,
        ema_mean,
        r_max=3.0,
        d_max=5.0,
        epsilon=epsilon,
        active=jnp.asarray(True),
    )
    r, d = factors(var_b, ones, mean_b, zeros, 0.0)
    np.testing.assert_allclose(r, [3.0, 1.0, 1 / 3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(d, [0.0, 5.0, -5.0, 0.1], rtol=1e-6)
    grads = jax.grad(lambda *a: jnp.sum(sum(factors(*a, 1e-5))), argnums=(0, 1, 2, 3))(
        var_b, ones, mean_b, zeros
    )
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
    gx = jax.jit(
        jax.grad(lambda x: jnp.sum(F.batch_renorm_train(x, None, None, state, config)[0] * dy))
    )(x)

    def by_hand(x):
        mu, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
        return jnp.sum(((x - mu) / jnp.sqrt(var + 1e-5) * stats["r"] + stats["d"]) * dy)

    np.testing.assert_allclose(gx, jax.jit(jax.grad(by_hand))(x), rtol=1e-4, atol=1e-5)


def test_bad_attributes_raise_naming_them():
    with pytest.raises(ValueError, match="BatchRenorm: r_max=0.5 is invalid"):
        mabn_jax.BatchRenorm(r_max=0.5)
    with pytest.raises(ValueError, match="BatchRenorm: ramp_steps=True is invalid"):
        F.BatchRenormConfig(ramp_steps=True)
    with pytest.raises(ValueError, match="BatchRenorm: r_min=1.5 is invalid"):
        mabn_jax.BatchRenorm(r_min=1.5)
    with pytest.raises(ValueError, match="BatchRenorm: d_ramp_steps=-1 is invalid"):
        F.BatchRenormConfig(d_ramp_steps=-1)
    with pytest.raises(ValueError, match="BatchRenorm: average_stddev='yes' is invalid"):
        mabn_jax.BatchRenorm(average_stddev="yes")
    assert mabn_jax.BatchRenormConfig is F.BatchRenormConfig


def test_r_min_sets_the_lower_clip_of_r():
    """Keras' renorm_clipping without 'rmin' is r_min=0: no lower clip."""
    x = jnp.asarray(np.random.default_rng(5).normal(2.0, 0.01, (8, 3)), jnp.float32)
    rs = {}
    for r_min in (None, 0.0, 0.5):
        module = mabn_jax.BatchRenorm(r_max=3.0, d_max=float("inf"), r_min=r_min)
        variables = module.init(jax.random.key(0), x, use_running_average=False)
        _, state = module.apply(
            variables, x, use_running_average=False, mutable=["batch_stats", "intermediates"]
        )
        rs[r_min] = np.asarray(state["intermediates"]["r"][0])
    raw = np.sqrt(np.var(np.asarray(x, np.float64), 0) + 1e-5) / np.sqrt(1 + 1e-5)
    assert np.all(raw < 0.1)
    np.testing.assert_allclose(rs[None], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(rs[0.0], raw, rtol=1e-4)
    np.testing.assert_allclose(rs[0.5], 0.5, rtol=1e-6)


@pytest.mark.parametrize("ramp_steps", [0, 3])
def test_infinite_clips_mean_no_clipping_and_no_nan(ramp_steps):
    """r_max = d_max = inf (Keras' default: no clipping) in warm-up, ramp and after:
    r = 1, d = 0 before the ramp, the unclipped factors once it has started."""
    inf = float("inf")
    config = F.BatchRenormConfig(
        r_max=inf, d_max=inf, warmup_steps=2, ramp_steps=ramp_steps, momentum=0.5
    )
    clips = F.clip_schedule(jnp.arange(6.0), config)
    np.testing.assert_array_equal(clips.r_max, [1, 1, inf, inf, inf, inf])
    np.testing.assert_array_equal(clips.r_min, [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(clips.d_max, [0, 0, inf, inf, inf, inf])
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


# ----------------------------------------------------------------------------- Ioffe 2017


def _ioffe_algorithm1(
    xs,
    dys,
    gamma,
    beta,
    mu,
    sigma,
    *,
    alpha,
    eps,
    warmup,
    r_ramp,
    d_ramp,
    r_final=3.0,
    d_final=5.0,
    average_stddev=True,
):
    """Batch Renormalization as Ioffe (2017) writes it, in float64 NumPy, per
    feature over a mini-batch of ``m`` rows. Algorithm 1 (training), the
    gradients of §3 (r and d are constants), and the schedule of §4: r_max = 1,
    d_max = 0 for the first ``warmup`` steps, then relaxed linearly, r_max
    reaching ``r_final`` after ``r_ramp`` more steps and d_max reaching ``d_final``
    after ``d_ramp``. ``average_stddev=False`` replaces the update of σ by the
    one deviation from the paper that mabn_jax makes by default: the moving
    average follows the variance σ_B² − ε, and σ is its square root plus ε."""
    out = []
    for k, (x, dy) in enumerate(zip(xs, dys)):  # k steps done: this is step k + 1
        relaxed = lambda n: min(max(k + 1 - warmup, 0) / n, 1.0)
        r_max, d_max = 1.0 + (r_final - 1.0) * relaxed(r_ramp), d_final * relaxed(d_ramp)
        m = x.shape[0]
        mu_b = x.sum(0) / m
        sigma_b = np.sqrt(eps + ((x - mu_b) ** 2).sum(0) / m)
        r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
        d = np.clip((mu_b - mu) / sigma, -d_max, d_max)
        x_hat = (x - mu_b) / sigma_b * r + d
        y = gamma * x_hat + beta
        # Backpropagation through the transform (r, d treated as constants).
        dx_hat = dy * gamma
        dsigma_b = (dx_hat * (x - mu_b) * (-r / sigma_b**2)).sum(0)
        dmu_b = (dx_hat * (-r / sigma_b)).sum(0)
        dx = dx_hat * r / sigma_b + dsigma_b * (x - mu_b) / (m * sigma_b) + dmu_b / m
        dgamma, dbeta = (dy * x_hat).sum(0), dy.sum(0)
        mu = mu + alpha * (mu_b - mu)
        if average_stddev:
            sigma = sigma + alpha * (sigma_b - sigma)
        else:
            var = sigma**2 - eps
            sigma = np.sqrt(var + alpha * (sigma_b**2 - eps - var) + eps)
        out.append(
            dict(
                y=y,
                dx=dx,
                dscale=dgamma,
                dbias=dbeta,
                r=r,
                d=d,
                r_max=r_max,
                d_max=d_max,
                mu=mu,
                sigma=sigma,
            )
        )
    return out


def _crossing_trajectory(steps=18, n=(4, 3), features=6, seed=1):
    """Batches whose scale and shift jump, so that r and d hit both ends of their clips."""
    rng = np.random.default_rng(seed)
    scale = np.exp(1.6 * rng.standard_normal((steps, 1, 1, features)))
    shift = 6.0 * rng.standard_normal((steps, 1, 1, features))
    x = shift + scale * rng.standard_normal((steps,) + n + (features,))
    return x, rng.standard_normal(x.shape)


@pytest.mark.parametrize("average_stddev", [True, False])
def test_matches_ioffe_algorithm_1_through_every_phase(average_stddev):
    """float64: warm-up (r = 1, d = 0), both ramps (of different lengths), and
    the final clips, with r and d each clipped above and below."""
    alpha, eps, warmup, r_ramp, d_ramp = 0.3, 1e-3, 3, 8, 5
    xs, dys = _crossing_trajectory()
    c = xs.shape[-1]
    rng = np.random.default_rng(7)
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.normal(0.0, 1.0, c)
    mu0, sigma0 = rng.normal(0.0, 1.0, c), rng.uniform(0.5, 2.0, c)
    ref = _ioffe_algorithm1(
        xs.reshape(len(xs), -1, c),
        dys.reshape(len(xs), -1, c),
        gamma,
        beta,
        mu0,
        sigma0,
        alpha=alpha,
        eps=eps,
        warmup=warmup,
        r_ramp=r_ramp,
        d_ramp=d_ramp,
        average_stddev=average_stddev,
    )
    # Every phase and every clip is crossed (else this test would prove less).
    cases = set()
    for k, s in enumerate(ref):
        if k < warmup:
            np.testing.assert_array_equal(s["r"], 1.0)
            np.testing.assert_array_equal(s["d"], 0.0)
            continue
        r_phase = "ramp" if k + 1 < warmup + r_ramp else "final"
        d_phase = "ramp" if k + 1 < warmup + d_ramp else "final"
        r, d, r_max, d_max = s["r"], s["d"], s["r_max"], s["d_max"]
        for phase, name, hit in (
            (r_phase, "r_hi", r == r_max),
            (r_phase, "r_lo", r == 1 / r_max),
            (r_phase, "r_inside", (r < r_max) & (r > 1 / r_max) & (np.abs(r - 1) > 0.01)),
            (d_phase, "d_hi", d == d_max),
            (d_phase, "d_lo", d == -d_max),
            (d_phase, "d_inside", (np.abs(d) < d_max) & (np.abs(d) > 0.01)),
        ):
            if np.any(hit):
                cases.add((phase, name))
    assert cases == {
        (p, w)
        for p in ("ramp", "final")
        for w in ("r_hi", "r_lo", "r_inside", "d_hi", "d_lo", "d_inside")
    }, cases

    config = F.BatchRenormConfig(
        momentum=1 - alpha,
        epsilon=eps,
        r_max=3.0,
        d_max=5.0,
        warmup_steps=warmup,
        ramp_steps=r_ramp,
        d_ramp_steps=d_ramp,
        average_stddev=average_stddev,
    )
    with jax.enable_x64(True):
        var0 = jnp.asarray(sigma0**2 - eps)
        state = F.BatchRenormState(jnp.zeros(()), jnp.asarray(mu0), var0, jnp.asarray(mu0), var0)

        @jax.jit
        def step(state, x, dy):
            def f(x, scale, bias):
                y, new, stats = F.batch_renorm_train(x, scale, bias, state, config)
                return y, (new, stats)

            y, vjp, (new, stats) = jax.vjp(
                f, x, jnp.asarray(gamma), jnp.asarray(beta), has_aux=True
            )
            return y, vjp(dy), new, stats

        for k, (x, dy) in enumerate(zip(xs, dys)):
            y, (dx, dscale, dbias), state, stats = step(state, jnp.asarray(x), jnp.asarray(dy))
            want = ref[k]
            check = lambda got, key, shape=None: np.testing.assert_allclose(
                np.asarray(got).reshape(want[key].shape),
                want[key],
                rtol=1e-10,
                atol=1e-12,
                err_msg=f"{key} at step {k + 1}",
            )
            for key, got in (
                ("y", y),
                ("dx", dx),
                ("dscale", dscale),
                ("dbias", dbias),
                ("r", stats["r"]),
                ("d", stats["d"]),
                ("mu", state.mean),
                ("mu", state.renorm_mean),
            ):
                check(got, key)
            for var in (state.var, state.renorm_var):
                check(jnp.sqrt(var + eps), "sigma")
        # Inference: y = γ (x − μ) / σ + β with the final moving averages.
        y = F.batch_renorm_inference(
            jnp.asarray(xs[0]), jnp.asarray(gamma), jnp.asarray(beta), state, config
        )
        np.testing.assert_allclose(
            y, gamma * (xs[0] - ref[-1]["mu"]) / ref[-1]["sigma"] + beta, rtol=1e-10, atol=1e-12
        )


def test_clip_schedule_keeps_the_counters_precision():
    """Under x64 the clips are float64 with or without a ramp (1/3 exactly, not
    float32's 0.33333334, which moved clipped outputs by 1e-8)."""
    with jax.enable_x64(True):
        for ramp in (0, 2):
            clips = F.clip_schedule(
                jnp.asarray(5.0, jnp.float64), F.BatchRenormConfig(warmup_steps=1, ramp_steps=ramp)
            )
            assert clips.r_min.dtype == jnp.float64
            assert float(clips.r_min) == 1 / 3 and float(clips.r_max) == 3.0


@pytest.mark.slow
def test_trains_stably_at_true_batch_2_on_digits():
    """The demo's BatchRenorm MLP at a true batch of 2 (examples/small_batch.py,
    one epoch, three seeds): it learns, no seed is far off the others, no NaN."""
    import optax
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.reshape(len(digits.images), -1) / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(
        x, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    mean, std = xtr.mean(), xtr.std()
    xtr, xte = jnp.asarray((xtr - mean) / std), jnp.asarray((xte - mean) / std)
    ytr, yte = jnp.asarray(ytr), jnp.asarray(yte)
    steps = len(xtr) // 2
    norm = functools.partial(
        mabn_jax.BatchRenorm,
        momentum=1 - 2 / 320,
        r_max=3.0,
        d_max=5.0,
        warmup_steps=round(0.05 * steps),
        ramp_steps=round(0.35 * steps),
        d_ramp_steps=round(0.2 * steps),
    )

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            for _ in range(2):
                x = nn.relu(norm(use_running_average=not train)(nn.Dense(256, use_bias=False)(x)))
            return nn.Dense(10)(x)

    model = MLP()
    tx = optax.chain(
        optax.add_decayed_weights(5e-4),
        optax.sgd(optax.cosine_decay_schedule(0.1 * 2 / 32, steps), momentum=0.9),
    )

    def run(key):
        init_key, order_key = jax.random.split(key)
        variables = model.init(init_key, xtr[:2], train=False)
        params, stats = variables["params"], variables["batch_stats"]

        def step(carry, idx):
            params, stats, opt = carry

            def loss_fn(params):
                logits, up = model.apply(
                    {"params": params, "batch_stats": stats},
                    xtr[idx],
                    train=True,
                    mutable=["batch_stats"],
                )
                return optax.softmax_cross_entropy_with_integer_labels(logits, ytr[idx]).mean(), up

            (loss, up), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            delta, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, delta), up["batch_stats"], opt), loss

        order = jax.random.permutation(order_key, len(xtr))[: 2 * steps].reshape(steps, 2)
        (params, stats, _), losses = jax.lax.scan(step, (params, stats, tx.init(params)), order)
        logits = model.apply({"params": params, "batch_stats": stats}, xte, train=False)
        return 100 * jnp.mean(jnp.argmax(logits, -1) != yte), losses

    errors, losses = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), 3))
    errors = np.asarray(errors)
    assert np.all(np.isfinite(np.asarray(losses))), "a step produced NaN or inf"
    # Chance is 90 %; with nn.BatchNorm(use_fast_variance=False) in place of
    # BatchRenorm this test gets 21.0 % (23.3, 18.9, 20.8), BatchRenorm 7.7 %.
    assert errors.mean() < 15, errors
    assert errors.max() <= 1.5 * errors.mean(), errors


@pytest.mark.parametrize("average_stddev", [False, True])
def test_synchronized_statistics_equal_one_device_on_the_global_batch(average_stddev):
    """axis_name: 8 devices x 2 examples normalize, renormalize and update the
    moving averages as one device with all 16 (r and d active and clipped)."""
    n_dev = jax.local_device_count()
    assert n_dev == 8, "tests/conftest.py asks for 8 CPU devices"
    kw = dict(momentum=0.8, epsilon=1e-3, r_max=1.5, d_max=0.5, average_stddev=average_stddev)
    rng = np.random.default_rng(11)
    loc, spread = np.array([0.1, -0.2, 2.0, -2.0, 0.3]), np.array([1.0, 3.0, 1.0, 0.2, 1.0])
    x = jnp.asarray(rng.normal(loc, spread, (n_dev * 2, 5)), jnp.float32)
    dy = jnp.asarray(rng.normal(0.0, 1.0, x.shape), jnp.float32)
    scale = jnp.linspace(0.5, 1.5, 5)
    state = F.init_batch_renorm_state((5,))._replace(step=jnp.asarray(3.0))

    def step(x, dy, config):
        def f(x, scale):
            y, new, stats = F.batch_renorm_train(x, scale, None, state, config)
            return jnp.sum(y * dy), (y, new, stats)

        (_, (y, new, stats)), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(x, scale)
        return y, new, stats, grads

    sync = F.BatchRenormConfig(axis_name="d", **kw)
    y_s, new_s, stats_s, (dx_s, ds_s) = jax.pmap(lambda x, dy: step(x, dy, sync), axis_name="d")(
        x.reshape(n_dev, 2, 5), dy.reshape(n_dev, 2, 5)
    )
    y, new, stats, (dx, ds) = jax.jit(lambda x, dy: step(x, dy, F.BatchRenormConfig(**kw)))(x, dy)
    d, r = np.abs(stats["d"]), np.asarray(stats["r"])
    assert np.any(d == 0.5) and np.any(d < 0.5) and np.any(r == 1.5) and np.any(r < 1.5)
    tol = dict(rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(y_s.reshape(x.shape), y, **tol)
    # Each device's dx is the global batch's; its dscale is its own share.
    np.testing.assert_allclose(dx_s.reshape(x.shape), dx, **tol)
    np.testing.assert_allclose(ds_s.sum(0), ds, **tol)
    for name in ("r", "d"):
        np.testing.assert_allclose(stats_s[name], np.broadcast_to(stats[name], (n_dev, 5)), **tol)
    for a, b in zip(new_s, new):
        np.testing.assert_allclose(a, np.broadcast_to(b, a.shape), **tol)
