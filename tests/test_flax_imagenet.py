"""Flax's ImageNet example, converted to MABN by the documented changes only
(tests/imagenet_mabn.py, docs/flax_imagenet.md), trains under its own pmap
(state in unreplicated, ``in_axes=(None, 0), out_axes=(None, 0)``, batch_stats
pmean'ed every step) on two simulated devices, with and without its
DynamicScale branch, evaluates, and checkpoints with its own
save_checkpoint / restore_checkpoint (flax.training.checkpoints on orbax).

The example's pmap and its save_checkpoint use every local device, so the run
is a worker process with exactly two CPU devices (this file, run as a script,
started by tests/launch.py); like the example's own train_test.py it compiles
with jax_disable_most_optimizations.
"""

import functools

import imagenet_mabn as train
import jax
import numpy as np
import pytest
from flax.training.dynamic_scale import DynamicScale
from launch import TESTS, launch

import mabn_jax

N_DEV, PER_DEV, IMAGE, STEPS = 2, 2, 16, 5


def setup(half_precision):
    config = train.Config(half_precision=half_precision)
    model = train.create_model(model_cls=train._TinyResNet, half_precision=half_precision)
    lr_fn = train.create_learning_rate_fn(config, 0.1, steps_per_epoch=1)

    def create():
        state = train.create_train_state(jax.random.key(0), config, model, IMAGE, lr_fn)
        if half_precision:  # the example makes one on GPU only
            state = state.replace(dynamic_scale=DynamicScale())
        # As NumPy values (no weak types, unlike TrainState.create's step=0), like
        # what restore_checkpoint returns: the first, later and resumed steps share
        # one compilation.
        return jax.tree.map(np.asarray, state)

    p_train_step = jax.pmap(
        functools.partial(train.train_step, learning_rate_fn=lr_fn),
        axis_name="batch",
        in_axes=(None, 0),
        out_axes=(None, 0),
    )
    p_eval_step = jax.pmap(train.eval_step, axis_name="batch", in_axes=(None, 0))
    return model, create, p_train_step, p_eval_step


def batch(model, seed):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((N_DEV, PER_DEV, IMAGE, IMAGE, 3)).astype(model.dtype)
    label = rng.integers(0, train.NUM_CLASSES, (N_DEV, PER_DEV)).astype(np.int32)
    return {"image": image, "label": label}


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def layers(batch_stats):
    """Every MABN layer's state (path -> leaves), at any depth."""
    flat = jax.tree_util.tree_flatten_with_path(batch_stats)[0]
    out = {}
    for path, leaf in flat:
        out.setdefault(jax.tree_util.keystr(path[:-1]), {})[path[-1].key] = leaf
    return out


def run(half_precision, workdir):
    """Trains STEPS steps, evaluates, saves, restores and resumes; returns a summary."""
    model, create, p_train_step, p_eval_step = setup(half_precision)
    state = initial = create()
    assert len(layers(state.batch_stats)) == 6  # bn_init, 2 blocks x 2, norm_proj
    finite, scale = 0, float(state.dynamic_scale.scale) if half_precision else None
    for t in range(STEPS):
        before = host(state.params)
        state, metrics = p_train_step(state, batch(model, t))
        metrics = host(metrics)
        moved = any(
            np.any(a != b)
            for a, b in zip(jax.tree.leaves(host(state.params)), jax.tree.leaves(before))
        )
        print(
            f"step {t + 1}: loss {metrics['loss'][0]:.4f} scale "
            f"{metrics.get('scale', [None])[0]} params moved {moved}",
            flush=True,
        )
        assert np.isfinite(metrics["loss"]).all()
        # DynamicScale skips a step whose gradients overflowed, halving the scale
        skipped = half_precision and float(metrics["scale"][0]) < scale
        if half_precision:
            scale = float(metrics["scale"][0])
        # The optimizer's schedule counts the steps taken and warms up from 0.
        assert moved == (not skipped and finite > 0)
        finite += not skipped
    assert finite >= 3
    if half_precision:
        assert float(state.dynamic_scale.scale) <= 65536.0
    for path, layer in layers(host(state.batch_stats)).items():
        # pmean'ed counters stay whole; a layer skips a step whose Ψ overflowed
        assert layer["step"] + layer["skipped"] == STEPS, path
        assert layer["step"] > 3, path  # renormalization started (renorm_start=3)
        assert all(np.isfinite(v).all() for v in layer.values()), path
    eval_metrics = host(p_eval_step(state, batch(model, 99)))
    assert np.isfinite(eval_metrics["loss"]).all()

    train.save_checkpoint(state, workdir)
    restored = train.restore_checkpoint(initial, workdir)  # as the example does
    mabn_jax.check_batch_stats(restored.batch_stats, initial.batch_stats)
    assert int(restored.step) == STEPS
    for a, b in zip(jax.tree.leaves(host(restored)), jax.tree.leaves(host(state))):
        np.testing.assert_array_equal(a, b)
    # Restoring takes dtypes from the target; DynamicScale() starts with Python
    # scalars (restored as NumPy ones), everything else keeps its dtype.
    for a, b in zip(
        *(jax.tree.leaves(host((s.params, s.opt_state, s.batch_stats))) for s in (restored, state))
    ):
        assert a.dtype == b.dtype
    # Resumed and uninterrupted runs take the same next step, bit for bit.
    nxt = batch(model, STEPS)
    (a, ma), (b, mb) = host(p_train_step(restored, nxt)), host(p_train_step(state, nxt))
    for x, y in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((b, mb))):
        np.testing.assert_array_equal(x, y)
    return {
        "finite_steps": finite,
        "loss": [float(metrics["loss"][0])],
        "scale": float(state.dynamic_scale.scale) if half_precision else None,
        "mabn_steps": sorted({int(v["step"]) for v in layers(host(state.batch_stats)).values()}),
    }


@pytest.mark.slow
def test_converted_imagenet_example_trains_evaluates_and_resumes(tmp_path):
    result = launch(
        __file__,
        [{"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}],
        cwd=str(tmp_path),
        timeout=300,
    )
    assert result.ok, result.report()
    lines = [ln for ln in result.outputs[0].splitlines() if ln.startswith("RESULT")]
    assert len(lines) == 2, result.report()
    print("\n".join(lines))


if __name__ == "__main__":
    import json
    import os
    import time

    jax.config.update("jax_disable_most_optimizations", True)
    assert jax.local_device_count() == N_DEV, jax.devices()
    assert mabn_jax.__file__.startswith(os.path.dirname(TESTS)), mabn_jax.__file__
    for half in (False, True):
        t0 = time.time()
        summary = run(half, os.path.join(os.getcwd(), f"ckpt_{'f16' if half else 'f32'}"))
        print(
            "RESULT",
            json.dumps({"half_precision": half, **summary, "seconds": round(time.time() - t0, 1)}),
            flush=True,
        )
