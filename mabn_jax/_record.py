"""Writing a step's backward statistics (Ψ_B, g_B) into the windows.

The training forward pass reserves the Ψ (g) slots it will own by writing NaN
there (+inf if its batch statistics were not finite: the record then undoes
the step); :func:`record_backward_stats` fills exactly those slots from the
probe gradients. Because the reservation is in the state itself, misuse shows:

* never recording leaves NaN in the windows, and the next training output is NaN;
* trees that are not one training ``apply`` apart (swapped, stale, recorded
  twice) raise a ``ValueError`` when the call runs eagerly, and under ``jit``
  give a state whose statistics are all NaN, so the next training loss is NaN.

A layer that the step did not apply in training mode (frozen with
``use_running_average=True``, or not called) is returned as it was: its state
is ``previous`` itself and its probes received no gradient.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mabn_jax import _stats as S
from mabn_jax._state import MABNState, Probes
from mabn_jax._window import as_count, wrap_period

__all__ = ["record_backward_stats"]

_NOT_ONE_APPLY_APART = (
    "record_backward_stats: the trees are not one training apply apart. Pass (1) the "
    "state returned by this step's training-mode apply, (2) the gradients w.r.t. the "
    "probes of that same apply, and (3) previous= the state given to that apply, in "
    "that order, once per step; or use mabn_jax.value_and_grad, which does all three. "
    "(Under jit the result is a state of NaN statistics instead, so the next training "
    "loss is NaN.)"
)


_STATISTICS = ("var_window", "psi_window", "ema_var", "mean_window", "g_window", "ema_mean")


def record_backward_stats(state: MABNState, probe_grads: Probes, previous: MABNState) -> MABNState:
    """Fills this step's reserved Ψ (g) slots from the probes' gradients.

    Args:
      state: the state returned by the training step (its slots reserved).
      probe_grads: the gradient of the loss w.r.t. that step's probes,
        unscaled (divide by the loss scale if the loss was scaled).
      previous: the state given to that training step.

    Returns:
      ``state`` with its reserved slots filled; if the step's backward
      statistics are not finite, ``previous`` with ``skipped`` one higher
      (the state of a run that never saw the batch, apart from the counter).
      A layer not applied in training mode by the step (``state`` equal to
      ``previous``, zero ``probe_grads``) is returned unchanged.
      Leading ``vmap``/``nn.scan`` axes are supported.

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax.functional as F
      >>> config = F.MABNConfig(buffer_size=4)
      >>> state = F.init_state((2,), config)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> scale, bias = jnp.ones(2), jnp.zeros(2)
      >>> def loss_fn(probes):
      ...     y, new_state = F.mabn_train(x, scale, bias, state, probes, config)
      ...     return jnp.mean(y**2), new_state
      >>> probe_grads, new_state = jax.grad(loss_fn, has_aux=True)(F.init_probes(state))
      >>> new_state = F.record_backward_stats(new_state, probe_grads, previous=state)
      >>> new_state.psi_window.shape
      (4, 2)
    """
    _check_structure(state, probe_grads, previous)
    traced = isinstance(state.step, jax.core.Tracer)
    record = _record_step if traced else _record  # eagerly op by op, as eager JAX runs
    result, consistent, uses = record(state, probe_grads, previous)
    # Eagerly the check can raise; traced (a jax.core.Tracer) it poisons instead.
    # Never bool() a tracer to find out: JAX's error for it walks the whole graph.
    if not isinstance(consistent, jax.core.Tracer) and not bool(jnp.all(consistent)):
        raise ValueError(_uses_error(uses) or _NOT_ONE_APPLY_APART)
    return result


def _record(state: MABNState, probe_grads: Probes, previous: MABNState):
    """(the recorded state, whether the trees are one apply apart, the uses)."""
    lead = state.step.ndim

    def fill(window, grads):
        return (
            None
            if window is None
            else S.where(jnp.isnan(window), grads.astype(window.dtype), window)
        )

    filled = state._replace(
        psi_window=fill(state.psi_window, probe_grads.psi),
        g_window=fill(state.g_window, probe_grads.g),
    )
    consistent, uses = _one_apply_apart(state, previous, probe_grads)
    # One flag, one select per leaf: a step whose statistics are not finite (a bad
    # batch's NaN reaches Ψ_B through 1/σ̃) is undone; trees that are not one apply
    # apart give NaN statistics (the next training output, and inference, are NaN).
    ok = S.all_finite(filled.psi_window, filled.g_window, lead_axes=lead, given=consistent)
    # NaN statistics as one product per leaf: `a · 1` is `a` exactly, `a · NaN` NaN.
    dtype = previous.var_window.dtype
    factor = S.where(consistent, np.ones((), dtype), np.full((), np.nan, dtype))
    poison = lambda a: None if a is None else a * S.lead(factor, a)
    poisoned: dict[str, Any] = {name: poison(getattr(previous, name)) for name in _STATISTICS}
    undone = previous._replace(skipped=previous.skipped + 1, **poisoned)
    return S.select(ok, filled, undone), consistent, uses


# Traced once per layer shape (a deep model's layers share it), inlined as _train_step.
_record_step = jax.jit(_record, inline=True)


def _one_apply_apart(
    new: MABNState, previous: MABNState, probe_grads: Probes
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Whether ``new`` is ``previous`` after one training step (per leading index),
    and, where the helper counted them, the layer's uses and whether it stepped.

    A step of ``a`` window steps reserves the ``min(a, R)`` slots it wrote, the
    rows ``t − k mod R`` (``k < min(a, R)``, ``t`` its last step): they and only
    they are non-finite in ``new``'s Ψ window (the other rows are ``previous``'s,
    which has no reserved slot). The step leaves ``skipped`` alone (only the
    record undoes a step). The layer stepped (``a >= 1``: applied once) or was
    not applied (``a = 0``: ``new`` is ``previous``, and the probes got no
    gradient: zero, or counted, no use). One reduction over the Ψ window, with
    the few scalar tests folded into it: the flag is computed once.
    """
    lead = new.step.ndim
    psi = new.psi_window
    rows = psi.shape[lead]
    # After lax.pmean over devices of which some skipped, the counters are
    # fractional: `step` is read rounded (as the training step reads it). The
    # forward copies `skipped`, so it is compared as it is. Floats hold the counts
    # exactly (_WRAP).
    t = as_count(new.step)
    advance = t - as_count(previous.step)
    advance = S.where(advance < 0, advance + wrap_period(rows), advance)
    stepped = advance >= 1
    if probe_grads.uses is None:  # the low-level API: a frozen layer's probes got zeros
        frozen = functools.reduce(
            jnp.logical_and,
            [
                (g == 0).all(axis=tuple(range(lead, g.ndim)))
                for g in (probe_grads.psi, probe_grads.g)
                if g is not None
            ],
        )
        applied_right, uses = stepped | frozen, None
    else:  # counted (value_and_grad): one use if it stepped, else none
        uses = as_count(probe_grads.uses)
        applied_right = uses == stepped.astype(uses.dtype)
    given = applied_right & (new.skipped == previous.skipped)
    # Row r was written by the step iff its age (t − r) mod R is below min(a, R).
    ages = np.arange(rows, 0, -1, dtype=np.uint32)  # R − r: the age at t = 0 (mod R)
    per_row = lambda v: v if v.ndim == 0 else v[..., None]
    age = lax.rem(per_row(t.astype(jnp.uint32)) + ages, np.uint32(rows)).astype(t.dtype)
    reserved = age < per_row(jnp.minimum(advance, rows))
    # Reserved: NaN, or +inf where the forward failed (the record then undoes the step).
    as_psi = lambda v: lax.broadcast_in_dim(v, psi.shape, tuple(range(v.ndim)))
    agree = (jnp.isfinite(psi) != as_psi(reserved)) & as_psi(given)
    consistent = agree.all(axis=tuple(range(lead, psi.ndim)))
    return consistent, None if uses is None else (uses, stepped)


def _uses_error(counted) -> str | None:
    """The message for a layer whose applications in the step were not one
    (``counted``: its uses and whether it stepped, or ``None``)."""
    if counted is None:
        return None
    uses, stepped = counted
    uses = jnp.where(stepped, uses, 1)  # a layer that did not step was not applied
    if bool(jnp.any(uses >= 2)):
        return (
            f"MABN: a layer was applied in training mode {int(jnp.max(uses))} times in one "
            "loss with the same batch_stats (e.g. two views of a batch, each through its "
            "own jax.jit, or both through jax.vmap): their backward statistics would be "
            "added into one window slot. Apply the model once per step, on the views "
            "concatenated into one batch (or give each apply its own layers)."
        )
    if bool(jnp.any(uses == 0)):
        return (
            "MABN: a layer stepped in training mode, but its probes received no gradient, so "
            "its backward statistics would be recorded as 0. Its params were cut from the "
            "gradient (jax.lax.stop_gradient, e.g. to freeze γ/β) where the model runs "
            "inside a transform of the loss (jax.jit of apply, jax.checkpoint, nn.scan, "
            "nn.remat; NNX: a stop_gradient over the model's state before nnx.jit / "
            "nnx.remat), which read the probes that travel in the params (NNX: the Probe "
            "variables). Freeze γ/β in the optimizer instead (optax.masked / "
            "optax.set_to_zero; NNX: stop the gradient of the nnx.Param variables only, or "
            "nnx.DiffState), or stop the gradient outside the transform."
        )
    return None


def _check_structure(state: MABNState, probe_grads: Probes, previous: MABNState) -> None:
    """Same layer for all three (trace time): variant and shapes."""
    if not isinstance(previous, MABNState):
        raise TypeError(
            "record_backward_stats: previous must be the state given to the "
            f"training step, got {type(previous).__name__}."
        )
    pairs = [
        ("previous", previous.psi_window, state.psi_window),
        ("probe_grads.psi", probe_grads.psi, state.psi_window),
    ]
    if state.centered != previous.centered or state.centered != (probe_grads.g is not None):
        raise ValueError(
            "record_backward_stats: state, previous and probe_grads mix centered "
            "and plain layers; pass the three trees of one layer and one step."
        )
    if probe_grads.g is not None and state.g_window is not None:  # centered (checked above)
        pairs.append(("probe_grads.g", probe_grads.g, state.g_window))
    for name, got, want in pairs:
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(
                f"record_backward_stats: {name} has shape {tuple(got.shape)} but "
                f"the state's window is {tuple(want.shape)}; pass the trees of "
                "one layer and one step."
            )
