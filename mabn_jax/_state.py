"""MABN's state and probes, and the one place that knows their stored layout.

The plain (non-centered) layer is the centered one without a mean: its
"variance" is the second moment about zero, χ² = E[x²], and it keeps no mean
or g window. One :class:`MABNState` type serves both; the names under which
each variant stores its fields in Flax's ``batch_stats`` (a checkpoint
format) are in :data:`LAYOUTS`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mabn_jax._config import MABNConfig

Array = jax.Array

__all__ = [
    "MABNState",
    "Probes",
    "LAYOUTS",
    "init_state",
    "init_probes",
    "to_mapping",
    "from_mapping",
    "probes_from_mapping",
    "as_state",
    "layout_error",
    "check_state",
]


class MABNState(NamedTuple):
    """One layer's state (any leading ``vmap``/``nn.scan`` axes allowed).

    Attributes:
      step: window steps seen (a float counter of integers; ghost batches
        count one step per group).
      var_window: ``[m, *features]`` ring buffer of the per-step σ²_B
        (centered) or χ²_B = E[x²] (plain; stored as ``x2_window``).
      psi_window: ``[m, *features]`` ring buffer of the per-step Ψ_B.
      ema_var: EMA of σ̃² (centered) or χ̃² (plain; stored as ``ema_x2``),
        used at inference and by ``r``.
      skipped: training steps skipped for non-finite statistics.
      mean_window, g_window: ``[m, *features]`` ring buffers of μ_B and g_B
        (centered only, else ``None``).
      ema_mean: EMA of μ̃ (centered only).

    Example:
      >>> import mabn_jax.functional as F
      >>> state = F.init_state((3,), F.MABNConfig(buffer_size=4))
      >>> state.var_window.shape, state.centered
      ((4, 3), True)
    """

    step: Array
    var_window: Array
    psi_window: Array
    ema_var: Array
    skipped: Array
    mean_window: Array | None = None
    g_window: Array | None = None
    ema_mean: Array | None = None

    @property
    def centered(self) -> bool:
        return self.mean_window is not None


class Probes(NamedTuple):
    """Inputs whose cotangents carry a step's backward statistics out.

    The gradient w.r.t. ``psi`` (``g``) holds this step's Ψ_B (g_B) in the
    slots it writes and zeros elsewhere, whatever the number of ghost batches.

    Attributes:
      psi: window-shaped, ``[m, *features]``; its forward value is unused.
      g: the same for g_B (centered layers; None for the plain one).
      loss_scale: optional (default 1): the factor the loss was multiplied by
        (dynamic loss scaling), so the stored windows, kept unscaled, are
        scaled to match the incoming gradient.
      uses: optional, shaped like the state's ``step``: its cotangent counts
        the layer's training applications whose backward reached these probes
        (1 per application, whatever the loss). :func:`record_backward_stats`
        then requires exactly one: it catches two applications summed into one
        slot (two views, each through its own ``jit``, or a ``vmap``) and probes cut
        from the gradient (a ``stop_gradient`` of the params that carry them).

    Example:
      >>> import mabn_jax.functional as F
      >>> probes = F.init_probes(F.init_state((3,), F.MABNConfig(buffer_size=4, centered=False)))
      >>> probes.psi.shape, probes.g
      ((4, 3), None)
    """

    psi: Array
    g: Array | None = None
    loss_scale: Array | None = None
    uses: Array | None = None


# Stored name -> MABNState field, in storage order.
LAYOUTS: dict[bool, tuple[tuple[str, str], ...]] = {
    False: (
        ("step", "step"),
        ("x2_window", "var_window"),
        ("psi_window", "psi_window"),
        ("ema_x2", "ema_var"),
        ("skipped", "skipped"),
    ),
    True: (
        ("step", "step"),
        ("mean_window", "mean_window"),
        ("var_window", "var_window"),
        ("g_window", "g_window"),
        ("psi_window", "psi_window"),
        ("ema_mean", "ema_mean"),
        ("ema_var", "ema_var"),
        ("skipped", "skipped"),
    ),
}
_KEYS = {centered: frozenset(k for k, _ in names) for centered, names in LAYOUTS.items()}


def to_mapping(state: MABNState) -> dict[str, Array]:
    """The ``batch_stats`` entries of a layer's state."""
    return {key: getattr(state, field) for key, field in LAYOUTS[state.centered]}


def probes_from_mapping(probes: Mapping[str, Any]) -> Probes:
    """:class:`Probes` from their entries by name (``'psi'``; optional ``'g'``,
    ``'loss_scale'``, ``'uses'``), as the helpers and collections carry them."""
    return Probes(probes["psi"], *(probes.get(name) for name in Probes._fields[1:]))


def from_mapping(node: Any) -> MABNState | None:
    """The MABN state stored in a ``batch_stats`` entry, or None if it is not one."""
    if not isinstance(node, Mapping):
        return None
    keys = frozenset(node.keys())
    for centered, names in LAYOUTS.items():
        if keys == _KEYS[centered]:
            return MABNState(**{field: node[key] for key, field in names})
    return None


def as_state(node: Mapping[str, Any]) -> MABNState:
    """The state in a layer's own ``batch_stats`` entry (its layout already checked)."""
    state = from_mapping(node)
    if state is None:
        raise ValueError(
            f"mabn_jax: an MABN layer's state has fields {sorted(node)}, "
            f"expected those of {[k for k, _ in LAYOUTS[True]]} (centered) or "
            f"{[k for k, _ in LAYOUTS[False]]}; re-initialize the model."
        )
    return state


def layout_error(stored: Iterable[str], centered: bool) -> str | None:
    """Why the ``stored`` names (a ``batch_stats`` entry or its keys) are not
    this layer's layout (None if they are).

    Names the older layouts this version refuses and how to move them over.
    """
    keys, want = frozenset(stored), _KEYS[centered]
    if keys == want:
        return None
    if keys | {"skipped"} == want:
        return (
            "lacks 'skipped': it was written by a mabn_jax without the non-finite "
            "skip counter. To keep its statistics, add 'skipped': jnp.zeros(()) to "
            "each MABN layer of the restored batch_stats; otherwise re-initialize "
            "with model.init"
        )
    other = _KEYS[not centered]
    if keys in (other, other - {"skipped"}):
        return (
            f"was saved from a centered={not centered} layer but this layer has "
            f"centered={centered}; build the model with the same `centered`"
        )
    return (
        f"has fields {sorted(keys)}, expected {sorted(want)}; it was saved by another "
        "layer or an incompatible mabn_jax"
    )


def init_state(
    feature_shape: Sequence[int],
    config: MABNConfig,
    dtype: Any = jnp.float32,
    rows: int | None = None,
) -> MABNState:
    """The state before the first training step (EMA of the variance at 1).

    Args:
      feature_shape: the features' shape (one entry per feature axis).
      config: the layer's hyper-parameters (``buffer_size``, ``centered``).
      dtype: the state's dtype (float32 or wider).
      rows: the windows' rows; ``None``: ``config.window``. A layer sizing its
        window (:attr:`~mabn_jax.MABNConfig.window_per_layer`) may store just its
        :meth:`~mabn_jax.MABNConfig.window_length` (the linen layers do: they see the
        input at ``init``).

    Returns:
      A :class:`MABNState` with empty windows at step 0.

    Example:
      >>> import mabn_jax.functional as F
      >>> state = F.init_state((3,), F.MABNConfig(buffer_size=4))
      >>> state.ema_var
      Array([1., 1., 1.], dtype=float32)
    """
    feature_shape = tuple(feature_shape)
    window = jnp.zeros((rows or config.window,) + feature_shape, dtype)
    zero = jnp.zeros((), dtype)
    ones = jnp.ones(feature_shape, dtype)
    if not config.centered:
        return MABNState(zero, window, window, ones, zero)
    return MABNState(
        zero, window, window, ones, zero, window, window, jnp.zeros(feature_shape, dtype)
    )


def init_probes(state: MABNState) -> Probes:
    """Zero probes of the windows' shape (any leading vmap/scan axes included).

    Args:
      state: the layer's state before the step.

    Returns:
      :class:`Probes` of zeros (``g`` None for the plain layer).

    Example:
      >>> import mabn_jax.functional as F
      >>> state = F.init_state((3,), F.MABNConfig(buffer_size=4, centered=True))
      >>> probes = F.init_probes(state)
      >>> probes.psi.shape, probes.g.shape
      ((4, 3), (4, 3))
    """
    g = None if state.g_window is None else jnp.zeros_like(state.g_window)
    return Probes(jnp.zeros_like(state.psi_window), g)


def check_state(
    state: MABNState,
    config: MABNConfig,
    feature_shape: tuple[int, ...],
    layer: str = "MABN",
    window: int | None = None,
) -> None:
    """The state must be this layer's: variant and window shape (trace time).

    A layer that sizes its window (:attr:`~mabn_jax.MABNConfig.window_per_layer`) takes
    windows of at least the ``window`` steps it averages (``None``: of any
    length, for inference); any other takes exactly ``config.window`` rows."""
    low = sorted(
        {
            str(v.dtype)
            for v in state
            if v is not None
            and jnp.issubdtype(v.dtype, jnp.floating)
            and jnp.finfo(v.dtype).bits < 32
        }
    )
    if low:
        raise ValueError(
            f"{layer}: the state (batch_stats) is {', '.join(low)}; it must be float32 or "
            "wider (in bfloat16 the step counter stops at 256 and the windows lose their "
            "precision). It was cast with the params: cast only the params and inputs "
            "(e.g. jax.tree.map over variables['params']), keep batch_stats as model.init "
            "made them."
        )
    if state.centered != config.centered:
        raise ValueError(
            f"{layer}: config.centered={config.centered} but the state is a "
            f"centered={state.centered} state; build it with init_state(..., config)."
        )
    rows = state.psi_window.shape[0] if state.psi_window.ndim else 0
    want_rows, hint = config.window, ""
    if config.window_per_layer:  # any rows from its window length up to 16 fit
        least = window or 1
        want_rows = rows if least <= rows <= config.window else least
        if 0 < rows < least:
            hint = (
                f" This centered layer averages the last {least} steps (its default "
                "window for this input, MABNConfig.window_length; a centered state "
                "from before per-layer windows may hold 2): build it with "
                f"buffer_size={rows} to keep this state."
            )
    want = (want_rows,) + tuple(feature_shape)
    if tuple(state.psi_window.shape) != want:
        raise ValueError(
            f"{layer}: state window shape {tuple(state.psi_window.shape)} does not fit "
            f"buffer_size={config.window} and features {tuple(feature_shape)} "
            f"(expected {want}); the state was built for another configuration or input. "
            "Re-initialize it (model.init, or init_state(features, config)), or load a "
            "checkpoint made with the same buffer_size and feature size." + hint
        )
