"""The linen training helpers (public in :mod:`mabn_jax.training` and
:mod:`mabn_jax.linen`); how they work: ``docs/design.md``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

import jax
import jax.numpy as jnp
from flax.training.dynamic_scale import DynamicScale, DynamicScaleResult
from jax import lax

from mabn_jax import _aux, _linen_probes, _shell
from mabn_jax._linen_layers import PROBES

__all__ = ["value_and_grad"]

Tree = Mapping[str, Any]


@overload
def value_and_grad(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    batch_stats: Tree,
    dynamic_scale: None = None,
    axis_name: str | None = None,
    aux_batch_stats: _aux.AuxSelector | None = None,
) -> Callable[..., tuple[Any, Any]]: ...
@overload
def value_and_grad(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    batch_stats: Tree,
    dynamic_scale: DynamicScale,
    axis_name: str | None = None,
    aux_batch_stats: _aux.AuxSelector | None = None,
) -> Callable[..., DynamicScaleResult]: ...
def value_and_grad(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    batch_stats: Tree,
    dynamic_scale: DynamicScale | None = None,
    axis_name: str | None = None,
    aux_batch_stats: _aux.AuxSelector | None = None,
) -> Callable[..., Any]:
    """``jax.value_and_grad`` for models with MABN layers: a drop-in.

    ``fun`` is the loss function of an ``nn.BatchNorm`` train step, unchanged:
    it applies the model in training mode to the params it is given (the
    first argument in ``argnums``; it may also be the whole ``variables``
    dict passed to ``apply``) and returns the updated ``batch_stats`` in its
    aux output (``mutable=['batch_stats']``)::

        grad_fn = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=state.batch_stats)
        (loss, updates), grads = grad_fn(state.params)
        state = state.apply_gradients(grads=grads)
        state = state.replace(batch_stats=updates["batch_stats"])

    The returned aux is ``fun``'s, except that its updated ``batch_stats``
    tree holds this step's backward statistics; a layer whose statistics are
    not finite keeps its ``batch_stats`` entry (one more ``skipped``). The
    gradient has the structure of the params: the probes are dropped.

    How the updated tree is found in aux (unless ``aux_batch_stats`` says):
    the candidates are the mappings anywhere in aux (through dicts,
    FrozenDicts, tuples, lists, NamedTuples) with exactly the layout of
    ``batch_stats`` (the same nested keys and array shapes) and no top-level
    ``'params'``, ``'batch_stats'`` or ``'mabn_probes'`` key, so an
    ``updates`` dict is searched into. A candidate whose arrays are all the
    very objects of ``batch_stats`` (by identity: passed through unchanged)
    is the old tree; exactly one other candidate must exist, and it is the
    one recorded. If there is none, the old tree is taken only when it is
    the sole candidate and no MABN layer trained (all frozen). Otherwise a
    ``ValueError`` says what was found (none: aux's containers and keys; several:
    their paths) and what to return. Models without MABN layers leave aux
    untouched.

    Args:
      fun, argnums, has_aux: as for ``jax.value_and_grad``.
      batch_stats: the ``batch_stats`` the model is applied with in ``fun``. A
        helper built once with the first step's tree and called with each step's
        (as an argument of ``fun``, or a variables dict's ``'batch_stats'``) takes
        the tree it is called with, where exactly one argument has this layout.
      dynamic_scale: a ``flax.training.dynamic_scale.DynamicScale`` to scale
        the loss with; the function then returns ``DynamicScale.value_and_grad``'s
        ``(dynamic_scale, is_finite, value, grad)`` instead. The backward
        statistics are unscaled before they are stored, and the layers scale
        their windows to the current loss scale.
      axis_name: with ``dynamic_scale``: average the gradient over this axis
        (as ``DynamicScale.value_and_grad`` does; the backward statistics are
        the layers' own business and are never averaged here).
      aux_batch_stats: where the updated ``batch_stats`` is in aux, for the
        cases the search cannot decide (e.g. aux holding two trees of that
        layout): a path of dict keys, sequence indices and attribute names
        (``(1, 'batch_stats')`` for ``aux = (logits, updates)``; a path
        ending at an ``updates`` dict takes its ``'batch_stats'``), or a
        function of aux returning that subtree itself (not a copy), e.g.
        ``lambda aux: aux.student``. It must have the layout of
        ``batch_stats``.

    Returns:
      A function with ``fun``'s arguments returning ``(value, grad)`` (``value``
      is ``(loss, aux)`` with ``has_aux``), as ``jax.value_and_grad``'s does; with
      ``dynamic_scale``, ``(dynamic_scale, is_finite, value, grad)``.

    Raises:
      ValueError: (when the returned function is called) the updated
        ``batch_stats`` is not found in aux, or more than one candidate is; an
        MABN layer is applied in training mode without probes (its
        ``batch_stats`` not the ones given), twice in one step, or inside a
        loop body of the loss.

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax
      >>> model = mabn_jax.MABN(use_running_average=False, buffer_size=4)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> variables = model.init(jax.random.key(0), x)
      >>> def loss_fn(params, batch_stats):
      ...     y, updates = model.apply(
      ...         {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
      ...     )
      ...     return jnp.mean(y**2), updates
      >>> grad_fn = mabn_jax.value_and_grad(
      ...     loss_fn, has_aux=True, batch_stats=variables["batch_stats"]
      ... )
      >>> (loss, updates), grads = grad_fn(variables["params"], variables["batch_stats"])
      >>> int(updates["batch_stats"]["step"]), sorted(grads)
      (1, ['bias', 'scale'])
    """
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)

    def wrapped(*args):
        stats = _aux.current_batch_stats(args, batch_stats)  # a helper built once: the arg
        scale = None if dynamic_scale is None else jnp.asarray(dynamic_scale.scale, jnp.float32)
        value, aux, probe_grads, grads = _probed_value_and_grad(
            fun, args, nums, has_aux, stats, scale
        )
        grads = grads[0] if isinstance(argnums, int) else tuple(grads)
        if scale is not None:
            value, grads, probe_grads = _unscaled(value, grads, probe_grads, scale)
        if probe_grads:
            aux = _record_in_aux(aux, probe_grads, stats, has_aux, aux_batch_stats)
        out = (value, aux) if has_aux else value
        if dynamic_scale is None:
            return out, grads
        return _dynamic_scale_update(dynamic_scale, out, grads, axis_name)

    return wrapped


def _probed_value_and_grad(fun, args, nums, has_aux, batch_stats, scale):
    """``(value, aux, probe gradients, gradients of args[nums])`` of ``fun`` (times
    ``scale``), with each MABN layer's probes in the first differentiated argument
    and, directly, in the helper's scope."""
    # Each layer counts its applications into 'uses' (record_backward_stats wants 1).
    probes = _linen_probes.zero_probes(batch_stats, scale, uses=True)
    layers = _linen_probes.layers_of(batch_stats)
    windows = {path: state.psi_window for path, state in layers.items()}

    def probed(probe_tree, *diff_args):
        call_args = list(args)
        for i, a in zip(nums, diff_args):
            call_args[i] = a
        call_args[nums[0]] = _linen_probes.insert(call_args[nums[0]], probe_tree)
        # The same probes, given to the layers directly too: what a user does to the
        # params (stop_gradient to freeze γ/β, a cast) cannot cut them. The copy in
        # the params serves where a lifted transform (nn.scan, nn.vmap) slices it.
        # Each call reads one of the two; their gradients add up in probe_tree's.
        with _shell.probe_scope(_linen_probes.direct_keys(probe_tree, windows)):
            try:
                out = fun(*call_args)
            except (ValueError, TypeError) as e:
                if probe_tree and not _raised_here(e):
                    e.add_note(_PROBES_IN_PARAMS)
                raise
        value, aux = out if has_aux else (out, None)
        return (value if scale is None else scale * value), aux

    (value, aux), (probe_grads, *grads) = jax.value_and_grad(
        probed, tuple(range(len(nums) + 1)), has_aux=True
    )(probes, *(args[i] for i in nums))
    return value, aux, probe_grads, grads


def _unscaled(value, grads, probe_grads, scale):
    """The loss, gradients and probe gradients divided by the loss scale (a use
    count is not scaled)."""
    unscale = lambda g: jnp.asarray(g, jnp.float32) / scale
    probe_grads = jax.tree_util.tree_map_with_path(
        lambda path, g: g if path[-1] == jax.tree_util.DictKey("uses") else unscale(g),
        probe_grads,
    )
    return value / scale, jax.tree.map(unscale, grads), probe_grads


_PROBES_IN_PARAMS = (
    f"mabn_jax.value_and_grad: the params the loss receives carry a {PROBES!r} entry in "
    "each MABN layer (its backward-statistics probes). If the error above comes from "
    "pairing them with another tree (jax.tree.map against pretrained params, e.g. an "
    "L2-SP penalty), pair mabn_jax.without_probes(params) instead."
)


def _raised_here(error: BaseException) -> bool:
    """Whether ``error`` was raised by mabn_jax's own code (its messages say what
    to do), not by the user's loss or a library it calls."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _record_in_aux(
    aux, probe_grads, previous: Tree, has_aux: bool, select: _aux.AuxSelector | None
):
    """``aux`` with its updated ``batch_stats`` (found as :mod:`mabn_jax._aux`
    says, or where ``select`` points) recorded."""
    target = _aux.find_batch_stats(
        aux, previous, has_aux=has_aux, select=select, trained=lambda: _trained(probe_grads)
    )
    return _aux.replace(aux, target, _linen_probes.record_tree(target, probe_grads, previous))


def _trained(probe_grads) -> bool:
    """Whether some probe got a gradient (False when unknown, under ``jit``:
    then record_backward_stats poisons the state instead)."""
    leaves = jax.tree_util.tree_leaves(probe_grads)
    if any(isinstance(g, jax.core.Tracer) for g in leaves):
        return False
    return any(bool(jnp.any(g != 0)) for g in leaves)


def _dynamic_scale_update(ds, out, grads, axis_name) -> DynamicScaleResult:
    """``DynamicScale.value_and_grad``'s bookkeeping on an already unscaled gradient.

    Mirrors ``flax.training.dynamic_scale``; written out because the probe
    gradients must be unscaled but not averaged across devices, so they
    cannot go through ``DynamicScale.value_and_grad`` with the params.
    """
    if axis_name is not None:
        grads = lax.pmean(grads, axis_name)
    finite = jnp.array(True)
    for g in jax.tree_util.tree_leaves(grads):
        finite &= jnp.all(lax.is_finite(g))
    grow = ds.fin_steps == ds.growth_interval
    fin_scale = jnp.where(
        grow & finite,
        jnp.minimum(ds.scale * ds.growth_factor, jnp.finfo(jnp.float32).max),
        ds.scale,
    )
    inf_scale = ds.scale * ds.backoff_factor
    if ds.minimum_scale is not None:
        inf_scale = jnp.maximum(inf_scale, ds.minimum_scale)
    new = ds.replace(
        fin_steps=jnp.where(grow | ~finite, 0, ds.fin_steps + 1),
        scale=jnp.where(finite, fin_scale, inf_scale),
    )
    return DynamicScaleResult(new, finite, out, grads)
