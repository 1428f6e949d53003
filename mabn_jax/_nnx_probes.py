"""The probe layer under :func:`mabn_jax.nnx.value_and_grad`: probes attached to
a model's MABN layers, and the record.

A probe is an :class:`~mabn_jax.nnx.Probe` variable (an ``nnx.BatchStat``) on
each MABN layer, zero and shaped like its Ψ (g) window, whose gradient holds
this step's Ψ_B (g_B); :func:`record_backward_stats` writes them into the
layer's windows and removes the probes. Each probe carries a token (the
layer's path) that survives NNX transforms' split/merge and copies. Public:
:func:`attach_probes`, :func:`record_backward_stats`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from mabn_jax import _record, _state
from mabn_jax._nnx_layers import MABN
from mabn_jax._nnx_variables import PROBE_NAMES, PROBE_TOKEN, USES_NAME, Probe

__all__ = [
    "attach_probes",
    "record_backward_stats",
    "layers_of",
    "name_of",
    "probe_token",
    "attach",
    "snapshot",
    "restore",
    "detach",
    "write_steps",
    "step_into",
]

Path = tuple[Any, ...]


def layers_of(node) -> list[tuple[Path, MABN]]:
    """Every MABN layer in a graph node, by path (each shared layer once)."""
    return [(path, m) for path, m in nnx.iter_graph(node) if isinstance(m, MABN)]


def _layer_state(layer: MABN) -> _state.MABNState:
    return _state.as_state({k: getattr(layer, k)[...] for k in layer.state_names})


def name_of(path: Path) -> str:
    return "/".join(map(str, path)) or "<the model itself>"


def attach_probes(model) -> nnx.State:
    """Attaches zero probes to each MABN layer of ``model`` (low-level API).

    Take the gradient w.r.t. ``nnx.DiffState(argnum, (nnx.Param, Probe))``
    next, then call :func:`record_backward_stats` (its example shows the whole
    step; :func:`value_and_grad` does all three).

    Args:
      model: an NNX module (or graph node) holding :class:`MABN` layers; a
        layer alone is a model.

    Returns:
      The layers' state before the step (pure arrays, nested by path): pass it
      as ``previous`` to :func:`record_backward_stats`.

    Raises:
      ValueError: a layer already has probes attached (the previous step's
        :func:`record_backward_stats` was not called).

    Example:
      >>> from flax import nnx
      >>> import mabn_jax.nnx
      >>> layer = mabn_jax.nnx.MABN(3, centered=False, buffer_size=4, rngs=nnx.Rngs(0))
      >>> previous = mabn_jax.nnx.attach_probes(layer)
      >>> layer.psi_probe[...].shape  # one Ψ_B slot per window step
      (4, 3)
      >>> sorted(previous)
      ['ema_x2', 'psi_window', 'skipped', 'step', 'x2_window']
    """
    return attach(model, 0)


def _token(k: int, path: Path) -> str:
    """A layer's probe token: its path, and for the k-th differentiated model
    (k > 0) its position, so that two models' layers at one path stay apart
    (stable across steps: it is part of the graph nnx.jit caches on)."""
    return name_of(path) if k == 0 else f"{k}:{name_of(path)}"


def probe_token(layer: MABN):
    return getattr(layer, PROBE_NAMES[0]).get_metadata().get(PROBE_TOKEN)


def attach(model, k: int, count: bool = False) -> nnx.State:
    """Attaches the probes (``count``: also the ``uses`` probe that counts each
    layer's applications, so that record_backward_stats can require one)."""
    for path, layer in layers_of(model):
        if hasattr(layer, PROBE_NAMES[0]):
            raise ValueError(
                f"MABN layer {name_of(path)!r} already has probes attached: the previous "
                "step's record_backward_stats(model, grads, previous) was not called, so its "
                "backward statistics are missing. Call it once after every gradient, or use "
                "mabn_jax.nnx.value_and_grad, which does both."
            )
        state = _layer_state(layer)
        for name, value in zip(PROBE_NAMES, _state.init_probes(state)):
            if value is not None:
                setattr(layer, name, Probe(value, **{PROBE_TOKEN: _token(k, path)}))  # type: ignore[arg-type]
        if count:
            uses = Probe(jnp.zeros_like(state.step), **{PROBE_TOKEN: _token(k, path)})  # type: ignore[arg-type]
            setattr(layer, USES_NAME, uses)
    return snapshot(model)


def snapshot(model) -> nnx.State:
    """The layers' state (pure arrays, nested by path): ``previous`` of a step."""
    flat = {}
    for path, layer in layers_of(model):
        for key, value in _state.to_mapping(_layer_state(layer)).items():
            flat[path + (key,)] = value
    return nnx.from_flat_state(flat)


def restore(model, previous: nnx.State) -> None:
    """Puts back the layers' state from before the step (``attach``'s return)."""
    for path, layer in layers_of(model):
        for key in layer.state_names:
            layer_prev = _at(previous, path + (key,), "previous", "")
            getattr(layer, key).set_value(layer_prev)


def detach(model) -> None:
    for _, layer in layers_of(model):
        for name in (*PROBE_NAMES, USES_NAME):
            if hasattr(layer, name):
                delattr(layer, name)


def _at(tree, path: Path, what: str, fix: str):
    try:
        for key in path:
            tree = step_into(tree, key)
    except (KeyError, TypeError, IndexError, AttributeError):
        raise ValueError(
            f"record_backward_stats: {what} has no entry {name_of(path)!r}; {fix}"
        ) from None
    return tree[...] if isinstance(tree, nnx.Variable) else tree


def step_into(tree, key):
    """``tree[key]``; a gradient in tree mode (graph=False) is module-shaped."""
    return getattr(tree, key) if isinstance(tree, nnx.Module) else tree[key]


def record_backward_stats(model, grads, previous) -> None:
    """Writes each MABN layer's Ψ_B (g_B) from ``grads`` into its windows (low-level API).

    Args:
      model: the model the probes were attached to (after the step: its
        layers hold the new state, with this step's slots reserved).
      grads: the gradient w.r.t. the model, including the :class:`Probe`
        entries (``nnx.DiffState(argnum, (nnx.Param, Probe))``).
      previous: what :func:`attach_probes` returned for this step.

    A layer whose backward statistics are not finite returns to ``previous``
    with ``skipped`` one higher; one not applied in training mode this step
    (e.g. ``eval()``-frozen) is left as it is. The probes are removed.
    Arguments that are not one step apart raise eagerly; under ``jit`` the
    layer's statistics become NaN (the next training output is NaN).

    Returns:
      None: the layers are updated in place.

    Raises:
      ValueError: a layer has no probes attached, or ``grads`` / ``previous``
        lacks one of its entries.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import mabn_jax.nnx
      >>> model = nnx.Sequential(
      ...     nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
      ...     mabn_jax.nnx.MABN(3, buffer_size=4, rngs=nnx.Rngs(0)),
      ... )
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> previous = mabn_jax.nnx.attach_probes(model)
      >>> wrt = nnx.DiffState(0, (nnx.Param, mabn_jax.nnx.Probe))
      >>> grads = nnx.grad(lambda model: jnp.mean(model(x) ** 2), argnums=wrt)(model)
      >>> mabn_jax.nnx.record_backward_stats(model, grads, previous)
      >>> float(model.layers[1].step[...]), hasattr(model.layers[1], "psi_probe")
      (1.0, False)
    """
    for path, layer in layers_of(model):
        if not hasattr(layer, PROBE_NAMES[0]):
            raise ValueError(
                f"record_backward_stats: MABN layer {name_of(path)!r} has no probes "
                "attached; call attach_probes(model) before each step, and "
                "record once per step."
            )
    write_steps(model, grads, previous, (*PROBE_NAMES, USES_NAME))
    detach(model)


def write_steps(model, grads, previous, names: tuple[str, str, str]) -> None:
    """Records each layer's step from the entries ``names`` (Ψ, g, uses) of
    ``grads``: the attached probes', or the layers' own window and step
    variables' (``IN_STATE_NAMES``, where the helper attached none). An entry
    the layer lacks is None."""
    grad_fix = (
        "differentiate w.r.t. nnx.DiffState(argnum, (nnx.Param, "
        "mabn_jax.nnx.Probe)) so the probes' gradients are in grads."
    )
    prev_fix = "pass the State that attach_probes(model) returned before this step."
    for path, layer in layers_of(model):
        new = _layer_state(layer)
        before = _state.as_state(
            {k: _at(previous, path + (k,), "previous", prev_fix) for k in layer.state_names}
        )
        psi, g, uses = (
            _at(grads, path + (n,), "grads", grad_fix) if hasattr(layer, n) else None for n in names
        )
        probe_grads = _state.Probes(psi, g, uses=uses)  # type: ignore[arg-type]  # psi: always
        recorded = _record.record_backward_stats(new, probe_grads, before)
        for key, value in _state.to_mapping(recorded).items():
            getattr(layer, key).set_value(value)
