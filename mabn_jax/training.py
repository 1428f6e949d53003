"""Training with MABN: the one-call gradient, and the probe layer underneath it.

MABN's gradient needs this step's backward statistics (Ψ_B, g_B), which exist
only inside the backward pass. :func:`value_and_grad` handles that: it is
``jax.value_and_grad`` plus three things, the way Flax's ``Module.perturb``
works (zero variables, differentiated):

1. it adds a zero *probe* per MABN layer to the differentiated ``params``
   (shaped like the layer's windows, so ghost batches need nothing extra),
   and hands a second zero set to the layers directly, which a
   ``stop_gradient`` or cast of the params in ``fun`` cannot cut (a layer
   inside a transform of ``fun``, e.g. ``nn.scan``, reads the params' copy);
2. differentiates w.r.t. them too (their gradient holds Ψ_B and g_B) and
   drops them from the returned gradient;
3. writes them into the updated ``batch_stats`` that ``fun`` returns in its
   aux output, with a step whose statistics are not finite undone.

The low-level layer underneath is public: :func:`init_probes` (zero probes
for the ``'mabn_probes'`` collection) and :func:`record_backward_stats`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import FrozenDict
from flax.training.dynamic_scale import DynamicScale, DynamicScaleResult
from jax import lax

from mabn_jax import _aux, _shell, _state
from mabn_jax import _record as _record_lib
from mabn_jax.linen import PROBES

__all__ = ["value_and_grad", "init_probes", "record_backward_stats", "without_probes"]

Tree = Mapping[str, Any]
_TOP_LEVEL = ("params", "batch_stats", PROBES)


def _layers(batch_stats: Tree) -> dict[tuple[str, ...], _state.MABNState]:
    """Every MABN layer in a ``batch_stats`` tree, by path."""
    if not isinstance(batch_stats, Mapping):
        raise TypeError(
            "mabn_jax: batch_stats must be a mapping (the 'batch_stats' "
            f"collection), got {type(batch_stats).__name__}."
        )
    bad = [k for k in _TOP_LEVEL if k in batch_stats]
    if bad:
        raise ValueError(
            f"mabn_jax: the tree given as batch_stats has a top-level {bad[0]!r} entry: it "
            "is a whole variables dict. Pass variables['batch_stats'] (or "
            "state.batch_stats) instead."
        )
    return _find(batch_stats, _state.from_mapping)


def _find(tree: Tree, match: Callable[[Any], Any]) -> dict[tuple[str, ...], Any]:
    """``{path: match(node)}`` for the nodes where ``match`` is not None; the
    walk goes into the other mappings."""
    out = {}

    def walk(node, path):
        found = match(node)
        if found is not None:
            out[path] = found
        elif isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, path + (key,))

    walk(tree, ())
    return out


def _nest(flat: dict[tuple[str, ...], Any], like: Tree):
    tree = traverse_util.unflatten_dict(flat) if flat else {}
    return FrozenDict(tree) if isinstance(like, FrozenDict) else tree


def _zero_probes(
    batch_stats: Tree, loss_scale, uses: bool = False
) -> dict[tuple[str, ...], dict[str, jax.Array]]:
    """``{layer path: {'psi': zeros, ('g': zeros,) ('loss_scale': ...,) ('uses': zeros)}}``."""
    scale = None if loss_scale is None else jnp.asarray(loss_scale, jnp.float32)

    def probes(state):
        count = jnp.zeros_like(state.step) if uses else None
        return _state.init_probes(state)._replace(loss_scale=scale, uses=count)

    return {
        path: {k: v for k, v in probes(state)._asdict().items() if v is not None}
        for path, state in _layers(batch_stats).items()
    }


def init_probes(batch_stats: Tree, loss_scale: Any = None) -> Any:
    """Zero probes for every MABN layer in a ``batch_stats`` tree (low-level API).

    Args:
      batch_stats: the model's ``batch_stats`` collection.
      loss_scale: if the loss is multiplied by a factor (dynamic loss
        scaling, e.g. ``DynamicScale.scale``), pass it, so that the layers scale
        their stored (unscaled) windows to the incoming gradient; divide the probe
        gradients by it before :func:`record_backward_stats`.

    Returns:
      A tree with the nesting of the MABN layers (``{'psi': ...}``, plus
      ``'g'`` for centered layers), each shaped like the layer's windows, to pass
      as the ``'mabn_probes'`` collection and to differentiate with respect to.

    Raises:
      TypeError: ``batch_stats`` is not a mapping.
      ValueError: ``batch_stats`` is a whole ``variables`` dict.

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax
      >>> layer = mabn_jax.MABN(buffer_size=4)
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)), use_running_average=True)
      >>> probes = mabn_jax.init_probes(variables["batch_stats"])
      >>> jax.tree.map(jnp.shape, probes)
      {'psi': (4, 3)}
    """
    return _nest(
        {
            path + (k,): v
            for path, probe in _zero_probes(batch_stats, loss_scale).items()
            for k, v in probe.items()
        },
        batch_stats,
    )


def record_backward_stats(batch_stats: Tree, probe_grads: Tree, previous: Tree) -> Any:
    """Writes each layer's Ψ_B (and g_B) from ``probe_grads`` into its windows.

    Args:
      batch_stats: the tree returned by this step's training-mode ``apply``.
      probe_grads: the gradient of the loss w.r.t. that apply's probes
        (unscaled, if the loss was scaled).
      previous: the ``batch_stats`` given to that ``apply``.

    Returns:
      ``batch_stats`` with the windows filled (non-MABN entries as they
      are). A layer whose backward statistics are not finite returns to its
      ``previous`` state, with ``skipped`` one higher.

    Raises:
      ValueError: the three trees hold different MABN layers, or are not one
        ``apply`` apart (eagerly; under ``jit`` the statistics become NaN); see
        :func:`mabn_jax.functional.record_backward_stats`.

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax
      >>> layer = mabn_jax.MABN(use_running_average=False, buffer_size=4)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> variables = layer.init(jax.random.key(0), x)
      >>> stats = variables["batch_stats"]
      >>> def loss_fn(probes):
      ...     y, updates = layer.apply(
      ...         {**variables, mabn_jax.PROBES: probes}, x, mutable=["batch_stats"]
      ...     )
      ...     return jnp.mean(y**2), updates["batch_stats"]
      >>> probe_grads, new_stats = jax.grad(loss_fn, has_aux=True)(mabn_jax.init_probes(stats))
      >>> new_stats = mabn_jax.record_backward_stats(new_stats, probe_grads, previous=stats)
      >>> int(new_stats["step"])
      1
    """
    return _record(batch_stats, _probe_paths(probe_grads), previous)


def _record(batch_stats: Tree, grads: dict[tuple[str, ...], Mapping], previous: Tree):
    layers, before = _layers(batch_stats), _layers(previous)
    if set(grads) != set(layers) or set(before) != set(layers):
        names = lambda paths: sorted("/".join(p) for p in paths)
        raise ValueError(
            "record_backward_stats: batch_stats, probe_grads and previous hold different "
            f"MABN layers ({names(layers)}, {names(grads)}, {names(before)}); pass the "
            "trees of one model and one step."
        )
    tree = _shell.to_dicts(batch_stats)
    for path, state in layers.items():
        g = grads[path]  # a 'loss_scale' entry's gradient is ignored
        new = _record_lib.record_backward_stats(state, _state.probes_from_mapping(g), before[path])
        _node(tree, path).update(_state.to_mapping(new))
    return FrozenDict(tree) if isinstance(batch_stats, FrozenDict) else tree


def _probe_paths(tree: Tree) -> dict[tuple[str, ...], Mapping]:
    """``{layer path: {'psi': ..., 'g': ...}}`` from a probe (or probe-gradient) tree."""
    is_probe = lambda node: (
        isinstance(node, Mapping) and "psi" in node and not isinstance(node["psi"], Mapping)
    )
    return _find(tree, lambda node: node if is_probe(node) else None)


def _node(tree: dict, path: tuple[str, ...], create: bool = False) -> dict:
    for key in path:
        if create:
            tree = tree.setdefault(key, {})
        else:
            tree = tree[key]
        if not isinstance(tree, dict):
            raise ValueError(
                f"mabn_jax: {'/'.join(path)!r} is not a module in the params "
                "tree; pass the params and batch_stats of the same model."
            )
    return tree


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
      batch_stats: the ``batch_stats`` the model is applied with in ``fun``.
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
        _aux.check_current(args, batch_stats)
        scale = None if dynamic_scale is None else jnp.asarray(dynamic_scale.scale, jnp.float32)
        # Each layer counts its applications into 'uses' (record_backward_stats wants 1).
        probes = _zero_probes(batch_stats, scale, uses=True)
        # A second set, given to the layers directly: what a user does to the params
        # (stop_gradient to freeze γ/β, a cast) cannot cut it. The copy in the params
        # serves where a lifted transform (nn.scan, nn.vmap) slices it.
        direct = _zero_probes(batch_stats, scale, uses=True)
        windows = {path: state.psi_window for path, state in _layers(batch_stats).items()}

        def probed(probe_tree, direct_tree, *diff_args):
            call_args = list(args)
            for i, a in zip(nums, diff_args):
                call_args[i] = a
            call_args[nums[0]] = _insert(call_args[nums[0]], probe_tree)
            with _shell.probe_scope(_direct_keys(direct_tree, windows)):
                try:
                    out = fun(*call_args)
                except (ValueError, TypeError) as e:
                    if probe_tree and not _raised_here(e):
                        e.add_note(_PROBES_IN_PARAMS)
                    raise
            value, aux = out if has_aux else (out, None)
            return (value if scale is None else scale * value), aux

        (value, aux), (probe_grads, direct_grads, *grads) = jax.value_and_grad(
            probed, tuple(range(len(nums) + 2)), has_aux=True
        )(probes, direct, *(args[i] for i in nums))
        # Each layer read one of the two sets; the other's gradient is zero.
        probe_grads = jax.tree.map(jnp.add, probe_grads, direct_grads)
        grads = grads[0] if isinstance(argnums, int) else tuple(grads)
        if scale is not None:
            unscale = lambda g: jnp.asarray(g, jnp.float32) / scale
            value, grads = value / scale, jax.tree.map(unscale, grads)
            probe_grads = jax.tree_util.tree_map_with_path(  # a use is not scaled
                lambda path, g: g if path[-1] == jax.tree_util.DictKey("uses") else unscale(g),
                probe_grads,
            )
        if probes:
            aux = _record_in_aux(aux, probe_grads, batch_stats, has_aux, aux_batch_stats)
        out = (value, aux) if has_aux else value
        if dynamic_scale is None:
            return out, grads
        return _dynamic_scale_update(dynamic_scale, out, grads, axis_name)

    return wrapped


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


def without_probes(params: Tree) -> Any:
    """``params`` without the ``'mabn_probes'`` entries that :func:`value_and_grad`
    adds for the loss, e.g. to pair them with pretrained params (L2-SP)::

        penalty = sum(
            jax.tree.leaves(
                jax.tree.map(
                    lambda p, p0: jnp.sum((p - p0) ** 2),
                    mabn_jax.without_probes(params),
                    pretrained,
                )
            )
        )

    Args:
      params: the params (or variables dict) the loss function received.

    Returns:
      The same nest of mappings without the ``'mabn_probes'`` entries; it shares
      the arrays, so gradients flow through it as through ``params``.

    Example:
      >>> import mabn_jax
      >>> mabn_jax.without_probes({"norm": {"scale": 1.0, "mabn_probes": {"psi": 0.0}}})
      {'norm': {'scale': 1.0}}
    """
    if not isinstance(params, Mapping):
        return params
    tree = {k: without_probes(v) for k, v in params.items() if k != PROBES}
    return FrozenDict(tree) if isinstance(params, FrozenDict) else tree


def _direct_keys(direct_tree, windows) -> dict:
    """The direct probes by layer path (to tell a loop body's layer) and by the
    identity of the layer's incoming ``psi_window`` (which a layer reads: the
    path inside an ``apply`` of a submodel differs from the path in
    ``batch_stats``, the arrays the loss passes to it do not)."""
    out: dict = {}
    ids = [id(w) for w in windows.values()]
    for path, p in direct_tree.items():
        out[path] = probes = _state.probes_from_mapping(p)
        if ids.count(id(windows[path])) == 1:  # one array shared by layers: ambiguous
            out[("state", id(windows[path]))] = probes
    return out


def _insert(params: Tree, probes: dict[tuple[str, ...], dict]) -> Any:
    """``params`` with each MABN layer's probes as its ``'mabn_probes'`` entry,
    or, for a whole variables dict, as its ``'mabn_probes'`` collection."""
    if not probes:
        return params
    if not isinstance(params, Mapping):
        raise TypeError(
            "mabn_jax.value_and_grad: the first differentiated argument must be "
            "the params (or the whole variables dict) passed to apply (a "
            f"mapping), got {type(params).__name__}."
        )
    tree = _shell.to_dicts(params)
    if "params" in tree or "batch_stats" in tree:  # variables: probes are a collection
        if PROBES in tree:
            raise ValueError(
                f"mabn_jax.value_and_grad: the variables already hold a "
                f"{PROBES!r} collection; leave it out, the probes are added "
                "here."
            )
        tree[PROBES] = _nest(
            {path + (k,): v for path, probe in probes.items() for k, v in probe.items()}, {}
        )
    else:
        # A layer whose top-level module is not in this argument (params split into
        # frozen and trainable dicts, merged in the loss) reads the helper's direct
        # probes: a node created here would shadow the frozen part in the merge.
        for path, probe in probes.items():
            if not path or path[0] in tree:
                _node(tree, path, create=True)[PROBES] = probe
    return FrozenDict(tree) if isinstance(params, FrozenDict) else tree


def _record_in_aux(
    aux, probe_grads, previous: Tree, has_aux: bool, select: _aux.AuxSelector | None
):
    """``aux`` with its updated ``batch_stats`` (found as :mod:`mabn_jax._aux`
    says, or where ``select`` points) recorded."""
    target = _aux.find_batch_stats(
        aux, previous, has_aux=has_aux, select=select, trained=lambda: _trained(probe_grads)
    )
    return _aux.replace(aux, target, _record(target, probe_grads, previous))


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
