"""benchmarks/aot_centering.py measures what it says: its projected-gradient
convolutions give ``CenteredConv``'s kernel gradient at a centred kernel, with the
fan-in mean taken from the kernel gradient or from the activations (the identity
``Σ_{k,c} ∂L/∂W[k, c, o] = Σ_{n,p} ∂L/∂y[n, p, o] · S[n, p]``), for the strides
and kernel sizes of ResNet-50. CPU only; the TPU figures are the script's."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import mabn_jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from aot_centering import ROUTES, ProjectedConv  # noqa: E402


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kernel,strides", [(3, 1), (3, 2), (1, 1), (1, 2), (7, 2)])
def test_projected_gradient_is_centered_convs(route, kernel, strides):
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 5))
    kw = dict(features=4, kernel_size=(kernel, kernel), strides=strides, use_bias=False)
    centered = mabn_jax.CenteredConv(padding="SAME", dtype=jnp.float32, **kw)
    projected = ProjectedConv(dtype=jnp.float32, route=route, **kw)
    params = centered.init(jax.random.key(1), x)["params"]
    params = {"kernel": mabn_jax.center_kernel(params["kernel"])}  # stored centred

    def grad(module):
        loss = lambda p: jnp.sum(jnp.sin(module.apply({"params": p}, x)))  # noqa: E731
        return jax.grad(loss)(params)["kernel"]

    want, got = grad(centered), grad(projected)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)
    # The projected gradient has zero fan-in mean, so the kernel stays centred.
    assert float(jnp.abs(got.mean(axis=(0, 1, 2))).max()) <= 1e-6 * scale
    # Not vacuous: the unprojected gradient has a fan-in mean.
    plain = nn.Conv(padding="SAME", dtype=jnp.float32, **kw)
    assert float(jnp.abs(grad(plain).mean(axis=(0, 1, 2))).max()) > 1e-3 * scale
