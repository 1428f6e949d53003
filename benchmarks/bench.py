"""MABN vs nn.BatchNorm / GroupNorm / LayerNorm: speed and memory, side by side.

Run with ``make bench`` (``python benchmarks/bench.py``); ``--full`` runs more
repetitions and the ResNet train step at a larger batch; ``--smoke`` runs every
section once on tiny programs, compiled without most optimizations (a test that the
script works: its numbers mean nothing). Every number is a ratio to
``nn.BatchNorm`` measured in the same process: all variants are
compiled and warmed up first, then timed in interleaved rounds (each round
times every variant once, in rotating order, so background load hits all of
them alike); the ratio is the median over rounds of the per-round ratios.

What is compared with what: "BN" is ``nn.BatchNorm`` with Flax's defaults,
whose variance is one pass, E[x²] − E[x]²; "BN two-pass" is
``nn.BatchNorm(use_fast_variance=False)``, E[(x − μ)²], the variance that
BatchRenorm and the centered MABN compute by default (exact at small batches;
``MABNConfig.use_fast_variance``). So MABN-centered is like for like with "BN
two-pass". The plain MABN computes no variance at all: it normalizes by E[x²]
(one reduction), which is its design, not a shortcut in the measurement.

Sections:
  layer   fwd+bwd of one norm layer on the NHWC shapes of the ResNet-50 stages,
          as a train step runs it: y, grads w.r.t. x and params, the state
          update (MABN: through mabn_jax.value_and_grad, which also records
          the backward statistics).
  train   a jitted SGD train step of ResNet10 (benchmarks/resnet.py) with
          MABN + CenteredConv vs nn.BatchNorm + nn.Conv (Flax's defaults: the
          plain MABN has no variance to compute either way); the MABN step is
          the BN step with mabn_jax.value_and_grad in place of jax.value_and_grad.
  infer   ResNet10 inference: MABN folded into the convs (mabn_jax.fold_params)
          vs BN folded vs GroupNorm vs LayerNorm (unfolded, they cannot fold).
  memory  bytes of residuals saved for the backward pass (leaves of an eager
          jax.vjp's closure: each primitive's own buffers, so an array kept
          twice counts twice) and XLA's temp buffer size of the compiled layer
          step and train step (what a jitted step allocates beyond its
          arguments and outputs).
  hlo     full-size (input-sized) fusions in the compiled layer fwd+bwd.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resnet import ResNet, conv_norm_pairs  # noqa: E402

import mabn_jax  # noqa: E402

STAGES = [(56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048)]


# ---------------------------------------------------------------- timing


def _block(out):
    return jax.block_until_ready(out)


def compare(fns: dict, baseline: str, rounds: int, min_time: float = 0.02) -> dict:
    """``{name: (median time, median per-round ratio, ratio of minimum times)}``.

    Ratios are to ``fns[baseline]()``. The ratio of the minima is the less
    noisy one on a loaded machine (the fastest round had the least interference).
    Each function is called ``inner`` times per timing, with ``inner`` chosen
    so one timing lasts at least ``min_time`` seconds.
    """
    names = list(fns)
    inner = {}
    for n in names:  # warm-up (compilation happened before) and calibration
        _block(fns[n]())
        t = time.perf_counter()
        _block(fns[n]())
        inner[n] = max(1, int(min_time / max(time.perf_counter() - t, 1e-6)))
    ratios = {n: [] for n in names}
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        t_round = {}
        for n in order:
            t = time.perf_counter()
            for _ in range(inner[n]):
                out = fns[n]()
            _block(out)
            t_round[n] = (time.perf_counter() - t) / inner[n]
        for n in names:
            ratios[n].append(t_round[n] / t_round[baseline])
            times[n].append(t_round[n])
    return {
        n: (
            statistics.median(times[n]),
            statistics.median(ratios[n]),
            min(times[n]) / min(times[baseline]),
        )
        for n in names
    }


def _row(cells, widths):
    return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"


def table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [_row(header, widths), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [_row(r, widths) for r in rows]
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------- layer fwd+bwd


def layer_step(module, x, dy):
    """A jitted fwd+bwd+state update of one norm layer, and its arguments.

    The loss is ``sum(y · dy)``, so ``∂L/∂y = dy``; its value is not returned,
    and XLA drops it. The MABN step is the others' with ``mabn_jax.value_and_grad``
    in place of ``jax.value_and_grad``.
    """
    is_mabn = isinstance(module, mabn_jax.MABN)
    kw = (
        {"use_running_average": False}
        if isinstance(module, (mabn_jax.MABN, mabn_jax.BatchRenorm, nn.BatchNorm))
        else {}
    )
    variables = module.init(jax.random.PRNGKey(0), x, **kw)
    params = variables["params"]
    stats = variables.get("batch_stats", {})

    def step(params, stats, x, dy):
        def loss_fn(params, x):
            y, upd = module.apply(
                {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"], **kw
            )
            return jnp.sum(y * dy), (y, upd)

        if is_mabn:
            grad_fn = mabn_jax.value_and_grad(
                loss_fn, argnums=(0, 1), has_aux=True, batch_stats=stats
            )
        else:
            grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (_, (y, upd)), (dparams, dx) = grad_fn(params, x)
        return y, dx, dparams, upd

    return jax.jit(step), (params, stats, x, dy)


# The centered layer as docs/benchmarks.md measured it: with the window of 16 that
# was its default up to 0.2 (now 2, docs/centered.md). The windows are [m, C]: their
# length moves the "arguments + outputs" bytes a little, not the x-sized traffic.
CENTERED = dict(centered=True, buffer_size=16)


def layer_modules(dtype, channels):
    return {
        "BN": nn.BatchNorm(dtype=dtype),
        "BN two-pass": nn.BatchNorm(use_fast_variance=False, dtype=dtype),
        "MABN": mabn_jax.MABN(dtype=dtype, centered=False),
        "MABN-centered": mabn_jax.MABN(**CENTERED, dtype=dtype),
        "GroupNorm(32)": nn.GroupNorm(num_groups=min(32, channels), dtype=dtype),
        # per sample over (H, W, C), as the paper's (and PyTorch's) LN for conv nets
        "LayerNorm": nn.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=-1, dtype=dtype),
    }


def bench_layers(batches, dtypes, rounds, stages=STAGES):
    print(f"\n### Layer fwd+bwd (time / nn.BatchNorm, median of {rounds} rounds)\n")
    names = list(layer_modules(jnp.float32, 32))
    rows = []
    for dtype in dtypes:
        for b in batches:
            for h, w, c in stages:
                key = jax.random.PRNGKey(b * c)
                x = jax.random.normal(key, (b, h, w, c), dtype)
                dy = jax.random.normal(jax.random.fold_in(key, 1), (b, h, w, c), dtype)
                fns = {}
                for n, m in layer_modules(dtype, c).items():
                    f, args = layer_step(m, x, dy)
                    f = f.lower(*args).compile()
                    fns[n] = functools.partial(f, *args)
                res = compare(fns, "BN", rounds)
                rows.append(
                    [jnp.dtype(dtype).name, f"({b},{h},{w},{c})", f"{res['BN'][0] * 1e3:.2f}"]
                    + [f"{res[n][1]:.2f}" for n in names[1:]]
                )
                del fns, x, dy
    table(["dtype", "shape", "BN ms"] + names[1:], rows)


# ---------------------------------------------------------------- ResNet


# Keyword arguments of the ResNet the train, infer and memory sections build: none
# (resnet.py's ResNet10); --smoke sets one stage of 16 channels.
RESNET: dict = {}


def make_model(kind, dtype=jnp.float32):
    if kind == "MABN":
        conv, norm = mabn_jax.CenteredConv, functools.partial(mabn_jax.MABN, centered=False)
    elif kind == "BN":
        conv, norm = nn.Conv, nn.BatchNorm
    elif kind == "GN":
        gn = lambda use_running_average, **kw: nn.GroupNorm(num_groups=16, **kw)
        conv, norm = nn.Conv, gn
    elif kind == "LN":
        ln = lambda use_running_average, **kw: nn.LayerNorm(
            reduction_axes=(1, 2, 3), feature_axes=-1, **kw
        )
        conv, norm = nn.Conv, ln
    elif kind == "folded":
        conv, norm = nn.Conv, None
    else:
        raise ValueError(kind)
    return ResNet(conv=conv, norm=norm, dtype=dtype, **RESNET)


def train_step_fn(kind, model, tx):
    """The train step: MABN's is BN's with ``mabn_jax.value_and_grad`` in place
    of ``jax.value_and_grad`` (the one line that differs)."""

    def loss_of(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, upd = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return loss_of(logits, y), upd

        if kind == "MABN":
            grad_fn = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=batch_stats)
        else:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, upd), grads = grad_fn(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, loss

    return step


def _resnet_setup(kind, batch, size=32):
    model = make_model(kind)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3))
    y = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, 10)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(2), x)
    tx = optax.sgd(0.1, momentum=0.9)
    args = (
        variables["params"],
        variables.get("batch_stats", {}),
        tx.init(variables["params"]),
        x,
        y,
    )
    return model, tx, args


def bench_train(batch, rounds):
    print(
        f"\n### ResNet10 train step, batch {batch}, 32x32x3, float32, SGD+momentum "
        f"(median of {rounds} rounds)\n"
    )
    fns, mem = {}, {}
    for kind in ("BN", "MABN"):
        model, tx, args = _resnet_setup(kind, batch)
        step = jax.jit(train_step_fn(kind, model, tx)).lower(*args).compile()
        fns[kind] = functools.partial(step, *args)
        mem[kind] = step.memory_analysis()
    res = compare(fns, "BN", rounds)
    table(
        ["model", "median ms / step", "ratio to BN (median of rounds)", "ratio of minima"],
        [
            [
                f"{k}" + (" + CenteredConv" if k == "MABN" else " + nn.Conv"),
                f"{res[k][0] * 1e3:.2f}",
                f"{res[k][1]:.3f}",
                f"{res[k][2]:.3f}",
            ]
            for k in fns
        ],
    )
    return mem


# ---------------------------------------------------------------- inference


def bench_inference(batch, rounds):
    print(
        f"\n### ResNet10 inference, batch {batch}, 32x32x3, float32 (median of {rounds} rounds)\n"
    )
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, 32, 32, 3))
    fns, checks = {}, []
    for kind in ("BN", "MABN", "GN", "LN"):
        model, _, (params, stats, _, _, _) = _resnet_setup(kind, batch)
        if kind in ("BN", "MABN"):
            # trained-looking statistics, so the folding check below means something
            # (MABN's step/skipped counters, floats, are left alone)
            stats = jax.tree_util.tree_map_with_path(
                lambda path, v: (
                    v
                    if path[-1].key in ("step", "skipped")
                    else v + 0.5 * jnp.abs(jax.random.normal(jax.random.PRNGKey(v.size), v.shape))
                ),
                stats,
            )
            unfolded = jax.jit(
                lambda p, s, x, m=model: m.apply({"params": p, "batch_stats": s}, x, train=False)
            )
            folded_params = mabn_jax.fold_params(
                model,
                {"params": params, "batch_stats": stats},
                conv_norm_pairs(stats),
                x,
                train=False,
            )
            folded = jax.jit(make_model("folded").apply)
            want, got = unfolded(params, stats, x), folded({"params": folded_params}, x)
            checks.append(
                f"{kind}: max |folded − unfolded| / max |unfolded| = "
                f"{float(jnp.abs(got - want).max() / jnp.abs(want).max()):.1e}"
            )
            fns[f"{kind} folded"] = functools.partial(folded, {"params": folded_params}, x)
            fns[f"{kind} unfolded"] = functools.partial(unfolded, params, stats, x)
        else:
            f = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x, train=False))
            fns[kind] = functools.partial(f, params, x)
    res = compare(fns, "BN folded", rounds)
    table(
        ["model", "images / s (median)", "time ratio to BN folded (median)", "ratio of minima"],
        [[k, f"{batch / res[k][0]:.0f}", f"{res[k][1]:.2f}", f"{res[k][2]:.2f}"] for k in fns],
    )
    print("\nFolding check: " + "; ".join(checks))


# ---------------------------------------------------------------- memory


def _nbytes(tree):
    return sum(
        leaf.size * leaf.dtype.itemsize
        for leaf in jax.tree_util.tree_leaves(tree)
        if hasattr(leaf, "dtype")
    )


def residual_bytes_train(kind, batch):
    model, _, (params, stats, _, x, y) = _resnet_setup(kind, batch)
    if kind == "MABN":
        probes = mabn_jax.init_probes(stats)
        f = lambda p, pr: model.apply(
            {"params": p, "batch_stats": stats, mabn_jax.PROBES: pr},
            x,
            train=True,
            mutable=["batch_stats"],
        )[0]
        _, vjp = jax.vjp(f, params, probes)
    else:
        f = lambda p: model.apply(
            {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )[0]
        _, vjp = jax.vjp(f, params)
    # The vjp closure's leaves are the residuals (and the primal params it closes over).
    return _nbytes(vjp) - _nbytes(params)


def residual_bytes_layer(module, x):
    f, (params, stats, x, dy) = layer_step(module, x, x)
    kw = {"use_running_average": False}
    if isinstance(module, mabn_jax.MABN):
        probes = mabn_jax.init_probes(stats)
        g = lambda x, p, pr: module.apply(
            {"params": p, "batch_stats": stats, mabn_jax.PROBES: pr},
            x,
            mutable=["batch_stats"],
            **kw,
        )[0]
        _, vjp = jax.vjp(g, x, params, probes)
    else:
        g = lambda x, p: module.apply(
            {"params": p, "batch_stats": stats}, x, mutable=["batch_stats"], **kw
        )[0]
        _, vjp = jax.vjp(g, x, params)
    return _nbytes(vjp)


def bench_memory(train_mem, batch, shape=(2, 56, 56, 256)):
    print("\n### Memory: residuals saved for the backward pass, and XLA temp buffers\n")
    rows = []
    x = jnp.ones(shape)
    for name, m in (
        ("BN", nn.BatchNorm()),
        ("BN two-pass", nn.BatchNorm(use_fast_variance=False)),
        ("MABN", mabn_jax.MABN(centered=False)),
        ("MABN-centered", mabn_jax.MABN(**CENTERED)),
    ):
        f, args = layer_step(m, x, x)
        mem = f.lower(*args).compile().memory_analysis()
        rows.append(
            [
                f"{name} layer ({','.join(map(str, shape))}) f32",
                f"{residual_bytes_layer(m, x) / 2**20:.2f} MiB",
                f"{mem.temp_size_in_bytes / 2**20:.2f} MiB",
                f"{(mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**20:.2f} MiB",
            ]
        )
    for kind in ("BN", "MABN"):
        mem = train_mem[kind]
        rows.append(
            [
                f"ResNet10 {kind} train step, batch {batch}",
                f"{residual_bytes_train(kind, batch) / 2**20:.2f} MiB",
                f"{mem.temp_size_in_bytes / 2**20:.2f} MiB",
                f"{(mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**20:.2f} MiB",
            ]
        )
    table(["what", "saved residuals", "XLA temp (compiled)", "arguments + outputs"], rows)


# ---------------------------------------------------------------- HLO


def _instructions(hlo_text):
    """``(name, output type, opcode, operand names)`` of the ENTRY computation."""
    entry = hlo_text[hlo_text.index("\nENTRY") :]
    pat = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*?)\)")
    for line in entry.splitlines()[1:]:
        m = pat.match(line)
        if m:
            args = re.sub(r"/\*.*?\*/", "", m.group(4))  # drop /*index=5*/ markers
            operands = [o.strip().lstrip("%") for o in args.split(",") if o.strip()]
            yield m.group(1), m.group(2), m.group(3), operands


def _x_sized(hlo_type, size):
    """Whether an HLO type (an array or a tuple of arrays) holds an array of
    ``size`` elements: x-sized in any shape (e.g. x bitcast to ``[1, *x.shape]``)."""
    return any(
        math.prod(int(d) for d in dims.split(",") if d) == size
        for dims in re.findall(r"\w+\[([\d,]*)\]", hlo_type)
    )


def hlo_report(dtype=jnp.float32, shape=(2, 56, 56, 256)):
    """Counts the compiled ops of one layer fwd+bwd that read or write x-sized arrays."""
    print(
        f"\n### Compiled layer fwd+bwd, {jnp.dtype(dtype).name} {shape}: ops on x-sized "
        "arrays (XLA CPU)\n"
    )
    size = math.prod(shape)
    x = jnp.ones(shape, dtype)
    rows = []
    for name, m in (
        ("BN", nn.BatchNorm(dtype=dtype)),
        ("BN two-pass", nn.BatchNorm(use_fast_variance=False, dtype=dtype)),
        ("MABN", mabn_jax.MABN(dtype=dtype, centered=False)),
        ("MABN-centered", mabn_jax.MABN(**CENTERED, dtype=dtype)),
    ):
        f, args = layer_step(m, x, x)
        instrs = list(_instructions(f.lower(*args).compile().as_text()))
        fulls = {n for n, out, op, _ in instrs if _x_sized(out, size) and op != "tuple"}
        passes = reads = writes = reductions = 0
        for _, out, op, operands in instrs:
            if op in ("parameter", "tuple", "bitcast", "get-tuple-element", "constant"):
                continue
            n_in = sum(o in fulls for o in operands)
            n_out = int(_x_sized(out, size))
            if n_in or n_out:
                passes += 1
                reads += n_in
                writes += n_out
                reductions += int(not n_out)  # x-sized in, per-channel out
        rows.append([name, passes, reductions, reads, writes])
    table(
        [
            "layer",
            "ops touching x-sized data",
            "of which reductions",
            "x-sized reads",
            "x-sized writes",
        ],
        rows,
    )
    print(
        "\n(x-sized inputs: x and dy; outputs: y and dx. The minimum for a BN-type "
        "layer: 2 writes, and 6 reads if the two backward sums share one pass)"
    )


# ---------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--full", action="store_true", help="more rounds; batch 32 train step")
    p.add_argument(
        "--smoke", action="store_true", help="one round on tiny shapes (a test, not a measurement)"
    )
    p.add_argument(
        "--only", default="layer,train,infer,memory,hlo", help="comma-separated sections to run"
    )
    args = p.parse_args(argv)
    sections = set(args.only.split(","))
    rounds = 15 if args.full else 5
    train_batch = 32 if args.full else 8
    batches, dtypes, stages = (2, 32), (jnp.float32, jnp.bfloat16), STAGES
    shape = (2, 56, 56, 256)  # the memory and hlo sections' layer input
    if args.smoke:  # every section's code on tiny programs, compiled fast: no measurement
        rounds, train_batch, batches, dtypes = 1, 2, (2,), (jnp.float32,)
        stages, shape = [(4, 4, 32)], (2, 4, 4, 32)
        RESNET.update(stage_sizes=(1,), widths=(16,))
        jax.config.update("jax_disable_most_optimizations", True)
    mode = (
        "smoke: a one-block ResNet stands in for ResNet10"
        if args.smoke
        else ("full" if args.full else "quick")
    )
    print(f"## mabn_jax benchmark ({mode})\n")
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, devices "
        f"{[d.device_kind for d in jax.devices()]}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    t0 = time.time()
    if "layer" in sections:
        bench_layers(batches, dtypes, rounds, stages)
    train_mem = None
    if "train" in sections or "memory" in sections:
        train_mem = bench_train(train_batch, rounds=3 * rounds)
    if "infer" in sections:
        bench_inference(train_batch, rounds=3 * rounds)
    if "memory" in sections:
        bench_memory(train_mem, train_batch, shape)
    if "hlo" in sections:
        for dtype in dtypes:
            hlo_report(dtype, shape)
    print(f"\n(total {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
