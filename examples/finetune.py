"""Fine-tuning a pretrained BatchNorm ResNet at batch 1 and 2: BN trainable,
BN frozen, GroupNorm, or MABN through the converter (docs/finetune.md).

The setting MABN is for in practice: a backbone pretrained with
``nn.BatchNorm`` at a comfortable batch, fine-tuned where each device holds 1–2
examples (detection, segmentation, video). Here, at laptop scale:

* **pretrain** the small ResNet of ``small_batch.py`` with ``nn.BatchNorm`` at
  batch 32 on digits 0–4 (one network per seed);
* **fine-tune** it at a true batch of 1 and of 2 (gradient batch =
  normalization batch) on digits 5–9, with a new head (``Dense_0``
  re-initialized), in each of these ways:

  - ``BN``: batch norm trainable, in train mode (batch statistics, running
    averages updated; two-pass variance, running averages spanning about 320
    examples, as ``small_batch.py`` sets it up);
  - ``BN-frozen``: batch norm frozen, ``use_running_average=True`` throughout
    (the pretrained statistics), γ/β trained;
  - ``BN-frozen-affine``: frozen statistics *and* γ/β (Detectron2's
    ``FrozenBatchNorm2d``, the detection community's default);
  - ``GN``: ``nn.GroupNorm`` (the demo's 8 groups) in place of every
    BatchNorm, started from the pretrained convolutions, with GroupNorm's
    scale/bias started from BatchNorm's γ/β;
  - ``MABN``: ``mabn_jax.replace_batchnorm(model)`` and
    ``mabn_jax.convert_batchnorm_variables``: the same model and variables,
    MABN in place of BN, trained with ``mabn_jax.value_and_grad``.

Every method gets the same schedule (SGD, momentum 0.9, weight decay 5e-4,
cosine decay, the same epochs) and its own learning rate, picked from a small
grid on a validation split of the fine-tuning data (mean validation error over
seeds); the table reports the test error at that learning rate. Learning rates
are given at batch 32 and scaled linearly with the batch. Seeds (vmapped) and
learning rates (vmapped) share one compilation per method and batch.

Run: ``python examples/finetune.py`` (about 10 minutes on 2 shared CPU cores),
``--quick`` for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util

import mabn_jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import small_batch as sb  # noqa: E402  (its ResNet, data and EMA horizon; sets the rbg PRNG)

METHODS = ("BN", "BN-frozen", "BN-frozen-affine", "GN", "MABN")
LABELS = {
    "BN": "BatchNorm, trainable (train mode)",
    "BN-frozen": "BatchNorm frozen (running stats), γ/β trained",
    "BN-frozen-affine": "BatchNorm frozen, γ/β frozen (FrozenBN)",
    "GN": "GroupNorm from the pretrained convs (γ/β from BN)",
    "MABN": "MABN through the converter",
    "BN@32": "BatchNorm, trainable, at batch 32 (reference)",
}
FROZEN = ("BN-frozen", "BN-frozen-affine")  # norms in inference mode while fine-tuning
LR_GRID = (0.01, 0.03, 0.1, 0.3)  # fine-tuning learning rates at batch 32 (scaled linearly)
PRETRAIN_LR = 0.1  # at batch 32, the demo's
PRETRAIN_CLASSES = 5  # digits 0-4 pretrain; 5-9 fine-tune
CHANCE = 80.0  # a diverged run counts as chance level on 5 classes, never dropped


# ----------------------------------------------------------------------------- data


def split_tasks(val_fraction: float, max_train: int | None):
    """``{'pretrain': (x, y), 'pretrain_test', 'train', 'val', 'test'}``: the demo's
    stratified digits split, by label (0–4 pretrain, 5–9 fine-tune), the
    fine-tuning training images split again into train and validation."""
    xtr, ytr, xte, yte = sb.load_data("digits", None)
    old, new = ytr < PRETRAIN_CLASSES, ytr >= PRETRAIN_CLASSES
    x_new, y_new = xtr[new], ytr[new]
    n_val = int(round(val_fraction * len(x_new)))
    n_train = len(x_new) - n_val
    if max_train is not None:
        n_train = min(n_train, max_train)
    pre_n = int(old.sum()) // sb.REFERENCE_BATCH * sb.REFERENCE_BATCH
    return {
        "pretrain": (xtr[old][:pre_n], ytr[old][:pre_n]),
        "pretrain_test": (xte[yte < PRETRAIN_CLASSES], yte[yte < PRETRAIN_CLASSES]),
        "train": (x_new[n_val : n_val + n_train], y_new[n_val : n_val + n_train]),
        "val": (x_new[:n_val], y_new[:n_val]),
        "test": (xte[yte >= PRETRAIN_CLASSES], yte[yte >= PRETRAIN_CLASSES]),
    }


# ----------------------------------------------------------------------------- models


def bn_resnet(batch: int, widths) -> nn.Module:
    """The demo's ResNet with batch norm set up for ``batch`` examples per step."""
    momentum = sb.ema_momentum(batch)  # running averages over ~320 examples
    return sb.ResNet(
        lambda: nn.BatchNorm(momentum=momentum, use_fast_variance=False), widths=widths
    )


def finetune_model(method: str, batch: int, widths) -> nn.Module:
    if method == "GN":
        return sb.ResNet(sb._BatchFree, widths=widths)
    if method == "MABN":
        # The pretrained model as it is: MABN wherever it calls nn.BatchNorm
        # (each BN's epsilon, axis, ... kept), the paper's window of m = 32 / batch
        # steps, and the fine-tuning batch's EMA horizon in place of the BNs'
        # momentum (0.9 at batch 32 would average only 10 steps at batch 1).
        return mabn_jax.replace_batchnorm(
            bn_resnet(sb.REFERENCE_BATCH, widths),
            buffer_size=sb.REFERENCE_BATCH // batch,
            momentum=sb.ema_momentum(batch),
        )
    return bn_resnet(batch, widths)


def gn_params_from_bn(gn_params, bn_params):
    """GroupNorm model params with every conv and norm taken from the BN model:
    ``_BatchFree_k/GroupNorm_0/{scale,bias}`` ← ``BatchNorm_k/{scale,bias}``."""
    bn_flat = traverse_util.flatten_dict(bn_params)
    out = {}
    for path in traverse_util.flatten_dict(gn_params):
        src = tuple(p.replace("_BatchFree_", "BatchNorm_") for p in path if p != "GroupNorm_0")
        out[path] = bn_flat[src]  # KeyError: the two models' layouts drifted apart
    return traverse_util.unflatten_dict(out)


def start_variables(method, model, pretrained, x, key):
    """One seed's starting params and batch_stats: the pretrained network, a new head."""
    fresh = model.init(key, x[:1], train=False)
    if method == "GN":
        params = gn_params_from_bn(fresh["params"], pretrained["params"])
        stats = {}
    elif method == "MABN":
        converted = mabn_jax.convert_batchnorm_variables(model, pretrained, x[:1], train=False)
        # Right after conversion, MABN in inference mode is the BN network.
        bn_out = model.module.apply(pretrained, x, train=False)
        np.testing.assert_allclose(
            model.apply(converted, x, train=False),
            bn_out,
            rtol=0,
            atol=1e-5 * float(jnp.abs(bn_out).max()),
        )
        params, stats = converted["params"], converted["batch_stats"]
    else:
        params, stats = pretrained["params"], pretrained["batch_stats"]
    params = {**params, "Dense_0": fresh["params"]["Dense_0"]}
    return params, stats


# ----------------------------------------------------------------------------- training


def optimizer(lr, steps: int, frozen_affine: bool, params):
    """The same schedule for every method; ``frozen_affine``: BatchNorm's γ/β not trained."""
    tx = optax.chain(
        optax.add_decayed_weights(5e-4),
        optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9),
    )
    if not frozen_affine:
        return tx
    labels = traverse_util.path_aware_map(
        lambda path, _: "frozen" if any(p.startswith("BatchNorm_") for p in path) else "train",
        params,
    )
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def train(
    model,
    lr,
    params,
    stats,
    key,
    x,
    y,
    batch: int,
    epochs: int,
    train_mode: bool = True,
    frozen_affine: bool = False,
):
    """``epochs`` epochs of SGD at ``batch`` examples per step (a new order each
    epoch); ``train_mode=False``: the norms in inference mode (frozen statistics).
    Returns ``(params, batch_stats, last loss)``."""
    steps_per_epoch = len(x) // batch
    tx = optimizer(lr, steps_per_epoch * epochs, frozen_affine, params)

    def train_step(carry, xy):
        params, stats, opt = carry

        def loss_fn(params):
            variables = {"params": params, "batch_stats": stats}
            if train_mode:
                logits, updates = model.apply(variables, xy[0], train=True, mutable=["batch_stats"])
            else:  # frozen statistics: inference-mode norms, nothing to update
                logits, updates = model.apply(variables, xy[0], train=False), {}
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, xy[1]).mean()
            return loss, updates

        # The one-line change: for models without MABN layers it is jax.value_and_grad.
        (loss, updates), grads = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=stats)(
            params
        )
        delta, opt = tx.update(grads, opt, params)
        stats = updates.get("batch_stats", stats)
        return (optax.apply_updates(params, delta), stats, opt), loss

    def epoch(carry, key):
        order = jax.random.permutation(key, len(x))[: steps_per_epoch * batch]
        order = order.reshape(steps_per_epoch, batch)
        return jax.lax.scan(train_step, carry, (x[order], y[order]))

    (params, stats, _), losses = jax.lax.scan(
        epoch, (params, stats, tx.init(params)), jax.random.split(key, epochs)
    )
    return params, stats, losses[-1, -1]


def error(model, params, stats, x, y):
    """Test error (%) in inference mode."""
    logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
    return 100.0 * jnp.mean(jnp.argmax(logits, -1) != y)


def pretrain(tasks, seeds: int, epochs: int, widths):
    """One BN network per seed on digits 0–4 at batch 32, and its test error there."""
    model = bn_resnet(sb.REFERENCE_BATCH, widths)
    x, y = tasks["pretrain"]

    def one(key):
        init_key, key = jax.random.split(key)
        v = model.init(init_key, x[:1], train=False)
        params, stats, _ = train(
            model, PRETRAIN_LR, v["params"], v["batch_stats"], key, x, y, sb.REFERENCE_BATCH, epochs
        )
        return (
            {"params": params, "batch_stats": stats},
            error(model, params, stats, *tasks["pretrain_test"]),
        )

    variables, errors = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1000), seeds))
    return variables, np.asarray(errors)


def finetune(method: str, batch: int, lrs, pretrained, tasks, epochs: int, widths):
    """Validation and test error (%) of every (learning rate, seed): arrays
    ``[len(lrs), seeds]``. Seeds and learning rates are vmapped (one compilation)."""
    model = finetune_model(method, batch, widths)
    x, y = tasks["train"]
    seeds = len(jax.tree.leaves(pretrained)[0])
    keys = jax.random.split(jax.random.key(2000), seeds)
    starts = [
        start_variables(method, model, jax.tree.map(lambda a: a[s], pretrained), x, keys[s])
        for s in range(seeds)
    ]  # eager: the converter runs here
    params, stats = jax.tree.map(lambda *a: jnp.stack(a), *starts)

    def one(lr, params, stats, key):
        params, stats, loss = train(
            model,
            lr * batch / sb.REFERENCE_BATCH,
            params,
            stats,
            key,
            x,
            y,
            batch,
            epochs,
            train_mode=method not in FROZEN,
            frozen_affine=method == "BN-frozen-affine",
        )
        return (
            error(model, params, stats, *tasks["val"]),
            error(model, params, stats, *tasks["test"]),
            loss,
        )

    per_seed = jax.vmap(one, in_axes=(None, 0, 0, 0))
    run = jax.jit(jax.vmap(per_seed, in_axes=(0, None, None, None)))
    val, test, loss = (
        np.asarray(a)
        for a in run(jnp.asarray(lrs), params, stats, jax.random.split(jax.random.key(3000), seeds))
    )
    diverged = ~np.isfinite(loss)
    return np.where(diverged, CHANCE, val), np.where(diverged, CHANCE, test)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test (< 1 minute): tiny ResNet, batch 2, one learning rate",
    )
    p.add_argument("--seeds", type=int, default=None, help="default 3 (quick: 2)")
    p.add_argument("--out", default="out", help="folder for finetune.json")
    args = p.parse_args(argv)
    quick = args.quick
    seeds = args.seeds or (2 if quick else 3)
    widths = (4, 8, 8) if quick else (8, 16, 32)
    pre_epochs, ft_epochs = (2, 1) if quick else (15, 4)
    batches = (2,) if quick else (1, 2)
    lrs = (0.03,) if quick else LR_GRID
    tasks = split_tasks(val_fraction=0.25, max_train=64 if quick else None)

    t0, c0 = time.time(), time.process_time()
    pretrained, pre_err = pretrain(tasks, seeds, pre_epochs, widths)
    print(
        f"pretrained BN ResNet{widths} on digits 0-4 at batch 32, {pre_epochs} epochs: "
        f"test error {sb.cell(pre_err)} % on digits 0-4",
        flush=True,
    )
    ref = ("BN", sb.REFERENCE_BATCH)
    cells = [(m, b) for b in batches for m in METHODS] + [ref]
    results = {}
    for method, batch in cells:
        t = time.time()
        results[(method, batch)] = finetune(
            method, batch, lrs, pretrained, tasks, ft_epochs, widths
        )
        print(f"  {method} at batch {batch}: {time.time() - t:.0f} s", flush=True)
    minutes, cpu_minutes = (time.time() - t0) / 60, (time.process_time() - c0) / 60

    n = {k: len(v[0]) for k, v in tasks.items()}
    print(
        f"\nFine-tuning on digits 5-9 (new head; {n['train']} train / {n['val']} validation / "
        f"{n['test']} test images), {ft_epochs} epochs at a true batch of 1 and 2; test error "
        f"(%), mean ± std over {seeds} seeds, at the learning rate (at batch 32, scaled "
        f"linearly) with the lowest mean validation error among {list(lrs)}; "
        f"{minutes:.1f} min wall, {cpu_minutes:.1f} min CPU, {os.cpu_count()} CPU threads, "
        f"jax {jax.__version__} ({jax.default_backend()})\n"
    )
    best = {k: int(np.argmin(v[0].mean(axis=1))) for k, v in results.items()}
    at_best = lambda k: f"{sb.cell(results[k][1][best[k]])} (lr {lrs[best[k]]})"
    sb.print_table(
        ["fine-tuning"] + [f"batch {b}" for b in batches],
        [[LABELS[m]] + [at_best((m, b)) for b in batches] for m in METHODS]
        + [[LABELS["BN@32"]] + [at_best(ref)] * len(batches)],
    )
    print("\nValidation error (%) for each learning rate (mean over seeds):\n")
    sb.print_table(
        ["fine-tuning, batch"] + [f"lr {lr}" for lr in lrs],
        [
            [f"{m}, {b}"] + [f"{v:5.2f}" for v in val.mean(axis=1)]
            for (m, b), (val, _) in results.items()
        ],
    )

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "finetune.json")
    with open(path, "w") as f:
        json.dump(
            dict(
                args=vars(args),
                seeds=seeds,
                lrs=list(lrs),
                minutes=minutes,
                cpu_minutes=cpu_minutes,
                pretrain_test_error=pre_err.tolist(),
                results={
                    f"{m}@{b}": dict(val=v.tolist(), test=t.tolist(), best_lr=lrs[best[(m, b)]])
                    for (m, b), (v, t) in results.items()
                },
            ),
            f,
            indent=1,
        )
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
