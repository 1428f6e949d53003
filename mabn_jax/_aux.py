"""Where :func:`mabn_jax.value_and_grad` finds the updated ``batch_stats`` in
the loss function's aux output, and the errors that say what it found.

The contract (documented on ``value_and_grad``): a *candidate* is a mapping
inside ``aux`` (reached through any pytree container: dict, FrozenDict, tuple,
list, NamedTuple, dataclass pytree) with exactly the layout of the
``batch_stats`` given to ``value_and_grad``: the same nested keys, the same
array shapes, and no top-level ``'params'``/``'batch_stats'``/``'mabn_probes'``
key (so the whole ``updates`` dict is searched into, not taken). A candidate
all of whose arrays *are* (by object identity) those of the given
``batch_stats`` is the old tree passed through. Exactly one other candidate
must exist; if there is none, the old tree is taken when it is the only
candidate (all MABN layers frozen). ``aux_batch_stats`` (a path of keys,
indices and attribute names, or a callable) names the tree instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mabn_jax import _shell

__all__ = ["AuxSelector", "current_batch_stats", "find_batch_stats", "replace"]

#: How to point at the updated batch_stats in aux: a path, or a function of aux.
AuxSelector = Sequence[str | int] | Callable[[Any], Any]

_TOP_LEVEL = ("params", "batch_stats", "mabn_probes")
_HOW = (
    "apply the model with mutable=['batch_stats'], return its updates (or "
    "updates['batch_stats']) in fun's aux output and set has_aux=True"
)


def _layout(tree: Any) -> Any:
    return jax.tree.map(jnp.shape, _shell.to_dicts(tree))


def _names(tree: Any) -> list[str]:
    """The MABN layers (paths of mappings with arrays) of a tree, for messages."""
    flat = jax.tree_util.tree_flatten_with_path(_shell.to_dicts(tree))[0]
    return sorted({"/".join(str(k.key) for k in path[:-1]) for path, _ in flat})


def _where(path) -> str:
    return f"aux{jax.tree_util.keystr(tuple(path))}" if path else "aux itself"


def _selector(path) -> tuple:
    """A key path as an ``aux_batch_stats`` value."""
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def find_batch_stats(
    aux: Any,
    previous: Any,
    *,
    has_aux: bool,
    trained: Callable[[], bool],
    select: AuxSelector | None = None,
) -> Any:
    """The subtree of ``aux`` that holds the updated ``batch_stats`` (the
    object itself, for :func:`replace`)."""
    if not has_aux:
        raise ValueError(
            "mabn_jax.value_and_grad: the model has MABN layers but has_aux=False, "
            "so fun returns no updated batch_stats; " + _HOW + "."
        )
    want = _layout(previous)
    if select is not None:
        return _selected(aux, previous, want, select)
    has_layout = lambda node: (
        isinstance(node, Mapping)
        and not any(k in node for k in _TOP_LEVEL)
        and _layout(node) == want
    )
    flat = jax.tree_util.tree_flatten_with_path(aux, is_leaf=has_layout)[0]
    found = [(path, node) for path, node in flat if has_layout(node)]
    old_leaves = jax.tree_util.tree_leaves(previous)
    is_old = lambda node: all(a is b for a, b in zip(jax.tree_util.tree_leaves(node), old_leaves))
    updated = [(path, node) for path, node in found if not is_old(node)]
    if len(updated) == 1:
        return updated[0][1]
    if len(updated) > 1:
        where = ", ".join(_where(p) for p, _ in updated)
        raise ValueError(
            f"mabn_jax.value_and_grad: fun's aux output holds {len(updated)} trees with the "
            f"layout of batch_stats ({where}), so which one is this step's update is "
            "ambiguous; pass aux_batch_stats= the path of the updated one, e.g. "
            f"aux_batch_stats={_selector(updated[0][0])!r} (or a function of aux returning it)."
        )
    if len(found) == 1:
        if trained():
            raise ValueError(
                "mabn_jax.value_and_grad: fun returned the batch_stats it was given, "
                "unchanged, although MABN layers were applied in training mode; return the "
                "updated batch_stats (the second output of apply with mutable=['batch_stats']) "
                f"in its aux output (found only the given tree, at {_where(found[0][0])})."
            )
        return found[0][1]  # all layers frozen: recording leaves it as it is
    raise ValueError(
        "mabn_jax.value_and_grad: found no tree with the layout of batch_stats (MABN layers "
        f"{_names(previous)}, the same shapes) in fun's aux output, which is "
        f"{_describe(aux)}; " + _HOW + ". If the update is there under another layout, pass "
        "aux_batch_stats= its path (or a function of aux returning it)."
    )


def _describe(aux: Any) -> str:
    """A short account of what aux holds: its leaves, by path."""
    if aux is None:
        return "None"
    leaves = jax.tree_util.tree_flatten_with_path(aux)[0]
    what = lambda v: (
        f"an array of shape {tuple(v.shape)}" if hasattr(v, "shape") else f"a {type(v).__name__}"
    )
    parts = [f"{_where(path)}: {what(v)}" for path, v in leaves[:4]]
    more = f", and {len(leaves) - 4} more leaves" if len(leaves) > 4 else ""
    return f"a {type(aux).__name__} ({'; '.join(parts) or 'empty'}{more})"


def _selected(aux: Any, previous: Any, want: Any, select: AuxSelector) -> Any:
    """The tree ``aux_batch_stats`` points at, checked to be a batch_stats tree."""
    if callable(select):
        node, where = select(aux), "the tree aux_batch_stats(aux) returned"
    else:
        node, where = aux, "aux"
        for key in select:
            try:
                indexable = isinstance(node, Mapping) or (
                    isinstance(node, Sequence) and isinstance(key, int)
                )
                if indexable:
                    node = node[key]
                else:
                    node = getattr(node, str(key))
            except (KeyError, IndexError, TypeError, AttributeError):
                raise ValueError(
                    f"mabn_jax.value_and_grad: aux_batch_stats={tuple(select)!r}: {where} has "
                    f"no entry {key!r}; it is {_describe(node)}."
                ) from None
            where = f"{where}[{key!r}]"
    if isinstance(node, Mapping) and isinstance(node.get("batch_stats"), Mapping):
        node, where = node["batch_stats"], f"{where}['batch_stats']"  # the whole updates dict
    if not isinstance(node, Mapping) or _layout(node) != want:
        got = _names(node) if isinstance(node, Mapping) else type(node).__name__
        raise ValueError(
            f"mabn_jax.value_and_grad: aux_batch_stats points at {where}, which is not a "
            f"batch_stats tree of this model (found {got}; expected MABN layers "
            f"{_names(previous)} with the shapes of the batch_stats given); point it at the "
            "updated batch_stats (the second output of apply with mutable=['batch_stats'])."
        )
    if not _contains(aux, node):
        raise ValueError(
            "mabn_jax.value_and_grad: aux_batch_stats returned a tree that is not part of aux "
            "(a copy or a new dict); return the subtree of aux itself, e.g. "
            "lambda aux: aux[1]['batch_stats']."
        )
    return node


def _contains(aux: Any, node: Any) -> bool:
    hits = [n for n in jax.tree_util.tree_leaves(aux, is_leaf=lambda n: n is node) if n is node]
    return bool(hits)


def replace(aux: Any, target: Any, new: Any) -> Any:
    """``aux`` with the subtree ``target`` (by identity) replaced by ``new``."""
    return jax.tree_util.tree_map(
        lambda n: new if n is target else n, aux, is_leaf=lambda n: n is target
    )


def current_batch_stats(args: Sequence[Any], batch_stats: Any) -> Any:
    """The ``batch_stats`` a step is taken from: the given tree, unless none of the
    function's arguments is it and exactly one has its layout (an argument, or a
    variables dict's ``'batch_stats'``): a helper built once, outside the loop,
    with the first step's tree (or jitted with it as a constant) and called with
    the current one, which the record must pair with. Several other trees of that
    layout and none of them the given one: ``ValueError``."""
    want, old = _layout(batch_stats), jax.tree_util.tree_leaves(batch_stats)
    trees = [a.get("batch_stats", a) if isinstance(a, Mapping) else a for a in args]
    same = [t for t in trees if isinstance(t, Mapping) and _layout(t) == want]
    is_given = lambda t: all(a is b for a, b in zip(jax.tree_util.tree_leaves(t), old))
    if not same or any(is_given(t) for t in same):
        return batch_stats
    if len(same) == 1:
        return same[0]
    raise ValueError(
        "mabn_jax.value_and_grad: the function is called with several batch_stats trees "
        "of this model's layout, none of them the one given as value_and_grad(..., "
        "batch_stats=...) (a helper built once with an earlier step's tree?). Build the "
        "helper inside the train step with the tree the model is applied with, "
        "mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=state.batch_stats)."
    )
