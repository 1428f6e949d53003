"""The statistics monitor: per-layer batch statistics of a training step.

Forward statistics: :class:`~mabn_jax.MABN` and :class:`~mabn_jax.BatchRenorm`
sow them into the ``'intermediates'`` collection in training mode. Make that
collection mutable to get them; otherwise ``sow`` does nothing and the traced
step is unchanged::

    y, updates = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])
    forward = mabn_jax.monitor.forward_stats(updates["intermediates"])

Backward statistics (Ψ_B and, centered, g_B) are the gradients of the probes
of the low-level API (:func:`mabn_jax.init_probes`)::

    backward = mabn_jax.monitor.backward_stats(probe_grads)

They have the windows' shape ``[m, *features]``: a step from state ``step``
puts the Ψ_B of its group ``i`` (``i = 0`` without ghost batches) in slot
``(step + 1 + i) mod m`` and zeros elsewhere (with more groups than ``m``, a
slot keeps its last group's). :func:`mabn_jax.value_and_grad` records the
same values into the same slots of ``psi_window`` (``g_window``).

Both return flat dicts ``{'path/to/layer/name': array}``; forward statistics
have a leading ``[G]`` axis for ghost batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

__all__ = ["forward_stats", "backward_stats", "l2_norms"]


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def forward_stats(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Flattens a sown ``'intermediates'`` tree; ``sow``'s tuples become their last entry.

    Args:
      intermediates: the ``'intermediates'`` collection of a training-mode
        ``apply`` (``mutable=[..., 'intermediates']``).

    Returns:
      ``{'path/to/layer/name': array}`` for each sown statistic.

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax
      >>> layer = mabn_jax.BatchRenorm(use_running_average=False)
      >>> x = jnp.arange(6.0).reshape(2, 3)
      >>> variables = layer.init(jax.random.key(0), x)
      >>> _, sown = layer.apply(variables, x, mutable=["batch_stats", "intermediates"])
      >>> sorted(mabn_jax.monitor.forward_stats(sown["intermediates"]))
      ['d', 'mu_B', 'r', 'sigma2_B']
    """
    out = {}
    for k, v in _flat(intermediates).items():
        out[k] = v[-1] if isinstance(v, tuple) else v
    return out


def backward_stats(probe_grads: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Flattens the probe-gradient tree: ``'layer/psi'`` is Ψ_B, ``'layer/g'`` is g_B.

    Args:
      probe_grads: the gradient w.r.t. the probes (:func:`mabn_jax.init_probes`).

    Returns:
      ``{'path/to/layer/psi': array, ...}``, each shaped like the layer's window.

    Example:
      >>> import jax.numpy as jnp, mabn_jax
      >>> grads = {"MABN_0": {"psi": jnp.ones(3)}}
      >>> mabn_jax.monitor.backward_stats(grads)
      {'MABN_0/psi': Array([1., 1., 1.], dtype=float32)}
    """
    return _flat(probe_grads)


def l2_norms(stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The l2 norm over channels of each statistic (per group for ghost batches,
    per window slot for backward statistics).

    Args:
      stats: flat statistics, as :func:`forward_stats` or :func:`backward_stats`
        return them; channels along the last axis.

    Returns:
      The same keys, each statistic's l2 norm over its last axis.

    Example:
      >>> import jax.numpy as jnp, mabn_jax
      >>> mabn_jax.monitor.l2_norms({"MABN_0/psi": jnp.array([3.0, 4.0])})
      {'MABN_0/psi': Array(5., dtype=float32)}
    """
    return {k: jnp.sqrt(jnp.sum(jnp.square(v), axis=-1)) for k, v in stats.items()}
