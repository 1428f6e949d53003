"""Moving Average Batch Normalization (MABN, ICLR 2020) and Batch Renormalization
for JAX and Flax.

Layers (``flax.linen``): :class:`MABN`, :class:`BatchRenorm`,
:class:`CenteredConv`, :class:`CenteredDense`. Training: :func:`value_and_grad`
(a drop-in for ``jax.value_and_grad``), over the low-level :func:`init_probes`
and :func:`record_backward_stats`. Deployment: :func:`fold_params`.
Checkpoints: :func:`check_batch_stats`. Centered kernels kept by the
optimizer: :mod:`mabn_jax.optax`. The math: :mod:`mabn_jax.functional`.
Flax NNX: :mod:`mabn_jax.nnx` (imported on first use).
"""

from mabn_jax import functional, monitor, optax
from mabn_jax._config import BatchRenormConfig, MABNConfig
from mabn_jax.checkpoint import check_batch_stats
from mabn_jax.convert import convert_batchnorm_variables, replace_batchnorm
from mabn_jax.fold import fold_affine, fold_norm, fold_params, norm_affine
from mabn_jax.linen import MABN, PROBES, BatchRenorm, CenteredConv, CenteredDense, center_kernel
from mabn_jax.training import init_probes, record_backward_stats, value_and_grad, without_probes

__version__ = "0.2.0"  # the single source: pyproject.toml reads it (dynamic version)


def __getattr__(name):
    """``mabn_jax.nnx`` on first use: importing ``flax.nnx`` costs ~0.5 s."""
    if name == "nnx":
        import importlib

        return importlib.import_module("mabn_jax.nnx")
    raise AttributeError(f"module 'mabn_jax' has no attribute {name!r}")


__all__ = [
    "MABN",
    "BatchRenorm",
    "CenteredConv",
    "CenteredDense",
    "center_kernel",
    "MABNConfig",
    "BatchRenormConfig",
    "value_and_grad",
    "init_probes",
    "record_backward_stats",
    "without_probes",
    "PROBES",
    "check_batch_stats",
    "replace_batchnorm",
    "convert_batchnorm_variables",
    "fold_params",
    "fold_norm",
    "fold_affine",
    "norm_affine",
    "functional",
    "monitor",
    "optax",
]
