"""What the Flax shells (:mod:`mabn_jax.linen`, :mod:`mabn_jax.nnx`) share.

No math: the state's dtype and initial stored entries, the error for a
training-mode call without probes, the value_and_grad helpers' scope (the
probes they differentiate, each consumed once, never inside a loop body),
weight centralization, building a config from keyword arguments with errors
that name the argument, and mutable copies of variable trees.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mabn_jax import _state, _upstream
from mabn_jax._config import MABNConfig

Array = jax.Array

__all__ = [
    "probe_scope",
    "in_helper",
    "direct_probes",
    "check_not_in_loop",
    "consume_probe",
    "state_dtype",
    "initial_state",
    "missing_probes",
    "center_kernel",
    "make_config",
    "resolve_probes",
    "to_dicts",
]


def state_dtype(param_dtype: Any) -> Any:
    """The state is kept in ``promote_types(param_dtype, float32)``."""
    return jnp.promote_types(param_dtype, jnp.float32)


def initial_state(
    feature_shape: Sequence[int], config: MABNConfig, param_dtype: Any, rows: int | None = None
) -> dict[str, Array]:
    """A fresh layer's ``batch_stats`` entries, by stored name (``_state.LAYOUTS``);
    ``rows``: the windows' (``None``: ``config.window``)."""
    state = _state.init_state(feature_shape, config, state_dtype(param_dtype), rows)
    return _state.to_mapping(state)


def missing_probes(
    layer: str, *, helper: str, instead_of: str, low_level: str, evaluation: str
) -> str:
    """The error of an MABN layer applied in training mode without probes."""
    return (
        f"MABN layer {layer!r} is applied in training mode without its probes, so its "
        "backward statistics could not be recorded. Compute the gradient with "
        f"{helper} in place of {instead_of}: it passes the probes and records the "
        f"statistics. (Low-level API: {low_level}) For evaluation use {evaluation}."
    )


def center_kernel(kernel: Array) -> Array:
    """Subtracts each output unit's fan-in mean (all axes but the last).

    ``W'[..., o] = W[..., o] − mean(W[..., o])``: each output is a zero-mean
    combination of its inputs (weight centralization, which makes the
    non-centered MABN safe).

    Args:
      kernel: a ``Dense`` or ``Conv`` kernel, output units along the last axis.

    Returns:
      The centered kernel, of ``kernel``'s shape and dtype.

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
            f"and the hyper-parameters of {cls.__name__}: {', '.join(fields)}."
        )
    return cls(**kwargs)


class _Scope:
    """What a value_and_grad helper's loss function runs with.

    ``consumed``: the probes (and states) consumed so far, by id (the objects
    are kept too, so that no id is reused by a freed tracer): each once, one
    training call per layer and step. ``direct``: the helper's own probes, by
    layer key, which a layer reads instead of the copy that travels in its
    params (the copy is what a user's ``stop_gradient`` or cast of the params
    reaches); the copy is used where a lifted transform slices it. ``trace``:
    the helper's trace, to tell a loop body inside the loss (one layer applied
    once per iteration) from the loss itself. ``trained``: where the NNX helper
    collects the keys of the layers that trained (it then checks that their new
    state reached the model), or None. ``in_state``: the NNX helper differentiates
    the layers' own window and step variables in place of attached probes.
    """

    def __init__(self, direct: Mapping | None, trace: Any, trained: set | None, in_state: bool):
        self.consumed: dict[Any, Any] = {}
        self.direct = dict(direct or {})
        self.trace = trace
        self.trained = trained
        self.in_state = in_state


_SCOPE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "mabn_probe_scope", default=None
)


@contextlib.contextmanager
def probe_scope(
    direct: Mapping | None = None, trained: set | None = None, *, in_state: bool = False
):
    """The loss function's call inside a value_and_grad helper; ``direct``:
    the helper's probes by layer key; ``trained``: a set to collect the keys of
    the layers that train; ``in_state``: see :class:`_Scope`."""
    token = _SCOPE.set(_Scope(direct, _upstream.current_trace(), trained, in_state))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def in_helper() -> bool:
    """Whether a value_and_grad helper's loss function is running."""
    return _SCOPE.get() is not None


def in_helper_trace() -> bool:
    """Whether a value_and_grad helper's loss runs in the helper's own trace
    (not inside a transform of the loss)."""
    scope = _SCOPE.get()
    return scope is not None and _upstream.current_trace() is scope.trace


def probes_in_state() -> bool:
    """Whether the NNX helper carries the probes in the layers' own state."""
    scope = _SCOPE.get()
    return scope is not None and scope.in_state


def _own_probes(key, like):
    """The helper's own probes for the layer ``key`` if they have the shape of
    ``like`` (the layer's window: not sliced by a lifted transform)."""
    scope = _SCOPE.get()
    found = None if scope is None else scope.direct.get(key)
    if found is None or tuple(jnp.shape(found.psi)) != tuple(jnp.shape(like)):
        return None
    return found


def direct_probes(key, like):
    """The helper's own probes for the layer ``key``, where the layer may read
    them directly: their shape is ``like``'s (its window) and the layer runs in
    the helper's own trace. Inside a transform of the loss (``jax.jit`` of
    ``apply``, ``nn.scan``, ``jax.checkpoint``) it reads the probes passed
    through its variables instead: a transform that caches its trace must not
    keep a tracer it was not given. None then."""
    return _own_probes(key, like) if in_helper_trace() else None


def check_not_in_loop(key, like, layer: str, *, fix: str) -> None:
    """Raises at trace time if a layer is applied inside a loop body
    (``lax.scan``, ``lax.fori_loop``, ``lax.while_loop``, ``nnx.scan``) within
    the helper's loss with probes that the loop does not slice (its window
    ``like`` has the shape of the helper's probes for it): one layer applied
    once per iteration, whose backward statistics reverse mode would sum into
    one window slot, and whose second iteration would read the first's
    unrecorded slots."""
    scope = _SCOPE.get()
    if (
        scope is None
        or _own_probes(key, like) is None
        or not _upstream.inside_loop_since(scope.trace)
    ):
        return
    raise ValueError(
        f"MABN layer {layer!r} is applied in training mode inside a loop body (lax.scan, "
        "lax.fori_loop, lax.while_loop, nnx.scan) in the loss, e.g. micro-batches for "
        "gradient accumulation: each iteration would be a window step whose backward "
        "statistics the next iteration needs before reverse mode has computed them, and "
        "their probes' gradients are summed over the iterations. Instead, " + fix
    )


def consume_probe(probe, layer: str, state=None, key=None) -> None:
    """Raises if this probe, or this layer state, was already used in this helper
    call: two training applies of the same batch_stats in one loss would sum
    their backward statistics into one slot. The state is checked too because
    params cast per apply (a mixed-precision wrapper) make new probe objects;
    the state arrays an apply reads are the ones the loss passed in. ``key``
    (NNX: the probe variable's token, which survives split/merge and copies of
    the arrays) counts once per trace: a layer is called once where it is traced."""
    scope = _SCOPE.get()
    if scope is None:
        return
    used = scope.consumed
    trace = _upstream.current_trace()
    keyed = None if key is None else ("layer", key, id(trace))
    if id(probe) in used or (state is not None and id(state) in used) or keyed in used:
        raise ValueError(
            f"MABN layer {layer!r} is applied in training mode twice in one loss (two "
            "training applies of the model with the same batch_stats, e.g. for two views "
            "of a batch): their backward statistics would be added into one window slot. "
            "Apply the model once per step, on the views concatenated into one batch (or "
            "give each apply its own layers)."
        )
    used[id(probe)] = probe
    if state is not None:
        used[id(state)] = state
    if keyed is not None:
        used[keyed] = trace  # kept alive, so that its id is not reused


def resolve_probes(
    carried: _state.Probes | None, window, layer: str, *, key, loop_key, fix: str, token=None
) -> _state.Probes | None:
    """The probes a training call uses; the one resolver of the linen and NNX layers.

    ``carried`` is the copy that travelled with the layer's variables (linen: the
    ``'mabn_probes'`` entry of its params; NNX: its :class:`Probe` variables).
    Inside a value_and_grad helper the call is first checked: its probe and state
    are consumed once (:func:`consume_probe`, ``token``: NNX's probe token) and it
    is not in a loop body (:func:`check_not_in_loop`, by ``loop_key``). Then the
    helper's own probes for ``key`` are used where the layer runs in the helper's
    trace (:func:`direct_probes`: what the loss does to the params cannot cut
    them), else ``carried``. None: no probes at all (the caller says why).
    """
    direct = direct_probes(key, window)
    found = direct if direct is not None else carried
    if found is None:
        return None
    consume_probe(found.psi if carried is None else carried.psi, layer, window, key=token)
    check_not_in_loop(loop_key, window, layer, fix=fix)
    scope = _SCOPE.get()
    if scope is not None and scope.trained is not None and token is not None:
        scope.trained.add(token)
    return found


def to_dicts(tree: Any) -> Any:
    """A copy of a nest of mappings (``FrozenDict`` included) as plain dicts;
    leaves are shared."""
    return {k: to_dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree
