"""MABN and Batch Renormalization for Flax ``linen``.

Layers: :class:`MABN`, :class:`BatchRenorm` (drop-ins for ``nn.BatchNorm``),
:class:`CenteredConv`, :class:`CenteredDense` (``nn.Conv`` / ``nn.Dense``
with weight-centralized kernels). Training: :func:`value_and_grad`, a drop-in
for ``jax.value_and_grad`` that records MABN's backward statistics; beneath it
:func:`init_probes` and :func:`record_backward_stats`. Models you do not own:
:func:`replace_batchnorm` and :func:`convert_batchnorm_variables`. The same
names are at the top level (``mabn_jax.MABN``, ...); :mod:`mabn_jax.nnx` is
the Flax NNX counterpart, laid out the same way (``_linen_layers``,
``_linen_centered``, ``_linen_training``, ``_linen_convert`` beside
``_nnx_layers``, ``_nnx_centered``, ``_nnx_training``, ``_nnx_convert``).
"""

from mabn_jax._linen_centered import CenteredConv, CenteredDense, center_kernel
from mabn_jax._linen_convert import (
    ReplacedBatchNorm,
    convert_batchnorm_variables,
    replace_batchnorm,
)
from mabn_jax._linen_layers import MABN, PROBES
from mabn_jax._linen_probes import init_probes, record_backward_stats, without_probes
from mabn_jax._linen_renorm import BatchRenorm
from mabn_jax._linen_training import value_and_grad

__all__ = [
    "MABN",
    "BatchRenorm",
    "CenteredConv",
    "CenteredDense",
    "center_kernel",
    "PROBES",
    "value_and_grad",
    "init_probes",
    "record_backward_stats",
    "without_probes",
    "replace_batchnorm",
    "convert_batchnorm_variables",
    "ReplacedBatchNorm",
]
