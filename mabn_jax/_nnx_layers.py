"""Flax NNX MABN, and the shell it shares with BatchRenorm (:mod:`mabn_jax._nnx_renorm`).

Shells over the pure functions of :mod:`mabn_jax.functional`, with
``nnx.BatchNorm``'s constructor arguments plus the layer's hyper-parameters
(validated by its config dataclass, their one home). The state lives in
``nnx.BatchStat`` variables named as the ``flax.linen`` layer's
``batch_stats`` entries, so checkpoints use the same names.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from mabn_jax import _inference, _mabn, _shell, _state, _upstream
from mabn_jax import _stats as S
from mabn_jax._config import MABNConfig, config_of
from mabn_jax._nnx_variables import (
    IN_STATE_NAMES,
    PROBE_NAMES,
    PROBE_TOKEN,
    USES_NAME,
    Statistic,
    keep_dtypes,
)
from mabn_jax._signature import peer_init

Array = jax.Array

__all__ = [
    "MABN",
    "Norm",
    "config_signature",
]

_EXPLICIT = (
    "num_features, rngs, use_running_average, axis, dtype, param_dtype, use_bias, "
    "use_scale, bias_init, scale_init, bias_metadata, scale_metadata, promote_dtype"
)


_ZEROS, _ONES = initializers.zeros_init(), initializers.ones_init()  # nnx.BatchNorm's


def config_signature(init: Callable, config_cls: type, layer: str) -> Callable:
    """``init`` showing the config's fields (and defaults) as keyword-only
    parameters (``help``, IDEs) after ``nnx.BatchNorm``'s; it takes them as
    ``**hyper`` (see :mod:`mabn_jax._signature`)."""
    own = [p for p in inspect.signature(init).parameters.values() if p.kind is not p.VAR_KEYWORD]
    fields = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
        )
        for f in dataclasses.fields(config_cls)
    ]
    return peer_init(init, layer, ("num_features",), own[1:] + fields, "nnx.BatchNorm")


def _feature_shape(layer: str, num_features, axis) -> tuple[int, ...]:
    shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if len(shape) != len(axes) or not all(isinstance(n, int) and n >= 1 for n in shape):
        raise ValueError(
            f"{layer}: num_features={num_features!r} does not fit axis={axis!r}; "
            "give one positive int per feature axis (an int for one axis)."
        )
    return shape


class Norm(nnx.Module):
    """The shell both norms share: parameters, mode, config, input check."""

    _config_cls: type

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool | None = False,
        axis: int | Sequence[int] = -1,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Callable = _ZEROS,
        scale_init: Callable = _ONES,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        promote_dtype: Callable = keep_dtypes,
        **hyper,
    ):
        layer = type(self).__name__
        config = _shell.make_config(self._config_cls, hyper, layer, _EXPLICIT)
        feature_shape = _feature_shape(layer, num_features, axis)
        self.scale = (
            nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata)
            if use_scale
            else nnx.data(None)
        )
        self.bias = (
            nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata)
            if use_bias
            else nnx.data(None)
        )
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.promote_dtype = promote_dtype
        for f in dataclasses.fields(config):  # canonicalized values
            setattr(self, f.name, getattr(config, f.name))
        init = self._initial_state(feature_shape, config, param_dtype)
        self._state_names = tuple(init)
        for name, value in init.items():
            setattr(self, name, nnx.BatchStat(value))

    @staticmethod
    def _initial_state(feature_shape, config, param_dtype) -> Mapping[str, Array]:
        """A fresh layer's state entries, by stored name."""
        raise NotImplementedError

    def _begin(self, x, use_running_average: bool | None):
        """(mode, config, x, scale, bias, stored state) of a call."""
        layer = type(self).__name__
        if use_running_average is None:  # the call's argument overrides the attribute
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(
                f"No `use_running_average` was given to {layer}: pass it to the constructor "
                "or the call, or use model.train() / model.eval() / nnx.view(model, "
                "use_running_average=...)."
            )
        x = jnp.asarray(x)
        feature_axes = S.canonicalize_axes(x.ndim, self.axis, layer)
        got = tuple(x.shape[a] for a in feature_axes)
        want = _feature_shape(layer, self.num_features, self.axis)
        if got != want:
            raise ValueError(
                f"{layer}: input of shape {x.shape} has features {got} along axis={self.axis} "
                f"but the layer was built with num_features={self.num_features}; build it "
                f"with num_features={got[0] if len(got) == 1 else got}, or put the features "
                "on `axis`."
            )
        # The incoming state is not a parameter: no gradient flows into it (as for
        # nnx.BatchNorm, whose training output does not depend on its state).
        stored = {
            name: jax.lax.stop_gradient(getattr(self, name)[...]) for name in self._state_names
        }
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        # nnx.BatchNorm's hook, called as it calls it; the state keeps its dtype.
        mean, var = (stored.get(k) for k in self._inference_names)  # type: ignore[attr-defined]
        x, _, _, scale, bias = self.promote_dtype((x, mean, var, scale, bias), dtype=self.dtype)
        return use_running_average, config_of(self._config_cls, self), x, scale, bias, stored

    def _store(self, values: Mapping[str, Array], stats: Mapping[str, Array]) -> None:
        """Writes the new state (no gradient flows into it, as in linen's mutable
        collections) and sows ``stats`` inside ``nnx.capture`` only. ``set_value``,
        not ``var[...] = v``: Flax's indexed write compares the tracers' sharding, and
        a tracer's missing sharding raises an error whose text walks the whole graph."""
        for name, value in values.items():
            getattr(self, name).set_value(jax.lax.stop_gradient(value))
        if _upstream.in_nnx_capture(self):
            for name, value in stats.items():
                self.sow(Statistic, name, value)

    @property
    def state_names(self) -> tuple[str, ...]:
        """The names of the layer's ``nnx.BatchStat`` state entries."""
        return self._state_names

    def set_view(self, use_running_average: bool | None = None):
        """Class method used by ``nnx.view``.

        Args:
          use_running_average: if True, the stored statistics are used
            (inference); if False, the layer trains.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class MABN(Norm):
    """Moving Average Batch Normalization (Yan et al., ICLR 2020) for Flax NNX.

    A drop-in for :class:`flax.nnx.BatchNorm` for small per-device batches;
    the same math as :class:`mabn_jax.MABN` (linen). Training normalizes with
    simple moving averages (``buffer_size`` steps) of the forward statistics
    and injects moving averages of the backward statistics (Ψ_B, g_B) into
    the gradient (equations in :mod:`mabn_jax.functional`). Inference::

        y = γ · (x − ema_mean) / sqrt(ema_var + ε) + β      (centered=True, default)
        y = γ · x / sqrt(ema_x2 + ε) + β                   (centered=False)

    The default, centered layer trains after any layer. The plain layer
    (``centered=False``) skips the mean: put it after :class:`CenteredConv`
    / :class:`CenteredLinear` (or centralize the kernels with
    :func:`mabn_jax.optax.centralize`). Train with :func:`mabn_jax.nnx.value_and_grad`
    in place of ``nnx.value_and_grad``; differentiating a training-mode call
    outside it raises at trace time; a training call that nothing differentiates (a plain
    forward, ``nnx.tabulate``) advances the forward statistics and fills this
    step's Ψ (g) slots with the window's mean before the step.
    ``model.train()``, ``model.eval()`` and ``nnx.view`` switch modes.

    State (``nnx.BatchStat``, the linen layer's ``batch_stats`` names): plain
    ``step, x2_window, psi_window, ema_x2, skipped``; centered ``step,
    mean_window, var_window, g_window, psi_window, ema_mean, ema_var,
    skipped``, kept in ``promote_types(param_dtype, float32)``.

    The arguments are ``nnx.BatchNorm``'s, plus the hyper-parameters.

    Args:
      num_features: the number of features (for several ``axis``, a tuple of
        their sizes in increasing axis order).
      rngs: the random number generators (``rngs.params`` for scale, bias).
      use_running_average: True for inference (default False: training).
      axis: the feature axis or axes of the input (default last, NHWC).
      dtype: the result's dtype (default: the input's, as the linen layer;
        ``nnx.BatchNorm`` would promote it with the params').
      param_dtype: the dtype of ``scale`` and ``bias``.
      use_bias, use_scale: whether to add ``β`` / multiply by ``γ``.
      bias_init, scale_init: their initializers (zeros, ones).
      bias_metadata, scale_metadata: metadata of the ``nnx.Param`` variables.
      promote_dtype: ``nnx.BatchNorm``'s hook, called on ``(x, mean, var,
        scale, bias)`` with ``dtype=dtype`` (``mean``, ``var``: the inference
        EMAs; its promoted statistics are unused, the state keeps its dtype).
        Default: no promotion; ``flax.nnx.nn.dtypes.promote_dtype`` promotes
        as ``nnx.BatchNorm`` does.
      hyper: (keywords) the hyper-parameters of :class:`~mabn_jax.MABNConfig`, with
        its defaults: ``momentum`` (0.98), ``epsilon``, ``axis_name``,
        ``axis_index_groups``, ``use_fast_variance`` (False: two-pass
        variance, unlike ``nnx.BatchNorm``), ``force_float32_reductions``,
        ``norm_batch_size``, ``buffer_size``, ``warmup_steps``,
        ``renorm_start``, ``r_max``, ``centered``, ``d_max``, ``ghost_ema``.

    Raises:
      TypeError: an unknown keyword.
      ValueError: an invalid hyper-parameter, or ``num_features`` that does
        not fit ``axis``.

    Inside ``nnx.capture(..., mabn_jax.nnx.Statistic)`` a training call sows the
    forward statistics (``chi2_B``, ``chi2``, ``ema_x2``, ``r``; centered
    ``mu_B``, ``sigma2_B``, ``mu``, ``sigma2``, ``ema_mean``, ``ema_var``,
    ``r``, ``d``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import mabn_jax.nnx
      >>> layer = mabn_jax.nnx.MABN(3, rngs=nnx.Rngs(0))
      >>> layer.mean_window[...].shape  # 16 steps stored, the last m read
      (16, 3)
      >>> mabn_jax.nnx.MABN(3, centered=False, buffer_size=4, rngs=nnx.Rngs(0)).x2_window.shape
      (4, 3)
      >>> layer.eval()
      >>> layer(jnp.ones((2, 3))).shape
      (2, 3)
    """

    _config_cls = MABNConfig
    __init__ = config_signature(Norm.__init__, MABNConfig, "MABN")
    _initial_state = staticmethod(_shell.initial_state)

    @property
    def _inference_names(self) -> tuple[str, str]:
        """The state entries inference uses, as (mean, variance)."""
        centered = self.centered  # type: ignore[attr-defined]  # set from the config
        return ("ema_mean", "ema_var") if centered else ("ema_mean", "ema_x2")

    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x``; in training mode also advances the state.

        Args:
          x: the input, rank >= 2, with features along ``axis``.
          use_running_average: overrides the attribute of the same name.
          mask: optional boolean array broadcastable to ``x``: the entries the
            statistics are computed from (as in ``nnx.BatchNorm``).

        Returns:
          The normalized ``x``, in ``dtype`` (default: ``x``'s).

        Raises:
          ValueError: no ``use_running_average`` (attribute or argument), or
            ``x``'s features are not ``num_features``; a training call inside
            :func:`mabn_jax.nnx.value_and_grad` whose model is not
            differentiated, twice in one step, or in a loop body of the loss.
        """
        inference, config, x, scale, bias, stored = self._begin(x, use_running_average)
        state = _state.as_state(stored)
        if inference:
            return _inference.mabn_inference(
                x, scale, bias, state, config, axis=self.axis, dtype=self.dtype
            )
        probes = self._probes()
        y, new_state, stats = _mabn.train(
            x,
            scale,
            bias,
            state,
            probes,
            config,
            axis=self.axis,
            dtype=self.dtype,
            mask=mask,
            with_stats=_upstream.in_nnx_capture(self),
        )
        self._store(_state.to_mapping(new_state), stats)
        if _shell.probes_in_state():
            self._chain_carriers(probes)  # type: ignore[arg-type]
        return y

    def _chain_carriers(self, probes: _state.Probes) -> None:
        """Keeps the new window and step variables, where they carry the probes
        (see :meth:`_in_state_probes`), differentiably tied to the ones this call
        read (the same values): a second application in the same loss then sends
        its cotangents to the helper's too, and the application count it records
        is 2, which raises naming the fix, instead of the second going unrecorded."""
        for name, carried in zip(IN_STATE_NAMES, (probes.psi, probes.g, probes.uses)):
            if carried is not None:
                var = getattr(self, name)
                var.set_value(var[...] + (carried - jax.lax.stop_gradient(carried)))

    def _probes(self) -> _state.Probes | None:
        """The probes :func:`mabn_jax.nnx.value_and_grad` put on this layer, or
        None outside it (a step nothing differentiates: see the class doc)."""
        psi, g = (getattr(self, name, None) for name in PROBE_NAMES)
        if psi is None and _upstream.in_nnx_tabulate(self):
            # nnx.tabulate(compute_vjp_flops=True) differentiates each call of its own
            # clone only to count the VJP's FLOPs; nothing of that step leaves it, so
            # throwaway probes make it differentiable (as linen's tabulate makes them).
            return _state.init_probes(
                _state.as_state({k: getattr(self, k)[...] for k in self.state_names})
            )
        if psi is None and _shell.probes_in_state():
            return self._in_state_probes()
        if psi is None and _shell.in_helper():
            raise ValueError(self._not_differentiated())
        if psi is None:
            return None
        token = psi.get_metadata().get(PROBE_TOKEN)
        uses = getattr(self, USES_NAME, None)
        carried = _state.Probes(
            psi[...], None if g is None else g[...], uses=None if uses is None else uses[...]
        )
        name = f"{type(self).__name__}(num_features={self.num_features})"
        window = self.psi_window[...]  # type: ignore[attr-defined]
        return _shell.resolve_probes(
            carried, window, name, key=token, loop_key=token, fix=_LOOP_FIX, token=token
        )

    def _in_state_probes(self) -> _state.Probes | None:
        """The probes when the helper differentiates this layer's own ``psi_window``
        (``g_window``) and ``step`` in their place, read unstopped: their cotangents
        are Ψ_B (g_B) and the count of applications (the forward never reads a
        probe's value). The helper does so where a transform's axes were built
        before the step, which attached variables would not fit. In the helper's
        own trace the layer must be one it was given (keyed by the object: no
        token survives a transform without changing the graph)."""
        name = f"{type(self).__name__}(num_features={self.num_features})"
        window = self.psi_window[...]  # type: ignore[attr-defined]
        if _shell.in_helper_trace() and _shell.direct_probes(id(self), window) is None:
            raise ValueError(self._not_differentiated())
        g = getattr(self, "g_window", None)
        own = _state.Probes(window, None if g is None else g[...], uses=self.step[...])  # type: ignore[attr-defined]
        key = id(self)
        return _shell.resolve_probes(
            own, window, name, key=key, loop_key=key, fix=_LOOP_FIX, token=key
        )

    def _not_differentiated(self) -> str:
        return (
            f"{type(self).__name__}(num_features={self.num_features}) is applied in "
            "training mode inside mabn_jax.nnx.value_and_grad, but its model is not a "
            "differentiated argument (e.g. a GAN's discriminator in the generator's "
            "loss), so its backward statistics cannot be recorded. Put that model in "
            "eval mode there (model.eval() or nnx.view(model, use_running_average=True)), "
            "or differentiate w.r.t. it too (argnums=(0, 1)). If the model was split "
            "before the gradient and is merged inside the loss, pass all of its parts "
            "(nnx.unpack's GraphStates) to the loss as arguments; otherwise the helper "
            "cannot reach its layers: call mabn_jax.nnx.attach_probes(model) before the "
            "model is split and record with mabn_jax.nnx.record_backward_stats (docs/nnx.md)."
        )


_LOOP_FIX = (
    "apply the model once: concatenate the micro-batches into one batch and set "
    "norm_batch_size to the micro-batch size (ghost batches: each micro-batch is one "
    "window step, in one call), or accumulate gradients across steps outside the loss "
    "(e.g. optax.MultiSteps); a loop over layers stacks them (nnx.vmap to create, "
    "nnx.scan with nnx.StateAxes({(nnx.Param, nnx.BatchStat): 0, ...: None}))."
)
