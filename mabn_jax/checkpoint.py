"""Checking a saved ``batch_stats`` tree against the model before loading it.

MABN's state is part of the model, so a checkpoint from another configuration
must fail loudly instead of being padded, truncated or completed with fresh
values. :func:`check_batch_stats` compares the stored tree (arrays, or the
shape/dtype metadata a checkpoint library reports without reading the data,
e.g. ``orbax.checkpoint.StandardCheckpointer().metadata(path).item_metadata.tree``)
with the tree the model expects, and names what differs in MABN terms::

    stored = ckptr.metadata(path).item_metadata.tree
    mabn_jax.check_batch_stats(stored["batch_stats"], state.batch_stats)
    state = ckptr.restore(path, abstract_state)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mabn_jax import _state

__all__ = ["check_batch_stats"]

_LAYOUTS = {frozenset(k for k, _ in names): centered for centered, names in _state.LAYOUTS.items()}
# Counters: float since mabn_jax 0.2; int32 checkpoints of 0.1 restore into them.
_COUNTERS = ("step", "skipped")


def check_batch_stats(
    stored: Mapping[str, Any], expected: Mapping[str, Any], path: str = "batch_stats"
) -> None:
    """Raises ``ValueError`` unless ``stored`` has the layout of ``expected``.

    Both are nested mappings whose leaves have ``.shape`` and ``.dtype``
    (arrays, ``jax.ShapeDtypeStruct``, checkpoint metadata). The same keys,
    shapes and dtypes are required everywhere; for an MABN layer the message
    says which setting differs (``buffer_size``, the features, ``centered``)
    or that the checkpoint predates the ``skipped`` counter.

    Args:
      stored: the checkpoint's ``batch_stats`` (arrays or their metadata).
      expected: the model's ``batch_stats`` (e.g. from ``init`` or
        ``jax.eval_shape``).
      path: the name of the tree's root in the messages.

    Raises:
      ValueError: a key, shape or dtype differs (the message names the entry
        and, for an MABN layer, the setting).

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax
      >>> layer = mabn_jax.MABN(use_running_average=True, buffer_size=4)
      >>> expected = layer.init(jax.random.key(0), jnp.ones((2, 3)))["batch_stats"]
      >>> mabn_jax.check_batch_stats(expected, expected)  # passes silently
      >>> mabn_jax.check_batch_stats({"step": expected["step"]}, expected)
      Traceback (most recent call last):
      ...
      ValueError: ...
    """
    if not isinstance(stored, Mapping) or not isinstance(expected, Mapping):
        if isinstance(stored, Mapping) or isinstance(expected, Mapping):
            raise ValueError(
                f"checkpoint: {path} is a {type(stored).__name__} in the "
                f"checkpoint but a {type(expected).__name__} in the model."
            )
        _check_leaf(stored, expected, path)
        return
    keys, want = frozenset(stored), frozenset(expected)
    if want in _LAYOUTS:
        _check_layer(stored, expected, path)
        return
    if keys != want:
        raise ValueError(
            f"checkpoint: {path} has {sorted(keys - want)} that the model lacks and "
            f"lacks {sorted(want - keys)}; the checkpoint is from another model."
        )
    for key in sorted(want):
        check_batch_stats(stored[key], expected[key], f"{path}/{key}")


def _check_layer(stored: Mapping, expected: Mapping, path: str) -> None:
    error = _state.layout_error(list(stored), _LAYOUTS[frozenset(expected)])
    if error:
        raise ValueError(f"checkpoint: MABN layer {path} {error}.")
    lead = len(expected["step"].shape)  # leading axes of nn.scan / vmap
    got, exp = tuple(stored["psi_window"].shape), tuple(expected["psi_window"].shape)
    if got[:lead] == exp[:lead] and len(got) == len(exp) and got != exp:
        if got[lead] != exp[lead]:
            raise ValueError(
                f"checkpoint: MABN layer {path} was saved with buffer_size={got[lead]} "
                f"but the model has buffer_size={exp[lead]}; build the model with "
                f"buffer_size={got[lead]} to resume this checkpoint."
            )
        raise ValueError(
            f"checkpoint: MABN layer {path} was saved for features {got[lead + 1 :]} "
            f"but the model has features {exp[lead + 1 :]}."
        )
    for key in _COUNTERS:  # an int32 counter (mabn_jax 0.1) restores as a float
        stored_dtype = np.dtype(stored[key].dtype)
        if np.issubdtype(stored_dtype, np.integer) and np.issubdtype(
            np.dtype(expected[key].dtype), np.floating
        ):
            stored = {**stored, key: jax.ShapeDtypeStruct(stored[key].shape, expected[key].dtype)}
    for key in sorted(expected):
        _check_leaf(stored[key], expected[key], f"{path}/{key}")


def _check_leaf(stored: Any, expected: Any, path: str) -> None:
    got, want = tuple(stored.shape), tuple(expected.shape)
    if got != want:
        raise ValueError(
            f"checkpoint: {path} has shape {got} in the checkpoint but {want} in the model."
        )
    if np.dtype(stored.dtype) != np.dtype(expected.dtype):
        raise ValueError(
            f"checkpoint: {path} has dtype {np.dtype(stored.dtype)} in the "
            f"checkpoint but {np.dtype(expected.dtype)} in the model."
        )
