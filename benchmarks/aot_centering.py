"""Where weight centralization can be computed: the ResNet-50 pod step on the TPU compiler.

``python benchmarks/aot_centering.py`` (``--smoke``: a one-block ResNet on 4
chips, seconds). Needs ``jax[tpu]`` of the project's jax version (``pip install
-e '.[aot]'``). The step is ``aot_resnet.py``'s SPMD train step on 16 v5e chips
(ResNet-50, 224×224, bfloat16 activations, 2 images per chip, SGD with momentum
0.9); the figures are the compiler's cost model (bytes accessed) and memory plan
(peak), per chip, against ``nn.Conv`` + ``nn.BatchNorm``.

The paper's recipe normalizes with the plain MABN after convolutions whose
kernels have zero fan-in mean per output (``W̄ = W − mean(W)``). Every exact way
to keep that true needs the fan-in mean of the kernel gradient each step, which
BN's step does not compute. A reference row leaves it out (``nn.Conv`` +
the plain MABN: not the recipe); the others are the places it can come from:

* ``CenteredConv``: the layer centres the stored kernel in the forward pass, and
  autodiff projects its gradient (two kernel-sized reductions per step);
* ``centralize``: ``nn.Conv`` holding a centred kernel, and
  ``mabn_jax.optax.centralize(sgd, mask, center_updates=False)`` projecting the
  gradient before the optimizer (momentum SGD keeps a centred kernel centred);
* a convolution whose custom VJP returns the projected kernel gradient, so the
  optimizer gets it ready-made, with the fan-in mean taken

  - ``from the kernel gradient``: ``mean(∂L/∂W)`` over the fan-in;
  - ``from the activations``: ``Σ_{k,c} ∂L/∂W[k, c, o] = Σ_{n,p} ∂L/∂y[n, p, o] ·
    S[n, p]``, with ``S`` the window sums of ``Σ_c x`` (the convolution of the
    channel sum with a ones kernel, the layer's strides and padding), which
    reads the layer's input and output gradient instead of its kernel;
  - ``whichever reads less``: per layer, from the activations where they are
    smaller than the float32 kernel, else from the kernel gradient.

  These assume a stored kernel that stays centred (as with ``centralize``); they
  are measurements, not library layers. ``tests/test_aot_centering.py`` checks
  that their gradients are ``CenteredConv``'s at a centred kernel.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU compiler works deviceless
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # silences libtpu's probe

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax import lax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aot_resnet  # noqa: E402
from bench import table  # noqa: E402

import mabn_jax  # noqa: E402

_DN = ("NHWC", "HWIO", "NHWC")
ROUTES = ("kernel", "activations", "cheaper")


def _conv(x, kernel, strides, dtype):
    return lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype), strides, "SAME", dimension_numbers=_DN
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def projected_conv(x, kernel, strides, dtype, route):
    """``conv(x, kernel)`` (NHWC, HWIO, ``SAME``) whose kernel gradient is
    projected to zero fan-in mean, the mean taken as ``route`` says."""
    return _conv(x, kernel, strides, dtype)


def _fwd(x, kernel, strides, dtype, route):
    return _conv(x, kernel, strides, dtype), (x, kernel)


def _bwd(strides, dtype, route, res, dy):
    x, kernel = res
    dx, dk = jax.vjp(lambda x, k: _conv(x, k, strides, dtype), x, kernel)[1](dy)
    activations = (x.size + dy.size) * x.dtype.itemsize < kernel.size * 4
    if route == "kernel" or (route == "cheaper" and not activations):
        return dx, dk - dk.mean(axis=(0, 1, 2), keepdims=True)
    kh, kw, cin, _ = kernel.shape
    window_sums = jnp.sum(x, axis=-1, keepdims=True, dtype=jnp.float32)
    if (kh, kw) != (1, 1) or strides != (1, 1):
        ones = jnp.ones((kh, kw, 1, 1), jnp.float32)
        window_sums = lax.conv_general_dilated(
            window_sums, ones, strides, "SAME", dimension_numbers=_DN
        )
    fan_in_sum = jnp.sum(dy.astype(jnp.float32) * window_sums, axis=(0, 1, 2))
    return dx, dk - (fan_in_sum / (kh * kw * cin)).astype(dk.dtype)


projected_conv.defvjp(_fwd, _bwd)


class ProjectedConv(nn.Module):
    """The ResNet's convolutions (``SAME`` padding) with :func:`projected_conv`."""

    features: int
    kernel_size: tuple[int, ...]
    strides: int | tuple[int, ...] = 1
    use_bias: bool = False
    padding: str = "SAME"
    dtype: object = None
    route: str = "kernel"

    @nn.compact
    def __call__(self, x):
        if self.padding != "SAME":
            raise ValueError(f"ProjectedConv: only padding='SAME', got {self.padding!r}")
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        y = projected_conv(x, kernel, strides, self.dtype, self.route)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)
        return y


def _model(conv, axis_name=None):
    norm = functools.partial(mabn_jax.MABN, axis_name=axis_name, centered=False)
    return aot_resnet.ResNet50(conv=conv, norm=norm, dtype=jnp.bfloat16)


ROWS = (  # label, the kind compile_train takes (optimizer, gradient helper), model
    ("nn.Conv + BN", "BN", None),
    ("nn.Conv + MABN, kernels not centred (reference)", "MABN", nn.Conv),
    ("CenteredConv + MABN", "MABN", None),
    ("nn.Conv + MABN + centralize", "MABN-centralize", None),
    *(
        (
            f"projected-gradient conv + MABN, from the {label}",
            "MABN-projected",
            functools.partial(ProjectedConv, route=route),
        )
        for label, route in (
            ("kernel gradient", "kernel"),
            ("activations", "activations"),
            ("cheaper of the two", "cheaper"),
        )
    ),
)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="a one-block ResNet, 4 v5e chips")
    args = p.parse_args(argv)
    topology = "v5e:4x4"
    if args.smoke:  # the table's code on a small model, in seconds
        aot_resnet.use_smoke_model()
        topology = "v5e:2x2"
        print("(smoke: a one-block ResNet at 32×32 stands in for ResNet-50)")
    devices = aot_resnet.tpu_devices(topology)
    print(
        f"### ResNet-50 SPMD train step on {topology} ({len(devices)} chips), weight "
        f"centralization by route (TPU compiler; jax {jax.__version__})\n"
    )
    rows, base, t0 = [], None, time.time()
    for label, kind, conv in ROWS:
        make = None if conv is None else (lambda _kind, axis_name=None, c=conv: _model(c))
        f = aot_resnet.figures(aot_resnet.compile_train(kind, "spmd", devices, make=make))
        base = base or f
        rows.append(aot_resnet.against(label, f, base))
    table(["model", "MiB accessed", "bytes / BN", "peak MiB", "peak / BN"], rows)
    print(f"\n({len(ROWS)} compiles in {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
