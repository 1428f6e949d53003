"""Ghost batches (norm_batch_size): against a loop over groups, and against the
authors' simulated-small-batch layer.

With ``ghost_ema='group'`` a call with G groups is G separate steps of the
ungrouped layer, each recording its Ψ_B (g_B) before the next group runs: the
windows slide across groups and calls, and the EMA moves once per group. The
default ``ghost_ema='step'`` is the authors' ``cls/networks/MABN.py``: the same
sliding windows, but one EMA update per call with the groups' mean, and r of
every group measured against the EMA from before the call. ``public_cls.npz``
(tests/data/README.md) pins it.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_step import layer_step

import mabn_jax
from mabn_jax import functional as F

DATA = pathlib.Path(__file__).parent / "data"
N, H, C = 8, 2, 3
STEPS = 5


def _inputs(seed, steps, n):
    rng = np.random.default_rng(seed)
    # The scale drifts and jumps, so r hits both clips after renorm starts.
    scales = np.exp(rng.normal(0.0, 1.0, (steps, 1, 1, 1, C)))
    x = rng.normal(0.3, 1.0, (steps, n, H, H, C)) * scales
    dy = rng.normal(0.0, 1.0, (steps, n, H, H, C))
    return jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32)


def _step_fn(config):
    @jax.jit
    def step(state, x, dy, scale, bias):
        def loss(x, scale, bias, probes):
            y, new = F.mabn_train(x, scale, bias, state, probes, config)
            return jnp.sum(y * dy), (y, new)

        (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
            x, scale, bias, F.init_probes(state)
        )
        return F.record_backward_stats(new, grads[3], previous=state), y, grads

    def run(state, x, dy, scale, bias):  # host copies: no eager op compiles on CPU
        new, y, grads = step(state, x, dy, scale, bias)
        return new, *jax.device_get((y, grads))

    return run


@pytest.mark.parametrize(
    "centered,m,n", [(False, 3, 2), (True, 3, 2), pytest.param(False, 5, 4, marks=pytest.mark.slow)]
)
def test_mabn_ghost_batches_group_ema_match_loop_over_groups(centered, m, n):
    # Groups 1..20 (or 1..10) pass the batch phase (t <= m, t < warmup), the
    # window phase and renormalization (t > 6) with r clipped at 1.5.
    kw = dict(
        buffer_size=m,
        warmup_steps=4,
        renorm_start=6,
        r_max=1.5,
        d_max=0.5,
        momentum=0.8,
        centered=centered,
    )
    ghost_config = F.MABNConfig(norm_batch_size=n, ghost_ema="group", **kw)
    groups = N // n
    x, dy = _inputs(0, STEPS, N)
    scale = jnp.asarray([1.5, 0.7, -1.0], jnp.float32)
    bias = jnp.asarray([0.1, -0.2, 0.3], jnp.float32)
    ghost, single = _step_fn(ghost_config), _step_fn(F.MABNConfig(**kw))
    s_ghost = s_ref = F.init_state((C,), ghost_config)
    for t in range(STEPS):
        s_ghost, y, (dx, dscale, dbias, dprobes) = ghost(s_ghost, x[t], dy[t], scale, bias)
        ys, dxs, dss, dbs = [], [], [], []
        # The probe cotangents: each slot the call's groups write, by its last writer.
        cot = {k: np.zeros_like(s_ref.psi_window) for k in ("psi", "g")}
        for i in range(groups):
            sl = slice(i * n, (i + 1) * n)
            s_ref, yi, (dxi, dsi, dbi, dpi) = single(s_ref, x[t, sl], dy[t, sl], scale, bias)
            ys.append(yi), dxs.append(dxi), dss.append(dsi), dbs.append(dbi)
            slot = (t * groups + i + 1) % m
            for k in ("psi", "g") if centered else ("psi",):
                cot[k][slot] = getattr(dpi, k)[slot]
        tol = dict(rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(y, np.concatenate(ys), **tol)
        np.testing.assert_allclose(dx, np.concatenate(dxs), **tol)
        np.testing.assert_allclose(dscale, sum(dss), **tol)
        np.testing.assert_allclose(dbias, sum(dbs), **tol)
        np.testing.assert_allclose(dprobes.psi, cot["psi"], **tol)
        if centered:
            np.testing.assert_allclose(dprobes.g, cot["g"], **tol)
        for name, a, b in zip(s_ghost._fields, *jax.device_get((s_ghost, s_ref))):
            if a is not None:
                np.testing.assert_allclose(a, b, **tol, err_msg=name)
    assert int(s_ghost.step) == STEPS * groups
    # The run reached renormalization and r was clipped.
    stats = jax.jit(
        lambda s, x: F.mabn_train_with_stats(x, scale, bias, s, F.init_probes(s), ghost_config)[2]
    )(s_ghost, x[-1])
    assert stats["r"].shape == (groups, C)
    assert float(np.max(np.abs(np.log(stats["r"])))) == pytest.approx(np.log(1.5), rel=1e-5)


@pytest.mark.parametrize("ghost_ema", ["step", "group"])
def test_whole_batch_group_is_the_ungrouped_layer(ghost_ema):
    kw = dict(buffer_size=2, warmup_steps=0, renorm_start=1)
    x, dy = _inputs(1, 3, N)
    whole = _step_fn(F.MABNConfig(norm_batch_size=N, ghost_ema=ghost_ema, **kw))
    ungrouped = _step_fn(F.MABNConfig(**kw))
    a = b = F.init_state((C,), F.MABNConfig(**kw))
    for t in range(3):
        a, ya, ga = whole(a, x[t], dy[t], jnp.ones(C), jnp.zeros(C))
        b, yb, gb = ungrouped(b, x[t], dy[t], jnp.ones(C), jnp.zeros(C))
        np.testing.assert_array_equal(ya, yb)
        jax.tree.map(np.testing.assert_array_equal, (ga, a), (gb, b))
    assert int(a.step) == 3


def test_indivisible_batch_raises_at_trace_time():
    module = mabn_jax.MABN(norm_batch_size=3, centered=False)
    x = jnp.ones((8, 4))
    with pytest.raises(ValueError, match="norm_batch_size=3"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), x, use_running_average=False))
    with pytest.raises(ValueError, match="norm_batch_size=3"):
        jax.eval_shape(
            lambda: mabn_jax.BatchRenorm(norm_batch_size=3).init(
                jax.random.key(0), x, use_running_average=False
            )
        )
    with pytest.raises(ValueError, match="axis 0 is a feature axis"):
        mabn_jax.MABN(norm_batch_size=2, axis=0, centered=False).init(
            jax.random.key(0), x, use_running_average=False
        )


def test_probes_have_the_window_shape_whatever_the_groups():
    """Ghost batches need no other probes; per-group probes (the 0.1 shape) raise."""
    config = F.MABNConfig(buffer_size=3, norm_batch_size=2, centered=False)
    state = F.init_state((C,), config)
    x = jnp.ones((8, C))
    y, _ = jax.eval_shape(lambda: F.mabn_train(x, None, None, state, F.init_probes(state), config))
    assert y.shape == x.shape
    per_group = F.Probes(jnp.zeros((8 // 2, C)))
    with pytest.raises(ValueError, match=r"probe 'psi' has shape \(4, 3\).*init_probes"):
        F.mabn_train(x, None, None, state, per_group, config)


@pytest.mark.parametrize("average_stddev", [False, True])
def test_batch_renorm_ghost_batches_match_loop_over_groups(average_stddev):
    kw = dict(
        momentum=0.8,
        renorm_momentum=0.7,
        r_max=1.5,
        d_max=0.5,
        warmup_steps=1,
        ramp_steps=2,
        average_stddev=average_stddev,
    )
    n, groups = 2, N // 2
    x, dy = _inputs(2, 4, N)
    scale = jnp.asarray([1.5, 0.7, -1.0], jnp.float32)
    bias = jnp.asarray([0.1, -0.2, 0.3], jnp.float32)

    def run(state, x, dy, config):
        def loss(x, scale, bias):
            y, new, _ = F.batch_renorm_train(x, scale, bias, state, config)
            return jnp.sum(y * dy), (y, new)

        (_, (y, new)), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
        return new, y, g

    ghost_config = F.BatchRenormConfig(norm_batch_size=n, **kw)
    ghost = jax.jit(lambda s, x, dy: run(s, x, dy, ghost_config))
    single = jax.jit(lambda s, x, dy: run(s, x, dy, F.BatchRenormConfig(**kw)))
    s_ghost = s_ref = F.init_batch_renorm_state((C,))
    for t in range(4):
        s_ghost, y, (dx, ds, db) = ghost(s_ghost, x[t], dy[t])
        step0, outs = s_ref.step, []
        for i in range(groups):
            sl = slice(i * n, (i + 1) * n)
            s_ref, yi, gi = single(s_ref._replace(step=step0), x[t, sl], dy[t, sl])
            outs.append((yi, gi))
        tol = dict(rtol=2e-5, atol=2e-5)
        outs = jax.device_get(outs)
        np.testing.assert_allclose(y, np.concatenate([o[0] for o in outs]), **tol)
        np.testing.assert_allclose(dx, np.concatenate([o[1][0] for o in outs]), **tol)
        np.testing.assert_allclose(ds, sum(o[1][1] for o in outs), **tol)
        np.testing.assert_allclose(db, sum(o[1][2] for o in outs), **tol)
        for a, b in zip(*jax.device_get((s_ghost, s_ref))):
            np.testing.assert_allclose(a, b, **tol)
    assert int(s_ghost.step) == 4


# --- The authors' simulated-small-batch layer (public_cls.npz) ---------------------


def _load_cls():
    with np.load(DATA / "public_cls.npz") as f:  # NpzFile decompresses on every access
        d = {k: f[k] for k in f.files}
    return d, json.loads(str(d["config_json"]))


def _cls_module(cfg, ghost_ema="step"):
    m, nbs = cfg["buffer_size"], cfg["norm_batch_size"]
    return mabn_jax.MABN(
        use_running_average=False,
        norm_batch_size=nbs,
        buffer_size=m,
        warmup_steps=0,
        # r = 1 for iterations t < 100: window steps (groups) up to (100 - 1)·B.
        renorm_start=(cfg["renorm_from_iteration"] - 1) * m,
        momentum=cfg["momentum"],
        epsilon=cfg["eps"],
        ghost_ema=ghost_ema,
        param_dtype=jnp.float64,
        centered=False,
    )


def _run_cls(ghost_ema="step"):
    """Drives the layer through public_cls.npz in float64; one compiled step."""
    d, cfg = _load_cls()
    with jax.enable_x64(True):
        mod = _cls_module(cfg, ghost_ema)
        bs = jax.jit(mod.init)(jax.random.key(0), jnp.asarray(d["x"][0]))["batch_stats"]
        params = {"scale": jnp.asarray(d["weight"]), "bias": jnp.asarray(d["bias"])}
        step = layer_step(mod)
        results = []
        for i in range(cfg["T"]):
            y, dx, g, bs = step(params, bs, jnp.asarray(d["x"][i]), jnp.asarray(d["dy"][i]))
            results.append(
                jax.device_get(
                    dict(
                        y=y,
                        dx=dx,
                        dweight=g["scale"],
                        dbias=g["bias"],
                        running_var=bs["ema_x2"],
                        x2_window=bs["x2_window"],
                        psi_window=bs["psi_window"],
                        step=bs["step"],
                    )
                )
            )
        assert step._cache_size() == 1, "the train step must compile once for every phase"
    return d, cfg, results


def test_golden_public_cls_default_ghost_ema_float64():
    """The default ghost_ema='step' reproduces the authors' cls layer for every
    iteration: y, dx, dγ, dβ, the EMA and the per-group χ², Ψ, to 1e-9 relative."""
    d, cfg, results = _run_cls()
    m = cfg["buffer_size"]
    assert d["pre_x2"].shape[1] == m == d["x"].shape[1] // cfg["norm_batch_size"]
    worst = {}
    for i, ours in enumerate(results):
        assert int(ours["step"]) == (i + 1) * m  # one window step per group
        # Group j of iteration t is window step (t − 1)·m + j + 1: slot (j + 1) mod m.
        ours["pre_x2"] = np.roll(ours["x2_window"], -1, axis=0)
        ours["pre_gz"] = np.roll(ours["psi_window"], -1, axis=0)
        for k in ("y", "dx", "dweight", "dbias", "running_var", "pre_x2", "pre_gz"):
            ref = d[k][i]
            np.testing.assert_allclose(
                ours[k], ref, rtol=1e-9, atol=0, err_msg=f"public_cls iteration t={i + 1} {k}"
            )
            worst[k] = max(worst.get(k, 0.0), float(np.max(np.abs(ours[k] - ref) / np.abs(ref))))
    print("public_cls worst relative error:", worst)


def test_golden_public_cls_crosses_every_phase():
    """From the recording alone: iteration 1 uses per-group statistics, the windows
    then slide across iterations, and after iteration 100 r clips at both ends."""
    d, cfg = _load_cls()
    T, m, eps = cfg["T"], cfg["buffer_size"], cfg["eps"]
    pre = d["pre_x2"]
    # χ²_i of each group, from the input (groups of norm_batch_size examples).
    x = d["x"].reshape(T, m, -1, d["x"].shape[-1])
    np.testing.assert_allclose(pre, (x * x).mean(2), rtol=1e-12)
    # Group i of iteration t averages groups i+1.. of t − 1 and ..i of t.
    flat = pre.reshape(T * m, -1)
    window = np.stack([flat[max(s - m + 1, 0) : s + 1].mean(0) for s in range(T * m)])
    window[:m] = flat[:m]  # t = 1: each group's own χ²
    window = window.reshape(T, m, -1)
    np.testing.assert_allclose(d["running_var"][0], window[0].mean(0), rtol=1e-12)
    ema_before = np.concatenate([d["running_var"][:1], d["running_var"][:-1]])
    r = np.sqrt(window + eps) / np.sqrt(ema_before[:, None] + eps)
    late = np.arange(1, T + 1) >= cfg["renorm_from_iteration"]
    assert late.any() and (~late).any()
    assert (r[late] > 5.0).any() and (r[late] < 1 / 5.0).any()
    assert ((r[late] > 1 / 5.0) & (r[late] < 5.0)).any()
    # Before renormalization y is γ·x/sqrt(window χ² + ε) + β (r = 1), groupwise.
    y = d["y"].reshape(T, m, -1, x.shape[-1])
    np.testing.assert_allclose(
        y[~late],
        d["weight"] * x[~late] / np.sqrt(window[~late][:, :, None] + eps) + d["bias"],
        rtol=1e-9,
        atol=1e-12,
    )


def test_golden_public_cls_is_not_the_per_group_ema():
    """ghost_ema='group' (one EMA update per group) does not reproduce the recorded
    EMA, nor the outputs once r acts: the default ghost_ema matters."""
    d, cfg, results = _run_cls("group")
    ema = np.stack([r["running_var"] for r in results])
    rel = np.abs(ema - d["running_var"]) / np.abs(d["running_var"])
    assert rel.max() > 1e-2, rel.max()
    # The windows (and so the pre-renormalization outputs) are the same either way.
    before = cfg["renorm_from_iteration"] - 1
    np.testing.assert_allclose(
        np.stack([r["y"] for r in results[:before]]), d["y"][:before], rtol=1e-9, atol=1e-12
    )
    late = np.stack([r["y"] for r in results[before:]])
    assert not np.allclose(late, d["y"][before:], rtol=1e-3, atol=1e-3)
