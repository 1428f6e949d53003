"""The linen converters (public in :mod:`mabn_jax.convert` and
:mod:`mabn_jax.linen`); what they do: :mod:`mabn_jax.convert`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from flax.core import FrozenDict

from mabn_jax import _inference, _shell, _state, _upstream
from mabn_jax._config import MABNConfig, config_of
from mabn_jax._linen_layers import MABN
from mabn_jax._pretrained import check_statistics, converter_config, state_from_batchnorm

__all__ = ["replace_batchnorm", "convert_batchnorm_variables", "ReplacedBatchNorm"]


# Taken from each BatchNorm as it is.
_FROM_BN = (
    "use_running_average",
    "axis",
    "epsilon",
    "param_dtype",
    "use_bias",
    "use_scale",
    "bias_init",
    "scale_init",
    "force_float32_reductions",
)
# Taken from each BatchNorm unless given in mabn_config.
_OVERRIDABLE = ("momentum", "axis_name", "axis_index_groups")


def _check_config(mabn_config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """``mabn_config`` validated (names and values), as hashable pairs."""
    return tuple(sorted(converter_config(mabn_config, "replace_batchnorm").items()))


def _mabn_attributes(bn: nn.BatchNorm, x, overrides: tuple[tuple[str, Any], ...]) -> dict:
    attrs = {name: getattr(bn, name) for name in _FROM_BN + _OVERRIDABLE}
    attrs.update(overrides)
    # nn.BatchNorm's output dtype, when not given, promotes the input with the params.
    has_params = bn.use_scale or bn.use_bias
    attrs["dtype"] = (
        bn.dtype
        if bn.dtype is not None
        else (jnp.result_type(jnp.asarray(x).dtype, bn.param_dtype) if has_params else None)
    )
    return attrs


def _replacing(overrides, next_fun, args, kwargs, context):
    """The interceptor of :class:`ReplacedBatchNorm`: an MABN in each BatchNorm's scope."""
    if not _upstream.is_batchnorm_call(context):
        return next_fun(*args, **kwargs)
    bn = context.module
    return MABN(parent=bn.scope, **_mabn_attributes(bn, args[0], overrides))(*args, **kwargs)


def _converting(overrides, next_fun, args, kwargs, context):
    """The interceptor of :func:`~mabn_jax.convert_batchnorm_variables`: writes each
    BatchNorm's MABN state next to its ``mean``/``var`` and returns the MABN's
    inference output."""
    if not _upstream.is_batchnorm_call(context):
        return next_fun(*args, **kwargs)
    bn, x = context.module, args[0]
    attrs = dict(_mabn_attributes(bn, x, overrides), use_running_average=True)
    scope = bn.scope
    path = "/".join(scope.path) or "<the model itself>"
    if not (scope.has_variable("batch_stats", "mean") and scope.has_variable("batch_stats", "var")):
        raise ValueError(
            f"convert_batchnorm_variables: the nn.BatchNorm at {path!r} has no 'mean' and "
            "'var' in the given batch_stats; pass the variables of the BatchNorm model "
            "(model.init or a trained state) for the same architecture."
        )
    layer = MABN(parent=scope, **attrs)
    mean, var = scope.get_variable("batch_stats", "mean"), scope.get_variable("batch_stats", "var")
    check_statistics(mean, var, path, "convert_batchnorm_variables")
    state = state_from_batchnorm(
        mean,
        var,
        config_of(MABNConfig, layer),
        dtype=_shell.state_dtype(bn.param_dtype),
    )
    for name, value in _state.to_mapping(state).items():
        scope.put_variable("batch_stats", name, value)
    # The output only feeds the layers after it (their shapes); computed from the
    # state directly, as the scope still holds the BatchNorm's mean and var.
    get = lambda name, used: scope.get_variable("params", name) if used else None
    return _inference.mabn_inference(
        x,
        get("scale", bn.use_scale),
        get("bias", bn.use_bias),
        state,
        config_of(MABNConfig, layer),
        axis=bn.axis,
        dtype=attrs["dtype"],
    )


def _public_fields(module) -> frozenset:
    """The dataclass attributes of a linen module a wrapper reads through (not
    Flax's ``parent``/``name``)."""
    if not isinstance(module, nn.Module):
        return frozenset()
    return frozenset(f.name for f in dataclasses.fields(module)) - {"parent", "name"}


class ReplacedBatchNorm(nn.Module):
    """``module`` with every ``nn.BatchNorm`` call run by a centered
    :class:`mabn_jax.MABN` (what :func:`~mabn_jax.replace_batchnorm` returns).

    It shares ``module``'s scope (``nn.share_scope``): the variables have
    ``module``'s paths. ``init``/``apply`` take ``module``'s ``__call__``
    arguments; other methods: ``apply(..., method=ReplacedBatchNorm.run,
    name='encode')``... see :meth:`run`. ``module``'s attributes read
    through the wrapper (``replaced.dtype``, ``replaced.num_classes``), as code
    written for the model reads them; its methods do not (use :meth:`run`).

    Attributes:
      module: the model, unchanged.
      mabn_config: ``(name, value)`` pairs of MABN hyper-parameters for every
        replaced layer.
    """

    module: nn.Module
    mabn_config: tuple[tuple[str, Any], ...] = (("centered", True),)

    def setup(self):
        nn.share_scope(self, self.module)

    @nn.nowrap
    def __getattr__(self, name: str) -> Any:
        # The wrapped model's attributes (``model.dtype``, ``model.num_classes``) read
        # through the wrapper, as code written for the model reads them: Flax's
        # ImageNet example initializes with ``jnp.ones(shape, model.dtype)``.
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("module")
            if name.startswith("_") or name not in _public_fields(module):
                raise
            return getattr(module, name)

    def __call__(self, *args, **kwargs):
        """Calls ``module`` with MABN in place of BatchNorm.

        Args:
          *args: ``module``'s positional ``__call__`` arguments.
          **kwargs: its keyword arguments.

        Returns:
          What ``module`` returns.
        """
        with nn.intercept_methods(functools.partial(_replacing, self.mabn_config)):
            return self.module(*args, **kwargs)

    def run(self, name: str, *args, **kwargs):
        """Calls ``module``'s method ``name`` with MABN in place of BatchNorm
        (``apply(variables, x, method=ReplacedBatchNorm.run, name='encode')``
        would clash with Flax's ``name``; pass it positionally:
        ``apply(variables, 'encode', x, method=ReplacedBatchNorm.run)``).

        Args:
          name: the name of ``module``'s method.
          *args: its positional arguments.
          **kwargs: its keyword arguments.

        Returns:
          What the method returns.
        """
        with nn.intercept_methods(functools.partial(_replacing, self.mabn_config)):
            return getattr(self.module, name)(*args, **kwargs)


def replace_batchnorm(module: nn.Module, **mabn_config) -> ReplacedBatchNorm:
    """``module`` with MABN wherever it uses ``nn.BatchNorm``; its source untouched.

    Every ``nn.BatchNorm`` call inside ``module`` (any depth, any
    construction: ``partial``, setup attributes, ``nn.scan``, ``nn.remat``,
    ``nn.vmap``) runs a centered :class:`mabn_jax.MABN` in the BatchNorm's
    scope instead, with the BatchNorm's attributes (``axis``, ``epsilon``,
    ``momentum``, ``dtype``, ``axis_name``, ``use_running_average``, …). At
    inference a converted layer is batch norm's map
    ``y = γ·(x − ema_mean)/sqrt(ema_var + ε) + β``; in training it normalizes
    with ``m``-step moving averages and renormalizes towards the EMA
    (equations in :mod:`mabn_jax.functional`). ``nn.Conv``/``nn.Dense`` are
    unchanged (centering pretrained kernels would change the function; see
    :mod:`mabn_jax.convert`).

    ``batch_stats`` hold MABN's (centered) layout under each BatchNorm's
    path. Train with :func:`mabn_jax.value_and_grad` in place of
    ``jax.value_and_grad``; start from a trained BatchNorm model with
    :func:`~mabn_jax.convert_batchnorm_variables`.

    Args:
      module: a linen model using ``nn.BatchNorm``.
      **mabn_config: MABN hyper-parameters for every replaced layer
        (:class:`mabn_jax.MABNConfig`: ``buffer_size``, ``warmup_steps``,
        ``renorm_start``, ``r_max``, ``d_max``, ``norm_batch_size``,
        ``ghost_ema``, ``use_fast_variance`` (default False: two-pass),
        and ``momentum``, ``axis_name``, ``axis_index_groups``, which
        override every BatchNorm's). ``epsilon`` and the other attributes
        that define the function are the BatchNorms' own (refused here);
        ``centered=False`` is refused (see :mod:`mabn_jax.convert`).

    Returns:
      A :class:`~mabn_jax.convert.ReplacedBatchNorm` wrapping ``module``: init
      and apply it as ``module``.

    Raises:
      TypeError: ``module`` is not a linen Module, or a name in
        ``mabn_config`` is not an MABN hyper-parameter.
      ValueError: a hyper-parameter's value is invalid or refused here.

    Example::

        >>> import jax, jax.numpy as jnp, flax.linen as nn, mabn_jax
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, train):
        ...         x = nn.Dense(4)(x)
        ...         return nn.BatchNorm(use_running_average=not train)(x)
        >>> model = mabn_jax.replace_batchnorm(Net(), buffer_size=4)
        >>> v = model.init(jax.random.key(0), jnp.ones((2, 3)), train=False)
        >>> v['batch_stats']['BatchNorm_0']['mean_window'].shape
        (4, 4)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"replace_batchnorm: expected a flax.linen Module, got "
            f"{type(module).__name__}; for Flax NNX use "
            "mabn_jax.nnx.replace_batchnorm(model)."
        )
    config = _check_config(mabn_config)
    if isinstance(module, ReplacedBatchNorm):  # replaced already: same config, same model
        if module.mabn_config == config:
            return module
        raise ValueError(
            "replace_batchnorm: this model was already replaced with "
            f"{dict(module.mabn_config)}; to replace its BatchNorms with another "
            "configuration, call replace_batchnorm on the original model: "
            f"replace_batchnorm(replaced.module, **{dict(config)})."
        )
    return ReplacedBatchNorm(module, config)


def convert_batchnorm_variables(
    mabn_module: ReplacedBatchNorm, bn_variables: Mapping, *args, **kwargs
) -> Any:
    """The variables of ``mabn_module`` equivalent to a trained BatchNorm model's.

    ``params`` (and every collection but ``batch_stats``) are kept. Each
    BatchNorm's running ``mean``/``var`` (``μ``, ``σ²``) becomes its MABN's
    state (``mabn_jax/_pretrained.py``, the rule
    :func:`mabn_jax.nnx.replace_batchnorm` uses too)::

        ema_mean = μ,  ema_var = σ²                   (inference: exactly BN's map)
        mean_window[:] = μ,  var_window[:] = σ²        (the first windows: μ̃ = μ, σ̃² = σ²)
        g_window = psi_window = 0                     (BN keeps no backward statistics)
        step = max(buffer_size, warmup_steps, renorm_start),  skipped = 0

    so the converted model in inference mode computes what the BatchNorm
    model does (up to float rounding), and training continues from the
    pretrained statistics (window phase and renormalization from the first
    step, no warm-up from ``ema_var = 1``). Other ``batch_stats`` entries
    (of layers that are not BatchNorms) are kept.

    Args:
      mabn_module: what :func:`~mabn_jax.replace_batchnorm` returned.
      bn_variables: the BatchNorm model's ``{'params': ..., 'batch_stats': ...}``.
      args, kwargs: an input and the keyword arguments of an inference-mode
        ``apply`` (e.g. ``x, train=False``); the model runs once (eagerly) to
        find its BatchNorms, so every BatchNorm must be called by it.

    Returns:
      ``bn_variables`` with ``batch_stats`` in MABN's layout (a ``FrozenDict``
      if ``bn_variables`` is one).

    Raises:
      TypeError: ``mabn_module`` is not what :func:`~mabn_jax.replace_batchnorm`
        returned.
      ValueError: ``bn_variables`` has no ``batch_stats``, a BatchNorm has no
        ``mean``/``var`` there, or is not called by the apply.

    Example::

        >>> import jax, jax.numpy as jnp, flax.linen as nn, mabn_jax
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, train):
        ...         return nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
        >>> x = jnp.arange(6.0).reshape(2, 3)
        >>> bn_vars = Net().init(jax.random.key(0), x, train=False)
        >>> model = mabn_jax.replace_batchnorm(Net())
        >>> variables = mabn_jax.convert_batchnorm_variables(model, bn_vars, x, train=False)
        >>> bool(jnp.allclose(model.apply(variables, x, train=False),
        ...                   Net().apply(bn_vars, x, train=False)))
        True
    """
    if not isinstance(mabn_module, ReplacedBatchNorm):
        raise TypeError(
            "convert_batchnorm_variables: mabn_module must be what "
            "mabn_jax.replace_batchnorm(model) returned, got "
            f"{type(mabn_module).__name__}."
        )
    if not isinstance(bn_variables, Mapping) or "batch_stats" not in bn_variables:
        got = sorted(bn_variables) if isinstance(bn_variables, Mapping) else type(bn_variables)
        raise ValueError(
            "convert_batchnorm_variables: bn_variables must be the BatchNorm model's whole "
            f"variables dict, with 'params' and 'batch_stats' (got {got}). Pass "
            "variables, not variables['params']; a model without nn.BatchNorm layers has no "
            "batch_stats and needs no conversion (use its variables as they are)."
        )
    interceptor = functools.partial(_converting, mabn_module.mabn_config)
    with nn.intercept_methods(interceptor):
        _, updated = mabn_module.module.apply(
            bn_variables, *args, mutable=["batch_stats"], **kwargs
        )
    stats = _drop_batchnorm_entries(_shell.to_dicts(updated["batch_stats"]))
    out = _shell.to_dicts(bn_variables)
    out["batch_stats"] = stats
    return FrozenDict(out) if isinstance(bn_variables, FrozenDict) else out


def _drop_batchnorm_entries(tree: dict, path: tuple[str, ...] = ()) -> dict:
    """Removes each converted layer's ``mean``/``var``; a BatchNorm entry left
    unconverted (not called by the conversion's apply) raises."""
    keys = set(tree)
    mabn_keys = {k for k, _ in _state.LAYOUTS[True]}
    if keys == {"mean", "var"}:
        raise ValueError(
            f"convert_batchnorm_variables: the nn.BatchNorm at {'/'.join(path)!r} was not "
            "called by the apply with the arguments given, so it was not converted; pass "
            "arguments under which the model calls every BatchNorm."
        )
    if keys == mabn_keys | {"mean", "var"}:
        return {k: v for k, v in tree.items() if k not in ("mean", "var")}
    if mabn_keys | {"mean", "var"} <= keys:  # a converted BatchNorm with more entries
        extra = sorted(keys - mabn_keys - {"mean", "var"})
        raise ValueError(
            f"convert_batchnorm_variables: the nn.BatchNorm at {'/'.join(path)!r} has "
            f"batch_stats entries besides 'mean' and 'var': {extra}. An nn.BatchNorm "
            "keeps only those two; remove the others from bn_variables "
            "(they belong to no layer of the model) and convert again."
        )
    return {
        k: _drop_batchnorm_entries(v, path + (k,)) if isinstance(v, dict) else v
        for k, v in tree.items()
    }
