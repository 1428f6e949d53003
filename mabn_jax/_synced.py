"""The synchronized backward over named axes that the backward pass cannot bind.

MABN with ``axis_name`` normalizes with statistics averaged over devices or
vmapped instances, so its backward sums must be averaged too. Under
``shard_map`` they are, inside the backward pass (:func:`sync_in_backward`;
:func:`mabn_jax._backward.normalize_bwd`). Other named axes (``jax.vmap`` /
``nnx.vmap`` / ``pmap`` axes with the gradient taken outside them, or
``axis_index_groups``) are unbound by the time the backward pass runs, so the
step is split in two custom VJPs around a forward ``pmean`` of zeros whose
transpose is the ``pmean`` of the backward sums, the way ``nn.BatchNorm``'s own
backward reductions arise (:func:`normalize_named`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mabn_jax import _backward as B
from mabn_jax import _stats as S
from mabn_jax._config import MABNConfig
from mabn_jax._sharding import vary_like, varying_axes

__all__ = ["axis_names", "sync_in_backward", "normalize_named"]


def axis_names(axis_name) -> tuple:
    return () if axis_name is None else axis_name if isinstance(axis_name, tuple) else (axis_name,)


def sync_in_backward(cfg: MABNConfig, x_axes: frozenset) -> bool:
    """Whether the backward sums can be synchronized inside the backward pass:
    the axes are ``shard_map``'s (bound wherever the gradient is taken) and the
    whole axis is averaged. Otherwise (``vmap``/``pmap`` axes, which a gradient
    taken outside them no longer binds, or ``axis_index_groups``) the two-stage
    path below is used."""
    names = axis_names(cfg.axis_name)
    return bool(names) and cfg.axis_index_groups is None and set(names) <= x_axes


# With a named axis the synchronized backward sums must come from a collective
# that is bound wherever the forward's is: under jax.vmap / nnx.vmap with the
# gradient taken outside the vmap, a lax.pmean inside a custom VJP's backward
# runs after the vmap's axis is gone. So the step is split in two custom VJPs
# around a forward pmean of zeros, whose transpose is the pmean of the backward
# sums (the way nn.BatchNorm's own backward reductions arise):
#   x ─ _enter ─→ (x, 0) ─→ (x, pmean(0)) ─ _normalize_synced ─→ y
# _normalize_synced's backward returns this device's sums as the cotangent of
# pmean(0) and passes dy on as x's; _enter's backward receives them averaged.


def normalize_named(spec: B.Spec, x, scale, bias, probes, ctx):
    cfg = spec.config
    axes = varying_axes(x)
    x1, zeros = _enter(spec, x, scale, probes, ctx, _probe_weight(x, probes.psi))
    synced = tuple(vary_like(S.pmean(z, cfg.axis_name, cfg.axis_index_groups), axes) for z in zeros)
    return _normalize_synced(spec, x1, scale, bias, ctx, synced)


def _carry_dtype(spec: B.Spec, x):
    return jnp.promote_types(x.dtype, spec.out_dtype)  # dy travels as x's cotangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _enter(spec: B.Spec, x, scale, probes, ctx, probe_weight):
    return _enter_fwd(spec, x, scale, probes, ctx, probe_weight)[0]


def _enter_fwd(spec: B.Spec, x, scale, probes, ctx, probe_weight):
    # Zeros that vary (are batched) like x: their pmean then transposes to the mean
    # of the per-instance sums, not to their total.
    # Shaped like the sums of B.local_sums ([G, *features]).
    first = lax.stop_gradient(x.reshape(-1)[0])
    zero = jnp.zeros(ctx.inv.shape, ctx.inv.dtype) + S.where(first == first, 0.0, 0.0).astype(
        ctx.inv.dtype
    )
    zeros = (vary_like(zero, varying_axes(x)),) * 2
    out = (x.astype(_carry_dtype(spec, x)), zeros)
    return out, (x, scale, probes, ctx, probe_weight)


def _enter_bwd(spec: B.Spec, res, cts):
    x, scale, probes, ctx, probe_weight = res
    dy, sums = cts
    dx, dprobes = B.finish(spec, x, scale, probes, ctx, dy, sums, probe_weight)
    # γ's gradient comes from _normalize_synced (it is an input here only for ĝ).
    return (dx, jnp.zeros_like(scale), dprobes, jax.tree_util.tree_map(lambda _: None, ctx), None)


_enter.defvjp(_enter_fwd, _enter_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _normalize_synced(spec: B.Spec, x, scale, bias, ctx, synced):
    return B.normalize_fwd(spec, x, scale, bias, None, ctx)[0]


def _normalize_synced_fwd(spec: B.Spec, x, scale, bias, ctx, synced):
    y, res = B.normalize_fwd(spec, x, scale, bias, None, ctx)
    return y, res


def _normalize_synced_bwd(spec: B.Spec, res, dy):
    x, scale, bias, _, ctx, _ = res
    sums, dscale, dbias = B.local_sums(spec, res, dy)
    return (dy.astype(x.dtype), dscale, dbias, jax.tree_util.tree_map(lambda _: None, ctx), sums)


_normalize_synced.defvjp(_normalize_synced_fwd, _normalize_synced_bwd)


@jax.custom_batching.custom_vmap
def _shared_weight(x, probe):
    return jnp.ones((), probe.dtype)


@_shared_weight.def_vmap
def _shared_weight_vmap(axis_size, in_batched, x, probe):
    x_batched, probe_batched = in_batched
    w = _shared_weight(x[0] if x_batched else x, probe[0] if probe_batched else probe)
    if x_batched and not probe_batched:
        w = w / axis_size
    return w, False


def _probe_weight(x, probe):
    """What each vmapped instance's probe cotangent is weighted by: 1, or
    1/axis_size where one probe (one layer state) is shared by the instances of
    a vmap over the input (nnx.vmap(in_axes=(None, 0)), nn.vmap with broadcast
    batch_stats): autodiff sums the instances' cotangents of a shared input,
    and each already holds the synchronized statistic."""
    return _shared_weight(lax.stop_gradient(x), lax.stop_gradient(probe))
