"""Centered MABN at batch 2: what its statistics need (the numbers of docs/centered.md).

Trains the MLP of ``small_batch.py`` on digits with ``MABN(centered=True)`` at
normalization batch 2, in the demo's two regimes (true batch 2; ghost batches
of 2 in batch 32 with ``ghost_ema='step'``), with the demo's protocol and one
thing changed per row:

* the backward statistics: each of g̃ and Ψ̃ either the window mean (MABN) or
  the batch value g_B, Ψ_B (batch norm's backward);
* the forward: no shift ``d`` (``d_max=0``), no renormalization at all,
  shorter or longer warm-up (batch statistics in both passes);
* the EMA horizon: the paper's momentum 0.98 per update (the demo before
  issue 13) instead of the demo's 320-example horizon.

The plain MABN (after ``CenteredDense``) is the first row, for reference.

The backward variants patch a private function of ``mabn_jax._mabn`` for the
duration of this script (an experiment, not an option of the layer): while the
custom VJP's backward pass is traced, the window mean of the chosen statistic
is replaced by the batch value. The script checks that both statistics were
seen in every traced backward pass, so a patch that no longer matches the
code fails loudly instead of measuring nothing.

Run: ``python examples/centered_ablation.py`` (about 2.5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
from flax import linen as nn

import mabn_jax
from mabn_jax import _mabn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import small_batch as sb  # noqa: E402

NO_RENORM = 2**22  # renorm_start past the run (its largest allowed value)

# (label, norm, MABN keyword overrides, backward statistics taken from the batch)
VARIANTS = [
    ("plain MABN (reference)", "MABN", {}, ()),
    ("centered: g̃ and Ψ̃ windowed (default)", "MABN-centered", {}, ()),
    ("centered: batch g_B, windowed Ψ̃", "MABN-centered", {}, ("g",)),
    ("centered: windowed g̃, batch Ψ_B", "MABN-centered", {}, ("psi",)),
    ("centered: batch g_B and Ψ_B (BN's backward)", "MABN-centered", {}, ("g", "psi")),
    ("centered: no shift d (d_max = 0)", "MABN-centered", {"d_max": 0.0}, ()),
    (
        "centered: no renormalization (r = 1, d = 0)",
        "MABN-centered",
        {"renorm_start": NO_RENORM},
        (),
    ),
    ("centered: warm-up of m = 16 steps only", "MABN-centered", {"warmup_steps": "m"}, ()),
    ("centered: warm-up 25 % of the steps", "MABN-centered", {"warmup_steps": 0.25}, ()),
    ("centered: momentum 0.98 per update (paper)", "MABN-centered", {"momentum": 0.98}, ()),
    (
        "centered: momentum 0.98, no renormalization",
        "MABN-centered",
        {"momentum": 0.98, "renorm_start": NO_RENORM},
        (),
    ),
    ("plain: momentum 0.98 per update (paper)", "MABN", {"momentum": 0.98}, ()),
]
REGIMES = {"true": (2, 2), "simulated": (2, sb.REFERENCE_BATCH)}

# The convnet at library defaults (issue 19): (label, norm, MABN keyword overrides).
# "BN" is nn.BatchNorm with the two-pass variance; every MABN row starts from
# MABN()'s own defaults (m = 16, warm-up 100, renorm from 1000, momentum 0.98,
# r_max = d_max = 5) and changes what its label says.
CONV_VARIANTS = {
    "BN": ("BatchNorm, two-pass variance", "BN", {}),
    "plain": ("plain MABN (after CenteredConv), defaults", "MABN", {}),
    "centered": ("centered MABN, defaults", "MABN-centered", {}),
    "d0": ("centered: no shift d (d_max = 0)", "MABN-centered", {"d_max": 0.0}),
    "d1": ("centered: d_max = 1", "MABN-centered", {"d_max": 1.0}),
    "norenorm": ("centered: no renormalization", "MABN-centered", {"renorm_start": NO_RENORM}),
    "warm16": ("centered: warm-up m = 16 steps", "MABN-centered", {"warmup_steps": 16}),
    "warm500": ("centered: warm-up 500 steps", "MABN-centered", {"warmup_steps": 500}),
    "m4": ("centered: window m = 4", "MABN-centered", {"buffer_size": 4}),
    "m32": ("centered: window m = 32", "MABN-centered", {"buffer_size": 32}),
    "m64": ("centered: window m = 64", "MABN-centered", {"buffer_size": 64}),
    "mom99": ("centered: momentum 0.99", "MABN-centered", {"momentum": 0.99}),
    "rmax2": ("centered: r_max = 2", "MABN-centered", {"r_max": 2.0}),
}

_window_mean = _mabn._window_mean
_normalize_bwd = _mabn._normalize_bwd
_batch_stats: set[str] = set()  # which backward statistics use the batch value
_trace: dict = {}


def _patched_window_mean(sl, window, values):
    ctx = _trace.get("ctx")
    if ctx is not None:
        name = "psi" if window is ctx.psi_window else "g" if window is ctx.g_window else None
        if name is not None:
            _trace["seen"].add(name)
            if name in _batch_stats:
                return values
    return _window_mean(sl, window, values)


def _patched_bwd(spec, res, dy):
    ctx = res[-1]
    _trace.update(ctx=ctx, seen=set())
    try:
        out = _normalize_bwd(spec, res, dy)
    finally:
        seen, _trace["ctx"] = _trace["seen"], None
    want = {"psi"} | ({"g"} if ctx.g_window is not None else set())
    if seen != want:
        raise RuntimeError(f"the backward patch saw {seen}, not {want}: mabn_jax._mabn changed")
    return out


_mabn._window_mean = _patched_window_mean
_mabn._normalize.defvjp(_mabn._normalize_fwd, _patched_bwd)


def overrides_for(setup: sb.Setup, data, epochs: int, raw: dict) -> dict:
    """Resolve relative warm-ups (a fraction of the MABN steps, or 'm')."""
    out = dict(raw)
    steps = len(data[0]) // setup.grad_batch * epochs * setup.groups
    m = sb.REFERENCE_BATCH // setup.norm_batch
    if out.get("warmup_steps") == "m":
        out["warmup_steps"] = m
    elif isinstance(out.get("warmup_steps"), float):
        out["warmup_steps"] = int(out["warmup_steps"] * steps)
    return out


def upsample(data, size: int):
    """The digits' 8×8 images resized (bilinear) to ``size``×``size``."""
    if size == 8:
        return data
    resize = lambda x: jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bilinear")
    xtr, ytr, xte, yte = data
    return resize(xtr), ytr, resize(xte), yte


def convnet_main(args):
    """The convnet at library defaults, true batch 2 (issue 19), one row per variant."""
    data = upsample(sb.load_data("digits", None), args.size)
    steps = len(data[0]) // 2 * args.epochs
    print(
        f"ResNet 16-32-64 (3x3 stem, stride 2) on digits at {args.size}x{args.size}, true "
        f"batch 2, SGD momentum 0.9, cosine from lr {args.lr}, weight decay 5e-4, "
        f"{args.epochs} epochs = {steps} steps, {args.seeds} seeds; test error (%)\n"
    )
    print("| variant | mean | min | max | per seed |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.variants.split(","):
        label, norm, raw = CONV_VARIANTS[name]
        if norm == "BN":
            layer = lambda: nn.BatchNorm(use_fast_variance=False)
        else:
            layer = lambda raw=raw, norm=norm: mabn_jax.MABN(
                centered=norm == "MABN-centered", **raw
            )
        conv = mabn_jax.CenteredConv if norm == "MABN" else nn.Conv
        model = sb.ResNet(layer, conv, (16, 32, 64), stem_stride=2)
        t0 = time.time()
        e = sb.train_and_evaluate(
            sb.Setup("ResNet", norm, 2, 2),
            data,
            args.seeds,
            args.epochs,
            False,
            model=model,
            lr=args.lr,
        )
        print(
            f"| {label} | {e.mean():.2f} | {e.min():.2f} | {e.max():.2f} | "
            f"{', '.join(f'{v:.2f}' for v in e)} |  ({time.time() - t0:.0f} s)",
            flush=True,
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--regimes", default="true,simulated")
    p.add_argument(
        "--model",
        default="MLP",
        choices=("MLP", "convnet"),
        help="convnet: the ResNet at library defaults (issue 19)",
    )
    p.add_argument(
        "--variants",
        default=",".join(CONV_VARIANTS),
        help="convnet: comma-separated rows of CONV_VARIANTS",
    )
    p.add_argument("--size", type=int, default=16, help="convnet: image size (upsampled)")
    p.add_argument("--lr", type=float, default=0.1 * 2 / 32, help="convnet: peak learning rate")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: MLP rows plain, centered and BN's backward (the patch); 1 seed, "
        "1 epoch, true batch 2",
    )
    args = p.parse_args(argv)
    variants = VARIANTS
    if args.quick:
        args.seeds, args.epochs, args.regimes = 1, 1, "true"
        variants = [VARIANTS[i] for i in (0, 1, 4)]
    if args.model == "convnet":
        return convnet_main(args)
    regimes = args.regimes.split(",")
    data = sb.load_data("digits", None)
    t0 = time.time()
    rows = []
    for label, norm, raw, batch_stats in variants:
        cells = []
        for regime in regimes:
            nb, gb = REGIMES[regime]
            setup = sb.Setup("MLP", norm, nb, gb)
            _batch_stats.clear()
            _batch_stats.update(batch_stats)
            errors = sb.train_and_evaluate(
                setup,
                data,
                args.seeds,
                args.epochs,
                False,
                overrides=overrides_for(setup, data, args.epochs, raw),
            )
            cells.append(f"{sb.cell(errors)} ({', '.join(f'{e:.2f}' for e in errors)})")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    print(
        f"\nMLP on digits, normalization batch 2, test error (%) mean ± std over "
        f"{args.seeds} seeds (per seed), {args.epochs} epochs; {time.time() - t0:.0f} s, "
        f"{os.cpu_count()} CPU threads\n"
    )
    names = {"true": "true batch 2", "simulated": "simulated: ghost 2 in batch 32, 'step'"}
    print("| variant |" + "".join(f" {names[r]} |" for r in regimes))
    print("|" + " --- |" * (len(regimes) + 1))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
