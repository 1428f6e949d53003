"""Time to first step: trace, lower and compile of a train step, MABN vs BN.

``python benchmarks/first_step.py`` (CPU, ~10 min; ``--layers 17,53`` for less):
a narrow bottleneck ResNet (widths 8-16-32-64, 16×16 images, batch 2) whose
depth sets the number of norm layers — 17 (stages 1-1-1-1), 53 (ResNet-50's
3-4-6-3), 104 (ResNet-101's 3-4-23-3), 155 (ResNet-152's 3-8-36-3) — and a
jitted SGD train step through it:

* BN: ``nn.BatchNorm`` + ``nn.Conv`` with ``jax.value_and_grad`` (linen) or
  ``nnx.BatchNorm`` + ``nnx.Conv`` with ``nnx.value_and_grad`` (NNX);
* MABN: the plain layer after ``CenteredConv``, the step the same with
  ``mabn_jax.value_and_grad`` (``mabn_jax.nnx.value_and_grad``);
* centered: ``MABN(centered=True)`` after the plain conv.

Each figure is the median of ``--rounds`` fresh ``jax.jit(step).trace(...)``,
``.lower()`` and ``.compile()`` (a new ``jax.jit`` each time, so no cache is
hit), the variants interleaved; ratios are to BN in the same process. The
ratios move by about ±10 % between runs on one machine; compile times depend
on the XLA backend (CPU here).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resnet import BottleneckBlock, ResNet  # noqa: E402

import mabn_jax  # noqa: E402

STAGES = {17: (1, 1, 1, 1), 53: (3, 4, 6, 3), 104: (3, 4, 23, 3), 155: (3, 8, 36, 3)}
WIDTHS = (8, 16, 32, 64)
VARIANTS = ("BN", "MABN", "centered")


def linen_step(variant: str, layers: int):
    """``(step, args)``: a jittable SGD train step of the linen ResNet and its inputs."""
    conv, norm = {
        "BN": (nn.Conv, nn.BatchNorm),
        "MABN": (mabn_jax.CenteredConv, functools.partial(mabn_jax.MABN, centered=False)),
        "centered": (nn.Conv, lambda **kw: mabn_jax.MABN(centered=True, **kw)),
    }[variant]
    model = ResNet(
        conv=conv, norm=norm, stage_sizes=STAGES[layers], widths=WIDTHS, block=BottleneckBlock
    )
    x, y = jnp.ones((2, 16, 16, 3)), jnp.zeros((2,), jnp.int32)
    variables = model.init(jax.random.key(0), x, train=False)
    grad = jax.value_and_grad if variant == "BN" else mabn_jax.value_and_grad

    def step(params, batch_stats, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), y])
            return loss, updates

        kw = {} if variant == "BN" else {"batch_stats": batch_stats}
        (loss, updates), grads = grad(loss_fn, has_aux=True, **kw)(params)
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return params, updates["batch_stats"], loss

    return step, (variables["params"], variables["batch_stats"], x, y)


def nnx_step(variant: str, layers: int):
    """``(step, args)`` for the NNX twin (``nnx.split`` state in, state out)."""
    from flax import nnx

    import mabn_jax.nnx as mnnx

    conv, norm = {
        "BN": (nnx.Conv, nnx.BatchNorm),
        "MABN": (mnnx.CenteredConv, functools.partial(mnnx.MABN, centered=False)),
        "centered": (nnx.Conv, lambda *a, **kw: mnnx.MABN(*a, centered=True, **kw)),
    }[variant]

    class ConvNorm(nnx.Module):
        def __init__(self, cin, cout, kernel, strides, rngs):
            self.conv = conv(
                cin, cout, (kernel, kernel), strides=strides, use_bias=False, rngs=rngs
            )
            self.norm = norm(cout, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.conv(x))

    class Block(nnx.Module):
        def __init__(self, cin, feats, strides, rngs):
            self.a = ConvNorm(cin, feats, 1, 1, rngs)
            self.b = ConvNorm(feats, feats, 3, strides, rngs)
            self.c = ConvNorm(feats, 4 * feats, 1, 1, rngs)
            project = cin != 4 * feats or strides != 1
            self.proj = ConvNorm(cin, 4 * feats, 1, strides, rngs) if project else None

        def __call__(self, x):
            h = self.c(nnx.relu(self.b(nnx.relu(self.a(x)))))
            return nnx.relu(h + (x if self.proj is None else self.proj(x)))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = ConvNorm(3, WIDTHS[0], 3, 1, rngs)
            blocks, cin = [], WIDTHS[0]
            for i, (n, w) in enumerate(zip(STAGES[layers], WIDTHS)):
                for j in range(n):
                    blocks.append(Block(cin, w, 2 if i > 0 and j == 0 else 1, rngs))
                    cin = 4 * w
            self.blocks = nnx.List(blocks)
            self.head = nnx.Linear(cin, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.stem(x))
            for block in self.blocks:
                x = block(x)
            return self.head(x.mean(axis=(1, 2)))

    model = Net(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    grad = nnx.value_and_grad if variant == "BN" else mnnx.value_and_grad
    x, y = jnp.ones((2, 16, 16, 3)), jnp.zeros((2,), jnp.int32)

    def step(state, x, y):
        model = nnx.merge(graphdef, state)

        def loss_fn(model):
            logits = model(x)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), y])

        loss, grads = grad(loss_fn)(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
        return nnx.state(model), loss

    return step, (state, x, y)


def time_phases(step, args) -> tuple[float, float, float]:
    """Seconds to trace, lower and compile a fresh ``jax.jit(step)``."""
    t0 = time.perf_counter()
    traced = jax.jit(lambda *a: step(*a)).trace(*args)  # a new function: no cache hit
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def table(api: str, layers: list[int], rounds: int) -> list[str]:
    make = linen_step if api == "linen" else nnx_step
    rows = [
        f"| {api}: norm layers | BN trace / total (s) | MABN trace, total (× BN) "
        "| centered trace, total (× BN) |",
        "|---|---|---|---|",
    ]
    for n in layers:
        steps = {v: make(v, n) for v in VARIANTS}
        times: dict[str, list] = {v: [] for v in VARIANTS}
        for _ in range(rounds):
            for v in VARIANTS:
                times[v].append(time_phases(*steps[v]))
        med = {
            v: (statistics.median(t[0] for t in ts), statistics.median(sum(t) for t in ts))
            for v, ts in times.items()
        }
        bn = med["BN"]
        cells = [f"{med[v][0] / bn[0]:.2f}×, {med[v][1] / bn[1]:.2f}×" for v in VARIANTS[1:]]
        rows.append(f"| {n} | {bn[0]:.2f} / {bn[1]:.2f} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="17,53,104,155")
    parser.add_argument("--api", default="linen,nnx")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    layers = [int(n) for n in args.layers.split(",")]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; median of {args.rounds}")
    out = []
    for api in args.api.split(","):
        out += table(api, layers, args.rounds) + [""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
