"""Small normalization batches on real data: BN vs BatchRenorm vs GroupNorm vs MABN.

Reproduces, at laptop scale, the comparison of the MABN paper (Yan et al.,
ICLR 2020, Table 1 / Figure 1): the same models trained with

* ``nn.BatchNorm`` at normalization batch 32 (the reference) and at 2,
* ``mabn_jax.BatchRenorm`` at 2 (Ioffe's schedule: batch norm, then r and d relaxed),
* ``nn.GroupNorm`` (batch independent),
* ``mabn_jax.MABN`` at 2 after ``CenteredConv``/``CenteredDense`` (the paper's MABN),
* ``mabn_jax.MABN(centered=True)`` at 2 after plain Conv/Dense,

in three regimes:

* **true small batch**: gradient batch = normalization batch = 2, learning rate
  scaled linearly (lr · 2/32, for every normalization), the same number of epochs;
* **simulated**: gradient batch 32 split into ghost batches of 2
  (``norm_batch_size=2``; the paper's ImageNet protocol). Ghost BN is
  ``BatchRenorm`` with ``r_max=1, d_max=0``, which *is* BN per group. MABN runs
  with both ghost-batch EMA rules (``ghost_ema='step'``, the authors' layer,
  and ``'group'``);
* **true batch 1** (gradient batch 1, lr · 1/32).

Every baseline is set up as a careful user would: batch norm computes its
variance in two passes (``use_fast_variance=False``; Flax's one-pass default
cancels at small batches), and every running average spans about 320 examples
(see :func:`ema_momentum`). Two models: a small NHWC ResNet (stages at 8×8, 4×4,
2×2 for digits, so the last stage normalizes 2·2·2 = 8 values per channel at
batch 2) and an MLP (dense features: at batch 2 BN normalizes 2 values per
feature, i.e. outputs ±1; at batch 1 it outputs β whatever the input). Every
cell is the mean ± std test error over seeds (vmapped: one compilation per
cell). The plot is test error against normalization batch size (1 … 32) in the
simulated regime on the MLP, like the paper's Figure 1.

Run: ``python examples/small_batch.py`` (default: scikit-learn digits, no
network), ``--quick`` for a smoke test, ``--dataset mnist`` (any
tensorflow-datasets image dataset, needs ``pip install tensorflow-datasets
tensorflow`` and internet; imported only then).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import mabn_jax

# The "rbg" generator compiles much faster on CPU than threefry (the model init
# is compiled once per setup), and any seed is as good as another here.
jax.config.update("jax_default_prng_impl", "rbg")

REFERENCE_BATCH = 32  # the "large" normalization batch and the simulated gradient batch
LR_AT_32 = 0.1
EMA_EXAMPLES = 320  # every running average (BN, BRN, MABN) spans about this many examples
NORMS = ("BN", "BRN", "GN", "MABN", "MABN-centered")
LABELS = {
    "BN": "BatchNorm",
    "BRN": "BatchRenorm",
    "GN": "GroupNorm",
    "MABN": "MABN",
    "MABN-centered": "MABN (centered)",
}
# The paper's ResNet-50 ImageNet top-1 error (100 - accuracy), normalization batch 32 / 2.
PAPER_IMAGENET_ERROR = {"BN@32": 23.41, "BN@2": 35.22, "BRN@2": 30.29, "MABN@2": 23.67}


# ----------------------------------------------------------------------------- data


def load_data(name: str, max_train: int | None, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``, images NHWC in [0, 1]."""
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)[..., None]
        xtr, xte, ytr, yte = train_test_split(
            x, d.target, test_size=0.2, random_state=seed, stratify=d.target
        )
    else:
        try:  # optional, and only here: the package does not depend on TensorFlow
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise SystemExit(
                f"--dataset {name} needs tensorflow-datasets: pip install "
                "tensorflow-datasets tensorflow (and internet to download "
                "it); the default --dataset digits needs neither."
            ) from e
        (xtr, ytr), (xte, yte) = tfds.as_numpy(
            tfds.load(name, split=["train", "test"], batch_size=-1, as_supervised=True)
        )
        xtr, xte = xtr.astype(np.float32) / 255.0, xte.astype(np.float32) / 255.0
    # Standardize with the training set's statistics.
    mean, std = xtr.mean(), xtr.std()
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    if max_train is not None:
        xtr, ytr = xtr[:max_train], ytr[:max_train]
    # Whole batches of 32 only, so every regime sees the same examples.
    n = len(xtr) // REFERENCE_BATCH * REFERENCE_BATCH
    return (
        jnp.asarray(xtr[:n]),
        jnp.asarray(ytr[:n], jnp.int32),
        jnp.asarray(xte),
        jnp.asarray(yte, jnp.int32),
    )


# ----------------------------------------------------------------------------- models


class _BatchFree(nn.Module):
    """GroupNorm with the ``use_running_average`` argument of the other layers."""

    num_groups: int = 8

    @nn.compact
    def __call__(self, x, use_running_average=None):
        del use_running_average
        return nn.GroupNorm(num_groups=min(self.num_groups, x.shape[-1]))(x)


class MLP(nn.Module):
    norm: Callable[[], nn.Module]
    dense: Any = nn.Dense
    width: int = 256

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.reshape(x.shape[0], -1)
        for _ in range(2):
            x = self.dense(self.width, use_bias=False)(x)
            x = nn.relu(self.norm()(x, use_running_average=not train))
        return nn.Dense(10)(x)


class Block(nn.Module):
    width: int
    stride: int
    norm: Callable[[], nn.Module]
    conv: Any

    @nn.compact
    def __call__(self, x, train: bool):
        ura = not train
        y = self.conv(self.width, (3, 3), (self.stride,) * 2, use_bias=False)(x)
        y = nn.relu(self.norm()(y, use_running_average=ura))
        y = self.conv(self.width, (3, 3), use_bias=False)(y)
        y = self.norm()(y, use_running_average=ura)
        if self.stride != 1 or x.shape[-1] != self.width:
            x = self.conv(self.width, (1, 1), (self.stride,) * 2, use_bias=False)(x)
            x = self.norm()(x, use_running_average=ura)
        return nn.relu(x + y)


class ResNet(nn.Module):
    norm: Callable[[], nn.Module]
    conv: Any = nn.Conv
    widths: tuple[int, ...] = (16, 32, 64)
    stem_stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        x = self.conv(self.widths[0], (3, 3), (self.stem_stride,) * 2, use_bias=False)(x)
        x = nn.relu(self.norm()(x, use_running_average=not train))
        for i, w in enumerate(self.widths):
            x = Block(w, 1 if i == 0 else 2, self.norm, self.conv)(x, train)
        return nn.Dense(10)(x.mean((1, 2)))


# ----------------------------------------------------------------------------- setups


@dataclasses.dataclass(frozen=True)
class Setup:
    model: str  # "ResNet" or "MLP"
    norm: str  # one of NORMS
    norm_batch: int  # examples per normalization group (ignored by GN)
    grad_batch: int  # examples per optimizer step
    ghost_ema: str = "step"  # MABN with ghost batches: one EMA update per call or per group

    @property
    def groups(self) -> int:
        return 1 if self.norm == "GN" else self.grad_batch // self.norm_batch

    @property
    def key(self) -> str:
        rule = "/ghost_ema=group" if self.ghost_ema != "step" else ""
        return f"{self.model}/{self.norm}@{self.norm_batch}/batch{self.grad_batch}{rule}"


def ema_momentum(examples_per_update: int) -> float:
    """The decay of a running average that spans about ``EMA_EXAMPLES`` examples.

    Flax's and Keras' convention (``avg ← decay·avg + (1 − decay)·batch``);
    PyTorch's ``momentum`` is ``1 − decay``: 0.9 at 32 examples per update is
    PyTorch's default 0.1, and 0.99375 at 2 is ``momentum=0.00625``.
    """
    return 1.0 - examples_per_update / EMA_EXAMPLES


def build(setup: Setup, steps: int, quick: bool, overrides: dict | None = None) -> nn.Module:
    """The model of a setup.

    Schedules that the paper gives in ImageNet iterations are scaled to the run:
    MABN warms up for 2 % and starts renormalizing at 10 % of its steps (a
    ghost batch is one MABN step); BRN keeps r = 1, d = 0 for 5 % of the steps,
    then relaxes r_max 1 → 3 until 40 % and d_max 0 → 5 until 25 % of them (the
    paper: 5k, 40k and 25k iterations). Running averages span about 320
    examples for every layer (:func:`ema_momentum`); MABN's ``'step'`` rule
    updates once per call of ``grad_batch`` examples. ``overrides``: keyword
    arguments that replace these for MABN (``examples/centered_ablation.py``).
    """
    ghost = setup.norm_batch if setup.groups > 1 else None
    mabn_steps = steps * setup.groups
    m = max(1, REFERENCE_BATCH // setup.norm_batch)  # the paper's m = 32 / norm batch
    momentum = ema_momentum(setup.norm_batch)
    conv, dense = nn.Conv, nn.Dense
    if setup.norm == "BN":
        if ghost is None:  # two passes: the one-pass default cancels at small batches
            norm = lambda: nn.BatchNorm(momentum=momentum, use_fast_variance=False)
        else:  # ghost BN: BatchRenorm with r = 1, d = 0 is BN per group (two-pass too)
            norm = lambda: mabn_jax.BatchRenorm(
                momentum=momentum, r_max=1.0, d_max=0.0, norm_batch_size=ghost
            )
    elif setup.norm == "BRN":
        norm = lambda: mabn_jax.BatchRenorm(
            momentum=momentum,
            r_max=3.0,
            d_max=5.0,
            warmup_steps=round(0.05 * steps),
            ramp_steps=round(0.35 * steps),
            d_ramp_steps=round(0.20 * steps),
            norm_batch_size=ghost,
        )
    elif setup.norm == "GN":
        norm = _BatchFree
    else:
        centered = setup.norm == "MABN-centered"
        if not centered:
            conv, dense = mabn_jax.CenteredConv, mabn_jax.CenteredDense
        per_update = setup.grad_batch if ghost and setup.ghost_ema == "step" else setup.norm_batch
        kwargs = dict(
            centered=centered,
            buffer_size=m,
            momentum=ema_momentum(per_update),
            warmup_steps=max(m, int(0.02 * mabn_steps)),
            renorm_start=int(0.1 * mabn_steps),
            norm_batch_size=ghost,
            ghost_ema=setup.ghost_ema,
        )
        norm = lambda: mabn_jax.MABN(**{**kwargs, **(overrides or {})})
    if setup.model == "MLP":
        return MLP(norm, dense, width=32 if quick else 256)
    return ResNet(norm, conv, widths=(4, 8, 8) if quick else (8, 16, 32))


# ----------------------------------------------------------------------------- training


def train_and_evaluate(
    setup: Setup,
    data,
    seeds: int,
    epochs: int,
    quick: bool,
    progress=None,
    overrides: dict | None = None,
    model: nn.Module | None = None,
    lr: float | None = None,
    centralize: Callable[[Any], Any] | None = None,
) -> np.ndarray:
    """Test error (%) of each seed after ``epochs`` epochs (seeds are vmapped).

    Each seed draws its own initialization and its own shuffling every epoch.
    ``model``: train this one instead of ``build``'s (``centered_ablation.py``);
    ``lr``: the peak learning rate (default: 0.1 scaled linearly from batch 32);
    ``centralize``: a mask (a function of the params) of kernels to keep
    centered: the optimizer is wrapped in :func:`mabn_jax.optax.centralize` and
    the params start from :func:`mabn_jax.optax.center` (a plain ``nn.Conv``
    then has ``CenteredConv``'s effective weights).
    """
    xtr, ytr, xte, yte = data
    steps_per_epoch = len(xtr) // setup.grad_batch
    steps = steps_per_epoch * epochs
    if model is None:
        model = build(setup, steps, quick, overrides)
    if lr is None:
        lr = LR_AT_32 * setup.grad_batch / REFERENCE_BATCH  # linear scaling
    tx = optax.chain(
        optax.add_decayed_weights(5e-4),
        optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9),
    )
    if centralize is not None:  # linear inner optimizer, but keep the update pass: exact
        tx = mabn_jax.optax.centralize(tx, centralize, center_updates=True)

    def init(key):
        variables = model.init(key, xtr[: setup.grad_batch], train=False)
        params = variables["params"]
        if centralize is not None:
            params = mabn_jax.optax.center(params, centralize)
        return params, variables.get("batch_stats", {}), tx.init(params)

    def train_step(carry, batch):
        params, stats, opt = carry
        x, y = batch

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates

        # One train step for every norm: for models without MABN layers
        # mabn_jax.value_and_grad is jax.value_and_grad.
        (loss, updates), grads = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=stats)(
            params
        )
        delta, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, delta)
        stats = updates.get("batch_stats", {})
        return (params, stats, opt), loss

    def run(key, xtr, ytr, xte, yte):
        """One seed, start to finish: one compilation covers the whole run."""
        init_key, data_key = jax.random.split(key)

        def epoch(carry, key):
            order = jax.random.permutation(key, len(xtr)).reshape(steps_per_epoch, -1)
            carry, losses = jax.lax.scan(train_step, carry, (xtr[order], ytr[order]))
            return carry, losses[-1]

        (params, stats, _), last_loss = jax.lax.scan(
            epoch, init(init_key), jax.random.split(data_key, epochs)
        )
        logits = model.apply({"params": params, "batch_stats": stats}, xte, train=False)
        return 100.0 * jnp.mean(jnp.argmax(logits, -1) != yte), last_loss[-1]

    keys = jax.random.split(jax.random.key(0), seeds)
    run_all = jax.jit(jax.vmap(run, in_axes=(0, None, None, None, None)))
    errors, last_loss = (np.asarray(a) for a in run_all(keys, xtr, ytr, xte, yte))
    if progress is not None:
        progress.update(1)
    # A diverged run is a failed run: count it as chance level, never drop it.
    return np.where(np.isfinite(last_loss), errors, 90.0)


# ----------------------------------------------------------------------------- main

# (regime, normalization batch, gradient batch): the table's columns.
COLUMNS = {
    "true": ("true batch 2", 2, 2),
    "simulated": ("simulated: ghost 2 in batch 32", 2, 32),
    "true1": ("true batch 1", 1, 1),
}
TABLE_NORMS = ("BN", "BRN", "GN", "MABN", "MABN-centered")
QUICK_NORMS = ("BN", "MABN")


def cell(errors) -> str:
    return f"{errors.mean():5.2f} ± {errors.std():4.2f}"


def print_table(header, rows) -> None:
    """A Markdown table (as docs/*.md quote it): a header row, then one row per list of cells."""
    for cells in [header, ["---"] * len(header), *rows]:
        print("| " + " | ".join(map(str, cells)) + " |")


def gap_closed(bn_ref: float, bn_n: float, err: float) -> float | None:
    """(err BN@n − err X@n) / (err BN@n − err BN@32); None if no real gap (≤ 1 point)."""
    gap = bn_n - bn_ref
    return (bn_n - err) / gap if gap > 1.0 else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--dataset",
        default="digits",
        help="digits (bundled with scikit-learn, default) or a tensorflow-datasets name",
    )
    p.add_argument("--epochs", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--seeds", type=int, default=None, help="default 3 (quick: 2)")
    p.add_argument(
        "--max-train", type=int, default=None, help="use only this many training examples"
    )
    p.add_argument(
        "--models", default=None, help="comma-separated, default ResNet,MLP (quick: MLP)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test (< 1 minute): MLP, BN@32/BN@2/MABN@2, small data",
    )
    p.add_argument("--out", default="out", help="folder for small_batch.json and small_batch.png")
    args = p.parse_args(argv)
    epochs = args.epochs or (1 if args.quick else 3)
    seeds = args.seeds or (2 if args.quick else 3)
    max_train = args.max_train or (256 if args.quick else None)
    models = tuple((args.models or ("MLP" if args.quick else "ResNet,MLP")).split(","))
    norms = QUICK_NORMS if args.quick else TABLE_NORMS
    columns = ("true", "simulated") if args.quick else tuple(COLUMNS)
    sweep_sizes = (2, 32) if args.quick else (1, 2, 4, 8, 16, 32)
    sweep_norms = ("BN", "MABN") if args.quick else ("BN", "BRN", "GN", "MABN", "MABN-centered")
    sweep_model = models[-1]
    mabn_norms = [n for n in norms if n.startswith("MABN")]

    from tqdm import tqdm

    t0, c0 = time.time(), time.process_time()
    data = load_data(args.dataset, max_train)
    ref = {m: Setup(m, "BN", REFERENCE_BATCH, REFERENCE_BATCH) for m in models}
    table = {
        (m, c, n): Setup(m, n, COLUMNS[c][1], COLUMNS[c][2])
        for m in models
        for c in columns
        for n in norms
    }
    group_rule = (
        {}
        if args.quick
        else {(m, n): Setup(m, n, 2, REFERENCE_BATCH, "group") for m in models for n in mabn_norms}
    )
    sweep = {
        (n, nb): Setup(sweep_model, n, 2 if n == "GN" else nb, REFERENCE_BATCH)
        for n in sweep_norms
        for nb in sweep_sizes
    }
    unique = list(
        dict.fromkeys([*ref.values(), *table.values(), *group_rule.values(), *sweep.values()])
    )
    results = {}
    with tqdm(total=len(unique), desc="training", unit="setup") as bar:
        for setup in unique:
            bar.set_postfix_str(setup.key)
            results[setup] = train_and_evaluate(setup, data, seeds, epochs, args.quick, bar)
    minutes, cpu_minutes = (time.time() - t0) / 60, (time.process_time() - c0) / 60
    err = lambda setup: float(results[setup].mean())

    print(
        f"\nTest error (%) on {args.dataset}, mean ± std over {seeds} seeds, {epochs} epochs; "
        f"{minutes:.1f} min wall, {cpu_minutes:.1f} min CPU, {os.cpu_count()} CPU threads, "
        f"jax {jax.__version__} ({jax.default_backend()})"
    )
    for model in models:
        print(f"\n{model}:\n")
        print_table(
            ["normalization"] + [COLUMNS[c][0] for c in columns],
            [["BatchNorm at 32 (reference)"] + [cell(results[ref[model]])] * len(columns)]
            + [
                [LABELS[norm]] + [cell(results[table[(model, c, norm)]]) for c in columns]
                for norm in norms
            ],
        )

    summary = {}
    print(
        "\nGap closed, (err BN@n − err X@n) / (err BN@n − err BN@32), against the BatchNorm "
        "above (two-pass variance); '-' where BN@n is within 1 point of BN@32 (no gap):\n"
    )
    others = [n for n in norms if n != "BN"]
    rows = []
    for model in models:
        for c in columns:
            bn_ref, bn_n = err(ref[model]), err(table[(model, c, "BN")])
            row = []
            for norm in others:
                e = err(table[(model, c, norm)])
                closed = gap_closed(bn_ref, bn_n, e)
                summary[f"{model}/{c}/{norm}"] = dict(
                    bn32=bn_ref, bn_n=bn_n, err=e, gap=bn_n - bn_ref, closed=closed
                )
                row.append("-" if closed is None else f"{100 * closed:.0f} %")
            rows.append([f"{model}, {COLUMNS[c][0]}", f"{bn_ref:.2f}", f"{bn_n:.2f}", *row])
    print_table(["model, regime", "BN@32", "BN@n"] + [LABELS[n] for n in others], rows)
    print(
        "\nThe paper (ResNet-50, ImageNet, top-1 error %): "
        + ", ".join(f"{k} {v}" for k, v in PAPER_IMAGENET_ERROR.items())
        + f" -> MABN closes {100 * (35.22 - 23.67) / (35.22 - 23.41):.0f} % of the gap."
    )

    if group_rule:
        print(
            "\nSimulated regime (ghost batches of 2 in batch 32), MABN's two ghost-batch EMA "
            "rules: ghost_ema='step' (one update per call, the authors' layer; the table "
            "above) and 'group' (one per ghost batch):\n"
        )
        print_table(
            ["normalization"] + [f"{m}, '{r}'" for m in models for r in ("step", "group")],
            [
                [LABELS[norm]]
                + [
                    cell(results[s])
                    for m in models
                    for s in (table[(m, "simulated", norm)], group_rule[(m, norm)])
                ]
                for norm in mabn_norms
            ],
        )

    print(
        f"\nTest error (%) against normalization batch size, {sweep_model}, gradient batch "
        f"{REFERENCE_BATCH} (the plot):\n"
    )
    print_table(
        ["normalization", *sweep_sizes],
        [[LABELS[n]] + [cell(results[sweep[(n, nb)]]) for nb in sweep_sizes] for n in sweep_norms],
    )
    if "true1" in columns:
        print(
            "\nBatchNorm at batch 1 normalizes each feature over one example: dense "
            "features (the MLP) become β whatever the input (chance level); conv "
            "features (the ResNet) are normalized over one image's positions in "
            "training, but with running averages at test."
        )

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "small_batch.json"), "w") as f:
        json.dump(
            dict(
                args=vars(args),
                epochs=epochs,
                seeds=seeds,
                minutes=minutes,
                cpu_minutes=cpu_minutes,
                results={s.key: [float(e) for e in results[s]] for s in unique},
                summary=summary,
            ),
            f,
            indent=1,
        )
    plot(
        {n: [results[sweep[(n, nb)]] for nb in sweep_sizes] for n in sweep_norms},
        results[ref[sweep_model]],
        sweep_model,
        sweep_sizes,
        os.path.join(args.out, "small_batch.png"),
        args.dataset,
    )
    print(f"\nwrote {args.out}/small_batch.json and {args.out}/small_batch.png")
    return results, summary


STYLES = {
    "BN": ("o", "-"),
    "BRN": ("s", "--"),
    "GN": ("", ":"),
    "MABN": ("^", "-"),
    "MABN-centered": ("v", "-."),
}


def plot(curves, reference, model, sizes, path, dataset):
    """Error against normalization batch, log-scale error axis (2-6 % readable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (norm, es) in enumerate(curves.items()):
        marker, ls = STYLES[norm]
        if norm == "GN":  # batch independent: one run, drawn as a line
            ax.axhline(es[0].mean(), ls=ls, color="gray", label=LABELS[norm])
            continue
        dodge = 2 ** (0.05 * (i - len(curves) / 2))  # error bars side by side, not on top
        ax.errorbar(
            [s * dodge for s in sizes],
            [e.mean() for e in es],
            yerr=[e.std() for e in es],
            marker=marker,
            ls=ls,
            capsize=3,
            label=LABELS[norm],
        )
    ax.axhline(
        reference.mean(), ls=(0, (1, 3)), color="black", lw=1, label="BatchNorm at 32 (reference)"
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_yscale("log")
    ticks = [1, 2, 3, 4, 5, 6, 8, 10, 20, 30, 50, 100]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("normalization batch size (gradient batch 32)")
    ax.set_ylabel("test error (%, log scale)")
    ax.set_title(f"{model} on {dataset}: test error vs normalization batch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
