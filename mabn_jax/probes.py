"""Train-step helpers for Flax variable trees: create probes, record Ψ_B/g_B.

A standard Flax train step becomes an MABN train step with four changes::

    def loss_fn(params, probes):                                      # 1
        logits, updates = state.apply_fn(
            {'params': params, 'batch_stats': state.batch_stats,
             'mabn_probes': probes},                                  # 2
            x, train=True, mutable=['batch_stats'])
        return loss(logits, y), updates
    (loss, updates), (grads, stats) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(
        state.params, mabn_jax.init_probes(state.batch_stats))        # 3
    state = state.apply_gradients(grads=grads)
    state = state.replace(batch_stats=mabn_jax.record_backward_stats(
        updates['batch_stats'], stats, previous=state.batch_stats))   # 4

``previous=`` lets a step with non-finite backward statistics leave the state
exactly as it was (see ``skip_nonfinite``). The probe gradients ``stats`` are per-device values (or already synchronized
across ``axis_name`` by the layer); keep them out of any ``pmean`` of ``grads``.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax.core import FrozenDict

from mabn_jax import functional as F

__all__ = ["init_probes", "record_backward_stats"]

def _rebuild(like: Mapping, items: dict):
    return FrozenDict(items) if isinstance(like, FrozenDict) else items


def init_probes(batch_stats: Mapping[str, Any], num_groups: int = 1) -> Any:
    """Zero probes for every MABN layer in a ``batch_stats`` tree.

    Returns a tree with the same nesting as the MABN layers in ``batch_stats``
    (``{'psi': ...}``, plus ``'g'`` for centered layers) to pass as the
    ``'mabn_probes'`` collection and to differentiate with respect to.
    ``num_groups``: for layers with ghost batches, ``batch // norm_batch_size``
    (the probes get one row per group); all MABN layers of the tree get it.
    """
    state = F.state_from_mapping(batch_stats)
    if state is not None:
        out = {k: v for k, v in F.init_probes(state, num_groups)._asdict().items()
               if v is not None}
        return _rebuild(batch_stats, out)
    out = {}
    for key, node in batch_stats.items():
        if isinstance(node, Mapping):
            sub = init_probes(node, num_groups)
            if sub:
                out[key] = sub
    return _rebuild(batch_stats, out)


def record_backward_stats(batch_stats: Mapping[str, Any], probe_grads: Mapping[str, Any],
                          previous: Mapping[str, Any] | None = None, *,
                          skip_nonfinite: bool = True) -> Any:
    """Writes each layer's Ψ_B (and g_B) from ``probe_grads`` into its windows.

    ``batch_stats`` must be the tree returned by the training-mode ``apply``
    of this same step (its ``step`` already advanced), and ``probe_grads`` the
    gradient of the loss w.r.t. the probes of :func:`init_probes`.

    ``previous``, the ``batch_stats`` passed to that ``apply``, lets a layer
    whose backward statistics are non-finite return to it (counting the step
    in ``skipped``) instead of keeping the step's forward statistics; see
    :func:`mabn_jax.functional.record_backward_stats`.
    """
    state = F.state_from_mapping(batch_stats)
    if state is not None:
        prev = None if previous is None else F.state_from_mapping(previous)
        if previous is not None and type(prev) is not type(state):
            raise ValueError("record_backward_stats: previous has another layout than "
                             "batch_stats; pass the batch_stats given to the same apply.")
        new = F.record_backward_stats(state, F.Probes(probe_grads["psi"], probe_grads.get("g")),
                                      prev, skip_nonfinite=skip_nonfinite)
        return _rebuild(batch_stats, new._asdict())
    out = dict(batch_stats)
    for key, grads in probe_grads.items():
        if key not in batch_stats:
            raise KeyError(f"record_backward_stats: probe gradients for {key!r} have no "
                           "matching entry in batch_stats; pass the batch_stats returned "
                           "by the same apply call.")
        out[key] = record_backward_stats(
            batch_stats[key], grads, None if previous is None else previous[key],
            skip_nonfinite=skip_nonfinite)
    return _rebuild(batch_stats, out)
