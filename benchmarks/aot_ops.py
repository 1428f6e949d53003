"""Where a layer step's bytes go on the TPU compiler: its compiled ops, one by one.

``python benchmarks/aot_ops.py MABN bfloat16 2,7,7,2048`` compiles
``benchmarks/aot.py``'s layer step (one v5e chip, deviceless; needs
``jax[tpu]``) and lists every top-level op of the compiled program with the
bytes of its operands and results as a multiple of the input's size, largest
first, and the arguments (``x``, ``dy``, ``stats[...]``, ``params[...]``) it
reads. A prefetch into the vector memory (``copy-start``/``copy-done``)
counts its array at both ends. The sum is close to, not equal to,
``cost_analysis()['bytes accessed']`` (printed above the list), which is the
compiler's own count. Layers: the names of ``aot.layer_modules``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU compiler works deviceless
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # silences libtpu's probe

import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aot import compile_layer, layer_modules, tpu_device  # noqa: E402

_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
_SKIP = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant")


def nbytes(type_str: str) -> int:
    total = 0
    for dt, dims in re.findall(r"\b(f32|bf16|f16|s32|u32|pred|s8|u8)\[([\d,]*)\]", type_str):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _ITEMSIZE[dt]
    return total


def entry_ops(hlo_text: str):
    """``(bytes, op, name, arguments read)`` for each op of the entry computation."""
    body = hlo_text[hlo_text.index("ENTRY") :]
    body = body[: body.index("\n}\n")]
    types, origin, ops = {}, {}, []
    for line in body.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)", line)
        if not m:
            continue
        name, rtype, op, rest = m.groups()
        types[name] = rtype
        args = re.findall(r"%([\w.\-]+)", rest.split("), kind=")[0] if op == "fusion" else rest)
        if op == "parameter":
            meta = re.search(r'op_name="([^"]+)"', line)
            origin[name] = meta.group(1).replace("\\'", "") if meta else name
            continue
        if op in _SKIP:
            if args:
                origin[name] = origin.get(args[0], args[0])
            continue
        if op in ("copy-start", "copy-done"):
            origin[name] = origin.get(args[0], args[0])
            size = nbytes(types[args[0]]) if op == "copy-start" else nbytes(rtype)
            moved = 2 * size  # the array read at one end, written at the other
        else:
            moved = sum(nbytes(types.get(a, "")) for a in args) + nbytes(rtype)
        reads = sorted({origin[a] for a in args if a in origin})
        ops.append((moved, op, name, reads))
    return ops


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("layer", help="e.g. MABN, BN, 'MABN-centered (m=2)'")
    p.add_argument("dtype", choices=["float32", "bfloat16"])
    p.add_argument("shape", help="NHWC, e.g. 2,7,7,2048")
    p.add_argument("--top", type=int, default=25, help="how many ops to list")
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    shape = tuple(int(d) for d in args.shape.split(","))
    x = jnp.zeros(shape, dtype)
    nx = x.size * dtype.itemsize
    comp = compile_layer(layer_modules(dtype, shape[-1])[args.layer], x, tpu_device())
    ops = sorted(entry_ops(comp.as_text()), key=lambda o: -o[0])
    total = comp.cost_analysis()["bytes accessed"]
    print(f"{args.layer} {args.dtype} {shape}: bytes accessed {total / nx:.2f} |x|")
    print(f"sum over the ops below and the rest: {sum(o[0] for o in ops) / nx:.2f} |x|\n")
    print("| |x| moved | op | name | arguments it reads |")
    print("|---|---|---|---|")
    for moved, op, name, reads in ops[: args.top]:
        print(f"| {moved / nx:.3f} | {op} | {name} | {', '.join(reads)} |")


if __name__ == "__main__":
    main()
