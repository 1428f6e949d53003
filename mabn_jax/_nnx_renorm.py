"""Flax NNX Batch Renormalization (Ioffe 2017): a drop-in for ``nnx.BatchNorm``.

The shell is MABN's (:class:`mabn_jax._nnx_layers.Norm`); the math is
:mod:`mabn_jax._brn`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

from mabn_jax import _brn, _shell
from mabn_jax import _nnx_layers as N
from mabn_jax._config import BatchRenormConfig

Array = jax.Array

__all__ = ["BatchRenorm"]


class BatchRenorm(N.Norm):
    """Batch Renormalization (Ioffe 2017) for Flax NNX: a drop-in for ``nnx.BatchNorm``.

    The same math as :class:`mabn_jax.BatchRenorm` (linen; equations in
    :mod:`mabn_jax.functional`); trains with a plain ``nnx.value_and_grad``
    step. State (``nnx.BatchStat``): ``step``, ``mean``, ``var`` (used at
    inference), ``renorm_mean``, ``renorm_var`` (used for ``r``, ``d``).

    Inside ``nnx.capture`` a training call sows ``mu_B``, ``sigma2_B``,
    ``r``, ``d`` (as :class:`Statistic`).

    Args:
      num_features, rngs, use_running_average, axis, dtype: as for :class:`MABN`.
      param_dtype, use_bias, use_scale, bias_init, scale_init: as for :class:`MABN`.
      bias_metadata, scale_metadata, promote_dtype: as for :class:`MABN`.
      hyper: (keywords) the hyper-parameters of
        :class:`~mabn_jax.BatchRenormConfig` with its defaults (``momentum``
        0.99, ``epsilon``, ``axis_name``, ``axis_index_groups``,
        ``use_fast_variance``, ``force_float32_reductions``,
        ``norm_batch_size``, ``r_max``, ``d_max``, ``warmup_steps``,
        ``ramp_steps``, ``renorm_momentum``).

    Raises:
      TypeError: an unknown keyword.
      ValueError: an invalid hyper-parameter, or ``num_features`` that does
        not fit ``axis``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import mabn_jax.nnx
      >>> layer = mabn_jax.nnx.BatchRenorm(3, rngs=nnx.Rngs(0))
      >>> layer(jnp.arange(6.0).reshape(2, 3)).shape
      (2, 3)
      >>> int(layer.step[...])
      1
    """

    _config_cls = BatchRenormConfig
    _inference_names = ("mean", "var")
    __init__ = N.config_signature(N.Norm.__init__, BatchRenormConfig, "BatchRenorm")

    @staticmethod
    def _initial_state(feature_shape, config, param_dtype) -> Mapping[str, Array]:
        return _brn.init_state(feature_shape, _shell.state_dtype(param_dtype))._asdict()

    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` (renormalized by ``r``, ``d``); in training mode also
        advances the state.

        Args:
          x, use_running_average, mask: as for :meth:`MABN.__call__`.

        Returns:
          The normalized ``x``, in ``dtype`` (default: ``x``'s).

        Raises:
          ValueError: no ``use_running_average`` (attribute or argument), or
            ``x``'s features are not ``num_features``.
        """
        inference, config, x, scale, bias, stored = self._begin(x, use_running_average)
        state = _brn.BatchRenormState(**stored)
        if inference:
            return _brn.batch_renorm_inference(
                x, scale, bias, state, config, axis=self.axis, dtype=self.dtype
            )
        y, new_state, stats = _brn.batch_renorm_train(
            x, scale, bias, state, config, axis=self.axis, dtype=self.dtype, mask=mask
        )
        self._store(new_state._asdict(), stats)
        return y
