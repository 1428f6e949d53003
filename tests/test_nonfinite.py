"""A batch with non-finite statistics cannot poison the state.

The reference is the trajectory that never saw the bad batch: after it, the
state must be identical to that run's apart from the ``skipped`` counter.
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
    return F.MABNConfig(buffer_size=3, warmup_steps=4, renorm_start=5,
                        centered=centered, **kw)


def batches(n):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    scales = 1.0 + jnp.arange(n)[:, None, None] / 4.0
    x = jax.random.normal(k1, (n, 4, C)) * scales + 0.3
    dy = jax.random.normal(k2, (n, 4, C))
    return x, dy


@functools.lru_cache(maxsize=None)  # one compilation per configuration
def make_step(cfg, pass_previous=True, norm_batch_size=None):
    scale = jnp.array([1.0, 0.5, 2.0])
    bias = jnp.array([0.1, 0.0, -0.2])

    @jax.jit
    def step(state, x, dy):
        def loss(x, probes):
            y, new = F.mabn_train(x, scale, bias, state, probes, cfg,
                                  norm_batch_size=norm_batch_size)
            return jnp.sum(y * dy), new

        groups = F.num_groups(x.shape, (x.ndim - 1,), norm_batch_size)
        (_, new), (dx, stats) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            x, F.init_probes(state, groups))
        new = F.record_backward_stats(new, stats, state if pass_previous else None,
                                      skip_nonfinite=cfg.skip_nonfinite)
        return new, dx

    return step


def run(cfg, xs, dys, pass_previous=True, norm_batch_size=None):
    step = make_step(cfg, pass_previous, norm_batch_size)
    state = F.init_state((C,), cfg)
    for x, dy in zip(xs, dys):
        state, _ = step(state, x, dy)
    return state


def assert_same_apart_from_skipped(got, want, skipped):
    assert int(got.skipped) == skipped and int(want.skipped) == 0
    for name in got._fields:
        if name != "skipped":
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def without_bad(a):
    return jnp.concatenate([a[:BAD], a[BAD + 1:]])


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("bad_value", [jnp.nan, jnp.inf, 1e30])  # 1e30**2 overflows f32
def test_bad_input_is_skipped(centered, bad_value):
    cfg = config(centered)
    xs, dys = batches(T)
    clean = run(cfg, without_bad(xs), without_bad(dys))
    poisoned = run(cfg, xs.at[BAD, 1, 2].set(bad_value), dys)
    assert_same_apart_from_skipped(poisoned, clean, skipped=1)
    assert int(poisoned.step) == T - 1


@pytest.mark.parametrize("centered", [False, True])
def test_bad_ghost_group_skips_the_whole_step(centered):
    # Ghost batches of 2: one bad group poisons its step's statistics, so the
    # whole step (all groups) is skipped and ``step`` does not advance by G.
    cfg = config(centered)
    xs, dys = batches(T)
    clean = run(cfg, without_bad(xs), without_bad(dys), norm_batch_size=2)
    poisoned = run(cfg, xs.at[BAD, 3, 1].set(jnp.nan), dys, norm_batch_size=2)
    assert_same_apart_from_skipped(poisoned, clean, skipped=1)
    assert int(poisoned.step) == 2 * (T - 1)
    bad_grad = run(cfg, xs, dys.at[BAD, 0, 0].set(jnp.inf), norm_batch_size=2)
    assert_same_apart_from_skipped(bad_grad, clean, skipped=1)


@pytest.mark.parametrize("centered", [False, True])
def test_bad_input_is_skipped_without_previous(centered):
    # A forward failure is fully undone by mabn_train alone.
    cfg = config(centered)
    xs, dys = batches(T)
    clean = run(cfg, without_bad(xs), without_bad(dys), pass_previous=False)
    poisoned = run(cfg, xs.at[BAD, 0, 0].set(jnp.nan), dys, pass_previous=False)
    assert_same_apart_from_skipped(poisoned, clean, skipped=1)


@pytest.mark.parametrize("centered", [False, True])
def test_bad_upstream_gradient_is_skipped(centered):
    # Ψ_B (and g_B) are non-finite only in the backward pass, after the
    # forward already advanced the state: `previous` rolls it back.
    cfg = config(centered)
    xs, dys = batches(T)
    clean = run(cfg, without_bad(xs), without_bad(dys))
    poisoned = run(cfg, xs, dys.at[BAD, 2, 1].set(jnp.nan))
    assert_same_apart_from_skipped(poisoned, clean, skipped=1)


def test_bad_upstream_gradient_without_previous_keeps_backward_windows_finite():
    cfg = config(False)
    xs, dys = batches(T)
    state = run(cfg, xs, dys.at[BAD, 2, 1].set(jnp.nan), pass_previous=False)
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in state)


@pytest.mark.parametrize("centered", [False, True])
def test_skip_nonfinite_false_lets_nan_into_the_state(centered):
    cfg = config(centered, skip_nonfinite=False)
    step = make_step(cfg)
    state = F.init_state((C,), cfg)
    xs, dys = batches(2)
    state, _ = step(state, xs[0].at[0, 0].set(jnp.nan), dys[0])
    assert int(state.step) == 1 and int(state.skipped) == 0
    ema = state.ema_var if centered else state.ema_x2
    assert bool(jnp.isnan(ema).any())


def test_output_of_skipped_step_may_be_nan_but_state_is_not():
    cfg = config(False)
    state = F.init_state((C,), cfg)
    x = jnp.ones((4, C)).at[0, 0].set(jnp.nan)
    y, new = F.mabn_train(x, None, None, state, F.init_probes(state), cfg)
    assert bool(jnp.isnan(y).any())
    assert int(new.skipped) == 1 and int(new.step) == 0
    np.testing.assert_array_equal(new.x2_window, state.x2_window)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = mabn_jax.CenteredDense(4)(x)
        x = mabn_jax.MABN(use_running_average=not train, buffer_size=3,
                          warmup_steps=4, renorm_start=5)(x)
        return nn.Dense(2)(nn.relu(x))


MODEL = Net()
TX = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3)


@jax.jit
def flax_step(state, batch_stats, x, y, w):
    def loss_fn(params, probes):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": batch_stats, "mabn_probes": probes},
            x, train=True, mutable=["batch_stats"])
        return w * optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    (_, updates), (grads, stats) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, mabn_jax.init_probes(batch_stats))
    state = state.apply_gradients(grads=grads)
    new_stats = mabn_jax.record_backward_stats(updates["batch_stats"], stats,
                                               previous=batch_stats)
    return state, new_stats


def flax_run(xs, ys, weights):
    """Trains with optax.apply_if_finite; ``weights`` scale each step's loss."""
    variables = MODEL.init(jax.random.PRNGKey(1), xs[0], train=False)
    state = train_state.TrainState.create(
        apply_fn=MODEL.apply, params=variables["params"], tx=TX)
    batch_stats = variables["batch_stats"]
    for x, y, w in zip(xs, ys, weights):
        state, batch_stats = flax_step(state, batch_stats, x, y, w)
    return state, batch_stats


@pytest.mark.parametrize("where", ["input", "upstream_gradient"])
def test_train_step_with_apply_if_finite(where):
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
    one = F.init_state((C,), cfg)._replace(step=jnp.asarray(3, jnp.int32))
    previous = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), one)
    advanced = previous._replace(step=previous.step + 1)
    psi = jnp.ones((2, C)).at[1, 0].set(jnp.nan)
    new = F.record_backward_stats(advanced, F.Probes(psi), previous)
    np.testing.assert_array_equal(new.step, [4, 3])
    np.testing.assert_array_equal(new.skipped, [0, 1])
    np.testing.assert_array_equal(new.psi_window[0, 4 % 3], jnp.ones(C))
    np.testing.assert_array_equal(new.psi_window[1], previous.psi_window[1])


@pytest.mark.parametrize("skip", [True, False])
def test_module_attribute_sets_the_policy(skip):
    model = mabn_jax.MABN(skip_nonfinite=skip)
    x = jnp.ones((4, C))
    variables = model.init(jax.random.PRNGKey(0), x, use_running_average=False)
    probes = mabn_jax.init_probes(variables["batch_stats"])
    _, updates = model.apply({**variables, "mabn_probes": probes}, x.at[0, 0].set(jnp.nan),
                             use_running_average=False, mutable=["batch_stats"])
    stats = updates["batch_stats"]
    assert (int(stats["step"]), int(stats["skipped"])) == ((0, 1) if skip else (1, 0))
    assert bool(jnp.isfinite(stats["ema_x2"]).all()) == skip
