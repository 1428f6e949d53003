"""Flax ``linen`` Batch Renormalization (Ioffe 2017): a drop-in for ``nn.BatchNorm``.

The shell is MABN's (:mod:`mabn_jax._linen_layers`); the math is
:mod:`mabn_jax._brn`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers

from mabn_jax import _brn, _shell
from mabn_jax import _linen_layers as L
from mabn_jax._config import BatchRenormConfig, config_of

Array = jax.Array
Dtype = Any
Initializer = Any

__all__ = ["BatchRenorm"]


class BatchRenorm(L.BatchNormPositional, nn.Module, BatchRenormConfig):
    """Batch Renormalization (Ioffe 2017): a drop-in for :class:`flax.linen.BatchNorm`.

    Equations in :mod:`mabn_jax.functional` (``batch_renorm_train``). ``r``
    and ``d`` are clipped to the schedule's ``[r_min(t), r_max(t)]`` and
    ``[−d_max(t), d_max(t)]`` and receive no gradient. Needs no special train
    step. State (``batch_stats``): ``step``, ``mean``, ``var`` (used at
    inference), ``renorm_mean``, ``renorm_var`` (used for ``r``, ``d``).

    The hyper-parameters are those of :class:`~mabn_jax.BatchRenormConfig`.
    In training mode the layer sows ``mu_B``, ``sigma2_B``, ``r``, ``d`` into
    ``'intermediates'``.

    Attributes:
      use_running_average, axis, dtype, param_dtype: as in :class:`MABN`.
      use_bias, use_scale, bias_init, scale_init: as in :class:`MABN`.

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax
      >>> layer = mabn_jax.BatchRenorm(use_running_average=False)
      >>> x = jnp.arange(6.0).reshape(2, 3)
      >>> variables = layer.init(jax.random.key(0), x)
      >>> sorted(variables["batch_stats"])
      ['mean', 'renorm_mean', 'renorm_var', 'step', 'var']
      >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
      >>> y.shape, int(updates["batch_stats"]["step"])
      ((2, 3), 1)
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones

    def __post_init__(self):
        config_of(BatchRenormConfig, self)
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` (renormalized by ``r``, ``d``); in training mode also
        advances the state.

        Args:
          x, use_running_average, mask: as for :meth:`MABN.__call__`.

        Returns:
          The normalized ``x``, in ``dtype`` (default: ``x``'s).
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x = jnp.asarray(x)
        config = L.config_for(self, BatchRenormConfig)
        _, feature_shape = L.features_of(self, x)
        variables = L.state_variables(
            self,
            _brn.BatchRenormState._fields,
            lambda: _brn.init_state(feature_shape, _shell.state_dtype(self.param_dtype)),
        )
        state = _brn.BatchRenormState(*(v.value for v in variables))
        scale, bias = L.make_params(self, feature_shape)
        if use_running_average:
            return _brn.batch_renorm_inference(
                x, scale, bias, state, config, axis=self.axis, dtype=self.dtype
            )
        y, new_state, stats = _brn.batch_renorm_train(
            x, scale, bias, state, config, axis=self.axis, dtype=self.dtype, mask=mask
        )
        if not self.is_initializing():  # init must not advance the state
            for var, value in zip(variables, new_state):
                var.value = value
            for name, value in stats.items():
                self.sow("intermediates", name, value)
        return y
