"""The probe layer under linen's :func:`~mabn_jax.value_and_grad`: zero probes for
a ``batch_stats`` tree, their place in the params, and the record.

A probe is a zero array per MABN layer shaped like its Ψ (g) window; the
gradient w.r.t. it holds this step's Ψ_B (g_B) in the reserved slots
(:mod:`mabn_jax._backward`), which :func:`record_backward_stats` writes into
the updated ``batch_stats``. Public: :func:`init_probes`,
:func:`record_backward_stats`, :func:`without_probes`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import FrozenDict

from mabn_jax import _record as _record_lib
from mabn_jax import _shell, _state
from mabn_jax._linen_layers import PROBES

__all__ = [
    "init_probes",
    "record_backward_stats",
    "without_probes",
    "layers_of",
    "zero_probes",
    "insert",
    "direct_keys",
    "record_tree",
]

Tree = Mapping[str, Any]


_TOP_LEVEL = ("params", "batch_stats", PROBES)


def layers_of(batch_stats: Tree) -> dict[tuple[str, ...], _state.MABNState]:
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


def zero_probes(
    batch_stats: Tree, loss_scale, uses: bool = False
) -> dict[tuple[str, ...], dict[str, jax.Array]]:
    """``{layer path: {'psi': zeros, ('g': zeros,) ('loss_scale': ...,) ('uses': zeros)}}``."""
    scale = None if loss_scale is None else jnp.asarray(loss_scale, jnp.float32)

    def probes(state):
        count = jnp.zeros_like(state.step) if uses else None
        return _state.init_probes(state)._replace(loss_scale=scale, uses=count)

    return {
        path: {k: v for k, v in probes(state)._asdict().items() if v is not None}
        for path, state in layers_of(batch_stats).items()
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
      {'g': (4, 3), 'psi': (4, 3)}
    """
    return _nest(
        {
            path + (k,): v
            for path, probe in zero_probes(batch_stats, loss_scale).items()
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
    return record_tree(batch_stats, _probe_paths(probe_grads), previous)


def record_tree(batch_stats: Tree, grads: dict[tuple[str, ...], Mapping], previous: Tree):
    layers, before = layers_of(batch_stats), layers_of(previous)
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


def direct_keys(direct_tree, windows) -> dict:
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


def insert(params: Tree, probes: dict[tuple[str, ...], dict]) -> Any:
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
