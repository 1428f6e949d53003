"""What the TPU compiler makes of each norm layer, compiled deviceless on a CPU machine.

Run with ``make aot`` (``python benchmarks/aot.py``; ``--quick``: one shape per
dtype). Needs ``jax[tpu]`` (libtpu) of the project's jax version: ``pip install
-e '.[aot]'``. ``jax.experimental.topologies`` describes a TPU slice without
one, and ``jax.jit(step).lower(<ShapeDtypeStructs on its devices>).compile()``
runs the real TPU compiler here. The figures are the compiler's own cost model
(``cost_analysis()['bytes accessed']``) and memory plan, not timings.

Layer rows: one jitted fwd+bwd+state update of a single layer (benchmarks/bench.py's
``layer_step``), bytes accessed as a multiple of the input's size. The **floor**
is what a fused forward+backward must move when the rest of the network sits
between them: read x for the statistics, read x again and write y; read x and
dy for the two backward sums (one pass), read them again and write dx (8·|x|),
plus one more read of x for a two-pass variance, plus the layer's small
arguments and outputs (parameters, state) read and written once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU compiler works deviceless
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # silences libtpu's probe

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import STAGES, layer_step, table  # noqa: E402
from bench import layer_modules as bench_layer_modules  # noqa: E402

import mabn_jax  # noqa: E402

TWO_PASS = ("BN two-pass", "MABN-centered (m=16)", "MABN-centered (m=2)", "BatchRenorm")


def tpu_device(topology="v5e:2x2"):
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]


def layer_modules(dtype, channels):
    """bench.py's layers (less LayerNorm), the centered MABN at its default
    window (2) beside bench.py's 16, and BatchRenorm before GroupNorm."""
    mods = bench_layer_modules(dtype, channels)
    mods.pop("LayerNorm")
    gn = mods.pop("GroupNorm(32)")
    return {
        "BN": mods["BN"],
        "BN two-pass": mods["BN two-pass"],
        "MABN": mods["MABN"],
        "MABN-centered (m=16)": mods["MABN-centered"],
        "MABN-centered (m=2)": mabn_jax.MABN(centered=True, dtype=dtype),
        "BatchRenorm": mabn_jax.BatchRenorm(dtype=dtype),
        "GroupNorm(32)": gn,
    }


def compile_layer(module, x, device):
    f, args = layer_step(module, x, x)
    sh = SingleDeviceSharding(device)
    specs = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), args
    )
    return f.lower(*specs).compile()


def layer_table(shapes, dtypes, device):
    """Prints the layer table; returns ``(dtype, shape, BN's bytes)`` for the
    rows where plain MABN moves more bytes than nn.BatchNorm."""
    print("\n### Layer fwd+bwd on the TPU compiler (v5e): bytes accessed / input bytes\n")
    names = list(layer_modules(jnp.float32, 32))
    rows, above, t0, n = [], [], time.time(), 0
    for dtype in dtypes:
        for shape in shapes:
            x = jnp.zeros(shape, dtype)
            nx = x.size * x.dtype.itemsize
            cells, floor = [], None
            for name, m in layer_modules(dtype, shape[-1]).items():
                comp = compile_layer(m, x, device)
                n += 1
                mem = comp.memory_analysis()
                small = mem.argument_size_in_bytes + mem.output_size_in_bytes - 4 * nx
                fl = 8 * nx + small + (nx if name in TWO_PASS else 0)
                if name == "MABN":
                    floor = fl
                cells.append(comp.cost_analysis()["bytes accessed"] / nx)
            c = dict(zip(names, cells))
            if c["MABN"] > c["BN"]:
                above.append((dtype, shape, c["BN"] * nx))
            rows.append(
                [jnp.dtype(dtype).name, "(" + ",".join(map(str, shape)) + ")"]
                + [f"{v:.2f}" for v in cells]
                + [
                    f"{floor / nx:.2f}",
                    f"{c['MABN'] * nx / floor:.2f}",
                    f"{c['MABN'] / c['BN']:.3f}",
                    f"{c['MABN-centered (m=16)'] / c['BN two-pass']:.3f}",
                    f"{c['MABN-centered (m=2)'] / c['BN two-pass']:.3f}",
                ]
            )
    table(
        ["dtype", "shape"]
        + names
        + [
            "MABN floor",
            "MABN / floor",
            "MABN / BN",
            "centered (m=16) / BN two-pass",
            "centered (m=2) / BN two-pass",
        ],
        rows,
    )
    print(f"\n({n} compiles in {time.time() - t0:.0f} s)")
    return above


WINDOWS = (1, 2, 4, 16)


def window_table(rows, device):
    """Plain MABN's bytes against nn.BatchNorm's (``rows``: ``(dtype, shape,
    BN's bytes)``, from :func:`layer_table`) as its window ``m`` grows.

    The program is the same for every ``m``; only the state's two ``[m, C]``
    float32 windows grow, so the column for ``m = 1`` is the rest of MABN's
    step and the others show what the windows cost.
    """
    print(
        "\n### Plain MABN / nn.BatchNorm bytes by window length m (the same "
        "program; only the state's two [m, C] windows grow)\n"
    )
    out = []
    for dtype, shape, bn in rows:
        x = jnp.zeros(shape, dtype)
        nx = x.size * x.dtype.itemsize
        cells = []
        for m in WINDOWS:
            comp = compile_layer(
                mabn_jax.MABN(dtype=dtype, buffer_size=m, centered=False), x, device
            )
            cells.append(f"{comp.cost_analysis()['bytes accessed'] / bn:.4f}")
        window = WINDOWS[-1] * shape[-1] * 4  # one float32 [16, C] window
        out.append(
            [jnp.dtype(dtype).name, "(" + ",".join(map(str, shape)) + ")", f"{window / nx:.4f}"]
            + cells
        )
    table(["dtype", "shape", "16-row window / x (bytes)"] + [f"m = {m}" for m in WINDOWS], out)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="one batch-2 and one batch-32 shape")
    p.add_argument("--smoke", action="store_true", help="a test: one tiny float32 shape")
    args = p.parse_args(argv)
    print(f"## mabn_jax on the TPU compiler (deviceless; jax {jax.__version__})")
    device = tpu_device()
    shapes = [(b, h, w, c) for b in (2, 32) for h, w, c in STAGES]
    if args.quick:
        shapes = [(2, 7, 7, 2048), (32, 56, 56, 256)]
    dtypes = (jnp.float32, jnp.bfloat16)
    if args.smoke:  # the tables' code in seconds (tests/test_scripts_smoke.py)
        shapes, dtypes = [(2, 4, 4, 32)], (jnp.float32,)
    window_table(layer_table(shapes, dtypes, device), device)


if __name__ == "__main__":
    main()
