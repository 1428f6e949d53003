"""Data-parallel training with 2 images per device on 8 simulated CPU devices.

Compares, on the bundled scikit-learn digits (8x8 images, 10 classes), a small
CNN normalized four ways, each trained with the same ``pmap`` train step
(per-device mean loss, ``pmean`` of the gradients) at a global batch of 16:

* ``nn.BatchNorm`` per device: batch statistics of 2 images;
* ``nn.BatchNorm`` synchronized (``axis_name``): SyncBN over 16 images;
* MABN per device (the default, the paper's setting): moving averages over
  ``buffer_size = 16 / 2 = 8`` steps of 2-image statistics;
* MABN synchronized (``axis_name``): moving averages of 16-image statistics.

MABN follows weight-centralized convolutions (``CenteredConv``); BatchNorm
follows plain ones. At evaluation every model uses its running statistics,
averaged over the devices. Run::

    python examples/data_parallel.py            # ~1-2 minutes on 2 CPU cores
    python examples/data_parallel.py --quick    # a smoke test: 1 seed, 20 steps

"train loss" is the mean training-mode loss over the last 10% of the steps.
"""

import os

# Eight CPU devices; must be set before JAX is imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax import lax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import mabn_jax  # noqa: E402

N_DEV, PER_DEV = 8, 2
AXIS = "batch"


class CNN(nn.Module):
    norm: str  # "bn" or "mabn"
    sync: bool

    @nn.compact
    def __call__(self, x, train: bool):
        axis_name = AXIS if self.sync else None
        if self.norm == "bn":
            conv = nn.Conv
            # Two-pass variance, as careful at 2 examples per device; the same
            # momentum (decay) 0.98 as MABN, i.e. PyTorch's momentum=0.02.
            norm = functools.partial(
                nn.BatchNorm,
                use_running_average=not train,
                momentum=0.98,
                use_fast_variance=False,
                axis_name=axis_name,
            )
        else:
            conv = mabn_jax.CenteredConv
            norm = functools.partial(
                mabn_jax.MABN,
                use_running_average=not train,
                centered=False,  # the paper's layer, after CenteredConv
                axis_name=axis_name,
                buffer_size=16 // PER_DEV,
                warmup_steps=100,
                renorm_start=300,
            )
        x = nn.relu(norm()(conv(16, (3, 3), use_bias=False)(x)))
        x = nn.relu(norm()(conv(32, (3, 3), strides=2, use_bias=False)(x)))
        x = nn.relu(norm()(conv(32, (3, 3), strides=2, use_bias=False)(x)))
        return nn.Dense(10)(x.mean((1, 2)))


def make_train_step(model, tx):
    """The same pmap train step for both norms: mabn_jax.value_and_grad records
    MABN's backward statistics (this device's Ψ_B, or the synchronized one with
    axis_name) into new_bs, and is jax.value_and_grad for nn.BatchNorm."""

    def step(params, opt_state, batch_stats, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (loss, new_bs), grads = mabn_jax.value_and_grad(
            loss_fn, has_aux=True, batch_stats=batch_stats
        )(params)
        grads = lax.pmean(grads, AXIS)  # only the parameter gradients are averaged
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, new_bs, lax.pmean(loss, AXIS))

    return jax.pmap(step, axis_name=AXIS)


def replicate(tree):
    return jax.tree.map(lambda a: np.broadcast_to(a, (N_DEV,) + np.shape(a)), jax.device_get(tree))


def device_average(batch_stats):
    """Evaluation statistics: the devices' running statistics, averaged."""
    return jax.tree.map(
        lambda a: a[0] if np.issubdtype(a.dtype, np.integer) else a.mean(0),
        jax.device_get(batch_stats),
    )


def run(norm, sync, data, steps, seed):
    x_train, y_train, x_test, y_test = data
    model = CNN(norm=norm, sync=sync)
    variables = jax.jit(functools.partial(model.init, train=True))(
        jax.random.PRNGKey(seed), x_train[:PER_DEV]
    )
    tx = optax.sgd(optax.cosine_decay_schedule(0.1, steps), momentum=0.9)
    params, batch_stats = variables["params"], variables["batch_stats"]
    params, opt_state = replicate(params), replicate(tx.init(params))
    batch_stats = replicate(batch_stats)
    step = make_train_step(model, tx)
    rng = np.random.default_rng(seed)
    global_batch = N_DEV * PER_DEV
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(x_train), global_batch, replace=False)
        xb = x_train[idx].reshape(N_DEV, PER_DEV, *x_train.shape[1:])
        yb = y_train[idx].reshape(N_DEV, PER_DEV)
        params, opt_state, batch_stats, loss = step(params, opt_state, batch_stats, xb, yb)
        # float() waits for the step: one step in flight at a time, because the
        # simulated CPU devices share a small thread pool, and queued steps can
        # starve a collective of its participants (XLA then aborts).
        losses.append(float(loss[0]))
    params = jax.tree.map(lambda a: a[0], jax.device_get(params))
    logits = jax.jit(functools.partial(model.apply, train=False))(
        {"params": params, "batch_stats": device_average(batch_stats)}, x_test
    )
    tail = np.mean(losses[-max(1, steps // 10) :])  # train-mode loss, last 10% of steps
    return tail, float((np.asarray(logits).argmax(-1) == y_test).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1 seed, 20 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = 20, 1
    assert jax.device_count() == N_DEV, jax.devices()

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # NHWC
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype(np.int32), test_size=0.25, random_state=0
    )
    data = (x_train, y_train, x_test, y_test)

    print(
        f"digits, {N_DEV} CPU devices x batch {PER_DEV} (global batch {N_DEV * PER_DEV}), "
        f"{args.steps} steps, test accuracy over {args.seeds} seeds"
    )
    print(f"{'normalization':<34}{'train loss':>12}{'test accuracy (per seed)':>38}")
    for norm, sync, label in [
        ("bn", False, "nn.BatchNorm per device (2)"),
        ("bn", True, "nn.BatchNorm synchronized (16)"),
        ("mabn", False, "MABN per device (2), m=8"),
        ("mabn", True, "MABN synchronized (16), m=8"),
    ]:
        start = time.time()
        results = [run(norm, sync, data, args.steps, seed) for seed in range(args.seeds)]
        losses, accs = np.array(results).T
        print(
            f"{label:<34}{losses.mean():>12.3f}"
            f"{accs.mean():>14.4f}  ({' '.join(f'{a:.4f}' for a in accs)})"
            f"   [{time.time() - start:.0f}s]"
        )


if __name__ == "__main__":
    main()
