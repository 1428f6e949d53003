"""Hyper-parameters: one home for each layer's, with their validation.

:class:`MABNConfig` and :class:`BatchRenormConfig` are keyword-only
dataclasses. The Flax modules inherit them, so each hyper-parameter is
declared, defaulted, documented and validated here and nowhere else; the pure
functions take them as static (hashable) arguments.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
from typing import Any

import numpy as np

__all__ = ["MABNConfig", "BatchRenormConfig", "config_of"]

# Counters are floats (so `jax.grad` over a whole variables dict and
# `lax.pmean(batch_stats)` work, as for nn.BatchNorm); schedule thresholds must
# stay well inside float32's exact-integer range (see _window.advance).
MAX_SCHEDULE_STEP = 2**22
# buffer_size=None: the rows of the stored windows (both variants), and the
# centered layer's window length per layer (docs/centered.md, issue 30 item 16).
DEFAULT_BUFFER_SIZE = 16
# The centered layer's default window spans about this many values per channel
# and example: m = clip(ceil(_SPAN / positions), _MIN_WINDOW, DEFAULT_BUFFER_SIZE).
_SPAN = 16
_MIN_WINDOW = 2


class _DefaultWindow(int):
    """A ``buffer_size`` that was left ``None``: the default window.

    It is the int (``MABNConfig().buffer_size == 16``), and it says where it
    came from, so that ``dataclasses.replace(config, centered=True)`` gives the
    centered layer its per-layer window (:meth:`~mabn_jax.MABNConfig.window_length`)
    instead of a fixed one.
    """

    def __repr__(self) -> str:
        return int.__repr__(self)


def _fail(layer: str, name: str, value: Any, want: str) -> None:
    raise ValueError(f"{layer}: {name}={value!r} is invalid; {name} must be {want}.")


def check_int(
    layer: str,
    name: str,
    value: Any,
    minimum: int,
    maximum: int | None = None,
    allow_none: bool = False,
) -> int | None:
    """``value`` as a Python int (NumPy integers accepted, bools rejected)."""
    if value is None and allow_none:
        return None
    want = f"an int >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    if allow_none:
        want += ", or None"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        _fail(layer, name, value, f"{want} (got a {type(value).__name__})")
    value = operator.index(value)
    if value < minimum or (maximum is not None and value > maximum):
        _fail(layer, name, value, want)
    return value


def check_float(
    layer: str,
    name: str,
    value: Any,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
    allow_none: bool = False,
) -> float | None:
    """``value`` as a Python float in the given range (bools and strings rejected)."""
    if value is None and allow_none:
        return None
    lo, hi = ("(" if low_open else "["), ("" if high is None else (")" if high_open else "]"))
    want = f"a float in {lo}{low}, {'inf)' if high is None else f'{high}{hi}'}" + hint
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        _fail(layer, name, value, f"{want} (got a {type(value).__name__})")
    value = float(value)
    below = value <= low if low_open else value < low
    above = high is not None and (value >= high if high_open else value > high)
    if below or above or value != value:
        _fail(layer, name, value, want)
    return value


def check_bool(layer: str, name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        _fail(layer, name, value, f"True or False (got a {type(value).__name__})")
    return bool(value)


def _groups(value: Any) -> tuple[tuple[int, ...], ...] | None:
    """``axis_index_groups`` as nested tuples, so the config stays hashable."""
    return None if value is None else tuple(tuple(int(i) for i in g) for g in value)


def config_of(cls: type, obj: Any):
    """The ``cls`` config holding ``obj``'s values of its fields (e.g. a module's)."""
    return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(unsafe_hash=True, kw_only=True)
class _NormConfig:
    """What every batch-statistics layer here shares with ``nn.BatchNorm``.

    Attributes:
      momentum: EMA decay ``α``: ``ema ← α·ema + (1 − α)·batch`` (Flax's and
        Keras' convention; PyTorch's ``momentum`` is ``1 − α``).
      epsilon: added to the variance (second moment) before the square root.
      axis_name: named axis (``pmap``/``shard_map``) over which the batch
        statistics are averaged (synchronized batch norm); ``None``: per device.
      axis_index_groups: subgroups of ``axis_name`` to average within.
      use_fast_variance: compute a centered layer's variance in one pass as
        ``E[x²] − E[x]²`` (faster, and ``nn.BatchNorm``'s default) instead of
        two passes as ``E[(x − E[x])²]``. The one-pass form loses precision
        when the mean is large against the spread, which is the common case
        at the normalization batches of 1–4 these layers exist for, so the
        default here is ``False``. The non-centered MABN computes ``E[x²]``
        either way.
      force_float32_reductions: reduce in at least float32 (as in
        ``nn.BatchNorm``); ``False`` reduces in the input's dtype.
      norm_batch_size: ghost batches: examples per normalization group along
        axis 0 of the input (which must be the batch axis); each group of
        consecutive examples is normalized with its own statistics. ``None``:
        the whole batch is one group.
    """

    momentum: float = 0.99
    epsilon: float = 1e-5
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    norm_batch_size: int | None = None

    def _check_common(self, layer: str) -> dict[str, Any]:
        return dict(
            momentum=check_float(
                layer,
                "momentum",
                self.momentum,
                0.0,
                1.0,
                high_open=True,
                hint=" (a decay: new = momentum*old + (1-momentum)*batch)",
            ),
            epsilon=check_float(layer, "epsilon", self.epsilon, 0.0, low_open=True),
            axis_index_groups=_groups(self.axis_index_groups),
            use_fast_variance=check_bool(layer, "use_fast_variance", self.use_fast_variance),
            force_float32_reductions=check_bool(
                layer, "force_float32_reductions", self.force_float32_reductions
            ),
            norm_batch_size=check_int(
                layer, "norm_batch_size", self.norm_batch_size, 1, allow_none=True
            ),
        )


# eq=False: the comparison below also tells a default window from the same
# number given (they differ for the centered layer), as jit's static arguments
# must: equal configs share one trace.
@dataclasses.dataclass(eq=False, kw_only=True)
class MABNConfig(_NormConfig):
    """Hyper-parameters of one MABN layer (static: changing one recompiles).

    Besides the attributes every norm shares (``momentum``, here 0.98, the
    paper's; ``epsilon``, ``axis_name``, ``axis_index_groups``,
    ``use_fast_variance``, ``force_float32_reductions``, ``norm_batch_size``;
    as in ``nn.BatchNorm``):

    Attributes:
      buffer_size: ``m``, the steps in the simple-moving-average windows
        (the paper: real batch / normalization batch, 16 for ImageNet).
        ``None`` (default): 16 for the plain layer. The centered layer
        averages the last ``m = clip(⌈16 / positions⌉, 2, 16)`` steps,
        ``positions`` being the values per channel of one example (1 after
        ``nn.Dense``, H·W after a conv): 16 on dense features, 4 on a 2×2
        map, 2 from 3×3 up (:meth:`window_length`). The linen layer stores
        those ``m`` steps (it sees the input at ``init``); the NNX layer,
        built before it sees an input, stores 16 and reads the last ``m``.
        A window averages statistics measured under the last ``m``
        versions of the weights: ``μ̃ = mean(μ_w)`` lags the current mean
        by ``(m − 1)/2`` optimizer steps, and the centered layer's mean
        (and g, σ², Ψ) follows every update of a plain ``nn.Conv``; a
        short window is noisy where a step normalizes few values. On a
        small ResNet at a true batch of 2 and learning rate 0.1 ``m = 16``
        failed in 7 of 8 seeds where ``m = 2`` trained, and on an MLP
        ``m = 2`` cost 2–4 points where ``m = 16`` did not
        (``docs/centered.md``). With ghost batches (``G`` groups per
        optimizer step) the paper's ``m = G`` spans one step: set it.
      warmup_steps: while ``t < warmup_steps`` the batch statistics are used.
      renorm_start: renormalization by ``r`` (and ``d``) starts after step
        ``max(renorm_start, warmup_steps)``.
      r_max: ``r`` is clipped to ``[1/r_max, r_max]``.
      centered: ``True`` (default) also moving-averages the mean and g, and
        renormalizes by ``d``: it trains after any layer. ``False`` is the
        paper's final MABN (second moment only, backward Ψ only): it
        assumes zero-mean inputs, i.e. weight-centralized layers before it
        (``CenteredConv``, ``CenteredDense``, or ``nn.Conv`` trained with
        :func:`mabn_jax.optax.centralize`); after a plain ``nn.Conv`` it lost
        7 of 8 seeds at learning rate 0.1 (``docs/centered.md``).
      d_max: centered only: ``d`` is clipped to ``[−d_max, d_max]``.
      ghost_ema: with ghost batches (``norm_batch_size``), how the EMA follows
        the groups. ``'step'`` (default) follows the authors' simulated-small-
        batch layer: one update per training call with the mean of the
        groups' statistics, set to that mean by the first call, and ``r``, ``d``
        of every group measured against the EMA from before the call.
        ``'group'``: one update per group, as if each group were a step.

    Steps ``t`` count window steps: one per call, or one per group with ghost
    batches. ``warmup_steps`` and ``renorm_start`` must be at most 2**22.

    Raises:
      ValueError: a hyper-parameter out of its range (named in the message).

    Example:
      >>> import mabn_jax
      >>> mabn_jax.MABNConfig(buffer_size=4).momentum
      0.98
      >>> mabn_jax.MABNConfig(buffer_size=0)
      Traceback (most recent call last):
      ...
      ValueError: MABN: buffer_size=0 ...
    """

    momentum: float = 0.98
    buffer_size: int | None = None
    warmup_steps: int = 100
    renorm_start: int = 1000
    r_max: float = 5.0
    centered: bool = True
    d_max: float = 5.0
    ghost_ema: str = "step"

    def __post_init__(self):
        self._validate()

    def _key(self) -> tuple:
        fields = (getattr(self, f.name) for f in dataclasses.fields(self))
        return (isinstance(self.buffer_size, _DefaultWindow), *fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def window(self) -> int:
        """The rows the windows store, ``buffer_size`` or 16 where that is ``None``.

        Example:
          >>> import mabn_jax
          >>> mabn_jax.MABNConfig().window, mabn_jax.MABNConfig(buffer_size=4).window
          (16, 4)
        """
        return self.buffer_size or DEFAULT_BUFFER_SIZE

    @property
    def window_per_layer(self) -> bool:
        """Whether each layer sizes its window (:meth:`window_length`), as a
        centered layer whose ``buffer_size`` was left ``None`` does."""
        default = self.buffer_size is None or isinstance(self.buffer_size, _DefaultWindow)
        return bool(self.centered) and default  # None: a module's own field

    def window_length(self, positions: int) -> int:
        """``m``, the steps a window averages, for inputs of ``positions`` values
        per channel and example: :attr:`window` but for a centered layer
        whose ``buffer_size`` was left ``None``, where it is
        ``clip(⌈16 / positions⌉, 2, 16)``.

        Args:
          positions: values per channel of one example (the product of the
            reduced axes but the batch's; 1 for ``[batch, features]``).

        Returns:
          ``m``, at most :attr:`window`.

        Example:
          >>> import mabn_jax
          >>> config = mabn_jax.MABNConfig(centered=True)
          >>> [config.window_length(p) for p in (1, 2, 4, 9, 64)]
          [16, 8, 4, 2, 2]
          >>> mabn_jax.MABNConfig(centered=False).window_length(64)
          16
        """
        if not self.window_per_layer:
            return self.window
        span = -(-_SPAN // max(int(positions), 1))
        return min(max(span, _MIN_WINDOW), self.window)

    def _validate(self, layer: str = "MABN") -> None:
        """Checks (and canonicalizes to Python types) every hyper-parameter."""
        values = self._check_common(layer)
        centered = check_bool(layer, "centered", self.centered)
        given = None if isinstance(self.buffer_size, _DefaultWindow) else self.buffer_size
        values.update(
            buffer_size=check_int(layer, "buffer_size", given, 1, allow_none=True)
            or _DefaultWindow(DEFAULT_BUFFER_SIZE),
            warmup_steps=check_int(layer, "warmup_steps", self.warmup_steps, 0, MAX_SCHEDULE_STEP),
            renorm_start=check_int(layer, "renorm_start", self.renorm_start, 0, MAX_SCHEDULE_STEP),
            r_max=check_float(
                layer, "r_max", self.r_max, 1.0, hint=" (r is clipped to [1/r_max, r_max])"
            ),
            d_max=check_float(
                layer, "d_max", self.d_max, 0.0, hint=" (d is clipped to [-d_max, d_max])"
            ),
            centered=centered,
        )
        if values["buffer_size"] > MAX_SCHEDULE_STEP:
            _fail(layer, "buffer_size", self.buffer_size, f"<= {MAX_SCHEDULE_STEP}")
        if self.ghost_ema not in ("step", "group"):
            _fail(layer, "ghost_ema", self.ghost_ema, "'step' or 'group'")
        for name, value in values.items():
            object.__setattr__(self, name, value)


@dataclasses.dataclass(unsafe_hash=True, kw_only=True)
class BatchRenormConfig(_NormConfig):
    """Hyper-parameters of Batch Renormalization (Ioffe 2017).

    Besides the attributes every norm shares (``momentum``, ``epsilon``,
    ``axis_name``, ``axis_index_groups``, ``use_fast_variance``,
    ``force_float32_reductions``, ``norm_batch_size``; as in ``nn.BatchNorm``):

    Attributes:
      r_max: final upper clip of ``r`` (the paper: 3); ``inf``: no upper clip.
      d_max: final clip of ``d`` to ``[−d_max, d_max]`` (the paper: 5); ``inf``:
        no clip.
      r_min: final lower clip of ``r``, in ``[0, 1]``; ``None`` (default):
        ``1/r_max``, the paper's symmetric clip. Keras' ``renorm_clipping``
        without ``'rmin'`` is ``r_min=0.0``.
      warmup_steps: training steps with ``r = 1, d = 0`` (plain batch norm).
      ramp_steps: steps over which the clips of ``r`` then move linearly from
        1 to ``r_max`` (and ``r_min``); 0: at once. The ``t``-th step after
        warm-up (``t = 1, 2, …``) uses the fraction ``min(t / ramp_steps, 1)``.
      d_ramp_steps: the same for ``d``'s clip (0 → ``d_max``); ``None``:
        ``ramp_steps``. The paper relaxes ``r`` and ``d`` at different rates:
        ``warmup_steps=5000, ramp_steps=35000, d_ramp_steps=20000`` (``r_max``
        reached at step 40k, ``d_max`` at 25k). An infinite limit is reached
        at the ramp's first step.
      renorm_momentum: decay of the moving averages ``r`` and ``d`` are
        measured against; ``None`` uses ``momentum`` (one set of averages, as
        in the paper and sbx; Keras' default is a separate 0.99).
      average_stddev: ``False``: the moving averages follow the batch
        variance ``σ²_B`` (as ``nn.BatchNorm`` and sbx). ``True``: they follow
        the standard deviation ``sqrt(σ²_B + ε)``, as the paper's Algorithm 1
        and Keras 3 do; ``var`` and ``renorm_var`` then hold ``std² − ε``
        (clipped at 0), so inference ``(x − mean) / sqrt(var + ε)`` divides by
        the averaged ``std``.

    Momentum conventions: ``momentum`` is a decay (``0.99`` here is
    PyTorch's ``momentum=0.01`` and Keras' ``momentum=0.99``).

    Raises:
      ValueError: a hyper-parameter out of its range (named in the message).

    Example:
      >>> import mabn_jax
      >>> config = mabn_jax.BatchRenormConfig(r_max=2.0)
      >>> config.r_max, config.d_max
      (2.0, 5.0)
    """

    r_max: float = 3.0
    d_max: float = 5.0
    r_min: float | None = None
    warmup_steps: int = 0
    ramp_steps: int = 0
    d_ramp_steps: int | None = None
    renorm_momentum: float | None = None
    average_stddev: bool = False

    def __post_init__(self):
        self._validate()

    def _validate(self, layer: str = "BatchRenorm") -> None:
        values = self._check_common(layer)
        values.update(
            r_max=check_float(
                layer,
                "r_max",
                self.r_max,
                1.0,
                hint=" (r is clipped to [r_min or 1/r_max, r_max]; inf: no clip)",
            ),
            d_max=check_float(
                layer,
                "d_max",
                self.d_max,
                0.0,
                hint=" (d is clipped to [-d_max, d_max]; inf: no clip)",
            ),
            r_min=check_float(
                layer,
                "r_min",
                self.r_min,
                0.0,
                1.0,
                allow_none=True,
                hint=" (the lower clip of r; None: 1/r_max)",
            ),
            warmup_steps=check_int(layer, "warmup_steps", self.warmup_steps, 0, MAX_SCHEDULE_STEP),
            ramp_steps=check_int(layer, "ramp_steps", self.ramp_steps, 0, MAX_SCHEDULE_STEP),
            d_ramp_steps=check_int(
                layer, "d_ramp_steps", self.d_ramp_steps, 0, MAX_SCHEDULE_STEP, allow_none=True
            ),
            renorm_momentum=check_float(
                layer,
                "renorm_momentum",
                self.renorm_momentum,
                0.0,
                1.0,
                high_open=True,
                allow_none=True,
            ),
            average_stddev=check_bool(layer, "average_stddev", self.average_stddev),
        )
        for name, value in values.items():
            object.__setattr__(self, name, value)
