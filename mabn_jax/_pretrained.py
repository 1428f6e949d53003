"""An MABN state started from a batch norm's running statistics (no Flax).

A trained ``BatchNorm`` keeps its population statistics ``μ`` (``mean``) and
``σ²`` (``var``); at inference it computes ``y = γ·(x − μ)/sqrt(σ² + ε) + β``.
The centered MABN computes ``y = γ·(x − ema_mean)/sqrt(ema_var + ε) + β`` at
inference, so with

    ema_mean = μ,   ema_var = σ²

(and the same ``γ``, ``β``, ``ε``) the two are the same function. Its training
step reads the forward windows, so they start from the same statistics:

    mean_window[s] = μ,   var_window[s] = σ²      for every slot s

which makes the first window averages ``μ̃ = μ`` and ``σ̃² = σ² + 0`` (the
between-step spread of identical means is zero), i.e. the pretrained
statistics, moved by ``1/m`` of each new batch per step. The counter starts
past the batch phase and the renormalization start,

    step = max(buffer_size, warmup_steps, renorm_start),

so the first step already normalizes with the windows and renormalizes by
``r``, ``d`` towards the pretrained EMA (which is a population statistic, not
an EMA still warming up from ``ema_var = 1``). The backward windows ``Ψ``,
``g`` have no counterpart in a batch norm: they start at zero, the value for
which MABN's gradient ``(ĝ − g̃ − z·Ψ̃)/σ̃`` is that of a norm with constant
statistics (a frozen BN's gradient). In the window phase ``Ψ̃`` and ``g̃`` are
means over all ``m`` slots, so the first step uses ``Ψ_B/m``, and after ``m``
steps the window holds only measured values: the gradient moves from frozen
BN's to MABN's over one window.

The plain (non-centered) MABN cannot start from a batch norm: it normalizes by
the second moment ``E[x²] = σ² + μ²``, which equals the variance only after
weight-centralized layers, and centering a pretrained kernel changes the
function it computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mabn_jax import _shell
from mabn_jax._config import MABNConfig
from mabn_jax._state import MABNState

__all__ = [
    "start_step",
    "state_from_batchnorm",
    "check_statistics",
    "converter_config",
    "PLAIN_REFUSED",
]

# Structural or function-changing: taken from each batch norm, refused in a
# converter's mabn_config (linen and NNX alike).
REFUSED = (
    "epsilon",
    "axis",
    "use_bias",
    "use_scale",
    "param_dtype",
    "dtype",
    "use_running_average",
    "bias_init",
    "scale_init",
    "force_float32_reductions",
    "num_features",
    "promote_dtype",
)

PLAIN_REFUSED = (
    "centered=False (the plain MABN) cannot replace a pretrained nn.BatchNorm: it "
    "normalizes by E[x²] = σ² + μ², equal to the variance only after weight-centralized "
    "convolutions, and centering a pretrained kernel changes the function it computes. "
    "Leave centered at its default (True) here; to train the paper's plain layer from "
    "scratch, build the model with mabn_jax.CenteredConv and mabn_jax.MABN instead."
)


# What a converter's mabn_config takes.
_TAKEN = tuple(f.name for f in dataclasses.fields(MABNConfig) if f.name not in REFUSED)


def converter_config(mabn_config: Mapping[str, Any], caller: str) -> dict[str, Any]:
    """A converter's ``mabn_config``, validated (names and values), with
    ``centered=True`` (the only variant a batch norm converts to)."""
    refused = sorted(set(mabn_config) & set(REFUSED))
    if refused:
        raise TypeError(
            f"{caller}: {refused[0]!r} is taken from each batch norm (the converted model "
            "must compute what the batch norm model computes); change it in the model, not "
            "here. mabn_config takes MABN's hyper-parameters: "
            f"{', '.join(_TAKEN)}."
        )
    config = dict(mabn_config)
    config.setdefault("centered", True)
    if config["centered"] is False:
        raise ValueError(f"{caller}: {PLAIN_REFUSED}")
    _shell.make_config(MABNConfig, config, caller, "a model")  # fails by name
    return config


def start_step(config: MABNConfig) -> int:
    """The counter a converted layer starts at: past the batch phase
    (``t > m``, ``t ≥ warmup_steps``) and the renormalization start."""
    return max(config.window, config.warmup_steps, config.renorm_start)


def check_statistics(mean: Any, var: Any, layer: str, caller: str) -> None:
    """Raises unless ``mean`` is finite and ``var`` finite and ``>= 0``.

    A corrupt pretrained statistic would not fail by itself: a NaN makes every
    training step non-finite (each one skipped, forever), and a variance just
    below zero (``−ε/2``, from a one-pass ``E[x²] − E[x]²``) makes
    ``1/sqrt(σ² + ε)`` huge, so training diverges. Traced values (a
    conversion under ``jit``) cannot be read and are not checked.
    """
    if isinstance(mean, jax.core.Tracer) or isinstance(var, jax.core.Tracer):
        return
    mean, var = np.asarray(mean), np.asarray(var)
    for name, values, bad in (
        ("mean", mean, ~np.isfinite(mean)),
        ("var", var, ~np.isfinite(var) | (var < 0)),
    ):
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            what = "not finite" if name == "mean" else "negative or not finite"
            at = f"{name}[{', '.join(map(str, index))}] = {float(values[index]):.6g}"
            raise ValueError(
                f"{caller}: the batch norm at {layer!r} has an invalid running {name}: {at} "
                f"({int(bad.sum())} of {bad.size} entries are {what}"
                "). Its training must have diverged or the checkpoint is corrupt; convert "
                "from a healthy checkpoint, or repair the statistics first (e.g. "
                "var = max(var, 0), or recompute them over some batches of data)."
            )


def state_from_batchnorm(
    mean: Any, var: Any, config: MABNConfig, *, lead: int = 0, dtype: Any = jnp.float32
) -> MABNState:
    """The centered MABN state equivalent to a batch norm's ``(mean, var)``
    (checked first with :func:`check_statistics` by the converters).

    Args:
      mean, var: the batch norm's running statistics, ``[*lead_axes, *features]``.
      config: the MABN layer's hyper-parameters (``centered`` must be True).
      lead: how many leading axes ``mean`` and ``var`` have besides the
        features (stacked layers of ``nn.scan``/``nnx.vmap``); the windows get
        their slot axis after them, as the layers' own state has it.
      dtype: the state's dtype.
    """
    if not config.centered:
        raise ValueError(f"convert: {PLAIN_REFUSED}")
    mean, var = jnp.asarray(mean, dtype), jnp.asarray(var, dtype)
    if mean.shape != var.shape:
        raise ValueError(
            f"convert: the batch norm's mean {mean.shape} and var {var.shape} "
            "have different shapes; pass one layer's batch_stats."
        )
    m = config.window
    window = lambda v: jnp.broadcast_to(
        jnp.expand_dims(v, lead), v.shape[:lead] + (m,) + v.shape[lead:]
    )
    zeros = jnp.zeros(mean.shape[:lead] + (m,) + mean.shape[lead:], dtype)
    counter = lambda value: jnp.full(mean.shape[:lead], value, dtype)
    return MABNState(
        step=counter(start_step(config)),
        var_window=window(var),
        psi_window=zeros,
        ema_var=var,
        skipped=counter(0),
        mean_window=window(mean),
        g_window=zeros,
        ema_mean=mean,
    )
