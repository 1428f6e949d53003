"""Flax ``linen`` modules: MABN and weight-centralized Conv/Dense.

These are thin shells around :mod:`mabn_jax.functional`, which holds the math.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers

from mabn_jax import functional as F

Array = jax.Array
Dtype = Any
Initializer = Any

#: The collection that carries the probes into a training-mode ``apply``.
PROBES = "mabn_probes"

_MISSING_PROBES = (
    "MABN is applied in training mode without its probes (the '" + PROBES + "' "
    "collection), so its backward statistics could not be recorded. Differentiate "
    "w.r.t. the probes and record them: pass "
    "{'params': params, 'batch_stats': batch_stats, 'mabn_probes': probes} with "
    "probes = mabn_jax.init_probes(batch_stats), take jax.value_and_grad(loss_fn, "
    "argnums=(0, 1)) over (params, probes), and store "
    "mabn_jax.record_backward_stats(new_batch_stats, probe_grads). For evaluation "
    "use use_running_average=True."
)


class MABN(nn.Module):
    """Moving Average Batch Normalization (Yan et al., ICLR 2020).

    A drop-in for :class:`flax.linen.BatchNorm` for small per-device batches.
    Training normalizes with simple moving averages (over ``buffer_size`` steps)
    of the forward statistics and injects moving averages of the backward
    statistics into the gradient (see :mod:`mabn_jax.functional` for the
    equations). Inference is one per-channel affine map::

        y = γ · x / sqrt(ema_x2 + ε) + β                  (centered=False)
        y = γ · (x − ema_mean) / sqrt(ema_var + ε) + β     (centered=True)

    The non-centered layer (the paper's final MABN) skips the mean: put it after
    :class:`CenteredConv` / :class:`CenteredDense`, whose outputs are near zero
    mean. State lives in the ``batch_stats`` collection. Training needs the
    probes: see :func:`mabn_jax.init_probes` and
    :func:`mabn_jax.record_backward_stats`.

    Attributes:
      use_running_average: if True, use the stored EMA statistics (inference).
      axis: the feature axis or axes of the input (default last, NHWC).
      momentum: EMA decay ``α`` (``ema ← α·ema + (1 − α)·batch``); the paper's 0.98.
      epsilon: added to the second moment / variance.
      dtype: the dtype of the result (default: the input's dtype).
      param_dtype: the dtype of ``scale`` and ``bias``; the state is kept in
        ``promote_types(param_dtype, float32)``.
      use_bias: if True, add ``β``.
      use_scale: if True, multiply by ``γ``.
      bias_init: initializer for ``β`` (zeros).
      scale_init: initializer for ``γ`` (ones).
      axis_name: named axis (``pmap``/``shard_map``) to synchronize the forward
        and backward batch statistics over; ``None`` keeps them per device.
      axis_index_groups: subgroups of ``axis_name`` to synchronize within.
      use_fast_variance: accepted for ``nn.BatchNorm`` compatibility; the
        centered variant always computes ``E[x²] − E[x]²`` in one pass
        (clipped at 0), as ``nn.BatchNorm`` does by default.
      force_float32_reductions: accepted for compatibility; statistics are
        always reduced in at least float32.
      buffer_size: ``m``, steps in the moving-average windows.
      warmup_steps: batch statistics are used while ``t < warmup_steps``.
      renorm_start: renormalization starts after ``max(renorm_start, warmup_steps)``.
      r_max: clip of the renormalization factor ``r`` to ``[1/r_max, r_max]``.
      centered: moving-average the mean and g as well (needs no centered weights).
      d_max: clip of the centered variant's shift ``d``.
      skip_nonfinite: a training step with non-finite batch statistics keeps
        the previous state and counts the step in ``batch_stats['skipped']``
        (see :class:`~mabn_jax.functional.MABNConfig`).
      norm_batch_size: ghost batches: examples per normalization group along
        axis 0 of the input (which must be the batch axis); each group of
        consecutive examples is normalized with its own statistics and counts as
        one step of the windows, which slide across groups and train steps (see
        :func:`mabn_jax.functional.mabn_train`). The probes then need
        ``init_probes(batch_stats, num_groups=batch // norm_batch_size)``.
        ``None`` normalizes the whole batch.

    Statistics monitor: in training mode the layer sows its forward statistics
    (``chi2_B``, ``chi2``, ``ema_x2``, ``r``; centered: ``mu_B``, ``sigma2_B``,
    ``mu``, ``sigma2``, ``ema_mean``, ``ema_var``, ``r``, ``d``) into the
    ``'intermediates'`` collection. Unless ``'intermediates'`` is mutable in
    ``apply`` this does nothing (the traced step is unchanged). The backward
    statistics Ψ_B / g_B are the probe gradients, see
    :func:`mabn_jax.monitor.backward_stats`.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.98
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    buffer_size: int = 16
    warmup_steps: int = 100
    renorm_start: int = 1000
    r_max: float = 5.0
    centered: bool = False
    d_max: float = 5.0
    skip_nonfinite: bool = True
    norm_batch_size: int | None = None

    def __post_init__(self):
        self.config()  # invalid hyper-parameters fail here, naming the attribute
        super().__post_init__()

    def config(self, *, sync: bool = True) -> F.MABNConfig:
        """The layer's :class:`~mabn_jax.functional.MABNConfig`."""
        return F.MABNConfig(
            buffer_size=self.buffer_size, momentum=self.momentum,
            epsilon=self.epsilon, warmup_steps=self.warmup_steps,
            renorm_start=self.renorm_start, r_max=self.r_max, d_max=self.d_max,
            centered=self.centered, skip_nonfinite=self.skip_nonfinite,
            axis_name=self.axis_name if sync else None,
            axis_index_groups=self.axis_index_groups if sync else None)

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        """Normalizes ``x``; in training mode also advances the state.

        Args:
          x: the input, rank >= 2, with features along ``axis``.
          use_running_average: overrides the attribute of the same name.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        x = jnp.asarray(x)
        # During init the named axis may not exist yet (as in nn.BatchNorm).
        config = self.config(sync=not self.is_initializing())
        feature_axes = F.canonicalize_axes(x.ndim, self.axis)
        feature_shape = tuple(x.shape[a] for a in feature_axes)
        state_dtype = jnp.promote_types(self.param_dtype, jnp.float32)

        fields = (F.CenteredMABNState if self.centered else F.MABNState)._fields
        _check_layout(self, fields)
        init = lambda name: getattr(F.init_state(feature_shape, config, state_dtype), name)
        variables = [self.variable("batch_stats", name, init, name) for name in fields]
        state = (F.CenteredMABNState if self.centered else F.MABNState)(
            *(v.value for v in variables))
        F.check_input(x, feature_shape, state, config)  # before params: clearer errors

        scale = (self.param("scale", self.scale_init, feature_shape, self.param_dtype)
                 if self.use_scale else None)
        bias = (self.param("bias", self.bias_init, feature_shape, self.param_dtype)
                if self.use_bias else None)

        if use_running_average:
            return F.mabn_inference(x, scale, bias, state, config,
                                    axis=feature_axes, dtype=self.dtype)

        groups = F.num_groups(x.shape, feature_axes, self.norm_batch_size)
        if self.is_initializing():
            probes = F.init_probes(state, groups)
        elif not self.has_variable(PROBES, "psi"):
            raise ValueError(_MISSING_PROBES)
        else:
            probes = F.Probes(*(self.get_variable(PROBES, name)
                                for name in F.Probes._fields if self.centered or name == "psi"))
        y, new_state, stats = F.mabn_train_with_stats(
            x, scale, bias, state, probes, config, axis=feature_axes, dtype=self.dtype,
            norm_batch_size=self.norm_batch_size)
        if not self.is_initializing():  # init must not advance the state
            for var, value in zip(variables, new_state):
                var.value = value
            for name, value in stats.items():  # no-op unless 'intermediates' is mutable
                self.sow("intermediates", name, value)
        return y


def _check_layout(module: nn.Module, fields) -> None:
    """A stored state must have exactly this layer's fields, or Flax would
    silently initialize the missing ones in a mutable ``apply``."""
    stored = set(module.variables.get("batch_stats", {}))
    if stored and stored != set(fields):
        missing, extra = sorted(set(fields) - stored), sorted(stored - set(fields))
        raise ValueError(
            f"MABN: the batch_stats of this layer (centered={module.centered}) lack "
            f"{missing} and have unexpected {extra}; the state was saved by another "
            "configuration (e.g. centered or not) or by an older mabn_jax. Load a "
            "checkpoint of the same model, or re-initialize batch_stats with "
            "model.init.")


class _CenteredKernel:
    """Mixin: the kernel used is the stored one minus its fan-in mean.

    For an output unit ``o``, ``W'[..., o] = W[..., o] − mean(W[..., o])`` over
    every axis but the last (for convolutions: spatial × input channels), so
    each output is a zero-mean combination of its inputs (weight
    centralization, which makes the non-centered MABN safe).
    """

    def param(self, name, init_fn, *init_args, **init_kwargs):
        value = super().param(name, init_fn, *init_args, **init_kwargs)
        if name == "kernel":
            value = center_kernel(value)
        return value


def center_kernel(kernel: Array) -> Array:
    """Subtracts each output unit's fan-in mean (all axes but the last)."""
    return kernel - kernel.mean(axis=tuple(range(kernel.ndim - 1)), keepdims=True)


class CenteredConv(_CenteredKernel, nn.Conv):
    """:class:`flax.linen.Conv` with a weight-centralized kernel (same attributes)."""


class CenteredDense(_CenteredKernel, nn.Dense):
    """:class:`flax.linen.Dense` with a weight-centralized kernel (same attributes)."""
