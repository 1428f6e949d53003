"""Flax's ImageNet example converted to MABN, trimmed to what the tests need.

Adapted from google/flax examples/imagenet/models.py and train.py (commit
18f8f311, flax 0.12.8; Copyright The Flax Authors, Apache License 2.0). The
structure (ResNet, ResNetBlock, create_model, initialized, train_step,
eval_step, TrainState, create_train_state, save/restore_checkpoint) is
theirs; the data pipeline, logging, profiling and the training loop are
left out (the tests drive the steps on random data). The MABN changes are
marked ``# MABN:`` and listed in docs/flax_imagenet.md.
"""

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import linen as nn
from flax.training import checkpoints, common_utils, train_state
from flax.training import dynamic_scale as dynamic_scale_lib
from jax import lax

import mabn_jax  # MABN

ModuleDef = Any
NUM_CLASSES = 10  # trimmed: 1000 in the example

# --- models.py -------------------------------------------------------------------


class ResNetBlock(nn.Module):
    """ResNet block."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)

        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)

        return self.act(residual + y)


class ResNet(nn.Module):
    """ResNetV1.5."""

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32
    act: Callable = nn.relu
    conv: ModuleDef = mabn_jax.CenteredConv  # MABN: nn.Conv -> CenteredConv (plain MABN)

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = partial(
            mabn_jax.MABN,  # MABN: nn.BatchNorm -> mabn_jax.MABN
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            axis_name="batch",
            # MABN: a schedule for a few test steps (the defaults are the paper's
            # ImageNet ones: buffer_size=16, warmup_steps=100, renorm_start=1000).
            buffer_size=2,
            warmup_steps=2,
            renorm_start=3,
        )

        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(
                    self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        x = jnp.asarray(x, self.dtype)
        return x


# Used for testing only. The example's _ResNet1 is stage_sizes=[1] with 64
# filters; two stages of 8 give a projection shortcut (norm_proj) too.
_TinyResNet = partial(ResNet, stage_sizes=[1, 1], block_cls=ResNetBlock, num_filters=8)

# --- train.py ----------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    """The fields of configs/default.py that the kept functions read."""

    learning_rate: float = 0.1
    warmup_epochs: float = 5.0
    momentum: float = 0.9
    num_epochs: float = 100.0
    half_precision: bool = False


def create_model(*, model_cls, half_precision, **kwargs):
    platform = jax.local_devices()[0].platform
    if half_precision:
        model_dtype = jnp.bfloat16 if platform == "tpu" else jnp.float16
    else:
        model_dtype = jnp.float32
    return model_cls(num_classes=NUM_CLASSES, dtype=model_dtype, **kwargs)


def initialized(key, image_size, model):
    input_shape = (1, image_size, image_size, 3)

    @jax.jit
    def init(*args):
        return model.init(*args)

    variables = init({"params": key}, jnp.ones(input_shape, model.dtype))
    return variables["params"], variables["batch_stats"]


def cross_entropy_loss(logits, labels):
    one_hot_labels = common_utils.onehot(labels, num_classes=NUM_CLASSES)
    xentropy = optax.softmax_cross_entropy(logits=logits, labels=one_hot_labels)
    return jnp.mean(xentropy)


def compute_metrics(logits, labels):
    loss = cross_entropy_loss(logits, labels)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    metrics = {"loss": loss, "accuracy": accuracy}
    return lax.pmean(metrics, axis_name="batch")


def create_learning_rate_fn(config: Config, base_learning_rate: float, steps_per_epoch: int):
    """Create learning rate schedule."""
    warmup_fn = optax.linear_schedule(
        init_value=0.0,
        end_value=base_learning_rate,
        transition_steps=config.warmup_epochs * steps_per_epoch,
    )
    cosine_epochs = max(config.num_epochs - config.warmup_epochs, 1)
    cosine_fn = optax.cosine_decay_schedule(
        init_value=base_learning_rate, decay_steps=cosine_epochs * steps_per_epoch
    )
    return optax.join_schedules(
        schedules=[warmup_fn, cosine_fn], boundaries=[config.warmup_epochs * steps_per_epoch]
    )


def train_step(state, batch, learning_rate_fn):
    """Perform a single training step."""

    def loss_fn(params):
        """loss function used for training."""
        logits, new_model_state = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            mutable=["batch_stats"],
        )
        loss = cross_entropy_loss(logits, batch["label"])
        weight_penalty_params = jax.tree_util.tree_leaves(params)
        weight_decay = 0.0001
        weight_l2 = sum(jnp.sum(x**2) for x in weight_penalty_params if x.ndim > 1)
        weight_penalty = weight_decay * 0.5 * weight_l2
        loss = loss + weight_penalty
        return loss, (new_model_state, logits)

    step = state.step
    dynamic_scale = state.dynamic_scale
    lr = learning_rate_fn(step)

    if dynamic_scale:
        grad_fn = mabn_jax.value_and_grad(  # MABN: was dynamic_scale.value_and_grad(
            loss_fn,
            has_aux=True,
            axis_name="batch",
            batch_stats=state.batch_stats,
            dynamic_scale=dynamic_scale,
        )  # MABN: added
        dynamic_scale, is_fin, aux, grads = grad_fn(state.params)
        # dynamic loss takes care of averaging gradients across replicas
    else:
        grad_fn = mabn_jax.value_and_grad(  # MABN: was jax.value_and_grad(
            loss_fn, has_aux=True, batch_stats=state.batch_stats
        )  # MABN: batch_stats added
        aux, grads = grad_fn(state.params)
        # Re-use same axis_name as in the call to `pmap(...train_step...)` below.
        grads = lax.pmean(grads, axis_name="batch")
    new_model_state, logits = aux[1]
    metrics = compute_metrics(logits, batch["label"])
    metrics["learning_rate"] = lr

    new_state = state.apply_gradients(
        grads=grads,
        batch_stats=lax.pmean(new_model_state["batch_stats"], "batch"),
    )
    if dynamic_scale:
        # if is_fin == False the gradients contain Inf/NaNs and optimizer state and
        # params should be restored (= skip this step).
        new_state = new_state.replace(
            opt_state=jax.tree_util.tree_map(
                partial(jnp.where, is_fin), new_state.opt_state, state.opt_state
            ),
            params=jax.tree_util.tree_map(
                partial(jnp.where, is_fin), new_state.params, state.params
            ),
            dynamic_scale=dynamic_scale,
        )
        metrics["scale"] = dynamic_scale.scale

    return new_state, metrics


def eval_step(state, batch):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, batch["image"], train=False, mutable=False)
    return compute_metrics(logits, batch["label"])


class TrainState(train_state.TrainState):
    batch_stats: Any
    dynamic_scale: dynamic_scale_lib.DynamicScale


def restore_checkpoint(state, workdir):
    return checkpoints.restore_checkpoint(workdir, state)


def save_checkpoint(state, workdir):
    step = int(state.step)
    # Orbax can not handle host local arrays from pmap. Convert to global arrays.
    replicated_state = jax.tree_util.tree_map(
        ocp.utils.fully_replicated_host_local_array_to_global_array, state
    )
    checkpoints.save_checkpoint_multiprocess(workdir, replicated_state, step, keep=3)


def create_train_state(rng, config: Config, model, image_size, learning_rate_fn):
    """Create initial training state."""
    dynamic_scale = None
    platform = jax.local_devices()[0].platform
    if config.half_precision and platform == "gpu":
        dynamic_scale = dynamic_scale_lib.DynamicScale()

    params, batch_stats = initialized(rng, image_size, model)
    tx = optax.sgd(learning_rate=learning_rate_fn, momentum=config.momentum, nesterov=True)
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        batch_stats=batch_stats,
        dynamic_scale=dynamic_scale,
    )
