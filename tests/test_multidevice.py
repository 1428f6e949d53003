"""MABN across devices: per-device (default), synchronized, and SPMD ``jit``.

Eight CPU devices are simulated (``tests/conftest.py``). Each test runs a short
trajectory with ``buffer_size=2, warmup_steps=3, renorm_start=6`` over ten
steps, so steps 1-2 use batch statistics, 3-6 the moving windows and 7-10 the
renormalization, and the input scale jumps by 10x at step 7 so ``r`` clips.

Loss convention for the exact comparisons: each device's loss is its share of
the global mean, ``sum(per-example loss on the device) / global_batch``, and
the devices' parameter gradients are summed (``psum``). Their sum is then the
gradient of the global mean loss, and each device's ∂L/∂y is exactly the
single-device one, so Ψ_B (pmean'ed inside the layer's backward pass) equals
the single-device Ψ_B over the global batch. With the other common convention
(per-device mean loss, ``pmean`` of gradients) every device's ∂L/∂y is
``n_devices`` times larger: the updates are the same, but the recorded Ψ_B
is that of the loss ``n_devices · L``; ``test_sync_local_mean_loss`` pins it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import batch_mesh
from flax import linen as nn
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tree_assert import assert_close as _assert_close

import mabn_jax

N_DEV, PER_DEV, STEPS = 8, 2, 10
GLOBAL = N_DEV * PER_DEV
SCALES = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0, 10.0, 10.0, 0.5)
TX = optax.sgd(0.1)


class Net(nn.Module):
    axis_name: str | None = None
    axis_index_groups: object = None
    centered: bool = False

    @nn.compact
    def __call__(self, x):
        norm = lambda: mabn_jax.MABN(
            use_running_average=False,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            centered=self.centered,
            buffer_size=2,
            warmup_steps=3,
            renorm_start=6,
        )
        dense = nn.Dense if self.centered else mabn_jax.CenteredDense
        x = jnp.tanh(norm()(dense(6, use_bias=False)(x)))
        x = jnp.tanh(norm()(dense(6, use_bias=False)(x)))
        return nn.Dense(3)(x)


def data(steps=STEPS, batch=GLOBAL, seed=0, per_device_scale=False):
    # NumPy, not jax.random: eager JAX ops would each compile (slow on CPU CI).
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((steps, batch, 5), np.float32) + 0.3
    x = x * np.asarray(SCALES[:steps], np.float32)[:, None, None]
    if per_device_scale:  # make every device's statistics different
        x = (
            x
            * np.repeat(np.linspace(0.5, 4.0, N_DEV, dtype=np.float32), batch // N_DEV)[
                None, :, None
            ]
        )
    return x, rng.integers(0, 3, (steps, batch)).astype(np.int32)


@functools.lru_cache
def _init(centered):
    # Parameters and state do not depend on axis_name: one init per variant.
    init_fn = jax.jit(Net(centered=centered).init)
    return jax.device_get(init_fn(jax.random.PRNGKey(1), data(1)[0][0]))


def init(model):
    return _init(model.centered)


def loss_and_grads(model, params, batch_stats, x, y, denominator):
    """Loss sum / denominator: (logits, grads w.r.t. params, recorded batch_stats)."""

    def loss_fn(params):
        logits, upd = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum() / denominator
        return loss, (logits, upd["batch_stats"])

    (_, (logits, new_bs)), grads = mabn_jax.value_and_grad(
        loss_fn, has_aux=True, batch_stats=batch_stats
    )(params)
    return logits, grads, new_bs


def make_step(model, reduce=None, denominator=GLOBAL):
    """A train step; ``reduce`` combines the devices' gradients (psum/pmean)."""

    def step(params, opt_state, batch_stats, x, y):
        logits, grads, batch_stats = loss_and_grads(model, params, batch_stats, x, y, denominator)
        if reduce is not None:
            grads = reduce(grads)
        updates, opt_state = TX.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, batch_stats, logits, grads

    return step


def replicate(tree, n=N_DEV, sharding="pmap"):
    """Stacks ``n`` copies, laid out as ``pmap`` lays out its outputs.

    Matching the outputs' sharding lets every step reuse one compilation.
    """
    tree = jax.tree.map(lambda a: np.broadcast_to(a, (n,) + np.shape(a)), jax.device_get(tree))
    if sharding == "pmap":
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
        sharding = NamedSharding(mesh, P("batch"))
    return jax.device_put(tree, sharding)


# Looser than tree_assert's defaults: psum over 8 devices sums in another order.
assert_close = functools.partial(_assert_close, rtol=2e-5, atol=2e-6)


@functools.lru_cache
def reference(centered=False):
    """The single-device trajectory on ``data()``, shared by several tests."""
    x, y = data()
    return jax.device_get(single_device_trajectory(Net(centered=centered), x, y))


def single_device_trajectory(model, x, y):
    """The reference: one device, batch 16, global mean loss."""
    variables = init(model)
    params, bs = variables["params"], variables["batch_stats"]
    opt_state = TX.init(params)
    step = jax.jit(make_step(model))
    out = []
    for t in range(x.shape[0]):
        params, opt_state, bs, logits, grads = step(params, opt_state, bs, x[t], y[t])
        out.append((logits, grads, bs, params))
    return out


def _renorm_clips(before, after):
    """Whether step 7 renormalized with r clipped at r_max in some channels only.

    Guards the test's coverage: the trajectory must reach renormalization
    with ``r`` clipped, not only the warm-up and window phases.
    """
    layer, prev = after["MABN_0"], before["MABN_0"]
    if "x2_window" in layer:  # χ̃²: the window mean of χ²_B
        stat, ema = np.asarray(layer["x2_window"]).mean(0), np.asarray(prev["ema_x2"])
    else:  # σ̃²: the window mean of σ²_B + (μ_B − μ̃)²
        means = np.asarray(layer["mean_window"])
        stat = (np.asarray(layer["var_window"]) + (means - means.mean(0)) ** 2).mean(0)
        ema = np.asarray(prev["ema_var"])
    assert int(layer["step"]) == 7
    r = np.sqrt(stat + 1e-5) / np.sqrt(ema + 1e-5)
    return np.any(r > 5.0) and np.any(r < 5.0)  # both branches of the clip


@pytest.mark.slow
@pytest.mark.parametrize("centered", [False, True])
def test_sync_pmap_equals_single_device_global_batch(centered):
    """8 devices x batch 2 with axis_name == 1 device x batch 16, every leaf."""
    x, y = data()
    ref = reference(centered)
    assert _renorm_clips(ref[5][2], ref[6][2])

    model = Net(axis_name="batch", centered=centered)
    variables = init(model)  # same parameters: init ignores axis_name
    params, bs = replicate(variables["params"]), replicate(variables["batch_stats"])
    opt_state = replicate(TX.init(variables["params"]))
    step = jax.pmap(make_step(model, reduce=lambda g: lax.psum(g, "batch")), axis_name="batch")
    xs, ys = x.reshape(STEPS, N_DEV, PER_DEV, 5), y.reshape(STEPS, N_DEV, PER_DEV)
    for t in range(STEPS):
        params, opt_state, bs, logits, grads = step(params, opt_state, bs, xs[t], ys[t])
        r_logits, r_grads, r_bs, r_params = ref[t]
        assert_close(logits.reshape(GLOBAL, -1), r_logits, what=f"step {t + 1} logits")
        grads, bs_host, params_host = jax.device_get((grads, bs, params))
        for d in (0, N_DEV - 1):  # replicated: every device holds the same values
            pick = lambda tree: jax.tree.map(lambda a: a[d], tree)
            assert_close(pick(grads), r_grads, what=f"step {t + 1} grads")
            assert_close(pick(bs_host), r_bs, what=f"step {t + 1} batch_stats")
            assert_close(pick(params_host), r_params, what=f"step {t + 1} params")


@pytest.mark.slow
def test_sync_local_mean_loss_scales_psi_by_device_count():
    """Per-device mean loss + pmean of grads: same updates, Ψ of n·L recorded."""
    x, y = data()
    ref = reference()
    model = Net(axis_name="batch")
    variables = init(model)
    params, bs = replicate(variables["params"]), replicate(variables["batch_stats"])
    opt_state = replicate(TX.init(variables["params"]))
    step = jax.pmap(
        make_step(model, reduce=lambda g: lax.pmean(g, "batch"), denominator=PER_DEV),
        axis_name="batch",
    )
    xs, ys = x[:6].reshape(6, N_DEV, PER_DEV, 5), y[:6].reshape(6, N_DEV, PER_DEV)
    for t in range(6):
        params, opt_state, bs, logits, _ = step(params, opt_state, bs, xs[t], ys[t])
        _, _, r_bs, r_params = ref[t]
        params_host, bs_host = jax.device_get((params, bs))
        assert_close(jax.tree.map(lambda a: a[0], params_host), r_params, what="params")
        dev0 = jax.tree.map(lambda a: a[0], bs_host)
        for layer in ("MABN_0", "MABN_1"):
            for name in ("step", "x2_window", "ema_x2"):
                assert_close(dev0[layer][name], r_bs[layer][name], what=name)
            assert_close(
                dev0[layer]["psi_window"], N_DEV * r_bs[layer]["psi_window"], what="psi_window"
            )


@pytest.mark.slow
def test_sync_axis_index_groups():
    """Two groups of four devices == two independent single-device runs of batch 8."""
    steps = 6
    x, y = data(steps=steps)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    model = Net(axis_name="batch", axis_index_groups=groups)
    variables = init(model)
    bs = replicate(variables["batch_stats"])
    half = GLOBAL // 2
    grads_fn = jax.pmap(
        lambda p, b, x, y: loss_and_grads(model, p, b, x, y, half)[1:3],
        axis_name="batch",
        in_axes=(None, 0, 0, 0),
    )
    ref_fn = jax.jit(
        jax.vmap(lambda b, x, y: loss_and_grads(Net(), variables["params"], b, x, y, half)[1:3])
    )
    ref_bs = replicate(variables["batch_stats"], 2, sharding=None)
    for t in range(steps):  # fixed parameters: only the statistics evolve
        grads, bs = grads_fn(
            variables["params"], bs, x[t].reshape(N_DEV, PER_DEV, 5), y[t].reshape(N_DEV, PER_DEV)
        )
        r_grads, ref_bs = ref_fn(ref_bs, x[t].reshape(2, half, 5), y[t].reshape(2, half))
        bs_host, ref_host = jax.device_get((bs, ref_bs))
        for d in range(N_DEV):
            g = d // 4
            assert_close(
                jax.tree.map(lambda a: a[d], bs_host),
                jax.tree.map(lambda a: a[g], ref_host),
                what=f"device {d} step {t + 1}",
            )
        # A group's gradient is the sum of its devices' shares.
        group_sum = jax.tree.map(
            lambda a: a.reshape(2, 4, *a.shape[1:]).sum(1), jax.device_get(grads)
        )
        assert_close(group_sum, r_grads, what=f"grads step {t + 1}")
    assert not np.allclose(bs["MABN_0"]["x2_window"][0], bs["MABN_0"]["x2_window"][4])


def test_sync_subgroups_shard_map_2d_mesh():
    """shard_map has no axis_index_groups: sync over the inner axis of a 2-D mesh.

    Mesh ('group', 'batch') = (2, 4) with axis_name='batch' is the shard_map
    form of the two groups of four above; the state is per group.
    """
    steps = 4
    x, y = data(steps=steps)
    model = Net(axis_name="batch")
    variables = init(model)
    half = GLOBAL // 2
    mesh = jax.make_mesh((2, 4), ("group", "batch"))
    per_group = NamedSharding(mesh, P("group"))
    split = NamedSharding(mesh, P(("group", "batch")))

    def grads_and_state(params, bs, x, y):
        _, grads, new_bs = loss_and_grads(
            model, params, jax.tree.map(lambda a: a[0], bs), x, y, half
        )
        return grads, jax.tree.map(lambda a: a[None], new_bs)

    fn = jax.jit(
        jax.shard_map(
            grads_and_state,
            mesh=mesh,
            in_specs=(P(), P("group"), P(("group", "batch")), P(("group", "batch"))),
            out_specs=(P(), P("group")),
        )
    )
    ref_fn = jax.jit(
        jax.vmap(lambda b, x, y: loss_and_grads(Net(), variables["params"], b, x, y, half)[1:3])
    )
    bs = replicate(variables["batch_stats"], 2, sharding=per_group)
    ref_bs = replicate(variables["batch_stats"], 2, sharding=None)
    for t in range(steps):
        grads, bs = fn(
            variables["params"], bs, jax.device_put(x[t], split), jax.device_put(y[t], split)
        )
        r_grads, ref_bs = ref_fn(ref_bs, x[t].reshape(2, half, 5), y[t].reshape(2, half))
        assert_close(bs, ref_bs, what=f"step {t + 1} batch_stats")
        # Replicated parameters: autodiff sums over both mesh axes.
        assert_close(
            grads,
            jax.tree.map(lambda a: a.sum(0), jax.device_get(r_grads)),
            what=f"step {t + 1} grads",
        )
    window = np.asarray(bs["MABN_0"]["x2_window"])
    assert not np.allclose(window[0], window[1])


@pytest.mark.slow
def test_per_device_statistics_stay_per_device_under_pmean_of_grads():
    """Default axis_name=None: each device's windows hold its own χ²_B and Ψ_B.

    The canonical data-parallel step (per-device mean loss, ``pmean`` of the
    parameter gradients) averages the gradients but not the statistics: every
    device's state equals a single-device step on that device's shard with the
    shared parameters, and the devices' windows differ.
    """
    steps = 6
    x, y = data(steps=steps, per_device_scale=True)
    model = Net()
    variables = init(model)
    params = replicate(variables["params"])
    opt_state = replicate(TX.init(variables["params"]))
    bs = replicate(variables["batch_stats"])
    step = jax.pmap(
        make_step(model, reduce=lambda g: lax.pmean(g, "batch"), denominator=PER_DEV),
        axis_name="batch",
    )
    # Reference: the same single-device step on each shard, vmapped (no collective).
    ref_fn = jax.jit(
        jax.vmap(
            lambda p, b, x, y: loss_and_grads(model, p, b, x, y, PER_DEV)[1:3],
            in_axes=(None, 0, 0, 0),
        )
    )
    for t in range(steps):
        xd, yd = x[t].reshape(N_DEV, PER_DEV, 5), y[t].reshape(N_DEV, PER_DEV)
        # Host copies: the reference runs on one device, so only one program
        # with collectives is in flight at a time (simulated CPU devices share
        # a small thread pool).
        shared = jax.tree.map(lambda a: a[0], jax.device_get(params))
        r_grads, r_bs = ref_fn(shared, jax.device_get(bs), xd, yd)
        params, opt_state, bs, _, grads = step(params, opt_state, bs, xd, yd)
        assert_close(bs, r_bs, what=f"step {t + 1} batch_stats")
        grads, r_grads = jax.device_get((grads, r_grads))
        assert_close(
            jax.tree.map(lambda a: a[0], grads),
            jax.tree.map(lambda a: a.mean(0), r_grads),
            what=f"step {t + 1} grads",
        )
    for name in ("x2_window", "psi_window", "ema_x2"):
        leaf = np.asarray(bs["MABN_0"][name])
        assert not np.allclose(leaf[0], leaf[-1], rtol=1e-2), name


def test_sync_shard_map_equals_single_device_global_batch():
    """shard_map: replicated params and state, batch split; grads psum'd by autodiff."""
    steps = 8
    x, y = data()
    ref = reference()
    model = Net(axis_name="batch")
    variables = init(model)
    mesh = batch_mesh(N_DEV)
    params, bs, opt_state = jax.device_put(
        (variables["params"], variables["batch_stats"], TX.init(variables["params"])),
        NamedSharding(mesh, P()),
    )
    # Inside shard_map the loss of each device is varying and the parameters are
    # replicated, so jax.grad already sums the devices' gradients: no psum here.
    step = jax.jit(
        jax.shard_map(
            make_step(model),
            mesh=mesh,
            in_specs=(P(), P(), P(), P("batch"), P("batch")),
            out_specs=(P(), P(), P(), P("batch"), P()),
        )
    )
    shard = NamedSharding(mesh, P("batch"))
    for t in range(steps):
        params, opt_state, bs, logits, grads = step(
            params, opt_state, bs, jax.device_put(x[t], shard), jax.device_put(y[t], shard)
        )
        r_logits, r_grads, r_bs, r_params = ref[t]
        assert_close(logits, r_logits, what=f"step {t + 1} logits")
        assert_close(grads, r_grads, what=f"step {t + 1} grads")
        assert_close(bs, r_bs, what=f"step {t + 1} batch_stats")
        assert_close(params, r_params, what=f"step {t + 1} params")


@pytest.mark.slow
def test_per_device_shard_map():
    """shard_map with per-device state: batch_stats carry a leading device axis."""
    steps = 5
    x, y = data(steps=steps, per_device_scale=True)
    model = Net()
    variables = init(model)
    params = variables["params"]
    mesh = batch_mesh(N_DEV)
    bs = replicate(variables["batch_stats"], sharding=NamedSharding(mesh, P("batch")))

    def grads_and_state(params, bs, x, y):
        _, grads, new_bs = loss_and_grads(
            model, params, jax.tree.map(lambda a: a[0], bs), x, y, GLOBAL
        )
        return grads, jax.tree.map(lambda a: a[None], new_bs)

    fn = jax.jit(
        jax.shard_map(
            grads_and_state,
            mesh=mesh,
            in_specs=(P(), P("batch"), P("batch"), P("batch")),
            out_specs=(P(), P("batch")),
        )
    )
    ref_fn = jax.jit(jax.vmap(lambda b, x, y: loss_and_grads(model, params, b, x, y, GLOBAL)[1:3]))
    shard = NamedSharding(mesh, P("batch"))
    ref_bs = replicate(variables["batch_stats"], sharding=None)  # on one device
    for t in range(steps):
        grads, bs = fn(params, bs, jax.device_put(x[t], shard), jax.device_put(y[t], shard))
        r_grads, ref_bs = ref_fn(
            ref_bs, x[t].reshape(N_DEV, PER_DEV, 5), y[t].reshape(N_DEV, PER_DEV)
        )
        assert_close(bs, ref_bs, what=f"step {t + 1} batch_stats")
        assert_close(grads, jax.tree.map(lambda a: a.sum(0), jax.device_get(r_grads)), what="grads")
    leaf = np.asarray(bs["MABN_0"]["psi_window"])
    assert not np.allclose(leaf[0], leaf[-1], rtol=1e-2)


def test_shard_map_replicated_state_with_per_device_stats_is_an_error():
    model = Net()  # per-device statistics, but the state is replicated below
    variables = init(model)
    mesh = batch_mesh(N_DEV)
    fn = jax.shard_map(
        lambda p, b, x, y: loss_and_grads(model, p, b, x, y, GLOBAL)[1],
        mesh=mesh,
        in_specs=(P(), P(), P("batch"), P("batch")),
        out_specs=P(),
    )
    x, y = data(steps=1)
    shard = NamedSharding(mesh, P("batch"))
    with pytest.raises(ValueError, match="shard the batch_stats"):
        jax.jit(fn)(
            variables["params"],
            variables["batch_stats"],
            jax.device_put(x[0], shard),
            jax.device_put(y[0], shard),
        )


def test_spmd_jit_with_sharded_batch_uses_global_statistics():
    """jit + NamedSharding: XLA inserts the all-reduces; equals the unsharded run."""
    steps = 8
    x, y = data()
    model = Net()  # no axis_name: under SPMD jit the batch axis is global
    ref = reference()
    variables = init(model)
    mesh = batch_mesh(N_DEV)
    replicated, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    params = jax.device_put(variables["params"], replicated)
    bs = jax.device_put(variables["batch_stats"], replicated)
    opt_state = jax.device_put(TX.init(variables["params"]), replicated)
    step = jax.jit(make_step(model))
    for t in range(steps):
        xt = jax.device_put(x[t], shard)
        params, opt_state, bs, logits, grads = step(
            params, opt_state, bs, xt, jax.device_put(y[t], shard)
        )
        assert len(xt.sharding.device_set) == N_DEV
        r_logits, r_grads, r_bs, r_params = ref[t]
        assert_close(logits, r_logits, what=f"step {t + 1} logits")
        assert_close(grads, r_grads, what=f"step {t + 1} grads")
        assert_close(bs, r_bs, what=f"step {t + 1} batch_stats")
        assert_close(params, r_params, what=f"step {t + 1} params")
    assert len(logits.sharding.device_set) == N_DEV  # it ran on all eight devices
