"""The NNX helper's second route: probes carried in the layers' own state.

Axes built before the step for a transform inside the loss (``nnx.prefix`` of
the model, which holds its graph) fit no model with probe variables attached.
There the helper differentiates each layer's own ``psi_window`` (``g_window``)
and ``step`` in place of attached probes (``MABN._in_state_probes``): the
forward never reads a probe's value, so their cotangents are Ψ_B (g_B) and the
application count, and the graph is unchanged. The helper takes this route
after the attached one failed with JAX's tree-prefix mismatch
(:func:`mabn_jax._upstream.is_prefix_mismatch`), and keeps it for that helper.
The checks that need a probe's token (a layer broadcast by a transform, or
applied in a loop body of a transform) cannot run at trace time here; the
application count that the record requires still catches them (eagerly; NaN
statistics under ``jit``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mabn_jax import _nnx_probes, _shell, _state, _upstream
from mabn_jax._nnx_variables import IN_STATE_NAMES, Probe

__all__ = ["STALE_AXES", "with_probes", "grad_fn", "step"]


STALE_AXES = (
    "mabn_jax.nnx.value_and_grad: a transform's axes inside the loss do not fit the model "
    "(see the error above), with or without the probe variables the helper attaches to "
    "each MABN layer for the step. Axes built from another model, or a model merged inside "
    "the loss from nnx.unpack's GraphStates (whose layers need the attached probes) with "
    "axes built before the step: build the axes inside the loss function, e.g. axes = "
    "nnx.prefix(model, {...}) there, or use filters, e.g. nnx.StateAxes({nnx.BatchStat: 0, "
    "...: None}) (a mabn_jax.nnx.Probe is an nnx.BatchStat, so it gets the state's axes)."
)


def with_probes(argnum, probes: Any = Probe):
    """``argnum`` as a DiffState that also selects the probes (a filter)."""
    if isinstance(argnum, nnx.DiffState):
        return nnx.DiffState(argnum.argnum, nnx.Any(argnum.filter, probes))
    return nnx.DiffState(argnum, nnx.Any(nnx.Param, probes))


def _carriers(model) -> dict[int, tuple]:
    """The variables that carry the layers' probe cotangents, id -> path."""
    return {
        id(getattr(layer, n)): path + (n,)
        for path, layer in _nnx_probes.layers_of(model)
        for n in IN_STATE_NAMES
        if n in layer.state_names
    }


def _given_in_state(args: tuple, indices) -> dict[int, _state.Probes]:
    """The differentiated layers' own probes as they enter the loss, by layer id."""
    given = {}
    for i in indices:
        for _, layer in _nnx_probes.layers_of(args[i]) if i < len(args) else ():
            g = getattr(layer, "g_window", None)
            psi, uses = layer.psi_window[...], layer.step[...]  # type: ignore[attr-defined]
            given[id(layer)] = _state.Probes(psi, None if g is None else g[...], uses=uses)
    return given


def grad_fn(f, nums, indices, single, has_aux, kwargs, models):
    """``nnx.value_and_grad`` of ``f`` w.r.t. the parameters and the carriers."""
    ids = {i for m in models for i in _carriers(m)}
    carried = lambda path, v: id(v) in ids
    tree_mode = kwargs.get("graph") is False  # every leaf is differentiated there
    argnums = nums if tree_mode else tuple(with_probes(a, carried) for a in nums)

    @functools.wraps(f)
    def scoped(*args, **kw):
        with _shell.probe_scope(_given_in_state(args, indices), in_state=True):
            return f(*args, **kw)

    return nnx.value_and_grad(
        scoped, argnums=argnums[0] if single else argnums, has_aux=has_aux, **kwargs
    )


def step(make_grad_fn, models: list, args: tuple, single: bool):
    """One step with the probes in the layers' state: the gradient, then each
    model's record (restored as it was if one fails) and its clean gradient."""
    if any(isinstance(m, nnx.GraphState) for m in models):
        raise ValueError(STALE_AXES)  # their layers are reached through attached probes
    previous = [_nnx_probes.snapshot(m) for m in models]
    try:
        out, grads = make_grad_fn(models)(*args)
    except (ValueError, AttributeError) as e:
        if not _upstream.is_prefix_mismatch(e):
            raise
        raise ValueError(STALE_AXES) from e
    grads = (grads,) if single else tuple(grads)
    clean = []
    try:
        for m, g, prev in zip(models, grads, previous):
            if len(prev):
                _nnx_probes.write_steps(m, g, prev, IN_STATE_NAMES)
                g = _without_in_state(m, g)
            clean.append(g)
    except BaseException:
        for m, prev in zip(models, previous):
            _nnx_probes.restore(m, prev)
        raise
    return out, clean[0] if single else tuple(clean)


def _without_in_state(model, grads):
    """The gradient as ``nnx.value_and_grad`` gives it for ``nnx.BatchNorm``:
    without the carriers' entries (a State), or with zeros there (tree mode's
    module-shaped gradient, whose state entries are zeros)."""
    paths = set(_carriers(model).values())
    if isinstance(grads, nnx.Module):
        for path in paths:
            var = functools.reduce(_nnx_probes.step_into, path, grads)
            var.set_value(jnp.zeros_like(var[...]))
        return grads
    keep = lambda path, _: tuple(path) not in paths
    return jax.tree.map(
        lambda s: nnx.filter_state(s, keep), grads, is_leaf=lambda s: isinstance(s, nnx.State)
    )
