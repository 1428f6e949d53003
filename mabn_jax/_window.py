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
# Counters are floats; past _WRAP they step back by a multiple of R (slots and
# phases unchanged: every schedule threshold is at most 2**22 < _WRAP + 1 - period).
_WRAP = 2**23

__all__ = [
    "Phase",
    "phase",
    "as_count",
    "wrap_period",
    "wrap",
    "Rows",
    "Slide",
    "slide",
    "one_step",
    "in_use",
    "backward_windows",
    "final_window",
    "forward_windows",
    "emas",
]


class Phase(NamedTuple):
    """The phase of a call's window steps; the per-group fields are scalars
    when the call is one step (``G = 1``): selects take them as they are."""

    slot_mask: Array  # [G, R] bool: the ring-buffer slot t mod R (one step: the slot)
    use_batch: Array  # [G] or [] bool: t <= m or t < warmup
    renorm: Array  # [G] or [] bool: t > max(renorm_start, warmup)
    t: Array  # [G] or []: the window steps (whole numbers, in the counter's float dtype)


def phase(t: Array, cfg: MABNConfig, m: int, rows: int) -> Phase:
    """The phase of each window step ``t`` (``[G]``, or a scalar for one step;
    every ``t >= 1``) of a window averaging ``m`` of its ``rows``."""
    # t >= 1: an unsigned rem is the mod (an AND for a power-of-two R, which XLA
    # fuses into its readers; a float rem is a fusion of its own).
    slot = lax.rem(t.astype(jnp.uint32), np.uint32(rows))
    return Phase(
        slot if t.ndim == 0 else lax.broadcasted_iota(jnp.uint32, (1, rows), 1) == slot[:, None],
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


def wrap(count: Array, rows: int) -> Array:
    """A count as the counter stores it: past ``_WRAP``, stepped back by
    :func:`wrap_period`, to above every schedule threshold (so slots and phases
    are unchanged; the training step reads its one step wrapped)."""
    return S.where(count > _WRAP, count - wrap_period(rows), count)


class Rows(NamedTuple):
    """The window rows of a one-group call (``G = 1``), ``[R, *features]``, laid
    out once for its forward and its backward pass."""

    row: Array  # bool: the slot the step writes
    used: Array  # bool: the rows its statistics in use average (the slot alone in
    # the batch phase, else the m newest)
    weight: Array  # each one's weight in their mean: 1 or 1/m (the counter's dtype)


class Slide(NamedTuple):
    """How the ``G`` window steps of one call share the ring buffer.

    Group ``i`` writes slot ``t_i mod R`` and reads the last ``m`` writes up
    to its own: the values of groups ``i − m < j ≤ i`` (``in_window``) and the
    slots written before the call within its last ``m`` steps (``old_kept``).
    A plain call is ``G = 1``: its :class:`Rows` say it all.
    """

    in_window: Array  # [G, G]: group j's value is in group i's window
    old_kept: Array | None  # [G, R]: slot s holds a value from before the call in i's
    # window (G > 1)
    last: Array | None  # [G, R]: group j is the last to write slot s (G > 1)
    m: int  # the steps a window averages (<= R)
    rows: Rows | None  # G = 1, else None


def slide(slot_mask: Array, t: Array, use_batch, m: int, window_shape) -> Slide:
    """The :class:`Slide` of a call's window steps (the fields of :class:`Phase`)
    for windows of length ``m`` and shape ``window_shape``."""
    rows = window_shape[0]
    recent = None
    if m < rows:  # a slot's age: the steps since its last write, as of step t_i
        age = lax.rem(  # t >= 1: an unsigned rem is the mod
            jnp.reshape(t, (-1, 1)).astype(jnp.uint32) + np.arange(rows, 0, -1, dtype=np.uint32),
            np.uint32(rows),
        ).astype(jnp.int32)
        recent = age < m
    if t.ndim == 0:  # one window step (no ghost batches): nothing to slide
        return one_step(_rows(slot_mask, recent, use_batch, m, window_shape, t.dtype), m)
    groups = slot_mask.shape[0]
    i, j = jnp.arange(groups)[:, None], jnp.arange(groups)[None, :]
    in_window = (j <= i) & (j > i - m)
    if recent is None:
        old_kept = ~jnp.any(in_window[:, :, None] & slot_mask[None], axis=1)
    else:  # written before the call (age > i) and recent enough
        old_kept = recent & (age > i)
    later = jnp.cumsum(slot_mask[::-1], 0)[::-1] - slot_mask  # writes after group j
    return Slide(in_window, old_kept, slot_mask & (later == 0), m, None)


def one_step(rows: Rows, m: int) -> Slide:
    """The :class:`Slide` of a one-group call, from its :class:`Rows`."""
    return Slide(cast(Array, np.ones((1, 1), bool)), None, None, m, rows)


def _rows(slot, recent, use_batch, m: int, shape, dtype) -> Rows:
    row = lax.broadcasted_iota(slot.dtype, shape, 0) == slot
    if recent is None:  # m = R: every row
        used = row | ~use_batch
    else:
        used = S.where(use_batch, row, lax.broadcast_in_dim(recent[0], shape, (0,)))
    return Rows(row, used, S.where(use_batch, jnp.ones((), dtype), jnp.full((), 1 / m, dtype)))


def _dot(mask: Array, v: Array) -> Array:
    """``Σ_b mask[a, b] · v[b]``, exactly (no reduced-precision matmul)."""
    return jnp.tensordot(mask.astype(v.dtype), v, axes=(1, 0), precision=lax.Precision.HIGHEST)


def _masked_sum(mask: Array, v: Array) -> Array:
    """``Σ_b v[a, b]`` over the ``b`` where ``mask[a, b]``."""
    return S.where_lead(mask, v, 0.0).sum(1)


def _written(sl: Slide, window: Array, values: Array) -> Array:
    """One group's window with its value written, in the values' dtype: ``[R, *features]``."""
    return S.where(cast(Rows, sl.rows).row, values, window.astype(values.dtype))


def _in_use_one(
    sl: Slide, written: Array, zeros: Array | None = None, finite: Array | None = None
) -> Array:
    """One group's statistic in use, from its window with its value written: that
    value in the batch phase, else the mean of the ``m`` newest rows, ``[1,
    *features]``. It is one masked reduction (the batch phase sums the written
    row alone, exactly): XLA computes a reduction once and hands it on, whereas
    it copies a phase select behind one into every fusion that reads it.
    ``finite``: a window of the same shape whose non-finite entries make the
    statistic NaN in their channels (``v − v`` adds 0, or NaN), in the same pass."""
    rows = cast(Rows, sl.rows)
    # Weighted, not divided: XLA gives a division by a traced scalar a fusion of its own.
    mean = written * rows.weight.astype(written.dtype)
    zeros = jnp.zeros((), written.dtype) if zeros is None else zeros
    used = S.where(rows.used, mean, zeros)
    if finite is not None:
        used = used + (finite - finite).astype(used.dtype)
    return used.sum(0, keepdims=True)


def _window_mean(sl: Slide, window: Array, values: Array) -> Array:
    """Each of ``G > 1`` groups' window mean: ``[G, *features]``."""
    kept = cast(Array, sl.old_kept)
    return (_dot(sl.in_window, values) + _dot(kept, window.astype(values.dtype))) / sl.m


def in_use(sl: Slide, use_batch: Array, window: Array, values: Array) -> Array:
    """Each group's statistic in use (σ̃², Ψ̃, ...): its own value in the batch
    phase (``use_batch``), else its window mean; ``[G, *features]``."""
    if values.shape[0] == 1:
        return _in_use_one(sl, _written(sl, window, values))
    return S.where_lead(use_batch, values, _window_mean(sl, window, values))


def backward_windows(
    sl: Slide,
    use_batch: Array,
    window: Array,
    values: Array,
    cotangent: Array,
    zeros: Array | None = None,
) -> tuple[Array, Array]:
    """(each group's backward statistic in use, :func:`in_use`; the probe
    cotangent: ``cotangent`` in the slots the call writes, zeros elsewhere). One
    group whose cotangent is its value (the same array) takes the cotangent's
    row from the written window (``zeros``: the window's shape, to share)."""
    if values.shape[0] == 1 and cotangent is values:
        written = _written(sl, window, values)
        zeros = jnp.zeros_like(written) if zeros is None else zeros
        cot = S.where(cast(Rows, sl.rows).row, written, zeros).astype(window.dtype)
        return _in_use_one(sl, written, zeros), cot
    return in_use(sl, use_batch, window, values), final_window(
        sl, jnp.zeros_like(window), cotangent
    )


def final_window(sl: Slide, window: Array, values: Array) -> Array:
    """The window after the call: each written slot holds its last writer's value."""
    if values.shape[0] == 1:
        return S.where(cast(Rows, sl.rows).row, values.astype(window.dtype), window)
    last = cast(Array, sl.last)  # G > 1
    return S.where_lead(last.any(0), _dot(last.T, values).astype(window.dtype), window)


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
    """New (mean, var) windows and each group's (μ̃, σ̃²) in use. (Nothing
    differentiates the stored windows; reverse mode drops their linearization.)"""
    mean_window = None if mean_b is None else state.mean_window  # check_state: both or neither
    if var_b.shape[0] == 1:
        return _one_step_windows(state, sl, mean_window, mean_b, var_b)
    var_w = final_window(sl, state.var_window, var_b)
    if mean_window is None:
        return None, var_w, None, in_use(sl, use_batch, state.var_window, var_b)
    mean_w = final_window(sl, mean_window, mean_b)
    mu_win = _window_mean(sl, mean_window, mean_b)
    var_win = _window_mean(sl, state.var_window, var_b) + _spread(sl, mean_window, mean_b, mu_win)
    return (
        mean_w,
        var_w,
        S.where_lead(use_batch, mean_b, mu_win),
        S.where_lead(use_batch, var_b, var_win),
    )


def _one_step_windows(state: MABNState, sl: Slide, mean_window: Array | None, mean_b, var_b):
    """:func:`forward_windows` of one group: each window written once, and each
    statistic in use one masked reduction over it."""
    var_written = _written(sl, state.var_window, var_b)
    var_w = var_written.astype(state.var_window.dtype)
    # σ̃² is NaN where the Ψ window is not finite (an unrecorded step's reserved
    # slots, a poisoned state): the output is NaN then.
    psi = state.psi_window
    if mean_window is None:
        return None, var_w, None, _in_use_one(sl, var_written, finite=psi)
    mean_written = _written(sl, mean_window, mean_b)
    zeros = jnp.zeros_like(mean_written)
    mu = _in_use_one(sl, mean_written, zeros)
    # The law of total variance over the rows in use; the batch phase's one row
    # gives σ²_B + (μ_B − μ_B)² = σ²_B.
    var = _in_use_one(sl, var_written + jnp.square(mean_written - mu), zeros, finite=psi)
    return mean_written.astype(mean_window.dtype), var_w, mu, var


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
