"""The MABN math: a training step with a custom VJP, inference, recording Ψ_B.

For a training step ``t = step + 1`` with window length ``m``, ``slot = t mod m``
and "batch phase" meaning ``t ≤ m or t < warmup_steps`` (Yan et al., ICLR 2020;
``MABN_SPEC.md``). The plain layer has no mean (``μ = 0``, ``d = 0``, no g)::

    μ_B = mean(x)   σ²_B = mean((x − μ_B)²)          (plain: σ²_B = χ²_B = mean(x²))
    μ̃  = μ_B,  σ̃² = σ²_B                                         in the batch phase
    μ̃  = mean(μ_w),  σ̃² = mean(σ²_w) + mean((μ_w − μ̃)²)          otherwise
    z  = (x − μ̃) / sqrt(σ̃² + ε)
    r  = clip(sqrt(σ̃² + ε) / sqrt(ema_var + ε), 1/r_max, r_max)   (1 before renorm)
    d  = clip((μ̃ − ema_mean) / sqrt(ema_var + ε), −d_max, d_max)   (0 before renorm)
    y  = γ · (r · z + d) + β
    ema_var ← α·ema_var + (1 − α)·σ̃²,   ema_mean ← α·ema_mean + (1 − α)·μ̃

    backward:  ĝ = ∂L/∂y · γ · r,   Ψ_B = mean(ĝ · z),   g_B = mean(ĝ)
               Ψ̃, g̃: the batch values in the batch phase, else window means
               ∂L/∂x = (ĝ − g̃ − z · Ψ̃) / sqrt(σ̃² + ε)

``μ_w``, ``σ²_w`` are the windows with this step's values written. The centered
σ̃² averages the second moments over the window (law of total variance), not
only the within-batch variances, which at batch 2 miss half the variance.
Every phase decision is a traced ``jnp.where``: one compilation serves all.

Ψ_B and g_B exist only in the backward pass. They leave it as the cotangents of
window-shaped *probes*; the forward reserves their slots by writing NaN there,
and :func:`record_backward_stats` fills exactly the reserved slots. A state
whose slots were never filled makes the next training output NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mabn_jax import _stats as S
from mabn_jax import _upstream
from mabn_jax._config import MABNConfig
from mabn_jax._sharding import check_probes_vary, probe_cotangent, vary_like, varying_axes
from mabn_jax._state import MABNState, Probes, check_state, init_probes

Array = jax.Array
_LAYER = "MABN"
# Counters are floats; past _WRAP they step back by a multiple of m (slots and
# phases unchanged, as every schedule threshold is below _WRAP - period).
_WRAP = 2**23

_FORWARD_MODE = (
    "MABN in training mode supports reverse-mode differentiation only (jax.grad, jax.vjp, "
    "jax.jacrev, and forward-over-reverse: jax.hessian, jax.jvp of jax.grad). Forward mode "
    "(jax.jvp, jax.jacfwd) of the layer itself is undefined: its gradient uses moving "
    "averages of the backward statistics (a custom VJP), which no forward derivative "
    "matches. Use use_running_average=True (inference mode) for forward-mode derivatives."
)


_UNRECORDED = (
    "MABN: a training-mode call without probes is being differentiated. Its gradient "
    "would use this step's backward statistics (Psi_B, g_B), but without probes they "
    "cannot leave the backward pass, so the layer's windows would never hold them. "
    "Differentiate with mabn_jax.nnx.value_and_grad / mabn_jax.nnx.grad (NNX) or "
    "mabn_jax.value_and_grad (linen), which attach the probes and record the statistics; "
    "with the low-level NNX API, call mabn_jax.nnx.attach_probes(model) before the model "
    "is split (nnx.split / nnx.unpack) and differentiate w.r.t. (nnx.Param, "
    "mabn_jax.nnx.Probe). A training-mode call that nothing differentiates is fine."
)


class _Phase(NamedTuple):
    slot_mask: Array  # [m] bool (or [G, m]): the ring-buffer slot t mod m
    use_batch: Array  # bool (or [G]): t <= m or t < warmup
    renorm: Array  # bool (or [G]): t > max(renorm_start, warmup)


def _phase(t: Array, cfg: MABNConfig) -> _Phase:
    """The phase of each window step ``t`` (``[G]``, every ``t >= 1``)."""
    m = cfg.window
    return _Phase(
        jnp.arange(m)[None] == lax.rem(t, m)[:, None],  # t >= 1: rem is mod
        (t <= m) | (t < cfg.warmup_steps),
        t > max(cfg.renorm_start, cfg.warmup_steps),
    )


def as_count(step: Array) -> Array:
    """A stored counter as int32 (it may have been averaged by lax.pmean)."""
    return lax.round(step, lax.RoundingMethod.TO_NEAREST_EVEN).astype(jnp.int32)


def wrap_period(m: int) -> int:
    """What a counter past ``_WRAP`` steps back by: a multiple of ``m``."""
    return m * ((_WRAP // 2) // m)


def _advance(step: Array, count: Array, n: int, m: int) -> Array:
    """``step`` (whose :func:`as_count` is ``count``) advanced by ``n``, wrapped."""
    new = count + n
    return S.where(new >= _WRAP, new - wrap_period(m), new).astype(step.dtype)


class _Slide(NamedTuple):
    """How the ``G`` window steps of one call share the ring buffer.

    Group ``i`` writes slot ``t_i mod m`` and reads the last ``m`` writes up
    to its own: the values of groups ``i − m < j ≤ i`` (``in_window``) and the
    slots no such group wrote (``old_kept``). A plain call is ``G = 1``.
    """

    in_window: Array  # [G, G]: group j's value is in group i's window
    old_kept: Array  # [G, m]: slot s still holds its value from before the call
    last: Array  # [G, m]: group j is the last to write slot s


def _slide(slot_mask: Array) -> _Slide:
    groups, m = slot_mask.shape
    if groups == 1:  # one window step (no ghost batches): nothing to slide
        return _Slide(cast(Array, np.ones((1, 1), bool)), ~slot_mask, slot_mask)
    i, j = jnp.arange(groups)[:, None], jnp.arange(groups)[None, :]
    in_window = (j <= i) & (j > i - m)
    old_kept = ~jnp.any(in_window[:, :, None] & slot_mask[None], axis=1)
    later = jnp.cumsum(slot_mask[::-1], 0)[::-1] - slot_mask  # writes after group j
    return _Slide(in_window, old_kept, slot_mask & (later == 0))


def _dot(mask: Array, v: Array) -> Array:
    """``Σ_b mask[a, b] · v[b]``, exactly (no reduced-precision matmul)."""
    return jnp.tensordot(mask.astype(v.dtype), v, axes=(1, 0), precision=lax.Precision.HIGHEST)


def _masked_sum(mask: Array, v: Array) -> Array:
    """``Σ_b v[a, b]`` over the ``b`` where ``mask[a, b]``."""
    return S.where(S.lead(mask, v), v, 0.0).sum(1)


def _written(sl: _Slide, window: Array, values: Array) -> Array:
    """One group's window with its value written, in the values' dtype: ``[m, *features]``."""
    return S.where(S.lead(sl.last[0], window), values, window.astype(values.dtype))


def _window_mean(sl: _Slide, window: Array, values: Array) -> Array:
    """Each group's window mean: ``[G, *features]``."""
    if values.shape[0] == 1:
        return _written(sl, window, values).mean(0, keepdims=True)
    m = window.shape[0]
    return (_dot(sl.in_window, values) + _dot(sl.old_kept, window.astype(values.dtype))) / m


def _final_window(sl: _Slide, window: Array, values: Array) -> Array:
    """The window after the call: each written slot holds its last writer's value."""
    if values.shape[0] == 1:
        return S.where(S.lead(sl.last[0], window), values.astype(window.dtype), window)
    written = sl.last.any(0)
    return S.where(S.lead(written, window), _dot(sl.last.T, values).astype(window.dtype), window)


def _step_window(sl: _Slide, window: Array, values: Array) -> tuple[Array, Array]:
    """(the window after the call, each group's window mean). The stored window
    takes no gradient: stopping it keeps reverse mode from tracing the state
    update a second time (as its linearization)."""
    if values.shape[0] == 1:
        written = _written(sl, window, values)
        return lax.stop_gradient(written).astype(window.dtype), written.mean(0, keepdims=True)
    return (
        _final_window(sl, window, lax.stop_gradient(values)),
        _window_mean(sl, window, values),
    )


def _spread(sl: _Slide, window: Array, values: Array, mu: Array) -> Array:
    """Each group's between-step variance of the window's values about ``mu``
    (its window mean), in two passes."""
    if values.shape[0] == 1:
        return jnp.square(_written(sl, window, values) - mu).mean(0, keepdims=True)
    m = window.shape[0]
    return (
        _masked_sum(sl.in_window, jnp.square(values[None] - mu[:, None]))
        + _masked_sum(sl.old_kept, jnp.square(window[None].astype(mu.dtype) - mu[:, None]))
    ) / m


def _forward_windows(state: MABNState, sl: _Slide, use_batch, mean_b, var_b):
    """New (mean, var) windows and each group's (μ̃, σ̃²) in use."""
    ub = lambda v: S.lead(use_batch, v)
    var_w, var_win = _step_window(sl, state.var_window, var_b)
    if mean_b is None or state.mean_window is None:  # plain (check_state: both or neither)
        return None, var_w, None, S.where(ub(var_b), var_b, var_win)
    mean_w, mu_win = _step_window(sl, state.mean_window, mean_b)
    spread = _spread(sl, state.mean_window, mean_b, mu_win)
    return (
        mean_w,
        var_w,
        S.where(ub(mean_b), mean_b, mu_win),
        S.where(ub(var_b), var_b, var_win + spread),
    )


class _Spec(NamedTuple):
    """Static description of one normalization call (hashable)."""

    reduction_axes: tuple[int, ...]
    feature_axes: tuple[int, ...]  # axis 0 (the groups) first
    out_dtype: Any
    config: MABNConfig
    recorded: bool = True  # probes given: the backward statistics can leave the VJP


class _Ctx(NamedTuple):
    """Per-group, per-channel values of one step. The custom VJP treats them as
    constants, but they stay differentiable functions of x, so second-order
    derivatives see how the statistics move with x."""

    mean: Array | None  # μ̃ (centered) or None
    inv: Array  # 1 / sqrt(σ̃² + ε)
    r: Array
    d: Array | None
    psi_window: Array  # windows as before this step
    g_window: Array | None
    slot_mask: Array  # [G, m]
    use_batch: Array  # [G]
    count: Array  # type: ignore[assignment]  # examples per statistic (shadows tuple.count)
    mask: Array | None


def mabn_train(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    state: MABNState,
    probes: Probes | None,
    config: MABNConfig,
    *,
    axis: int | Sequence[int] = -1,
    dtype: Any = None,
    mask: Array | None = None,
) -> tuple[Array, MABNState]:
    """One MABN training step: returns ``(y, new_state)``.

    ``new_state`` holds the advanced step, the forward windows and the EMAs,
    with this step's Ψ (g) slots reserved; :func:`record_backward_stats` fills
    them from the gradient w.r.t. ``probes``. ``y`` is differentiable w.r.t.
    ``x``, ``scale``, ``bias`` and ``probes``, in reverse mode (and
    forward-over-reverse for second derivatives).

    A step whose batch statistics are not finite leaves the state as it was,
    with ``skipped`` one higher, and its output is NaN (so loss guards see it).

    Ghost batches (``config.norm_batch_size``): axis 0 is split into ``G``
    groups of consecutive examples, each normalized with its own statistics
    and counting as one window step (group ``i`` is step ``step + 1 + i``); the
    windows slide across groups and calls. ``config.ghost_ema`` picks the EMA
    rule.

    Args:
      x: input of rank >= 2, any float dtype.
      scale, bias: ``γ`` and ``β`` of shape ``[*features]``, or ``None``.
      state: from :func:`init_state` or a previous step.
      probes: from :func:`init_probes`; differentiate w.r.t. them. ``None``: a
        step that nothing differentiates (a plain forward): the forward
        statistics advance, the Ψ (g) slots take the window's mean before the
        step (its own estimate) instead of being reserved, and differentiating
        the output raises at trace time.
      config: the layer's hyper-parameters.
      axis: the feature axis or axes (default last, NHWC).
      dtype: output dtype (default: the input's).
      mask: optional boolean array broadcastable to ``x``: the entries the
        statistics are computed from (as in ``nn.BatchNorm``).

    Returns:
      ``(y, new_state)``: the output, in ``dtype``, and the advanced state.

    Raises:
      TypeError: ``x`` is not a float array.
      ValueError: ``x`` does not fit ``axis`` (or is an empty batch); the
        state or probes are not this layer's (variant, window or feature
        shape), or the state is below float32.

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax.functional as F
      >>> config = F.MABNConfig(buffer_size=4)
      >>> state = F.init_state((2,), config)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> scale, bias = jnp.ones(2), jnp.zeros(2)
      >>> y, new_state = F.mabn_train(x, scale, bias, state, F.init_probes(state), config)
      >>> y.shape, int(new_state.step)
      ((4, 2), 1)
    """
    y, new_state, _ = mabn_train_with_stats(
        x, scale, bias, state, probes, config, axis=axis, dtype=dtype, mask=mask
    )
    return y, new_state


def mabn_train_with_stats(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    state: MABNState,
    probes: Probes | None,
    config: MABNConfig,
    *,
    axis: int | Sequence[int] = -1,
    dtype: Any = None,
    mask: Array | None = None,
) -> tuple[Array, MABNState, dict[str, Array]]:
    """:func:`mabn_train` that also returns the step's forward statistics.

    ``stats`` maps names to per-channel arrays (a leading ``[G]`` axis with
    ghost batches). Plain: ``chi2_B`` (χ²_B), ``chi2`` (χ̃² used to
    normalize), ``ema_x2`` (the EMA ``r`` is measured against), ``r``.
    Centered: ``mu_B``, ``sigma2_B``, ``mu``, ``sigma2``, ``ema_mean``,
    ``ema_var``, ``r``, ``d``.

    Args:
      x, scale, bias, state, probes, config, axis, dtype, mask: as for
        :func:`mabn_train`.

    Returns:
      ``(y, new_state, stats)``.

    Raises:
      TypeError, ValueError: as :func:`mabn_train`.

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax.functional as F
      >>> config = F.MABNConfig(buffer_size=4)
      >>> state = F.init_state((2,), config)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> scale, bias = jnp.ones(2), jnp.zeros(2)
      >>> y, new_state, stats = F.mabn_train_with_stats(x, scale, bias, state, None, config)
      >>> sorted(stats)
      ['chi2', 'chi2_B', 'ema_x2', 'r']
    """
    x = jnp.asarray(x)
    feature_axes = S.canonicalize_axes(x.ndim, axis, _LAYER)
    # Traced (inside a jit, grad, scan...): the cached per-layer jit. Eagerly, op by
    # op, as any eager JAX code runs (and with its rounding).
    step = _train_step if isinstance(x, jax.core.Tracer) else _train_body
    try:
        return step(x, scale, bias, state, probes, mask, config, feature_axes, dtype)
    except TypeError as e:  # jax.jvp reaches the custom VJP through the jit
        if not _upstream.is_forward_mode_error(e):
            raise
        raise TypeError(_FORWARD_MODE) from None


# One jitted step per (shapes, config): a model's layers of one shape and
# configuration are traced once, and JAX reuses that trace (and its derivatives)
# for every other call, so tracing a deep model costs about one layer per shape.
def _train_body(x, scale, bias, state, probes, mask, config, axis, dtype):
    """:func:`mabn_train_with_stats` with canonical ``axis`` (static: config, axis, dtype)."""
    feature_axes = axis
    S.check_input(x, S.other_axes(x.ndim, feature_axes), _LAYER)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    check_state(state, config, feature_shape)
    recorded = probes is not None
    if probes is not None:
        _check_probes(probes, state)
    else:  # nothing can record this step's Ψ_B: see _UNRECORDED
        probes = init_probes(state)
    cfg = config
    split = S.split_groups(x, feature_axes, cfg.norm_batch_size, _LAYER, mask)
    ghost = split.groups > 1
    split = S.with_group_axis(split)  # [G, ...]: one code path for G = 1 too
    sdt = S.stat_dtype(x.dtype, state.var_window.dtype, cfg.force_float32_reductions)
    mean_b, var_b = S.moments(
        split.x.astype(sdt),
        split,
        use_mean=cfg.centered,
        use_fast_variance=cfg.use_fast_variance,
        axis_name=cfg.axis_name,
        axis_index_groups=cfg.axis_index_groups,
    )
    var_b, empty = S.fill_empty(split, var_b, state.ema_var)
    mean_b, _ = S.fill_empty(split, mean_b, state.ema_mean)
    count = as_count(state.step)
    t = count + 1 + jnp.arange(split.groups)
    phase = _phase(t, cfg)
    sl = _slide(phase.slot_mask)
    mean_w, var_w, mean, var = _forward_windows(state, sl, phase.use_batch, mean_b, var_b)
    (ema_var, ema_var_used), (ema_mean, ema_mean_used) = _emas(
        state, *lax.stop_gradient((var, mean)), ghost, cfg
    )
    r, d = S.renorm_factors(
        var,
        ema_var_used,
        mean,
        ema_mean_used,
        r_max=cfg.r_max,
        d_max=cfg.d_max,
        epsilon=cfg.epsilon,
        active=phase.renorm,
        stop_gradient=False,
    )  # constants to the VJP, not to 2nd order

    # An unrecorded (reserved) slot or a poisoned state shows in psi_window: NaN output.
    healthy = S.all_finite(state.psi_window)
    ok = S.all_finite(mean_b, var_b)
    ok = ok if empty is False else ok & ~empty  # this step's statistics
    finite = jnp.isfinite(var) if mean is None else jnp.isfinite(var) & jnp.isfinite(mean)
    bad = ~(finite & healthy)
    inv = S.where(bad, jnp.nan, lax.rsqrt(var + cfg.epsilon))
    written = sl.last.any(0)
    # The slots this step's Ψ_B (g_B) will fill are reserved (NaN). Without probes
    # they take the window's own estimate instead: its mean before the step.
    fill = (lambda w: jnp.nan) if recorded else (lambda w: w.mean(0, keepdims=True))
    reserve = lambda w: S.where(S.lead(written, w), fill(w), w)
    new_state = MABNState(
        _advance(state.step, count, split.groups, cfg.window),
        var_w,
        reserve(state.psi_window),
        ema_var,
        state.skipped,
        mean_w,
        None if state.g_window is None else reserve(state.g_window),
        ema_mean,
    )
    new_state = S.select(ok, new_state, state._replace(skipped=state.skipped + 1))

    ctx = _Ctx(
        mean,
        inv,
        r,
        d,
        state.psi_window,
        state.g_window,
        phase.slot_mask,
        phase.use_batch,
        _count(split, sdt),
        split.mask,
    )
    check_probes_vary(probes.psi, inv, cfg.axis_name)
    scale, bias = S.affine_params(scale, bias, feature_shape, sdt)
    x_axes = varying_axes(x)
    in_backward = _sync_in_backward(cfg, x_axes)
    # Synchronized in the backward pass: γ, β stay replicated over the synchronized
    # axes, and their gradients come from that pass's all-reduce (see _normalize_bwd).
    param_axes = x_axes - frozenset(_axis_names(cfg.axis_name)) if in_backward else x_axes
    scale, bias = vary_like(scale, param_axes), vary_like(bias, param_axes)
    spec = _Spec(
        split.reduction_axes, split.feature_axes, jnp.dtype(dtype or x.dtype), cfg, recorded
    )
    normalize = _normalize if cfg.axis_name is None or in_backward else _normalize_named
    y = normalize(spec, split.x, scale, bias, probes, ctx)
    squeeze = (lambda v: v) if ghost else (lambda v: v[0])
    stats: dict[str, Any]  # Arrays (mean_b, mean, d are not None when centered)
    if cfg.centered:
        stats = dict(
            mu_B=mean_b,
            sigma2_B=var_b,
            mu=mean,
            sigma2=var,
            ema_mean=ema_mean_used,
            ema_var=ema_var_used,
            r=r,
            d=d,
        )
    else:
        stats = dict(chi2_B=var_b, chi2=var, ema_x2=ema_var_used, r=r)
    return y.reshape(x.shape), new_state, {k: squeeze(v) for k, v in stats.items()}


_train_step = jax.jit(_train_body, static_argnums=(6, 7, 8))


def _count(split: S.Split, dtype) -> Array:
    """Examples per statistic; at least 1, so that a fully masked (skipped)
    batch divides its zero backward sums by 1, not 0."""
    n = S.count(split)
    return jnp.asarray(n if split.mask is None else jnp.maximum(n, 1), dtype)


def _emas(state: MABNState, var, mean, ghost: bool, cfg: MABNConfig):
    """((new ema_var, ema_var r sees), (new ema_mean, ema_mean d sees)), the
    latter per group."""

    def track(old, new):
        if old is None:
            return None, None
        if ghost and cfg.ghost_ema == "step":
            # The authors' simulated-small-batch layer: one update per call with the
            # groups' mean, which the first call takes as the EMA outright.
            target = new.mean(0)
            updated = S.where(
                as_count(state.step) == 0,
                target.astype(old.dtype),
                S.ema(old, target, cfg.momentum),
            )
            return updated, jnp.broadcast_to(old, new.shape)
        return S.ema_per_group(old, new, cfg.momentum, grouped=True)

    return track(state.ema_var, var), track(state.ema_mean, mean)


def _z(x: Array, ctx: _Ctx, spec: _Spec, dtype) -> Array:
    b = functools.partial(S.bshape, ndim=x.ndim, feature_axes=spec.feature_axes)
    xs = x.astype(dtype)
    if ctx.mean is not None:
        xs = xs - b(ctx.mean)
    return xs * b(ctx.inv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _normalize(spec: _Spec, x, scale, bias, probes, ctx):
    return _normalize_fwd(spec, x, scale, bias, probes, ctx)[0]


def _normalize_fwd(spec: _Spec, x, scale, bias, probes, ctx):
    dtype = ctx.inv.dtype
    b = functools.partial(S.bshape, ndim=x.ndim, feature_axes=spec.feature_axes)
    a = scale * ctx.r
    shift = jnp.broadcast_to(bias, a.shape)
    if ctx.d is not None:
        shift = shift + scale * ctx.d
    y = (_z(x, ctx, spec, dtype) * b(a) + b(shift)).astype(spec.out_dtype)
    return y, (x, scale, bias, probes, ctx)


def _normalize_bwd(spec: _Spec, res, dy):
    x, scale, bias, probes, ctx = res
    sums, dscale, dbias = _local_sums(spec, res, dy)
    name = spec.config.axis_name
    if name is not None:  # synchronized over shard_map axes (_sync_in_backward)
        # One all-reduce serves both: the mean of the devices' sums normalizes, and
        # γ, β (replicated over these axes) take its total as their gradient.
        sums = lax.pmean(sums, name)
        devices = lax.psum(1, name)
        dscale, dbias = (
            (devices * v.reshape((-1,) + v.shape[-len(scale.shape) :]).sum(0)).astype(p.dtype)
            for v, p in zip(sums, (scale, bias))
        )
    dx, dprobes = _finish(spec, x, scale, probes, ctx, dy, sums)
    return dx, dscale, dbias, dprobes, jax.tree_util.tree_map(lambda _: None, ctx)


def _axis_names(axis_name) -> tuple:
    return () if axis_name is None else axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _sync_in_backward(cfg: MABNConfig, x_axes: frozenset) -> bool:
    """Whether the backward sums can be synchronized inside the backward pass:
    the axes are ``shard_map``'s (bound wherever the gradient is taken) and the
    whole axis is averaged. Otherwise (``vmap``/``pmap`` axes, which a gradient
    taken outside them no longer binds, or ``axis_index_groups``) the two-stage
    path below is used."""
    names = _axis_names(cfg.axis_name)
    return bool(names) and cfg.axis_index_groups is None and set(names) <= x_axes


def _local_sums(spec: _Spec, res, dy):
    """(this device's backward sums; dγ; dβ).

    The sums are ``(r·Σdy·z + d·Σdy, Σdy)`` per group, i.e. the groups' own
    dγ and dβ: with one group they *are* dγ and dβ, so under ``shard_map``
    the all-reduce that synchronizes them also gives the replicated γ's and
    β's gradients (:func:`_normalize_bwd`), with no all-reduce of its own.
    """
    if not spec.recorded:
        raise ValueError(_UNRECORDED)
    x, scale, bias, probes, ctx = res
    dtype = ctx.inv.dtype
    b = functools.partial(S.bshape, ndim=x.ndim, feature_axes=spec.feature_axes)
    dy = dy.astype(dtype)
    sum_dy = dy.sum(spec.reduction_axes)
    # Σ dy·z = inv · Σ dy·(x − μ̃): scaling after the reduction lets XLA fuse it
    # into one pass over (x, dy) instead of materializing z first. The barrier
    # keeps μ̃'s (per-channel) select out of that fusion; otherwise XLA CPU
    # writes x − μ̃ to memory before reducing.
    xc = (
        x.astype(dtype)
        if ctx.mean is None
        else x.astype(dtype) - b(lax.optimization_barrier(ctx.mean))
    )
    dscale = ctx.r * ((dy * xc).sum(spec.reduction_axes) * ctx.inv)
    if ctx.d is not None:
        dscale = dscale + ctx.d * sum_dy
    dscale_all, dbias_all = dscale.sum(0), sum_dy.sum(0)  # γ and β are shared by all groups
    # The sums stay in the statistics' dtype: Ψ_B and g_B are made from them.
    sums = (dscale_all, dbias_all) if dscale.shape[0] == 1 else (dscale, sum_dy)
    return sums, dscale_all.astype(scale.dtype), dbias_all.astype(bias.dtype)


def _finish(spec: _Spec, x, scale, probes, ctx, dy, sums, probe_weight=None):
    """(dx, probe cotangents) from the synchronized sums of :func:`_local_sums`."""
    dtype = ctx.inv.dtype
    b = functools.partial(S.bshape, ndim=x.ndim, feature_axes=spec.feature_axes)
    z = _z(x, ctx, spec, dtype)
    dy = dy.astype(dtype)
    a = scale * ctx.r
    keep = (lambda v: v) if ctx.mask is None else (lambda v: S.where(ctx.mask, v, 0.0))
    sl = _slide(ctx.slot_mask)
    weight = (lambda v: v) if probe_weight is None else (lambda v: v * probe_weight)

    def windowed(window, total):
        """(the step's statistic in use, the probe cotangent)."""
        value = total / ctx.count  # Ψ_B or g_B (times the loss scale)
        if probes.loss_scale is not None:  # the stored windows are unscaled
            window = (window * probes.loss_scale).astype(window.dtype)
        used = S.where(S.lead(ctx.use_batch, value), value, _window_mean(sl, window, value))
        return used, weight(_final_window(sl, jnp.zeros_like(window), replicate(value)))

    def replicate(value):
        # Under shard_map the statistic can be typed as varying over axes where it is
        # equal (the two-stage path's averaged sums) or not (a per-device mask
        # count); a state (probe) replicated over those axes takes their mean.
        extra = tuple(sorted(varying_axes(value) - varying_axes(probes.psi)))
        return lax.pmean(value, extra) if extra else value

    sum_dscale, sum_dy = (v.astype(dtype).reshape(ctx.inv.shape) for v in sums)
    # a·Σdy·z = γ·(dγ − d·Σdy) and a·Σdy = γ·r·Σdy, with a = γ·r.
    sum_dyz = sum_dscale if ctx.d is None else sum_dscale - ctx.d * sum_dy
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
    first = lax.stop_gradient(sums.reshape(-1)[0])
    one = jnp.ones_like(first)
    return jnp.broadcast_to(S.where(first == first, one, one), shape)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


# With a named axis the synchronized backward sums must come from a collective
# that is bound wherever the forward's is: under jax.vmap / nnx.vmap with the
# gradient taken outside the vmap, a lax.pmean inside a custom VJP's backward
# runs after the vmap's axis is gone. So the step is split in two custom VJPs
# around a forward pmean of zeros, whose transpose is the pmean of the backward
# sums (the way nn.BatchNorm's own backward reductions arise):
#   x ─ _enter ─→ (x, 0) ─→ (x, pmean(0)) ─ _normalize_synced ─→ y
# _normalize_synced's backward returns this device's sums as the cotangent of
# pmean(0) and passes dy on as x's; _enter's backward receives them averaged.


def _normalize_named(spec: _Spec, x, scale, bias, probes, ctx):
    cfg = spec.config
    axes = varying_axes(x)
    x1, zeros = _enter(spec, x, scale, probes, ctx, _probe_weight(x, probes.psi))
    synced = tuple(vary_like(S.pmean(z, cfg.axis_name, cfg.axis_index_groups), axes) for z in zeros)
    return _normalize_synced(spec, x1, scale, bias, ctx, synced)


def _carry_dtype(spec: _Spec, x):
    return jnp.promote_types(x.dtype, spec.out_dtype)  # dy travels as x's cotangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _enter(spec: _Spec, x, scale, probes, ctx, probe_weight):
    return _enter_fwd(spec, x, scale, probes, ctx, probe_weight)[0]


def _enter_fwd(spec: _Spec, x, scale, probes, ctx, probe_weight):
    # Zeros that vary (are batched) like x: their pmean then transposes to the mean
    # of the per-instance sums, not to their total.
    # Shaped like the sums of _local_sums: γ's shape with one group.
    first = lax.stop_gradient(x.reshape(-1)[0])
    shape = ctx.inv.shape[1:] if ctx.inv.shape[0] == 1 else ctx.inv.shape
    zero = jnp.zeros(shape, ctx.inv.dtype) + S.where(first == first, 0.0, 0.0).astype(ctx.inv.dtype)
    zeros = (vary_like(zero, varying_axes(x)),) * 2
    out = (x.astype(_carry_dtype(spec, x)), zeros)
    return out, (x, scale, probes, ctx, probe_weight)


def _enter_bwd(spec: _Spec, res, cts):
    x, scale, probes, ctx, probe_weight = res
    dy, sums = cts
    dx, dprobes = _finish(spec, x, scale, probes, ctx, dy, sums, probe_weight)
    # γ's gradient comes from _normalize_synced (it is an input here only for ĝ).
    return (dx, jnp.zeros_like(scale), dprobes, jax.tree_util.tree_map(lambda _: None, ctx), None)


_enter.defvjp(_enter_fwd, _enter_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _normalize_synced(spec: _Spec, x, scale, bias, ctx, synced):
    return _normalize_fwd(spec, x, scale, bias, None, ctx)[0]


def _normalize_synced_fwd(spec: _Spec, x, scale, bias, ctx, synced):
    y, res = _normalize_fwd(spec, x, scale, bias, None, ctx)
    return y, res


def _normalize_synced_bwd(spec: _Spec, res, dy):
    x, scale, bias, _, ctx = res
    sums, dscale, dbias = _local_sums(spec, res, dy)
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


def _check_probes(probes: Probes, state: MABNState) -> None:
    for name, probe, window in (
        ("psi", probes.psi, state.psi_window),
        ("g", probes.g, state.g_window),
    ):
        if (probe is None) != (window is None) or (
            probe is not None and window is not None and tuple(probe.shape) != tuple(window.shape)
        ):
            got = None if probe is None else tuple(probe.shape)
            want = None if window is None else tuple(window.shape)
            lifted = got and want and len(got) > len(want) and got[-len(want) :] == want
            fix = (
                "the probes have leading axes the state lacks: under nn.scan/nn.vmap, "
                "lift params over the same axes as batch_stats (e.g. variable_axes="
                "{'params': 0, 'batch_stats': 0}), as value_and_grad puts the probes in "
                "params"
                if lifted
                else "build the probes from this layer's own state with init_probes(state) "
                "(or mabn_jax.init_probes(batch_stats) for a model)"
            )
            raise ValueError(
                f"MABN: probe {name!r} has shape {got} but this layer's window is {want}; {fix}."
            )


def inference_affine(
    scale: Array, bias: Array, state: MABNState, epsilon: float
) -> tuple[Array, Array]:
    """``(a, c)`` such that inference is ``y = a · x + c`` per channel.

    Args:
      scale, bias: ``γ`` and ``β``, shaped like the features.
      state: the layer's state (its EMAs).
      epsilon: the layer's ``ε``.

    Returns:
      ``(a, c)``, per channel.

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax.functional as F
      >>> config = F.MABNConfig(buffer_size=4)
      >>> state = F.init_state((2,), config)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> scale, bias = jnp.ones(2), jnp.zeros(2)
      >>> a, c = F.inference_affine(jnp.full(2, 2.0), bias, state, epsilon=0.0)
      >>> a, c
      (Array([2., 2.], dtype=float32), Array([0., 0.], dtype=float32))
    """
    return affine_from_ema(scale, bias, state.ema_var, state.ema_mean, epsilon)


def affine_from_ema(
    scale: Array, bias: Array, ema_var: Array, ema_mean: Array | None, epsilon: float
) -> tuple[Array, Array]:
    """``a = γ / sqrt(ema_var + ε)``, ``c = β − a · ema_mean`` (``β`` without a mean)."""
    a = scale * lax.rsqrt(ema_var.astype(scale.dtype) + epsilon)
    if ema_mean is None:
        return a, bias
    return a, bias - a * ema_mean.astype(scale.dtype)


def mabn_inference(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    state: MABNState,
    config: MABNConfig,
    *,
    axis: int | Sequence[int] = -1,
    dtype: Any = None,
) -> Array:
    """The inference map: ``y = γ · (x − ema_mean) / sqrt(ema_var + ε) + β``
    (``ema_mean = 0`` for the plain layer), one per-channel affine function.

    Args:
      x, scale, bias, state, config, axis, dtype: as for :func:`mabn_train`.

    Returns:
      ``y``, in ``dtype`` (default: ``x``'s).

    Raises:
      TypeError: ``x`` is not a float array.
      ValueError: ``x`` does not fit ``axis``, or the state is not this
        layer's (variant or feature shape).

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax.functional as F
      >>> config = F.MABNConfig(buffer_size=4)
      >>> state = F.init_state((2,), config)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> scale, bias = jnp.ones(2), jnp.zeros(2)
      >>> y = F.mabn_inference(x, scale, bias, state, config)
      >>> bool(jnp.allclose(y, x / jnp.sqrt(1 + config.epsilon)))  # ema_var is 1 at the start
      True
    """
    x = jnp.asarray(x)
    feature_axes = S.canonicalize_axes(x.ndim, axis, _LAYER)
    S.check_input(x, (), _LAYER)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    check_state(state, config, feature_shape)
    sdt = S.stat_dtype(x.dtype, state.var_window.dtype)
    a, c = inference_affine(
        *S.affine_params(scale, bias, feature_shape, sdt), state, config.epsilon
    )
    b = functools.partial(S.bshape, ndim=x.ndim, feature_axes=feature_axes)
    return (x.astype(sdt) * b(a) + b(c)).astype(dtype or x.dtype)
