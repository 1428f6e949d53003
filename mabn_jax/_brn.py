"""Batch Renormalization (Ioffe, NeurIPS 2017, arXiv 1702.03275), MABN's baseline.

Training normalizes with the batch statistics, corrected towards moving
averages by two per-channel constants (no gradient)::

    μ_B = mean(x),   σ²_B = var(x),   σ = sqrt(renorm_var + ε)
    r = clip(sqrt(σ²_B + ε) / σ, 1/r_max(t), r_max(t))
    d = clip((μ_B − renorm_mean) / σ, −d_max(t), d_max(t))
    y = γ · ((x − μ_B) / sqrt(σ²_B + ε) · r + d) + β

    mean ← momentum·mean + (1 − momentum)·μ_B        var likewise (as nn.BatchNorm)
    renorm_mean, renorm_var: the same with ``renorm_momentum``

Inference is ``nn.BatchNorm``'s: ``y = γ · (x − mean) / sqrt(var + ε) + β``.
With ``r = 1, d = 0`` (during warm-up) the layer *is* ``nn.BatchNorm``. The
clips are 1 and 0 for ``warmup_steps`` steps, then grow linearly to
``r_max``/``d_max`` over ``ramp_steps`` steps (``ramp_steps = 0``: at once).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mabn_jax import _stats as S
from mabn_jax._config import BatchRenormConfig

Array = jax.Array
_LAYER = "BatchRenorm"

__all__ = ["BatchRenormState", "init_state", "clip_schedule", "batch_renorm_train",
           "batch_renorm_inference"]


class BatchRenormState(NamedTuple):
    """The layer's ``batch_stats``.

    Attributes:
      step: training steps seen (a float counter; drives the clip schedule).
      mean, var: moving averages used at inference (``nn.BatchNorm``'s).
      renorm_mean, renorm_var: moving averages ``r`` and ``d`` are measured against.
    """

    step: Array
    mean: Array
    var: Array
    renorm_mean: Array
    renorm_var: Array


def init_state(feature_shape, dtype=jnp.float32) -> BatchRenormState:
    zeros, ones = jnp.zeros(feature_shape, dtype), jnp.ones(feature_shape, dtype)
    return BatchRenormState(jnp.zeros((), dtype), zeros, ones, zeros, ones)


def clip_schedule(step: Array, config: BatchRenormConfig) -> tuple[Array, Array]:
    """``(r_max(t), d_max(t))`` after ``step`` completed training steps."""
    if config.ramp_steps > 0:
        frac = jnp.clip((step - config.warmup_steps + 1) / config.ramp_steps, 0.0, 1.0)
    else:
        frac = (step >= config.warmup_steps).astype(jnp.float32)
    # An infinite limit (no clipping, Keras' default) times frac = 0 would be
    # NaN: before the ramp the clips are exactly 1 and 0.
    started = frac > 0
    return (jnp.where(started, 1.0 + (config.r_max - 1.0) * frac, 1.0),
            jnp.where(started, config.d_max * frac, 0.0))


def batch_renorm_train(x: Array, scale: Array | None, bias: Array | None,
                       state: BatchRenormState, config: BatchRenormConfig, *, axis=-1,
                       dtype: Any = None, mask: Array | None = None):
    """One training step: returns ``(y, new_state, stats)``.

    Ghost batches (``config.norm_batch_size``): each group of consecutive
    examples along axis 0 is normalized with its own statistics and its own
    ``r``, ``d`` against the moving averages as updated by the groups before
    it (one update per group); ``step`` advances by one per call. ``stats``:
    ``mu_B``, ``sigma2_B``, ``r``, ``d`` (``[G, *features]`` with ghost batches).
    """
    x = jnp.asarray(x)
    feature_axes = S.canonicalize_axes(x.ndim, axis, _LAYER)
    S.check_input(x, S.other_axes(x.ndim, feature_axes), _LAYER)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    split = S.split_groups(x, feature_axes, config.norm_batch_size, _LAYER, mask)
    grouped, cfg = split.groups > 1, config
    sdt = S.stat_dtype(x.dtype, state.mean.dtype, cfg.force_float32_reductions)
    xs = split.x.astype(sdt)
    mean_b, var_b = S.moments(xs, split, use_mean=True, use_fast_variance=cfg.use_fast_variance,
                              axis_name=cfg.axis_name, axis_index_groups=cfg.axis_index_groups)

    renorm_momentum = cfg.momentum if cfg.renorm_momentum is None else cfg.renorm_momentum
    rmean, rmean_used = S.ema_per_group(state.renorm_mean, mean_b, renorm_momentum, grouped)
    rvar, rvar_used = S.ema_per_group(state.renorm_var, var_b, renorm_momentum, grouped)
    r_max, d_max = clip_schedule(state.step, cfg)
    r, d = S.renorm_factors(var_b, rvar_used, mean_b, rmean_used, r_max=r_max, d_max=d_max,
                            epsilon=cfg.epsilon, active=jnp.asarray(True))
    mean, _ = S.ema_per_group(state.mean, mean_b, cfg.momentum, grouped)
    var, _ = S.ema_per_group(state.var, var_b, cfg.momentum, grouped)
    new_state = BatchRenormState(state.step + 1, mean, var, rmean, rvar)

    scale, bias = S.affine_params(scale, bias, feature_shape, sdt)
    b = functools.partial(S.bshape, ndim=xs.ndim, feature_axes=split.feature_axes)
    # Same association as nn.BatchNorm, so r = 1, d = 0 reproduces it bit for bit.
    mul = lax.rsqrt(var_b + cfg.epsilon) * r * scale
    y = (xs - b(mean_b)) * b(mul) + b(bias + scale * d)
    stats = dict(mu_B=mean_b, sigma2_B=var_b, r=r, d=d)
    return y.reshape(x.shape).astype(dtype or x.dtype), new_state, stats


def batch_renorm_inference(x: Array, scale: Array | None, bias: Array | None,
                           state: BatchRenormState, config: BatchRenormConfig, *, axis=-1,
                           dtype: Any = None) -> Array:
    """``y = γ · (x − mean) / sqrt(var + ε) + β`` (``nn.BatchNorm``'s inference)."""
    x = jnp.asarray(x)
    feature_axes = S.canonicalize_axes(x.ndim, axis, _LAYER)
    S.check_input(x, (), _LAYER)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    sdt = S.stat_dtype(x.dtype, state.mean.dtype)
    scale, bias = S.affine_params(scale, bias, feature_shape, sdt)
    b = functools.partial(S.bshape, ndim=x.ndim, feature_axes=feature_axes)
    mul = lax.rsqrt(state.var.astype(sdt) + config.epsilon) * scale
    y = (x.astype(sdt) - b(state.mean.astype(sdt))) * b(mul) + b(bias)
    return y.astype(dtype or x.dtype)
