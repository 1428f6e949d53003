"""Fold inference-mode normalization into the preceding convolution or dense layer.

At inference MABN (both variants) and ``nn.BatchNorm`` are one per-channel
affine map ``y = a · h + c`` of the layer output ``h = x ⊛ W + w₀``, so

    y = x ⊛ (W · a) + (a · w₀ + c)

is a plain ``nn.Conv`` / ``nn.Dense`` with kernel ``W · a`` (``a`` scales the
last, output-feature axis of the kernel) and bias ``a · w₀ + c``, and the norm
layer disappears. For :class:`~mabn_jax.CenteredConv` /
:class:`~mabn_jax.CenteredDense` the kernel that is applied is the centered
one, ``W − mean_fan_in(W)``; pass ``centered_kernel=True`` so it is folded.

    ================  ====================================  ==================
    norm              a                                     c
    ================  ====================================  ==================
    MABN              γ / sqrt(ema_x2 + ε)                  β
    MABN centered     γ / sqrt(ema_var + ε)                 β − a · ema_mean
    nn.BatchNorm      γ / sqrt(var + ε)                     β − a · mean
    ================  ====================================  ==================

Example, a model whose ``norm`` can be switched off (``norm=None`` gives every
conv a bias and skips the norms)::

    train_model = Net(conv=mabn_jax.CenteredConv, norm=mabn_jax.MABN)
    deploy_model = Net(conv=nn.Conv, norm=None)
    params = mabn_jax.fold_params(
        variables['params'], variables['batch_stats'],
        pairs=[('conv1', 'norm1'), ('block/conv', 'block/norm')],
        centered_kernel=True)
    y = deploy_model.apply({'params': params}, x)   # == train_model in eval mode
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from mabn_jax import _state, _stats
from mabn_jax._mabn import affine_from_ema
from mabn_jax.linen import center_kernel

__all__ = ["norm_affine", "fold_affine", "fold_norm", "fold_params"]

Array = jax.Array
Path = str | Sequence[str]


def norm_affine(norm_params: Mapping[str, Array], norm_stats: Mapping[str, Array],
                *, epsilon: float = 1e-5) -> tuple[Array, Array]:
    """``(a, c)`` with inference ``y = a · h + c`` for an MABN or ``nn.BatchNorm`` layer.

    The layer kind is recognized from its ``batch_stats`` entries: ``ema_x2``
    (MABN), ``ema_mean``/``ema_var`` (centered MABN) or ``mean``/``var``
    (``nn.BatchNorm``). ``norm_params`` may lack ``scale``/``bias``
    (``use_scale=False`` / ``use_bias=False``). ``epsilon`` must be the layer's.
    """
    stats = dict(norm_stats)
    state = _state.from_mapping(stats)
    if state is not None:
        var, mean = state.ema_var, state.ema_mean
    elif frozenset(stats) == {"mean", "var"}:  # nn.BatchNorm: the centered formula
        var, mean = stats["var"], stats["mean"]
    else:
        raise ValueError(
            f"fold: norm_stats has keys {sorted(stats)}, which is neither an MABN layer "
            f"({[k for k, _ in _state.LAYOUTS[False]]} or, centered, "
            f"{[k for k, _ in _state.LAYOUTS[True]]}) nor an nn.BatchNorm ('mean', 'var') "
            "layer; pass that layer's batch_stats entry.")
    scale, bias = norm_params.get("scale"), norm_params.get("bias")
    dtype = jnp.result_type(jnp.float32, var, *(p for p in (scale, bias) if p is not None))
    scale, bias = _stats.affine_params(scale, bias, var.shape, dtype)
    return affine_from_ema(scale, bias, var, mean, epsilon)


def fold_affine(layer_params: Mapping[str, Array], a: Array, c: Array, *,
                centered_kernel: bool = False) -> dict[str, Array]:
    """Kernel and bias of the plain layer computing ``a · layer(x) + c``.

    Args:
      layer_params: ``{'kernel': W}`` or ``{'kernel': W, 'bias': w₀}`` of an
        ``nn.Conv``/``nn.Dense`` (or their centered versions); the last kernel
        axis is the output features.
      a, c: per-output-feature multiplier and offset.
      centered_kernel: True for ``CenteredConv``/``CenteredDense``, whose
        applied kernel is ``center_kernel(W)``.

    Returns:
      ``{'kernel', 'bias'}`` for the same layer type with ``use_bias=True``, in
      the dtypes of the original kernel.
    """
    kernel = layer_params["kernel"]
    if kernel.shape[-1] != a.shape[-1]:
        raise ValueError(
            f"fold: the kernel has {kernel.shape[-1]} output features but the norm "
            f"has {a.shape[-1]}; pair each norm with the layer directly before it.")
    dtype = jnp.promote_types(kernel.dtype, a.dtype)
    w = kernel.astype(dtype)
    if centered_kernel:
        w = center_kernel(w)
    w0 = layer_params.get("bias")
    w0 = jnp.zeros(a.shape, dtype) if w0 is None else w0.astype(dtype)
    return {"kernel": (w * a).astype(kernel.dtype), "bias": (a * w0 + c).astype(kernel.dtype)}


def fold_norm(layer_params: Mapping[str, Array], norm_params: Mapping[str, Array],
              norm_stats: Mapping[str, Array], *, epsilon: float = 1e-5,
              centered_kernel: bool = False) -> dict[str, Array]:
    """Folds one inference-mode MABN / ``nn.BatchNorm`` into the layer before it.

    ``layer_params``, ``norm_params`` and ``norm_stats`` are the layer's
    ``params``, the norm's ``params`` and the norm's ``batch_stats`` entries.
    Returns ``{'kernel', 'bias'}`` of a plain layer with ``use_bias=True``.
    """
    a, c = norm_affine(norm_params, norm_stats, epsilon=epsilon)
    return fold_affine(layer_params, a, c, centered_kernel=centered_kernel)


def _split(path: Path) -> tuple[str, ...]:
    return tuple(path.split("/")) if isinstance(path, str) else tuple(path)


def _get(tree: Mapping, path: tuple[str, ...], what: str, default: Any = None, required=True):
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            if not required:
                return default
            raise KeyError(f"fold: {what} has no entry {'/'.join(path)!r}.")
        node = node[key]
    return node


def _unfreeze(tree):
    if isinstance(tree, Mapping):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _delete(tree: dict, path: tuple[str, ...]) -> None:
    parents = [tree]
    for key in path[:-1]:
        parents.append(parents[-1][key])
    parents[-1].pop(path[-1], None)
    for node, key in zip(reversed(parents[:-1]), reversed(path[:-1])):
        if node[key]:
            break
        del node[key]  # drop containers the norm leaves empty


def fold_params(params: Mapping, batch_stats: Mapping, pairs: Sequence[tuple[Path, Path]],
                *, epsilon: float = 1e-5,
                centered_kernel: bool | Collection[str] = False) -> dict:
    """Folds every ``(layer, norm)`` pair of a model's variables.

    Args:
      params: the trained model's ``params`` collection.
      batch_stats: its ``batch_stats`` collection.
      pairs: ``(layer_path, norm_path)`` for each norm to fold, paths given as
        ``'block/conv'`` strings or key tuples into ``params``/``batch_stats``.
      epsilon: the norms' ``epsilon`` (1e-5 for both MABN and ``nn.BatchNorm``
        by default).
      centered_kernel: True if every layer is a ``CenteredConv``/``CenteredDense``,
        or the collection of layer paths (strings) that are.

    Returns:
      A new ``params`` dict for the deployment model: each layer holds the
      folded ``kernel`` and ``bias``, the norms' parameters are gone, all other
      parameters are unchanged.
    """
    out = _unfreeze(params)
    for layer_path, norm_path in pairs:
        lp, np_ = _split(layer_path), _split(norm_path)
        centered = (centered_kernel if isinstance(centered_kernel, bool)
                    else "/".join(lp) in centered_kernel)
        folded = fold_norm(_get(params, lp, "params"),
                           _get(params, np_, "params", default={}, required=False),
                           _get(batch_stats, np_, "batch_stats"),
                           epsilon=epsilon, centered_kernel=centered)
        _set(out, lp, folded)
        if _get(out, np_, "params", required=False) is not None:
            _delete(out, np_)
    return FrozenDict(out) if isinstance(params, FrozenDict) else out
