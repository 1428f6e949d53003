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
  issue 13) instead of the demo's 320-example horizon;
* the window: the layer's own default m = 2 instead of the demo's m = 16.

The plain MABN (after ``CenteredDense``) is the first row, for reference.

``--model convnet`` (issue 19) trains a small ResNet at true batch 2 with every
norm at its library defaults instead, one row per entry of ``CONV_VARIANTS``
(8 seeds vmapped, about a minute a row at 16×16 on 2 CPU cores): the window
length of the centered layer, the mean μ̃ or g̃ taken from the batch, and the
centered layer after ``CenteredConv``. Issue 30 adds the plain layer after a plain
``nn.Conv`` (the failure of item 6), the same with ``nn.Conv``'s kernels kept
centered by the optimizer (``mabn_jax.optax.centralize`` from
``mabn_jax.optax.center``'ed params: ``CenteredConv``'s effective weights without
its per-step centering), and a window sized by the values per channel
(:class:`AdaptiveWindow`, item 16). ``--model MLP-defaults`` trains the MLP with
the same rows at library defaults (``CenteredDense`` / ``nn.Dense`` for
``CenteredConv`` / ``nn.Conv``); ``--variants`` picks rows of ``VARIANTS`` for
the MLP too (default: the first table of docs/centered.md).

The backward variants patch private functions of ``mabn_jax._window`` and
``mabn_jax._backward`` for the
duration of this script (an experiment, not an option of the layer): while the
custom VJP's backward pass is traced, the window mean of the chosen statistic
is replaced by the batch value (the forward mean likewise, in
``_forward_windows``). The script checks that both statistics were
seen in every traced backward pass, so a patch that no longer matches the
code fails loudly instead of measuring nothing.

Run: ``python examples/centered_ablation.py`` (about 2.5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
from flax import linen as nn

import mabn_jax
from mabn_jax import _backward, _window

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import small_batch as sb  # noqa: E402

NO_RENORM = 2**22  # renorm_start past the run (its largest allowed value)
_M16_D0 = {"buffer_size": 16, "d_max": 0.0}
_M16_NORENORM = {"buffer_size": 16, "renorm_start": NO_RENORM}
_M16_WARM500 = {"buffer_size": 16, "warmup_steps": 500}

# name: (label, norm, MABN keyword overrides, backward statistics taken from the batch).
# MLP_DEFAULT: the rows of a plain run (the first table of docs/centered.md); "BN"
# and the windows m = 4, 8 are for the window study (issue 30, item 16).
VARIANTS = {
    "plain": ("plain MABN (reference)", "MABN", {}, ()),
    "demo": ("centered: g̃ and Ψ̃ windowed (the demo: m = 16)", "MABN-centered", {}, ()),
    "g_batch": ("centered: batch g_B, windowed Ψ̃", "MABN-centered", {}, ("g",)),
    "psi_batch": ("centered: windowed g̃, batch Ψ_B", "MABN-centered", {}, ("psi",)),
    "g_psi_batch": (
        "centered: batch g_B and Ψ_B (BN's backward)",
        "MABN-centered",
        {},
        ("g", "psi"),
    ),
    "d0": ("centered: no shift d (d_max = 0)", "MABN-centered", {"d_max": 0.0}, ()),
    "norenorm": (
        "centered: no renormalization (r = 1, d = 0)",
        "MABN-centered",
        {"renorm_start": NO_RENORM},
        (),
    ),
    "m2": ("centered: window m = 2 (between 0.2 and 0.3)", "MABN-centered", {"buffer_size": 2}, ()),
    "warm_m": (
        "centered: warm-up of m = 16 steps only",
        "MABN-centered",
        {"warmup_steps": "m"},
        (),
    ),
    "warm25": ("centered: warm-up 25 % of the steps", "MABN-centered", {"warmup_steps": 0.25}, ()),
    "ema98": (
        "centered: momentum 0.98 per update (paper)",
        "MABN-centered",
        {"momentum": 0.98},
        (),
    ),
    "ema98_norenorm": (
        "centered: momentum 0.98, no renormalization",
        "MABN-centered",
        {"momentum": 0.98, "renorm_start": NO_RENORM},
        (),
    ),
    "plain_ema98": ("plain: momentum 0.98 per update (paper)", "MABN", {"momentum": 0.98}, ()),
    "BN": ("BatchNorm, two-pass variance (the demo's)", "BN", {}, ()),
    "m4": ("centered: window m = 4", "MABN-centered", {"buffer_size": 4}, ()),
    "m8": ("centered: window m = 8", "MABN-centered", {"buffer_size": 8}, ()),
}
MLP_DEFAULT = list(VARIANTS)[: list(VARIANTS).index("plain_ema98") + 1]
REGIMES = {"true": (2, 2), "simulated": (2, sb.REFERENCE_BATCH)}

# The convnet at library defaults (issue 19): (label, norm, MABN keyword overrides,
# statistics taken from the batch instead of the window). "BN" is nn.BatchNorm with
# the two-pass variance; every MABN row starts from MABN()'s own defaults (centered:
# m = clip(ceil(16 / positions), 2, 16) per layer, plain: m = 16; warm-up 100, renorm
# from 1000, momentum 0.98, r_max = d_max = 5) and changes what its label says. The
# override "conv" puts the centered layer after CenteredConv instead of nn.Conv (or
# the plain layer after nn.Conv);
# "centralize" keeps nn.Conv's kernels centered by the optimizer instead
# (mabn_jax.optax.centralize, from mabn_jax.optax.center'ed params: CenteredConv's
# effective weights). "mu" takes the forward mean μ_B from the batch (a patch, as
# for g and Ψ in the backward pass).
CONV_VARIANTS = {
    "BN": ("BatchNorm, two-pass variance", "BN", {}, ()),
    "plain": ("plain MABN (after CenteredConv), defaults", "MABN", {}, ()),
    "plain_conv": ("plain MABN after nn.Conv, defaults", "MABN", {"conv": "Conv"}, ()),
    "plain_centralize": (
        "plain MABN after nn.Conv, optimizer mabn_jax.optax.centralize",
        "MABN",
        {"conv": "Conv", "centralize": True},
        (),
    ),
    "centered": ("centered MABN, defaults (m per layer)", "MABN-centered", {}, ()),
    "m2": ("centered: window m = 2 (between 0.2 and 0.3)", "MABN-centered", {"buffer_size": 2}, ()),
    "adaptive": (
        "centered: m = clip(ceil(32 / values per channel and step), 2, 16)",
        "MABN-centered",
        {"buffer_size": "adaptive"},
        (),
    ),
    "m16": ("centered: m = 16 (the default up to 0.2)", "MABN-centered", {"buffer_size": 16}, ()),
    "d0": ("centered m = 16: no shift d (d_max = 0)", "MABN-centered", _M16_D0, ()),
    "norenorm": ("centered m = 16: no renormalization", "MABN-centered", _M16_NORENORM, ()),
    "warm500": ("centered m = 16: warm-up 500 steps", "MABN-centered", _M16_WARM500, ()),
    "m64": ("centered: window m = 64", "MABN-centered", {"buffer_size": 64}, ()),
    "m8": ("centered: window m = 8", "MABN-centered", {"buffer_size": 8}, ()),
    "m4": ("centered: window m = 4", "MABN-centered", {"buffer_size": 4}, ()),
    "m3": ("centered: window m = 3", "MABN-centered", {"buffer_size": 3}, ()),
    "g_batch": ("centered m = 16: batch g_B", "MABN-centered", {"buffer_size": 16}, ("g",)),
    "mu_batch": ("centered m = 16: batch μ_B", "MABN-centered", {"buffer_size": 16}, ("mu",)),
    "mu_g_batch": (
        "centered m = 16: batch μ_B and g_B",
        "MABN-centered",
        {"buffer_size": 16},
        ("mu", "g"),
    ),
    "cconv16": (
        "centered m = 16 after CenteredConv",
        "MABN-centered",
        {"buffer_size": 16, "conv": "CenteredConv"},
        (),
    ),
    "cconv16_mu_g": (
        "centered m = 16 after CenteredConv: batch μ_B and g_B",
        "MABN-centered",
        {"buffer_size": 16, "conv": "CenteredConv"},
        ("mu", "g"),
    ),
}

_backward_windows = _window.backward_windows
_normalize_bwd = _backward.normalize_bwd
_forward_windows = _window.forward_windows
_batch_stats: set[str] = set()  # which backward statistics use the batch value
_trace: dict = {}


def _patched_backward_windows(sl, use_batch, window, values, *args):
    used, cot = _backward_windows(sl, use_batch, window, values, *args)
    ctx = _trace.get("ctx")
    if ctx is not None:
        name = "psi" if window is ctx.psi_window else "g" if window is ctx.g_window else None
        if name is not None:
            _trace["seen"].add(name)
            if name in _batch_stats:
                return values, cot
    return used, cot


def _patched_bwd(spec, res, dy):
    ctx = next(r for r in res if isinstance(r, _backward.Ctx))
    _trace.update(ctx=ctx, seen=set())
    try:
        out = _normalize_bwd(spec, res, dy)
    finally:
        seen, _trace["ctx"] = _trace["seen"], None
    want = {"psi"} | ({"g"} if ctx.g_window is not None else set())
    if seen != want:
        raise RuntimeError(f"the backward patch saw {seen}, not {want}: mabn_jax._backward changed")
    return out


def _patched_forward_windows(state, sl, use_batch, mean_b, var_b):
    """The forward windows, with μ̃ replaced by μ_B where "mu" is asked for."""
    mean_w, var_w, mean, var = _forward_windows(state, sl, use_batch, mean_b, var_b)
    return mean_w, var_w, mean_b if "mu" in _batch_stats and mean is not None else mean, var


_window.backward_windows = _patched_backward_windows
_window.forward_windows = _patched_forward_windows
_backward.normalize.defvjp(_backward.normalize_fwd, _patched_bwd)


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


class AdaptiveWindow(nn.Module):
    """``MABN`` whose window spans about 32 values per channel (issue 30, item 16).

    ``m = clip(ceil(32 / n), 2, 16)`` with ``n`` the values one training step
    normalizes per channel (``batch`` × positions): 16 for dense features at batch
    2, 2 for a conv layer with 16 or more positions, 4 at 2×2. The candidate
    measured for ``buffer_size=None``; at batch 2 it is the centered layer's
    default since 0.3 (``MABNConfig.window_length``), which row "centered" runs.
    """

    batch: int
    overrides: tuple = ()

    @nn.compact
    def __call__(self, x, use_running_average=None):
        n = self.batch * math.prod(x.shape[1:-1])  # the training batch, also at test
        m = min(16, max(2, -(-32 // n)))
        layer = mabn_jax.MABN(**{**dict(self.overrides), "buffer_size": m}, name="MABN")
        return layer(x, use_running_average=use_running_average)


def _norm_kernels(params):
    """The mask of ``mabn_jax.optax.centralize``: every kernel but the head's (the
    last top-level ``Dense_*``), i.e. every kernel that feeds a norm."""
    head = max(k for k in params if k.startswith("Dense_"))
    return {
        k: jax.tree.map(lambda _, k=k: False, v)
        if k == head
        else jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", v)
        for k, v in params.items()
    }


def defaults_main(args):
    """Every norm at its library defaults, true batch 2, one row per variant: the
    convnet (issue 19) or, ``--model MLP-defaults``, the MLP of ``small_batch.py``
    (``CenteredDense`` / ``nn.Dense`` where the rows say ``CenteredConv`` / ``nn.Conv``)."""
    mlp = args.model == "MLP-defaults"
    data = sb.load_data("digits", None)
    if not mlp:
        data = upsample(data, args.size)
    steps = len(data[0]) // 2 * args.epochs
    model_name = (
        "MLP 256-256 on digits (8x8)"
        if mlp
        else f"ResNet 16-32-64 (3x3 stem, stride 2) on digits at {args.size}x{args.size}"
    )
    print(
        f"{model_name}, every norm at its library defaults, true batch 2, SGD momentum "
        f"0.9, cosine from lr {args.lr}, weight decay 5e-4, {args.epochs} epochs = {steps} "
        f"steps, {args.seeds} seeds; test error (%)\n"
    )
    print("| variant | mean | min | max | per seed |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.variants.split(","):
        label, norm, raw, batch_stats = CONV_VARIANTS[name]
        raw = dict(raw)
        conv_name = raw.pop("conv", "CenteredConv" if norm == "MABN" else "Conv")
        conv = mabn_jax.CenteredConv if conv_name == "CenteredConv" else nn.Conv
        centralize = _norm_kernels if raw.pop("centralize", False) else None
        if norm == "BN":
            layer = lambda: nn.BatchNorm(use_fast_variance=False)
        elif raw.get("buffer_size") == "adaptive":
            raw.pop("buffer_size")
            layer = lambda raw=raw, norm=norm: AdaptiveWindow(
                2, tuple({**raw, "centered": norm == "MABN-centered"}.items())
            )
        else:
            layer = lambda raw=raw, norm=norm: mabn_jax.MABN(
                centered=norm == "MABN-centered", **raw
            )
        if mlp:
            dense = mabn_jax.CenteredDense if conv_name == "CenteredConv" else nn.Dense
            label = label.replace("CenteredConv", "CenteredDense").replace("nn.Conv", "nn.Dense")
            model = sb.MLP(layer, dense)
        else:
            model = sb.ResNet(layer, conv, (16, 32, 64), stem_stride=2)
        _batch_stats.clear()
        _batch_stats.update(batch_stats)
        t0 = time.time()
        e = sb.train_and_evaluate(
            sb.Setup("MLP" if mlp else "ResNet", norm, 2, 2),
            data,
            args.seeds,
            args.epochs,
            False,
            model=model,
            lr=args.lr,
            centralize=centralize,
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
        choices=("MLP", "convnet", "MLP-defaults"),
        help="convnet: the ResNet at library defaults (issue 19); MLP-defaults: the MLP "
        "at library defaults (rows of CONV_VARIANTS)",
    )
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated rows of VARIANTS (MLP; default: MLP_DEFAULT) or of "
        "CONV_VARIANTS (convnet; default: all)",
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
    if args.quick:
        args.seeds, args.epochs, args.regimes = 1, 1, "true"
        if args.model == "MLP":
            args.variants = "plain,demo,g_psi_batch"
    if args.model != "MLP":
        args.variants = args.variants or ",".join(CONV_VARIANTS)
        return defaults_main(args)
    names = args.variants.split(",") if args.variants else MLP_DEFAULT
    variants = [VARIANTS[name] for name in names]
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
