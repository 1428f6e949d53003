"""MABN in place of ``nn.BatchNorm`` in a linen model you do not own, from its
pretrained statistics.

Two calls, no edit of the model's source::

    model = mabn_jax.replace_batchnorm(model)  # same init/apply
    variables = mabn_jax.convert_batchnorm_variables(model, bn_variables, x, train=False)

:func:`~mabn_jax.replace_batchnorm` wraps the model; while the wrapper runs, Flax's
method interception (``nn.intercept_methods``) sends every ``nn.BatchNorm``
call, however deep and however the layer was built (``partial``, a setup
attribute, ``nn.scan``, ``nn.remat``, ``nn.vmap``, a subclass), to a
:class:`mabn_jax.MABN` bound to that BatchNorm's own scope: its variables live
under the BatchNorm's path, and it takes the BatchNorm's ``axis``,
``epsilon``, ``momentum``, ``dtype``, ``param_dtype``, ``use_bias``,
``use_scale``, the initializers, ``axis_name``, ``axis_index_groups``,
``force_float32_reductions`` and ``use_running_average`` (attribute and call
argument alike).

Which MABN: the centered one (``centered=True``). The paper's plain layer
normalizes by ``χ² = E[x²] = σ² + μ²``, the variance only after
weight-centralized layers, and centering a pretrained kernel,
``W' = W − mean_fan_in(W)``, changes the convolution's output by
``−mean(W)·Σ_patch x``, which depends on the input and so cannot be absorbed
anywhere: it changes the function. The centered layer averages the mean too,
works after any layer, and at inference is exactly batch norm's affine map.
So ``nn.Conv`` and ``nn.Dense`` are left as they are.

Momentum: kept as each BatchNorm's. Both use the same convention (a decay
``α``: ``ema ← α·ema + (1 − α)·new`` once per step), so the EMA keeps its
memory of ``1/(1 − α)`` steps; MABN feeds it the window average ``σ̃²`` (an
``m``-step SMA) instead of the batch's ``σ²_B``, which lowers its noise and
delays it by ``(m − 1)/2`` steps. ``momentum=...`` in ``mabn_config``
overrides every layer's (e.g. a longer horizon at batch 1–2).
"""

from mabn_jax._linen_convert import (
    ReplacedBatchNorm,
    convert_batchnorm_variables,
    replace_batchnorm,
)

__all__ = ["replace_batchnorm", "convert_batchnorm_variables", "ReplacedBatchNorm"]
