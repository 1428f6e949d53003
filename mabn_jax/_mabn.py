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
Every phase decision is traced (a select, or the weights of a masked sum): one
compilation serves all.

The code computes the same values in forms XLA compiles small: ``r`` as
``sqrt(clip((σ̃² + ε)/(ema_var + ε), 1/r_max², r_max²))``, one step's μ̃, σ̃²,
Ψ̃, g̃ as a weighted sum over the written window (the written row alone in the
batch phase), and ``y`` as ``(x − c)·f·γ + β`` with ``f = sqrt(r²/(σ̃² + ε))``,
``c = μ̃ − d/f`` (:mod:`mabn_jax._backward`). XLA computes a reduction, a
square root or a division once, where it copies cheap per-channel selects into
every fusion that reads them (``docs/benchmarks.md``, "One layer's graph").

Ψ_B and g_B exist only in the backward pass. They leave it as the cotangents of
window-shaped *probes*; the forward reserves their slots by writing NaN there,
and :func:`record_backward_stats` fills exactly the reserved slots. A state
whose slots were never filled makes the next training output NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mabn_jax import _backward, _synced, _upstream, _window
from mabn_jax import _stats as S
from mabn_jax._config import MABNConfig
from mabn_jax._sharding import check_probes_vary, vary_like, varying_axes
from mabn_jax._state import MABNState, Probes, check_state, init_probes

Array = jax.Array
_LAYER = "MABN"

_FORWARD_MODE = (
    "MABN in training mode supports reverse-mode differentiation only (jax.grad, jax.vjp, "
    "jax.jacrev, and forward-over-reverse: jax.hessian, jax.jvp of jax.grad). Forward mode "
    "(jax.jvp, jax.jacfwd) of the layer itself is undefined: its gradient uses moving "
    "averages of the backward statistics (a custom VJP), which no forward derivative "
    "matches. Use use_running_average=True (inference mode) for forward-mode derivatives."
)


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

    A step whose batch statistics are not finite gives a NaN output (so loss
    guards see it) and is undone: its recorded state is the state as it was,
    with ``skipped`` one higher. With probes, :func:`record_backward_stats`
    undoes it (``new_state`` marks its reserved slots ``+inf`` for that);
    without, ``new_state`` is already the undone state.

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
    y, new_state, _ = train(
        x, scale, bias, state, probes, config, axis=axis, dtype=dtype, mask=mask, with_stats=False
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
      >>> config = F.MABNConfig(buffer_size=4, centered=False)
      >>> state = F.init_state((2,), config)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> scale, bias = jnp.ones(2), jnp.zeros(2)
      >>> y, new_state, stats = F.mabn_train_with_stats(x, scale, bias, state, None, config)
      >>> sorted(stats)
      ['chi2', 'chi2_B', 'ema_x2', 'r']
    """
    return train(
        x, scale, bias, state, probes, config, axis=axis, dtype=dtype, mask=mask, with_stats=True
    )


def train(x, scale, bias, state, probes, config, *, axis, dtype, mask, with_stats: bool):
    """:func:`mabn_train_with_stats`, whose ``stats`` are ``{}`` unless ``with_stats``
    (the layers ask for them only where they can be sown)."""
    x = jnp.asarray(x)
    feature_axes = S.canonicalize_axes(x.ndim, axis, _LAYER)
    # Traced (inside a jit, grad, scan...): the cached per-layer jit. Eagerly, op by
    # op, as any eager JAX code runs (and with its rounding).
    step = _train_step if isinstance(x, jax.core.Tracer) else _train_body
    try:
        return step(x, scale, bias, state, probes, mask, config, feature_axes, dtype, with_stats)
    except TypeError as e:  # jax.jvp reaches the custom VJP through the jit
        if not _upstream.is_forward_mode_error(e):
            raise
        raise TypeError(_FORWARD_MODE) from None


class _Batch(NamedTuple):
    """Stage 1, the forward statistics of this call's groups (``[G, *features]``)."""

    split: S.Split  # x as [G, ...] groups (ghost batches), with its mask
    dtype: Any  # the statistics' dtype
    mean: Array | None  # μ_B (centered) or None
    var: Array  # σ²_B (plain: χ²_B)
    empty: Array | bool  # [G]: a fully masked group (False without a mask)


class _Windows(NamedTuple):
    """Stage 2, the window update: the statistics in use and the state's new fields."""

    phase: _window.Phase
    written: Array  # the slots the call writes: [R], or [R, *features] for one group
    rows: _window.Rows | None  # one group's window rows, else None
    mean_window: Array | None
    var_window: Array
    mean: Array | None  # μ̃
    var: Array  # σ̃² (plain: χ̃²)
    ema_var: Array  # the new EMAs, and the ones r, d are measured against
    ema_var_used: Array
    ema_mean: Array | None
    ema_mean_used: Array | None


def _forward_statistics(x, state: MABNState, mask, cfg: MABNConfig, feature_axes) -> _Batch:
    split = S.split_groups(x, feature_axes, cfg.norm_batch_size, _LAYER, mask)
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
    return _Batch(split, sdt, mean_b, var_b, empty)


def _update_windows(state: MABNState, batch: _Batch, cfg: MABNConfig, m: int) -> _Windows:
    groups = batch.split.groups
    count = _window.as_count(state.step)
    rows = state.var_window.shape[0]
    # One window step is read wrapped: it is then the new counter as it is.
    t = _window.wrap(count + 1, rows) if groups == 1 else count + 1 + jnp.arange(groups)
    phase = _window.phase(t, cfg, m, rows)
    sl = _window.slide(phase.slot_mask, phase.t, phase.use_batch, m, state.var_window.shape)
    mean_w, var_w, mean, var = _window.forward_windows(
        state, sl, phase.use_batch, batch.mean, batch.var
    )
    (ema_var, ema_var_used), (ema_mean, ema_mean_used) = _window.emas(
        state, var, mean, groups > 1, cfg
    )
    written = phase.slot_mask.any(0) if sl.rows is None else sl.rows.row
    return _Windows(
        phase,
        written,
        sl.rows,
        mean_w,
        var_w,
        mean,
        var,
        ema_var,
        ema_var_used,
        ema_mean,
        ema_mean_used,
    )


def _new_state(state: MABNState, batch: _Batch, w: _Windows, recorded: bool, cfg) -> MABNState:
    """The advanced state, with this step's Ψ (g) slots reserved for the record.

    A batch whose statistics are not finite must leave the state as it was, one
    more ``skipped``. With probes the record does that, in its one select per
    leaf: the reserved slots say which step it is (NaN: fill them; +inf: the
    forward failed, undo the step). Without probes nothing records the step, so
    the slots take the window's own estimate (its mean before the step) and the
    step is undone here."""

    # Per channel (no reduction over the features): the statistics are finite, and
    # the batch (with a mask) not empty. One group keeps its leading axis of 1.
    # σ²_B is finite only where μ_B is: a non-finite μ_B makes x − μ_B (or, in the
    # one-pass variance, E[x²]) non-finite, so σ²_B's flag says both.
    ok = jnp.isfinite(batch.var)
    ok = ok if batch.split.groups == 1 else ok.all(0)
    ok = ok if batch.empty is False else ok & ~batch.empty
    # Recorded: NaN slots to fill, +inf in the channels whose statistics failed.
    mark = S.where(ok, jnp.nan, jnp.inf) if recorded else None
    if mark is not None and w.rows is not None:  # laid out once for both windows
        mark = jnp.broadcast_to(mark, state.psi_window.shape)
    fill = (lambda v: mark) if recorded else (lambda v: v.mean(0, keepdims=True))
    reserve = lambda v: S.where_lead(w.written, fill(v), v)
    new = MABNState(
        _new_count(w.phase.t, state.var_window.shape[0]).astype(state.step.dtype),
        w.var_window,
        reserve(state.psi_window),
        w.ema_var,
        state.skipped,
        w.mean_window,
        None if state.g_window is None else reserve(state.g_window),
        w.ema_mean,
    )
    if recorded:
        return new
    return S.select(ok.all(), new, state._replace(skipped=state.skipped + 1))


def _new_count(t: Array, rows: int) -> Array:
    """The counter after a call's window steps ``t``: the last, wrapped (one step:
    ``t``, read wrapped)."""
    return t if t.ndim == 0 else _window.wrap(t[-1], rows)


def _renormalization(state: MABNState, w: _Windows, cfg: MABNConfig):
    """Stage 3: ``(1/sqrt(σ̃² + ε), r, d, r/sqrt(σ̃² + ε))``. An unrecorded
    (reserved) slot or a poisoned state shows in ``psi_window``: the output is
    NaN then."""
    r2, d = S.renorm_factors(
        w.var,
        w.ema_var_used,
        w.mean,
        w.ema_mean_used,
        r_max=cfg.r_max,
        d_max=cfg.d_max,
        epsilon=cfg.epsilon,
        active=w.phase.renorm,
        stop_gradient=False,
        squared=True,
    )  # constants to the VJP, not to 2nd order
    # NaN in, before the rsqrt (which XLA computes once), not a select after it
    # (which XLA would copy into every fusion that reads 1/σ̃).
    if w.rows is not None:  # one group: σ̃² is NaN already where the Ψ window is not
        # finite (and where μ̃ is not: it enters σ̃²); + (v − v) makes an infinite σ̃² NaN.
        var = w.var + (w.var - w.var)
    else:
        ok = jnp.isfinite(w.var) & S.all_finite(state.psi_window)
        ok = ok if w.mean is None else ok & jnp.isfinite(w.mean)
        var = S.where(ok, w.var, jnp.nan)
    var = var + cfg.epsilon
    # The forward's factor as one square root: where only it is needed (no input
    # gradient), XLA computes neither r nor 1/σ̃ on their own.
    return lax.rsqrt(var), jnp.sqrt(r2), d, jnp.sqrt(r2 / var)


def _apply_backward_rule(x, scale, bias, state, probes, batch, w, norm, spec) -> Array:
    """Stage 4: ``y`` through the custom VJP (:mod:`mabn_jax._backward`; with a
    named axis that the backward pass cannot bind, :mod:`mabn_jax._synced`)."""
    cfg = spec.config
    inv, r, d, factor = norm
    ctx = _backward.Ctx(
        w.mean,
        inv,
        r,
        d,
        factor,
        state.psi_window,
        state.g_window,
        w.phase.slot_mask,
        w.phase.t,
        w.phase.use_batch,
        _count(batch.split, batch.dtype),
        batch.split.mask,
        w.rows,
    )
    check_probes_vary(probes.psi, inv, cfg.axis_name)
    x_axes = varying_axes(x)
    in_backward = _synced.sync_in_backward(cfg, x_axes)
    # Synchronized in the backward pass: γ, β stay replicated over the synchronized
    # axes, and their gradients come from that pass's all-reduce.
    param_axes = x_axes - frozenset(_synced.axis_names(cfg.axis_name)) if in_backward else x_axes
    scale, bias = vary_like(scale, param_axes), vary_like(bias, param_axes)
    # γ and β laid out per group once, for both passes (the VJP gives each group's
    # gradient; the broadcast's transpose adds them up).
    scale, bias = (
        lax.broadcast_in_dim(p, inv.shape, tuple(range(1, inv.ndim))) for p in (scale, bias)
    )
    named = cfg.axis_name is not None and not in_backward
    normalize = _synced.normalize_named if named else _backward.normalize
    return normalize(spec, batch.split.x, scale, bias, probes, ctx)


def _named_stats(batch: _Batch, w: _Windows, r, d, cfg: MABNConfig) -> dict[str, Array]:
    """The forward statistics by name (``[G]`` leading with ghost batches only)."""
    stats: dict[str, Any]  # Arrays (the centered entries are not None when centered)
    if cfg.centered:
        stats = dict(
            mu_B=batch.mean,
            sigma2_B=batch.var,
            mu=w.mean,
            sigma2=w.var,
            ema_mean=w.ema_mean_used,
            ema_var=w.ema_var_used,
            r=r,
            d=d,
        )
    else:
        stats = dict(chi2_B=batch.var, chi2=w.var, ema_x2=w.ema_var_used, r=r)
    squeeze = (lambda v: v) if batch.split.groups > 1 else (lambda v: v[0])
    return {k: squeeze(v) for k, v in stats.items()}


def _train_body(x, scale, bias, state, probes, mask, config, axis, dtype, with_stats):
    """:func:`train` with canonical ``axis`` (static: config, axis, dtype,
    with_stats), in its four stages."""
    S.check_input(x, S.other_axes(x.ndim, axis), _LAYER)
    feature_shape = tuple(x.shape[a] for a in axis)
    m = config.window_length(positions(x.shape, axis))
    check_state(state, config, feature_shape, window=m)
    recorded = probes is not None
    if probes is not None:
        _check_probes(probes, state)
    else:  # nothing can record this step's Ψ_B: see _backward.UNRECORDED
        probes = init_probes(state)
    batch = _forward_statistics(x, state, mask, config, axis)
    windows = _update_windows(state, batch, config, m)
    new_state = _new_state(state, batch, windows, recorded, config)
    norm = _renormalization(state, windows, config)
    scale, bias = S.affine_params(scale, bias, feature_shape, batch.dtype)
    out_dtype = jnp.dtype(dtype or x.dtype)
    spec = _backward.Spec(
        batch.split.reduction_axes, batch.split.feature_axes, out_dtype, config, m, recorded
    )
    y = _apply_backward_rule(x, scale, bias, state, probes, batch, windows, norm, spec)
    stats = _named_stats(batch, windows, *norm[1:3], config) if with_stats else {}
    # One group: the group axis off as a squeeze (its transpose, dy's, a broadcast).
    y = lax.squeeze(y, (0,)) if batch.split.groups == 1 else y.reshape(x.shape)
    return y, new_state, stats


# One jitted step per (shapes, config): a model's layers of one shape and
# configuration are traced once, and JAX reuses that trace for every other call,
# so a deep model's trace does not redo each layer's Python. inline=True: the
# cached trace is inlined into the caller's jaxpr (its derivatives are then taken
# per layer), so XLA sees the layer as if it were written out. Kept as a call, the
# jit halved the trace time but cost the ResNet-50 pod step 0.8 % more bytes per
# chip (the call's linearization returns residuals that XLA then keeps).
_train_step = jax.jit(_train_body, static_argnums=(6, 7, 8, 9), inline=True)


def positions(shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> int:
    """Values per channel of one example (:meth:`~mabn_jax.MABNConfig.window_length`): the
    product of the reduced axes but the batch's (0)."""
    return math.prod(n for a, n in enumerate(shape) if a and a not in feature_axes)


def _count(split: S.Split, dtype) -> Array:
    """Examples per statistic; at least 1, so that a fully masked (skipped)
    batch divides its zero backward sums by 1, not 0."""
    n = S.count(split)
    return jnp.asarray(n if split.mask is None else jnp.maximum(n, 1), dtype)


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
