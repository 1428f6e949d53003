"""benchmarks/aot_resnet.py's collective counting, on HLO text and on a CPU-compiled step.

The TPU figures themselves need libtpu (``make aot``); what is checked here is
that the counting the tables rest on reads compiled HLO right.
"""

import os
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from aot_resnet import collectives  # noqa: E402

HLO = """
  %all-reduce.1 = f32[512,1024]{1,0:T(8,128)} all-reduce(%fusion), channel_id=1
  %all-reduce-start.2 = (bf16[64]{0}, f32[8,8]{1,0}) all-reduce-start(%a, %b), channel_id=2
  %all-reduce-done.2 = (bf16[64]{0}, f32[8,8]{1,0}) all-reduce-done(%all-reduce-start.2)
  %all-gather-start = (f32[4]{0}, f32[64]{0}) all-gather-start(%c), dimensions={0}
  %all-gather-done = f32[64]{0} all-gather-done(%all-gather-start)
  ROOT %tuple = (f32[512,1024]{1,0}) tuple(%all-reduce.1)
"""


def test_counts_sync_and_async_collectives_once_with_result_bytes():
    assert collectives(HLO) == {
        "all-reduce": (2, 512 * 1024 * 4 + 64 * 2 + 64 * 4),
        "all-gather": (1, 64 * 4),
    }


def test_sharded_batch_gradient_is_one_all_reduce_on_cpu():
    mesh = Mesh(jax.devices()[:8], ("b",))
    rep = NamedSharding(mesh, P())
    f = jax.jit(lambda w, x: jax.grad(lambda w: (jnp.tanh(x @ w) ** 2).sum())(w), out_shardings=rep)
    w = jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=rep)
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(mesh, P("b")))
    assert collectives(f.lower(w, x).compile().as_text()) == {"all-reduce": (1, 16 * 32 * 4)}
