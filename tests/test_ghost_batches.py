"""Ghost batches (norm_batch_size) against a reference loop over groups.

The reference runs the ungrouped layer once per group of consecutive examples,
recording each group's Ψ_B (g_B) before the next group runs: exactly the
"simulated small batches" of the spec, where the window slides across groups
and across train steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax
from mabn_jax import functional as F
from mabn_jax import batch_renorm as BR

N, H, C = 8, 2, 3
STEPS = 5


def _inputs(seed, steps, n):
    rng = np.random.default_rng(seed)
    # The scale drifts and jumps, so r hits both clips after renorm starts.
    scales = np.exp(rng.normal(0.0, 1.0, (steps, 1, 1, 1, C)))
    x = rng.normal(0.3, 1.0, (steps, n, H, H, C)) * scales
    dy = rng.normal(0.0, 1.0, (steps, n, H, H, C))
    return jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32)


def _step_fn(config, norm_batch_size):
    @jax.jit
    def step(state, x, dy, scale, bias):
        groups = 1 if norm_batch_size is None else x.shape[0] // norm_batch_size

        def loss(x, scale, bias, probes):
            y, new = F.mabn_train(x, scale, bias, state, probes, config,
                                  norm_batch_size=norm_batch_size)
            return jnp.sum(y * dy), (y, new)

        (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
            x, scale, bias, F.init_probes(state, groups))
        return F.record_backward_stats(new, grads[3]), y, grads
    return step


@pytest.mark.parametrize("centered,m,n", [(False, 3, 2), (True, 3, 2), (False, 5, 4)])
def test_mabn_ghost_batches_match_loop_over_groups(centered, m, n):
    # Groups 1..20 (or 1..10) pass the batch phase (t <= m, t < warmup), the
    # window phase and renormalization (t > 6) with r clipped at 1.5.
    config = F.MABNConfig(buffer_size=m, warmup_steps=4, renorm_start=6, r_max=1.5,
                          d_max=0.5, momentum=0.8, centered=centered)
    groups = N // n
    x, dy = _inputs(0, STEPS, N)
    scale = jnp.asarray([1.5, 0.7, -1.0], jnp.float32)
    bias = jnp.asarray([0.1, -0.2, 0.3], jnp.float32)
    ghost, single = _step_fn(config, n), _step_fn(config, None)
    s_ghost = s_ref = F.init_state((C,), config)
    for t in range(STEPS):
        s_ghost, y, (dx, dscale, dbias, dprobes) = ghost(s_ghost, x[t], dy[t], scale, bias)
        ys, dxs, dss, dbs, psis = [], [], [], [], []
        for i in range(groups):
            sl = slice(i * n, (i + 1) * n)
            s_ref, yi, (dxi, dsi, dbi, dpi) = single(s_ref, x[t, sl], dy[t, sl], scale, bias)
            ys.append(yi), dxs.append(dxi), dss.append(dsi), dbs.append(dbi), psis.append(dpi)
        tol = dict(rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(y, jnp.concatenate(ys), **tol)
        np.testing.assert_allclose(dx, jnp.concatenate(dxs), **tol)
        np.testing.assert_allclose(dscale, sum(dss), **tol)
        np.testing.assert_allclose(dbias, sum(dbs), **tol)
        np.testing.assert_allclose(dprobes.psi, jnp.stack([p.psi for p in psis]), **tol)
        for a, b in zip(s_ghost, s_ref):
            np.testing.assert_allclose(a, b, **tol)
    assert int(s_ghost.step) == STEPS * groups
    # The run reached renormalization and r was clipped.
    _, _, stats = F.mabn_train_with_stats(x[-1], scale, bias, s_ghost, F.init_probes(s_ghost, groups),
                                          config, norm_batch_size=n)
    assert float(jnp.max(jnp.abs(jnp.log(stats["r"])))) == pytest.approx(np.log(1.5), rel=1e-5)


def test_whole_batch_group_is_the_ungrouped_layer():
    config = F.MABNConfig(buffer_size=2, warmup_steps=0, renorm_start=1)
    x, dy = _inputs(1, 3, N)
    state = F.init_state((C,), config)
    a, b = state, state
    whole, ungrouped = _step_fn(config, N), _step_fn(config, None)
    for t in range(3):
        a, ya, ga = whole(a, x[t], dy[t], jnp.ones(C), jnp.zeros(C))
        b, yb, gb = ungrouped(b, x[t], dy[t], jnp.ones(C), jnp.zeros(C))
        np.testing.assert_array_equal(ya, yb)
        jax.tree.map(np.testing.assert_array_equal, (ga, a), (gb, b))


def test_indivisible_batch_raises_at_trace_time():
    module = mabn_jax.MABN(norm_batch_size=3)
    x = jnp.ones((8, 4))
    with pytest.raises(ValueError, match="norm_batch_size=3"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), x, use_running_average=False))
    with pytest.raises(ValueError, match="norm_batch_size=3"):
        jax.eval_shape(lambda: mabn_jax.BatchRenorm(norm_batch_size=3).init(
            jax.random.key(0), x, use_running_average=False))
    with pytest.raises(ValueError, match="axis 0 is a feature axis"):
        mabn_jax.MABN(norm_batch_size=2, axis=0).init(jax.random.key(0), x,
                                                     use_running_average=False)


def test_probes_without_groups_raise():
    config = F.MABNConfig()
    state = F.init_state((C,), config)
    with pytest.raises(ValueError, match="num_groups=4"):
        F.mabn_train(jnp.ones((8, C)), None, None, state, F.init_probes(state), config,
                     norm_batch_size=2)


def test_batch_renorm_ghost_batches_match_loop_over_groups():
    kw = dict(momentum=0.8, renorm_momentum=0.7, r_max=1.5, d_max=0.5,
              warmup_steps=1, ramp_steps=2)
    n, groups = 2, N // 2
    x, dy = _inputs(2, 4, N)
    scale = jnp.asarray([1.5, 0.7, -1.0], jnp.float32)
    bias = jnp.asarray([0.1, -0.2, 0.3], jnp.float32)

    def run(state, x, dy, nbs):
        def loss(x, scale, bias):
            y, new, _ = BR.batch_renorm_train(x, scale, bias, state, norm_batch_size=nbs, **kw)
            return jnp.sum(y * dy), (y, new)
        (_, (y, new)), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
        return new, y, g

    ghost = jax.jit(lambda s, x, dy: run(s, x, dy, n))
    single = jax.jit(lambda s, x, dy: run(s, x, dy, None))
    s_ghost = s_ref = BR.init_state((C,))
    for t in range(4):
        s_ghost, y, (dx, ds, db) = ghost(s_ghost, x[t], dy[t])
        step0, outs = s_ref.step, []
        for i in range(groups):
            sl = slice(i * n, (i + 1) * n)
            s_ref, yi, gi = single(s_ref._replace(step=step0), x[t, sl], dy[t, sl])
            outs.append((yi, gi))
        tol = dict(rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(y, jnp.concatenate([o[0] for o in outs]), **tol)
        np.testing.assert_allclose(dx, jnp.concatenate([o[1][0] for o in outs]), **tol)
        np.testing.assert_allclose(ds, sum(o[1][1] for o in outs), **tol)
        np.testing.assert_allclose(db, sum(o[1][2] for o in outs), **tol)
        for a, b in zip(s_ghost, s_ref):
            np.testing.assert_allclose(a, b, **tol)
