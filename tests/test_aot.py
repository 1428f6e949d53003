"""Compile-time checks on the TPU compiler, deviceless (no TPU needed).

``jax.experimental.topologies`` describes a TPU slice without one, and
``jax.jit(f).lower(<ShapeDtypeStructs on its devices>).compile()`` runs the real
TPU compiler (libtpu, from ``jax[tpu]``: ``pip install -e '.[aot]'``, which
``.ci/run`` does). The compiled figures are deterministic, so they are
asserted: bytes accessed against ``nn.BatchNorm`` (a regression guard), the
absence of host callbacks and transfers, and the collectives of per-device and
synchronized steps. Where libtpu is not installed every test here is skipped
with that reason (``pytest -rs`` lists it).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import warnings

import pytest

_NO_LIBTPU = importlib.util.find_spec("libtpu") is None
if _NO_LIBTPU:
    warnings.warn(
        "libtpu is not installed: the TPU-compiler tests in tests/test_aot.py are "
        "skipped (pip install -e '.[aot]' to run them)",
        stacklevel=1,
    )
pytestmark = pytest.mark.skipif(
    _NO_LIBTPU, reason="libtpu (the TPU compiler) is not installed: pip install -e '.[aot]'"
)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import mabn_jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench import layer_step  # noqa: E402


def _topology(name="v5e:2x2"):
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=name, platform="tpu")


def _compile(f, args, sharding):
    specs = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args
    )
    return f.lower(*specs).compile()


def _layer_bytes(module, shape, dtype):
    x = jnp.zeros(shape, dtype)
    f, args = layer_step(module, x, x)
    comp = _compile(f, args, SingleDeviceSharding(_topology().devices[0]))
    return comp.cost_analysis()["bytes accessed"], comp


# Rows of the full `make aot` table where plain MABN moves no more than nn.BatchNorm.
@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((32, 56, 56, 256), jnp.float32),
        ((32, 14, 14, 1024), jnp.float32),
        ((2, 28, 28, 512), jnp.bfloat16),
    ],
)
def test_plain_mabn_bytes_at_most_batchnorm(shape, dtype):
    mabn, _ = _layer_bytes(mabn_jax.MABN(dtype=dtype, centered=False), shape, dtype)
    bn, _ = _layer_bytes(nn.BatchNorm(dtype=dtype), shape, dtype)
    assert mabn <= bn, f"MABN {mabn:.0f} bytes > nn.BatchNorm {bn:.0f} at {shape} {dtype}"


def test_centered_mabn_bytes_at_most_two_pass_batchnorm():
    """The centered layer at its default window (2) against BN with the same
    two-pass variance, on the float32 row closest to it (0.97×, `make aot`)."""
    shape, dtype = (2, 7, 7, 2048), jnp.float32
    mabn, _ = _layer_bytes(mabn_jax.MABN(centered=True, dtype=dtype), shape, dtype)
    bn, _ = _layer_bytes(nn.BatchNorm(use_fast_variance=False, dtype=dtype), shape, dtype)
    assert mabn <= bn, f"centered MABN {mabn:.0f} bytes > two-pass nn.BatchNorm {bn:.0f}"


def test_plain_mabn_program_without_its_window_at_most_batchnorm():
    """On the row where MABN is furthest above BN (bfloat16 (2,7,7,2048), 1.29×),
    the same step with a one-row window is below it (0.98×, `make aot`'s window
    table): what is above BN there is the state's two [16, C] windows, and the
    rest of the program must stay lean."""
    shape, dtype = (2, 7, 7, 2048), jnp.bfloat16
    mabn, _ = _layer_bytes(mabn_jax.MABN(dtype=dtype, buffer_size=1, centered=False), shape, dtype)
    bn, _ = _layer_bytes(nn.BatchNorm(dtype=dtype), shape, dtype)
    assert mabn <= bn, f"MABN (window 1) {mabn:.0f} bytes > nn.BatchNorm {bn:.0f}"


_HOST = re.compile(
    r"callback|host|outfeed|infeed|\bsend\(|\brecv\(|send-done|recv-done", re.IGNORECASE
)


@pytest.mark.parametrize("centered", [False, True])
def test_compiled_step_has_no_host_traffic(centered):
    _, comp = _layer_bytes(mabn_jax.MABN(centered=centered), (2, 7, 7, 64), jnp.float32)
    text = comp.as_text()
    targets = re.findall(r'custom_call_target="([^"]+)"', text)
    assert not [t for t in targets if _HOST.search(t)], targets
    ops = [
        line
        for line in text.splitlines()
        if re.search(r"=\s*\S+\s+(send|recv|send-done|recv-done|outfeed|infeed)\(", line)
    ]
    assert not ops, ops


def _shard_map_step(module, mesh):
    """The layer step of ``layer_step`` per device under ``shard_map`` over ``data``."""
    x = jnp.zeros((8, 7, 7, 64), jnp.float32)  # 2 per device on 2x2
    f, args = layer_step(module, x, x)
    step = f.__wrapped__ if hasattr(f, "__wrapped__") else f

    def body(params, stats, x, dy):
        out = step(params, stats, x, dy)
        return jax.tree_util.tree_map(lambda a: a[None], out)  # each device's own

    sm = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(), P("data"), P("data")),
        out_specs=P("data"),
        check_vma=False,
    )
    params, stats, x, dy = args
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    specs = [
        jax.tree_util.tree_map(lambda a, s=s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), t)
        for t, s in ((params, rep), (stats, rep), (x, dat), (dy, dat))
    ]
    return jax.jit(sm).lower(*specs).compile().as_text()


_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8}


def _all_reduces(text):
    """(count, bytes) of the all-reduce ops in compiled HLO text."""
    lines = [
        line for line in text.splitlines() if re.search(r"=\s*.*\sall-reduce(-start)?\(", line)
    ]
    nbytes = 0
    for line in lines:
        result = line.split("all-reduce")[0]
        for dt, dims in re.findall(r"\b(f32|bf16|f16|s32|u32|pred|f64)\[([\d,]*)\]", result):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            nbytes += n * _ITEMSIZE[dt]
    return len(lines), nbytes


def _mesh():
    return Mesh(_topology().devices, ("data",))


def test_per_device_mabn_step_has_no_collective():
    text = _shard_map_step(mabn_jax.MABN(centered=False), _mesh())
    assert _all_reduces(text) == (0, 0)
    assert not re.search(r"all-gather|reduce-scatter|collective-permute|all-to-all", text)


@pytest.mark.parametrize("centered", [False, True])
def test_synchronized_mabn_step_has_batchnorms_collectives(centered):
    mesh = _mesh()
    mabn = _all_reduces(_shard_map_step(mabn_jax.MABN(centered=centered, axis_name="data"), mesh))
    bn = _all_reduces(
        _shard_map_step(nn.BatchNorm(axis_name="data", use_fast_variance=not centered), mesh)
    )
    assert bn[0] > 0
    # (count, bytes) on v5e:2x2, channels 64: plain MABN (2, 768) against BN's (2, 1024);
    # centered MABN (3, 1024) against BN two-pass's (4, 1024): never more ops nor bytes.
    assert mabn[0] <= bn[0] and mabn[1] <= bn[1], f"MABN {mabn}, nn.BatchNorm {bn}"
    if not centered:
        assert mabn[0] == bn[0], f"MABN {mabn} (all-reduces, bytes), nn.BatchNorm {bn}"


def _resnet_figures(kind, mode):
    """aot_resnet's figures of a small ResNet's train step, data-parallel on 16 v5e chips."""
    import functools

    import aot_resnet
    from resnet import ResNet

    make = functools.partial(aot_resnet.make_model, net=functools.partial(ResNet, num_classes=10))
    devices = aot_resnet.tpu_devices("v5e:4x4")
    comp = aot_resnet.compile_train(kind, mode, devices, make=make, image=(32, 32, 3))
    return aot_resnet.figures(comp)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "local"])
def test_resnet_step_on_16_chips_has_exactly_batchnorms_collectives(mode):
    # ResNet10 (CenteredConv + MABN vs nn.Conv + nn.BatchNorm), the make aot train step
    # under shard_map: synchronized (axis_name) and per-device statistics. Measured:
    # sync 19 all-reduces, 622,520 bytes (BN 19, 628,280); local 2 and 2 (the summed
    # gradients and the loss: per-device statistics add none).
    mabn, bn = _resnet_figures("MABN", mode), _resnet_figures("BN", mode)
    assert mabn["ar_n"] == bn["ar_n"], (mabn, bn)
    assert mabn["ar_bytes"] <= bn["ar_bytes"], (mabn, bn)
    assert mabn["other"] == bn["other"] == {} and mabn["host"] == 0, (mabn, bn)
    if mode == "local":
        assert mabn["ar_n"] == 2, mabn
