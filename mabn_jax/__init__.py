"""Moving Average Batch Normalization (MABN, ICLR 2020) for JAX and Flax."""

from mabn_jax import functional
from mabn_jax.functional import MABNConfig, MABNState, CenteredMABNState, Probes
from mabn_jax.linen import MABN, CenteredConv, CenteredDense, PROBES, center_kernel
from mabn_jax.probes import init_probes, record_backward_stats
from mabn_jax.checkpoint import check_batch_stats
from mabn_jax.fold import fold_affine, fold_norm, fold_params, norm_affine
from mabn_jax.batch_renorm import BatchRenorm
from mabn_jax import monitor

__version__ = "0.1.0"

__all__ = [
    "MABN",
    "BatchRenorm",
    "monitor",
    "CenteredConv",
    "CenteredDense",
    "PROBES",
    "center_kernel",
    "init_probes",
    "record_backward_stats",
    "check_batch_stats",
    "functional",
    "MABNConfig",
    "MABNState",
    "CenteredMABNState",
    "Probes",
    "fold_params",
    "fold_norm",
    "fold_affine",
    "norm_affine",
]
