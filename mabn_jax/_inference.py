"""MABN's inference map: one per-channel affine function of the EMAs.

    y = γ · (x − ema_mean) / sqrt(ema_var + ε) + β      (plain: ema_mean = 0)

The same map folds into a preceding kernel (:mod:`mabn_jax.fold`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from mabn_jax import _stats as S
from mabn_jax._config import MABNConfig
from mabn_jax._state import MABNState, check_state

Array = jax.Array
_LAYER = "MABN"

__all__ = ["inference_affine", "affine_from_ema", "mabn_inference"]


def inference_affine(
    scale: Array, bias: Array, state: MABNState, epsilon: float
) -> tuple[Array, Array]:
    """``(a, c)`` such that inference is ``y = a · x + c`` per channel.

    Args:
      scale, bias: ``γ`` and ``β``, shaped like the features.
      state: the layer's state (its EMAs).
      epsilon: the layer's ``ε``.

    Returns:
      ``(a, c)``, per channel.

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax.functional as F
      >>> config = F.MABNConfig(buffer_size=4)
      >>> state = F.init_state((2,), config)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> scale, bias = jnp.ones(2), jnp.zeros(2)
      >>> a, c = F.inference_affine(jnp.full(2, 2.0), bias, state, epsilon=0.0)
      >>> a, c
      (Array([2., 2.], dtype=float32), Array([0., 0.], dtype=float32))
    """
    return affine_from_ema(scale, bias, state.ema_var, state.ema_mean, epsilon)


def affine_from_ema(
    scale: Array, bias: Array, ema_var: Array, ema_mean: Array | None, epsilon: float
) -> tuple[Array, Array]:
    """``a = γ / sqrt(ema_var + ε)``, ``c = β − a · ema_mean`` (``β`` without a mean)."""
    a = scale * lax.rsqrt(ema_var.astype(scale.dtype) + epsilon)
    if ema_mean is None:
        return a, bias
    return a, bias - a * ema_mean.astype(scale.dtype)


def mabn_inference(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    state: MABNState,
    config: MABNConfig,
    *,
    axis: int | Sequence[int] = -1,
    dtype: Any = None,
) -> Array:
    """The inference map: ``y = γ · (x − ema_mean) / sqrt(ema_var + ε) + β``
    (``ema_mean = 0`` for the plain layer), one per-channel affine function.

    Args:
      x, scale, bias, state, config, axis, dtype: as for :func:`mabn_train`.

    Returns:
      ``y``, in ``dtype`` (default: ``x``'s).

    Raises:
      TypeError: ``x`` is not a float array.
      ValueError: ``x`` does not fit ``axis``, or the state is not this
        layer's (variant or feature shape).

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax.functional as F
      >>> config = F.MABNConfig(buffer_size=4)
      >>> state = F.init_state((2,), config)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> scale, bias = jnp.ones(2), jnp.zeros(2)
      >>> y = F.mabn_inference(x, scale, bias, state, config)
      >>> bool(jnp.allclose(y, x / jnp.sqrt(1 + config.epsilon)))  # ema_var is 1 at the start
      True
    """
    x = jnp.asarray(x)
    feature_axes = S.canonicalize_axes(x.ndim, axis, _LAYER)
    S.check_input(x, (), _LAYER)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    check_state(state, config, feature_shape)
    sdt = S.stat_dtype(x.dtype, state.var_window.dtype)
    a, c = inference_affine(
        *S.affine_params(scale, bias, feature_shape, sdt), state, config.epsilon
    )
    b = functools.partial(S.bshape, ndim=x.ndim, feature_axes=feature_axes)
    return (x.astype(sdt) * b(a) + b(c)).astype(dtype or x.dtype)
