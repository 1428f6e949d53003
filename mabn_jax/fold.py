"""Fold inference-mode normalization into the preceding convolution or dense layer.

At inference MABN (both variants), :class:`~mabn_jax.BatchRenorm` and
``nn.BatchNorm`` are one per-channel affine map ``y = a · h + c`` of the layer
output ``h = x ⊛ W + w₀``, so

    y = x ⊛ (W · a) + (a · w₀ + c)

is a plain ``nn.Conv`` / ``nn.Dense`` with kernel ``W · a`` (``a`` scales the
last, output-feature axis of the kernel) and bias ``a · w₀ + c``, and the norm
layer disappears.

    =====================  ====================================  ==================
    norm                   a                                     c
    =====================  ====================================  ==================
    MABN                   γ / sqrt(ema_x2 + ε)                  β
    MABN centered          γ / sqrt(ema_var + ε)                 β − a · ema_mean
    BatchNorm/BatchRenorm  γ / sqrt(var + ε)                     β − a · mean
    =====================  ====================================  ==================

Two things decide the result and are easy to get wrong by hand: whether the
layer's applied kernel is the stored one or its centered version
(:class:`~mabn_jax.CenteredConv` / :class:`~mabn_jax.CenteredDense`), and each
norm's ``epsilon``. :func:`fold_params` reads both from the model itself; the
lower-level functions require them as keywords, with no defaults::

    params = mabn_jax.fold_params(
        model, variables, [("conv1", "norm1"), ("block/conv", "block/norm")], x, train=False
    )  # an input and apply's kwargs
    y = deploy_model.apply({"params": params}, x)  # == model in inference mode
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import FrozenDict

from mabn_jax import _shell, _state, _stats
from mabn_jax._inference import affine_from_ema
from mabn_jax.linen import MABN, BatchRenorm, CenteredConv, CenteredDense, center_kernel

__all__ = ["norm_affine", "fold_affine", "fold_norm", "fold_params"]

Array = jax.Array
Path = str | Sequence[str]
_NORMS = (MABN, BatchRenorm, nn.BatchNorm)


def norm_affine(
    norm_params: Mapping[str, Array], norm_stats: Mapping[str, Array], *, epsilon: float
) -> tuple[Array, Array]:
    """``(a, c)`` with inference ``y = a · h + c`` for an MABN, BatchRenorm or
    ``nn.BatchNorm`` layer, recognized from its ``batch_stats`` entries.

    Args:
      norm_params: the layer's ``params`` entry; it may lack ``scale``/``bias``
        (``use_scale=False`` / ``use_bias=False``).
      norm_stats: the layer's ``batch_stats`` entry.
      epsilon: the layer's own (required: the default differs between
        libraries and a wrong one is silently off).

    Returns:
      ``(a, c)``, per feature, in at least float32.

    Raises:
      ValueError: ``norm_stats`` is none of those layers' entries.

    Example:
      >>> import jax.numpy as jnp, mabn_jax
      >>> norm = {"scale": jnp.full(3, 2.0), "bias": jnp.ones(3)}
      >>> a, c = mabn_jax.norm_affine(
      ...     norm, {"mean": jnp.zeros(3), "var": jnp.full(3, 4.0)}, epsilon=0.0
      ... )
      >>> a, c
      (Array([1., 1., 1.], dtype=float32), Array([1., 1., 1.], dtype=float32))
    """
    stats = dict(norm_stats)
    state = _state.from_mapping(stats)
    if state is not None:
        var, mean = state.ema_var, state.ema_mean
    elif {"mean", "var"} <= set(stats):  # nn.BatchNorm, BatchRenorm: the centered formula
        var, mean = stats["var"], stats["mean"]
    else:
        raise ValueError(
            f"fold: norm_stats has keys {sorted(stats)}, which is neither an MABN layer "
            f"({[k for k, _ in _state.LAYOUTS[False]]} or, centered, "
            f"{[k for k, _ in _state.LAYOUTS[True]]}) nor an nn.BatchNorm or BatchRenorm "
            "layer (with 'mean' and 'var'); pass that layer's batch_stats entry."
        )
    scale, bias = norm_params.get("scale"), norm_params.get("bias")
    dtype = jnp.result_type(jnp.float32, var, *(p for p in (scale, bias) if p is not None))
    scale, bias = _stats.affine_params(scale, bias, var.shape, dtype)
    return affine_from_ema(scale, bias, var, mean, epsilon)


def fold_affine(
    layer_params: Mapping[str, Array], a: Array, c: Array, *, centered_kernel: bool
) -> dict[str, Array]:
    """Kernel and bias of the plain layer computing ``a · layer(x) + c``.

    Args:
      layer_params: ``{'kernel': W}`` or ``{'kernel': W, 'bias': w₀}`` of an
        ``nn.Conv``/``nn.Dense`` (or their centered versions); the last kernel
        axis is the output features.
      a, c: per-output-feature multiplier and offset.
      centered_kernel: whether the layer applies ``center_kernel(W)``
        (``CenteredConv``/``CenteredDense``) rather than ``W``.

    Returns:
      ``{'kernel', 'bias'}`` for the same layer type with ``use_bias=True``, in
      the dtypes of the original kernel.

    Raises:
      ValueError: the kernel's output features are not ``a``'s.

    Example:
      >>> import jax.numpy as jnp, mabn_jax
      >>> layer = {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}
      >>> folded = mabn_jax.fold_affine(layer, jnp.full(3, 2.0), jnp.ones(3), centered_kernel=False)
      >>> folded["kernel"][0], folded["bias"]
      (Array([2., 2., 2.], dtype=float32), Array([1., 1., 1.], dtype=float32))
    """
    kernel = layer_params["kernel"]
    if kernel.shape[-1] != a.shape[-1]:
        raise ValueError(
            f"fold: the kernel has {kernel.shape[-1]} output features but the norm "
            f"has {a.shape[-1]}; pair each norm with the layer directly before it."
        )
    dtype = jnp.promote_types(kernel.dtype, a.dtype)
    w = kernel.astype(dtype)
    if centered_kernel:
        w = center_kernel(w)
    w0 = layer_params.get("bias")
    w0 = jnp.zeros(a.shape, dtype) if w0 is None else w0.astype(dtype)
    return {"kernel": (w * a).astype(kernel.dtype), "bias": (a * w0 + c).astype(kernel.dtype)}


def fold_norm(
    layer_params: Mapping[str, Array],
    norm_params: Mapping[str, Array],
    norm_stats: Mapping[str, Array],
    *,
    epsilon: float,
    centered_kernel: bool,
) -> dict[str, Array]:
    """Folds one inference-mode norm into the layer before it (see :func:`norm_affine`
    and :func:`fold_affine`; both keywords are required).

    Args:
      layer_params: the ``nn.Conv``/``nn.Dense`` layer's ``params`` entry.
      norm_params, norm_stats, epsilon: the norm's, as for :func:`norm_affine`.
      centered_kernel: as for :func:`fold_affine`.

    Returns:
      The layer's folded ``{'kernel', 'bias'}`` (see :func:`fold_affine`).

    Raises:
      ValueError: as :func:`norm_affine` and :func:`fold_affine` do.

    Example:
      >>> import jax.numpy as jnp, mabn_jax
      >>> layer = {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}
      >>> norm = {"scale": jnp.full(3, 2.0), "bias": jnp.ones(3)}
      >>> stats = {"mean": jnp.zeros(3), "var": jnp.full(3, 4.0)}  # nn.BatchNorm's
      >>> folded = mabn_jax.fold_norm(layer, norm, stats, epsilon=0.0, centered_kernel=False)
      >>> folded["kernel"][0], folded["bias"]
      (Array([1., 1., 1.], dtype=float32), Array([1., 1., 1.], dtype=float32))
    """
    a, c = norm_affine(norm_params, norm_stats, epsilon=epsilon)
    return fold_affine(layer_params, a, c, centered_kernel=centered_kernel)


def fold_params(
    model: nn.Module, variables: Mapping, pairs: Sequence[tuple[Path, Path]], *args, **kwargs
) -> dict:
    """Folds every ``(layer, norm)`` pair of a trained model's variables.

    The model is traced once, abstractly (nothing is computed), on ``args`` and
    ``kwargs`` as for ``model.apply(variables, *args, **kwargs)`` in inference
    mode, to read which class each layer is (a centered kernel or not) and each
    norm's ``epsilon`` and feature ``axis``.

    Args:
      model: the trained model.
      variables: its ``{'params': ..., 'batch_stats': ...}``.
      pairs: ``(layer_path, norm_path)`` for each norm to fold, as
        ``'block/conv'`` strings or key tuples (module paths).
      args: an input (any values of the right shape), as for ``apply``.
      kwargs: the keyword arguments of an inference-mode apply, e.g.
        ``train=False``.

    Returns:
      A new ``params`` dict for the deployment model: each layer holds the
      folded ``kernel`` and ``bias``, the norms' parameters are gone, all other
      parameters are unchanged.

    Raises:
      KeyError: a path names no module the model calls, or no entry of
        ``variables``.
      TypeError: a pair is not (``nn.Conv``/``nn.Dense``, a norm of this
        package or ``nn.BatchNorm``).
      ValueError: a norm is not applied directly to its layer's output, or
        its features are not on the last axis.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, mabn_jax
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train=False):
      ...         x = mabn_jax.CenteredDense(3, name="dense")(x)
      ...         return mabn_jax.MABN(use_running_average=not train, buffer_size=4, name="norm")(x)
      >>> x = jnp.ones((2, 5))
      >>> variables = Net().init(jax.random.key(0), x)
      >>> folded = mabn_jax.fold_params(Net(), variables, [("dense", "norm")], x)
      >>> sorted(folded["dense"])
      ['bias', 'kernel']
    """
    modules, calls = _modules(model, variables, args, kwargs)
    params, stats = variables["params"], variables.get("batch_stats", {})
    out = _shell.to_dicts(params)
    for layer_path, norm_path in pairs:
        lp, np_ = _split(layer_path), _split(norm_path)
        layer, norm = _module(modules, lp, "layer"), _module(modules, np_, "norm")
        _check_pair(layer, norm, lp, np_)
        _check_consumes(calls, lp, np_)
        folded = fold_norm(
            _get(params, lp, "params"),
            _get(params, np_, "params", default={}, required=False),
            _get(stats, np_, "batch_stats"),
            epsilon=norm.epsilon,
            centered_kernel=isinstance(layer, (CenteredConv, CenteredDense)),
        )
        _set(out, lp, folded)
        if _get(out, np_, "params", required=False) is not None:
            _delete(out, np_)
    return FrozenDict(out) if isinstance(params, FrozenDict) else out


def _modules(model, variables, args, kwargs):
    """Every module the apply calls, by path, and each call's ``(input, output)``
    (an abstract trace; the arrays are the trace's own objects)."""
    found, calls = {}, {}

    def record(next_fun, call_args, call_kwargs, context):
        out = next_fun(*call_args, **call_kwargs)
        if context.method_name == "__call__":
            path = tuple(context.module.path)
            found[path] = context.module
            calls.setdefault(path, []).append((call_args[0] if call_args else None, out))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, *a: model.apply(v, *a, **kwargs), variables, *args)
    return found, calls


def _check_consumes(calls, lp, np_) -> None:
    """Folding is exact only if the norm is applied to the layer's output itself:
    an activation, a residual sum or a reversed pair in between would fold silently
    into a different function."""
    outputs = [out for _, out in calls[lp]]
    if not all(any(x is out for out in outputs) for x, _ in calls[np_]):
        raise ValueError(
            f"fold: the norm {'/'.join(np_)!r} is not applied to the output of "
            f"{'/'.join(lp)!r} directly (something is computed in between, e.g. an "
            "activation or a residual sum, or the pair is reversed), so it cannot be "
            "folded into that layer. Pair each norm with the Conv/Dense whose output it "
            "normalizes, or leave it unfolded."
        )


def _module(modules, path, what):
    if path not in modules:
        raise KeyError(
            f"fold: the model calls no module at {'/'.join(path)!r} (the {what} "
            f"of a pair); its modules are {sorted('/'.join(p) for p in modules)}."
        )
    return modules[path]


def _check_pair(layer, norm, lp, np_) -> None:
    if not isinstance(layer, (nn.Conv, nn.Dense)):
        raise TypeError(
            f"fold: {'/'.join(lp)!r} is a {type(layer).__name__}; only nn.Conv, "
            "nn.Dense and their centered versions can absorb a norm."
        )
    if not isinstance(norm, _NORMS):
        raise TypeError(
            f"fold: {'/'.join(np_)!r} is a {type(norm).__name__}, not MABN, "
            "BatchRenorm or nn.BatchNorm."
        )
    if norm.axis not in (-1, (-1,)):
        raise ValueError(
            f"fold: the norm {'/'.join(np_)!r} has axis={norm.axis!r}; folding "
            "needs the features on the last axis, as the kernel has them."
        )


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
