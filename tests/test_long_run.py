"""10⁵ training steps in one ``lax.scan``: the step counter, the ring-buffer
slots and the float32 EMA stay exact / accurate (no overflow, no drift); and
the float step counter steps back by a multiple of ``m`` before it could lose
integers, without changing a slot, a phase or a value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mabn_jax import _window
from mabn_jax import functional as F

N = 100_000
M = 5
CFG = F.MABNConfig(buffer_size=M, warmup_steps=10, renorm_start=50, centered=False)
POOL = 97  # distinct batches, cycled with a slowly varying scale


def make_body(pool_x, pool_dy):
    def body(state, t):  # t = 1 .. N
        s = 1.0 + 0.5 * jnp.sin(2 * jnp.pi * t / 1000.0)
        x, dy = pool_x[t % POOL] * s, pool_dy[t % POOL]

        def loss(probes):
            y, new = F.mabn_train(x, None, None, state, probes, CFG)
            return jnp.sum(y * dy), (y, new)

        (_, (y, new)), stats = jax.value_and_grad(loss, has_aux=True)(F.init_probes(state))
        new = F.record_backward_stats(new, stats, previous=state)
        # The probe gradient is window-shaped: Ψ_B sits in step t's slot.
        return new, ((x * x).mean(0), stats.psi[t % M], y)

    return body


def pools():
    return (
        jax.random.normal(jax.random.PRNGKey(0), (POOL, 2, 2)),
        jax.random.normal(jax.random.PRNGKey(1), (POOL, 2, 2)),
    )


def trajectory():
    body = make_body(*pools())
    state = F.init_state((2,), CFG)
    return jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(1, N + 1)))(state)


def test_hundred_thousand_steps():
    state, (x2_b, psi_b, _) = trajectory()
    x2_b, psi_b = np.asarray(x2_b, np.float64), np.asarray(psi_b)

    # Counters are float32 now: still exact integers here (< 2**23).
    assert state.step.dtype == jnp.float32 and int(state.step) == N
    assert float(state.step) == N and float(state.skipped) == 0.0
    # Ring buffer: step t wrote slot t mod m, so the last m steps are all there.
    for t in range(N - M + 1, N + 1):
        np.testing.assert_array_equal(state.psi_window[t % M], psi_b[t - 1])
        np.testing.assert_allclose(state.var_window[t % M], x2_b[t - 1], rtol=1e-6)
    # The window statistic is a fresh mean of the buffer: equal to the f64 mean
    # of the last m recorded χ²_B, whatever happened 10⁵ steps earlier.
    np.testing.assert_allclose(
        np.asarray(state.var_window, np.float64).mean(0), x2_b[-M:].mean(0), rtol=1e-6
    )
    # EMA of the window means in float64. α^3000 ≈ 4e-27, so starting 3000
    # steps back from any value is exact; float32 rounding stays ~1e-6
    # (measured 8e-7: python tests/test_long_run.py).
    np.testing.assert_allclose(state.ema_var, reference_ema(x2_b), rtol=5e-6)
    assert np.isfinite(np.asarray(state.ema_var)).all()


def test_float_step_counter_wraps_by_a_multiple_of_m():
    """A run crossing the counter's wrap point equals the same run started
    ``wrap_period(m)`` steps earlier, which does not cross it: same windows,
    EMAs, outputs and counter after every step."""
    period = _window.wrap_period(M)
    assert period % M == 0 and period > max(CFG.warmup_steps, CFG.renorm_start)
    start = _window._WRAP - 4  # steps _WRAP - 3 ... cross the wrap at step 4
    assert start + 12 < 2**24  # float32 still holds every integer up to here
    body = make_body(*pools())  # the same 12 batches for every run
    run = jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(1, 13)))
    warm, _ = run(F.init_state((2,), CFG))  # non-trivial windows and EMA
    crossing, (_, _, y_crossing) = run(warm._replace(step=jnp.float32(start)))
    below, (_, _, y_below) = run(warm._replace(step=jnp.float32(start - period)))
    for name in ("step", "var_window", "psi_window", "ema_var", "skipped"):
        np.testing.assert_array_equal(getattr(crossing, name), getattr(below, name), err_msg=name)
    np.testing.assert_array_equal(y_crossing, y_below)
    assert int(crossing.step) == start + 12 - period
    assert np.isfinite(np.asarray(y_crossing)).all()


@pytest.mark.parametrize("rows", [16, 10])
def test_a_wrapped_step_keeps_its_phase_at_the_largest_thresholds(rows):
    """The training step reads its one step wrapped; at the largest thresholds
    (2**22) every step around the wrap is still past warmup and renormalizing,
    and on its slot."""
    cfg = F.MABNConfig(buffer_size=rows, warmup_steps=2**22, renorm_start=2**22)
    for t in range(_window._WRAP - 2, _window._WRAP + 4):
        wrapped = _window.wrap(jnp.float32(t), rows)
        phase = _window.phase(wrapped, cfg, rows, rows)
        assert bool(phase.renorm) and not bool(phase.use_batch), t
        assert int(phase.slot_mask) == t % rows, t


def reference_ema(x2_b):
    ema = np.ones(2)
    for t in range(N - 3000, N + 1):
        ema = CFG.momentum * ema + (1 - CFG.momentum) * x2_b[t - M : t].mean(0)
    return ema


if __name__ == "__main__":  # prints the measured EMA error quoted in the README
    state, (x2_b, _, _) = trajectory()
    ema = reference_ema(np.asarray(x2_b, np.float64))
    print(
        "float32 EMA after 1e5 steps, max relative error vs float64:",
        np.abs(np.asarray(state.ema_var) / ema - 1).max(),
    )
