"""Flax's ImageNet loop as it stood before Flax moved it to ``in_axes=(None, 0)``
(google/flax e637bb39, Aug 2024), the loop most pmap code still follows: the state
``flax.jax_utils.replicate``d onto the devices, ``jax.pmap(train_step,
axis_name='batch')`` over it, each device's ``batch_stats`` returned as they are
and averaged by ``sync_batch_stats`` before evaluation. Run on 2 CPU devices, with
the unedited ResNet of Flax's ``examples/imagenet/models.py`` (from the installed
Flax's sdist, ``tests/_flax_examples.py``), ResNet18's stages at width 4, 32x32
images, batch 2 per device, 3 steps:

1. ``nn.BatchNorm`` as it is, ``jax.value_and_grad``: the baseline the others must
   match in running;
2. the same model through ``mabn_jax.replace_batchnorm``, built the example's way
   (``create_model``, then ``initialized``, which reads ``model.dtype``), with the
   one documented change of the step (``mabn_jax.value_and_grad``, docs/finetune.md);
3. the same source hand-converted (its ``nn.BatchNorm`` partial made a centered
   ``mabn_jax.MABN`` with the same hyper-parameters): 2. must train exactly as it does.

The example's pmap uses every local device, so the loop is a worker process with
exactly two CPU devices (this file, run as a script, started by tests/launch.py),
compiled with jax_disable_most_optimizations as the example's own train_test.py is.
"""

import functools
import os
import pathlib
import types

import _flax_examples
import imagenet_mabn as train
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import jax_utils
from jax import lax
from launch import TESTS, launch

import mabn_jax

N_DEV, PER_DEV, IMAGE, STEPS = 2, 2, 32, 3
MABN = dict(buffer_size=2, warmup_steps=1, renorm_start=2)  # all phases in 3 steps
ROOT_VAR = "MABN_TEST_FLAX_EXAMPLES"


def test_replaced_model_reads_the_models_attributes():
    """The example's ``initialized`` builds its input with ``model.dtype``: a replaced
    model reads the wrapped model's attributes through (not its methods: ``run``)."""
    import flax.linen as nn

    class Net(nn.Module):
        num_classes: int = 3
        dtype: jnp.dtype = jnp.float16

        @nn.compact
        def __call__(self, x, train: bool = True):
            x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
            return nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)

        def features(self, x):
            return x

    model = mabn_jax.replace_batchnorm(Net(num_classes=4))
    assert (model.dtype, model.num_classes) == (jnp.float16, 4)
    variables = model.init(jax.random.key(0), jnp.ones((2, 5), model.dtype), train=False)
    assert variables["batch_stats"]["BatchNorm_0"]["ema_var"].shape == (4,)
    assert model.name is None and model.parent is None  # the wrapper's own
    for name in ("missing", "features"):
        with pytest.raises(AttributeError, match=f'no attribute "{name}"'):
            getattr(model, name)


@pytest.mark.slow
def test_replaced_model_runs_the_replicated_pmap_loop_as_batchnorm_does(tmp_path):
    try:
        root = _flax_examples.fetch_examples()
    except RuntimeError as err:
        pytest.skip(
            f"Flax's example sources could not be downloaded (needs the package registry): {err}"
        )
    result = launch(
        __file__,
        [{"XLA_FLAGS": f"--xla_force_host_platform_device_count={N_DEV}", ROOT_VAR: str(root)}],
        cwd=str(tmp_path),
        timeout=400,
    )
    assert result.ok, result.report()
    lines = [ln for ln in result.outputs[0].splitlines() if ln.startswith("RESULT")]
    assert len(lines) == 3, result.report()
    print("\n".join(lines))


# -- the worker -----------------------------------------------------------------------


def train_step(state, batch, learning_rate_fn, mabn):
    """The example's train_step of that loop (no DynamicScale: CPU); with ``mabn``
    its one change for a replaced model, ``mabn_jax.value_and_grad``."""

    def loss_fn(params):
        logits, new_model_state = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            mutable=["batch_stats"],
        )
        loss = train.cross_entropy_loss(logits, batch["label"])
        weight_penalty_params = jax.tree_util.tree_leaves(params)
        weight_l2 = sum(jnp.sum(x**2) for x in weight_penalty_params if x.ndim > 1)
        return loss + 0.0001 * 0.5 * weight_l2, (new_model_state, logits)

    lr = learning_rate_fn(state.step)
    if mabn:
        grad_fn = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=state.batch_stats)
    else:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    aux, grads = grad_fn(state.params)
    grads = lax.pmean(grads, axis_name="batch")
    new_model_state, logits = aux[1]
    metrics = train.compute_metrics(logits, batch["label"])
    metrics["learning_rate"] = lr
    new_state = state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"])
    return new_state, metrics


def hand_converted_models(path):
    """Flax's models.py with its one ``nn.BatchNorm`` partial made a centered MABN
    (what a user editing the source writes), executed as a module namespace."""
    source = pathlib.Path(path).read_text()
    assert source.count("nn.BatchNorm,") == 1, "Flax's models.py changed its norm partial"
    namespace = {"HandMABN": functools.partial(mabn_jax.MABN, centered=True, **MABN)}
    exec(compile(source.replace("nn.BatchNorm,", "HandMABN,"), path, "exec"), namespace)
    return types.SimpleNamespace(**namespace)


def renamed(tree):
    """A hand-converted tree's ``MABN_i`` under the ``BatchNorm_i`` names of the
    replaced model (the same layers, named by their class)."""
    if not isinstance(tree, dict):
        return tree
    return {k.replace("MABN_", "BatchNorm_"): renamed(v) for k, v in tree.items()}


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def run(kind, root):
    """The loop: create_train_state, replicate, pmapped steps, sync, evaluate."""
    path = root / _flax_examples.MEMBERS[0]
    models = (hand_converted_models if kind == "hand" else _flax_examples.import_file)(
        *([path] if kind == "hand" else [path, "flax_examples_imagenet_models"])
    )
    model = train.create_model(
        model_cls=functools.partial(models.ResNet18, num_filters=4), half_precision=False
    )
    if kind == "replaced":
        model = mabn_jax.replace_batchnorm(model, **MABN)
    config = train.Config()
    lr_fn = train.create_learning_rate_fn(config, 0.1, steps_per_epoch=1)
    state = train.create_train_state(jax.random.key(0), config, model, IMAGE, lr_fn)
    state = jax_utils.replicate(state)
    p_train_step = jax.pmap(
        functools.partial(train_step, learning_rate_fn=lr_fn, mabn=kind != "bn"),
        axis_name="batch",
    )
    p_eval_step = jax.pmap(train.eval_step, axis_name="batch")
    cross_replica_mean = jax.pmap(lambda x: lax.pmean(x, "x"), "x")

    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.standard_normal((N_DEV, PER_DEV, IMAGE, IMAGE, 3)).astype(np.float32),
            "label": rng.integers(0, train.NUM_CLASSES, (N_DEV, PER_DEV)).astype(np.int32),
        }
        for _ in range(STEPS + 1)
    ]
    losses = []
    for batch in batches[:STEPS]:
        state, metrics = p_train_step(state, batch)
        losses.append(float(host(metrics)["loss"][0]))
    # synchronized statistics (axis_name='batch'): every device holds one state
    for leaf in jax.tree.leaves(host(state)):
        np.testing.assert_array_equal(leaf[0], leaf[1])
    state = state.replace(batch_stats=cross_replica_mean(state.batch_stats))  # sync_batch_stats
    eval_loss = float(host(p_eval_step(state, batches[STEPS]))["loss"][0])
    assert np.isfinite(losses).all() and np.isfinite(eval_loss), (losses, eval_loss)
    return losses, eval_loss, host(jax_utils.unreplicate(state))


if __name__ == "__main__":
    import json

    jax.config.update("jax_disable_most_optimizations", True)
    assert jax.local_device_count() == N_DEV, jax.devices()
    assert mabn_jax.__file__.startswith(os.path.dirname(TESTS)), mabn_jax.__file__
    root = pathlib.Path(os.environ[ROOT_VAR])
    out = {kind: run(kind, root) for kind in ("bn", "replaced", "hand")}
    for kind, (losses, eval_loss, _) in out.items():
        print("RESULT", json.dumps({"model": kind, "losses": losses, "eval_loss": eval_loss}))

    (losses, eval_loss, replaced), (hand_losses, hand_eval, hand) = out["replaced"], out["hand"]
    # The replaced model is the hand-converted one: same loss, variables, optimizer state.
    assert losses == hand_losses and eval_loss == hand_eval, (losses, hand_losses)
    for field in ("params", "batch_stats", "opt_state", "step"):
        want = getattr(hand, field)
        want = renamed(want) if field in ("params", "batch_stats") else want
        if field == "opt_state":  # optax's trace holds params-shaped trees
            want = jax.tree.map(renamed, want, is_leaf=lambda t: isinstance(t, dict))
        got = getattr(replaced, field)
        assert jax.tree.structure(got) == jax.tree.structure(want), field
        jax.tree.map(np.testing.assert_array_equal, got, want)
    assert {int(s) for s in jax.tree.leaves(replaced.batch_stats["bn_init"]["step"])} == {STEPS}
    # Step 1 normalizes by the batch in both (MABN's warm-up), so the loss is BN's.
    np.testing.assert_allclose(losses[0], out["bn"][0][0], rtol=1e-5)
