"""Batch Renormalization (Ioffe, NeurIPS 2017, arXiv 1702.03275), MABN's main baseline.

Training normalizes with the batch statistics but corrects them towards the
moving averages with two per-channel constants (they receive no gradient)::

    μ_B = mean(x),   σ_B = sqrt(var(x) + ε),   σ̄ = sqrt(renorm_var + ε)
    r = stop_gradient(clip(σ_B / σ̄, 1/r_max(t), r_max(t)))
    d = stop_gradient(clip((μ_B − renorm_mean) / σ̄, −d_max(t), d_max(t)))
    y = γ · ((x − μ_B) / σ_B · r + d) + β

    mean ← momentum · mean + (1 − momentum) · μ_B           (as nn.BatchNorm)
    var  ← momentum · var  + (1 − momentum) · var(x)
    renorm_mean, renorm_var: the same with ``renorm_momentum``

Inference is ``nn.BatchNorm``'s: ``y = γ · (x − mean) / sqrt(var + ε) + β``.
With ``r = 1, d = 0`` (during warm-up) the layer *is* ``nn.BatchNorm``.

The clips follow the paper's schedule: ``r_max(t) = 1``, ``d_max(t) = 0`` for
the first ``warmup_steps`` train steps, then both grow linearly to ``r_max`` /
``d_max`` over ``ramp_steps`` steps (``ramp_steps = 0``: at once).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers
from jax import lax

from mabn_jax import functional as F

Array = jax.Array

__all__ = ["BatchRenorm", "BatchRenormState", "clip_schedule", "renorm_factors",
           "batch_renorm_train", "batch_renorm_inference"]


class BatchRenormState(NamedTuple):
    """The layer's ``batch_stats``.

    Attributes:
      step: train steps seen (calls in training mode; drives the clip schedule).
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
    return BatchRenormState(jnp.zeros((), jnp.int32), zeros, ones, zeros, ones)


def clip_schedule(step: Array, r_max: float, d_max: float, warmup_steps: int,
                  ramp_steps: int) -> tuple[Array, Array]:
    """``(r_max(t), d_max(t))`` after ``step`` completed train steps.

    1 and 0 while ``step < warmup_steps``; then linear to ``r_max``/``d_max``
    over ``ramp_steps`` steps.
    """
    if ramp_steps > 0:
        frac = jnp.clip((step - warmup_steps + 1) / ramp_steps, 0.0, 1.0)
    else:
        frac = (step >= warmup_steps).astype(jnp.float32)
    return 1.0 + (r_max - 1.0) * frac, d_max * frac


def renorm_factors(mean_b: Array, var_b: Array, renorm_mean: Array, renorm_var: Array,
                   r_max: Array, d_max: Array, epsilon: float) -> tuple[Array, Array]:
    """Clipped ``(r, d)``, with ``stop_gradient``: they are constants of the step."""
    sigma = jnp.sqrt(renorm_var + epsilon)
    r = jnp.clip(jnp.sqrt(var_b + epsilon) / sigma, 1.0 / r_max, r_max)
    d = jnp.clip((mean_b - renorm_mean) / sigma, -d_max, d_max)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def batch_renorm_train(x, scale, bias, state: BatchRenormState, *, axis=-1, momentum=0.99,
                       renorm_momentum=None, epsilon=1e-5, r_max=3.0, d_max=5.0,
                       warmup_steps=0, ramp_steps=0, use_fast_variance=True,
                       axis_name=None, axis_index_groups=None, norm_batch_size=None,
                       dtype=None):
    """One training step: returns ``(y, new_state, stats)``.

    ``norm_batch_size``: ghost batches of that many consecutive examples along
    axis 0, each normalized with its own statistics and its own ``r``, ``d``
    against the moving averages as updated by the groups before it (one
    update per group, in order). ``step`` advances by one per call.
    ``stats``: ``mu_B``, ``sigma2_B``, ``r``, ``d`` (``[G, *features]`` for ghost
    batches).
    """
    feature_axes = F.canonicalize_axes(x.ndim, axis)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    groups = F.num_groups(x.shape, feature_axes, norm_batch_size, layer="BatchRenorm")
    grouped = groups > 1
    in_shape, in_dtype = x.shape, x.dtype
    if grouped:
        x = x.reshape((groups, in_shape[0] // groups) + in_shape[1:])
        feature_axes = (0,) + tuple(a + 1 for a in feature_axes)
        reduction_axes = tuple(a + 1 for a in reduction_axes)
    sdt = F._stat_dtype(x, state.mean.dtype)
    xs = x.astype(sdt)

    # Batch statistics as nn.BatchNorm computes them.
    mean_b = xs.mean(reduction_axes)
    if use_fast_variance:
        mean2_b = (xs * xs).mean(reduction_axes)
        if axis_name is not None:
            mean_b, mean2_b = lax.pmean(jnp.stack([mean_b, mean2_b]), axis_name,
                                        axis_index_groups=axis_index_groups)
        var_b = jnp.maximum(0.0, mean2_b - mean_b * mean_b)
    else:
        if axis_name is not None:
            mean_b = lax.pmean(mean_b, axis_name, axis_index_groups=axis_index_groups)
        b = functools.partial(F._bshape, ndim=x.ndim, feature_axes=feature_axes)
        var_b = jnp.square(xs - b(mean_b)).mean(reduction_axes)
        if axis_name is not None:
            var_b = lax.pmean(var_b, axis_name, axis_index_groups=axis_index_groups)

    renorm_momentum = momentum if renorm_momentum is None else renorm_momentum
    rmean, rmean_used = F._ema_track(state.renorm_mean, mean_b, renorm_momentum, grouped)
    rvar, rvar_used = F._ema_track(state.renorm_var, var_b, renorm_momentum, grouped)
    r_max_t, d_max_t = clip_schedule(state.step, r_max, d_max, warmup_steps, ramp_steps)
    r, d = renorm_factors(mean_b, var_b, rmean_used.astype(sdt), rvar_used.astype(sdt),
                          r_max_t, d_max_t, epsilon)
    mean, _ = F._ema_track(state.mean, mean_b, momentum, grouped)
    var, _ = F._ema_track(state.var, var_b, momentum, grouped)
    new_state = BatchRenormState(state.step + 1, mean, var, rmean, rvar)

    scale, bias = (p.astype(sdt) for p in F._affine_params(scale, bias, feature_shape, sdt))
    b = functools.partial(F._bshape, ndim=x.ndim, feature_axes=feature_axes)
    # Same association as nn.BatchNorm, so r = 1, d = 0 reproduces it bit for bit.
    mul = lax.rsqrt(var_b + epsilon) * r * scale
    y = (xs - b(mean_b)) * b(mul) + b(bias + scale * d)
    y = y.reshape(in_shape).astype(dtype or in_dtype)
    stats = dict(mu_B=mean_b, sigma2_B=var_b, r=r, d=d)
    return y, new_state, stats


def batch_renorm_inference(x, scale, bias, state: BatchRenormState, *, axis=-1,
                           epsilon=1e-5, dtype=None):
    """``y = γ · (x − mean) / sqrt(var + ε) + β`` (``nn.BatchNorm``'s inference)."""
    feature_axes = F.canonicalize_axes(x.ndim, axis)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    sdt = F._stat_dtype(x, state.mean.dtype)
    scale, bias = (p.astype(sdt) for p in F._affine_params(scale, bias, feature_shape, sdt))
    b = functools.partial(F._bshape, ndim=x.ndim, feature_axes=feature_axes)
    mul = lax.rsqrt(state.var.astype(sdt) + epsilon) * scale
    y = (x.astype(sdt) - b(state.mean.astype(sdt))) * b(mul) + b(bias)
    return y.astype(dtype or x.dtype)


class BatchRenorm(nn.Module):
    """Batch Renormalization (Ioffe 2017): a drop-in for :class:`flax.linen.BatchNorm`.

    See the module docstring for the equations. ``r`` and ``d`` are clipped to
    the schedule's ``[1/r_max(t), r_max(t)]`` and ``[−d_max(t), d_max(t)]`` and
    receive no gradient. Training needs no probes; the state (``batch_stats``)
    is ``step``, ``mean``, ``var`` (used at inference), ``renorm_mean`` and
    ``renorm_var`` (used for ``r``, ``d``).

    Attributes:
      use_running_average, axis, momentum, epsilon, dtype, param_dtype,
        use_bias, use_scale, bias_init, scale_init, axis_name,
        axis_index_groups, use_fast_variance, force_float32_reductions: as in
        :class:`flax.linen.BatchNorm` (reductions are always at least float32).
      r_max: final clip of ``r`` (the paper: 3).
      d_max: final clip of ``d`` (the paper: 5).
      warmup_steps: train steps with ``r = 1, d = 0`` (plain batch norm).
      ramp_steps: steps over which the clips then grow linearly to
        ``r_max``/``d_max`` (0: at once).
      renorm_momentum: decay of ``renorm_mean``/``renorm_var``; ``None`` uses
        ``momentum``.
      norm_batch_size: ghost batches along axis 0 (see :func:`batch_renorm_train`).

    In training mode the layer sows ``mu_B``, ``sigma2_B``, ``r``, ``d`` into
    ``'intermediates'`` (a no-op unless that collection is mutable).
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = initializers.zeros
    scale_init: Any = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 0
    ramp_steps: int = 0
    renorm_momentum: float | None = None
    norm_batch_size: int | None = None

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        _validate(self)
        x = jnp.asarray(x)
        feature_axes = F.canonicalize_axes(x.ndim, self.axis)
        feature_shape = tuple(x.shape[a] for a in feature_axes)
        state_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
        init = init_state(feature_shape, state_dtype)
        variables = [self.variable("batch_stats", name, lambda n=name: getattr(init, n))
                     for name in BatchRenormState._fields]
        state = BatchRenormState(*(v.value for v in variables))
        scale = (self.param("scale", self.scale_init, feature_shape, self.param_dtype)
                 if self.use_scale else None)
        bias = (self.param("bias", self.bias_init, feature_shape, self.param_dtype)
                if self.use_bias else None)
        if use_running_average:
            return batch_renorm_inference(x, scale, bias, state, axis=feature_axes,
                                          epsilon=self.epsilon, dtype=self.dtype)
        initializing = self.is_initializing()
        y, new_state, stats = batch_renorm_train(
            x, scale, bias, state, axis=feature_axes, momentum=self.momentum,
            renorm_momentum=self.renorm_momentum, epsilon=self.epsilon, r_max=self.r_max,
            d_max=self.d_max, warmup_steps=self.warmup_steps, ramp_steps=self.ramp_steps,
            use_fast_variance=self.use_fast_variance,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            norm_batch_size=self.norm_batch_size, dtype=self.dtype)
        if not initializing:  # init must not advance the state
            for var, value in zip(variables, new_state):
                var.value = value
            for name, value in stats.items():
                self.sow("intermediates", name, value)
        return y


def _validate(m: BatchRenorm) -> None:
    def check(ok, name, want):
        if not ok:
            raise ValueError(f"BatchRenorm: {name}={getattr(m, name)!r} is invalid; use {want}.")
    check(m.r_max >= 1.0, "r_max", "a float >= 1 (r is clipped to [1/r_max, r_max])")
    check(m.d_max >= 0.0, "d_max", "a float >= 0 (d is clipped to [-d_max, d_max])")
    check(isinstance(m.warmup_steps, int) and m.warmup_steps >= 0, "warmup_steps", "an int >= 0")
    check(isinstance(m.ramp_steps, int) and m.ramp_steps >= 0, "ramp_steps", "an int >= 0")
    check(0.0 <= m.momentum < 1.0, "momentum", "a decay in [0, 1)")
    check(m.renorm_momentum is None or 0.0 <= m.renorm_momentum < 1.0, "renorm_momentum",
          "None or a decay in [0, 1)")
