"""Reproduce trajectories recorded from the authors' original PyTorch MABN2d.

Each file drives one layer for ~1000 steps through every phase (batch
statistics, moving averages, r = 1, r clipped at both ends); see
tests/data/README.md. We drive the Flax module with the probe helpers, with
the step compiled once for the whole trajectory.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_step import layer_step

import mabn_jax

DATA = pathlib.Path(__file__).parent / "data"


def _load(name):
    with np.load(DATA / f"{name}.npz") as f:  # NpzFile decompresses on every access
        d = {k: f[k] for k in f.files}
    return d, json.loads(str(d["config_json"]))


def _module(cfg, dtype):
    return mabn_jax.MABN(
        use_running_average=False,
        momentum=cfg["momentum"],
        epsilon=cfg["eps"],
        buffer_size=cfg["buffer_size"],
        warmup_steps=cfg["warmup_iters"],
        renorm_start=cfg["renorm_start"],
        r_max=cfg["r_max"],
        param_dtype=dtype,
        centered=False,
    )


def _run(name, dtype, reshape=None):
    """Runs the golden trajectory; yields (step index, ours, golden) per step."""
    d, cfg = _load(name)
    shape = reshape or d["x"].shape[1:]
    mod = _module(cfg, dtype)
    variables = mod.init(jax.random.key(0), jnp.zeros(shape, dtype))
    params = {"scale": jnp.asarray(d["weight"], dtype), "bias": jnp.asarray(d["bias"], dtype)}
    batch_stats = variables["batch_stats"]

    step = layer_step(mod)

    results = []
    for i in range(cfg["T"]):
        x = jnp.asarray(d["x"][i].reshape(shape), dtype)
        dy = jnp.asarray(d["dy"][i].reshape(shape), dtype)
        y, dx, g, batch_stats = step(params, batch_stats, x, dy)
        ours = {
            "y": y,
            "dx": dx,
            "dweight": g["scale"],
            "dbias": g["bias"],
            "running_var": batch_stats["ema_x2"],
            "buffer_x2": batch_stats["x2_window"],
            "buffer_gz": batch_stats["psi_window"],
            "step": batch_stats["step"],
        }
        results.append(jax.device_get(ours))
    assert step._cache_size() == 1, "the train step must compile once for every phase"
    return d, cfg, results


KEYS = ["y", "dx", "dweight", "dbias", "running_var", "buffer_x2", "buffer_gz"]
CASES = [("public_conv", None), ("public_dense", None), ("public_dense", (3, 5))]


def assert_float64_trajectory(name, d, results):
    """Every recorded quantity at every step to <= 1e-9 relative, elementwise."""
    for i, ours in enumerate(results):
        assert int(ours["step"]) == i + 1
        for k in KEYS:
            ref = d[k][i]
            np.testing.assert_allclose(
                ours[k].reshape(ref.shape),
                ref,
                rtol=1e-9,
                atol=0,
                err_msg=f"{name} step t={i + 1} {k}",
            )


@pytest.mark.parametrize("name,reshape", CASES)
def test_golden_float64(name, reshape):
    """Every recorded quantity at every step to <= 1e-9 relative, elementwise."""
    with jax.enable_x64(True):
        d, cfg, results = _run(name, jnp.float64, reshape)
    assert_float64_trajectory(name, d, results)


@pytest.mark.parametrize("name,reshape", CASES[:2])
def test_golden_float32(name, reshape):
    """In float32, <= 1e-4 relative per step (norm-relative).

    Elementwise relative error is meaningless for entries that cancel to ~0
    (y = γ·r·z + β crosses zero), so each step's array is compared by
    ||ours − ref|| / ||ref||.
    """
    d, cfg, results = _run(name, jnp.float32, reshape)
    worst = {k: 0.0 for k in KEYS}
    for i, ours in enumerate(results):
        for k in KEYS:
            ref = d[k][i]
            err = np.linalg.norm(ours[k].reshape(ref.shape) - ref) / np.linalg.norm(ref)
            worst[k] = max(worst[k], err)
    assert max(worst.values()) <= 1e-4, worst


def test_golden_covers_every_phase():
    """The trajectories really exercise batch, window, r = 1 and both clips."""
    for name in ("public_conv", "public_dense"):
        d, cfg = _load(name)
        m, warm, start = cfg["buffer_size"], cfg["warmup_iters"], cfg["renorm_start"]
        assert cfg["T"] > max(start, warm) > m
        # r after renorm start, from the recorded EMA and windows.
        t = np.arange(1, cfg["T"] + 1)
        x2_used = d["buffer_x2"].mean(1)
        ema_before = np.concatenate([np.ones((1, d["weight"].size)), d["running_var"][:-1]])
        r = np.sqrt(x2_used + cfg["eps"]) / np.sqrt(ema_before + cfg["eps"])
        late = t > max(start, warm)
        assert (r[late] > cfg["r_max"]).any() and (r[late] < 1 / cfg["r_max"]).any(), name
