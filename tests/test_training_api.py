"""``mabn_jax.value_and_grad`` (the one-call training API) and the misuse
detection of the low-level layer under it (``init_probes``,
``record_backward_stats``).

The reference for the helper is the low-level API written out (probes as the
``'mabn_probes'`` collection, ``argnums`` over them, ``record_backward_stats``
with ``previous``). Where both compute the same program the results are
compared bitwise; across different programs (``lax.scan`` or ``nn.scan`` vs a
loop, devices vs one device, loss scaling, optax's update vs NumPy's) with
float32 rounding tolerances.

Trajectories use ``buffer_size=2, warmup_steps=3, renorm_start=5``: steps 1-2
use batch statistics, 3-5 the windows, 6-8 renormalize, and the input scale
jumps 10x at step 6 so that ``r`` is clipped. Most tests use a one-layer model
(``Small``): each distinct program costs a compilation.
"""

import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import batch_mesh
from flax.core import FrozenDict, freeze
from flax.training import train_state
from flax.training.dynamic_scale import DynamicScale, DynamicScaleResult
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tree_assert import assert_close

import mabn_jax

STEPS, BATCH, FEATURES = 8, 4, 7
SCALES = (1.0, 1.0, 1.0, 1.0, 1.0, 10.0, 10.0, 10.0)
KW = dict(buffer_size=2, warmup_steps=3, renorm_start=5)
LR = 0.1
TX = optax.sgd(LR)


class Net(nn.Module):
    """A plain MABN after a centered dense layer, a centered MABN after a dense one."""

    frozen: tuple = ()  # MABN layers applied in inference mode when training

    @nn.compact
    def __call__(self, x, train):
        def norm(name, **kw):
            return mabn_jax.MABN(
                use_running_average=not train or name in self.frozen, name=name, **KW, **kw
            )

        x = norm("plain", centered=False)(mabn_jax.CenteredDense(6)(x))
        x = norm("centered", centered=True)(nn.Dense(5)(nn.relu(x)))
        return nn.Dense(3)(nn.relu(x))


class Small(nn.Module):
    """One centered MABN (Ψ and g windows)."""

    axis_name: str | None = None
    frozen: bool = False

    @nn.compact
    def __call__(self, x, train):
        x = mabn_jax.MABN(
            use_running_average=not train or self.frozen,
            centered=True,
            axis_name=self.axis_name,
            **KW,
        )(nn.Dense(5)(x))
        return nn.Dense(3)(nn.relu(x))


class TrainState(train_state.TrainState):
    batch_stats: object = None


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def data(steps=STEPS, batch=BATCH):
    """The first ``steps`` batches of one sequence per batch size (NumPy:
    eager JAX ops would each compile)."""
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((STEPS, batch, FEATURES), np.float32) + 0.3
    x *= np.asarray(SCALES, np.float32)[:, None, None]
    y = rng.integers(0, 3, (STEPS, batch)).astype(np.int32)
    return x[:steps], y[:steps]


@functools.lru_cache
def _variables(model, batch):
    init = jax.jit(functools.partial(model.init, train=False))
    return jax.device_get(init(jax.random.PRNGKey(0), data(1, batch)[0][0]))


def new_state(model=None, tx=TX, batch=BATCH):
    model = Net() if model is None else model
    v = _variables(model, batch)
    return TrainState.create(
        apply_fn=model.apply, params=v["params"], tx=tx, batch_stats=v["batch_stats"]
    )


# The nn.BatchNorm train step of the README, and the MABN one: only the
# value_and_grad line differs (test_bn_step_becomes_mabn_step_by_one_line).


def bn_train_step(state, x, y):
    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return xent(logits, y), updates

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, updates), grads = grad_fn(state.params)
    state = state.apply_gradients(grads=grads)
    state = state.replace(batch_stats=updates["batch_stats"])
    return state, loss


def mabn_train_step(state, x, y):
    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return xent(logits, y), updates

    grad_fn = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=state.batch_stats)
    (loss, updates), grads = grad_fn(state.params)
    state = state.apply_gradients(grads=grads)
    state = state.replace(batch_stats=updates["batch_stats"])
    return state, loss


def probed_loss(state, params, probes, x, y):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats, mabn_jax.PROBES: probes},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    return xent(logits, y), updates


def low_level_train_step(state, x, y):
    """The reference train step: the low-level API."""
    (loss, updates), (grads, probe_grads) = jax.value_and_grad(
        functools.partial(probed_loss, state, x=x, y=y), argnums=(0, 1), has_aux=True
    )(state.params, mabn_jax.init_probes(state.batch_stats))
    batch_stats = mabn_jax.record_backward_stats(
        updates["batch_stats"], probe_grads, previous=state.batch_stats
    )
    state = state.apply_gradients(grads=grads)
    return state.replace(batch_stats=batch_stats), loss


def run(step, state, x, y):
    """(state, loss) after each step."""
    step, out = jax.jit(step), []
    for t in range(x.shape[0]):
        state, loss = step(state, x[t], y[t])
        out.append((state, loss))
    return out


@functools.lru_cache
def reference_trajectory():
    """The low-level trajectory of Net."""
    x, y = data()
    return jax.device_get(run(low_level_train_step, new_state(), x, y))


RECORD = jax.jit(mabn_jax.record_backward_stats)


@functools.lru_cache
def _small_grads():
    """Small's low-level gradient, jitted: ``(params, batch_stats, x, y) ->
    (loss, unrecorded batch_stats, (params and input gradients), probe gradients)``."""
    state = new_state(Small())

    def grads(params, bs, x, y):
        f = lambda params, x, probes: probed_loss(
            state.replace(batch_stats=bs), params, probes, x, y
        )
        (loss, updates), (g_params, g_x, probe_grads) = jax.value_and_grad(
            f, (0, 1, 2), has_aux=True
        )(params, x, mabn_jax.init_probes(bs))
        return loss, updates["batch_stats"], (g_params, g_x), probe_grads

    return jax.jit(grads)


def small_reference(x, y, state=None):
    """Small trained with the low-level API and NumPy SGD: [(params, batch_stats, loss)]."""
    state = state or new_state(Small())
    params, bs, out = state.params, state.batch_stats, []
    for t in range(x.shape[0]):
        loss, new, (grads, _), pg = _small_grads()(params, bs, x[t], y[t])
        bs = jax.device_get(RECORD(new, pg, bs))
        params = jax.tree.map(lambda p, g: p - np.float32(LR) * g, params, jax.device_get(grads))
        out.append((params, bs, loss))
    return out


def assert_same(a, b, what=""):
    """Bitwise equal pytrees (same structure)."""
    a, b = jax.device_get((a, b))
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for (path, x), z in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, z, err_msg=f"{what} {jax.tree_util.keystr(path)}")


def thaw(tree):
    """``tree`` with every FrozenDict a dict."""
    if isinstance(tree, (dict, FrozenDict)):
        return {k: thaw(v) for k, v in tree.items()}
    return tuple(thaw(v) for v in tree) if isinstance(tree, tuple) else tree


# --------------------------------------------------------------------------- drop-in


@pytest.mark.slow
def test_bn_step_becomes_mabn_step_by_one_line():
    """The README's nn.BatchNorm step, with only the value_and_grad line
    changed, trains MABN bitwise as the low-level API does, through the
    batch, window and renormalization phases."""
    bn = inspect.getsource(bn_train_step).splitlines()
    mabn = inspect.getsource(mabn_train_step).splitlines()
    changed = [(a, b) for a, b in zip(bn[1:], mabn[1:]) if a != b]
    assert len(bn) == len(mabn) and len(changed) == 1
    assert changed[0][0].strip() == "grad_fn = jax.value_and_grad(loss_fn, has_aux=True)"
    assert changed[0][1].strip() == (
        "grad_fn = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=state.batch_stats)"
    )

    x, y = data()
    got = run(mabn_train_step, new_state(), x, y)
    ref = reference_trajectory()
    for t, ((state, loss), (r_state, r_loss)) in enumerate(zip(got, ref)):
        assert_same(loss, r_loss, what=f"step {t + 1} loss")
        assert_same(state.params, r_state.params, what=f"step {t + 1} params")
        assert_same(state.batch_stats, r_state.batch_stats, what=f"step {t + 1} batch_stats")
    # Coverage: the renormalization steps 6-8 clip r at r_max in some channels
    # (r from the state: window mean after the step vs the EMA before it).
    before, after = ref[4:7], ref[5:8]
    r = np.stack(
        [
            np.clip(
                np.sqrt(a.batch_stats["plain"]["x2_window"].mean(0) + 1e-5)
                / np.sqrt(b.batch_stats["plain"]["ema_x2"] + 1e-5),
                0.2,
                5.0,
            )
            for (b, _), (a, _) in zip(before, after)
        ]
    )
    assert np.any(r == 5.0) and np.any(r < 5.0)
    assert int(got[-1][0].batch_stats["centered"]["step"]) == STEPS


def test_model_without_mabn_is_jax_value_and_grad():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return nn.Dense(3)(nn.relu(nn.Dense(4)(x)))

    model = Plain()
    params = _variables(model, BATCH)["params"]
    x, y = data(1)

    def loss_fn(params, x):  # has_aux=False
        return xent(model.apply({"params": params}, x, train=True), y[0])

    want = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(params, x[0])
    got = jax.jit(mabn_jax.value_and_grad(loss_fn, argnums=(0, 1), batch_stats={}))(params, x[0])
    assert_same(got, want)


def test_model_with_only_batchnorm_is_the_batchnorm_step():
    class BN(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
            return nn.Dense(3)(nn.relu(x))

    x, y = data(3)
    state = new_state(BN())
    got = run(mabn_train_step, state, x, y)
    assert_same(got, run(bn_train_step, state, x, y))
    assert not np.allclose(got[-1][0].batch_stats["BatchNorm_0"]["var"], 1.0)


class Ghost(nn.Module):
    """Two MABN layers with different ghost batch sizes: 4 and 2 groups of a
    batch of 8, against windows of 2 steps."""

    @nn.compact
    def __call__(self, x, train):
        x = mabn_jax.MABN(use_running_average=not train, norm_batch_size=2, centered=False, **KW)(
            mabn_jax.CenteredDense(6)(x)
        )
        x = mabn_jax.MABN(use_running_average=not train, norm_batch_size=4, centered=True, **KW)(x)
        return nn.Dense(3)(x)


@pytest.mark.slow
def test_ghost_batches_need_no_group_count():
    x, y = data(3, batch=8)
    state = new_state(Ghost(), batch=8)
    probes = mabn_jax.init_probes(state.batch_stats)  # window-shaped, whatever G is
    assert jax.tree.map(jnp.shape, probes) == {
        "MABN_0": {"psi": (2, 6)},
        "MABN_1": {"psi": (2, 6), "g": (2, 6)},
    }
    got = run(mabn_train_step, state, x, y)
    assert_same(got, run(low_level_train_step, state, x, y))
    final = got[-1][0].batch_stats
    assert (int(final["MABN_0"]["step"]), int(final["MABN_1"]["step"])) == (12, 6)
    for layer, name in (("MABN_0", "psi_window"), ("MABN_1", "g_window")):
        window = np.asarray(final[layer][name])
        assert np.isfinite(window).all() and np.all(np.any(window != 0, axis=-1)), layer


def test_frozen_dict_params_and_batch_stats():
    x, y = data(1)
    state = new_state(Small())
    params, bs = freeze(state.params), freeze(state.batch_stats)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": bs}, x[0], train=True, mutable=["batch_stats"]
        )
        return xent(logits, y[0]), updates

    (loss, updates), grads = jax.jit(
        mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=bs)
    )(params)
    assert isinstance(grads, FrozenDict)  # the params' structure, without probes
    # The low-level API on the same values (as dicts: no second compilation).
    r_loss, new, (r_grads, _), pg = _small_grads()(state.params, state.batch_stats, x[0], y[0])
    assert_same(
        thaw((loss, updates["batch_stats"], grads)),
        (r_loss, RECORD(new, pg, state.batch_stats), r_grads),
    )


def test_argnums_tuple():
    """argnums=(0, 1): params (probes inserted) and the input."""
    x, y = data(1)
    state = new_state(Small())

    def loss_fn(params, x):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return xent(logits, y[0]), updates

    (loss, updates), grads = jax.jit(
        mabn_jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True, batch_stats=state.batch_stats
        )
    )(state.params, x[0])
    assert isinstance(grads, tuple) and grads[1].shape == x[0].shape
    assert jax.tree.structure(grads[0]) == jax.tree.structure(state.params)  # no probes
    r_loss, new, r_grads, pg = _small_grads()(state.params, state.batch_stats, x[0], y[0])
    assert_same(
        (loss, updates["batch_stats"], grads), (r_loss, RECORD(new, pg, state.batch_stats), r_grads)
    )


# --------------------------------------------------------------------------- transforms


def test_lax_scan_over_steps_carrying_the_train_state():
    x, y = data(6)

    @jax.jit
    def train(state, xs, ys):
        return lax.scan(lambda state, batch: mabn_train_step(state, *batch), state, (xs, ys))

    state, losses = train(new_state(Small()), x, y)
    ref = small_reference(x, y)
    assert int(state.batch_stats["MABN_0"]["step"]) == 6
    assert_close(losses, np.stack([loss for _, _, loss in ref]), what="losses")
    assert_close(state.batch_stats, ref[-1][1], what="batch_stats")
    assert_close(state.params, ref[-1][0], what="params")


def test_optax_multisteps():
    """Gradient accumulation over 2 micro-batches: the params move every 2nd
    step by the mean gradient, the statistics every step."""
    x, y = data(4)
    state = new_state(Small(), tx=optax.MultiSteps(optax.sgd(LR), every_k_schedule=2))
    got = run(mabn_train_step, state, x, y)
    assert [int(s.batch_stats["MABN_0"]["step"]) for s, _ in got] == [1, 2, 3, 4]
    params = [state.params] + [s.params for s, _ in got]
    moved = [
        not np.array_equal(a["Dense_0"]["kernel"], b["Dense_0"]["kernel"])
        for a, b in zip(params, params[1:])
    ]
    assert moved == [False, True, False, True]

    # By hand, with the low-level API: two micro-batches on the same params.
    p, bs, acc = state.params, state.batch_stats, None
    for t in range(4):
        _, new, (g, _), pg = _small_grads()(p, bs, x[t], y[t])
        bs, g = jax.device_get((RECORD(new, pg, bs), g))
        acc = g if acc is None else jax.tree.map(lambda a, b: (a + b) / 2, acc, g)
        if t % 2:
            p, acc = jax.tree.map(lambda p, g: p - np.float32(LR) * g, p, acc), None
        assert_close(got[t][0].batch_stats, bs, what=f"step {t + 1} batch_stats")
        assert_close(got[t][0].params, p, what=f"step {t + 1} params")


LAYERS = 2


class StackedBlocks(nn.Module):
    """Dense + centered MABN + tanh, twice: by nn.scan or written out."""

    scan: bool = True
    broadcast_params: bool = False

    @nn.compact
    def __call__(self, x, train):
        block = functools.partial(_Block, train=train)
        if self.scan:
            lift = (
                dict(
                    variable_axes={"batch_stats": 0},
                    variable_broadcast="params",
                    split_rngs={"params": False},
                )
                if self.broadcast_params
                else dict(
                    variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True}
                )
            )
            x, _ = nn.scan(lambda mdl, c, _: (mdl(c), None), length=LAYERS, **lift)(
                block(name="blocks"), x, None
            )
        else:
            for i in range(LAYERS):
                x = block(name=f"blocks_{i}")(x)
        return nn.Dense(3)(x)


class _Block(nn.Module):
    train: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(FEATURES)(x)
        return jnp.tanh(mabn_jax.MABN(use_running_average=not self.train, centered=True, **KW)(x))


def _unstack(tree):
    """StackedBlocks(scan=True) variables -> the unrolled model's."""
    out = {k: v for k, v in tree.items() if k != "blocks"}
    for i in range(LAYERS):
        out[f"blocks_{i}"] = jax.tree.map(lambda a: a[i], tree["blocks"])
    return out


@pytest.mark.slow
def test_nn_scan_over_stacked_mabn_layers_equals_unrolled():
    x, y = data(6)
    state = new_state(StackedBlocks())
    assert state.batch_stats["blocks"]["MABN_0"]["psi_window"].shape == (LAYERS, 2, FEATURES)
    unrolled = state.replace(
        apply_fn=StackedBlocks(scan=False).apply,
        params=_unstack(state.params),
        batch_stats=_unstack(state.batch_stats),
    )
    got = run(mabn_train_step, state, x, y)
    want = run(mabn_train_step, unrolled, x, y)
    for t, ((s, loss), (u, u_loss)) in enumerate(zip(got, want)):
        assert_close(loss, u_loss, what=f"step {t + 1} loss")
        assert_close(_unstack(s.batch_stats), u.batch_stats, what=f"step {t + 1} batch_stats")
        assert_close(_unstack(s.params), u.params, what=f"step {t + 1} params")
    psi = np.asarray(got[-1][0].batch_stats["blocks"]["MABN_0"]["psi_window"])
    assert not np.allclose(psi[0], psi[1]) and np.all(psi != 0)  # one window per layer


def test_nn_scan_with_broadcast_params_but_stacked_batch_stats_is_a_clear_error():
    model = StackedBlocks(broadcast_params=True)
    x, y = data(1)
    v = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x[0])
    assert v["batch_stats"]["blocks"]["MABN_0"]["psi_window"].shape == (LAYERS, 2, FEATURES)
    assert v["params"]["blocks"]["Dense_0"]["kernel"].ndim == 2  # shared by the layers
    state = TrainState.create(
        apply_fn=model.apply, params=v["params"], tx=TX, batch_stats=v["batch_stats"]
    )
    with pytest.raises(
        ValueError,
        match=r"probe 'psi' has shape \(2, 2, 7\) but this layer's "
        r"window is \(2, 7\); .*nn.scan.*variable_axes="
        r"\{'params': 0, 'batch_stats': 0\}",
    ):
        jax.eval_shape(mabn_train_step, state, x[0], y[0])


# --------------------------------------------------------------------------- loss scaling


@jax.jit
def scaled_step(state, ds, x, y):
    """The DynamicScale train step (flax's pattern: params kept on a non-finite step)."""

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return xent(logits, y), updates

    result = mabn_jax.value_and_grad(
        loss_fn, has_aux=True, batch_stats=state.batch_stats, dynamic_scale=ds
    )(state.params)
    assert isinstance(result, DynamicScaleResult)  # as DynamicScale.value_and_grad's
    ds, is_fin, (loss, updates), grads = result
    new = state.apply_gradients(grads=grads)
    params = jax.tree.map(lambda a, b: jnp.where(is_fin, a, b), new.params, state.params)
    return new.replace(params=params, batch_stats=updates["batch_stats"]), ds, is_fin, loss


def new_dynamic_scale():
    return DynamicScale(
        growth_interval=3,
        fin_steps=jnp.zeros((), jnp.int32),
        scale=jnp.asarray(2.0**10, jnp.float32),
    )


def flax_dynamic_scale(finite):
    """(scale, fin_steps) after each step of DynamicScale.value_and_grad itself
    on a function whose gradient is finite or not as given."""
    f = jax.jit(lambda ds, c: ds.value_and_grad(lambda p: p * c)(jnp.float32(1.0)))
    ds, out = new_dynamic_scale(), []
    for ok in finite:
        ds, is_fin, _, _ = f(ds, jnp.float32(1.0 if ok else np.nan))
        assert bool(is_fin) == ok
        out.append((float(ds.scale), int(ds.fin_steps)))
    return out


def test_dynamic_scale_trains_as_without_loss_scaling():
    """A loss scale of 2**10 (growing to 2**11): the recorded statistics are
    the unscaled ones, the trajectory is the unscaled one, and scale and
    fin_steps follow DynamicScale's rules."""
    x, y = data(6)
    state, ds, book = new_state(Small()), new_dynamic_scale(), []
    for t, (r_params, r_bs, r_loss) in enumerate(small_reference(x, y)):
        state, ds, is_fin, loss = scaled_step(state, ds, x[t], y[t])
        assert bool(is_fin)
        book.append((float(ds.scale), int(ds.fin_steps)))
        what = f"step {t + 1}"
        assert_close(loss, r_loss, what=what)
        assert_close(state.batch_stats, r_bs, what=what + " batch_stats")
        assert_close(state.params, r_params, what=what + " params")
    assert book == flax_dynamic_scale([True] * 6)
    assert book[0][0] == 2.0**10 and book[-1][0] == 2.0**11


@jax.jit
def low_level_scaled_step(state, x, y, scale):
    """The low-level API with a loss scaled by ``scale``: the probes carry it."""

    def loss_fn(params, probes):
        loss, updates = probed_loss(state, params, probes, x, y)
        return scale * loss, updates

    (_, updates), (grads, probe_grads) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(
        state.params, mabn_jax.init_probes(state.batch_stats, loss_scale=scale)
    )
    unscale = lambda g: g / scale
    batch_stats = mabn_jax.record_backward_stats(
        updates["batch_stats"], jax.tree.map(unscale, probe_grads), previous=state.batch_stats
    )
    state = state.apply_gradients(grads=jax.tree.map(unscale, grads))
    return state.replace(batch_stats=batch_stats)


def test_low_level_loss_scale_trains_as_without_loss_scaling():
    """init_probes(loss_scale=...): the layers scale their stored windows to the
    scaled gradient, so a changing loss scale trains as no scaling does."""
    x, y = data(6)
    state = new_state(Small())
    for t, (r_params, r_bs, _) in enumerate(small_reference(x, y)):
        state = low_level_scaled_step(state, x[t], y[t], jnp.float32(2.0 ** (10 + t % 3)))
        assert_close(state.batch_stats, r_bs, what=f"step {t + 1} batch_stats")
        assert_close(state.params, r_params, what=f"step {t + 1} params")


def test_dynamic_scale_non_finite_step():
    """A NaN batch: is_fin is False, the scale backs off as DynamicScale's,
    the params stay and the statistics roll back (one more skipped)."""
    x, y = data(5)
    x[3, 0, 0] = np.nan
    state, ds, book = new_state(Small()), new_dynamic_scale(), []
    for t in range(5):
        previous = state
        state, ds, is_fin, loss = scaled_step(state, ds, x[t], y[t])
        book.append((float(ds.scale), int(ds.fin_steps)))
        assert bool(is_fin) == (t != 3) and np.isfinite(loss) == (t != 3)
        if t == 3:
            assert_same(state.params, previous.params)
            layer, before = dict(state.batch_stats["MABN_0"]), previous.batch_stats["MABN_0"]
            assert int(layer.pop("skipped")) == 1
            assert_same(layer, {k: v for k, v in before.items() if k != "skipped"})
    assert book == flax_dynamic_scale([True, True, True, False, True])
    assert int(state.batch_stats["MABN_0"]["step"]) == 4


# --------------------------------------------------------------------------- devices

N_DEV = 2  # of the 8 simulated CPU devices (tests/conftest.py)
DEV_STEPS = 6


def sum_loss_step(state, x, y, denominator, reduce=None):
    """The helper step on loss sum/denominator; ``reduce`` combines device grads."""

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
        return loss / denominator, updates

    (loss, updates), grads = mabn_jax.value_and_grad(
        loss_fn, has_aux=True, batch_stats=state.batch_stats
    )(state.params)
    if reduce is not None:
        grads = reduce(grads)
    state = state.apply_gradients(grads=grads)
    return state.replace(batch_stats=updates["batch_stats"]), grads


def stacked(tree):
    """``N_DEV`` copies along a leading axis, laid out as pmap lays out its
    outputs (so that every step reuses one compilation)."""
    tree = jax.tree.map(lambda a: np.stack([np.asarray(a)] * N_DEV), jax.device_get(tree))
    return jax.pmap(lambda t: t, axis_name="batch", devices=jax.devices()[:N_DEV])(tree)


def synchronized_state():
    """Small with axis_name='batch' (its variables are Small()'s: init ignores
    the axis name)."""
    return new_state(Small()).replace(apply_fn=Small(axis_name="batch").apply)


@functools.lru_cache
def global_batch_reference():
    """One device, the global batch of 4 (2 per device) and its mean loss."""
    x, y = data(DEV_STEPS)
    return small_reference(x, y)


def test_pmap_synchronized_statistics_equal_one_device():
    x, y = data(DEV_STEPS)
    state = stacked(synchronized_state())
    step = jax.pmap(
        functools.partial(sum_loss_step, denominator=BATCH, reduce=lambda g: lax.psum(g, "batch")),
        axis_name="batch",
        devices=jax.devices()[:N_DEV],
    )
    for t, (r_params, r_bs, _) in enumerate(global_batch_reference()):
        state, _ = jax.block_until_ready(
            step(state, x[t].reshape(N_DEV, -1, FEATURES), y[t].reshape(N_DEV, -1))
        )
        for d in range(N_DEV):  # every device holds the global batch's values
            pick = jax.tree.map(lambda a: np.asarray(a)[d], (state.params, state.batch_stats))
            assert_close(pick, (r_params, r_bs), what=f"step {t + 1} device {d}")


def test_shard_map_synchronized_statistics_equal_one_device():
    """Replicated state, sharded batch, axis_name='batch': autodiff sums the
    devices' gradients; the result is the one-device global-batch run."""
    x, y = data(DEV_STEPS)
    mesh = batch_mesh(N_DEV)
    step = jax.jit(
        jax.shard_map(
            functools.partial(sum_loss_step, denominator=BATCH),
            mesh=mesh,
            in_specs=(P(), P("batch"), P("batch")),
            out_specs=(P(), P()),
        )
    )
    shard = NamedSharding(mesh, P("batch"))
    state = jax.device_put(synchronized_state(), NamedSharding(mesh, P()))
    for t, (r_params, r_bs, _) in enumerate(global_batch_reference()):
        state, _ = jax.block_until_ready(
            step(state, jax.device_put(x[t], shard), jax.device_put(y[t], shard))
        )
        assert_close((state.params, state.batch_stats), (r_params, r_bs), what=f"step {t + 1}")


def per_device_data():
    """Batches of 4 per device, each device's inputs at its own scale."""
    x, y = data(DEV_STEPS, batch=N_DEV * BATCH)
    x *= np.repeat(np.asarray([0.5, 3.0], np.float32), BATCH)[None, :, None]
    return x.reshape(DEV_STEPS, N_DEV, BATCH, FEATURES), y.reshape(DEV_STEPS, N_DEV, BATCH)


@functools.lru_cache
def pmap_per_device():
    """axis_name=None under pmap, per-device mean loss, pmean of the gradients.

    Each step is checked against one-device low-level steps on each device's
    shard with the shared params: the gradients are averaged, the statistics
    are not. Returns the states (host copies).
    """
    x, y = per_device_data()
    state = stacked(new_state(Small()))
    step = jax.pmap(
        functools.partial(sum_loss_step, denominator=BATCH, reduce=lambda g: lax.pmean(g, "batch")),
        axis_name="batch",
        devices=jax.devices()[:N_DEV],
    )
    out = []
    for t in range(DEV_STEPS):
        host = jax.device_get(state)
        params = jax.tree.map(lambda a: a[0], host.params)
        refs = []
        for d in range(N_DEV):
            bs = jax.tree.map(lambda a: a[d], host.batch_stats)
            _, new, (g, _), pg = _small_grads()(params, bs, x[t, d], y[t, d])
            refs.append(jax.device_get((RECORD(new, pg, bs), g)))
        state, grads = jax.block_until_ready(step(state, x[t], y[t]))
        grads = jax.device_get(grads)
        mean = jax.tree.map(lambda *g: (g[0] + g[1]) / 2, *(g for _, g in refs))
        for d in range(N_DEV):
            pick = lambda tree: jax.tree.map(lambda a: np.asarray(a)[d], tree)
            assert_close(
                pick(state.batch_stats), refs[d][0], what=f"step {t + 1} device {d} batch_stats"
            )
            assert_close(pick(grads), mean, what=f"step {t + 1} device {d} grads")
        out.append(jax.device_get(state))
    return out


def test_pmap_per_device_statistics():
    final = pmap_per_device()[-1].batch_stats["MABN_0"]
    assert int(final["step"][1]) == DEV_STEPS
    assert not np.allclose(final["psi_window"][0], final["psi_window"][1], rtol=1e-2)


def test_shard_map_per_device_statistics():
    """The same per-device training under shard_map: batch_stats carry a
    leading device axis. Each device's loss is its own mean, as under pmap
    (the recorded Ψ_B and g_B are those of that loss); autodiff sums the
    replicated params' gradients over the devices, so they are divided by the
    device count (pmap's pmean)."""
    x, y = per_device_data()
    mesh = batch_mesh(N_DEV)

    def step(params, opt_state, bs, x, y):
        state = TrainState(
            step=0,
            apply_fn=Small().apply,
            params=params,
            tx=TX,
            opt_state=opt_state,
            batch_stats=jax.tree.map(lambda a: a[0], bs),
        )
        state, _ = sum_loss_step(
            state, x, y, denominator=BATCH, reduce=lambda g: jax.tree.map(lambda a: a / N_DEV, g)
        )
        return state.params, state.opt_state, jax.tree.map(lambda a: a[None], state.batch_stats)

    fn = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            out_specs=(P(), P(), P("batch")),
            in_specs=(P(), P(), P("batch"), P("batch"), P("batch")),
        )
    )
    shard, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    state = new_state(Small())
    params, opt_state = jax.device_put((state.params, state.opt_state), replicated)
    bs = jax.device_put(jax.tree.map(lambda a: np.stack([a] * N_DEV), state.batch_stats), shard)
    flat = lambda a: jax.device_put(a.reshape((-1,) + a.shape[2:]), shard)
    for t, ref in enumerate(pmap_per_device()):
        params, opt_state, bs = jax.block_until_ready(
            fn(params, opt_state, bs, flat(x[t]), flat(y[t]))
        )
        assert_close(bs, ref.batch_stats, what=f"step {t + 1} batch_stats")
        assert_close(params, jax.tree.map(lambda a: a[0], ref.params), what=f"step {t + 1} params")


# --------------------------------------------------------------------------- skipped steps


@jax.jit
def weighted_step(state, x, y, w):
    """The helper on loss ``w · xent``: the loss and the new batch_stats."""

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return w * xent(logits, y), updates

    (loss, updates), _ = mabn_jax.value_and_grad(
        loss_fn, has_aux=True, batch_stats=state.batch_stats
    )(state.params)
    return loss, updates["batch_stats"]


@pytest.mark.parametrize("where", ["input", "loss"])
def test_non_finite_step_through_the_helper_rolls_back_the_statistics(where):
    """A NaN input (the forward statistics) or a NaN loss weight (finite
    forward, NaN ∂L/∂y): the new batch_stats are the previous ones with one
    more skipped."""
    x, y = data(4)
    params, previous, _ = small_reference(x[:3], y[:3])[-1]  # in the window phase
    state = new_state(Small()).replace(params=params, batch_stats=previous)
    bad_x = x[3].copy()
    bad_x[1, 2] = np.nan
    one, nan = np.float32(1.0), np.float32(np.nan)
    loss, new = (
        weighted_step(state, bad_x, y[3], one)
        if where == "input"
        else weighted_step(state, x[3], y[3], nan)
    )
    assert np.isnan(loss)
    assert int(new["MABN_0"]["skipped"]) == 1
    assert_same(
        {k: v for k, v in new["MABN_0"].items() if k != "skipped"},
        {k: v for k, v in previous["MABN_0"].items() if k != "skipped"},
    )
    # The same step on the finite batch does advance.
    _, ok = weighted_step(state, x[3], y[3], one)
    assert int(ok["MABN_0"]["step"]) == 4 and int(ok["MABN_0"]["skipped"]) == 0


# --------------------------------------------------------------------------- frozen layers


def test_frozen_mabn_layer_is_left_alone():
    """A layer applied in inference mode inside the training step (a frozen
    norm layer) keeps its state bitwise, and training goes on: the other
    layer records its statistics, the losses stay finite. With every MABN
    layer frozen the helper's step is the nn.BatchNorm step."""
    x, y = data(3)
    state = new_state()
    frozen = state.replace(apply_fn=Net(frozen=("plain",)).apply)
    for t, (s, loss) in enumerate(run(mabn_train_step, frozen, x, y)):
        assert np.isfinite(loss), f"step {t + 1}"
        assert_same(s.batch_stats["plain"], state.batch_stats["plain"], what=f"step {t + 1}")
        centered = np.asarray(s.batch_stats["centered"]["psi_window"])
        assert int(s.batch_stats["centered"]["step"]) == t + 1
        assert np.isfinite(centered).all() and np.any(centered[(t + 1) % 2] != 0)

    small = new_state(Small())
    everything = small.replace(apply_fn=Small(frozen=True).apply)
    got = run(mabn_train_step, everything, x, y)
    assert_same(got, run(bn_train_step, everything, x, y))  # inference mode: no probes
    assert_same(got[-1][0].batch_stats, small.batch_stats)


# --------------------------------------------------------------------------- misuse

NOT_ONE_APPLY_APART = r"the trees are not one training apply apart.*previous="


@functools.lru_cache
def _two_steps():
    """bs0 -> bs1 (recorded) -> new2 (unrecorded) and the step-2 probe gradients."""
    state, grads = new_state(Small()), _small_grads()
    x, y = data(3)
    bs0 = state.batch_stats
    _, new1, _, pg1 = grads(state.params, bs0, x[0], y[0])
    bs1 = RECORD(new1, pg1, bs0)
    _, new2, _, pg2 = grads(state.params, bs1, x[1], y[1])
    return jax.device_get((bs0, bs1, new2, pg2))


def _next_loss(bs):
    x, y = data(3)
    return _small_grads()(new_state(Small()).params, bs, x[2], y[2])[0]


def test_record_leaves_a_frozen_layer_alone_but_not_a_trained_one():
    """The low-level rule under test_frozen_mabn_layer_is_left_alone: a layer
    whose state is ``previous`` and whose probes got no gradient was not
    applied in training mode; with a gradient it is a misuse."""
    _, bs1, _, pg2 = _two_steps()
    zero = jax.tree.map(np.zeros_like, pg2)
    assert_same(RECORD(bs1, zero, bs1), bs1)
    with pytest.raises(ValueError, match=NOT_ONE_APPLY_APART):
        mabn_jax.record_backward_stats(bs1, pg2, previous=bs1)
    assert np.isnan(RECORD(bs1, pg2, bs1)["MABN_0"]["psi_window"]).all()


def test_forgetting_record_makes_the_next_loss_nan_for_good():
    """(a) Probes passed, record_backward_stats never called: the reserved Ψ
    slots stay NaN, so the next training output is NaN, and it stays so."""
    state, grads = new_state(Small()), _small_grads()
    x, y = data(4)
    loss, bs, _, _ = grads(state.params, state.batch_stats, x[0], y[0])
    assert np.isfinite(loss)
    for t in (1, 2, 3):
        previous = bs
        loss, bs, _, pg = grads(state.params, bs, x[t], y[t])  # again not recorded
        assert np.isnan(loss), f"step {t + 1}"
    # Recording from now on cannot launder the unrecorded state.
    with pytest.raises(ValueError, match=NOT_ONE_APPLY_APART):
        mabn_jax.record_backward_stats(bs, pg, previous=previous)
    assert np.isnan(_next_loss(RECORD(bs, pg, previous)))


def test_swapped_trees_raise_eagerly_and_poison_under_jit():
    """(b) record_backward_stats(previous, grads, previous=new)."""
    _, bs1, new2, pg2 = _two_steps()
    with pytest.raises(ValueError, match=NOT_ONE_APPLY_APART):
        mabn_jax.record_backward_stats(bs1, pg2, previous=new2)
    poisoned = RECORD(bs1, pg2, new2)["MABN_0"]
    for name in ("mean_window", "var_window", "psi_window", "g_window", "ema_mean", "ema_var"):
        assert np.isnan(poisoned[name]).all(), name
    assert np.isnan(_next_loss({"MABN_0": poisoned}))
    # The right order is accepted, and trains on.
    assert np.isfinite(_next_loss(RECORD(new2, pg2, bs1)))


def test_stale_previous_and_recording_twice_raise_eagerly_and_poison_under_jit():
    """(c) previous from two steps ago; the same step recorded twice."""
    bs0, bs1, new2, pg2 = _two_steps()
    with pytest.raises(ValueError, match=NOT_ONE_APPLY_APART):
        mabn_jax.record_backward_stats(new2, pg2, previous=bs0)
    assert np.isnan(_next_loss(RECORD(new2, pg2, bs0)))

    once = RECORD(new2, pg2, bs1)
    with pytest.raises(ValueError, match=NOT_ONE_APPLY_APART):
        mabn_jax.record_backward_stats(once, pg2, previous=bs1)
    assert np.isnan(_next_loss(RECORD(once, pg2, bs1)))
    assert np.isfinite(_next_loss(once))


def test_init_probes_of_the_whole_variables_dict():
    """(d) init_probes(variables) instead of init_probes(variables['batch_stats'])."""
    v = _variables(Small(), BATCH)
    with pytest.raises(
        ValueError,
        match=r"has a top-level 'params' entry: it is a whole "
        r"variables dict. Pass variables\['batch_stats'\]",
    ):
        mabn_jax.init_probes(v)
    with pytest.raises(ValueError, match=r"Pass variables\['batch_stats'\]"):
        mabn_jax.value_and_grad(lambda p: 0.0, batch_stats=v)(v["params"])


def test_training_apply_without_probes_or_helper_names_the_helper():
    """(e) The unchanged nn.BatchNorm step (jax.value_and_grad) on an MABN model."""
    x, y = data(1)
    with pytest.raises(
        ValueError,
        match=r"MABN layer 'plain' is applied in training mode "
        r"without its probes.*mabn_jax\.value_and_grad\("
        r"loss_fn, has_aux=True, batch_stats=batch_stats\) "
        r"in place of jax\.value_and_grad",
    ):
        jax.eval_shape(bn_train_step, new_state(), x[0], y[0])


def _helper_with_aux(make_aux, has_aux=True, **kw):
    """The helper on Small, with ``fun``'s aux built by ``make_aux``."""
    state = new_state(Small())
    x, y = data(1)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x[0],
            train=True,
            mutable=["batch_stats"],
        )
        loss = xent(logits, y[0])
        return (loss, make_aux(logits, updates, state.batch_stats)) if has_aux else loss

    return jax.jit(
        mabn_jax.value_and_grad(loss_fn, has_aux=has_aux, batch_stats=state.batch_stats, **kw)
    )


def _helper_aux_error(make_aux, has_aux=True, **kw):
    with pytest.raises(ValueError) as info:
        jax.eval_shape(_helper_with_aux(make_aux, has_aux, **kw), new_state(Small()).params)
    return str(info.value)


def test_aux_without_the_updated_batch_stats_says_what_it_found():
    """(f) No tree of batch_stats' layout in aux: the message lists what aux
    holds and the layers expected, and says what to return."""
    message = _helper_aux_error(lambda logits, updates, old: {"logits": logits})
    for phrase in (
        "found no tree with the layout of batch_stats",
        "'MABN_0'",
        "a dict (aux['logits']: an array of shape (",
        "mutable=['batch_stats']",
        "has_aux=True",
        "aux_batch_stats=",
    ):
        assert phrase in message, message
    # a tree of another layout (one layer dropped) is not taken for it
    message = _helper_aux_error(
        lambda logits, updates, old: {
            k: v for k, v in updates["batch_stats"].items() if k != "MABN_0"
        }
    )
    assert "found no tree with the layout of batch_stats" in message, message


def test_aux_with_has_aux_false_names_has_aux():
    message = _helper_aux_error(lambda *_: None, has_aux=False)
    assert "has_aux=False" in message and "set has_aux=True" in message, message


def test_aux_with_two_updated_trees_lists_them_and_names_aux_batch_stats():
    """(f) Two trees of the layout, neither the given one: ambiguous; the
    message gives both paths and a ready aux_batch_stats value."""
    message = _helper_aux_error(lambda logits, updates, old: (updates, updates["batch_stats"]))
    for phrase in (
        "holds 2 trees with the layout of batch_stats",
        "aux[0]['batch_stats'], aux[1]",
        "aux_batch_stats=(0, 'batch_stats')",
    ):
        assert phrase in message, message


def _doubled(updates):
    """A second tree of batch_stats' layout (e.g. an EMA teacher's): not the update."""
    return jax.tree.map(lambda v: v * 1.0, updates["batch_stats"])


@pytest.mark.parametrize(
    "select",
    [
        (1, "batch_stats"),  # a path
        (1,),  # a path to the updates dict: its 'batch_stats'
        lambda aux: aux[1]["batch_stats"],  # a function of aux
    ],
)
def test_aux_batch_stats_points_at_the_update(select):
    """(f) The explicit route: with two candidates, aux_batch_stats picks the
    updated tree; the result is the one the search records when unambiguous."""
    state = new_state(Small())
    make = lambda logits, updates, old: (_doubled(updates), updates)
    (loss, (other, updates)), grads = _helper_with_aux(make, aux_batch_stats=select)(state.params)
    (r_loss, (_, r_updates)), r_grads = _helper_with_aux(
        lambda logits, updates, old: (None, updates)
    )(state.params)
    assert_same((loss, updates, grads), (r_loss, r_updates, r_grads))
    unrecorded = other["MABN_0"]["psi_window"]  # reserved slots stay NaN: not recorded
    assert (
        np.isnan(unrecorded).any()
        and not np.isnan(updates["batch_stats"]["MABN_0"]["psi_window"]).any()
    )


@pytest.mark.parametrize(
    "select, phrase",
    [
        ((2,), "aux has no entry 2; it is a tuple (aux[0]: an array of shape ("),
        ((0,), "aux[0], which is not a batch_stats tree of this model (found "),
        (lambda aux: dict(aux[1]["batch_stats"]), "not part of aux (a copy or a new dict)"),
    ],
)
def test_aux_batch_stats_pointing_elsewhere_says_where(select, phrase):
    message = _helper_aux_error(
        lambda logits, updates, old: (logits, updates), aux_batch_stats=select
    )
    assert phrase in message, message


def test_aux_with_only_the_old_batch_stats():
    """(f) The batch_stats given to apply returned in place of the updates:
    a ValueError when the helper runs eagerly; under jit, NaN statistics."""
    state = new_state(Small())
    x, y = data(1)
    # The model runs jitted (eager op-by-op execution would be slow); the
    # helper's own bookkeeping runs eagerly.
    apply = jax.jit(lambda v, x: state.apply_fn(v, x, train=True, mutable=["batch_stats"]))

    def loss_fn(params):
        logits, _ = apply({"params": params, "batch_stats": state.batch_stats}, x[0])
        return xent(logits, y[0]), {"batch_stats": state.batch_stats}

    helper = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=state.batch_stats)
    with pytest.raises(
        ValueError,
        match=r"fun returned the batch_stats it was given, "
        r"unchanged, although MABN layers were applied in "
        r"training mode; return the updated batch_stats",
    ):
        helper(state.params)
    (_, aux), _ = jax.jit(helper)(state.params)
    for name in ("mean_window", "var_window", "psi_window", "g_window", "ema_var"):
        assert np.isnan(aux["batch_stats"]["MABN_0"][name]).all(), name
    assert np.isnan(_next_loss(aux["batch_stats"]))


def test_aux_with_the_old_and_the_updated_batch_stats():
    """(g) Both trees in aux: the updated one is recorded, the old one left alone."""
    state = new_state(Small())
    x, y = data(1)
    (loss, (old, updates)), grads = _helper_with_aux(lambda logits, updates, old: (old, updates))(
        state.params
    )
    assert_same(old, state.batch_stats)
    r_loss, new, (r_grads, _), pg = _small_grads()(state.params, state.batch_stats, x[0], y[0])
    assert_same(
        (loss, updates["batch_stats"], grads), (r_loss, RECORD(new, pg, state.batch_stats), r_grads)
    )
