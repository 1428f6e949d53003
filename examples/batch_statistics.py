"""The paper's Figure 2: how noisy are the four batch statistics at batch 2 vs 32?

Trains the MLP of ``small_batch.py`` on digits with batch normalization at
normalization (and gradient) batch 32 and 2 and records, for one layer and every
iteration, the l2 norm over channels of the forward statistics μ_B, σ²_B and
the backward statistics g_B = mean(∂L/∂z), Ψ_B = mean(z · ∂L/∂z) (for the
summed loss, so that batch sizes compare), with the
statistics monitor (:mod:`mabn_jax.monitor`). Batch norm here is
``mabn_jax.MABN(centered=True, buffer_size=1)`` with renormalization off, which
computes exactly ``nn.BatchNorm`` and exposes all four statistics. A third run
at batch 2 is the paper's MABN (``CenteredDense`` + ``MABN``, m = 16) and plots
the statistics it actually uses: χ̃² (its σ², the SMA of the second moment) and
Ψ̃ (the SMA of Ψ_B); it has no μ or g. (The centered variant, all four
statistics moving-averaged, is not drawn; what it needs at batch 2 on this
MLP is in docs/centered.md.)

Run: ``python examples/batch_statistics.py`` (about a minute on 2 CPU cores);
writes ``out/batch_statistics.png``. ``--quick``: 20 steps, a smoke test.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import mabn_jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from small_batch import MLP, load_data  # noqa: E402

LAYER = "MABN_1"  # the second normalization layer of the MLP (256 dense features)
NO_RENORM = 2**22  # renorm_start past the run (its largest allowed value)


def record(batch: int, mabn: bool, steps: int, lr_at_32: float = 0.1):
    """Per-iteration l2 norms of the layer's statistics: dict name -> [steps].

    ``mabn=False``: batch norm (centered MABN with m = 1, no renormalization);
    ``mabn=True``: the paper's MABN with m = 16.
    """
    xtr, ytr, _, _ = load_data("digits", None)
    window = 16 if mabn else 1
    norm = lambda: mabn_jax.MABN(
        centered=not mabn,
        buffer_size=window,
        warmup_steps=window,
        renorm_start=NO_RENORM,
        momentum=0.98,
    )
    model = MLP(norm, mabn_jax.CenteredDense if mabn else nn.Dense)
    variables = model.init(jax.random.key(0), xtr[:batch], train=False)
    tx = optax.sgd(lr_at_32 * batch / 32, momentum=0.9)
    carry = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    def step(carry, idx):
        params, stats, opt = carry
        x, y = xtr[idx], ytr[idx]

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": stats},
                x,
                train=True,
                mutable=["batch_stats", "intermediates"],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

        (_, updates), grads = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=stats)(
            params
        )
        delta, opt = tx.update(grads, opt, params)
        new_stats = updates["batch_stats"]  # with this step's Ψ_B (g_B) recorded
        fwd = mabn_jax.monitor.forward_stats(updates["intermediates"])
        # The backward statistics of the step: value_and_grad wrote Ψ_B (and
        # g_B) into window slot t mod m, t the step count after this step.
        layer = new_stats[LAYER]
        slot = jnp.round(layer["step"]).astype(jnp.int32) % window
        # The loss is a batch mean, so ∂L/∂z scales as 1/batch: put g_B and Ψ_B on
        # the per-example scale (× batch) to compare batch sizes.
        psi_b = layer["psi_window"][slot] * batch
        if not mabn:
            out = {
                "mu_B": fwd[f"{LAYER}/mu_B"],
                "sigma2_B": fwd[f"{LAYER}/sigma2_B"],
                "g_B": layer["g_window"][slot] * batch,
                "psi_B": psi_b,
            }
        else:  # the statistics used: χ̃², and Ψ̃ = the window's mean after this
            # step's write (the batch's own while the window fills, t <= m),
            # on the same per-example scale
            psi = jnp.where(layer["step"] > window, layer["psi_window"].mean(0) * batch, psi_b)
            out = {"sigma2_used": fwd[f"{LAYER}/chi2"], "psi_used": psi}
        return (optax.apply_updates(params, delta), new_stats, opt), mabn_jax.monitor.l2_norms(out)

    rng = np.random.default_rng(0)
    epochs = steps * batch // len(xtr) + 1
    order = np.concatenate([rng.permutation(len(xtr)) for _ in range(epochs)])
    order = order[: steps * batch].reshape(steps, batch)
    _, norms = jax.jit(lambda c, o: jax.lax.scan(step, c, o))(carry, jnp.asarray(order))
    return {k: np.asarray(v) for k, v in norms.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", default="out")
    p.add_argument("--quick", action="store_true", help="smoke test: 20 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 20
    runs = {
        "BN, batch 32": record(32, False, args.steps),
        "BN, batch 2": record(2, False, args.steps),
    }
    mabn = record(2, True, args.steps)
    titles = {"mu": "μ_B", "sigma2": "σ²_B", "g": "g_B", "psi": "Ψ_B"}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    for ax, (key, title) in zip(axes.flat, titles.items()):
        for label, norms in runs.items():
            ax.plot(norms[f"{key}_B"], lw=0.7, label=label)
        if f"{key}_used" in mabn:
            ax.plot(
                mabn[f"{key}_used"],
                lw=1.0,
                color="k",
                label="MABN, batch 2: moving average used (χ̃², Ψ̃)",
            )
        ax.set_title(f"{title} of layer {LAYER}")
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("l2 norm")
    axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "batch_statistics.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print("l2 norm over the last half of the run: median [10th-90th percentile]")
    half = args.steps // 2
    spread = lambda v: (
        f"{np.median(v[half:]):.3g} "
        f"[{np.percentile(v[half:], 10):.3g}-{np.percentile(v[half:], 90):.3g}]"
    )
    for key, title in titles.items():
        print(
            f"  {title:5s}: "
            + ", ".join(f"{label} {spread(n[f'{key}_B'])}" for label, n in runs.items())
            + (f", MABN used {spread(mabn[f'{key}_used'])}" if f"{key}_used" in mabn else "")
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
