"""Flax ``linen`` MABN, and the shell it shares with BatchRenorm (:mod:`mabn_jax._linen_renorm`).

Thin shells over the pure functions in :mod:`mabn_jax.functional`. Each norm
inherits its hyper-parameters from its config dataclass
(:class:`~mabn_jax.MABNConfig`, :class:`~mabn_jax.BatchRenormConfig`) and adds
``nn.BatchNorm``'s module attributes.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers

from mabn_jax import _inference, _mabn, _shell, _state, _upstream
from mabn_jax import _stats as S
from mabn_jax._config import MABNConfig, config_of
from mabn_jax._signature import peer_init

Array = jax.Array
Dtype = Any
Initializer = Any

#: The collection that carries the probes into a training-mode ``apply``
#: (the low-level API; :func:`mabn_jax.value_and_grad` passes them for you).
PROBES = "mabn_probes"

__all__ = [
    "MABN",
    "PROBES",
    "BatchNormPositional",
    "config_for",
    "make_params",
    "features_of",
    "state_variables",
]


def config_for(module: nn.Module, cls: type):
    """The module's config; ``axis_name`` is dropped during ``init`` (as in
    ``nn.BatchNorm``: the named axis may not exist yet). A plain function, not a
    method, so Flax's method interceptors (``tabulate``) never see it."""
    config = config_of(cls, module)
    if module.scope is not None and module.is_initializing():
        config = dataclasses.replace(config, axis_name=None, axis_index_groups=None)
    return config


def make_params(module, feature_shape) -> tuple[Array | None, Array | None]:
    scale = (
        module.param("scale", module.scale_init, feature_shape, module.param_dtype)
        if module.use_scale
        else None
    )
    bias = (
        module.param("bias", module.bias_init, feature_shape, module.param_dtype)
        if module.use_bias
        else None
    )
    return scale, bias


def features_of(module, x) -> tuple[tuple[int, ...], tuple[int, ...]]:
    feature_axes = S.canonicalize_axes(x.ndim, module.axis, type(module).__name__)
    return feature_axes, tuple(x.shape[a] for a in feature_axes)


def state_variables(module, names, make_initial):
    """The ``batch_stats`` variables ``names``; ``make_initial()`` gives their initial
    values in that order, and is called only if they are created (at ``init``)."""
    made: list = []

    def initial(i):
        made[:] = made or list(make_initial())
        return made[i]

    return [module.variable("batch_stats", name, initial, i) for i, name in enumerate(names)]


#: ``nn.BatchNorm``'s positional order; the norms here take their positional
#: arguments in it (the config mixin would otherwise put its fields first).
_BATCHNORM_POSITIONAL = (
    "use_running_average",
    "axis",
    "momentum",
    "epsilon",
    "dtype",
    "param_dtype",
    "use_bias",
    "use_scale",
    "bias_init",
    "scale_init",
    "axis_name",
    "axis_index_groups",
    "use_fast_variance",
    "force_float32_reductions",
    "parent",
    "name",
)


class BatchNormPositional:
    """Mixin: positional arguments in ``nn.BatchNorm``'s order, also for
    subclasses (Flax regenerates each subclass's ``__init__``, so the wrap is
    applied after it, at class creation; see :mod:`mabn_jax._signature`)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        shown = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
        own = [
            p.name
            for p in shown
            if p.name not in _BATCHNORM_POSITIONAL and p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        order = _BATCHNORM_POSITIONAL[:-2] + tuple(own) + ("parent", "name")
        cls.__init__ = peer_init(cls.__init__, cls.__name__, order, shown, "nn.BatchNorm")


class MABN(BatchNormPositional, nn.Module, MABNConfig):
    """Moving Average Batch Normalization (Yan et al., ICLR 2020).

    A drop-in for :class:`flax.linen.BatchNorm` for small per-device batches.
    Training normalizes with simple moving averages (over ``buffer_size``
    steps) of the forward statistics and injects moving averages of the
    backward statistics into the gradient (equations in
    :mod:`mabn_jax.functional`). Inference is one per-channel affine map::

        y = γ · (x − ema_mean) / sqrt(ema_var + ε) + β      (centered=True, default)
        y = γ · x / sqrt(ema_x2 + ε) + β                   (centered=False)

    The default, centered layer trains after any layer. The plain layer
    (``centered=False``, the paper's final MABN) skips the mean: put it after
    :class:`CenteredConv` / :class:`CenteredDense`, whose outputs are near zero-mean (or
    train ``nn.Conv`` with :func:`mabn_jax.optax.centralize`). State lives in
    ``batch_stats``. Train with :func:`mabn_jax.value_and_grad` in place of
    ``jax.value_and_grad``; it records the backward statistics (Ψ_B, g_B) that only the
    backward pass sees.

    The hyper-parameters are those of :class:`~mabn_jax.MABNConfig`
    (``momentum``, ``epsilon``, ``axis_name``, ``axis_index_groups``,
    ``use_fast_variance``, ``force_float32_reductions``, ``norm_batch_size``,
    ``buffer_size``, ``warmup_steps``, ``renorm_start``, ``r_max``,
    ``centered``, ``d_max``, ``ghost_ema``); the other attributes are
    ``nn.BatchNorm``'s.

    Attributes:
      use_running_average: if True, use the stored EMA statistics (inference).
      axis: the feature axis or axes of the input (default last, NHWC).
      dtype: the dtype of the result (default: the input's dtype).
      param_dtype: the dtype of ``scale`` and ``bias``; the state is kept in
        ``promote_types(param_dtype, float32)``.
      use_bias, use_scale: whether to add ``β`` / multiply by ``γ``.
      bias_init, scale_init: their initializers (zeros, ones).

    In training mode the layer sows its forward statistics (``chi2_B``,
    ``chi2``, ``ema_x2``, ``r``; centered: ``mu_B``, ``sigma2_B``, ``mu``,
    ``sigma2``, ``ema_mean``, ``ema_var``, ``r``, ``d``) into
    ``'intermediates'`` (a no-op unless that collection is mutable).

    Example:
      >>> import jax, jax.numpy as jnp, mabn_jax
      >>> layer = mabn_jax.MABN(use_running_average=True)
      >>> x = jnp.ones((2, 3))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> sorted(variables["batch_stats"])  # doctest: +NORMALIZE_WHITESPACE
      ['ema_mean', 'ema_var', 'g_window', 'mean_window', 'psi_window', 'skipped',
       'step', 'var_window']
      >>> variables["batch_stats"]["mean_window"].shape  # dense features: m = 16
      (16, 3)
      >>> layer.apply(variables, x).shape
      (2, 3)
      >>> plain = mabn_jax.MABN(use_running_average=True, centered=False, buffer_size=4)
      >>> sorted(plain.init(jax.random.key(0), x)["batch_stats"])
      ['ema_x2', 'psi_window', 'skipped', 'step', 'x2_window']
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones

    def __post_init__(self):
        config_of(MABNConfig, self)  # invalid hyper-parameters fail here, by name
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x``; in training mode also advances the state.

        Args:
          x: the input, rank >= 2, with features along ``axis``.
          use_running_average: overrides the attribute of the same name.
          mask: optional boolean array broadcastable to ``x``: the entries the
            statistics are computed from (as in ``nn.BatchNorm``).

        Returns:
          The normalized ``x``, in ``dtype`` (default: ``x``'s).

        Raises:
          ValueError: the ``batch_stats`` are another variant's or shape's; a
            training call is not under :func:`mabn_jax.value_and_grad` (or the
            probes of :func:`mabn_jax.init_probes`), or is the layer's second in
            one ``apply``.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x = jnp.asarray(x)
        config = config_for(self, MABNConfig)
        feature_axes, feature_shape = features_of(self, x)
        m = config.window_length(_mabn.positions(x.shape, feature_axes))
        layout = _state.LAYOUTS[config.centered]
        error = self.has_variable("batch_stats", layout[0][0]) and _state.layout_error(
            self.variables["batch_stats"], config.centered
        )
        if error:  # or Flax would silently initialize the missing fields
            raise ValueError(f"MABN layer {'/'.join(self.path)!r}: its batch_stats {error}.")
        # A layer sizing its window stores just the steps it averages.
        variables = state_variables(
            self,
            [k for k, _ in layout],
            lambda: _shell.initial_state(feature_shape, config, self.param_dtype, rows=m).values(),
        )
        state = _state.as_state({k: v.value for (k, _), v in zip(layout, variables)})
        _state.check_state(state, config, feature_shape, window=m)  # before params
        scale, bias = make_params(self, feature_shape)
        if use_running_average:
            return _inference.mabn_inference(
                x, scale, bias, state, config, axis=self.axis, dtype=self.dtype
            )
        _one_training_call(self)
        y, new_state, stats = _mabn.train(
            x,
            scale,
            bias,
            state,
            _probes(self, state),
            config,
            axis=self.axis,
            dtype=self.dtype,
            mask=mask,
            with_stats=self.is_mutable_collection("intermediates"),
        )
        if not self.is_initializing():  # init must not advance the state
            for var, value in zip(variables, _state.to_mapping(new_state).values()):
                var.value = value
            for name, value in stats.items():
                self.sow("intermediates", name, value)
        return y


def _probes(module: nn.Module, state: _state.MABNState) -> _state.Probes:
    """From the ``'mabn_probes'`` collection, or put in ``params`` by
    :func:`mabn_jax.value_and_grad`.

    A function, not a method, so that method interceptors (``nn.intercept_methods``,
    ``tabulate``) see only ``__call__``, as for ``nn.BatchNorm``. If the caller
    made ``'mabn_probes'`` mutable (``mutable=True``, or the ``DenyList`` that
    ``tabulate`` uses to count FLOPs) and passed none, zero probes are created
    there, as Flax creates any missing variable of a mutable collection; the
    returned state then has unrecorded slots (its next training output is NaN).
    """
    if module.is_initializing():
        return _state.init_probes(state)
    if module.has_variable(PROBES, "psi"):
        return _state.probes_from_mapping(module.variables[PROBES])
    carried = None
    if module.has_variable("params", PROBES):  # put there by mabn_jax.value_and_grad
        mapping: Mapping[str, Array] = module.get_variable("params", PROBES)
        _check_helper_probes(module, mapping, state)
        carried = _state.probes_from_mapping(mapping)
    # Without a params entry (its top-level module's params not differentiated),
    # only the helper's direct probes can serve.
    window, name = state.psi_window, "/".join(module.path)
    found = _shell.resolve_probes(
        carried, window, name, key=("state", id(window)), loop_key=tuple(module.path), fix=_LOOP_FIX
    )
    if found is not None:
        return found
    if module.is_mutable_collection(PROBES):
        zeros = _state.init_probes(state)
        create = lambda name, z: module.variable(PROBES, name, lambda: z).value
        return _state.Probes(
            create("psi", zeros.psi), None if zeros.g is None else create("g", zeros.g)
        )
    if _shell.in_helper():
        raise ValueError(_not_differentiated(module))
    raise ValueError(_missing_probes(module))


_LOOP_FIX = (
    "apply the model once: concatenate the micro-batches into one batch and set "
    "norm_batch_size to the micro-batch size (ghost batches: each micro-batch is one "
    "window step, in one apply), or accumulate gradients across steps outside the loss "
    "(e.g. optax.MultiSteps); a loop over layers stacks them with nn.scan over their "
    "params and batch_stats (variable_axes={'params': 0, 'batch_stats': 0})."
)


def _check_helper_probes(module: nn.Module, probes, state: _state.MABNState) -> None:
    """Probes that value_and_grad built from a batch_stats tree other than the
    one this layer is applied with (another configuration) are named as such."""

    def shape(a):
        return None if a is None else tuple(a.shape)

    got = (shape(probes.get("psi")), shape(probes.get("g")))
    want = (shape(state.psi_window), shape(state.g_window))
    lifted = got[0] and len(got[0]) > len(want[0]) and got[0][-len(want[0]) :] == want[0]
    if got != want and not lifted:  # leading scan/vmap axes: _mabn's message
        raise ValueError(
            f"MABN layer {'/'.join(module.path)!r}: the batch_stats given to "
            "mabn_jax.value_and_grad(..., batch_stats=...) hold this layer with windows "
            f"{got}, but it is applied with windows {want} (another configuration: "
            "buffer_size, centered or the features). Pass the batch_stats the model is "
            "applied with."
        )


def _one_training_call(module: nn.Module) -> None:
    """Each training call is one window step whose Ψ (g) slots the step's
    record fills once; a second call in the same apply would read the slots the
    first reserved. Flax gives every apply (and every lifted trace, e.g. an
    ``nn.scan`` body) its own root scope, where the calls are counted."""
    if module.is_initializing():
        return
    calls = _upstream.per_apply_registry(module, "_mabn_training_calls")
    if module.path in calls:
        raise ValueError(
            f"MABN layer {'/'.join(module.path)!r} is applied in training mode twice in "
            "one apply. Each training call is a step of its moving-average windows, "
            "recorded once per step; call each MABN layer once per training step: use "
            "one layer per call site, or concatenate the inputs into one batch."
        )
    calls.add(module.path)


def _full_name(module: nn.Module) -> str:
    """``Root/path/to/layer``: the path alone (``MABN_0``) may exist in two networks."""
    root = module
    while isinstance(root.parent, nn.Module):
        root = root.parent
    return "/".join((type(root).__name__,) + tuple(module.path))


def _not_differentiated(module: nn.Module) -> str:
    return (
        f"MABN layer {_full_name(module)!r} is applied in training mode inside "
        "mabn_jax.value_and_grad, but its batch_stats were not passed as value_and_grad's "
        "batch_stats= (or its params are not the differentiated argument), so its "
        "backward statistics cannot be recorded. If the params are differentiated but not "
        "first in argnums (e.g. argnums=(0, 1) with the params second), put them first: "
        "the probes travel in the first differentiated argument. This also happens with "
        "a second network "
        "(e.g. a GAN's discriminator in the generator's loss). Either apply that network "
        "with use_running_average=True there (it is frozen in this step), or put both "
        "networks' params and batch_stats in one tree and pass that tree's batch_stats."
    )


def _missing_probes(module: nn.Module) -> str:
    return _shell.missing_probes(
        "/".join(module.path),
        helper="mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=batch_stats)",
        instead_of="jax.value_and_grad",
        low_level=f"pass {{'{PROBES}': mabn_jax.init_probes(batch_stats)}} built from the "
        "batch_stats collection, not the whole variables dict, differentiate w.r.t. them "
        "and call mabn_jax.record_backward_stats.",
        evaluation="use_running_average=True; to only inspect a training-mode apply "
        f"(shapes, FLOPs), make the '{PROBES}' collection mutable (e.g. mutable=True)",
    )
