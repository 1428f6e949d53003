"""Batch Renormalization (Ioffe, NeurIPS 2017, arXiv 1702.03275), MABN's baseline.

Training normalizes with the batch statistics, corrected towards moving
averages by two per-channel constants (no gradient)::

    μ_B = mean(x),   σ²_B = var(x),   σ = sqrt(renorm_var + ε)
    r = clip(sqrt(σ²_B + ε) / σ, r_min(t), r_max(t))          r_min = 1/r_max by default
    d = clip((μ_B − renorm_mean) / σ, −d_max(t), d_max(t))
    y = γ · ((x − μ_B) / sqrt(σ²_B + ε) · r + d) + β

    mean ← momentum·mean + (1 − momentum)·μ_B        var likewise (as nn.BatchNorm)
    renorm_mean, renorm_var: the same with ``renorm_momentum``

With ``average_stddev`` the variances are averaged as standard deviations,
``sqrt(var_new + ε) = momentum·sqrt(var + ε) + (1 − momentum)·sqrt(σ²_B + ε)``
(the paper's ``σ := σ + α(σ_B − σ)`` with ``α = 1 − momentum``; Keras 3).
Inference is ``nn.BatchNorm``'s: ``y = γ · (x − mean) / sqrt(var + ε) + β``.
With ``r = 1, d = 0`` (during warm-up) the layer *is* ``nn.BatchNorm``. The
clips are 1 and 0 for ``warmup_steps`` steps, then move linearly to their
limits over ``ramp_steps`` (``r``) and ``d_ramp_steps`` (``d``) steps (0: at
once); docs/batch_renorm.md gives the settings of the paper, Keras 3 and sbx.
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

__all__ = [
    "BatchRenormState",
    "Clips",
    "init_state",
    "clip_schedule",
    "batch_renorm_train",
    "batch_renorm_inference",
]


class BatchRenormState(NamedTuple):
    """The layer's ``batch_stats``.

    Attributes:
      step: training steps seen (a float counter; drives the clip schedule).
      mean, var: moving averages used at inference (``nn.BatchNorm``'s).
      renorm_mean, renorm_var: moving averages ``r`` and ``d`` are measured against.

    Example:
      >>> import jax.numpy as jnp, mabn_jax.functional as F
      >>> config = F.BatchRenormConfig()
      >>> state = F.init_batch_renorm_state((2,))
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> state.var
      Array([1., 1.], dtype=float32)
    """

    step: Array
    mean: Array
    var: Array
    renorm_mean: Array
    renorm_var: Array


def init_state(feature_shape, dtype=jnp.float32) -> BatchRenormState:
    """The layer's state before the first step: mean 0, variance 1, step 0.

    Args:
      feature_shape: the features' shape (one entry per feature axis).
      dtype: the state's dtype (float32 or wider).

    Returns:
      A :class:`BatchRenormState`.

    Example:
      >>> import jax.numpy as jnp, mabn_jax.functional as F
      >>> config = F.BatchRenormConfig()
      >>> state = F.init_batch_renorm_state((2,))
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> int(state.step), state.mean
      (0, Array([0., 0.], dtype=float32))
    """
    zeros, ones = jnp.zeros(feature_shape, dtype), jnp.ones(feature_shape, dtype)
    return BatchRenormState(jnp.zeros((), dtype), zeros, ones, zeros, ones)


class Clips(NamedTuple):
    """The clips of one step: ``r ∈ [r_min, r_max]``, ``d ∈ [−d_max, d_max]``.

    Attributes:
      r_min, r_max: the bounds of ``r``.
      d_max: the bound of ``|d|``.

    Example:
      >>> import jax.numpy as jnp, mabn_jax.functional as F
      >>> clips = F.clip_schedule(jnp.asarray(10**6), F.BatchRenormConfig(r_max=3.0, d_max=5.0))
      >>> float(clips.r_max), float(clips.d_max)
      (3.0, 5.0)
    """

    r_min: Array
    r_max: Array
    d_max: Array


def _ramp(step: Array, warmup: int, ramp: int) -> Array:
    """The fraction of the way from batch norm to the final clips, in [0, 1]."""
    if ramp > 0:
        return jnp.clip((step - warmup + 1) / ramp, 0.0, 1.0)
    # In the counter's precision (float64 under x64): 1/r_max is then exact too.
    return (step >= warmup).astype(jnp.result_type(step, jnp.float32))


def clip_schedule(step: Array, config: BatchRenormConfig) -> Clips:
    """The clips used by the training step after ``step`` completed steps.

    ``1, 1, 0`` during warm-up; then ``r_max`` (and ``r_min``, if set) move
    linearly from 1 over ``ramp_steps`` and ``d_max`` from 0 over
    ``d_ramp_steps``. ``r_min=None`` is ``1/r_max(t)``.

    Args:
      step: the state's ``step`` (completed training steps).
      config: the schedule's hyper-parameters.

    Returns:
      The step's :class:`Clips`.

    Example:
      >>> import jax.numpy as jnp, mabn_jax.functional as F
      >>> F.clip_schedule(jnp.asarray(0), F.BatchRenormConfig())
      Clips(r_min=Array(0.33333334, dtype=float32), r_max=Array(3., dtype=float32),
            d_max=Array(5., dtype=float32))
    """
    d_ramp = config.ramp_steps if config.d_ramp_steps is None else config.d_ramp_steps
    fr = _ramp(step, config.warmup_steps, config.ramp_steps)
    fd = _ramp(step, config.warmup_steps, d_ramp)
    # An infinite limit (no clipping, Keras' default) times a fraction of 0
    # would be NaN: before its ramp starts each clip is exactly 1 or 0.
    r_max = jnp.where(fr > 0, 1.0 + (config.r_max - 1.0) * fr, 1.0)
    d_max = jnp.where(fd > 0, config.d_max * fd, 0.0)
    r_min = 1.0 / r_max if config.r_min is None else 1.0 - (1.0 - config.r_min) * fr
    return Clips(r_min, r_max, d_max)


def _check_state_dtype(state: BatchRenormState) -> None:
    low = sorted({str(v.dtype) for v in state if jnp.finfo(v.dtype).bits < 32})
    if low:
        raise ValueError(
            f"{_LAYER}: the state (batch_stats) is {', '.join(low)}; it must be float32 or "
            "wider (in bfloat16 the step counter stops at 256). It was cast with the "
            "params: cast only the params and inputs, keep batch_stats as model.init made "
            "them."
        )


def batch_renorm_train(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    state: BatchRenormState,
    config: BatchRenormConfig,
    *,
    axis=-1,
    dtype: Any = None,
    mask: Array | None = None,
):
    """One training step: returns ``(y, new_state, stats)``.

    Ghost batches (``config.norm_batch_size``): each group of consecutive
    examples along axis 0 is normalized with its own statistics and its own
    ``r``, ``d`` against the moving averages as updated by the groups before
    it (one update per group); ``step`` advances by one per call. ``stats``:
    ``mu_B``, ``sigma2_B``, ``r``, ``d`` (``[G, *features]`` with ghost batches).

    Args:
      x: input of rank >= 2, any float dtype.
      scale, bias: ``γ`` and ``β`` of shape ``[*features]``, or ``None``.
      state: from :func:`init_batch_renorm_state` or a previous step.
      config: the layer's hyper-parameters.
      axis: the feature axis or axes (default last, NHWC).
      dtype: output dtype (default: the input's).
      mask: optional boolean array broadcastable to ``x``: the entries the
        statistics are computed from (as in ``nn.BatchNorm``).

    Returns:
      ``(y, new_state, stats)``; a batch whose statistics are not finite (or
      that ``mask`` empties) leaves the state as it was.

    Raises:
      TypeError: ``x`` is not a float array.
      ValueError: the state is below float32, or ``x`` does not fit ``axis``
        (or is an empty batch) or ``config.norm_batch_size``.

    Example:
      >>> import jax.numpy as jnp, mabn_jax.functional as F
      >>> config = F.BatchRenormConfig()
      >>> state = F.init_batch_renorm_state((2,))
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> y, new_state, stats = F.batch_renorm_train(x, jnp.ones(2), jnp.zeros(2), state, config)
      >>> y.shape, int(new_state.step)
      ((4, 2), 1)
    """
    x = jnp.asarray(x)
    _check_state_dtype(state)
    feature_axes = S.canonicalize_axes(x.ndim, axis, _LAYER)
    S.check_input(x, S.other_axes(x.ndim, feature_axes), _LAYER)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    split = S.split_groups(x, feature_axes, config.norm_batch_size, _LAYER, mask)
    grouped, cfg = split.groups > 1, config
    sdt = S.stat_dtype(x.dtype, state.mean.dtype, cfg.force_float32_reductions)
    xs = split.x.astype(sdt)
    mean_b, var_b = S.moments(
        xs,
        split,
        use_mean=True,
        use_fast_variance=cfg.use_fast_variance,
        axis_name=cfg.axis_name,
        axis_index_groups=cfg.axis_index_groups,
    )
    assert mean_b is not None  # use_mean=True
    var_b, empty = S.fill_empty(split, var_b, state.var)
    mean_b, _ = S.fill_empty(split, mean_b, state.mean)
    # A batch with non-finite (or no) statistics never enters the state, as in MABN.
    ok = S.all_finite(mean_b, var_b)
    ok = ok if empty is False else ok & ~empty

    renorm_momentum = cfg.momentum if cfg.renorm_momentum is None else cfg.renorm_momentum
    if cfg.average_stddev:  # average std = sqrt(σ² + ε); store std² − ε as the variance
        to_avg = lambda v: jnp.sqrt(v + cfg.epsilon)
        from_avg = lambda s: jnp.maximum(s * s - cfg.epsilon, 0.0)
    else:
        to_avg = from_avg = lambda v: v

    def follow(old, new, momentum):
        """(the variance after the call, the variance before each group)."""
        after, before = S.ema_per_group(to_avg(old), to_avg(new), momentum, grouped)
        return from_avg(after).astype(old.dtype), from_avg(before)

    rmean, rmean_used = S.ema_per_group(state.renorm_mean, mean_b, renorm_momentum, grouped)
    rvar, rvar_used = follow(state.renorm_var, var_b, renorm_momentum)
    clips = clip_schedule(state.step, cfg)
    r, d = S.renorm_factors(
        var_b,
        rvar_used,
        mean_b,
        rmean_used,
        r_max=clips.r_max,
        r_min=clips.r_min,
        d_max=clips.d_max,
        epsilon=cfg.epsilon,
        active=jnp.asarray(True),
    )
    assert d is not None  # a mean was given
    mean, _ = S.ema_per_group(state.mean, mean_b, cfg.momentum, grouped)
    var, _ = follow(state.var, var_b, cfg.momentum)
    new_state = S.select(ok, BatchRenormState(state.step + 1, mean, var, rmean, rvar), state)

    scale, bias = S.affine_params(scale, bias, feature_shape, sdt)
    b = functools.partial(S.bshape, ndim=xs.ndim, feature_axes=split.feature_axes)
    # Same association as nn.BatchNorm, so r = 1, d = 0 reproduces it bit for bit.
    mul = lax.rsqrt(var_b + cfg.epsilon) * r * scale
    y = (xs - b(mean_b)) * b(mul) + b(bias + scale * d)
    stats = dict(mu_B=mean_b, sigma2_B=var_b, r=r, d=d)
    return y.reshape(x.shape).astype(dtype or x.dtype), new_state, stats


def batch_renorm_inference(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    state: BatchRenormState,
    config: BatchRenormConfig,
    *,
    axis=-1,
    dtype: Any = None,
) -> Array:
    """``y = γ · (x − mean) / sqrt(var + ε) + β`` (``nn.BatchNorm``'s inference).

    Args:
      x, scale, bias, state, config, axis, dtype: as for :func:`batch_renorm_train`.

    Returns:
      ``y``, in ``dtype`` (default: ``x``'s).

    Raises:
      TypeError: ``x`` is not a float array.
      ValueError: ``x`` does not fit ``axis``.

    Example:
      >>> import jax.numpy as jnp, mabn_jax.functional as F
      >>> config = F.BatchRenormConfig()
      >>> state = F.init_batch_renorm_state((2,))
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> y = F.batch_renorm_inference(x, None, None, state, config)
      >>> bool(jnp.allclose(y, x / jnp.sqrt(1 + config.epsilon)))  # mean 0, var 1 at the start
      True
    """
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
