"""What the Flax shells (:mod:`mabn_jax.linen`, :mod:`mabn_jax.nnx`) share.

No math: the state's dtype and initial stored entries, the error for a
training-mode call without probes, weight centralization, building a
config from keyword arguments with errors that name the argument, and
mutable copies of variable trees.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mabn_jax import _state
from mabn_jax._config import MABNConfig

Array = jax.Array

__all__ = ["probe_scope", "in_helper", "consume_probe", "state_dtype", "initial_state",
           "missing_probes", "center_kernel", "make_config", "to_dicts"]


def state_dtype(param_dtype: Any) -> Any:
    """The state is kept in ``promote_types(param_dtype, float32)``."""
    return jnp.promote_types(param_dtype, jnp.float32)


def initial_state(feature_shape: Sequence[int], config: MABNConfig,
                  param_dtype: Any) -> dict[str, Array]:
    """A fresh layer's ``batch_stats`` entries, by stored name (``_state.LAYOUTS``)."""
    return _state.to_mapping(_state.init_state(feature_shape, config, state_dtype(param_dtype)))


def missing_probes(layer: str, *, helper: str, instead_of: str, low_level: str,
                   evaluation: str) -> str:
    """The error of an MABN layer applied in training mode without probes."""
    return (
        f"MABN layer {layer!r} is applied in training mode without its probes, so its "
        "backward statistics could not be recorded. Compute the gradient with "
        f"{helper} in place of {instead_of}: it passes the probes and records the "
        f"statistics. (Low-level API: {low_level}) For evaluation use {evaluation}.")


def center_kernel(kernel: Array) -> Array:
    """Subtracts each output unit's fan-in mean (all axes but the last).

    ``W'[..., o] = W[..., o] − mean(W[..., o])``: each output is a zero-mean
    combination of its inputs (weight centralization, which makes the
    non-centered MABN safe).

    Example:
      >>> import jax.numpy as jnp, mabn_jax
      >>> kernel = jnp.array([[1.0, 2.0], [3.0, 6.0]])
      >>> mabn_jax.center_kernel(kernel)
      Array([[-1., -2.],
             [ 1.,  2.]], dtype=float32)
    """
    return kernel - kernel.mean(axis=tuple(range(kernel.ndim - 1)), keepdims=True)


def make_config(cls: type, kwargs: Mapping[str, Any], layer: str, takes: str):
    """``cls(**kwargs)``; an unknown name raises ``TypeError`` listing what the
    layer takes (``takes`` says besides which arguments), invalid values the
    config's own ``ValueError``."""
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise TypeError(
            f"{layer}: unexpected keyword argument {unknown[0]!r}. {layer} takes {takes}, "
            f"and the hyper-parameters of {cls.__name__}: {', '.join(fields)}.")
    return cls(**kwargs)


# The probes consumed while a value_and_grad helper's loss function runs, by id
# (the objects are kept too, so that no id is reused by a freed tracer): each
# must be consumed once (one training call per layer and step).
_CONSUMED: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "mabn_probes_consumed", default=None)


@contextlib.contextmanager
def probe_scope():
    """The loss function's call inside a value_and_grad helper."""
    token = _CONSUMED.set({})
    try:
        yield
    finally:
        _CONSUMED.reset(token)


def in_helper() -> bool:
    """Whether a value_and_grad helper's loss function is running."""
    return _CONSUMED.get() is not None


def consume_probe(probe, layer: str, state=None) -> None:
    """Raises if this probe, or this layer state, was already used in this helper
    call: two training applies of the same batch_stats in one loss would sum
    their backward statistics into one slot. The state is checked too because
    params cast per apply (a mixed-precision wrapper) make new probe objects;
    the state arrays an apply reads are the ones the loss passed in."""
    used = _CONSUMED.get()
    if used is None:
        return
    if id(probe) in used or (state is not None and id(state) in used):
        raise ValueError(
            f"MABN layer {layer!r} is applied in training mode twice in one loss (two "
            "training applies of the model with the same batch_stats, e.g. for two views "
            "of a batch): their backward statistics would be added into one window slot. "
            "Apply the model once per step, on the views concatenated into one batch (or "
            "give each apply its own layers).")
    used[id(probe)] = probe
    if state is not None:
        used[id(state)] = state


def to_dicts(tree: Any) -> Any:
    """A copy of a nest of mappings (``FrozenDict`` included) as plain dicts;
    leaves are shared."""
    return {k: to_dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree
