"""MABN in Flax NNX vs ``nnx.BatchNorm``: the train step, as a time ratio.

``python benchmarks/bench_nnx.py [--rounds 15] [--batch 8] [--smoke]`` (``--smoke``: a
one-block model, one round, compiled without most optimizations: a test that the
script works, whose numbers mean nothing). The model is
bench.py's ResNet10 (BasicBlock, stages 1-1-1-1, widths 16-32-64-128, 3×3
stem) written in NNX, on 32×32×3 images, float32, SGD with momentum via
``nnx.Optimizer``: ``nnx.Conv`` + ``nnx.BatchNorm`` with ``nnx.value_and_grad``
vs ``mabn_jax.nnx.CenteredConv`` + ``mabn_jax.nnx.MABN`` with
``mabn_jax.nnx.value_and_grad``. Timed with bench.py's ``compare`` (all
compiled and warmed up first, interleaved rounds in rotating order, median of
the per-round ratios) in one process.

Three timings of the same step:
  nnx.jit   as written in a train loop: ``train_step(model, optimizer, x, y)``
            under ``nnx.jit``, NNX's per-call graph handling included.
  cached    the same through ``nnx.cached_partial(train_step, model,
            optimizer)`` (Flax's remedy for that per-call overhead).
  compiled  the same step inside one ``jax.jit`` over ``nnx.split`` state
            (``nnx.merge`` in, ``nnx.state`` out): XLA time only, comparable
            with bench.py's linen ``train`` section.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time

import jax
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import compare, table  # noqa: E402

import mabn_jax.nnx as mnnx  # noqa: E402


class ConvNorm(nnx.Module):
    def __init__(self, cin, cout, kernel, strides, mabn: bool, rngs: nnx.Rngs):
        conv = mnnx.CenteredConv if mabn else nnx.Conv
        norm = functools.partial(mnnx.MABN, centered=False) if mabn else nnx.BatchNorm
        self.conv = conv(cin, cout, kernel, strides, padding="SAME", use_bias=False, rngs=rngs)
        self.norm = norm(cout, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.conv(x))


class BasicBlock(nnx.Module):
    def __init__(self, cin, cout, strides, mabn, rngs):
        self.a = ConvNorm(cin, cout, (3, 3), strides, mabn, rngs)
        self.b = ConvNorm(cout, cout, (3, 3), 1, mabn, rngs)
        self.proj = (
            ConvNorm(cin, cout, (1, 1), strides, mabn, rngs)
            if cin != cout or strides != 1
            else None
        )

    def __call__(self, x):
        h = self.b(nnx.relu(self.a(x)))
        return nnx.relu(h + (x if self.proj is None else self.proj(x)))


class ResNet10(nnx.Module):
    """bench.py's ResNet10 in NNX; ``mabn`` picks CenteredConv + MABN."""

    def __init__(self, mabn: bool, rngs: nnx.Rngs, widths=(16, 32, 64, 128), classes=10):
        self.stem = ConvNorm(3, widths[0], (3, 3), 1, mabn, rngs)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, 2 if i > 0 else 1, mabn, rngs))
            cin = w
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


def step_fn(value_and_grad):
    """The standard NNX train step; only the gradient function differs."""

    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return train_step


def setup(kind: str, batch: int, widths=(16, 32, 64, 128)):
    mabn = kind == "MABN"
    model = ResNet10(mabn, nnx.Rngs(0), widths)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    return model, optimizer, x, y, step_fn(mnnx.value_and_grad if mabn else nnx.value_and_grad)


def compiled_step(model, optimizer, x, y, step):
    """The step in one jax.jit over the split state (XLA only), compiled."""
    graphdef, state = nnx.split((model, optimizer))

    def pure(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss = step(model, optimizer, x, y)
        return loss, nnx.state((model, optimizer))

    return functools.partial(jax.jit(pure).lower(state, x, y).compile(), state, x, y)


def bench(batch: int, rounds: int, widths=(16, 32, 64, 128)) -> dict:
    jitted, cached, compiled = {}, {}, {}
    for kind in ("BN", "MABN"):
        model, optimizer, x, y, step = setup(kind, batch, widths)
        compiled[kind] = compiled_step(model, optimizer, x, y, step)
        fn = nnx.jit(step)
        jax.block_until_ready(fn(model, optimizer, x, y))  # compile
        jitted[kind] = functools.partial(fn, model, optimizer, x, y)
        cached[kind] = functools.partial(nnx.cached_partial(fn, model, optimizer), x, y)
    return {
        "nnx.jit": compare(jitted, "BN", rounds),
        "cached": compare(cached, "BN", rounds),
        "compiled": compare(compiled, "BN", rounds),
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="a test, not a measurement (see above)")
    args = p.parse_args(argv)
    widths = (16, 32, 64, 128)
    if args.smoke:
        args.rounds, args.batch, widths = 1, 2, (16,)
        jax.config.update("jax_disable_most_optimizations", True)
    print(
        f"## mabn_jax NNX train step vs nnx.BatchNorm\n\njax {jax.__version__}, backend "
        f"{jax.default_backend()}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    print(
        f"\n### ResNet10 (NNX) train step, batch {args.batch}, 32x32x3, float32, "
        f"SGD+momentum (median of {args.rounds} rounds)\n"
    )
    t0 = time.time()
    results = bench(args.batch, args.rounds, widths)
    rows = []
    for how, res in results.items():
        for kind in ("BN", "MABN"):
            rows.append(
                [
                    f"{how}",
                    "nnx.BatchNorm + nnx.Conv" if kind == "BN" else "MABN + CenteredConv",
                    f"{res[kind][0] * 1e3:.2f}",
                    f"{res[kind][1]:.3f}",
                    f"{res[kind][2]:.3f}",
                ]
            )
    table(
        [
            "timing",
            "model",
            "median ms / step",
            "ratio to BN (median of rounds)",
            "ratio of minima",
        ],
        rows,
    )
    print(f"\n(total {time.time() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main()
