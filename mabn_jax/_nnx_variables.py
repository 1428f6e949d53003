"""The variable types and names of the NNX layers' probes and statistics.

:class:`Probe` is the ``nnx.BatchStat`` that carries a backward statistic out
of the gradient; :class:`Statistic` is what the layers sow inside
``nnx.capture``. The names say where the NNX helper attaches probes on a layer
(``PROBE_NAMES``, ``USES_NAME``), the metadata key of a probe's token, and the
state entries that carry the probes where none can be attached
(``IN_STATE_NAMES``, :mod:`mabn_jax._nnx_in_state`).
"""

from __future__ import annotations

from typing import TypeVar

from flax import nnx

__all__ = [
    "Probe",
    "Statistic",
    "keep_dtypes",
    "PROBE_TOKEN",
    "PROBE_NAMES",
    "USES_NAME",
    "IN_STATE_NAMES",
]

_Arrays = TypeVar("_Arrays", bound=tuple)  # flax.typing.PromoteDtypeFn's TupleArg


class Probe(nnx.BatchStat):
    """A zero, window-shaped variable whose gradient is an MABN layer's Ψ_B (g_B).

    Flax's perturbation convention: :func:`mabn_jax.nnx.value_and_grad` (or
    :func:`mabn_jax.nnx.attach_probes`) attaches one per statistic to each
    MABN layer for one step, differentiates w.r.t. it and removes it; it is
    never part of a checkpoint or of the returned gradient. It is a kind of
    ``nnx.BatchStat``, so transforms' axes for the state (``nnx.StateAxes``,
    ``nnx.prefix`` filters) give the probes the state's axes.

    Args:
      value: the probe's array (zeros; its value is unused).
      **metadata: as for ``nnx.Variable``.

    Example:
      >>> import jax.numpy as jnp, mabn_jax.nnx
      >>> probe = mabn_jax.nnx.Probe(jnp.zeros(3))
      >>> probe[...]
      Array([0., 0., 0.], dtype=float32)
    """


class Statistic(nnx.Variable):
    """The kind of the forward statistics a training call sows: captured with
    ``nnx.capture(f, mabn_jax.nnx.Statistic)``, and only then (a user's
    ``nnx.capture(f, nnx.Intermediate)`` holds only the user's own values).

    Args:
      value: the statistic's array.
      **metadata: as for ``nnx.Variable``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import mabn_jax.nnx
      >>> layer = mabn_jax.nnx.MABN(3, buffer_size=4, rngs=nnx.Rngs(0))
      >>> issubclass(mabn_jax.nnx.Statistic, nnx.Variable)
      True
    """


def keep_dtypes(arrays, dtype=None):
    """The default ``promote_dtype``: no promotion (the result has the input's
    dtype, or ``dtype``). ``flax.nnx.nn.dtypes.promote_dtype`` gives
    ``nnx.BatchNorm``'s (input promoted with the parameters)."""
    del dtype
    return arrays


#: The metadata key of a probe's identity (it survives nnx transforms' split/merge).
PROBE_TOKEN = "mabn_probe_token"


#: Attribute names of the probes on an MABN layer, in ``_state.Probes`` order.
PROBE_NAMES = ("psi_probe", "g_probe")


#: The probe that counts a layer's training applications (value_and_grad attaches it).
USES_NAME = "uses_probe"


#: The state entries that carry the probes' cotangents where none are attached
#: (see :meth:`MABN._in_state_probes`), in ``_state.Probes`` order.
IN_STATE_NAMES = ("psi_window", "g_window", "step")
