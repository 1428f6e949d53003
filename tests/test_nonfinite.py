"""A batch with non-finite statistics cannot poison the state.

The reference is the trajectory that never saw the bad batch: after it, the
state must be identical to that run's apart from the ``skipped`` counter.
Non-finite steps are always skipped (there is no option to keep them), and
the skipped step's output is NaN, so loss guards such as
``optax.apply_if_finite`` see it too.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import mabn_jax
from mabn_jax import functional as F

T, BAD = 11, 6  # steps; the bad one is in the window phase with renorm on
C = 3


def config(centered, **kw):
    return F.MABNConfig(buffer_size=3, warmup_steps=4, renorm_start=5, centered=centered, **kw)


def batches(n):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    scales = 1.0 + jnp.arange(n)[:, None, None] / 4.0
    x = jax.random.normal(k1, (n, 4, C)) * scales + 0.3
    dy = jax.random.normal(k2, (n, 4, C))
    return x, dy


@functools.cache  # one compilation per configuration
def make_step(cfg):
    """The functional step: mabn_train, its gradient, record_backward_stats."""
    scale = jnp.array([1.0, 0.5, 2.0])
    bias = jnp.array([0.1, 0.0, -0.2])

    @jax.jit
    def step(state, x, dy):
        def loss(x, probes):
            y, new = F.mabn_train(x, scale, bias, state, probes, cfg)
            return jnp.sum(y * dy), (y, new)

        (_, (y, new)), (dx, stats) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            x, F.init_probes(state)
        )
        return F.record_backward_stats(new, stats, previous=state), y

    return step


def run(cfg, xs, dys):
    """The final state and every step's output."""
    step = make_step(cfg)
    state, ys = F.init_state((C,), cfg), []
    for x, dy in zip(xs, dys):
        state, y = step(state, x, dy)
        ys.append(y)
    return state, ys


def assert_same_apart_from_skipped(got, want, skipped):
    assert int(got.skipped) == skipped and int(want.skipped) == 0
    for name in got._fields:
        if name != "skipped" and getattr(got, name) is not None:
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def without_bad(a):
    return jnp.concatenate([a[:BAD], a[BAD + 1 :]])


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("bad_value", [jnp.nan, jnp.inf, 1e30])  # 1e30**2 overflows f32
def test_bad_input_is_skipped(centered, bad_value):
    cfg = config(centered)
    xs, dys = batches(T)
    clean, clean_ys = run(cfg, without_bad(xs), without_bad(dys))
    poisoned, ys = run(cfg, xs.at[BAD, 1, 2].set(bad_value), dys)
    assert_same_apart_from_skipped(poisoned, clean, skipped=1)
    assert int(poisoned.step) == T - 1
    # The bad step's output is NaN in the bad channel, so the loss is NaN ...
    assert bool(jnp.isnan(ys[BAD][:, 2]).all())
    # ... and every later output is the clean run's.
    for t in range(BAD + 1, T):
        np.testing.assert_array_equal(ys[t], clean_ys[t - 1], err_msg=f"step {t + 1}")


@pytest.mark.parametrize("centered", [False, True])
def test_bad_ghost_group_skips_the_whole_step(centered):
    # Ghost batches of 2: one bad group poisons its step's statistics, so the
    # whole step (all groups) is skipped and ``step`` does not advance by G.
    cfg = config(centered, norm_batch_size=2)
    xs, dys = batches(T)
    clean, _ = run(cfg, without_bad(xs), without_bad(dys))
    poisoned, _ = run(cfg, xs.at[BAD, 3, 1].set(jnp.nan), dys)
    assert_same_apart_from_skipped(poisoned, clean, skipped=1)
    assert int(poisoned.step) == 2 * (T - 1)
    bad_grad, _ = run(cfg, xs, dys.at[BAD, 0, 0].set(jnp.inf))
    assert_same_apart_from_skipped(bad_grad, clean, skipped=1)


def forward_on_a_bad_batch(cfg, with_probes: bool):
    """(the state after two clean steps, the third step's output and state on a
    batch with a NaN in channel 0)."""
    state = F.init_state((C,), cfg)
    xs, dys = batches(3)
    for t in range(2):
        state, _ = make_step(cfg)(state, xs[t], dys[t])
    train = jax.jit(functools.partial(F.mabn_train, config=cfg))
    probes = F.init_probes(state) if with_probes else None
    y, new = train(xs[2].at[0, 0].set(jnp.nan), None, None, state, probes)
    return state, y, new


@pytest.mark.parametrize("centered", [False, True])
def test_forward_failure_is_marked_for_the_record_and_undone_by_it(centered):
    # With probes, mabn_train leaves the undoing to the record (one select per
    # leaf): its reserved slot says +inf in the failed channel (NaN in the
    # others), and record_backward_stats returns the input state (+1 skipped),
    # whatever the probe gradients are.
    cfg = config(centered)
    state, _, new = forward_on_a_bad_batch(cfg, with_probes=True)
    slot = 3 % cfg.window  # step 3's slot
    assert int(new.step) == 3 and bool(jnp.isposinf(new.psi_window[slot, 0]))
    assert bool(jnp.isnan(new.psi_window[slot, 1:]).all())
    for grads in (
        jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), F.init_probes(state)),
        jax.tree.map(jnp.ones_like, F.init_probes(state)),
    ):
        recorded = jax.jit(F.record_backward_stats)(new, grads, state)
        assert_same_apart_from_skipped(recorded, state, skipped=1)


@pytest.mark.parametrize("centered", [False, True])
def test_forward_failure_is_undone_by_mabn_train_alone_without_probes(centered):
    # Without probes nothing records the step: mabn_train undoes it itself.
    state, y, new = forward_on_a_bad_batch(config(centered), with_probes=False)
    assert_same_apart_from_skipped(new, state, skipped=1)
    assert bool(jnp.isnan(y[:, 0]).all())


@pytest.mark.parametrize("centered", [False, True])
def test_bad_upstream_gradient_is_skipped(centered):
    # Ψ_B (and g_B) are non-finite only in the backward pass, after the
    # forward already advanced the state: `previous` rolls it back.
    cfg = config(centered)
    xs, dys = batches(T)
    clean, clean_ys = run(cfg, without_bad(xs), without_bad(dys))
    poisoned, ys = run(cfg, xs, dys.at[BAD, 2, 1].set(jnp.nan))
    assert_same_apart_from_skipped(poisoned, clean, skipped=1)
    assert bool(jnp.isfinite(ys[BAD]).all())  # the forward was fine
    np.testing.assert_array_equal(ys[-1], clean_ys[-1])


@pytest.mark.parametrize("centered", [False, True])
def test_overflowing_input_gives_nan_output_not_inf(centered):
    # x² overflows float32 (1e30² = inf): without the guard the output would be
    # 0 or ±inf·0; it is NaN in the bad channel (the other channels normal).
    cfg = config(centered)
    state = F.init_state((C,), cfg)
    x = jnp.ones((4, C)).at[0, 0].set(1e30)
    train = jax.jit(functools.partial(F.mabn_train, config=cfg))
    probes = F.init_probes(state)
    y, new = train(x, None, None, state, probes)
    assert bool(jnp.isnan(y[:, 0]).all()) and bool(jnp.isfinite(y[:, 1:]).all())
    recorded = F.record_backward_stats(new, jax.tree.map(jnp.ones_like, probes), state)
    assert_same_apart_from_skipped(recorded, state, skipped=1)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = mabn_jax.CenteredDense(4)(x)
        x = mabn_jax.MABN(
            use_running_average=not train,
            buffer_size=3,
            warmup_steps=4,
            renorm_start=5,
            centered=False,
        )(x)
        return nn.Dense(2)(nn.relu(x))


MODEL = Net()
TX = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3)


@jax.jit
def flax_step(state, batch_stats, x, y, w):
    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return w * optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    (_, updates), grads = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=batch_stats)(
        state.params
    )
    state = state.apply_gradients(grads=grads)
    return state, updates["batch_stats"]


def flax_run(xs, ys, weights):
    """Trains with optax.apply_if_finite; ``weights`` scale each step's loss."""
    variables = MODEL.init(jax.random.PRNGKey(1), xs[0], train=False)
    state = train_state.TrainState.create(apply_fn=MODEL.apply, params=variables["params"], tx=TX)
    batch_stats = variables["batch_stats"]
    for x, y, w in zip(xs, ys, weights):
        state, batch_stats = flax_step(state, batch_stats, x, y, w)
    return state, batch_stats


@pytest.mark.slow
@pytest.mark.parametrize("where", ["input", "upstream_gradient"])
def test_train_step_with_apply_if_finite(where):
    # The recommended step (mabn_jax.value_and_grad) with optax.apply_if_finite:
    # the params skip the step, and so do the statistics.
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    xs = jax.random.normal(k1, (T, 6, 5))
    ys = jax.random.randint(k2, (T, 6), 0, 2)
    ws = jnp.ones((T,))
    clean_state, clean_stats = flax_run(without_bad(xs), without_bad(ys), without_bad(ws))
    if where == "input":
        xs = xs.at[BAD, 3, 1].set(jnp.nan)
    else:  # finite forward, NaN loss scale: only the backward pass sees it
        ws = ws.at[BAD].set(jnp.nan)
    state, stats = flax_run(xs, ys, ws)

    assert int(state.opt_state.total_notfinite) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, clean_state.params)
    layer, clean_layer = stats["MABN_0"], clean_stats["MABN_0"]
    assert int(layer["skipped"]) == 1
    for name in clean_layer:
        if name != "skipped":
            np.testing.assert_array_equal(layer[name], clean_layer[name], err_msg=name)


def test_layers_stacked_by_scan_skip_independently():
    # nn.scan / vmap give the state a leading layer axis; a NaN in one layer's
    # Ψ_B must roll back that layer only.
    cfg = config(False)
    one = F.init_state((C,), cfg)._replace(step=jnp.asarray(3.0))
    previous = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), one)
    slot = 4 % 3  # step 4 reserves (NaN) its slot until recorded
    advanced = previous._replace(
        step=previous.step + 1, psi_window=previous.psi_window.at[:, slot].set(jnp.nan)
    )
    psi = jnp.zeros((2, 3, C)).at[:, slot].set(1.0).at[1, slot, 0].set(jnp.nan)
    new = jax.jit(F.record_backward_stats)(advanced, F.Probes(psi), previous)
    np.testing.assert_array_equal(new.step, [4, 3])
    np.testing.assert_array_equal(new.skipped, [0, 1])
    np.testing.assert_array_equal(new.psi_window[0, slot], jnp.ones(C))
    np.testing.assert_array_equal(new.psi_window[1], previous.psi_window[1])


def test_module_skips_a_bad_batch():
    # Always on: the Flax layer's recorded state is the state as it was (one more
    # skipped) and its output is NaN where the statistics are.
    model = mabn_jax.MABN(centered=False)
    x = jnp.ones((4, C)) * jnp.arange(1.0, C + 1)
    variables = model.init(jax.random.PRNGKey(0), x, use_running_average=False)
    probes = mabn_jax.init_probes(variables["batch_stats"])
    apply = jax.jit(
        functools.partial(model.apply, use_running_average=False, mutable=["batch_stats"])
    )
    bad = x.at[0, 0].set(jnp.nan)
    y, updates = apply({**variables, "mabn_probes": probes}, bad)
    before = variables["batch_stats"]
    recorded = mabn_jax.record_backward_stats(
        updates["batch_stats"], jax.tree.map(jnp.ones_like, probes), before
    )
    assert (int(recorded["step"]), int(recorded["skipped"])) == (0, 1)
    for name in ("x2_window", "psi_window", "ema_x2"):
        np.testing.assert_array_equal(recorded[name], before[name], err_msg=name)
    assert bool(jnp.isnan(y[:, 0]).all()) and bool(jnp.isfinite(y[:, 1:]).all())


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, 3e38])
def test_a_non_finite_batch_mean_makes_the_batch_variance_non_finite(fast, bad):
    """The forward marks a failed step by σ²_B's finiteness alone: wherever μ_B is
    not finite (an inf or NaN entry, or a sum that overflows), σ²_B is not either,
    with the two-pass and the one-pass variance."""
    from mabn_jax import _stats as S

    x = jnp.ones((4, 3, 2)).at[:, :, 0].set(bad)  # 3e38: Σx overflows
    split = S.with_group_axis(S.split_groups(x, (2,), None, "MABN", None))
    mean, var = S.moments(split.x, split, use_mean=True, use_fast_variance=fast, axis_name=None)
    assert not bool(jnp.isfinite(mean[0, 0])) and not bool(jnp.isfinite(var[0, 0]))
    assert bool(jnp.isfinite(mean[0, 1])) and bool(jnp.isfinite(var[0, 1]))
