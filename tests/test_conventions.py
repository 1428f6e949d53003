"""MABN follows nn.BatchNorm's Flax conventions.

In its BatchNorm-equivalent configuration (``BN_EQUIV``: centered, a window
of one step, renormalization never starting, BatchNorm's momentum) MABN is
nn.BatchNorm, so every convention is checked by running both side by side:
``mask=``, ``use_fast_variance``, ``jax.grad`` w.r.t. the whole variables
dict, method interceptors and ``tabulate``. The last part ports the
nn.BatchNorm tests of Flax's own suite (tests/linen/linen_test.py,
linen_module_test.py, linen_transforms_test.py of google/flax 0.12.8).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tree_assert import assert_trees_close

import mabn_jax

# buffer_size=1: the window is this step's statistics (from step 2 on it is the
# window path that runs, not the batch path); renorm_start at its maximum: r = 1,
# d = 0 for the whole test.
BN_EQUIV = dict(
    centered=True, buffer_size=1, warmup_steps=0, renorm_start=2**22, momentum=0.9, epsilon=1e-5
)
# MABN state leaf <- nn.BatchNorm state leaf.
STATE_NAMES = {"ema_mean": "mean", "ema_var": "var"}
RTOL, ATOL = 1e-5, 1e-5  # float32, as tests/test_autodiff.py against nn.BatchNorm


# Both layers of every comparison compile the same way (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _data(seed, shape, steps=3, offset=0.3):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 2.5, shape[-1]).astype(np.float32)
    x = rng.standard_normal((steps,) + shape).astype(np.float32) * scale + offset
    dy = rng.standard_normal((steps,) + shape).astype(np.float32)
    return x, dy


def _mask(seed, shape):
    """A random boolean mask with at least two entries per channel."""
    m = np.random.default_rng(seed).random(shape) < 0.6
    m[:2] = True
    return m


def _step(module, is_mabn, with_r=False):
    """``(params, batch_stats, x, dy, mask) -> (y, dx, dparams, new batch_stats)``
    for the loss ``sum(y · dy)`` (``with_r``: and the layer's ``r``)."""

    def fn(params, bs, x, dy, mask):
        def loss_fn(params, x):
            y, upd = module.apply(
                {"params": params, "batch_stats": bs},
                x,
                mask=mask,
                mutable=["batch_stats", "intermediates"],
            )
            return jnp.sum(y * dy), (y, upd)

        grad = (
            functools.partial(mabn_jax.value_and_grad, batch_stats=bs)
            if is_mabn
            else jax.value_and_grad
        )
        (_, (y, upd)), (dp, dx) = grad(loss_fn, argnums=(0, 1), has_aux=True)(params, x)
        out = (y, dx, dp, upd["batch_stats"])
        return out + (upd["intermediates"]["r"][0],) if with_r else out

    return fn


def _bn_view(bs):
    """The nn.BatchNorm leaves of an MABN state (its EMAs), in BN's names."""
    return {STATE_NAMES[k]: v for k, v in bs.items() if k in STATE_NAMES}


def _compare_trajectories(
    mabn, bn, xs, dys, masks, *, wrap=jax.jit, n_dev=None, compare=("y", "dx", "dparams", "state")
):
    """Runs both layers over the steps and compares (``compare``) after each step
    (with ``n_dev``: under ``wrap`` = a pmap, states with a leading device axis)."""
    init_x = xs[0] if n_dev is None else xs[0, 0]
    v_m = jax.device_get(jax.jit(mabn.init)(jax.random.key(0), init_x))
    v_b = jax.device_get(jax.jit(bn.init)(jax.random.key(0), init_x))
    params = {
        "scale": np.linspace(0.5, 1.5, init_x.shape[-1], dtype=np.float32),
        "bias": np.linspace(-0.2, 0.2, init_x.shape[-1], dtype=np.float32),
    }
    bs_m, bs_b = v_m["batch_stats"], v_b["batch_stats"]
    if n_dev is not None:
        bs_m, bs_b = jax.tree.map(lambda a: np.stack([a] * n_dev), (bs_m, bs_b))
    step_m, step_b = wrap(_step(mabn, True)), wrap(_step(bn, False))
    for t, (x, dy, m) in enumerate(zip(xs, dys, masks)):
        # one collective program in flight at a time on simulated CPU devices
        y, dx, dp, bs_m = jax.block_until_ready(step_m(params, bs_m, x, dy, m))
        y_r, dx_r, dp_r, bs_b = step_b(params, bs_b, x, dy, m)
        for what, a, b in (
            ("y", y, y_r),
            ("dx", dx, dx_r),
            ("dparams", dp, dp_r),
            ("state", _bn_view(bs_m), bs_b),
        ):
            if what in compare:
                assert_trees_close(a, b, rtol=RTOL, atol=ATOL, what=f"step {t + 1} {what}")
        assert np.all(bs_m["step"] == t + 1) and np.all(bs_m["skipped"] == 0)
    return bs_m


# --- mask= -----------------------------------------------------------------------


@pytest.mark.parametrize("use_fast_variance", [False, True])
def test_mask_equals_batchnorm(use_fast_variance):
    """Statistics over the masked entries: outputs, ∂x, ∂params and state as nn.BatchNorm."""
    xs, dys = _data(0, (6, 4, 3))
    masks = [_mask(s, (6, 4, 1)) for s in range(3)]
    kw = dict(use_running_average=False, use_fast_variance=use_fast_variance)
    _compare_trajectories(
        mabn_jax.MABN(**BN_EQUIV, **kw), nn.BatchNorm(momentum=0.9, **kw), xs, dys, masks
    )


def test_mask_equals_batchnorm_synchronized_over_devices():
    """With axis_name under pmap, devices with different mask counts (nn.BatchNorm's
    statistics: the mean over devices of each device's masked statistics)."""
    n = 4
    xs, dys = _data(1, (n, 3, 2, 3))
    masks = np.stack([np.stack([_mask(10 * s + d, (3, 2, 1)) for d in range(n)]) for s in range(3)])
    assert len({int(masks[0, d].sum()) for d in range(n)}) > 1  # counts differ
    kw = dict(use_running_average=False, axis_name="batch")
    pmap = lambda f: jax.pmap(f, "batch", in_axes=(None, 0, 0, 0, 0), devices=jax.devices()[:n])
    bs = _compare_trajectories(
        mabn_jax.MABN(**BN_EQUIV, **kw),
        nn.BatchNorm(momentum=0.9, **kw),
        xs,
        dys,
        masks,
        wrap=pmap,
        n_dev=n,
    )
    # The forward state is the same on every device. The backward statistics are
    # not: as in nn.BatchNorm's gradient, each device divides the synchronized sum
    # by its own count (its weight in the mean of the devices' masked means).
    count = masks[-1].sum(axis=(1, 2, 3)).astype(np.float32)[:, None, None]
    for key, leaf in bs.items():
        leaf = np.asarray(leaf) * (count if key in ("psi_window", "g_window") else 1)
        np.testing.assert_allclose(
            leaf, np.broadcast_to(leaf[:1], leaf.shape), rtol=1e-6, err_msg=key
        )


@pytest.mark.parametrize("centered", [False, True])
def test_mask_padding_is_as_if_dropped(centered):
    """The plain layer and the window phase: masking padded examples (whose loss is
    zero) is the same trajectory as dropping them, in every phase."""
    cfg = dict(
        centered=centered,
        buffer_size=3,
        warmup_steps=2,
        renorm_start=4,
        r_max=1.5,
        d_max=0.5,
        use_running_average=False,
    )
    mod = mabn_jax.MABN(**cfg)
    steps, keep = 8, np.array([1, 1, 0, 1, 0, 1], bool)  # 4 of 6 examples are real
    xs, dys = _data(2, (6, 2, 3), steps)
    xs[..., 0] *= np.linspace(1, 8, steps, dtype=np.float32)[:, None, None]  # r clips
    xs[:, ~keep] = 100.0  # padding: finite garbage
    dys[:, ~keep] = 0.0  # ... with no loss
    mask = keep[:, None, None]
    params = {
        "scale": np.linspace(0.5, 1.5, 3, dtype=np.float32),
        "bias": np.linspace(-0.2, 0.2, 3, dtype=np.float32),
    }
    bs_a = bs_b = jax.device_get(jax.jit(mod.init)(jax.random.key(0), xs[0]))["batch_stats"]
    step = jax.jit(_step(mod, True, with_r=True))
    clipped = False
    for t in range(steps):
        y, dx, dp, bs_a, _ = step(params, bs_a, xs[t], dys[t], mask)
        y_r, dx_r, dp_r, bs_b, r = step(params, bs_b, xs[t][keep], dys[t][keep], None)
        for what, a, b in (
            ("y", y[keep], y_r),
            ("dx", dx[keep], dx_r),
            ("dparams", dp, dp_r),
            ("state", bs_a, bs_b),
        ):
            assert_trees_close(a, b, rtol=RTOL, atol=ATOL, what=f"step {t + 1} {what}")
        np.testing.assert_array_equal(dx[~keep], dx[~keep] * 0)  # pads: no statistics term
        clipped |= bool(
            np.any(r == np.float32(1.5))
            and np.any((r != 1) & (r < 1.5) & (r > np.float32(1 / 1.5)))
        )
    assert clipped  # the trajectory reached renormalization with r clipped in some channels


# --- use_fast_variance --------------------------------------------------------------


def test_use_fast_variance_is_honoured():
    """A large mean against the spread, where one-pass E[x²] − E[x]² loses precision:
    MABN's two variants compute nn.BatchNorm's forward statistics, outputs and state,
    and differ from each other. (Gradients of both are compared with nn.BatchNorm's at
    a benign mean in test_mask_equals_batchnorm; at this mean the autodiff of the
    one-pass variance cancels catastrophically, MABN's closed-form VJP does not.)"""
    xs, dys = _data(3, (8, 3), offset=1000.0)
    outs = {}
    for fast in (False, True):
        kw = dict(use_running_average=False, use_fast_variance=fast)
        outs[fast] = _compare_trajectories(
            mabn_jax.MABN(**BN_EQUIV, **kw),
            nn.BatchNorm(momentum=0.9, **kw),
            xs,
            dys,
            [None] * 3,
            compare=("y", "state"),
        )
    gap = np.abs(outs[True]["ema_var"] - outs[False]["ema_var"]) / outs[False]["ema_var"]
    assert gap.max() > 100 * RTOL  # the comparison above could tell them apart


def test_use_fast_variance_does_not_change_the_plain_layer():
    """The non-centered layer normalizes by E[x²]: no variance to compute."""
    xs, dys = _data(4, (8, 3), offset=1000.0)
    x = xs[0]
    out = []
    for fast in (False, True):
        mod = mabn_jax.MABN(use_running_average=False, use_fast_variance=fast, centered=False)
        v = jax.jit(mod.init)(jax.random.key(0), x)
        out.append(jax.jit(_step(mod, True))(v["params"], v["batch_stats"], x, dys[0], None))
    for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
        np.testing.assert_array_equal(a, b)


# --- jax.grad w.r.t. the whole variables dict --------------------------------------


class _Net(nn.Module):
    norm: object

    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Dense(4)(x)
        return nn.Dense(2)(jnp.tanh(self.norm(use_running_average=not train)(x)))


def _nets():
    return (
        _Net(functools.partial(mabn_jax.MABN, **BN_EQUIV)),
        _Net(functools.partial(nn.BatchNorm, momentum=0.9)),
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _variables_after_a_step(net, is_mabn, x):
    v = net.init(jax.random.key(0), x)

    def loss_fn(params):
        y, upd = net.apply(
            {"params": params, "batch_stats": v["batch_stats"]}, x * 3 + 1, mutable=["batch_stats"]
        )
        return y.sum(), upd

    grad = (
        functools.partial(mabn_jax.value_and_grad, batch_stats=v["batch_stats"])
        if is_mabn
        else jax.value_and_grad
    )
    (_, upd), _ = grad(loss_fn, has_aux=True)(v["params"])
    return {"params": v["params"], "batch_stats": upd["batch_stats"]}


def test_grad_wrt_whole_variables_in_inference():
    """jax.grad of an inference loss over {'params', 'batch_stats'}: the counters are
    floats, so it runs; the EMAs get nn.BatchNorm's gradients, the rest zeros."""
    x = jnp.asarray(_data(5, (6, 3))[0][0])
    grads = []
    for net, is_mabn in zip(_nets(), (True, False)):
        v = _variables_after_a_step(net, is_mabn, x)
        grads.append(jax.jit(jax.grad(lambda v: jnp.sum(net.apply(v, x, train=False) ** 2)))(v))
    g_m, g_b = grads
    norm_m, norm_b = g_m["batch_stats"]["MABN_0"], g_b["batch_stats"]["BatchNorm_0"]
    assert_trees_close(_bn_view(norm_m), norm_b, rtol=RTOL, atol=ATOL, what="EMA grads")
    assert np.abs(norm_b["var"]).max() > 1e-3  # a gradient worth comparing
    for k in set(norm_m) - set(STATE_NAMES):
        np.testing.assert_array_equal(norm_m[k], 0 * norm_m[k], err_msg=k)
    g_m["params"]["BatchNorm_0"] = g_m["params"].pop("MABN_0")
    assert_trees_close(g_m["params"], g_b["params"], rtol=RTOL, atol=ATOL, what="params")


def test_grad_wrt_whole_variables_in_training():
    """Training mode: mabn_jax.value_and_grad over the whole variables dict, as
    jax.value_and_grad for nn.BatchNorm (batch_stats gradients are zero);
    plain jax.grad raises an error that names value_and_grad."""
    x = jnp.asarray(_data(6, (6, 3))[0][0])
    out = []
    for net, is_mabn in zip(_nets(), (True, False)):
        v = _variables_after_a_step(net, is_mabn, x)

        def loss_fn(variables):
            y, upd = net.apply(variables, x, mutable=["batch_stats"])
            return jnp.sum(y**2), upd

        grad = (
            functools.partial(mabn_jax.value_and_grad, batch_stats=v["batch_stats"])
            if is_mabn
            else jax.value_and_grad
        )
        (loss, upd), g = jax.jit(grad(loss_fn, has_aux=True))(v)
        out.append((loss, upd["batch_stats"], g))
        if is_mabn:
            with pytest.raises(ValueError, match="mabn_jax.value_and_grad"):
                jax.grad(lambda v: loss_fn(v)[0])(v)
    (loss_m, bs_m, g_m), (loss_b, bs_b, g_b) = out
    np.testing.assert_allclose(loss_m, loss_b, rtol=RTOL)
    assert_trees_close(_bn_view(bs_m["MABN_0"]), bs_b["BatchNorm_0"], rtol=RTOL, atol=ATOL)
    assert int(bs_m["MABN_0"]["step"]) == 2 and np.isfinite(bs_m["MABN_0"]["psi_window"]).all()
    for leaf in jax.tree.leaves((g_m["batch_stats"], g_b["batch_stats"])):
        np.testing.assert_array_equal(leaf, 0 * leaf)
    g_m["params"]["BatchNorm_0"] = g_m["params"].pop("MABN_0")
    assert_trees_close(g_m["params"], g_b["params"], rtol=RTOL, atol=ATOL, what="params")


# --- method interceptors --------------------------------------------------------------


def test_method_interceptors_see_what_they_see_for_batchnorm():
    """nn.intercept_methods: the same calls (one __call__ per layer, no private
    helpers), and an interceptor that changes a norm's input and output acts on
    MABN as on nn.BatchNorm, gradients included."""
    x = jnp.asarray(_data(7, (6, 3))[0][0])
    results, seen = [], []
    for net, is_mabn in zip(_nets(), (True, False)):
        calls = []

        def interceptor(f, args, kwargs, ctx):
            calls.append((ctx.module.name, ctx.method_name))
            if isinstance(ctx.module, (mabn_jax.MABN, nn.BatchNorm)):
                return 2.0 * f(args[0] + 1.0, *args[1:], **kwargs)
            return f(*args, **kwargs)

        v = jax.jit(net.init)(jax.random.key(0), x)

        def loss_fn(params):
            y, upd = net.apply(
                {"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"]
            )
            return jnp.sum(y**2), upd

        grad = (
            functools.partial(mabn_jax.value_and_grad, batch_stats=v["batch_stats"])
            if is_mabn
            else jax.value_and_grad
        )
        with nn.intercept_methods(interceptor):  # acts while tracing
            (loss, upd), g = jax.jit(grad(loss_fn, has_aux=True))(v["params"])
        norm = "MABN_0" if is_mabn else "BatchNorm_0"
        g["norm"] = g.pop(norm)
        results.append(
            (loss, _bn_view(upd["batch_stats"][norm]) if is_mabn else upd["batch_stats"][norm], g)
        )
        seen.append([("norm" if name == norm else name, m) for name, m in calls])
    assert seen[0] == seen[1]
    assert ("norm", "__call__") in seen[0]
    assert_trees_close(results[0], results[1], rtol=RTOL, atol=ATOL)


# --- tabulate ------------------------------------------------------------------------------


class _CNN(nn.Module):
    """After Flax's summary_test ConvBlock: conv, norm, relu, twice, and a head."""

    norm: object

    @nn.compact
    def __call__(self, x, training: bool):
        for features in (8, 16):
            x = nn.Conv(features, (3, 3))(x)
            x = nn.relu(self.norm()(x, use_running_average=not training))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def _rows(table: str):
    """(path, module, first input, outputs[, flops, vjp_flops]) per row of a table."""
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) >= 6 and cells[1] and cells[1] != "module":
            inputs = cells[2].removeprefix("- ")
            rows.append(
                (cells[0], cells[1], inputs, cells[3])
                + (tuple(cells[4:6]) if "vjp_flops" in table else ())
            )
    return rows


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("compute_flops", [False, True])
def test_tabulate(training, compute_flops):
    """Eval and training mode, with and without FLOPs: the rows of nn.BatchNorm's
    table (training-mode FLOPs come from an apply with every collection mutable,
    where the layer makes its own zero probes)."""
    x = jnp.ones((2, 6, 6, 3))
    tables = []
    for norm in (
        functools.partial(mabn_jax.MABN, **BN_EQUIV),
        functools.partial(nn.BatchNorm, momentum=0.9),
    ):
        tables.append(
            _CNN(norm).tabulate(
                jax.random.key(0),
                x,
                training,
                compute_flops=compute_flops,
                compute_vjp_flops=compute_flops,
                console_kwargs={"force_terminal": False, "width": 300},
            )
        )
    rows_m, rows_b = (_rows(t) for t in tables)
    assert len(rows_m) == 6  # _CNN, 2 convs, 2 norms, the head
    strip = lambda rows: [
        (p.replace("MABN", "BatchNorm"), m.replace("MABN", "BatchNorm"), i, o)
        for p, m, i, o, *_ in rows
    ]
    assert strip(rows_m) == strip(rows_b)
    assert "psi_window: float32[1,8]" in tables[0] and "step: float32[]" in tables[0]
    if compute_flops:
        flops = {p: (int(f), int(v)) for p, _, _, _, f, v in rows_m}
        assert flops["MABN_0"][0] > 0 and flops["MABN_0"][1] > flops["MABN_0"][0]


def test_tabulate_training_mode_without_probes_collection_names_the_fix():
    """Counting FLOPs of a training-mode apply whose 'mabn_probes' are not mutable."""
    with pytest.raises(ValueError, match="make the 'mabn_probes' collection mutable"):
        _CNN(functools.partial(mabn_jax.MABN, **BN_EQUIV)).tabulate(
            jax.random.key(0),
            jnp.ones((2, 6, 6, 3)),
            True,
            compute_flops=True,
            mutable=["params", "batch_stats"],
        )


# --- Flax's own nn.BatchNorm tests, ported ----------------------------------------------
# google/flax tests/linen/*.py @ 18f8f311; nn.BatchNorm(...) -> MABN(**BN_EQUIV, ...),
# training-mode applies get the probes. Not ported: test_batch_norm_complex (MABN
# refuses complex inputs with a TypeError naming the fix, tests/test_errors.py).


@pytest.mark.parametrize("test_mask", [True, False])
def test_flax_batch_norm(test_mask):
    """linen_test.py NormalizationTest.test_batch_norm."""
    key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key1, (4, 3, 2))
    if test_mask:
        m = jax.random.randint(key2, (4, 3, 1), minval=0, maxval=2, dtype=jnp.int32).astype(
            jnp.bool_
        )
        x = jnp.where(m, x, jnp.ones_like(x) * jnp.nan)
    else:
        m = None
    model_cls = mabn_jax.MABN(**BN_EQUIV, use_running_average=False)
    y, initial_params = jax.jit(model_cls.init_with_output)(key3, x, mask=m)

    mean = y.mean((0, 1), where=m)
    var = y.var((0, 1), where=m)
    np.testing.assert_allclose(mean, np.array([0.0, 0.0]), atol=1e-4)
    np.testing.assert_allclose(var, np.array([1.0, 1.0]), rtol=1e-4)
    probes = {"mabn_probes": mabn_jax.init_probes(initial_params["batch_stats"])}
    _, vars_out = jax.jit(functools.partial(model_cls.apply, mutable=["batch_stats"]))(
        {**initial_params, **probes}, x, mask=m
    )

    ema = vars_out["batch_stats"]
    np.testing.assert_allclose(
        ema["ema_mean"], 0.1 * x.mean((0, 1), keepdims=False, where=m), atol=1e-4
    )
    np.testing.assert_allclose(
        ema["ema_var"], 0.9 + 0.1 * x.var((0, 1), keepdims=False, where=m), rtol=1e-4
    )


def test_flax_batch_norm_multi_init():
    """linen_test.py NormalizationTest.test_batch_norm_multi_init: init runs the layer
    twice, with an unbound axis_name."""

    class Foo(nn.Module):
        @nn.compact
        def __call__(self, x):
            norm = mabn_jax.MABN(
                **BN_EQUIV, name="norm", use_running_average=False, axis_name="batch"
            )
            x = norm(x)
            return x, norm(x)

    x = jax.random.normal(jax.random.key(1), (2, 4))
    (y1, y2), _ = jax.jit(Foo().init_with_output)(jax.random.key(0), x)
    np.testing.assert_allclose(y1, y2, rtol=0.005)


def test_flax_bind_stateful():
    """linen_module_test.py test_bind_stateful (x of shape (2, 4): a batch, not one
    example)."""

    class Foo(nn.Module):
        def setup(self):
            self.a = nn.Dense(3)
            self.bn = mabn_jax.MABN(**BN_EQUIV)
            self.b = nn.Dense(1)

    def f(foo, x):
        x = foo.a(x)
        x = foo.bn(x, use_running_average=False)
        return foo.b(x)

    foo = Foo()
    x = jnp.arange(8.0).reshape(2, 4)
    y1, variables = nn.init_with_output(f, foo)(jax.random.key(0), x)
    variables = {**variables, "mabn_probes": mabn_jax.init_probes(variables["batch_stats"])}
    foo_b = foo.bind(variables, mutable="batch_stats")
    y2 = f(foo_b, x)
    y3, new_state = nn.apply(f, foo, mutable="batch_stats")(variables, x)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(y2, y3)
    for a, b in zip(
        jax.tree.leaves(new_state["batch_stats"]), jax.tree.leaves(foo_b.variables["batch_stats"])
    ):
        np.testing.assert_allclose(a, b)


def test_flax_vmap_batchnorm():
    """linen_transforms_test.py test_vmap_batchnorm: statistics synchronized over a
    vmapped axis equal the layer on the flattened batch (probes broadcast like the
    state)."""
    key1, key2, key3 = jax.random.split(jax.random.key(3), 3)
    x = jax.random.uniform(key1, (4, 4))
    x2 = jax.random.uniform(key2, (5, 4, 4))

    def vmap(cls):
        return nn.vmap(
            cls,
            in_axes=(0,),
            variable_axes={"params": None, "batch_stats": None, "mabn_probes": None},
            split_rngs={"params": False},
            axis_name="batch",
        )

    class MlpBn(nn.Module):
        axis_name: object = None

        @nn.compact
        def __call__(self, x):
            x = nn.Dense(3)(x)
            return mabn_jax.MABN(**BN_EQUIV, axis_name=self.axis_name, use_running_average=False)(x)

    init_variables = jax.jit(MlpBn().init)(key3, x)
    variables = {
        **init_variables,
        "mabn_probes": mabn_jax.init_probes(init_variables["batch_stats"]),
    }
    apply = lambda model: jax.jit(functools.partial(model.apply, mutable=["batch_stats"]))
    y1 = apply(MlpBn())(variables, x2.reshape((-1, 4)))[0]
    y1 = y1.reshape((5, 4, 3))
    y2 = apply(vmap(MlpBn)(axis_name="batch"))(variables, x2)[0]
    np.testing.assert_allclose(y1, y2, atol=1e-5)
