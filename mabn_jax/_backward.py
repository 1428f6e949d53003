"""MABN's backward rule: the custom VJP that injects the moving averages.

With ``ĝ = ∂L/∂y · γ · r`` and ``z = (x − μ̃) / sqrt(σ̃² + ε)``::

    Ψ_B = mean(ĝ · z),   g_B = mean(ĝ)                 (this step's, per group)
    Ψ̃, g̃ = Ψ_B, g_B in the batch phase, else their window means
    ∂L/∂x = (ĝ − g̃ − z · Ψ̃) / sqrt(σ̃² + ε)             (plain: no g)

Ψ_B and g_B exist only here; they leave as the cotangents of the window-shaped
*probes* (:class:`~mabn_jax._state.Probes`), each written into this step's
slot, and the ``uses`` probe's cotangent counts the applications (1 each).
Under ``shard_map`` the backward sums are synchronized in this pass by one
all-reduce (:func:`normalize_bwd`); the two-stage path that other named axes
need is :mod:`mabn_jax._synced`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mabn_jax import _stats as S
from mabn_jax import _window
from mabn_jax._config import MABNConfig
from mabn_jax._sharding import probe_cotangent, varying_axes
from mabn_jax._state import Probes

Array = jax.Array

__all__ = [
    "UNRECORDED",
    "Spec",
    "Ctx",
    "z_of",
    "normalize",
    "normalize_fwd",
    "local_sums",
    "finish",
]


UNRECORDED = (
    "MABN: a training-mode call without probes is being differentiated. Its gradient "
    "would use this step's backward statistics (Psi_B, g_B), but without probes they "
    "cannot leave the backward pass, so the layer's windows would never hold them. "
    "Differentiate with mabn_jax.nnx.value_and_grad / mabn_jax.nnx.grad (NNX) or "
    "mabn_jax.value_and_grad (linen), which attach the probes and record the statistics; "
    "with the low-level NNX API, call mabn_jax.nnx.attach_probes(model) before the model "
    "is split (nnx.split / nnx.unpack) and differentiate w.r.t. (nnx.Param, "
    "mabn_jax.nnx.Probe). A training-mode call that nothing differentiates is fine."
)


class Spec(NamedTuple):
    """Static description of one normalization call (hashable)."""

    reduction_axes: tuple[int, ...]
    feature_axes: tuple[int, ...]  # axis 0 (the groups) first
    out_dtype: Any
    config: MABNConfig
    window: int  # m, the steps a window averages (MABNConfig.window_length)
    recorded: bool = True  # probes given: the backward statistics can leave the VJP


class Ctx(NamedTuple):
    """Per-group, per-channel values of one step. The custom VJP treats them as
    constants, but they stay differentiable functions of x, so second-order
    derivatives see how the statistics move with x."""

    mean: Array | None  # μ̃ (centered) or None
    inv: Array  # 1 / sqrt(σ̃² + ε)
    r: Array
    d: Array | None
    factor: Array  # r / sqrt(σ̃² + ε)
    psi_window: Array  # windows as before this step
    g_window: Array | None
    slot_mask: Array  # [G, R] (one group: its slot)
    t: Array  # [G]: the window steps
    use_batch: Array  # [G]
    count: Array  # type: ignore[assignment]  # examples per statistic (shadows tuple.count)
    mask: Array | None
    rows: _window.Rows | None  # one group's window rows (laid out in the forward pass)


def z_of(x: Array, ctx: Ctx, spec: Spec, dtype) -> Array:
    b = functools.partial(S.bshape, ndim=x.ndim, feature_axes=spec.feature_axes)
    return _minus(x, ctx.mean, spec, dtype) * b(ctx.inv)


def _minus(x: Array, center: Array | None, spec: Spec, dtype, barrier: bool = False) -> Array:
    """``x − center`` (``x`` without one), in ``dtype``."""
    xs = x.astype(dtype)
    if center is None:
        return xs
    center = lax.optimization_barrier(center) if barrier else center
    return xs - S.bshape(center, x.ndim, spec.feature_axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def normalize(spec: Spec, x, scale, bias, probes, ctx):
    return normalize_fwd(spec, x, scale, bias, probes, ctx)[0]


def normalize_fwd(spec: Spec, x, scale, bias, probes, ctx):
    """``y = γ·(r·z + d) + β``, as ``(x − c)·f·γ + β`` with one factor
    ``f = r/sqrt(σ̃² + ε)`` (``ctx.factor``, one square root) and one centre
    ``c = μ̃ − d/f`` per channel (none for the plain layer). XLA computes each
    once (they end in a square root and a division), where it copied d's clip
    and select into every pass over x. The residuals keep f, which scales dγ's
    reduction (:func:`local_sums`)."""
    dtype = ctx.inv.dtype
    b = functools.partial(S.bshape, ndim=x.ndim, feature_axes=spec.feature_axes)
    factor = ctx.factor
    center = ctx.mean if ctx.d is None or ctx.mean is None else ctx.mean - ctx.d / factor
    y = (_minus(x, center, spec, dtype) * b(factor) * b(scale) + b(bias)).astype(spec.out_dtype)
    return y, (x, scale, bias, probes, ctx, factor)


def normalize_bwd(spec: Spec, res, dy):
    x, scale, bias, probes, ctx, _ = res
    sums, dscale, dbias = local_sums(spec, res, dy)
    name = spec.config.axis_name
    if name is not None:  # synchronized over shard_map axes (_sync_in_backward)
        # One all-reduce serves both: the mean of the devices' sums normalizes, and
        # γ, β (replicated over these axes) take its total as their gradient.
        sums = lax.pmean(sums, name)
        devices = lax.psum(1, name)
        dscale, dbias = (
            (devices * v).astype(p.dtype) for v, p in zip(_gradients(sums, ctx), (scale, bias))
        )
    dx, dprobes = finish(spec, x, scale, probes, ctx, dy, sums)
    return dx, dscale, dbias, dprobes, jax.tree_util.tree_map(lambda _: None, ctx)


def local_sums(spec: Spec, res, dy):
    """(this device's backward sums; dγ; dβ).

    The sums are ``(Σdy·r·z, Σdy)`` per group (``[G, *features]``); the
    groups' own dγ and dβ are ``(Σdy·r·z + d·Σdy, Σdy)``, which γ and β (laid
    out per group) take as their gradients. So under ``shard_map`` the
    all-reduce that synchronizes the sums also gives the replicated γ's and β's
    gradients (:func:`normalize_bwd`), with no all-reduce of its own.
    """
    if not spec.recorded:
        raise ValueError(UNRECORDED)
    x, scale, bias, probes, ctx, factor = res
    dtype = ctx.inv.dtype
    dy = dy.astype(dtype)
    sum_dy = dy.sum(spec.reduction_axes)
    # Σ dy·r·z = f·Σ dy·(x − μ̃). Scaled after the reduction and about μ̃ (not the
    # centre c, which waits for σ̃²), the reduction needs only μ̃: where dy does not
    # wait for the forward either, XLA makes it one pass over x with the forward's
    # σ²_B (the TPU compiler then reads x once less). With ghost batches a barrier
    # keeps the per-channel select behind μ̃ out of that pass; otherwise XLA CPU
    # writes x − μ̃ to memory before reducing.
    xc = _minus(x, ctx.mean, spec, dtype, barrier=ctx.rows is None)
    sums = ((dy * xc).sum(spec.reduction_axes) * factor, sum_dy)
    # The sums stay in the statistics' dtype: Ψ_B and g_B are made from them.
    dscale, dbias = _gradients(sums, ctx)
    return sums, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


def _gradients(sums, ctx: Ctx):
    """(dγ, dβ) per group from the backward sums: ``(Σdy·r·z + d·Σdy, Σdy)``."""
    dyz, sum_dy = sums
    return (dyz if ctx.d is None else dyz + ctx.d * sum_dy), sum_dy


def finish(spec: Spec, x, scale, probes, ctx, dy, sums, probe_weight=None):
    """(dx, probe cotangents) from the synchronized sums of :func:`local_sums`."""
    dtype = ctx.inv.dtype
    b = functools.partial(S.bshape, ndim=x.ndim, feature_axes=spec.feature_axes)
    z = z_of(x, ctx, spec, dtype)
    dy = dy.astype(dtype)
    a = scale * ctx.r
    keep = (lambda v: v) if ctx.mask is None else (lambda v: S.where(ctx.mask, v, 0.0))
    sl = (
        _window.one_step(ctx.rows, spec.window)
        if ctx.rows is not None
        else _window.slide(ctx.slot_mask, ctx.t, ctx.use_batch, spec.window, ctx.psi_window.shape)
    )
    weight = (lambda v: v) if probe_weight is None else (lambda v: v * probe_weight)

    # One set of zeros for both windows (they have one shape).
    zeros = None if ctx.g_window is None else jnp.zeros(ctx.psi_window.shape, dtype)

    def windowed(window, total):
        """(the step's statistic in use, the probe cotangent)."""
        value = total / ctx.count  # Ψ_B or g_B (times the loss scale)
        if probes.loss_scale is not None:  # the stored windows are unscaled
            window = (window * probes.loss_scale).astype(window.dtype)
        used, cot = _window.backward_windows(
            sl, ctx.use_batch, window, value, replicate(value), zeros
        )
        return used, weight(cot)

    def replicate(value):
        # Under shard_map the statistic can be typed as varying over axes where it is
        # equal (the two-stage path's averaged sums) or not (a per-device mask
        # count); a state (probe) replicated over those axes takes their mean.
        extra = tuple(sorted(varying_axes(value) - varying_axes(probes.psi)))
        return lax.pmean(value, extra) if extra else value

    # a·Σdy·z = γ·Σdy·r·z and a·Σdy = γ·r·Σdy, with a = γ·r.
    sum_dyz, sum_dy = (v.astype(dtype) for v in sums)
    psi, psi_cot = windowed(ctx.psi_window, scale * sum_dyz)
    dxs = dy * b(a) - keep(z * b(psi))
    g_cot = None
    if ctx.g_window is not None:
        g, g_cot = windowed(ctx.g_window, a * sum_dy)
        dxs = dxs - keep(b(g))
    dx = (dxs * b(ctx.inv)).astype(x.dtype)
    uses = None if probes.uses is None else weight(_one_use(sum_dy, jnp.shape(probes.uses)))
    uses = None if uses is None else replicate(uses)  # one use per device, too
    dprobes = Probes(
        probe_cotangent(psi_cot, probes.psi),
        None if g_cot is None else probe_cotangent(g_cot, probes.g),
        None if probes.loss_scale is None else jnp.zeros_like(probes.loss_scale),
        None if uses is None else probe_cotangent(uses, probes.uses),
    )
    return dx, dprobes


def _one_use(sums: Array, shape) -> Array:
    """1, as the cotangent of the ``uses`` probe: one per application, whatever dy
    is. It is made to vary with the backward sums (``where(a == a, 1, 1)``, which
    no NaN changes), so that under ``vmap`` each instance counts and a probe
    shared by the instances sums their uses (vmapped instances of one shared,
    synchronized state weigh 1/n each: ``probe_weight``)."""
    total = sums.sum()  # its derivative is never taken: a comparison has none
    one = jnp.ones_like(total)
    return jnp.broadcast_to(S.where(total == total, one, one), shape)


normalize.defvjp(normalize_fwd, normalize_bwd)
