"""MABN under the JAX transformations a training loop uses.

Each test compares against a reference computed without the transformation:
``lax.scan`` over steps vs a Python loop of jitted steps, ``vmap`` ensemble
member i vs an independent run i, ``remat`` vs no remat, ``nn.scan`` over
layers vs the same layers unrolled, ``optax.MultiSteps`` vs a hand-written
accumulation, bf16 activations vs float32 statistics. ``pmap``/``shard_map``
and SPMD ``jit`` are in ``test_multidevice.py``.

The trajectories use ``buffer_size=2, warmup_steps=3, renorm_start=6`` and
eight steps whose input scale jumps 10x at step 7, so they cross the batch,
window and renormalization phases.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax import lax
from tree_assert import assert_close

import mabn_jax
from mabn_jax import functional as F

STEPS, BATCH, FEATURES = 8, 4, 5
SCALES = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0, 10.0)
MABN_KW = dict(buffer_size=2, warmup_steps=3, renorm_start=6, centered=False)


class Block(nn.Module):
    """Weight-centralized dense + MABN + tanh, the unit that is remat'ed/scanned."""

    dtype: object = None

    @nn.compact
    def __call__(self, x):
        x = mabn_jax.CenteredDense(FEATURES, use_bias=False, dtype=self.dtype)(x)
        return jnp.tanh(mabn_jax.MABN(use_running_average=False, dtype=self.dtype, **MABN_KW)(x))


class Net(nn.Module):
    remat: bool = False
    dtype: object = None

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        x = block(dtype=self.dtype, name="block")(x)
        return nn.Dense(3, dtype=self.dtype)(x)


def data(steps=STEPS, seed=0, lead=()):
    # NumPy, not jax.random: eager JAX ops would each compile (slow on CPU CI).
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (steps, BATCH, FEATURES), np.float32) + 0.3
    x = x * np.asarray(SCALES[:steps], np.float32)[:, None, None]
    return x, rng.integers(0, 3, lead + (steps, BATCH)).astype(np.int32)


def grads_fn(model, params, batch_stats, x, y, checkpoint=False, low_level=False):
    """Gradients of the mean loss w.r.t. params; the recorded state.

    ``mabn_jax.value_and_grad`` by default; ``low_level=True`` passes the probes as
    the ``'mabn_probes'`` collection and records them by hand (the same numbers).
    """

    def loss_fn(params, probes=None):
        variables = {"params": params, "batch_stats": batch_stats}
        if probes is not None:
            variables[mabn_jax.PROBES] = probes
        logits, upd = model.apply(variables, x, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
        return loss, (logits, upd["batch_stats"])

    if checkpoint:
        loss_fn = jax.checkpoint(loss_fn)
    if low_level:
        (_, (logits, new_bs)), (grads, stats) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(params, mabn_jax.init_probes(batch_stats))
        return logits, grads, mabn_jax.record_backward_stats(new_bs, stats, batch_stats)
    (_, (logits, new_bs)), grads = mabn_jax.value_and_grad(
        loss_fn, has_aux=True, batch_stats=batch_stats
    )(params)
    return logits, grads, new_bs


def make_step(model, tx, checkpoint=False, low_level=False):
    def step(params, opt_state, batch_stats, x, y):
        logits, grads, batch_stats = grads_fn(
            model, params, batch_stats, x, y, checkpoint, low_level
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, batch_stats, logits

    return step


@functools.lru_cache
def _variables():
    # Net(remat=True) and Net(dtype=bf16) have the same variables as Net().
    init = jax.jit(Net().init)
    return jax.device_get(init(jax.random.PRNGKey(0), data(1)[0][0]))


TX = optax.sgd(0.1)


def python_loop(model, x, y, checkpoint=False):
    v = _variables()
    params, bs, opt_state = v["params"], v["batch_stats"], TX.init(v["params"])
    step = jax.jit(make_step(model, TX, checkpoint))
    logits = []
    for t in range(x.shape[0]):
        params, opt_state, bs, out = step(params, opt_state, bs, x[t], y[t])
        logits.append(out)
    return params, bs, np.stack(jax.device_get(logits))


@functools.lru_cache
def reference():
    x, y = data()
    return jax.device_get(python_loop(Net(), x, y))


def test_lax_scan_over_train_steps_equals_python_loop_of_jitted_steps():
    x, y = data()
    v = _variables()
    step = make_step(Net(), TX)

    @jax.jit
    def train(params, opt_state, bs, xs, ys):
        def body(carry, batch):
            params, opt_state, bs, logits = step(*carry, *batch)
            return (params, opt_state, bs), logits

        return lax.scan(body, (params, opt_state, bs), (xs, ys))

    (params, _, bs), logits = train(v["params"], TX.init(v["params"]), v["batch_stats"], x, y)
    r_params, r_bs, r_logits = reference()
    assert int(bs["block"]["MABN_0"]["step"]) == STEPS
    assert_close(logits, r_logits, what="logits")
    assert_close(bs, r_bs, what="batch_stats")
    assert_close(params, r_params, what="params")


@pytest.mark.slow
def test_remat_and_checkpoint_equal_no_remat():
    x, y = data()
    r_params, r_bs, r_logits = reference()
    for model, checkpoint in ((Net(remat=True), False), (Net(), True)):
        params, bs, logits = python_loop(model, x, y, checkpoint)
        what = "nn.remat" if checkpoint is False else "jax.checkpoint"
        assert_close(logits, r_logits, what=what)
        assert_close(bs, r_bs, what=what)
        assert_close(params, r_params, what=what)


@pytest.mark.slow
def test_vmap_ensemble_member_equals_independent_run():
    """vmap of init and of the train step: each member is its own model."""
    members = 3
    x, y = data(lead=(members,))
    model = Net()
    sample = data(1)[0][0]
    keys = jax.random.split(jax.random.PRNGKey(1), members)
    v = jax.jit(jax.vmap(model.init, in_axes=(0, None)))(keys, sample)
    params, bs, opt_state = v["params"], v["batch_stats"], jax.vmap(TX.init)(v["params"])
    step = jax.jit(jax.vmap(make_step(model, TX)))
    for t in range(STEPS):
        params, opt_state, bs, logits = step(params, opt_state, bs, x[:, t], y[:, t])

    single = jax.jit(make_step(model, TX))
    v = jax.device_get(v)
    for i in range(members):
        member = jax.tree.map(lambda a: a[i], v)
        p, o, b = member["params"], TX.init(member["params"]), member["batch_stats"]
        for t in range(STEPS):
            p, o, b, out = single(p, o, b, x[i, t], y[i, t])
        pick = lambda tree: jax.tree.map(lambda a: a[i], jax.device_get(tree))
        assert_close(pick(bs), b, rtol=1e-5, atol=1e-6, what=f"member {i}")
        assert_close(pick(params), p, rtol=1e-5, atol=1e-6, what=f"member {i}")
        assert_close(pick(logits), out, rtol=1e-5, atol=1e-6, what=f"member {i}")
    assert not np.allclose(
        bs["block"]["MABN_0"]["psi_window"][0], bs["block"]["MABN_0"]["psi_window"][1]
    )


class ScanNet(nn.Module):
    """Three Blocks with nn.scan: every collection MABN uses is stacked per layer."""

    layers: int = 3

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            lambda block, carry, _: (block(carry), None),
            variable_axes={"params": 0, "batch_stats": 0, mabn_jax.PROBES: 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        x, _ = scan(Block(name="blocks"), x, None)
        return nn.Dense(3)(x)


class UnrolledNet(nn.Module):
    """The same computation as ScanNet with the layers written out."""

    layers: int = 3

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = Block(name=f"blocks_{i}")(x)
        return nn.Dense(3)(x)


def _unstack(tree, layers):
    """ScanNet variables -> UnrolledNet variables (the layer axis becomes names)."""
    out = {}
    for col, cols in tree.items():
        out[col] = {k: v for k, v in cols.items() if k != "blocks"}
        for i in range(layers):
            out[col][f"blocks_{i}"] = jax.tree.map(lambda a: a[i], cols["blocks"])
    return out


@pytest.mark.slow
def test_nn_scan_over_layers_equals_unrolled_layers():
    x, y = data()
    scan_model, unrolled = ScanNet(), UnrolledNet()
    v = jax.device_get(jax.jit(scan_model.init)(jax.random.PRNGKey(2), x[0]))
    assert v["batch_stats"]["blocks"]["MABN_0"]["psi_window"].shape == (3, 2, FEATURES)
    probes = mabn_jax.init_probes(v["batch_stats"])
    assert probes["blocks"]["MABN_0"]["psi"].shape == (3, 2, FEATURES)  # per layer, window

    params, bs = v["params"], v["batch_stats"]
    u = _unstack(v, 3)
    u_params, u_bs = u["params"], u["batch_stats"]
    # The scanned model takes its probes through the 'mabn_probes' collection (stacked
    # by variable_axes), the unrolled one through mabn_jax.value_and_grad.
    step = jax.jit(make_step(scan_model, TX, low_level=True))
    u_step = jax.jit(make_step(unrolled, TX))
    opt, u_opt = TX.init(params), TX.init(u_params)
    for t in range(STEPS):
        params, opt, bs, logits = step(params, opt, bs, x[t], y[t])
        u_params, u_opt, u_bs, u_logits = u_step(u_params, u_opt, u_bs, x[t], y[t])
        assert_close(logits, u_logits, rtol=1e-5, atol=1e-6, what=f"step {t + 1}")
    scanned = _unstack({"params": params, "batch_stats": bs}, 3)
    assert_close(scanned["batch_stats"], u_bs, rtol=1e-5, atol=1e-6, what="batch_stats")
    assert_close(scanned["params"], u_params, rtol=1e-5, atol=1e-6, what="params")
    # Each layer recorded its own Ψ_B in its own slice of the stacked window.
    psi = np.asarray(bs["blocks"]["MABN_0"]["psi_window"])
    assert not np.allclose(psi[0], psi[1]) and np.all(psi != 0)


def test_optax_multisteps_each_micro_batch_is_one_mabn_step():
    """Gradient accumulation over k=2 micro-batches: MABN advances per micro-batch."""
    x, y = data()
    k, lr = 2, 0.1
    model = Net()
    v = _variables()
    tx = optax.MultiSteps(optax.sgd(lr), every_k_schedule=k)
    step = jax.jit(make_step(model, tx))
    params, bs, opt_state = v["params"], v["batch_stats"], tx.init(v["params"])
    for t in range(STEPS):
        params, opt_state, bs, _ = step(params, opt_state, bs, x[t], y[t])
    assert int(bs["block"]["MABN_0"]["step"]) == STEPS  # one MABN step per micro-batch

    # By hand: k micro-batches on the same parameters, the state threading through.
    grads = jax.jit(functools.partial(grads_fn, model))
    r_params, r_bs = v["params"], v["batch_stats"]
    for start in range(0, STEPS, k):
        acc = None
        for t in range(start, start + k):
            _, g, r_bs = grads(r_params, r_bs, x[t], y[t])
            g = jax.device_get(g)
            acc = g if acc is None else jax.tree.map(np.add, acc, g)
        r_params = jax.tree.map(lambda p, g: p - lr * g / k, r_params, acc)
    assert_close(bs, r_bs, rtol=1e-5, atol=1e-6, what="batch_stats")
    assert_close(params, r_params, rtol=1e-5, atol=1e-6, what="params")


def test_bf16_activations_keep_float32_statistics_and_state():
    # The functional layer: χ²_B of a bf16 input is reduced in float32.
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((512, 4), np.float32) * 3, jnp.bfloat16)
    config = F.MABNConfig(**MABN_KW)
    state = F.init_state((4,), config)
    y, new = jax.jit(lambda x, s: F.mabn_train(x, None, None, s, F.init_probes(s), config))(
        x, state
    )
    assert y.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new))  # counters too
    exact = (np.asarray(x, np.float64) ** 2).mean(0)
    np.testing.assert_allclose(new.var_window[1], exact, rtol=1e-6)  # bf16 sums: ~1e-2 off

    # The Flax model: bf16 activations, float32 params, state and gradients.
    xs, ys = data()
    model = Net(dtype=jnp.bfloat16)
    v = _variables()
    step = jax.jit(make_step(model, TX))
    params, bs, opt_state = v["params"], v["batch_stats"], TX.init(v["params"])
    for t in range(STEPS):
        params, opt_state, bs, logits = step(
            params, opt_state, bs, xs[t].astype(jnp.bfloat16), ys[t]
        )
    assert logits.dtype == jnp.bfloat16
    leaves = jax.tree.leaves((params, bs))
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    # Same trajectory as float32 up to bf16 rounding of the activations (8-bit
    # mantissa: ~0.4% per op), through every phase including renormalization.
    r_params, r_bs, _ = reference()
    layer, r_layer = bs["block"]["MABN_0"], r_bs["block"]["MABN_0"]
    for name in ("x2_window", "ema_x2"):
        np.testing.assert_allclose(layer[name], r_layer[name], rtol=3e-2, err_msg=name)
