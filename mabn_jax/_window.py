"""The moving-average windows of MABN: counters, phases, ring buffers, EMAs.

A training call of ``G`` window steps (``G`` ghost batches; 1 without) is
steps ``t = step + 1 … step + G``. Step ``t`` writes slot ``t mod R`` of each
window of ``R`` rows and, past the batch phase (``t ≤ m`` or
``t < warmup_steps``), normalizes with the mean of the last ``m ≤ R`` writes
up to its own (``m < R``: the centered layer's per-layer default window,
:meth:`~mabn_jax.MABNConfig.window_length`)::

    μ̃ = mean(μ_w),   σ̃² = mean(σ²_w) + mean((μ_w − μ̃)²)     (centered)
    χ̃² = mean(χ²_w)                                           (plain)

Everything here is pure array code on :class:`~mabn_jax._state.MABNState`
fields; one code path serves every phase (traced selects, no branching).
"""

from __future__ import annotations

from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mabn_jax import _stats as S
from mabn_jax._config import MABNConfig
from mabn_jax._state import MABNState

Array = jax.Array
# Counters are floats; past _WRAP they step back by a multiple of m (slots and
# phases unchanged, as every schedule threshold is below _WRAP - period).
_WRAP = 2**23

__all__ = [
    "Phase",
    "phase",
    "as_count",
    "wrap_period",
    "advance",
    "Slide",
    "slide",
    "window_mean",
    "final_window",
    "step_window",
    "step_mean_window",
    "forward_windows",
    "emas",
]


class Phase(NamedTuple):
    """The phase of a call's window steps; the per-group fields are scalars
    when the call is one step (``G = 1``): selects take them as they are."""

    slot_mask: Array  # [G, R] bool: the ring-buffer slot t mod R
    use_batch: Array  # [G] or [] bool: t <= m or t < warmup
    renorm: Array  # [G] or [] bool: t > max(renorm_start, warmup)
    t: Array  # [G] or []: the window steps (whole numbers, in the counter's float dtype)


def phase(t: Array, cfg: MABNConfig, m: int, rows: int) -> Phase:
    """The phase of each window step ``t`` (``[G]``, or a scalar for one step;
    every ``t >= 1``) of a window averaging ``m`` of its ``rows``."""
    # t >= 1: an unsigned rem is the mod (and a mask for a power-of-two R).
    slot = lax.rem(t.astype(jnp.uint32), np.uint32(rows))
    return Phase(
        lax.broadcasted_iota(jnp.uint32, (1, rows), 1) == jnp.reshape(slot, (-1, 1)),
        t < max(m + 1, cfg.warmup_steps),  # t <= m or t < warmup_steps
        t > max(cfg.renorm_start, cfg.warmup_steps),
        t,
    )


def as_count(step: Array) -> Array:
    """A stored counter, rounded (it may have been averaged by lax.pmean). It stays
    a float, which holds every count below ``_WRAP`` exactly: no conversions."""
    return lax.round(step, lax.RoundingMethod.TO_NEAREST_EVEN)


def wrap_period(rows: int) -> int:
    """What a counter past ``_WRAP`` steps back by: a multiple of the windows' rows."""
    return rows * ((_WRAP // 2) // rows)


def advance(step: Array, new: Array, rows: int) -> Array:
    """The counter ``step`` set to the count ``new`` (its last window step), wrapped."""
    return S.where(new >= _WRAP, new - wrap_period(rows), new).astype(step.dtype)


class Slide(NamedTuple):
    """How the ``G`` window steps of one call share the ring buffer.

    Group ``i`` writes slot ``t_i mod R`` and reads the last ``m`` writes up
    to its own: the values of groups ``i − m < j ≤ i`` (``in_window``) and the
    slots written before the call within its last ``m`` steps (``old_kept``).
    A plain call is ``G = 1``.
    """

    in_window: Array  # [G, G]: group j's value is in group i's window
    old_kept: Array | None  # [G, R]: slot s holds a value from before the call in i's
    # window (G > 1; one group reads its written window)
    last: Array  # [G, R]: group j is the last to write slot s
    m: int  # the steps a window averages (<= R)
    recent: Array | None  # [G, R]: slot s is one of i's last m writes; None if m == R
    row: Array | None  # [R, *features]: the slot of a one-group call (G = 1), else None


def slide(slot_mask: Array, t: Array, m: int, window_shape: tuple[int, ...]) -> Slide:
    """The :class:`Slide` of a call's steps ``t`` (:attr:`Phase.slot_mask`,
    :attr:`Phase.t`) for windows of length ``m`` and shape ``window_shape``
    (one group's slot is laid out once, for every window)."""
    groups, rows = slot_mask.shape
    recent = None
    if m < rows:  # a slot's age: the steps since its last write, as of step t_i
        age = lax.rem(  # t >= 1: an unsigned rem is the mod
            jnp.reshape(t, (-1, 1)).astype(jnp.uint32) + np.arange(rows, 0, -1, dtype=np.uint32),
            np.uint32(rows),
        ).astype(jnp.int32)
        recent = age < m
    if groups == 1:  # one window step (no ghost batches): nothing to slide
        row = lax.broadcast_in_dim(slot_mask[0], window_shape, (0,))
        return Slide(cast(Array, np.ones((1, 1), bool)), None, slot_mask, m, recent, row)
    i, j = jnp.arange(groups)[:, None], jnp.arange(groups)[None, :]
    in_window = (j <= i) & (j > i - m)
    if recent is None:
        old_kept = ~jnp.any(in_window[:, :, None] & slot_mask[None], axis=1)
    else:  # written before the call (age > i) and recent enough
        old_kept = recent & (age > i)
    later = jnp.cumsum(slot_mask[::-1], 0)[::-1] - slot_mask  # writes after group j
    return Slide(in_window, old_kept, slot_mask & (later == 0), m, recent, None)


def _dot(mask: Array, v: Array) -> Array:
    """``Σ_b mask[a, b] · v[b]``, exactly (no reduced-precision matmul)."""
    return jnp.tensordot(mask.astype(v.dtype), v, axes=(1, 0), precision=lax.Precision.HIGHEST)


def _masked_sum(mask: Array, v: Array) -> Array:
    """``Σ_b v[a, b]`` over the ``b`` where ``mask[a, b]``."""
    return S.where_lead(mask, v, 0.0).sum(1)


def _written(sl: Slide, window: Array, values: Array) -> Array:
    """One group's window with its value written, in the values' dtype: ``[m, *features]``."""
    return S.where(cast(Array, sl.row), values, window.astype(values.dtype))  # G = 1


def _recent_mean(sl: Slide, v: Array) -> Array:
    """The mean of a one-group window's ``m`` newest rows: ``[1, *features]``."""
    if sl.recent is None:
        return v.mean(0, keepdims=True)
    return _dot(sl.recent, v) / sl.m


def window_mean(sl: Slide, window: Array, values: Array) -> Array:
    """Each group's window mean: ``[G, *features]``."""
    if values.shape[0] == 1:
        return _recent_mean(sl, _written(sl, window, values))
    kept = cast(Array, sl.old_kept)  # G > 1
    return (_dot(sl.in_window, values) + _dot(kept, window.astype(values.dtype))) / sl.m


def final_window(sl: Slide, window: Array, values: Array) -> Array:
    """The window after the call: each written slot holds its last writer's value."""
    if values.shape[0] == 1:
        return S.where(cast(Array, sl.row), values.astype(window.dtype), window)
    written = sl.last.any(0)
    return S.where_lead(written, _dot(sl.last.T, values).astype(window.dtype), window)


def step_window(sl: Slide, window: Array, values: Array) -> tuple[Array, Array]:
    """(the window after the call, each group's window mean). The stored window
    takes no gradient: stopping it keeps reverse mode from tracing the state
    update a second time (as its linearization)."""
    if values.shape[0] == 1:
        written = _written(sl, window, values)
        return lax.stop_gradient(written).astype(window.dtype), _recent_mean(sl, written)
    return (
        final_window(sl, window, lax.stop_gradient(values)),
        window_mean(sl, window, values),
    )


def step_mean_window(sl: Slide, window: Array, values: Array) -> tuple[Array, Array, Array]:
    """:func:`step_window` of the means, and each group's between-step variance of
    the window's values about its mean (two passes; one group's window written once)."""
    if values.shape[0] == 1:
        written = _written(sl, window, values)
        mu = _recent_mean(sl, written)
        spread = _recent_mean(sl, jnp.square(written - mu))
        return lax.stop_gradient(written).astype(window.dtype), mu, spread
    new, mu = step_window(sl, window, values)
    return new, mu, _spread(sl, window, values, mu)


def _spread(sl: Slide, window: Array, values: Array, mu: Array) -> Array:
    """Each of ``G > 1`` groups' between-step variance of the window's values
    about ``mu`` (its window mean)."""
    return (
        _masked_sum(sl.in_window, jnp.square(values[None] - mu[:, None]))
        + _masked_sum(
            cast(Array, sl.old_kept), jnp.square(window[None].astype(mu.dtype) - mu[:, None])
        )
    ) / sl.m


def forward_windows(state: MABNState, sl: Slide, use_batch, mean_b, var_b):
    """New (mean, var) windows and each group's (μ̃, σ̃²) in use."""
    var_w, var_win = step_window(sl, state.var_window, var_b)
    if mean_b is None or state.mean_window is None:  # plain (check_state: both or neither)
        return None, var_w, None, S.where_lead(use_batch, var_b, var_win)
    mean_w, mu_win, spread = step_mean_window(sl, state.mean_window, mean_b)
    return (
        mean_w,
        var_w,
        S.where_lead(use_batch, mean_b, mu_win),
        S.where_lead(use_batch, var_b, var_win + spread),
    )


def emas(state: MABNState, var, mean, ghost: bool, cfg: MABNConfig):
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
