"""``shard_map`` typing for MABN's custom VJP (no-ops outside ``shard_map``).

Inside ``shard_map`` every value has a manual-axis type: the mesh axes it
varies over. A custom VJP must return cotangents of its primals' types, so the
replicated parameters and the probes are cast to match the per-device input
and statistics.
"""

from __future__ import annotations

import jax
from jax import lax

Array = jax.Array


def varying_axes(x) -> frozenset:
    """The ``shard_map`` mesh axes ``x`` varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax >= 0.10; older versions call it `vma`
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def vary_like(v, axes: frozenset):
    """Marks ``v`` as varying over ``axes`` (a no-op outside shard_map).

    Inside ``shard_map`` a custom VJP's cotangents must have the manual-axis
    type of their primals: a replicated γ meets a per-device ``x`` here, so it
    is cast to varying first, and autodiff then sums its gradient over devices
    (the transpose of that cast), exactly as for a plain ``γ · x``.
    """
    missing = tuple(a for a in axes if a not in varying_axes(v))
    return lax.pcast(v, missing, to="varying") if missing else v


def probe_cotangent(stat: Array, probe: Array) -> Array:
    """A statistic as the probe's cotangent: its dtype and shard_map type."""
    return vary_like(stat.astype(probe.dtype), varying_axes(probe))


def check_probes_vary(probe: Array, stat: Array, axis_name) -> None:
    """Per-device statistics need per-device probes (and state) in shard_map."""
    per_device = varying_axes(stat) - varying_axes(probe)
    if per_device:
        raise ValueError(
            f"MABN: under shard_map the statistics vary over mesh axes {sorted(per_device)} "
            f"but the state/probes are replicated over them (axis_name="
            f"{axis_name!r}). Either shard the batch_stats (and so the probes) over "
            "those axes, e.g. in_specs P('batch') on a leading device axis, to keep "
            "per-device statistics, or set axis_name to the mesh axis to synchronize them."
        )
