"""The Flax shells: drop-in compatibility, state handling, inference, dtypes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax
from mabn_jax import functional as F


def _train(mod, variables, xs):
    """Runs training steps through mabn_jax.value_and_grad (fixed params);
    returns the final batch_stats."""
    return _trajectory(mod, variables, xs)[-1]


def _trajectory(mod, variables, xs):
    """The batch_stats after each step."""

    @jax.jit
    def step(params, bs, x):
        def loss_fn(params):
            y, upd = mod.apply({"params": params, "batch_stats": bs}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y)), upd

        (_, upd), _ = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=bs)(params)
        return upd["batch_stats"]

    bs, out = variables["batch_stats"], []
    for x in xs:
        bs = step(variables["params"], bs, x)
        out.append(bs)
    return out


def _inputs(n, shape, seed=0):
    return [jax.random.normal(jax.random.key(seed + i), shape) * (1 + i) + 0.5 for i in range(n)]


def test_accepts_every_batchnorm_attribute_and_paper_defaults():
    bn_fields = {f.name for f in dataclasses.fields(nn.BatchNorm)} - {"parent", "name"}
    mabn_fields = {f.name for f in dataclasses.fields(mabn_jax.MABN)}
    assert bn_fields <= mabn_fields
    m = mabn_jax.MABN(centered=False)
    assert (
        m.momentum,
        m.epsilon,
        m.window,  # buffer_size=None: 16 for the plain layer
        m.warmup_steps,
        m.renorm_start,
        m.r_max,
        m.centered,
        m.d_max,
    ) == (0.98, 1e-5, 16, 100, 1000, 5.0, False, 5.0)
    # The centered layer's window is sized per layer (docs/centered.md, issue 30).
    centered = mabn_jax.MABNConfig(centered=True)
    assert (m.buffer_size, centered.window_length(1), centered.window_length(64)) == (None, 16, 2)
    # Deliberate departures from nn.BatchNorm's defaults: the paper's momentum, and
    # the two-pass variance (the one-pass form cancels at batches of 1-4).
    assert (m.momentum, m.use_fast_variance) == (0.98, False)
    bn_defaults = {
        f.name: f.default for f in dataclasses.fields(nn.BatchNorm) if f.name in bn_fields
    }
    for name, default in bn_defaults.items():
        if name not in ("momentum", "use_fast_variance"):
            assert getattr(m, name) == default, name


@pytest.mark.parametrize("centered", [False, True])
def test_init_creates_state_and_does_not_advance_it(centered):
    mod = mabn_jax.MABN(use_running_average=False, buffer_size=5, centered=centered)
    v = mod.init(jax.random.key(0), jnp.ones((2, 4, 4, 3)) * 7.0)
    bs = v["batch_stats"]
    # The stored names are a checkpoint format: unchanged by the core rewrite.
    want = (
        {
            "step",
            "mean_window",
            "var_window",
            "g_window",
            "psi_window",
            "ema_mean",
            "ema_var",
            "skipped",
        }
        if centered
        else {"step", "x2_window", "psi_window", "ema_x2", "skipped"}
    )
    assert set(bs) == want
    # Counters are floats (so jax.grad over all variables and lax.pmean work).
    for counter in ("step", "skipped"):
        assert int(bs[counter]) == 0 and bs[counter].dtype == jnp.float32
    assert bs["psi_window"].shape == (5, 3)
    ema = bs["ema_var"] if centered else bs["ema_x2"]
    np.testing.assert_array_equal(ema, np.ones(3))
    assert all(not np.any(bs[k]) for k in bs if k.endswith("window"))
    assert set(v["params"]) == {"scale", "bias"}
    assert mabn_jax.PROBES not in v, "init must not create probes (they come from the helper)"


def test_training_without_probes_raises_a_clear_error():
    mod = mabn_jax.MABN(use_running_average=False, centered=False)
    x = jnp.ones((2, 3))
    v = mod.init(jax.random.key(0), x)
    with pytest.raises(
        ValueError,
        match=r"'' is applied in training mode without its probes"
        r".*mabn_jax\.value_and_grad\(loss_fn, has_aux=True"
        r".*init_probes.*record_backward_stats",
    ):
        mod.apply(v, x, mutable=["batch_stats"])


@pytest.mark.parametrize("centered", [False, True])
def test_inference_is_the_documented_affine_map(centered):
    mod = mabn_jax.MABN(buffer_size=2, warmup_steps=2, renorm_start=3, centered=centered)
    xs = _inputs(6, (4, 5, 5, 3))
    v = mod.init(jax.random.key(0), xs[0], use_running_average=False)
    params = {"scale": jnp.array([0.5, 1.0, 2.0]), "bias": jnp.array([0.1, -0.2, 0.3])}
    bs = _train(
        mod.clone(use_running_average=False),
        {"params": params, "batch_stats": v["batch_stats"]},
        xs,
    )
    assert int(bs["step"]) == 6
    x = jax.random.normal(jax.random.key(9), (2, 5, 5, 3))
    y = mod.apply({"params": params, "batch_stats": bs}, x, use_running_average=True)
    if centered:
        ref = (
            params["scale"] * (x - bs["ema_mean"]) / jnp.sqrt(bs["ema_var"] + 1e-5) + params["bias"]
        )
    else:
        assert not np.allclose(bs["ema_x2"], 1.0)
        ref = params["scale"] * x / jnp.sqrt(bs["ema_x2"] + 1e-5) + params["bias"]
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_feature_axis_channels_first_equals_channels_last():
    xs = _inputs(5, (2, 4, 4, 3))
    last = mabn_jax.MABN(use_running_average=False, buffer_size=2, warmup_steps=0, centered=False)
    first = last.clone(axis=1)
    to_nchw = lambda x: jnp.transpose(x, (0, 3, 1, 2))
    v = last.init(jax.random.key(0), xs[0])
    bs_last = _train(last, v, xs)
    bs_first = _train(first, v, [to_nchw(x) for x in xs])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), bs_last, bs_first
    )
    infer = lambda mod, bs, x: mod.clone(use_running_average=True).apply(
        {"params": v["params"], "batch_stats": bs}, x
    )
    y_last, y_first = infer(last, bs_last, xs[0]), infer(first, bs_first, to_nchw(xs[0]))
    np.testing.assert_allclose(to_nchw(y_last), y_first, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_multiple_feature_axes_and_rank_two_inputs():
    mod = mabn_jax.MABN(use_running_average=False, axis=(-2, -1), buffer_size=3, centered=False)
    v = mod.init(jax.random.key(0), jnp.ones((4, 2, 3)))
    assert v["batch_stats"]["x2_window"].shape == (3, 2, 3)
    assert v["params"]["scale"].shape == (2, 3)
    bs = _train(mod, v, _inputs(4, (4, 2, 3)))
    assert bs["psi_window"].shape == (3, 2, 3) and np.any(bs["psi_window"])
    dense = mabn_jax.MABN(use_running_average=False, centered=False)
    vd = dense.init(jax.random.key(0), jnp.ones((2, 7)))
    assert int(_train(dense, vd, _inputs(3, (2, 7)))["step"]) == 3


@pytest.mark.parametrize("centered", [False, True])
def test_bfloat16_inputs_keep_float32_statistics_and_state(centered):
    mod = mabn_jax.MABN(use_running_average=False, centered=centered, buffer_size=2)
    xs = [x.astype(jnp.bfloat16) for x in _inputs(3, (2, 4, 4, 3))]
    v = mod.init(jax.random.key(0), xs[0])
    bs = _train(mod, v, xs)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(bs))
    probes = mabn_jax.init_probes(bs)
    y, _ = mod.apply(
        {**v, "batch_stats": bs, mabn_jax.PROBES: probes}, xs[0], mutable=["batch_stats"]
    )
    assert y.dtype == jnp.bfloat16
    grads = jax.grad(
        lambda x: (
            mod.apply(
                {**v, "batch_stats": bs, mabn_jax.PROBES: probes}, x, mutable=["batch_stats"]
            )[0]
            .astype(jnp.float32)
            .sum()
        )
    )(xs[0])
    assert grads.dtype == jnp.bfloat16
    # The bf16 run tracks the float32 run's statistics closely.
    bs32 = _train(mod, v, [x.astype(jnp.float32) for x in xs])
    np.testing.assert_allclose(bs["psi_window"], bs32["psi_window"], rtol=0.05, atol=1e-3)
    out = mod.clone(dtype=jnp.float32).apply(
        {**v, "batch_stats": bs, mabn_jax.PROBES: probes}, xs[0], mutable=["batch_stats"]
    )[0]
    assert out.dtype == jnp.float32


def test_without_scale_and_bias():
    mod = mabn_jax.MABN(use_running_average=False, use_scale=False, use_bias=False, centered=False)
    x = _inputs(1, (3, 4))[0]
    v = mod.init(jax.random.key(0), x)
    assert "params" not in v
    y, _ = mod.apply(
        {**v, mabn_jax.PROBES: mabn_jax.init_probes(v["batch_stats"])}, x, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y, x / jnp.sqrt(jnp.mean(x * x, 0) + 1e-5), rtol=1e-5)


@pytest.mark.slow
def test_probe_helpers_on_a_nested_model_write_the_current_slot():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = mabn_jax.CenteredDense(6)(x)
            x = mabn_jax.MABN(
                use_running_average=False, buffer_size=3, name="plain", centered=False
            )(x)
            x = nn.Dense(5)(nn.relu(x))
            x = mabn_jax.MABN(
                use_running_average=False, buffer_size=3, centered=True, name="centered"
            )(x)
            return x

    net = Net()
    xs = _inputs(4, (4, 8))
    v = net.init(jax.random.key(0), xs[0])
    probes = mabn_jax.init_probes(v["batch_stats"])
    # Probes have the windows' shape [m, *features].
    assert jax.tree.map(jnp.shape, probes) == {
        "plain": {"psi": (3, 6)},
        "centered": {"psi": (3, 5), "g": (3, 5)},
    }
    _, _, bs, bs4 = _trajectory(net, v, xs)
    for layer in ("plain", "centered"):
        assert int(bs4[layer]["step"]) == 4
        # Step 4 with m = 3 wrote slot 1 only; slot 0 (step 3) and 2 (step 2) are older.
        for name in ("psi_window",) + (("g_window",) if layer == "centered" else ()):
            assert np.all(bs4[layer][name][1] != bs[layer][name][1]), (layer, name)
            np.testing.assert_array_equal(
                np.asarray(bs4[layer][name])[[0, 2]], np.asarray(bs[layer][name])[[0, 2]]
            )


def test_record_backward_stats_rejects_mismatched_trees():
    mod = mabn_jax.MABN(use_running_average=False, centered=False)
    v = nn.Sequential([mod]).init(jax.random.key(0), jnp.ones((2, 3)))
    bs = v["batch_stats"]
    with pytest.raises(
        ValueError,
        match=r"different MABN layers \(\['layers_0'\], "
        r"\['other'\], \['layers_0'\]\)",
    ):
        mabn_jax.record_backward_stats(bs, {"other": {"psi": jnp.zeros((16, 3))}}, bs)


def test_functional_api_directly():
    cfg = mabn_jax.MABNConfig(buffer_size=2, warmup_steps=0, centered=False)
    state = F.init_state((3,), cfg)
    x = _inputs(1, (4, 3))[0]
    loss = lambda x, probes, state: jnp.sum(F.mabn_train(x, None, None, state, probes, cfg)[0] ** 2)
    g = jax.grad(loss, argnums=1)(x, F.init_probes(state), state)
    assert g.psi.shape == (2, 3)  # window-shaped: Ψ_B in step 1's slot, zeros elsewhere
    np.testing.assert_array_equal(g.psi[0], 0.0)
    assert np.all(g.psi[1] != 0.0)
    _, new = F.mabn_train(x, None, None, state, F.init_probes(state), cfg)
    assert np.isnan(new.psi_window[1]).all()  # reserved until recorded
    new = F.record_backward_stats(new, g, previous=state)
    np.testing.assert_array_equal(new.psi_window[1], g.psi[1])
    np.testing.assert_array_equal(new.psi_window[0], 0.0)


def test_config_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="buffer_size=0"):
        mabn_jax.MABNConfig(buffer_size=0, centered=False)
    with pytest.raises(ValueError, match="momentum=1.0"):
        mabn_jax.MABN(momentum=1.0, centered=False)


@pytest.mark.parametrize(
    "cls,kwargs,shape",
    [
        (
            mabn_jax.CenteredConv,
            dict(features=6, kernel_size=(3, 3), strides=2, padding="SAME"),
            (2, 8, 8, 4),
        ),
        (
            mabn_jax.CenteredConv,
            dict(
                features=6, kernel_size=(3,), feature_group_count=2, use_bias=False, padding="VALID"
            ),
            (2, 9, 4),
        ),
        (mabn_jax.CenteredDense, dict(features=5), (3, 7)),
    ],
)
def test_centered_layers_use_zero_mean_kernels_and_match_flax(cls, kwargs, shape):
    layer = cls(**kwargs)
    x = jax.random.normal(jax.random.key(0), shape)
    v = layer.init(jax.random.key(1), x)
    kernel = v["params"]["kernel"]
    assert abs(float(kernel.mean(axis=tuple(range(kernel.ndim - 1))).max())) > 1e-4  # stored: raw
    centered = mabn_jax.center_kernel(kernel)
    np.testing.assert_allclose(centered.mean(axis=tuple(range(kernel.ndim - 1))), 0.0, atol=1e-6)
    flax_cls = nn.Conv if cls is mabn_jax.CenteredConv else nn.Dense
    ref = flax_cls(**kwargs).apply({"params": {**v["params"], "kernel": centered}}, x)
    np.testing.assert_allclose(layer.apply(v, x), ref, rtol=1e-6, atol=1e-6)
    # Each output unit is a zero-mean combination: a constant input maps to the bias.
    const = layer.apply(v, jnp.full(shape, 3.0))
    bias = v["params"].get("bias", 0.0)
    if kwargs.get("padding") == "VALID" or cls is mabn_jax.CenteredDense:
        np.testing.assert_allclose(const, jnp.broadcast_to(bias, const.shape), atol=1e-5)
