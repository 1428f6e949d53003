"""The NNX layer reproduces the authors' PyTorch MABN trajectories (see test_golden.py).

Same recordings, same tolerance as the linen layer: every recorded quantity at
every step to <= 1e-9 relative in float64, with one compilation of the
``nnx.jit`` train step for the whole trajectory (every phase is traced data).
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from test_golden import CASES, _load, assert_float64_trajectory

import mabn_jax.nnx as mnnx


def _layer(cfg, features):
    return mnnx.MABN(
        features,
        momentum=cfg["momentum"],
        epsilon=cfg["eps"],
        buffer_size=cfg["buffer_size"],
        warmup_steps=cfg["warmup_iters"],
        renorm_start=cfg["renorm_start"],
        r_max=cfg["r_max"],
        param_dtype=jnp.float64,
        rngs=nnx.Rngs(0),
        centered=False,
    )


@nnx.jit
def _step(layer, x, dy):
    def loss_fn(layer, x):
        y = layer(x)
        return jnp.sum(y * dy), y

    (_, y), (grads, dx) = mnnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(layer, x)
    return y, dx, grads


def _run(name, reshape):
    d, cfg = _load(name)
    shape = reshape or d["x"].shape[1:]
    layer = _layer(cfg, shape[-1])
    layer.scale[...] = jnp.asarray(d["weight"], jnp.float64)
    layer.bias[...] = jnp.asarray(d["bias"], jnp.float64)
    before = _step.jitted_fn._cache_size()
    results = []
    for i in range(cfg["T"]):
        x = jnp.asarray(d["x"][i].reshape(shape), jnp.float64)
        dy = jnp.asarray(d["dy"][i].reshape(shape), jnp.float64)
        y, dx, grads = _step(layer, x, dy)
        results.append(
            jax.device_get(
                {
                    "y": y,
                    "dx": dx,
                    "dweight": grads["scale"][...],
                    "dbias": grads["bias"][...],
                    "running_var": layer.ema_x2[...],
                    "buffer_x2": layer.x2_window[...],
                    "buffer_gz": layer.psi_window[...],
                    "step": layer.step[...],
                }
            )
        )
    compiled = _step.jitted_fn._cache_size() - before
    return d, results, compiled


@pytest.mark.parametrize(
    "name,reshape", [CASES[0]] + [pytest.param(*case, marks=pytest.mark.slow) for case in CASES[1:]]
)
def test_nnx_golden_float64(name, reshape):
    with jax.enable_x64(True):
        d, results, compiled = _run(name, reshape)
    assert compiled == 1, "the nnx.jit step must compile once for every phase"
    assert_float64_trajectory(name, d, results)
