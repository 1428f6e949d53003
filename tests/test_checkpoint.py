"""Checkpoint and resume with orbax: a run restored in a fresh process
continues bitwise identically, and a checkpoint of another layout is refused.

The resumed runs execute this file as a script in a subprocess (``resume``).
"""

import os
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state
from subprocess_env import PACKAGE_FILE, env_with_this_mabn_jax

import mabn_jax

T = 12
# buffer_size=3, warmup_steps=4, renorm_start=7: step 2 is in warm-up, step 5
# in the window phase (r = 1), step 9 after renormalization started.
SAVE_AT = (2, 5, 9)


class Net(nn.Module):
    buffer_size: int = 3

    @nn.compact
    def __call__(self, x, train):
        x = mabn_jax.CenteredDense(8)(x)
        x = mabn_jax.MABN(
            use_running_average=not train,
            buffer_size=self.buffer_size,
            warmup_steps=4,
            renorm_start=7,
            centered=False,
        )(x)
        x = mabn_jax.MABN(
            use_running_average=not train,
            buffer_size=self.buffer_size,
            warmup_steps=4,
            renorm_start=7,
            centered=True,
        )(nn.relu(x))
        return nn.Dense(3)(x)


class TrainState(train_state.TrainState):
    batch_stats: Any


def data():
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(T, 4, 6)).astype(np.float32) * np.linspace(1, 3, T)[:, None, None]
    ys = rng.integers(0, 3, size=(T, 4))
    return xs, ys


def create(buffer_size=3):
    model = Net(buffer_size)
    init = jax.jit(model.init, static_argnames="train")  # one compile beats op-by-op
    variables = init(jax.random.PRNGKey(0), jnp.zeros((4, 6)), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.adam(1e-2),
        batch_stats=variables["batch_stats"],
    )


@jax.jit
def train_step(state, x, y):
    """The nn.BatchNorm train step with mabn_jax.value_and_grad."""

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    (loss, updates), grads = mabn_jax.value_and_grad(
        loss_fn, has_aux=True, batch_stats=state.batch_stats
    )(state.params)
    state = state.apply_gradients(grads=grads)
    state = state.replace(batch_stats=updates["batch_stats"])
    return state, loss


def train(state, until, ckpt_dir=None):
    """Runs to step ``until``; saves at SAVE_AT when given a directory."""
    xs, ys = data()
    losses = []
    while int(state.step) < until:
        state, loss = train_step(state, xs[int(state.step)], ys[int(state.step)])
        losses.append(np.asarray(loss))
        if ckpt_dir is not None and int(state.step) in SAVE_AT:
            save(os.path.join(ckpt_dir, str(int(state.step))), state)
    return state, np.stack(losses)


def save(path, tree):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)


def restore(path, like):
    stored = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    mabn_jax.check_batch_stats(stored["batch_stats"], like.batch_stats)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, like)


def zero_state(buffer_size=3):
    """A state of the right layout whose values do not matter (fast: no init)."""
    return jax.tree_util.tree_map(
        lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(lambda: create(buffer_size))
    )


def leaves(state):
    return [
        np.asarray(v)
        for v in jax.tree_util.tree_leaves(
            (state.step, state.params, state.opt_state, state.batch_stats)
        )
    ]


def resume_main(ckpt_dir, out):
    """Fresh process: restore every checkpoint and train on to step T."""
    results = {}
    like = jax.eval_shape(create)  # shapes and dtypes only: nothing is computed
    for s in SAVE_AT:
        state = restore(os.path.join(ckpt_dir, str(s)), like)
        assert int(state.step) == s
        state, losses = train(state, T)
        results[f"{s}/losses"] = losses
        for i, leaf in enumerate(leaves(state)):
            results[f"{s}/leaf{i}"] = leaf
    np.savez(out, package=os.path.abspath(mabn_jax.__file__), **results)


def test_resume_in_fresh_process_is_bitwise_identical(tmp_path):
    ckpt_dir = str(tmp_path / "ckpt")
    final, losses = train(create(), T, ckpt_dir)
    skipped = [int(layer["skipped"]) for layer in final.batch_stats.values()]
    assert skipped == [0, 0]
    out = str(tmp_path / "resumed.npz")
    # Same environment, hence the same backend, as this process, and the same mabn_jax.
    subprocess.run(
        [sys.executable, __file__, "resume", ckpt_dir, out],
        check=True,
        env=env_with_this_mabn_jax(),
    )
    resumed = np.load(out)
    assert str(resumed["package"]) == PACKAGE_FILE
    want = leaves(final)
    for s in SAVE_AT:
        assert resumed[f"{s}/losses"].tobytes() == losses[s:].tobytes(), s
        for i, leaf in enumerate(want):
            got = resumed[f"{s}/leaf{i}"]
            assert got.dtype == leaf.dtype and got.tobytes() == leaf.tobytes(), (s, i)


def test_checkpoint_of_other_buffer_size_is_refused(tmp_path):
    path = str(tmp_path / "m4")
    save(path, zero_state(buffer_size=4))
    with pytest.raises(
        ValueError,
        match=r"MABN_0 was saved with buffer_size=4 but the model "
        r"has buffer_size=3; build the model with buffer_size=4",
    ):
        restore(path, jax.eval_shape(create))


def test_checkpoint_without_skip_counter_is_refused(tmp_path):
    path = str(tmp_path / "old")
    state = zero_state()
    old = {
        name: {k: v for k, v in layer.items() if k != "skipped"}
        for name, layer in state.batch_stats.items()
    }
    save(path, state.replace(batch_stats=old))
    with pytest.raises(
        ValueError,
        match=r"MABN_0 lacks 'skipped': it was written by a mabn_jax "
        r"without the non-finite skip counter",
    ):
        restore(path, jax.eval_shape(create))


def test_checkpoint_of_other_variant_is_refused(tmp_path):
    state = jax.eval_shape(create)
    swapped = {"MABN_0": state.batch_stats["MABN_1"], "MABN_1": state.batch_stats["MABN_0"]}
    with pytest.raises(
        ValueError,
        match=r"MABN_0 was saved from a centered=True layer but "
        r"this layer has centered=False; build the model "
        r"with the same `centered`",
    ):
        mabn_jax.check_batch_stats(swapped, state.batch_stats)


COUNTERS = ("step", "skipped")


def with_counters(batch_stats, dtype, skipped):
    """``batch_stats`` with every MABN layer's counters in ``dtype`` and
    ``skipped`` set (so that a lost value would show)."""
    return {
        name: {
            k: (jnp.asarray(skipped if k == "skipped" else v, dtype) if k in COUNTERS else v)
            for k, v in layer.items()
        }
        for name, layer in batch_stats.items()
    }


def test_checkpoint_with_int32_counters_of_mabn_jax_0_1_resumes(tmp_path):
    # mabn_jax 0.1 stored `step` and `skipped` as int32 scalars; since 0.2 they
    # are floats. Such a checkpoint passes check_batch_stats, restores into
    # float counters of the same values, and the run goes on bitwise as if it
    # had been saved by this version.
    s = SAVE_AT[1]
    state, _ = train(create(), s)
    state = state.replace(batch_stats=with_counters(state.batch_stats, jnp.float32, 2))
    path = str(tmp_path / "v0.1")
    save(path, state.replace(batch_stats=with_counters(state.batch_stats, jnp.int32, 2)))
    stored = ocp.StandardCheckpointer().metadata(path).item_metadata.tree["batch_stats"]
    assert {str(np.dtype(stored[name][k].dtype)) for name in stored for k in COUNTERS} == {
        "int32"
    }  # the checkpoint really has 0.1's counters

    restored = restore(path, jax.eval_shape(create))
    for name, layer in restored.batch_stats.items():
        assert layer["step"].dtype == layer["skipped"].dtype == jnp.float32, name
        assert (float(layer["step"]), float(layer["skipped"])) == (s, 2.0), name
    for i, (got, want) in enumerate(zip(leaves(restored), leaves(state))):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), i
    resumed, resumed_losses = train(restored, T)
    final, losses = train(state, T)
    assert resumed_losses.tobytes() == losses.tobytes()
    for i, (got, want) in enumerate(zip(leaves(resumed), leaves(final))):
        assert got.tobytes() == want.tobytes(), i
    assert [int(layer["skipped"]) for layer in resumed.batch_stats.values()] == [2, 2]


def test_only_the_counters_may_be_int32():
    # The int32 → float allowance is for 0.1's counters alone: any other
    # statistic of another dtype is still refused, by its path.
    like = jax.eval_shape(create).batch_stats
    stored = {name: dict(layer) for name, layer in like.items()}
    stored["MABN_0"]["ema_x2"] = jax.ShapeDtypeStruct(like["MABN_0"]["ema_x2"].shape, jnp.int32)
    with pytest.raises(
        ValueError,
        match=r"batch_stats/MABN_0/ema_x2 has dtype int32 in the "
        r"checkpoint but float32 in the model",
    ):
        mabn_jax.check_batch_stats(stored, like)
    # Nor are counters of another float dtype 0.1's.
    stored = {name: dict(layer) for name, layer in like.items()}
    stored["MABN_1"]["skipped"] = jax.ShapeDtypeStruct((), jnp.float16)
    with pytest.raises(
        ValueError,
        match=r"MABN_1/skipped has dtype float16 in the "
        r"checkpoint but float32",
    ):
        mabn_jax.check_batch_stats(stored, like)


def test_orbax_alone_also_refuses_a_shape_change(tmp_path):
    # Without check_batch_stats, orbax's strict restore still does not pad or
    # truncate the windows (the message is orbax's, in shapes only).
    path = str(tmp_path / "m4")
    save(path, zero_state(buffer_size=4))
    with (
        pytest.raises(ValueError, match=r"not compatible with the stored shape"),
        ocp.StandardCheckpointer() as ckptr,
    ):
        ckptr.restore(path, jax.eval_shape(create))


if __name__ == "__main__" and sys.argv[1] == "resume":
    resume_main(sys.argv[2], sys.argv[3])
