"""MABN and Batch Renormalization for Flax NNX.

Layers: :class:`MABN`, :class:`BatchRenorm` (drop-ins for ``nnx.BatchNorm``),
:class:`CenteredConv`, :class:`CenteredLinear` (``nnx.Conv`` / ``nnx.Linear``
with weight-centralized kernels). Training: :func:`value_and_grad`, a drop-in
for ``nnx.value_and_grad`` that records MABN's backward statistics; beneath
it :func:`attach_probes`, :class:`Probe` and :func:`record_backward_stats`.
Models you do not own: :func:`replace_batchnorm` turns every ``nnx.BatchNorm``
of a model into a (centered) :class:`MABN` in place, from its statistics.
A standard NNX train step becomes an MABN one by changing the gradient call::

    from flax import nnx
    import mabn_jax.nnx


    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = mabn_jax.nnx.value_and_grad(loss_fn)(model)  # was nnx.value_and_grad
        optimizer.update(model, grads)
        return loss

The layers' state (``nnx.BatchStat``) has the names of the linen layers'
``batch_stats`` entries. See ``docs/nnx.md``.
"""

from mabn_jax._nnx_centered import CenteredConv, CenteredLinear
from mabn_jax._nnx_convert import replace_batchnorm
from mabn_jax._nnx_layers import MABN
from mabn_jax._nnx_probes import attach_probes, record_backward_stats
from mabn_jax._nnx_renorm import BatchRenorm
from mabn_jax._nnx_training import grad, value_and_grad
from mabn_jax._nnx_variables import Probe, Statistic

__all__ = [
    "MABN",
    "BatchRenorm",
    "CenteredConv",
    "CenteredLinear",
    "value_and_grad",
    "grad",
    "attach_probes",
    "record_backward_stats",
    "Probe",
    "Statistic",
    "replace_batchnorm",
]
