"""The MABN math: state, training forward pass with a custom VJP, inference.

Everything here is a pure function of explicit arrays; the Flax modules in
:mod:`mabn_jax.linen` are thin shells around it. Notation follows
``MABN_SPEC.md`` (Yan et al., ICLR 2020, arXiv 2001.06838). For a training step
``t = step + 1`` with window length ``m`` and ``slot = t mod m``:

Non-centered MABN (the paper's final layer, used after weight-centralized
convolutions)::

    χ²_B = mean(x²)                       x2_window[slot] = χ²_B
    χ̃²  = χ²_B if batch phase else mean(x2_window)
    z    = x / sqrt(χ̃² + ε)
    r    = clip(sqrt(χ̃² + ε) / sqrt(ema_x2 + ε), 1/r_max, r_max)   (1 before renorm)
    y    = γ · r · z + β                  ema_x2 ← α·ema_x2 + (1 − α)·χ̃²

    backward:  ĝ = ∂L/∂y · γ · r,   Ψ_B = mean(ĝ · z),   psi_window[slot] = Ψ_B
               Ψ̃ = Ψ_B if batch phase else mean(psi_window)
               ∂L/∂x = (ĝ − z · Ψ̃) / sqrt(χ̃² + ε)

Centered MABN (all four statistics moving-averaged)::

    z = (x − μ̃) / sqrt(σ̃² + ε),   y = γ · (r · z + d) + β,
    d = clip((μ̃ − ema_mean) / sqrt(ema_var + ε), −d_max, d_max)   (0 before renorm)
    ∂L/∂x = (ĝ − g̃ − z · Ψ̃) / sqrt(σ̃² + ε),   g_B = mean(ĝ)

"Batch phase" means ``t ≤ m or t < warmup_steps``: the current batch's
statistics are used directly. Renormalization is active for
``t > max(renorm_start, warmup_steps)``. All phase decisions are traced
``jnp.where`` selections, so one compiled step serves every phase.

The backward statistics Ψ_B (and g_B) exist only in the backward pass. They
leave it as the cotangents of *probe* inputs (:class:`Probes`), whose forward
value is unused; :func:`record_backward_stats` writes them into the windows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Axes = int | Sequence[int]

__all__ = [
    "MABNConfig",
    "MABNState",
    "CenteredMABNState",
    "Probes",
    "init_state",
    "init_probes",
    "mabn_train",
    "mabn_train_with_stats",
    "num_groups",
    "mabn_inference",
    "record_backward_stats",
    "canonicalize_axes",
    "check_input",
    "state_from_mapping",
]


@dataclasses.dataclass(frozen=True)
class MABNConfig:
    """Hyper-parameters of one MABN layer (static: changing one recompiles).

    Attributes:
      buffer_size: ``m``, the number of steps in the simple-moving-average
        windows (the paper: real batch / normalization batch, 16 for ImageNet).
      momentum: EMA decay ``α``: ``ema ← α·ema + (1 − α)·batch`` (Flax's
        convention; the original's 0.98).
      epsilon: added to the second moment / variance before the square root.
      warmup_steps: for ``t < warmup_steps`` the batch statistics are used.
      renorm_start: renormalization by ``r`` (and ``d``) starts after step
        ``max(renorm_start, warmup_steps)``.
      r_max: ``r`` is clipped to ``[1/r_max, r_max]``.
      d_max: centered variant only, ``d`` is clipped to ``[−d_max, d_max]``.
      centered: ``False`` for the paper's final MABN (second moment only,
        backward Ψ only); ``True`` to also moving-average μ and g.
      axis_name: if given, batch statistics are averaged over this named axis
        (``pmap``/``shard_map``) in the forward pass and Ψ_B/g_B in the
        backward pass, as synchronized batch norm does.
      axis_index_groups: subgroups of ``axis_name`` to average over.
      skip_nonfinite: if True, a training step whose batch statistics (χ²_B,
        μ_B, σ²_B forward; Ψ_B, g_B backward) are not all finite leaves the
        windows, the EMA and ``step`` as they were and counts the step in
        ``skipped`` instead (the step's output may still be non-finite).
    """

    buffer_size: int = 16
    momentum: float = 0.98
    epsilon: float = 1e-5
    warmup_steps: int = 100
    renorm_start: int = 1000
    r_max: float = 5.0
    d_max: float = 5.0
    centered: bool = False
    axis_name: str | None = None
    axis_index_groups: Any = None
    skip_nonfinite: bool = True

    def __post_init__(self):
        _check(isinstance(self.buffer_size, int) and self.buffer_size >= 1,
               "buffer_size", self.buffer_size, "an int >= 1 (the window length m)")
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum,
               "a decay in [0, 1), e.g. 0.98 (Flax's convention: new = momentum*old + (1-momentum)*batch)")
        _check(self.epsilon > 0.0, "epsilon", self.epsilon, "a small positive float such as 1e-5")
        _check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
               "warmup_steps", self.warmup_steps, "an int >= 0")
        _check(isinstance(self.renorm_start, int) and self.renorm_start >= 0,
               "renorm_start", self.renorm_start, "an int >= 0")
        _check(self.r_max >= 1.0, "r_max", self.r_max, "a float >= 1 (r is clipped to [1/r_max, r_max])")
        _check(self.d_max >= 0.0, "d_max", self.d_max, "a float >= 0 (d is clipped to [-d_max, d_max])")
        if self.axis_index_groups is not None:  # keep the config hashable
            groups = tuple(tuple(int(i) for i in g) for g in self.axis_index_groups)
            object.__setattr__(self, "axis_index_groups", groups)


def _check(ok: bool, name: str, value: Any, want: str) -> None:
    if not ok:
        raise ValueError(f"MABN: {name}={value!r} is invalid; use {want}.")


class MABNState(NamedTuple):
    """State of the non-centered layer (Flax's ``batch_stats``).

    Attributes:
      step: training steps seen so far (int32 scalar).
      x2_window: ``[m, *features]`` ring buffer of the per-step χ²_B.
      psi_window: ``[m, *features]`` ring buffer of the per-step Ψ_B.
      ema_x2: EMA of χ̃², used for inference and renormalization.
      skipped: training steps skipped for non-finite batch statistics
        (int32 scalar; see ``MABNConfig.skip_nonfinite``).
    """

    step: Array
    x2_window: Array
    psi_window: Array
    ema_x2: Array
    skipped: Array


class CenteredMABNState(NamedTuple):
    """State of the centered layer: forward μ/σ² and backward g/Ψ windows."""

    step: Array
    mean_window: Array
    var_window: Array
    g_window: Array
    psi_window: Array
    ema_mean: Array
    ema_var: Array
    skipped: Array


class Probes(NamedTuple):
    """Inputs whose cotangents are this step's backward statistics.

    Their forward values are ignored. ``jax.grad`` with respect to them returns
    Ψ_B (and g_B in the centered variant), ready for :func:`record_backward_stats`.
    """

    psi: Array
    g: Array | None = None


def canonicalize_axes(ndim: int, axes: Axes) -> tuple[int, ...]:
    """Returns sorted non-negative axes, with an error naming ``axis`` if invalid."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    if ndim < 2:
        raise ValueError(
            f"MABN: input of rank {ndim} is invalid; use an input of rank >= 2 "
            "(a batch axis and a feature axis).")
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"MABN: axis={a} is out of range for an input of rank {ndim}; "
                f"use an axis in [-{ndim}, {ndim - 1}].")
    out = tuple(sorted({a % ndim for a in axes}))
    if len(out) == ndim:
        raise ValueError(f"MABN: axis={axes} leaves no axis to reduce over; "
                         "keep at least one batch axis out of `axis`.")
    return out


def init_state(feature_shape: Sequence[int], config: MABNConfig,
               dtype: Any = jnp.float32) -> MABNState | CenteredMABNState:
    """The state before the first training step (the EMA of the scale is 1)."""
    feature_shape = tuple(feature_shape)
    window = jnp.zeros((config.buffer_size,) + feature_shape, dtype)
    step = jnp.zeros((), jnp.int32)
    if config.centered:
        return CenteredMABNState(step, window, window, window, window,
                                 jnp.zeros(feature_shape, dtype),
                                 jnp.ones(feature_shape, dtype), step)
    return MABNState(step, window, window, jnp.ones(feature_shape, dtype), step)


def state_from_mapping(node: Any) -> MABNState | CenteredMABNState | None:
    """The MABN state stored in a ``batch_stats`` entry, or None if it is not one.

    A layer is recognized by its exact set of fields.
    """
    keys = frozenset(node.keys())
    for cls in (MABNState, CenteredMABNState):
        if keys == frozenset(cls._fields):
            return cls(**node)
    return None


def init_probes(state: MABNState | CenteredMABNState, num_groups: int = 1) -> Probes:
    """Zero probes matching ``state`` (any leading vmap/scan axes included).

    With ghost batches (``num_groups = batch // norm_batch_size > 1``) each probe
    gets a ``[num_groups]`` axis after the leading ones: one Ψ_B (g_B) per group.
    """
    def zeros(like):
        if num_groups == 1:
            return jnp.zeros_like(like)
        lead = state.step.ndim
        return jnp.zeros(like.shape[:lead] + (num_groups,) + like.shape[lead:], like.dtype)

    if isinstance(state, CenteredMABNState):
        return Probes(zeros(state.ema_var), zeros(state.ema_mean))
    return Probes(zeros(state.ema_x2))


class _Phase(NamedTuple):
    slot_mask: Array  # [m] bool: the ring-buffer slot t mod m
    use_batch: Array  # bool: t <= m or t < warmup
    renorm: Array  # bool: t > max(renorm_start, warmup)


def _phase(step: Array, config: MABNConfig) -> _Phase:
    t = step + 1
    m = config.buffer_size
    return _Phase(
        slot_mask=jnp.arange(m) == t % m,
        use_batch=(t <= m) | (t < config.warmup_steps),
        renorm=t > max(config.renorm_start, config.warmup_steps),
    )


def _write(window: Array, slot_mask: Array, value: Array) -> Array:
    mask = slot_mask.reshape(slot_mask.shape + (1,) * value.ndim)
    return jnp.where(mask, value[None], window)


def _moving(window: Array, slot_mask: Array, value: Array, use_batch: Array):
    """Writes ``value`` into its slot; returns (new window, statistic in use)."""
    window = _write(window, slot_mask, value.astype(window.dtype))
    return window, jnp.where(use_batch, value, window.mean(0).astype(value.dtype))


def _ema(old: Array, new: Array, momentum: float) -> Array:
    """``momentum · old + (1 − momentum) · new``, in the state's dtype."""
    return (momentum * old + (1 - momentum) * new.astype(old.dtype)).astype(old.dtype)


def _ema_track(old: Array, new: Array, momentum: float, grouped: bool):
    """(EMA after the step, EMA before each group): one update per ghost batch."""
    if not grouped:
        return _ema(old, new, momentum), old
    return lax.scan(lambda e, v: (_ema(e, v, momentum), e), old, new)


def _pmean(x, config: MABNConfig):
    if config.axis_name is None:
        return x
    return lax.pmean(x, config.axis_name, axis_index_groups=config.axis_index_groups)


def _varying_axes(x) -> frozenset:
    """The ``shard_map`` mesh axes ``x`` varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax >= 0.10; older versions call it `vma`
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _vary_like(v, axes: frozenset):
    """Marks ``v`` as varying over ``axes`` (a no-op outside shard_map).

    Inside ``shard_map`` a custom VJP's cotangents must have the manual-axis
    type of their primals: a replicated γ meets a per-device ``x`` here, so it
    is cast to varying first, and autodiff then sums its gradient over devices
    (the transpose of that cast), exactly as for a plain ``γ · x``.
    """
    missing = tuple(a for a in axes if a not in _varying_axes(v))
    return lax.pcast(v, missing, to="varying") if missing else v


class _Spec(NamedTuple):
    """Static description of one normalization call (hashable)."""

    reduction_axes: tuple[int, ...]
    feature_axes: tuple[int, ...]
    out_dtype: Any
    config: MABNConfig
    grouped: bool = False  # ghost batches: axis 0 of x indexes groups, ctx has a [G] axis


class _Ctx(NamedTuple):
    """Per-channel constants of one step: they receive no gradient."""

    mean: Array | None  # μ̃ (centered) or None
    inv: Array  # 1 / sqrt(χ̃² + ε) or 1 / sqrt(σ̃² + ε)
    r: Array
    d: Array | None
    psi_window: Array  # windows as before this step
    g_window: Array | None
    slot_mask: Array  # [m], or [G, m] for ghost batches
    use_batch: Array  # scalar, or [G]


def _bshape(v: Array, ndim: int, feature_axes: tuple[int, ...]) -> Array:
    """Reshapes a ``[*features]`` array to broadcast against the input."""
    shape = [1] * ndim
    for a, n in zip(feature_axes, v.shape):
        shape[a] = n
    return v.reshape(shape)


def _stat_dtype(x: Array, state_dtype: Any) -> Any:
    # At least float32, and never less precise than the state (f64 under x64).
    return jnp.promote_types(jnp.promote_types(x.dtype, jnp.float32), state_dtype)


def _z(x: Array, ctx: _Ctx, spec: _Spec, dtype) -> Array:
    b = functools.partial(_bshape, ndim=x.ndim, feature_axes=spec.feature_axes)
    xs = x.astype(dtype)
    if ctx.mean is not None:
        xs = xs - b(ctx.mean)
    return xs * b(ctx.inv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _normalize(spec: _Spec, x, scale, bias, probes, ctx):
    return _normalize_fwd(spec, x, scale, bias, probes, ctx)[0]


def _normalize_fwd(spec: _Spec, x, scale, bias, probes, ctx):
    dtype = ctx.inv.dtype
    b = functools.partial(_bshape, ndim=x.ndim, feature_axes=spec.feature_axes)
    z = _z(x, ctx, spec, dtype)
    a = scale.astype(dtype) * ctx.r
    shift = jnp.broadcast_to(bias.astype(dtype), a.shape)
    if ctx.d is not None:
        shift = shift + scale.astype(dtype) * ctx.d
    y = (z * b(a) + b(shift)).astype(spec.out_dtype)
    return y, (x, scale, bias, probes, ctx)


def _normalize_bwd(spec: _Spec, res, dy):
    x, scale, bias, probes, ctx = res
    dtype = ctx.inv.dtype
    b = functools.partial(_bshape, ndim=x.ndim, feature_axes=spec.feature_axes)
    z = _z(x, ctx, spec, dtype)
    dy = dy.astype(dtype)
    count = 1
    for ax in spec.reduction_axes:
        count *= x.shape[ax]
    sum_dy = dy.sum(spec.reduction_axes)
    # Σ dy·z = inv · Σ dy·(x − μ̃): scaling after the reduction lets XLA fuse
    # it into one pass over (x, dy) instead of materializing z first. The
    # barrier keeps μ̃'s (per-channel) select out of that fusion; otherwise XLA
    # CPU writes x − μ̃ to memory before reducing.
    xc = (x.astype(dtype) if ctx.mean is None
          else x.astype(dtype) - b(lax.optimization_barrier(ctx.mean)))
    sum_dyz = (dy * xc).sum(spec.reduction_axes) * ctx.inv
    a = scale.astype(dtype) * ctx.r  # ĝ = dy · a
    cfg = spec.config

    moving = _slide if spec.grouped else _moving
    psi_b = _pmean(a * sum_dyz / count, cfg)  # Ψ_B = mean(ĝ · z)
    _, psi = moving(ctx.psi_window, ctx.slot_mask, psi_b, ctx.use_batch)
    dxs = dy * b(a) - z * b(psi)
    if ctx.g_window is not None:
        g_b = _pmean(a * sum_dy / count, cfg)  # g_B = mean(ĝ)
        _, g = moving(ctx.g_window, ctx.slot_mask, g_b, ctx.use_batch)
        dxs = dxs - b(g)
        dprobes = Probes(_probe_cotangent(psi_b, probes.psi), _probe_cotangent(g_b, probes.g))
    else:
        dprobes = Probes(_probe_cotangent(psi_b, probes.psi))
    dx = (dxs * b(ctx.inv)).astype(x.dtype)

    dscale = ctx.r * sum_dyz
    if ctx.d is not None:
        dscale = dscale + ctx.d * sum_dy
    if spec.grouped:  # γ and β are shared by all groups
        dscale, sum_dy = dscale.sum(0), sum_dy.sum(0)
    return (dx, dscale.astype(scale.dtype), sum_dy.astype(bias.dtype), dprobes,
            jax.tree_util.tree_map(lambda _: None, ctx))


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _probe_cotangent(stat: Array, probe: Array) -> Array:
    """Ψ_B or g_B as the probe's cotangent: its dtype and shard_map type.

    A synchronized statistic is the same on every device; if the probe is
    per-device (state sharded over the axis) each device gets that value.
    """
    return _vary_like(stat.astype(probe.dtype), _varying_axes(probe))


def _check_probes_vary(probes: Probes, stat: Array, config: MABNConfig) -> None:
    """Per-device statistics need per-device probes (and state) in shard_map."""
    per_device = _varying_axes(stat) - _varying_axes(probes.psi)
    if per_device:
        raise ValueError(
            f"MABN: under shard_map the statistics vary over mesh axes "
            f"{sorted(per_device)} but the state/probes are replicated over them "
            f"(axis_name={config.axis_name!r}). Either shard the batch_stats "
            "(and so the probes) over those axes, e.g. in_specs P('batch') on a "
            "leading device axis, to keep per-device statistics, or set "
            "axis_name to the mesh axis to synchronize them.")


def _affine_params(scale, bias, feature_shape, dtype):
    scale = jnp.ones(feature_shape, dtype) if scale is None else jnp.asarray(scale)
    bias = jnp.zeros(feature_shape, dtype) if bias is None else jnp.asarray(bias)
    return scale, bias


def mabn_train(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    state: MABNState | CenteredMABNState,
    probes: Probes,
    config: MABNConfig,
    *,
    axis: Axes = -1,
    dtype: Any = None,
    norm_batch_size: int | None = None,
) -> tuple[Array, MABNState | CenteredMABNState]:
    """One MABN training step: returns ``(y, new_state)``.

    ``new_state`` holds the advanced step, the forward windows and the EMA; the
    backward windows are written by :func:`record_backward_stats` from the
    gradients of ``probes``. ``y`` is differentiable w.r.t. ``x``, ``scale``,
    ``bias`` and ``probes`` (whose cotangents are Ψ_B and g_B).

    Ghost batches: with ``norm_batch_size=n`` smaller than the batch, axis 0 of
    ``x`` (which must be a batch axis) is split into ``G = x.shape[0] / n``
    groups of ``n`` consecutive examples. Each group is normalized with its own
    statistics and counts as one step of the windows: group ``i`` is step
    ``t_i = step + 1 + i``, writes slot ``t_i mod m`` and averages the last
    ``m`` groups up to itself, across step boundaries (the paper's simulated
    small batches). The EMA is updated once per group, in order, and ``step``
    advances by ``G``. The probes then carry one row per group (shape
    ``[G, *features]``, see :func:`init_probes`).

    Args:
      x: input of rank >= 2, any float dtype.
      scale, bias: ``γ`` and ``β`` of shape ``[*features]``, or ``None``.
      state: from :func:`init_state` or a previous step.
      probes: from :func:`init_probes`; differentiate w.r.t. them.
      config: the layer's hyper-parameters.
      axis: the feature axis or axes (default last, NHWC).
      dtype: output dtype (default: the input's).
      norm_batch_size: examples per normalization group along axis 0; ``None``
        (or the whole batch) normalizes the batch as one group.
    """
    y, new_state, _ = mabn_train_with_stats(
        x, scale, bias, state, probes, config, axis=axis, dtype=dtype,
        norm_batch_size=norm_batch_size)
    return y, new_state


def mabn_train_with_stats(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    state: MABNState | CenteredMABNState,
    probes: Probes,
    config: MABNConfig,
    *,
    axis: Axes = -1,
    dtype: Any = None,
    norm_batch_size: int | None = None,
) -> tuple[Array, MABNState | CenteredMABNState, dict[str, Array]]:
    """:func:`mabn_train` that also returns the forward statistics of the step.

    Returns ``(y, new_state, stats)``; ``stats`` maps names to per-channel
    arrays (with a leading ``[G]`` axis for ghost batches). Non-centered:
    ``chi2_B`` (batch χ²_B), ``chi2`` (χ̃² used to normalize), ``ema_x2`` (the
    EMA ``r`` is measured against), ``r``. Centered: ``mu_B``, ``sigma2_B``,
    ``mu``, ``sigma2``, ``ema_mean``, ``ema_var``, ``r``, ``d``.
    """
    feature_axes = canonicalize_axes(x.ndim, axis)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    centered = isinstance(state, CenteredMABNState)
    if centered != config.centered:
        raise ValueError(
            f"MABN: config.centered={config.centered} but the state is a "
            f"{type(state).__name__}; build the state with init_state(..., config).")
    check_input(x, feature_shape, state, config, reduction_axes)
    groups = num_groups(x.shape, feature_axes, norm_batch_size)
    grouped = groups > 1
    _check_probes(probes, feature_shape, groups)
    sdt = _stat_dtype(x, state.psi_window.dtype)
    in_shape = x.shape
    if grouped:  # [N, ...] -> [G, n, ...]; group i is step t + i
        x = x.reshape((groups, in_shape[0] // groups) + in_shape[1:])
        feature_axes = (0,) + tuple(a + 1 for a in feature_axes)
        reduction_axes = tuple(a + 1 for a in reduction_axes)
        steps = state.step + jnp.arange(groups, dtype=state.step.dtype)
        phase = jax.vmap(lambda s: _phase(s, config))(steps)
        moving = _slide
    else:
        phase = _phase(state.step, config)
        moving = _moving
    xs = x.astype(sdt)
    eps = config.epsilon

    def ema_track(old, new):
        return _ema_track(old, new, config.momentum, grouped)

    def clip_r(scale_stat, ema_stat):
        r = jnp.sqrt(scale_stat + eps) / jnp.sqrt(ema_stat.astype(sdt) + eps)
        r = jnp.clip(r, 1.0 / config.r_max, config.r_max)
        return jnp.where(_lead(phase.renorm, r), r, jnp.ones_like(r))

    if centered:
        mu_b, m2_b = _pmean(jnp.stack([xs.mean(reduction_axes),
                                       (xs * xs).mean(reduction_axes)]), config)
        var_b = jnp.maximum(m2_b - mu_b * mu_b, 0.0)
        mean_window, mu = moving(state.mean_window, phase.slot_mask, mu_b, phase.use_batch)
        var_window, var = moving(state.var_window, phase.slot_mask, var_b, phase.use_batch)
        ema_mean, ema_mean_used = ema_track(state.ema_mean, mu)
        ema_var, ema_var_used = ema_track(state.ema_var, var)
        r = clip_r(var, ema_var_used)
        d = (mu - ema_mean_used.astype(sdt)) / jnp.sqrt(ema_var_used.astype(sdt) + eps)
        d = jnp.where(_lead(phase.renorm, d), jnp.clip(d, -config.d_max, config.d_max),
                      jnp.zeros_like(d))
        ctx = _Ctx(mu, lax.rsqrt(var + eps), r, d, state.psi_window, state.g_window,
                   phase.slot_mask, phase.use_batch)
        new_state = state._replace(
            step=state.step + groups, mean_window=mean_window, var_window=var_window,
            ema_mean=ema_mean, ema_var=ema_var)
        stats = dict(mu_B=mu_b, sigma2_B=var_b, mu=mu, sigma2=var,
                     ema_mean=ema_mean_used, ema_var=ema_var_used, r=r, d=d)
    else:
        x2_b = _pmean((xs * xs).mean(reduction_axes), config)
        x2_window, x2 = moving(state.x2_window, phase.slot_mask, x2_b, phase.use_batch)
        ema_x2, ema_x2_used = ema_track(state.ema_x2, x2)
        r = clip_r(x2, ema_x2_used)
        ctx = _Ctx(None, lax.rsqrt(x2 + eps), r, None, state.psi_window, None,
                   phase.slot_mask, phase.use_batch)
        new_state = state._replace(step=state.step + groups, x2_window=x2_window,
                                   ema_x2=ema_x2)
        stats = dict(chi2_B=x2_b, chi2=x2, ema_x2=ema_x2_used, r=r)

    # Before the skip guard: its per-device flag would make the probes vary.
    _check_probes_vary(probes, ctx.inv, config)
    if config.skip_nonfinite:
        ok = _all_finite(*((mu_b, var_b) if centered else (x2_b,)))
        new_state = _keep_if_finite(state, new_state, ok)
        # NaN probe cotangents tell record_backward_stats that this step was
        # skipped, so it neither writes Ψ_B into a slot it does not own nor
        # counts the step twice. The probes' forward values are unused.
        probes = jax.tree_util.tree_map(
            lambda p: p * jnp.where(ok, 1.0, jnp.nan).astype(p.dtype), probes)

    scale, bias = _affine_params(scale, bias, feature_shape, sdt)
    x_axes = _varying_axes(x)
    scale, bias = _vary_like(scale, x_axes), _vary_like(bias, x_axes)
    spec = _Spec(reduction_axes, feature_axes, jnp.dtype(dtype or x.dtype), config, grouped)
    ctx = jax.tree_util.tree_map(lax.stop_gradient, ctx)
    y = _normalize(spec, x, scale, bias, probes, ctx).reshape(in_shape)
    return y, new_state, stats


def num_groups(shape: Sequence[int], feature_axes: Sequence[int],
               norm_batch_size: int | None, layer: str = "MABN") -> int:
    """``G``, the number of ghost batches of ``norm_batch_size`` along axis 0.

    Raises a ``ValueError`` naming ``norm_batch_size`` if it is not a positive
    int dividing ``shape[0]``, or if axis 0 is a feature axis.
    """
    if norm_batch_size is None:
        return 1
    if isinstance(norm_batch_size, bool) or not isinstance(norm_batch_size, int) \
            or norm_batch_size < 1:
        raise ValueError(f"{layer}: norm_batch_size={norm_batch_size!r} is invalid; use "
                         "a positive int (examples per normalization group), or None "
                         "to normalize the whole batch.")
    if 0 in tuple(feature_axes):
        raise ValueError(f"{layer}: norm_batch_size={norm_batch_size} splits axis 0 of "
                         "the input into groups, but axis 0 is a feature axis; put the "
                         "batch on axis 0 or use norm_batch_size=None.")
    if shape[0] % norm_batch_size:
        raise ValueError(f"{layer}: norm_batch_size={norm_batch_size} does not divide the "
                         f"batch size {shape[0]} (axis 0 of the input); use a batch size "
                         "that is a multiple of norm_batch_size, or another norm_batch_size.")
    return shape[0] // norm_batch_size


def _check_probes(probes: Probes, feature_shape, groups: int) -> None:
    want = feature_shape if groups == 1 else (groups,) + tuple(feature_shape)
    if tuple(probes.psi.shape) != tuple(want):
        raise ValueError(
            f"MABN: probes of shape {tuple(probes.psi.shape)} do not fit {groups} "
            f"normalization group(s) of features {tuple(feature_shape)} (expected {want}); "
            f"create them with init_probes(..., num_groups={groups}) (num_groups = batch "
            "size // norm_batch_size).")


def _lead(mask: Array, like: Array) -> Array:
    """Reshapes a per-group (or scalar) ``mask`` to broadcast against ``like``."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def _slide(window: Array, slot_mask: Array, value: Array, use_batch: Array):
    """:func:`_moving` for each ghost batch in turn (leading ``[G]`` axes).

    Group ``i`` writes its slot, then reads the window, so its statistic averages
    the last ``m`` groups up to itself, across step boundaries.
    """
    return lax.scan(lambda win, xs: _moving(win, *xs), window, (slot_mask, value, use_batch))


def check_input(x, feature_shape, state, config, reduction_axes=()) -> None:
    """Trace-time checks of an input against a state; raises naming the fix.

    A bad input must fail here, not become a NaN state. ``reduction_axes`` (training only) must not be empty: a batch of zero
    examples has no statistics.
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"MABN: input dtype {x.dtype} is not supported; cast the "
                        "input to a float dtype (e.g. x.astype(jnp.float32)).")
    for a in reduction_axes:
        if x.shape[a] == 0:
            raise ValueError(
                f"MABN: input shape {x.shape} is an empty batch (size 0 along axis "
                f"{a}), whose statistics are undefined; drop empty batches before "
                "the training step.")
    want = (config.buffer_size,) + feature_shape
    if state.psi_window.shape != want:
        raise ValueError(
            f"MABN: state window shape {state.psi_window.shape} does not fit "
            f"buffer_size={config.buffer_size} and features {feature_shape} "
            f"(expected {want}); the state was built for another configuration or "
            f"input. Re-initialize it (model.init, or init_state({feature_shape}, "
            "config)), or load a checkpoint made with the same buffer_size and "
            "feature size.")


def _all_finite(*arrays: Array, lead: int = 0) -> Array:
    """Whether every entry is finite, per index of the ``lead`` leading axes."""
    return functools.reduce(jnp.logical_and, [
        jnp.isfinite(a).all(axis=tuple(range(lead, a.ndim))) for a in arrays])


def _select(ok: Array, new, old):
    """``new`` where ``ok`` else ``old``, leaf by leaf (``ok`` has the leading axes)."""
    def pick(n, o):
        return jnp.where(ok.reshape(ok.shape + (1,) * (n.ndim - ok.ndim)), n, o)
    return jax.tree_util.tree_map(pick, new, old)


def _keep_if_finite(old, new, ok: Array):
    """``new`` if the step's statistics were finite, else ``old`` with one more skip."""
    kept = _select(ok, new, old)
    return kept._replace(skipped=jnp.where(ok, new.skipped, old.skipped + 1))


def mabn_inference(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    state: MABNState | CenteredMABNState,
    config: MABNConfig,
    *,
    axis: Axes = -1,
    dtype: Any = None,
) -> Array:
    """The inference map, one per-channel affine function of ``x``.

    Non-centered: ``y = γ · x / sqrt(ema_x2 + ε) + β``; centered:
    ``y = γ · (x − ema_mean) / sqrt(ema_var + ε) + β``.
    """
    feature_axes = canonicalize_axes(x.ndim, axis)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    check_input(x, feature_shape, state, config)
    sdt = _stat_dtype(x, state.psi_window.dtype)
    scale, bias = _affine_params(scale, bias, feature_shape, sdt)
    mul, add = inference_affine(scale, bias, state, config)
    b = functools.partial(_bshape, ndim=x.ndim, feature_axes=feature_axes)
    y = x.astype(sdt) * b(mul.astype(sdt)) + b(add.astype(sdt))
    return y.astype(dtype or x.dtype)


def inference_affine(scale: Array, bias: Array, state, config: MABNConfig):
    """``(a, b)`` such that inference is ``y = a · x + b`` per channel."""
    if isinstance(state, CenteredMABNState):
        inv = lax.rsqrt(state.ema_var + config.epsilon)
        mul = scale * inv
        return mul, bias - mul * state.ema_mean
    mul = scale * lax.rsqrt(state.ema_x2 + config.epsilon)
    return mul, bias


def record_backward_stats(state: MABNState | CenteredMABNState,
                          probe_grads: Probes,
                          previous: MABNState | CenteredMABNState | None = None,
                          *, skip_nonfinite: bool = True) -> MABNState | CenteredMABNState:
    """Writes this step's Ψ_B (and g_B) from the probes' gradients into the windows.

    Call it with the state returned by :func:`mabn_train` (whose ``step`` is
    already ``t``), so the slot is ``t mod m``, the one the backward pass
    read. Leading axes added by ``vmap``/``nn.scan`` are supported. Ghost
    batches (probes with a ``[G]`` axis) write the ``G`` slots of steps
    ``t − G + 1 … t`` in order, so later groups win when ``G > m``.

    With ``skip_nonfinite`` (the default), a step whose Ψ_B or g_B is not all
    finite writes nothing. Pass ``previous``, the state given to
    :func:`mabn_train` for this step, to undo the step's forward part too: the
    result is then ``previous`` with one more ``skipped`` step, exactly the
    state of a run that never saw the batch. Without ``previous`` only the
    backward windows are protected and a backward-only failure is not counted.
    A step :func:`mabn_train` already skipped arrives with NaN probe gradients
    and is counted once.
    """
    lead = state.step.ndim
    m = state.psi_window.shape[lead]
    grouped = probe_grads.psi.ndim > state.psi_window.ndim - 1
    if grouped:
        write = functools.partial(_write_groups, step=state.step, lead=lead, m=m)
    else:
        slot = state.step % m
        mask = jnp.arange(m) == slot[..., None]  # [..., m]

        def write(window, value):
            feat = value.ndim - lead
            mask_b = mask.reshape(mask.shape + (1,) * feat)
            return jnp.where(mask_b, jnp.expand_dims(value.astype(window.dtype), lead), window)

    new = state._replace(psi_window=write(state.psi_window, probe_grads.psi))
    if isinstance(state, CenteredMABNState):
        new = new._replace(g_window=write(state.g_window, probe_grads.g))
    if not skip_nonfinite:
        return new
    ok = _all_finite(*(g for g in probe_grads if g is not None), lead=lead)
    if previous is None:
        return _select(ok, new, state)
    if type(previous) is not type(state):
        raise ValueError(f"MABN: previous is a {type(previous).__name__} but the state "
                         f"is a {type(state).__name__}; pass the state given to mabn_train.")
    return _keep_if_finite(previous, new, ok)


def _write_groups(window: Array, values: Array, *, step: Array, lead: int, m: int) -> Array:
    """Writes ``values[..., G, *features]`` (groups of steps ``step − G + 1 … step``)."""
    groups = values.shape[lead]
    feat = values.ndim - lead - 1
    t = step[..., None]  # [..., 1]
    latest = t - ((t - jnp.arange(m)) % m)  # [..., m]: last step that wrote each slot
    group = latest - (t - groups + 1)  # its group index this step (< 0: an older step)
    idx = jnp.clip(group, 0, groups - 1).reshape(group.shape + (1,) * feat)
    new = jnp.take_along_axis(values.astype(window.dtype), idx, axis=lead)
    written = (group >= 0).reshape(group.shape + (1,) * feat)
    return jnp.where(written, new, window)
