"""Flax ``linen`` convolution and dense layers with weight-centralized kernels.

The plain MABN normalizes by ``χ² = E[x²]``, which is the variance only when
its input has zero mean; a kernel whose fan-in weights sum to zero per output
(weight centralization, Yan et al. §4.3) makes it so. The layers store the
kernel as usual and apply :func:`~mabn_jax.center_kernel` of it.
"""

from __future__ import annotations

from flax import linen as nn

from mabn_jax._shell import center_kernel

__all__ = ["CenteredConv", "CenteredDense", "center_kernel"]


class _CenteredKernel:
    """Mixin: the kernel used is the stored one minus its fan-in mean.

    For an output unit ``o``, ``W'[..., o] = W[..., o] − mean(W[..., o])`` over
    every axis but the last (for convolutions: spatial × input channels), so
    each output is a zero-mean combination of its inputs (weight
    centralization, which makes the non-centered MABN safe).
    """

    def param(self, name, init_fn, *init_args, **init_kwargs):
        value = super().param(name, init_fn, *init_args, **init_kwargs)
        return center_kernel(value) if name == "kernel" else value


class CenteredConv(_CenteredKernel, nn.Conv):
    """:class:`flax.linen.Conv` with a weight-centralized kernel (same attributes).

    Attributes:
      features, kernel_size, strides, padding, use_bias, ...: as in
        :class:`flax.linen.Conv`; the kernel applied is
        :func:`center_kernel` of the stored ``kernel`` parameter.

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax
      >>> conv = mabn_jax.CenteredConv(4, (3, 3), use_bias=False)
      >>> x = jnp.ones((1, 8, 8, 2))
      >>> variables = conv.init(jax.random.key(0), x)
      >>> conv.apply(variables, x).shape
      (1, 8, 8, 4)
    """


class CenteredDense(_CenteredKernel, nn.Dense):
    """:class:`flax.linen.Dense` with a weight-centralized kernel (same attributes).

    Attributes:
      features, use_bias, dtype, param_dtype, kernel_init, ...: as in
        :class:`flax.linen.Dense`; the kernel applied is :func:`center_kernel`
        of the stored ``kernel`` parameter.

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax
      >>> dense = mabn_jax.CenteredDense(3)
      >>> x = jnp.ones((2, 5))
      >>> variables = dense.init(jax.random.key(0), x)
      >>> dense.apply(variables, x).shape
      (2, 3)
    """
