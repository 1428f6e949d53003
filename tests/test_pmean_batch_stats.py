"""``lax.pmean(batch_stats)`` after each step, as Flax's examples do, is harmless.

Flax's ImageNet example (google/flax examples/imagenet/train.py) keeps one
unreplicated ``TrainState``, runs ``jax.pmap(train_step, in_axes=(None, 0),
out_axes=(None, 0))`` and returns ``lax.pmean(new_model_state['batch_stats'])``.
``train_step`` below has that structure with ``mabn_jax.value_and_grad``.

* Synchronized statistics (``axis_name``): the state is already the same on
  every device, so the pmean changes nothing, bit for bit, and the float
  counters stay exact integers; the state checkpoints and restores.
* Per-device statistics: the pmean averages the devices' windows and EMAs
  (for the plain layer on the input, the average of the devices' E[x²] is the
  global batch's). A device that skips a non-finite batch leaves fractional
  counters (its peers advanced), which the layer rounds on read; training
  goes on, and ``skipped`` averages the devices' skips.

Two simulated devices (``tests/conftest.py`` makes eight), so that the pmean
of two equal float32 values is exactly that value.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state
from jax import lax

import mabn_jax

N_DEV, PER_DEV, STEPS = 2, 4, 10
DEVICES = jax.devices()[:N_DEV]
SCALES = np.array([1, 1, 1, 1, 1, 1, 10, 10, 10, 0.5], np.float32)  # r clips at step 7
EPS = 1e-5


class Net(nn.Module):
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = functools.partial(
            mabn_jax.MABN,
            use_running_average=not train,
            centered=False,
            axis_name=self.axis_name,
            buffer_size=2,
            warmup_steps=3,
            renorm_start=6,
        )
        x = jnp.tanh(norm()(x))  # first layer: its χ²_B is that of the input
        x = jnp.tanh(norm()(mabn_jax.CenteredDense(6, use_bias=False)(x)))
        return nn.Dense(3)(x)


class TrainState(train_state.TrainState):
    batch_stats: dict


def train_step(state, batch, pmean_batch_stats=True):
    """Flax ImageNet's train_step, trimmed; a non-finite step keeps params and
    opt_state as its DynamicScale branch does."""

    def loss_fn(params):
        logits, new_model_state = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["x"],
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, (new_model_state, logits)

    grad_fn = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=state.batch_stats)
    (loss, (new_model_state, _)), grads = grad_fn(state.params)
    grads = lax.pmean(grads, axis_name="batch")
    is_fin = jnp.all(jnp.array([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]))
    batch_stats = new_model_state["batch_stats"]
    if pmean_batch_stats:
        batch_stats = lax.pmean(batch_stats, "batch")
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    keep = functools.partial(jnp.where, is_fin)
    new_state = new_state.replace(
        params=jax.tree.map(keep, new_state.params, state.params),
        opt_state=jax.tree.map(keep, new_state.opt_state, state.opt_state),
    )
    return new_state, loss


# Bookkeeping, not numerics: compiled without most optimizations (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("fast_compiles")


@functools.lru_cache  # shared by the tests: one compilation per variant
def p_train_step(pmean_batch_stats=True, state_in=None, state_out=None):
    """Flax's pmap: the state broadcast in and returned unreplicated (``None``), or
    with a leading device axis (``0``)."""
    return jax.pmap(
        functools.partial(train_step, pmean_batch_stats=pmean_batch_stats),
        axis_name="batch",
        in_axes=(state_in, 0),
        out_axes=(state_out, 0),
        devices=DEVICES,
    )


@functools.lru_cache  # one apply_fn and tx per model, so the steps' caches are shared
def create_state(model):
    x = jnp.ones((PER_DEV, 5))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.sgd(0.1, momentum=0.9),
        batch_stats=variables["batch_stats"],
    )


def batches(seed=0, per_device_scale=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((STEPS, N_DEV, PER_DEV, 5)).astype(np.float32) + 0.3
    x *= SCALES[:, None, None, None]
    if per_device_scale:  # every device's statistics differ
        x *= np.array([0.5, 3.0], np.float32)[None, :, None, None]
    y = rng.integers(0, 3, (STEPS, N_DEV, PER_DEV)).astype(np.int32)
    return [{"x": x[t], "y": y[t]} for t in range(STEPS)]


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def stacked(tree):
    """Per-device copies (the old replicated-state convention)."""
    return jax.tree.map(lambda a: np.stack([np.asarray(a)] * N_DEV), host(tree))


def _renorm_clips(before, after, r_max=5.0):
    """Whether the step from ``before`` to ``after`` renormalized with r clipped in
    some channels only (the window mean against the EMA it started from)."""
    layer, prev = after["MABN_0"], before["MABN_0"]
    r = np.sqrt(layer["x2_window"].mean(0) + EPS) / np.sqrt(prev["ema_x2"] + EPS)
    return int(layer["step"]) > 6 and np.any(r > r_max) and np.any(r < r_max)


def test_pmean_of_synchronized_batch_stats_changes_nothing(tmp_path):
    """axis_name='batch': the trajectory with the pmean equals the one without, bit
    for bit, through warm-up, window and renormalization with r clipped; counters
    are exact; the state checkpoints (check_batch_stats passes) and restores."""
    state0 = create_state(Net(axis_name="batch"))
    with_pmean = p_train_step(True)
    without = p_train_step(False, 0, 0)  # per-device copies, compared below
    a, b = state0, stacked(state0)
    clipped = False
    for t, batch in enumerate(batches()):
        prev = host(a.batch_stats)
        a, loss_a = with_pmean(a, batch)
        b, loss_b = without(b, batch)
        a_host, b_host = host(a), host(b)
        leaves_b = jax.tree.leaves((b_host.params, b_host.opt_state, b_host.batch_stats))
        for (path, x), y in zip(
            jax.tree_util.tree_flatten_with_path(
                (a_host.params, a_host.opt_state, a_host.batch_stats)
            )[0],
            leaves_b,
        ):
            for d in range(N_DEV):
                np.testing.assert_array_equal(
                    x, y[d], err_msg=f"step {t + 1} device {d} {jax.tree_util.keystr(path)}"
                )
        np.testing.assert_array_equal(np.asarray(loss_a), np.asarray(loss_b))
        for layer in a_host.batch_stats.values():
            assert layer["step"].dtype == np.float32 and layer["step"] == t + 1
            assert layer["skipped"] == 0
        clipped |= _renorm_clips(prev, a_host.batch_stats)
    assert clipped

    path = tmp_path / "ckpt"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, a)
    ckptr.wait_until_finished()
    stored = ckptr.metadata(path).item_metadata.tree
    mabn_jax.check_batch_stats(stored["batch_stats"], a.batch_stats)
    restored = ckptr.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, host(a)))
    for x, y in zip(jax.tree.leaves(host(restored)), jax.tree.leaves(a_host)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_pmean_of_per_device_batch_stats_averages_the_devices():
    """axis_name=None: each step's pmean'ed state is the mean of the per-device states
    that step produced, the plain layer's χ² window then holds the global batch's
    E[x²], counters stay exact, and training goes on."""
    model = Net()
    step, per_device = p_train_step(True), p_train_step(False, state_out=0)
    state = create_state(model)
    data = batches(seed=1, per_device_scale=True)
    for t, batch in enumerate(data):
        ref, _ = per_device(state, batch)  # from the same state, without the pmean
        state, loss = step(state, batch)
        assert np.isfinite(np.asarray(loss)).all()
        got, ref = host(state.batch_stats), host(ref.batch_stats)
        mean = jax.tree.map(lambda v: v.mean(0), ref)
        for path, x in jax.tree_util.tree_flatten_with_path(got)[0]:
            y = functools.reduce(lambda n, k: n[k.key], path, mean)
            np.testing.assert_allclose(
                x, y, rtol=1e-6, atol=1e-7, err_msg=f"step {t + 1} {jax.tree_util.keystr(path)}"
            )
        assert all(layer["step"] == t + 1 for layer in got.values())
        assert not np.allclose(ref["MABN_0"]["x2_window"][0], ref["MABN_0"]["x2_window"][1])
        if t == 0:
            x = batch["x"].reshape(-1, 5)
            np.testing.assert_allclose(got["MABN_0"]["x2_window"][1], (x * x).mean(0), rtol=1e-6)


def test_pmean_after_one_device_skips_a_nonfinite_batch():
    """Per-device statistics, a NaN batch on device 1 at steps 4 and 6: the devices'
    counters disagree, so the pmean'ed ones are fractional (step 3.5, skipped 0.5).
    The layer rounds the step on read and compares skip counts by difference: the
    state stays finite, the next step is whole again, a second skip counts, and
    the checkpoint check passes. With synchronized statistics every device skips
    together and the counters stay whole."""
    data = batches(seed=2, per_device_scale=True)[:8]
    for t in (3, 5):
        data[t]["x"] = data[t]["x"].copy()
        data[t]["x"][1, 0, 0] = np.nan
    for axis_name in (None, "batch"):
        state = create_state(Net(axis_name=axis_name))
        step = p_train_step(True)
        steps, skips = [], []
        for t, batch in enumerate(data):
            params = host(state.params)
            state, loss = step(state, batch)
            bs = host(state.batch_stats)
            for leaf in jax.tree.leaves(bs):
                assert np.isfinite(leaf).all(), f"step {t + 1}"
            if t in (3, 5):  # the parameters skip the step (non-finite gradients)
                for x, y in zip(jax.tree.leaves(host(state.params)), jax.tree.leaves(params)):
                    np.testing.assert_array_equal(x, y)
            else:
                assert np.isfinite(np.asarray(loss)).all()
            steps.append(float(bs["MABN_0"]["step"]))
            skips.append(float(bs["MABN_0"]["skipped"]))
        if axis_name is None:  # round(3.5) = 4: half to even
            assert steps == [1, 2, 3, 3.5, 5, 5.5, 7, 8], steps
            assert skips == [0, 0, 0, 0.5, 0.5, 1, 1, 1], skips
        else:
            assert steps == [1, 2, 3, 3, 4, 4, 5, 6], steps
            assert skips == [0, 0, 0, 1, 1, 2, 2, 2], skips
        mabn_jax.check_batch_stats(host(state.batch_stats), create_state(Net()).batch_stats)
