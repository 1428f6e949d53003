"""ResNet-50 on the TPU compiler, deviceless: a data-parallel train step and folded inference.

Run with ``make aot`` (all tables; ``python benchmarks/aot_resnet.py``) or
``python benchmarks/aot_resnet.py --quick`` (16 chips of v5e only). Needs
``jax[tpu]`` of the project's jax version (``pip install -e '.[aot]'``).

Train step: ``benchmarks/resnet.py``'s ``ResNet50`` at 224×224, bfloat16
activations, float32 parameters and statistics, softmax cross-entropy, SGD with
momentum (optax), the state update; 2 images per chip. MABN is the paper's
recipe (``CenteredConv`` + ``MABN(centered=False)``, otherwise defaults) through
``mabn_jax.value_and_grad``; BN is ``nn.Conv`` + ``nn.BatchNorm`` as Flax's
ImageNet example configures it (momentum 0.9, epsilon 1e-5). Three modes:

* ``spmd``: plain ``jax.jit`` over the global batch sharded ``P('batch')``, no
  ``axis_name``: the statistics are the global batch's, XLA inserts the
  all-reduces;
* ``sync``: ``jax.shard_map`` with ``axis_name='batch'`` in every norm;
* ``local``: ``jax.shard_map`` without ``axis_name``: per-device statistics,
  ``batch_stats`` kept with a leading device axis (``P('batch')``).

In the shard_map modes the loss is ``sum / global_batch`` per device and the
replicated parameters' gradients are summed by autodiff (docs/multi_device.md).

Figures (per chip, from the compiled step): ``cost_analysis()['bytes
accessed']``, ``memory_analysis().peak_memory_in_bytes``, and the collectives
in ``as_text()`` (count of all-reduce ops, async starts counted once, and the
bytes of their results). They are the compiler's cost model and memory plan,
not timings.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU compiler works deviceless
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # silences libtpu's probe

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import table  # noqa: E402
from resnet import ResNet50, conv_norm_pairs  # noqa: E402

import mabn_jax  # noqa: E402

AXIS = "batch"
PER_CHIP = 2
IMAGE = (224, 224, 3)
MODES = ("spmd", "sync", "local")
# 16 and 256 chips (one device per chip: v5p's megacore is one device; a v4
# topology lists each chip's two TensorCores, "v4:2x2x4" has 32). v6e is listed,
# but libtpu 0.0.42.1 crashes compiling ResNet-50 for it (docs/benchmarks.md).
TOPOLOGIES = {
    "v5e": {16: "v5e:4x4", 256: "v5e:16x16"},
    "v5p": {16: "v5p:2x2x4", 256: "v5p:8x8x4"},
    "v6e": {16: "v6e:4x4", 256: "v6e:16x16"},
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {
    "f32": 4,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "pred": 1,
    "s8": 1,
    "u8": 1,
}


def make_model(kind, axis_name=None, net=None):
    """``kind``: MABN, MABN-centralize (plain ``nn.Conv`` with kernels kept centered
    by ``mabn_jax.optax.centralize``), BN, GN (GroupNorm(32), cannot fold) or
    folded (conv + bias)."""
    if kind in ("MABN", "MABN-centralize"):
        conv = mabn_jax.CenteredConv if kind == "MABN" else nn.Conv
        # The paper's recipe: the plain layer (centered=False) after centered kernels.
        norm = functools.partial(mabn_jax.MABN, axis_name=axis_name, centered=False)
    elif kind == "BN":
        conv, norm = (
            nn.Conv,
            functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5, axis_name=axis_name),
        )
    elif kind == "GN":
        conv = nn.Conv
        norm = lambda use_running_average, **kw: nn.GroupNorm(num_groups=32, **kw)  # noqa: E731
    elif kind == "folded":
        conv, norm = nn.Conv, None
    else:
        raise ValueError(kind)
    return (net or ResNet50)(conv=conv, norm=norm, dtype=jnp.bfloat16)


def train_step(kind, model, tx, global_batch):
    """The train step; MABN's differs from BN's only by ``mabn_jax.value_and_grad``."""

    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, upd = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            logits = logits.astype(jnp.float32)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
            return loss / global_batch, upd["batch_stats"]

        if kind.startswith("MABN"):
            grad_fn = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=batch_stats)
        else:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, new_stats), grads = grad_fn(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return step


def _abstract_state(model, tx, image):
    x = jax.ShapeDtypeStruct((1, *image), jnp.bfloat16)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)
    params = variables["params"]
    return params, variables.get("batch_stats", {}), jax.eval_shape(tx.init, params)


def _sds(tree, sharding, lead=None):
    """ShapeDtypeStructs of ``tree`` on ``sharding``; ``lead``: a leading axis of that size."""

    def one(a):
        shape = a.shape if lead is None else (lead, *a.shape)
        return jax.ShapeDtypeStruct(shape, a.dtype, sharding=sharding)

    return jax.tree_util.tree_map(one, tree)


def compile_train(kind, mode, devices, make=None, image=None):
    """The compiled train step; ``make(kind, axis_name)`` builds the model
    (default :func:`make_model`, ResNet-50) for ``image``-sized inputs."""
    make, image = make or make_model, image or IMAGE
    n = len(devices)
    mesh = Mesh(devices, (AXIS,))
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    tx = optax.sgd(0.1, momentum=0.9)
    if kind == "MABN-centralize":
        tx = mabn_jax.optax.centralize(tx, _norm_kernels, center_updates=False)  # SGD: linear
    params, stats, opt = _abstract_state(make(kind), tx, image)
    gb = n * PER_CHIP
    x = jax.ShapeDtypeStruct((gb, *image), jnp.bfloat16, sharding=shard)
    y = jax.ShapeDtypeStruct((gb,), jnp.int32, sharding=shard)
    local = mode == "local"
    args = (
        _sds(params, rep),
        _sds(stats, shard if local else rep, n if local else None),
        _sds(opt, rep),
        x,
        y,
    )
    if mode == "spmd":
        step = train_step(kind, make(kind), tx, gb)
        fn = jax.jit(step, out_shardings=(rep, rep, rep, rep))
    else:
        model = make(kind, axis_name=None if local else AXIS)
        inner = train_step(kind, model, tx, gb)

        def body(params, stats, opt, x, y):
            if local:  # this device's state: a leading axis of size 1 inside shard_map
                stats = jax.tree_util.tree_map(lambda a: a[0], stats)
            params, stats, opt, loss = inner(params, stats, opt, x, y)
            if local:
                stats = jax.tree_util.tree_map(lambda a: a[None], stats)
            return params, stats, opt, jax.lax.psum(loss, AXIS)

        st = P(AXIS) if local else P()
        fn = jax.jit(
            jax.shard_map(
                body,
                mesh=mesh,
                in_specs=(P(), st, P(), P(AXIS), P(AXIS)),
                out_specs=(P(), st, P(), P()),
            )
        )
    return fn.lower(*args).compile()


def _norm_kernels(params):
    """True at the kernels of the convolutions followed by a norm (``…_conv``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: (
            str(getattr(path[-2], "key", "")).endswith("_conv")
            and getattr(path[-1], "key", None) == "kernel"
        ),
        params,
    )


def _result_bytes(type_str):
    return sum(
        _BYTES.get(dt, 4) * _prod(dims)
        for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", type_str)
    )


def _prod(dims):
    out = 1
    for d in filter(None, dims.split(",")):
        out *= int(d)
    return out


def collectives(hlo_text):
    """``{op: (count, result bytes)}`` over the compiled module (async pairs counted once)."""
    found = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z\-]+)\(", line)
        if not m:
            continue
        op = m.group(2).removesuffix("-start")
        if op in COLLECTIVES and not m.group(2).endswith("-done"):
            c, b = found.get(op, (0, 0))
            rtype = m.group(1)
            if m.group(2).endswith("-start") and op != "all-reduce":
                # all-gather-start / collective-permute-start return (operands, results):
                # count the results; all-reduce-start's shape is its result's
                rtype = rtype[len(rtype) // 2 :]
            found[op] = (c + 1, b + _result_bytes(rtype))
    return found


def figures(comp):
    text = comp.as_text()
    col = collectives(text)
    other = {k: v for k, v in col.items() if k != "all-reduce"}
    ar = col.get("all-reduce", (0, 0))
    host = len(re.findall(r"custom_call_target=\"[^\"]*(?:callback|host)", text, re.I)) + len(
        re.findall(r"\b(?:send|recv|outfeed|infeed)\(", text)
    )
    return {
        "bytes": comp.cost_analysis()["bytes accessed"],
        "peak": comp.memory_analysis().peak_memory_in_bytes,
        "ar_n": ar[0],
        "ar_bytes": ar[1],
        "other": other,
        "host": host,
    }


def _mib(b):
    return f"{b / 2**20:.1f}"


def train_table(gens, chip_counts, modes=MODES):
    print(
        "\n### ResNet-50 train step, 224×224 bf16, 2 images per chip, per chip "
        "(TPU compiler's cost model and memory plan)\n"
    )
    rows, t0 = [], time.time()
    for gen in gens:
        for n in chip_counts:
            topo = TOPOLOGIES[gen][n]
            devices = tpu_devices(topo)
            for mode in modes:
                f = {}
                for kind in ("BN", "MABN", "MABN-centralize"):
                    t = time.time()
                    f[kind] = figures(compile_train(kind, mode, devices))
                    print(
                        f"  {kind} {mode} {topo}: {f[kind]} ({time.time() - t:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                b, m, c = f["BN"], f["MABN"], f["MABN-centralize"]
                rows.append(
                    [
                        topo,
                        mode,
                        _mib(b["bytes"]),
                        _mib(m["bytes"]),
                        f"{m['bytes'] / b['bytes']:.3f}",
                        _mib(b["peak"]),
                        _mib(m["peak"]),
                        f"{m['peak'] / b['peak']:.3f}",
                        f"{c['bytes'] / b['bytes']:.3f} / {c['peak'] / b['peak']:.3f}",
                        f"{b['ar_n']} / {_mib(b['ar_bytes'])}",
                        f"{m['ar_n']} / {_mib(m['ar_bytes'])}",
                        _other(b, m),
                    ]
                )
    table(
        [
            "topology",
            "mode",
            "BN MiB accessed",
            "MABN MiB accessed",
            "MABN / BN bytes",
            "BN peak MiB",
            "MABN peak MiB",
            "MABN / BN peak",
            "nn.Conv + MABN + centralize: bytes / peak vs BN",
            "BN all-reduces / MiB",
            "MABN all-reduces / MiB",
            "other collectives, host transfers (BN; MABN)",
        ],
        rows,
    )
    print(f"\n({3 * len(rows)} compiles in {time.time() - t0:.0f} s)")


def _other(b, m):
    def one(f):
        parts = [f"{k} {c}" for k, (c, _) in sorted(f["other"].items())]
        return ", ".join(parts + [f"host {f['host']}"])

    return f"{one(b)}; {one(m)}"


def against(label, f, base):
    """A table row: ``f``'s bytes and peak, and their ratios to ``base``'s."""
    print(f"  {label}: {f}", file=sys.stderr, flush=True)
    return [
        label,
        _mib(f["bytes"]),
        f"{f['bytes'] / base['bytes']:.3f}",
        _mib(f["peak"]),
        f"{f['peak'] / base['peak']:.3f}",
    ]


_PLAIN_M1 = {"centered": False, "buffer_size": 1}
SPLIT_ROWS = (  # label, kind, convolution, keyword arguments of the MABN layer
    ("nn.Conv + BN", "BN", nn.Conv, {}),
    ("nn.Conv + MABN(centered=False)", "MABN", nn.Conv, {"centered": False}),
    ("nn.Conv + MABN(centered=False, buffer_size=1)", "MABN", nn.Conv, _PLAIN_M1),
    ("nn.Conv + MABN (centered, the default)", "MABN", nn.Conv, {}),
    ("CenteredConv + BN", "BN", mabn_jax.CenteredConv, {}),
    ("CenteredConv + MABN(centered=False)", "MABN", mabn_jax.CenteredConv, {"centered": False}),
)


def split_table():
    """Where MABN's step differs from BN's: each of its two changes alone, one v5e chip."""
    print(
        "\n### ResNet-50 train step on one v5e chip: the convolution and the norm swapped "
        "separately (TPU compiler's cost model and memory plan)\n"
    )
    device = tpu_devices("v5e:2x2")[:1]
    rows, base, state = [], None, {}
    for label, kind, conv, kwargs in SPLIT_ROWS:

        def make(kind, axis_name=None, conv=conv, kwargs=kwargs):
            model = make_model(kind, axis_name).clone(conv=conv)
            if kind == "MABN":
                model = model.clone(
                    norm=functools.partial(mabn_jax.MABN, axis_name=axis_name, **kwargs)
                )
            return model

        f = figures(compile_train(kind, "spmd", device, make=make))
        base = base or f
        rows.append(against(label, f, base))
        stats = _abstract_state(make(kind), optax.sgd(0.1), IMAGE)[1]
        state[label.split(" + ")[1]] = sum(
            a.size * a.dtype.itemsize for a in jax.tree.leaves(stats)
        )
    table(["model", "MiB accessed", "bytes / BN", "peak MiB", "peak / BN"], rows)
    print(
        "\nbatch_stats per chip (MiB): "
        + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in state.items())
    )


def infer_table(batch):
    """Inference on one v5e chip: MABN and BN folded by fold_params, GroupNorm unfolded."""
    print(
        f"\n### ResNet-50 inference, batch {batch}, 224×224 bf16, one v5e chip "
        "(TPU compiler's cost model and memory plan)\n"
    )
    device = tpu_devices("v5e:2x2")[:1]
    mesh = Mesh(device, (AXIS,))
    rep = NamedSharding(mesh, P())
    x = jax.ShapeDtypeStruct((batch, *IMAGE), jnp.bfloat16, sharding=rep)
    rows, base = [], None
    for kind in ("BN", "MABN", "GN"):
        model = make_model(kind)
        variables = jax.eval_shape(
            functools.partial(model.init, train=False), jax.random.PRNGKey(0), x
        )
        variants = {"unfolded": (model, variables)}
        if kind != "GN":  # fold_params traced abstractly: the deployment params' tree
            folded = jax.eval_shape(
                lambda v, m=model: mabn_jax.fold_params(
                    m, v, conv_norm_pairs(v["batch_stats"]), x, train=False
                ),
                variables,
            )
            variants = {"folded": (make_model("folded"), {"params": folded}), **variants}
        for form, (m, v) in variants.items():
            fn = jax.jit(functools.partial(m.apply, train=False))
            f = figures(fn.lower(_sds(v, rep), x).compile())
            base = base or f
            rows.append(against(f"{kind} {form}", f, base))
    table(["model", "MiB accessed", "bytes / BN folded", "peak MiB", "peak / BN folded"], rows)


def tpu_devices(topology):
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices


def use_smoke_model():
    """A one-block ResNet at 32×32 in place of ResNet-50 (the scripts' ``--smoke``)."""
    global ResNet50, IMAGE
    ResNet50 = functools.partial(ResNet50, stage_sizes=(1,), widths=(32,), num_classes=10)
    IMAGE = (32, 32, 3)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="16 chips of v5e only")
    p.add_argument(
        "--only", default="train,split,infer", help="comma-separated: train, split, infer"
    )
    p.add_argument("--gens", default="v5e,v5p", help="comma-separated of: " + ",".join(TOPOLOGIES))
    p.add_argument("--chips", default="16,256", help="comma-separated of: 16, 256")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated of: spmd, sync, local")
    p.add_argument(
        "--smoke", action="store_true", help="a test: a one-block ResNet, 4 v5e chips, sync"
    )
    args = p.parse_args(argv)
    if args.smoke:  # the tables' code on a small model, in seconds (tests/test_scripts_smoke.py)
        use_smoke_model()
        TOPOLOGIES["v5e"][4] = "v5e:2x2"
        args.gens, args.chips, args.modes = "v5e", "4", "sync"
        print("(smoke: a one-block ResNet at 32×32 stands in for ResNet-50)")
    gens, chips = args.gens.split(","), [int(c) for c in args.chips.split(",")]
    if args.quick:
        gens, chips = ["v5e"], [16]
    print(f"## ResNet-50 on the TPU compiler (deviceless; jax {jax.__version__})")
    only = args.only.split(",")
    if "train" in only:
        train_table(gens, chips, args.modes.split(","))
    if "split" in only:
        split_table()
    if "infer" in only:
        infer_table(PER_CHIP)


if __name__ == "__main__":
    main()
