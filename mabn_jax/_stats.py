"""Batch statistics shared by MABN and Batch Renormalization (no Flax).

The pieces every layer here needs, written once: axis handling, input checks,
ghost-batch splitting, the moments (``use_mean=False`` gives the second moment
``E[x²]`` of the non-centered MABN, as ``use_mean`` does in Flax's
``_compute_stats``), the EMA, and the clipped renormalization factors.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Axes = int | Sequence[int]


def canonicalize_axes(ndim: int, axes: Axes, layer: str) -> tuple[int, ...]:
    """Sorted non-negative feature axes; errors name ``axis`` and the fix."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    if ndim < 2:
        raise ValueError(
            f"{layer}: input of rank {ndim} is invalid; use an input of rank "
            ">= 2 (a batch axis and a feature axis)."
        )
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{layer}: axis={a} is out of range for an input of rank "
                f"{ndim}; use an axis in [-{ndim}, {ndim - 1}]."
            )
    out = tuple(sorted({a % ndim for a in axes}))
    if len(out) == ndim:
        raise ValueError(
            f"{layer}: axis={axes} leaves no axis to reduce over; keep at "
            "least one batch axis out of `axis`."
        )
    return out


def other_axes(ndim: int, feature_axes: Sequence[int]) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i not in feature_axes)


def check_input(x: Array, reduction_axes: Sequence[int], layer: str) -> None:
    """A float input with at least one example: a bad batch fails at trace time."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{layer}: input dtype {x.dtype} is not supported; cast the input "
            "to a float dtype (e.g. x.astype(jnp.float32))."
        )
    for a in reduction_axes:
        if x.shape[a] == 0:
            raise ValueError(
                f"{layer}: input shape {x.shape} is an empty batch (size 0 along axis {a}), "
                "whose statistics are undefined; drop empty batches before the training "
                "step."
            )


def stat_dtype(x_dtype: Any, state_dtype: Any, force_float32: bool = True) -> Any:
    """Reductions run in at least float32 (unless not forced) and in the state's
    precision (float64 under x64)."""
    base = jnp.promote_types(x_dtype, jnp.float32) if force_float32 else jnp.dtype(x_dtype)
    return jnp.promote_types(base, state_dtype) if force_float32 else base


def bshape(v: Array, ndim: int, feature_axes: Sequence[int]) -> Array:
    """Lays a ``[*features]`` array out to broadcast against the input (as one
    ``broadcast_in_dim``, which XLA makes a bitcast, as it does a reshape)."""
    shape = [1] * ndim
    for a, n in zip(feature_axes, v.shape):
        shape[a] = n
    return lax.broadcast_in_dim(v, shape, tuple(feature_axes[: v.ndim]))


class Split(NamedTuple):
    """An input as ``G`` ghost batches: axis 0 indexes the groups if ``G > 1``."""

    x: Array
    mask: Array | None
    groups: int
    feature_axes: tuple[int, ...]
    reduction_axes: tuple[int, ...]


def split_groups(
    x: Array,
    feature_axes: tuple[int, ...],
    norm_batch_size: int | None,
    layer: str,
    mask: Array | None = None,
) -> Split:
    """Splits axis 0 into groups of ``norm_batch_size`` consecutive examples.

    The grouped input is ``[G, n, ...]`` and axis 0 becomes a feature axis,
    so every statistic gets a leading ``[G]`` axis. Raises naming
    ``norm_batch_size`` if it does not divide the batch or axis 0 is a feature.
    """
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape)
    reduction_axes = other_axes(x.ndim, feature_axes)
    if norm_batch_size is None or norm_batch_size == x.shape[0] and 0 not in feature_axes:
        return Split(x, mask, 1, feature_axes, reduction_axes)
    if 0 in feature_axes:
        raise ValueError(
            f"{layer}: norm_batch_size={norm_batch_size} splits axis 0 of the "
            "input into groups, but axis 0 is a feature axis; put the batch on "
            "axis 0 or use norm_batch_size=None."
        )
    if x.shape[0] % norm_batch_size:
        raise ValueError(
            f"{layer}: norm_batch_size={norm_batch_size} does not divide the "
            f"batch size {x.shape[0]} (axis 0 of the input); use a batch size "
            "that is a multiple of norm_batch_size, or another norm_batch_size."
        )
    groups = x.shape[0] // norm_batch_size
    shape = (groups, norm_batch_size) + x.shape[1:]
    return Split(
        x.reshape(shape),
        None if mask is None else mask.reshape(shape),
        groups,
        (0,) + tuple(a + 1 for a in feature_axes),
        tuple(a + 1 for a in reduction_axes),
    )


def with_group_axis(split: Split) -> Split:
    """The same split with a leading group axis also when ``G = 1``, so that
    one code path serves plain and ghost batches."""
    if split.groups > 1:
        return split
    mask = None if split.mask is None else split.mask[None]
    return Split(
        split.x[None],
        mask,
        1,
        (0,) + tuple(a + 1 for a in split.feature_axes),
        tuple(a + 1 for a in split.reduction_axes),
    )


def pmean(x, axis_name: str | None, axis_index_groups=None):
    if axis_name is None:
        return x
    return lax.pmean(x, axis_name, axis_index_groups=axis_index_groups)


def moments(
    xs: Array,
    split: Split,
    *,
    use_mean: bool,
    use_fast_variance: bool,
    axis_name: str | None,
    axis_index_groups=None,
) -> tuple[Array | None, Array]:
    """``(μ_B, σ²_B)`` over the reduction axes (synchronized over ``axis_name``).

    ``use_mean=False`` returns ``(None, E[x²])``: the variance about zero of
    the non-centered MABN. Otherwise ``σ²_B`` is ``E[x²] − μ²`` (clipped at 0)
    with ``use_fast_variance``, else ``E[(x − μ)²]``: two passes, exact in the
    small batches where the one-pass form cancels.
    """
    axes, mask = split.reduction_axes, split.mask
    mean = functools.partial(jnp.mean, axis=axes, where=mask)
    sync = functools.partial(pmean, axis_name=axis_name, axis_index_groups=axis_index_groups)
    if not use_mean:
        return None, sync(mean(xs * xs))
    if use_fast_variance:
        mu, m2 = sync(jnp.stack([mean(xs), mean(xs * xs)]))
        return mu, jnp.maximum(m2 - mu * mu, 0.0)
    mu = sync(mean(xs))
    centered = xs - bshape(mu, xs.ndim, split.feature_axes)
    return mu, sync(mean(centered * centered))


def count(split: Split) -> Array | int:
    """Examples per statistic: the size of the reduction, or the mask's count."""
    if split.mask is None:
        return functools.reduce(
            lambda a, b: a * b, (split.x.shape[a] for a in split.reduction_axes), 1
        )
    return split.mask.sum(split.reduction_axes)


def fill_empty(split: Split, stats: Array | None, stored: Array | None):
    """``(stats with the running value where no entry is unmasked, any empty)``;
    without a mask, ``(stats, False)`` (a Python bool: no op to trace).

    A fully masked batch (or ghost group, or channel) has no statistics; its
    0/0 would make the output NaN, also at the masked positions a masked loss
    multiplies by zero (``NaN · 0 = NaN``). There the layer normalizes with
    its running statistics instead, and the step leaves the state alone.
    """
    if split.mask is None or stats is None or stored is None:  # (None: both, plain layer)
        return stats, False
    empty = count(split) == 0
    return (where(empty, stored.astype(stats.dtype), stats), jnp.asarray(empty).any())


def ema(old: Array, new: Array, momentum: float) -> Array:
    """``momentum · old + (1 − momentum) · new``, in the state's dtype."""
    return (momentum * old + (1 - momentum) * new.astype(old.dtype)).astype(old.dtype)


def ema_per_group(old: Array, new: Array, momentum: float, grouped: bool):
    """(EMA after the call, EMA before each group): one update per group.

    ``new`` has a leading group axis if ``grouped``. Closed form, no scan:
    before group ``i`` the EMA is ``α^i·old + (1 − α)·Σ_{j<i} α^(i−1−j)·new_j``.
    """
    if not grouped:
        return ema(old, new, momentum), old
    groups = new.shape[0]
    if groups == 1:
        return ema(old, new[0], momentum), old[None]
    i, j = jnp.arange(groups + 1)[:, None], jnp.arange(groups)[None, :]
    weights = where(j < i, (1 - momentum) * momentum ** jnp.maximum(i - 1 - j, 0), 0.0)
    decay = momentum ** jnp.arange(groups + 1)
    track = lead(decay, new[:1]).astype(old.dtype) * old[None] + jnp.tensordot(
        weights.astype(old.dtype),
        new.astype(old.dtype),
        axes=(1, 0),
        precision=lax.Precision.HIGHEST,
    )
    return track[-1], track[:-1]


def lead(mask: Array, like: Array) -> Array:
    """Reshapes a per-group (or scalar) array to broadcast against ``like``."""
    if jnp.ndim(mask) == 0:  # broadcasts as it is (and selects take a scalar predicate)
        return mask
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def where_lead(mask: Array, x, y) -> Array:
    """``where(mask, x, y)`` for a ``mask`` over the leading axes of ``x`` and
    ``y`` (per group, per row, or a scalar): one broadcast and one select."""
    if jnp.ndim(mask) == 0:
        return where(mask, x, y)
    shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(y))
    shape = mask.shape + shape[mask.ndim :] if len(shape) >= mask.ndim else mask.shape
    if mask.shape != shape:
        mask = lax.broadcast_in_dim(mask, shape, tuple(range(mask.ndim)))
    return where(mask, x, y)


def renorm_factors(
    var: Array,
    ema_var: Array,
    mean: Array | None,
    ema_mean: Array | None,
    *,
    r_max,
    d_max,
    epsilon: float,
    active: Array,
    r_min=None,
    stop_gradient: bool = True,
    squared: bool = False,
) -> tuple[Array, Array | None]:
    """Batch Renormalization's ``(r, d)``, clipped, and ``(1, 0)`` where not ``active``.

    ``r = clip(sqrt(var + ε) / sqrt(ema_var + ε), r_min, r_max)`` (``r_min``
    defaults to ``1/r_max``) and
    ``d = clip((mean − ema_mean) / sqrt(ema_var + ε), −d_max, d_max)``; ``d``
    is ``None`` without a mean. They are constants of the step (no gradient);
    ``stop_gradient=False`` leaves that to the caller (MABN's custom VJP, whose
    second-order derivatives must see r and d move like its other statistics).
    ``squared``: ``r²`` in place of ``r``.
    """
    stop = lax.stop_gradient if stop_gradient else (lambda v: v)
    ema_var = ema_var.astype(var.dtype) + epsilon
    r_min = 1.0 / r_max if r_min is None else r_min
    # r as the square root of the clipped ratio of variances, r² = (var + ε) /
    # (ema_var + ε): XLA computes a sqrt once and hands it on, whereas it copies the
    # cheap clip and select behind a division into every fusion that reads r.
    r2 = where_lead(active, clip((var + epsilon) / ema_var, r_min * r_min, r_max * r_max), 1.0)
    r = stop(r2 if squared else jnp.sqrt(r2))
    if mean is None or ema_mean is None:  # both or neither: a layer with a mean has both
        return r, None
    sigma = jnp.sqrt(ema_var)
    d = clip((mean - ema_mean.astype(mean.dtype)) / sigma, -d_max, d_max)
    return r, stop(where_lead(active, d, jnp.zeros_like(d)))


def affine_params(
    scale: Array | None, bias: Array | None, feature_shape: Sequence[int], dtype: Any
) -> tuple[Array, Array]:
    """``γ``, ``β`` in ``dtype``; ones and zeros where the layer has none."""
    scale = jnp.ones(feature_shape, dtype) if scale is None else jnp.asarray(scale)
    bias = jnp.zeros(feature_shape, dtype) if bias is None else jnp.asarray(bias)
    return scale.astype(dtype), bias.astype(dtype)


def where(cond, x, y) -> Array:
    """``where(cond, x, y)`` as a single ``select_n``.

    ``jnp.where`` traces as a nested ``jit`` (a sub-jaxpr per call); a layer
    step makes dozens of small selects, so this keeps its graph and trace
    time small. Broadcasting and dtype promotion are ``jnp.where``'s.
    """
    if (  # the common case, without jnp's argument handling (a quarter of the time)
        isinstance(x, jax.Array)
        and isinstance(y, jax.Array)
        and x.dtype == y.dtype
        and x.shape == y.shape
        and isinstance(cond, jax.Array)
        and cond.dtype == bool
        and cond.shape in ((), x.shape)
    ):
        return lax.select(cond, x, y)
    x, y = jnp.asarray(x), jnp.asarray(y)
    dtype = jnp.result_type(x, y)
    shape = jnp.broadcast_shapes(jnp.shape(cond), x.shape, y.shape)
    fit = lambda v: jnp.broadcast_to(
        v if v.dtype == dtype else lax.convert_element_type(v, dtype), shape
    )
    cond = jnp.asarray(cond)
    return lax.select(cond if cond.ndim == 0 else jnp.broadcast_to(cond, shape), fit(x), fit(y))


def clip(x, low, high) -> Array:
    """``jnp.clip`` without its nested ``jit`` (see :func:`where`)."""
    return jnp.minimum(jnp.maximum(x, low), high)


def all_finite(*arrays: Array | None, lead_axes: int = 0, given: Array | None = None) -> Array:
    """Whether every entry is finite, per index of the ``lead_axes`` leading axes
    (and ``given`` holds, a flag per index). ``given`` is folded into the first
    reduction, so that XLA computes the combined flag once and hands it to every
    consumer, rather than copying the scalar logic behind it into each fusion."""
    present = [a for a in arrays if a is not None]
    flags = [jnp.isfinite(a) for a in present]
    if len({f.shape for f in flags}) == 1:  # one reduction for arrays of one shape
        flags = [functools.reduce(jnp.logical_and, flags)]
    if given is not None:
        flags[0] = flags[0] & lead(given, flags[0])
    return functools.reduce(
        jnp.logical_and, [f.all(axis=tuple(range(lead_axes, f.ndim))) for f in flags]
    )


def select(ok: Array, new, old):
    """``new`` where ``ok`` else ``old``, leaf by leaf (``ok`` has the leading axes)."""
    return jax.tree_util.tree_map(lambda n, o: where_lead(ok, n, o), new, old)
