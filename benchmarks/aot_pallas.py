"""Does the TPU compiler's ``bytes accessed`` count a Pallas kernel's traffic?

``python benchmarks/aot_pallas.py`` (needs ``jax[tpu]``: ``make aot-install``)
compiles, deviceless for one v5e chip, ``y = 2 · x`` (one XLA fusion: read x,
write y) and ``y = 2 · copy(x)`` with the copy a Pallas TPU kernel (Mosaic:
read x, write c; then the fusion reads c, writes y), and prints each program's
``cost_analysis()['bytes accessed']``. A kernel whose traffic is not counted
would look cheaper on this metric than it is, which is why
``docs/benchmarks.md`` compares MABN and BN with XLA code only.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU compiler works deviceless
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # silences libtpu's probe

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

SHAPE = (104, 2048)  # about the (2,7,7,2048) bfloat16 row of benchmarks/aot.py


def _copy_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...]


def pallas_copy(x):
    return pl.pallas_call(_copy_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)


def bytes_accessed(copy) -> float:
    device = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
    x = jax.ShapeDtypeStruct(SHAPE, jnp.bfloat16, sharding=SingleDeviceSharding(device))
    compiled = jax.jit(lambda x: 2 * copy(x)).lower(x).compile()
    return compiled.cost_analysis()["bytes accessed"]


def main():
    nx = SHAPE[0] * SHAPE[1] * 2
    plain = bytes_accessed(lambda x: x)
    pallas = bytes_accessed(pallas_copy)
    print(f"x: {SHAPE} bfloat16, |x| = {nx} bytes")
    print(f"y = 2 · x (moves 2 |x|):               bytes accessed {plain / nx:.2f} |x|")
    print(f"y = 2 · pallas_copy(x) (moves 4 |x|):  bytes accessed {pallas / nx:.2f} |x|")


if __name__ == "__main__":
    main()
