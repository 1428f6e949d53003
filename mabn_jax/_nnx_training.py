"""Training NNX models with MABN: the one-call gradient, and the probes beneath it.

MABN's gradient needs this step's backward statistics (Ψ_B, g_B), which exist
only inside the backward pass. :func:`value_and_grad` is ``nnx.value_and_grad``
plus Flax's perturbation convention (zero variables, differentiated):

1. :func:`attach_probes` puts zero, window-shaped :class:`Probe` variables on
   each MABN layer of the differentiated models and snapshots their state;
2. the gradient is taken w.r.t. the parameters and the probes
   (``nnx.DiffState(i, nnx.Any(filter, Probe))``); the probes' gradients
   hold Ψ_B (g_B). The layers read the probes as they entered the loss, so a
   ``stop_gradient`` over a layer's state inside the loss (to freeze it)
   cannot cut them; inside a transform of the loss they read their variables;
3. :func:`record_backward_stats` writes them into the layers' ``BatchStat``
   windows (a step whose statistics are not finite is undone, one more
   ``skipped``) and removes the probes; the returned gradient is
   ``nnx.value_and_grad``'s, without the probes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from mabn_jax import _nnx_in_state, _nnx_probes, _shell, _state, _upstream
from mabn_jax._nnx_variables import PROBE_NAMES, PROBE_TOKEN, USES_NAME, Probe

__all__ = ["value_and_grad", "grad"]


def _positional(f: Callable, args: tuple, kw: dict[str, Any]) -> tuple:
    """``f``'s arguments as positions (``nnx.value_and_grad`` selects the
    differentiated ones by position), defaults filled in."""
    if not kw:
        return args
    bound = inspect.signature(f).bind(*args, **kw)
    bound.apply_defaults()
    if bound.kwargs:
        raise TypeError(
            f"mabn_jax.nnx.value_and_grad: {getattr(f, '__name__', f)!r} got "
            f"keyword-only arguments {sorted(bound.kwargs)}; make them "
            "positional: the gradient selects its arguments by position."
        )
    return bound.args


def _without_probes(grads, graphdef=None):
    """The gradient without the probes' entries (a State; in tree mode a
    module-shaped copy of the model; for an ``nnx.unpack`` argument a GraphState
    on the caller's ``graphdef``, the one without probes)."""
    if isinstance(grads, nnx.GraphState):
        return nnx.GraphState(
            graphdef, nnx.split_state(_upstream.graph_state_parts(grads)[1], Probe, ...)[1]
        )
    if isinstance(grads, nnx.Module):
        _nnx_probes.detach(grads)
        return grads
    return jax.tree.map(
        lambda s: nnx.split_state(s, Probe, ...)[1],
        grads,
        is_leaf=lambda s: isinstance(s, nnx.State),
    )


def _unpacked(args: tuple, i: int, done: dict):
    """For a differentiated ``nnx.GraphState`` argument (``nnx.unpack``'s,
    merged inside the loss): the module it merges into with the GraphState
    arguments of its graphdef (the rest of its state), and their positions.
    That module shares their variables, so the probes can go on its layers and
    the step's state reaches the caller's model. ``(None, ())`` where the
    argument is not one, its group is probed already (``done``), or the rest of
    its state is no argument: its layers then raise, naming the low-level API."""
    arg = args[i]
    if not isinstance(arg, nnx.GraphState) or any(i in g for _, g in done.values()):
        return None, ()
    group = tuple(
        j
        for j, a in enumerate(args)
        if isinstance(a, nnx.GraphState)
        and _upstream.graph_state_parts(a)[0] == _upstream.graph_state_parts(arg)[0]
    )
    try:
        return nnx.merge(*(args[j] for j in group)), group
    except ValueError:  # the state is incomplete
        return None, ()


def _repacked(args: tuple, i: int, group: tuple, view) -> tuple:
    """``args`` with the GraphStates of ``group`` made anew from ``view`` after
    its probes were attached: its graphdef, the probes in argument ``i``'s
    state (the differentiated one), the same variables otherwise."""
    graphdef, probes, _ = nnx.split(view, Probe, ...)  # type: ignore[misc]
    out = list(args)
    for j in group:
        state = (
            nnx.merge_state(_upstream.graph_state_parts(args[j])[1], probes)
            if j == i
            else _upstream.graph_state_parts(args[j])[1]
        )
        out[j] = nnx.GraphState(graphdef, state)
    return tuple(out)


class _StaleAxes(ValueError):
    """The axes of a transform inside the loss do not fit the probed model."""


_BROADCAST_STATE = (
    "MABN layer {name!r} was applied in training mode, but its new state never reached "
    "the model: a transform inside the loss (nnx.scan / nnx.vmap with its nnx.BatchStat "
    "broadcast, e.g. nnx.StateAxes({{nnx.Param: 0, ...: None}})) shares one state among "
    "its applications and drops their updates, and their backward statistics would be "
    "summed into one window slot. Give the layer's state the axis of its parameters, "
    "e.g. nnx.StateAxes({{(nnx.Param, nnx.BatchStat): 0, ...: None}}) (mabn_jax.nnx.Probe "
    "is an nnx.BatchStat), so that each application has its own layer; or apply a shared "
    "layer once per step. If a JAX transform wraps the loss or the model "
    "(jax.checkpoint, jax.remat, jax.jit, jax.vmap), it drops NNX state updates: use its "
    "NNX version (nnx.remat, nnx.jit, nnx.vmap), which carries them out."
)


def value_and_grad(
    f: Callable, *, argnums: int | nnx.DiffState | Sequence = 0, has_aux: bool = False, **kwargs
) -> Callable:
    """``nnx.value_and_grad`` for models with MABN layers: a drop-in.

    ``f`` is the loss function of an ``nnx.BatchNorm`` train step, unchanged
    (it calls the model in training mode)::

        grad_fn = mabn_jax.nnx.value_and_grad(loss_fn, has_aux=True)
        (loss, logits), grads = grad_fn(model, x, y)
        optimizer.update(model, grads)

    Returns what ``nnx.value_and_grad`` returns: the gradient w.r.t. the
    ``nnx.Param`` variables (or each ``nnx.DiffState``'s filter), without
    the probes, so ``nnx.Optimizer(model, tx, wrt=nnx.Param).update`` takes
    it as it is. The MABN layers of the differentiated models hold this
    step's full state afterwards, backward statistics included; a layer
    whose statistics are not finite keeps its previous state (one more
    ``skipped``). Models without MABN layers get exactly
    ``nnx.value_and_grad``'s result. Works under ``nnx.jit``, in graph and
    tree mode, with a model split by ``nnx.unpack`` (all its GraphStates
    arguments of ``f``), and with axes built before the step for a transform
    inside ``f`` (``docs/nnx.md``, "What value_and_grad does").

    Args:
      f, argnums, has_aux: as for ``nnx.value_and_grad`` (ints or
        ``nnx.DiffState``; the MABN layers of every differentiated graph
        argument are probed).
      **kwargs: passed on to ``nnx.value_and_grad`` (``holomorphic``,
        ``allow_int``, ``graph``, ``graph_updates``).

    Returns:
      A function with ``f``'s arguments returning ``(value, grads)`` as
      ``nnx.value_and_grad``'s does (see above).

    Raises:
      ValueError: ``graph_updates=False`` in graph mode; (when the returned function is
        called) a layer's state or probes did not reach the loss as the
        gradient needs (e.g. broadcast by a transform), or a misuse the layer
        names (see :meth:`MABN.__call__`).
      TypeError: ``f`` is called with keyword-only arguments.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import mabn_jax.nnx
      >>> model = nnx.Sequential(
      ...     nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
      ...     mabn_jax.nnx.MABN(3, buffer_size=4, rngs=nnx.Rngs(0)),
      ... )
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> loss_fn = lambda model: jnp.mean(model(x) ** 2)
      >>> loss, grads = mabn_jax.nnx.value_and_grad(loss_fn)(model)
      >>> int(model.layers[1].step[...])
      1
    """
    tree_mode = kwargs.get("graph") is False
    if not tree_mode and kwargs.get("graph_updates") is False:
        raise ValueError(
            "mabn_jax.nnx.value_and_grad: graph_updates=False is not supported "
            "in graph mode: the probes are selected with nnx.DiffState, which "
            "needs graph updates (Flax's default), or tree mode (graph=False)."
        )
    single = isinstance(argnums, (int, nnx.DiffState))
    nums = (argnums,) if isinstance(argnums, (int, nnx.DiffState)) else tuple(argnums)
    # Tree mode differentiates every leaf of an argument, the probes included.
    probed = nums if tree_mode else tuple(_nnx_in_state.with_probes(a) for a in nums)

    indices = [a.argnum if isinstance(a, nnx.DiffState) else a for a in nums]
    helper = _Helper(f, nums, indices, single, has_aux, kwargs)
    helper.grad_fn = nnx.value_and_grad(
        helper.scoped, argnums=probed[0] if single else probed, has_aux=has_aux, **kwargs
    )

    @functools.wraps(f)
    def wrapped(*args, **kw):
        return helper(_positional(f, args, kw))

    return wrapped


class _Helper:
    """One ``value_and_grad`` helper: the step with probes attached (the default),
    or, once axes built before the step did not fit them, with the probes carried
    in the layers' own state (:mod:`mabn_jax._nnx_in_state`) from then on."""

    def __init__(self, f, nums, indices, single, has_aux, kwargs):
        self.f, self.nums, self.indices, self.single = f, nums, indices, single
        self.has_aux, self.kwargs = has_aux, kwargs
        self.grad_fn: Callable = f
        self.calls: list[set] = []  # per call, the set its loss collects trained layers in
        self.in_state = False

    def scoped(self, *args, **kw):
        """``f`` in the helper's scope: each probe consumed once, one training
        call per layer."""
        entering = _entering_probes(args, self.indices)
        with _shell.probe_scope(entering, trained=self.calls[-1]):
            return self.f(*args, **kw)

    def __call__(self, args: tuple):
        if not self.in_state:
            try:
                return self.attached(args)
            except _StaleAxes:
                self.in_state = True
        fn = functools.partial(
            _nnx_in_state.grad_fn,
            self.f,
            self.nums,
            self.indices,
            self.single,
            self.has_aux,
            self.kwargs,
        )
        return _nnx_in_state.step(fn, [args[i] for i in self.indices], args, self.single)

    def attached(self, args: tuple):
        """The step with probes attached to the layers."""
        models: list = []
        previous: list = []
        unpacked: dict = {}
        try:
            args = _attach_all(args, self.indices, models, previous, unpacked)
            out, grads = self.checked_grad_fn(models, *args)
        except BaseException as e:
            if isinstance(e, _StaleAxes):  # tried again without probes: as it was
                for m, prev in zip(models, previous):
                    _nnx_probes.restore(m, prev)
            for m in models:
                _nnx_probes.detach(m)
            raise
        graphdefs = [unpacked.get(k, (None,))[0] for k in range(len(models))]
        grads = (grads,) if self.single else tuple(grads)
        clean = _record_all(models, grads, previous, graphdefs)
        return out, clean[0] if self.single else tuple(clean)

    def checked_grad_fn(self, models, *args):
        """``grad_fn``, and a layer applied in training mode whose new state
        never arrived (a transform broadcast it) raises here, at trace time."""
        before = _steps_and_tokens(models)
        self.calls.append(trained := set())  # the layers that train in this call
        try:
            result = self.grad_fn(*args)
        except (ValueError, AttributeError) as e:
            # In tree mode JAX's own message for a prefix mismatch fails to format
            # (an AttributeError about GetAttrKey): the same mistake.
            has_layers = any(_nnx_probes.layers_of(m) for m in models)
            if not _upstream.is_prefix_mismatch(e) or not has_layers:
                raise
            raise _StaleAxes(_nnx_in_state.STALE_AXES) from e
        finally:
            self.calls.pop()
        _check_state_arrived(models, before, trained)
        return result


def _attach_all(args: tuple, indices, models: list, previous: list, unpacked: dict) -> tuple:
    """Attaches the probes to each differentiated model (for ``nnx.unpack``'s
    GraphStates, to the module they merge into), filling ``models``, ``previous``
    (their state before the step) and ``unpacked`` (``k -> (the caller's graphdef,
    the GraphState positions)``) as it goes, so that a failure part-way can undo
    what was attached; returns ``args`` with re-split GraphStates."""
    for k, i in enumerate(indices):
        view, group = _unpacked(args, i, unpacked)
        models.append(args[i] if view is None else view)
        previous.append(_nnx_probes.attach(models[-1], k, count=True))
        if view is not None:
            unpacked[k] = (_upstream.graph_state_parts(args[i])[0], group)
            args = _repacked(args, i, group, view)
    return args


def _entering_probes(args, indices) -> dict:
    """The differentiated probes as they enter the loss, by layer token (the
    layers read these, so that what the loss does to the model cannot cut them)."""
    direct = {}
    for i in indices:
        for _, layer in _nnx_probes.layers_of(args[i]) if i < len(args) else ():
            psi, g = (getattr(layer, n, None) for n in PROBE_NAMES)
            uses = getattr(layer, USES_NAME, None)
            if isinstance(psi, Probe):
                direct[psi.get_metadata().get(PROBE_TOKEN)] = _state.Probes(
                    psi[...],
                    None if g is None else g[...],
                    uses=None if uses is None else uses[...],
                )
    return direct


def _steps_and_tokens(models) -> list[dict]:
    """Per model, each MABN layer's ``step`` array (by identity) and probe token."""
    return [
        {
            path: (layer.step[...], _nnx_probes.probe_token(layer))  # type: ignore[attr-defined]  # a state variable
            for path, layer in _nnx_probes.layers_of(m)
        }
        for m in models
    ]


def _check_state_arrived(models, before: list[dict], trained: set) -> None:
    """Raises if a layer trained in the loss but its ``step`` is still the array
    it had before: a transform inside the loss broadcast its state."""
    for m, steps in zip(models, before):
        for path, layer in _nnx_probes.layers_of(m):
            step, probe_token = steps[path]
            if probe_token in trained and layer.step[...] is step:  # type: ignore[attr-defined]  # a state variable
                raise ValueError(_BROADCAST_STATE.format(name=_nnx_probes.name_of(path)))


def _record_all(models, grads, previous, graphdefs) -> list:
    """Records each model's backward statistics and returns its gradient without
    the probes (``graphdefs``: see :func:`_without_probes`); on an error every
    model is put back as it was."""
    clean = []
    try:
        for m, g, prev, graphdef in zip(models, grads, previous, graphdefs):
            if len(prev):  # the argument has MABN layers
                _nnx_probes.record_backward_stats(m, g, prev)
                g = _without_probes(g, graphdef)
            clean.append(g)
    except BaseException:  # e.g. a layer applied twice: the model is as it was
        for m, prev in zip(models, previous):
            _nnx_probes.restore(m, prev)
            _nnx_probes.detach(m)
        raise
    return clean


def grad(
    f: Callable, *, argnums: int | nnx.DiffState | Sequence = 0, has_aux: bool = False, **kwargs
) -> Callable:
    """``nnx.grad`` for models with MABN layers: :func:`value_and_grad` without
    the value (``(grads, aux)`` with ``has_aux``).

    Args:
      f, argnums, has_aux: as for :func:`value_and_grad`.
      **kwargs: as for :func:`value_and_grad`.

    Returns:
      A function with ``f``'s arguments that returns the gradient (and ``aux``
      with ``has_aux``) and records the MABN layers' backward statistics.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import mabn_jax.nnx
      >>> layer = mabn_jax.nnx.MABN(3, buffer_size=4, rngs=nnx.Rngs(0))
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> grads = mabn_jax.nnx.grad(lambda layer: jnp.mean(layer(x) ** 2))(layer)
      >>> grads["scale"][...].shape, float(layer.step[...])
      ((3,), 1.0)
    """
    value_and_grad_fn = value_and_grad(f, argnums=argnums, has_aux=has_aux, **kwargs)

    @functools.wraps(f)
    def wrapped(*args, **kw):
        out, grads = value_and_grad_fn(*args, **kw)
        return (grads, out[1]) if has_aux else grads

    return wrapped
