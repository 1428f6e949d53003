"""Property-based tests (hypothesis) over shapes, feature axes, dtypes
(float32, bfloat16, float64 under x64), buffer sizes and both variants.

1. Inference is one per-channel affine map.
2. In the window phase with r = 1, scaling every input of the window by the
   same c > 0 leaves the output unchanged up to the effect of ε (and the
   input gradient scales by 1/c).
3. The custom VJP equals autodiff where the spec says it must: in the batch
   phase (m = 1, or inside warm-up) with r = 1.

Examples are derandomized so that the suite is reproducible; c is a power of
two so that scaling the input is exact in every dtype.
"""

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mabn_jax import functional as F

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)
DTYPES = ["float32", "bfloat16", "float64"]
# Rounding tolerance of a result of this dtype, relative to its scale.
TOL = {"float32": 2e-5, "bfloat16": 2**-6, "float64": 1e-12}


@contextlib.contextmanager
def precision(dtype):
    with jax.enable_x64(dtype == "float64"):
        yield jnp.dtype(dtype)


@st.composite
def layouts(draw):
    """(shape, axis, feature_axes) with at least 2 elements per statistic."""
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    n_feat = draw(st.integers(1, min(2, rank - 1)))
    axes = draw(
        st.lists(
            st.integers(-rank, rank - 1),
            min_size=n_feat,
            max_size=n_feat,
            unique_by=lambda a: a % rank,
        )
    )
    feature_axes = tuple(sorted(a % rank for a in axes))
    count = math.prod(n for i, n in enumerate(shape) if i not in feature_axes)
    if count < 2:  # widen the first batch axis rather than discard the example
        first = next(i for i in range(rank) if i not in feature_axes)
        shape = shape[:first] + (2,) + shape[first + 1 :]
    return shape, (axes[0] if n_feat == 1 else tuple(axes)), feature_axes


def bcast(v, ndim, feature_axes):
    shape = [1] * ndim
    for a, n in zip(feature_axes, v.shape):
        shape[a] = n
    return np.reshape(v, shape)


@given(
    layout=layouts(),
    dtype=st.sampled_from(DTYPES),
    centered=st.booleans(),
    m=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_inference_is_a_per_channel_affine_map(layout, dtype, centered, m, seed):
    shape, axis, feature_axes = layout
    rng = np.random.default_rng(seed)
    feat = tuple(shape[a] for a in feature_axes)
    cfg = F.MABNConfig(buffer_size=m, centered=centered)
    with precision(dtype) as dt:
        state = F.init_state(feat, cfg, jnp.promote_types(dt, jnp.float32))
        var = rng.uniform(0.1, 4.0, feat)
        mean = rng.normal(size=feat) if centered else np.zeros(feat)
        state = state._replace(ema_var=jnp.asarray(var, state.ema_var.dtype))
        if centered:
            state = state._replace(ema_mean=jnp.asarray(mean, state.ema_mean.dtype))
        scale, bias = rng.normal(size=feat), rng.normal(size=feat)
        x = jnp.asarray(rng.normal(size=shape) * 3, dt)
        y = F.mabn_inference(
            x, jnp.asarray(scale, dt), jnp.asarray(bias, dt), state, cfg, axis=axis
        )
        assert y.dtype == dt and y.shape == x.shape

    b = functools.partial(bcast, ndim=len(shape), feature_axes=feature_axes)
    a = scale / np.sqrt(var + cfg.epsilon)
    want = b(a) * np.asarray(x, np.float64) + b(bias - a * mean)
    err = np.abs(np.asarray(y, np.float64) - want) / (np.abs(want) + 1)
    assert err.max() <= TOL[dtype], err.max()


@functools.partial(jax.jit, static_argnames=("cfg", "axis"))
def run_steps(xs, dys, scale, *, cfg, axis):
    """Trains through ``xs``; returns the last state, output and input gradient."""

    def step(state, batch):
        x, dy = batch

        def loss(x, probes):
            y, new = F.mabn_train(x, scale, None, state, probes, cfg, axis=axis)
            return jnp.sum(y.astype(jnp.float32) * dy), (y, new)

        (_, (y, new)), (dx, stats) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
            x, F.init_probes(state)
        )
        return F.record_backward_stats(new, stats, state), (y, dx)

    state = F.init_state(scale.shape, cfg, jnp.promote_types(xs.dtype, jnp.float32))
    state, (ys, dxs) = jax.lax.scan(step, state, (xs, dys))
    return state, ys[-1], dxs[-1]


@pytest.mark.slow
@given(
    layout=layouts(),
    dtype=st.sampled_from(DTYPES),
    centered=st.booleans(),
    m=st.integers(1, 4),
    log2_c=st.sampled_from([-2, -1, 1, 2, 3]),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_window_phase_is_invariant_to_input_scale(layout, dtype, centered, m, log2_c, seed):
    shape, axis, feature_axes = layout
    rng = np.random.default_rng(seed)
    feat = tuple(shape[a] for a in feature_axes)
    c = 2.0**log2_c
    steps = m + 2  # past the batch phase (warm-up 0), r = 1 (renorm at 1000)
    cfg = F.MABNConfig(buffer_size=m, warmup_steps=0, renorm_start=1000, centered=centered)
    with precision(dtype) as dt:
        amplitude = rng.uniform(0.5, 2, (steps,) + (1,) * len(shape))
        xs = jnp.asarray(rng.normal(size=(steps,) + shape) * amplitude + 0.3, dt)
        dys = jnp.asarray(rng.normal(size=(steps,) + shape), jnp.float32)
        scale = jnp.asarray(rng.uniform(0.5, 2, feat), dt)
        state, y, dx = run_steps(xs, dys, scale, cfg=cfg, axis=axis)
        _, y_c, dx_c = run_steps(xs * c, dys, scale, cfg=cfg, axis=axis)
        assert bool(state.step == steps) and bool(jnp.isfinite(y).all())
    # y_c = x / sqrt(s + ε/c²) vs y = x / sqrt(s + ε): relative difference at
    # most ε·|1 − 1/c²| / (2 s) for the window statistic s (χ̃² or σ̃²).
    # s: a lower bound of the window statistic (χ̃², or σ̃² = mean of the
    # within-step variances plus the between-step spread of the means).
    s = np.asarray(state.var_window, np.float64).mean(0).min()
    eps_effect = cfg.epsilon * abs(1 - 1 / c**2) / (2 * s)
    # Errors relative to each result's natural size: |z| ~ 1 for y, and
    # |dy·γ| / sqrt(s + ε) for dx, whose terms can cancel (e.g. 2 samples).
    dx_size = np.abs(np.asarray(dys[-1]) * np.asarray(scale, np.float64).max()).max()
    dx_size /= np.sqrt(s + cfg.epsilon)
    for got, want, size in (
        (y_c, y, np.abs(np.asarray(y, np.float64)).max()),
        (np.asarray(dx_c, np.float64) * c, dx, dx_size),
    ):
        err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() / size
        assert err <= TOL[dtype] + 4 * eps_effect, (err, eps_effect)


def reference(x, scale, bias, cfg, feature_axes, sdt):
    """The batch-norm forward of the spec, left to autodiff."""
    red = tuple(i for i in range(x.ndim) if i not in feature_axes)
    b = functools.partial(bcast, ndim=x.ndim, feature_axes=feature_axes)
    xs = x.astype(sdt)
    if cfg.centered:  # two-pass variance (use_fast_variance=False, the default)
        mu = xs.mean(red)
        var = jnp.square(xs - b(mu)).mean(red)
        z = (xs - b(mu)) * jax.lax.rsqrt(b(var) + cfg.epsilon)
    else:
        z = xs * jax.lax.rsqrt(b((xs * xs).mean(red)) + cfg.epsilon)
    return (z * b(scale.astype(sdt)) + b(bias.astype(sdt))).astype(x.dtype)


@pytest.mark.slow
@given(
    layout=layouts(),
    dtype=st.sampled_from(DTYPES),
    centered=st.booleans(),
    m=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_custom_vjp_equals_autodiff_in_the_batch_phase(layout, dtype, centered, m, seed):
    shape, axis, feature_axes = layout
    rng = np.random.default_rng(seed)
    feat = tuple(shape[a] for a in feature_axes)
    # m = 1: the window is the batch; m > 1: inside warm-up. r = 1 throughout.
    cfg = F.MABNConfig(
        buffer_size=m, warmup_steps=0 if m == 1 else 100, renorm_start=1000, centered=centered
    )
    with precision(dtype) as dt:
        sdt = jnp.promote_types(dt, jnp.float32)
        state = F.init_state(feat, cfg, sdt)._replace(step=jnp.asarray(4, sdt))
        x = jnp.asarray(rng.normal(size=shape) * 2 + 0.3, dt)
        dy = jnp.asarray(rng.normal(size=shape), dt)
        scale = jnp.asarray(rng.uniform(0.5, 2, feat), dt)
        bias = jnp.asarray(rng.normal(size=feat), dt)

        def mabn(x, scale, bias):
            return F.mabn_train(x, scale, bias, state, F.init_probes(state), cfg, axis=axis)[0]

        def ref(x, scale, bias):
            return reference(x, scale, bias, cfg, feature_axes, sdt)

        def grads(f):
            loss = lambda *a: jnp.sum(f(*a).astype(sdt) * dy.astype(sdt))
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)

        got, want = grads(mabn), grads(ref)
    # ∂L/∂x = (ĝ − g_B − z·Ψ_B) / σ is a difference of terms of size |ĝ| / σ
    # that can cancel almost completely (two examples per statistic: z = ±1, so
    # ∂L/∂x ≈ 0); rounding, in the reference as much as in the layer, is
    # relative to those terms, so measure the error against their size.
    red = tuple(i for i in range(len(shape)) if i not in feature_axes)
    x64 = np.asarray(x, np.float64)
    var = (x64 - x64.mean(red, keepdims=True)).var(red) if centered else (x64**2).mean(red)
    b = functools.partial(bcast, ndim=len(shape), feature_axes=feature_axes)
    terms = np.asarray(dy, np.float64) * b(
        np.asarray(scale, np.float64) / np.sqrt(var + cfg.epsilon)
    )
    for name, g, w in zip(("x", "scale", "bias"), got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        size = max(np.linalg.norm(w), np.linalg.norm(terms) if name == "x" else 0.0)
        err = np.linalg.norm(g - w) / (size + 1e-30)
        assert err <= TOL[dtype] * 4, (name, err)
