"""replace_batchnorm / convert_batchnorm_variables on a linen model whose source
uses nn.BatchNorm through partial, nn.remat and nn.scan (the model is not edited)."""

import re
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax


class Block(nn.Module):
    train: bool

    @nn.compact
    def __call__(self, c, _):
        c = nn.Dense(4)(c)
        return nn.BatchNorm(use_running_average=not self.train, momentum=0.9)(c), None


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(4)(x)
        x = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)()(x)
        x = nn.remat(nn.BatchNorm)(use_running_average=not train, epsilon=1e-3)(x)
        x, _ = nn.scan(
            Block,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            length=3,
        )(train)(x, None)
        return x


def pretrained():
    x = jax.random.normal(jax.random.key(1), (5, 3)) + 2.0
    v = Net().init(jax.random.key(0), x, train=False)
    for i in range(3):  # a few BN training steps: non-trivial running statistics
        _, up = Net().apply(v, x * (i + 1), train=True, mutable=["batch_stats"])
        v = {"params": v["params"], "batch_stats": up["batch_stats"]}
    return x, v


def test_every_batchnorm_becomes_a_centered_mabn_under_its_path():
    x, _ = pretrained()
    model = mabn_jax.replace_batchnorm(Net(), buffer_size=4)
    stats = model.init(jax.random.key(0), x, train=True)["batch_stats"]
    assert set(stats) == {"BatchNorm_0", "CheckpointBatchNorm_0", "ScanBlock_0"}
    assert stats["ScanBlock_0"]["BatchNorm_0"]["mean_window"].shape == (3, 4, 4)
    assert stats["BatchNorm_0"]["var_window"].shape == (4, 4)


@pytest.mark.slow
def test_converted_model_equals_batchnorm_model_in_inference_and_trains():
    x, v = pretrained()
    model = mabn_jax.replace_batchnorm(Net(), buffer_size=4, warmup_steps=2, renorm_start=3)
    cv = mabn_jax.convert_batchnorm_variables(model, v, x, train=False)
    a, b = Net().apply(v, x, train=False), model.apply(cv, x, train=False)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * float(jnp.abs(a).max()))
    layer = cv["batch_stats"]["BatchNorm_0"]
    np.testing.assert_array_equal(layer["ema_mean"], v["batch_stats"]["BatchNorm_0"]["mean"])
    assert float(layer["step"]) == 4  # past the batch phase and renorm start

    @jax.jit
    def step(params, bs):
        def loss_fn(p):
            y, up = model.apply(
                {"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"]
            )
            return (y**2).mean(), up

        (loss, up), g = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=bs)(params)
        return jax.tree.map(lambda p, g: p - 0.05 * g, params, g), up["batch_stats"], loss

    params, bs, losses = cv["params"], cv["batch_stats"], []
    for _ in range(5):
        params, bs, loss = step(params, bs)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(bs))


def test_plain_mabn_and_function_changing_overrides_are_refused():
    with pytest.raises(ValueError, match="centered=False"):
        mabn_jax.replace_batchnorm(Net(), centered=False)
    with pytest.raises(TypeError, match="epsilon"):
        mabn_jax.replace_batchnorm(Net(), epsilon=1e-3)


# -- each construction of BatchNorm, separately; the tools on a replaced model ----


class _Stage(nn.Module):
    """One BatchNorm after a Dense, built in one of the ways a model's source may."""

    how: str

    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(4)(x)
        kw = dict(use_running_average=not train, momentum=0.8)
        if self.how == "partial":
            return partial(nn.BatchNorm, epsilon=1e-3, **kw)(name="norm")(x)
        if self.how == "remat":
            return nn.remat(nn.BatchNorm)(**kw, name="norm")(x)
        if self.how == "scan":
            x, _ = nn.scan(
                Block,
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True},
                length=2,
            )(train, name="norm")(x, None)
            return x
        if self.how == "vmap":  # x: [instances, batch, features]
            return nn.vmap(
                nn.BatchNorm,
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True},
                in_axes=0,
                out_axes=0,
            )(**kw, name="norm")(x)
        raise ValueError(self.how)


def _pretrained_stage(how):
    shape = (3, 5, 3) if how == "vmap" else (5, 3)
    x = jax.random.normal(jax.random.key(1), shape) * 2 + 1
    v = _Stage(how).init(jax.random.key(0), x, train=False)
    for i in range(3):
        _, up = _Stage(how).apply(v, x * (i + 1), train=True, mutable=["batch_stats"])
        v = {"params": v["params"], "batch_stats": up["batch_stats"]}
    return x, v


@pytest.mark.parametrize(
    "how,window_shape",
    [("partial", (4, 4)), ("remat", (4, 4)), ("scan", (2, 4, 4)), ("vmap", (3, 4, 4))],
)
def test_each_construction_is_replaced_and_converted_exactly(how, window_shape):
    x, v = _pretrained_stage(how)
    model = mabn_jax.replace_batchnorm(_Stage(how), buffer_size=4)
    stats = model.init(jax.random.key(0), x, train=True)["batch_stats"]["norm"]
    stats = stats.get("BatchNorm_0", stats)  # scan: the Block's BatchNorm
    assert stats["mean_window"].shape == window_shape and "mean" not in stats
    cv = mabn_jax.convert_batchnorm_variables(model, v, x, train=False)
    a, b = _Stage(how).apply(v, x, train=False), model.apply(cv, x, train=False)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * float(jnp.abs(a).max()))


def test_tabulate_fold_params_and_orbax_work_on_a_replaced_model(tmp_path):
    import orbax.checkpoint as ocp

    x, v = _pretrained_stage("partial")
    model = mabn_jax.replace_batchnorm(_Stage("partial"), buffer_size=4)
    cv = mabn_jax.convert_batchnorm_variables(model, v, x, train=False)
    table = model.tabulate(
        jax.random.key(0), x, train=False, console_kwargs={"width": 200, "force_terminal": False}
    )
    # The row of the BatchNorm (its class, as in the source) holds MABN's state.
    assert "mean_window: float32[4,4]" in table and not re.search(r"\bmean: ", table)

    # fold_params: the Dense with its norm folded in computes the converted model.
    folded = mabn_jax.fold_params(model, cv, [("Dense_0", "norm")], x, train=False)
    assert "norm" not in folded
    np.testing.assert_allclose(
        nn.Dense(4).apply({"params": folded["Dense_0"]}, x),
        model.apply(cv, x, train=False),
        rtol=1e-5,
        atol=1e-6,
    )

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", cv)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(
            tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, cv)
        )
    jax.tree.map(np.testing.assert_array_equal, restored, cv)
    np.testing.assert_array_equal(
        model.apply(restored, x, train=False), model.apply(cv, x, train=False)
    )
