"""The math as pure functions of explicit arrays (no Flax).

MABN (Yan et al., ICLR 2020)::

    state = init_state(features, config)
    y, new_state = mabn_train(x, scale, bias, state, probes, config)
    #   differentiate w.r.t. the probes (init_probes(state)), then
    new_state = record_backward_stats(new_state, probe_grads, previous=state)
    y = mabn_inference(x, scale, bias, state, config)

Batch Renormalization (Ioffe 2017): ``batch_renorm_train`` and
``batch_renorm_inference`` with a :class:`BatchRenormState`. The equations are
in ``docs/design.md`` and in the docstrings of the private modules that
implement them, ``mabn_jax._mabn`` and ``mabn_jax._brn``.
"""

from mabn_jax._brn import (
    BatchRenormState,
    Clips,
    batch_renorm_inference,
    batch_renorm_train,
    clip_schedule,
)
from mabn_jax._brn import init_state as init_batch_renorm_state
from mabn_jax._config import BatchRenormConfig, MABNConfig
from mabn_jax._inference import inference_affine, mabn_inference
from mabn_jax._mabn import mabn_train, mabn_train_with_stats
from mabn_jax._record import record_backward_stats
from mabn_jax._state import MABNState, Probes, init_probes, init_state

__all__ = [
    "MABNConfig",
    "MABNState",
    "Probes",
    "init_state",
    "init_probes",
    "mabn_train",
    "mabn_train_with_stats",
    "mabn_inference",
    "inference_affine",
    "record_backward_stats",
    "BatchRenormConfig",
    "BatchRenormState",
    "init_batch_renorm_state",
    "clip_schedule",
    "Clips",
    "batch_renorm_train",
    "batch_renorm_inference",
]
