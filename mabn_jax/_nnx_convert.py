"""MABN in place of ``nnx.BatchNorm`` in an NNX model you do not own, from
its trained statistics (the NNX side of :mod:`mabn_jax.convert`).

One call, in place, no edit of the model's source::

    mabn_jax.nnx.replace_batchnorm(model)  # every nnx.BatchNorm -> MABN

Which MABN: the centered one, for the reason given in :mod:`mabn_jax.convert`
(the plain layer normalizes by ``E[x²] = σ² + μ²`` and belongs after
weight-centralized layers; centering a trained kernel changes the function).
``nnx.Conv`` and ``nnx.Linear`` are left as they are. The state is started
from each BatchNorm's ``mean``/``var`` by :mod:`mabn_jax._pretrained`, the
code path the linen converter uses.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from mabn_jax import _shell, _state, _upstream
from mabn_jax._config import MABNConfig, config_of
from mabn_jax._nnx_layers import MABN
from mabn_jax._pretrained import check_statistics, converter_config, state_from_batchnorm

__all__ = ["replace_batchnorm"]

# Taken from each nnx.BatchNorm unless given in mabn_config.
_OVERRIDABLE = ("momentum", "axis_name", "axis_index_groups")
# What the walk descends into.
_WALKED = (nnx.Pytree, list, dict, tuple)


def _converted(bn: nnx.BatchNorm, config: dict[str, Any], path: str) -> MABN:
    """The centered MABN computing what ``bn`` computes at inference, with
    ``bn``'s own ``scale``/``bias`` variables and its statistics as state."""
    attrs = {name: getattr(bn, name) for name in _OVERRIDABLE}
    attrs.update(config)
    layer = MABN(
        bn.num_features,
        rngs=nnx.Rngs(0),
        use_running_average=bn.use_running_average,
        axis=bn.axis,
        dtype=bn.dtype,
        param_dtype=bn.param_dtype,
        use_bias=bn.use_bias,
        use_scale=bn.use_scale,
        promote_dtype=bn.promote_dtype,
        epsilon=bn.epsilon,
        # nnx.BatchNorm reduces in float32 (flax's _compute_stats default).
        force_float32_reductions=getattr(bn, "force_float32_reductions", True),
        **attrs,
    )
    # The variables themselves move over (their metadata, e.g. sharding, kept).
    layer.scale, layer.bias = bn.scale, bn.bias
    mean, var = bn.mean[...], bn.var[...]
    check_statistics(mean, var, path, "mabn_jax.nnx.replace_batchnorm")
    # Layers made under nnx.vmap hold stacked statistics: [*lead, features].
    lead = mean.ndim - 1
    state = state_from_batchnorm(
        mean, var, config_of(MABNConfig, layer), lead=lead, dtype=_shell.state_dtype(bn.param_dtype)
    )
    for name, value in _state.to_mapping(state).items():
        setattr(layer, name, nnx.BatchStat(value))
    return layer


def _children(node):
    """``(key, child)`` of the nodes and containers under ``node`` (plain lists,
    dicts and tuples in a module's attributes are pytrees, not graph nodes:
    ``nnx.iter_children`` leaves them out)."""
    if isinstance(node, (list, tuple)):
        return [(i, v) for i, v in enumerate(node) if isinstance(v, _WALKED)]
    if isinstance(node, dict):
        return [(k, v) for k, v in node.items() if isinstance(v, _WALKED)]
    children = dict(nnx.iter_children(node))
    children.update(_upstream.container_attributes(node))
    return list(children.items())


def _replace_in(node, config: dict[str, Any], done: dict[int, Any], path: tuple = ()):
    """``node`` with its BatchNorms replaced (in place where it is mutable; a
    tuple comes back rebuilt). ``done`` maps ids of visited nodes to their
    result, so a BatchNorm shared by several parents becomes one MABN."""
    if id(node) in done:
        return done[id(node)]
    if isinstance(node, nnx.BatchNorm):
        done[id(node)] = _converted(node, config, "/".join(map(str, path)) or "<the model>")
        return done[id(node)]
    done[id(node)] = node
    if isinstance(node, nnx.Variable):  # a leaf of the graph
        return node
    children = list(_children(node))
    new = {key: _replace_in(child, config, done, path + (key,)) for key, child in children}
    if isinstance(node, tuple):
        rebuilt = tuple(new.get(i, v) for i, v in enumerate(node))
        done[id(node)] = rebuilt if any(rebuilt[i] is not node[i] for i in new) else node
        return done[id(node)]
    for key, child in children:
        if new[key] is child:
            continue
        if isinstance(node, nnx.Pytree) and not isinstance(node, (nnx.List, nnx.Dict)):
            setattr(node, key, nnx.data(new[key]) if isinstance(new[key], tuple) else new[key])
        else:  # list, dict, nnx.List, nnx.Dict
            node[key] = new[key]
    return node


def replace_batchnorm(model: nnx.Module, **mabn_config) -> nnx.Module:
    """Replaces every ``nnx.BatchNorm`` in ``model``'s graph by a centered
    :class:`mabn_jax.nnx.MABN`, in place, keeping what it computes.

    Every ``nnx.BatchNorm`` reachable from ``model`` (attributes, lists,
    dicts, tuples, ``nnx.List``, ``nnx.Dict``, ``nnx.Sequential``, layers
    stacked by ``nnx.vmap``; one shared by several parents becomes one MABN)
    becomes an MABN with the BatchNorm's ``num_features``, ``axis``,
    ``epsilon``, ``momentum``, ``dtype``, ``param_dtype``, ``promote_dtype``,
    ``use_bias``, ``use_scale``, ``axis_name``, ``axis_index_groups`` and
    ``use_running_average``, its ``scale``/``bias`` variables, and a state
    started from its running ``mean``/``var`` (``μ``, ``σ²``), as
    :func:`mabn_jax.convert_batchnorm_variables` starts it::

        ema_mean = μ,  ema_var = σ²                   (inference: exactly BN's map)
        mean_window[:] = μ,  var_window[:] = σ²        (the first windows: μ̃ = μ, σ̃² = σ²)
        g_window = psi_window = 0                     (BN keeps no backward statistics)
        step = max(buffer_size, warmup_steps, renorm_start),  skipped = 0

    So the model in inference mode computes
    ``y = γ·(x − μ)/sqrt(σ² + ε) + β`` as before (up to float rounding), and
    training continues from the trained statistics (window phase and
    renormalization from the first step). Train it with
    :func:`mabn_jax.nnx.value_and_grad` in place of ``nnx.value_and_grad``;
    an ``nnx.Optimizer`` made before the replacement still fits (the
    parameters are the same variables, under the same paths).
    ``nnx.Conv``/``nnx.Linear`` are unchanged: the plain MABN
    (``centered=False``) would need weight-centralized kernels, and
    centering a trained kernel changes the function (see
    :mod:`mabn_jax.convert`).

    Args:
      model: an NNX model (an ``nnx.Module``) holding ``nnx.BatchNorm`` layers.
      **mabn_config: MABN hyper-parameters for every replaced layer
        (:class:`mabn_jax.MABNConfig`: ``buffer_size``, ``warmup_steps``,
        ``renorm_start``, ``r_max``, ``d_max``, ``norm_batch_size``,
        ``ghost_ema``, ``use_fast_variance`` (default False: two-pass),
        and ``momentum``, ``axis_name``, ``axis_index_groups``, which
        override every BatchNorm's). ``epsilon`` and the other attributes
        that define the function are the BatchNorms' own (refused here);
        ``centered=False`` is refused.

    Returns:
      ``model`` itself (changed in place).

    Raises:
      TypeError: ``model`` is not an NNX module, or is an ``nnx.BatchNorm``
        itself; a name in ``mabn_config`` is not an MABN hyper-parameter.
      ValueError: a hyper-parameter's value is invalid or refused here.

    Example::

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import mabn_jax.nnx
        >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
        ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
        >>> x = jnp.arange(6.0).reshape(2, 3)
        >>> _ = model(x)                                # a training step: BN's mean, var move
        >>> model.eval()
        >>> before = model(x)
        >>> _ = mabn_jax.nnx.replace_batchnorm(model, buffer_size=4)
        >>> type(model.layers[1]).__name__, model.layers[1].mean_window.shape
        ('MABN', (4, 4))
        >>> bool(jnp.allclose(model(x), before, rtol=1e-6))
        True
    """
    if isinstance(model, nnx.BatchNorm):
        raise TypeError(
            "mabn_jax.nnx.replace_batchnorm: the model is itself an nnx.BatchNorm, "
            "which cannot be replaced in place; call it on a module that holds "
            "the BatchNorm (or build a mabn_jax.nnx.MABN)."
        )
    if not isinstance(model, nnx.Pytree):
        raise TypeError(
            f"mabn_jax.nnx.replace_batchnorm: expected an NNX model (an "
            f"nnx.Module), got {type(model).__name__}; for flax.linen use "
            "mabn_jax.replace_batchnorm(module)."
        )
    config = converter_config(mabn_config, "mabn_jax.nnx.replace_batchnorm")
    done: dict[int, Any] = {}
    _replace_in(model, config, done)
    # `done` maps each visited node's id to its result: a converted BatchNorm is the
    # one entry whose result is an MABN under another object's id.
    if not any(isinstance(new, MABN) and id(new) != old for old, new in done.items()):
        _check_replaced_before(model, config)
    return model


def _check_replaced_before(model: nnx.Module, config: dict[str, Any]) -> None:
    """A model without BatchNorms: a second call is a no-op with the same
    hyper-parameters and an error with others (which it could not apply)."""
    layers = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, MABN)]
    differ = [
        f"{'/'.join(map(str, path))}: {name}={getattr(layer, name)!r}"
        for path, layer in layers
        for name, value in config.items()
        if getattr(layer, name) != value
    ]
    if not layers:
        raise ValueError(
            "mabn_jax.nnx.replace_batchnorm: the model holds no nnx.BatchNorm (nor an "
            "MABN from an earlier replacement); nothing would change."
        )
    if differ:
        raise ValueError(
            "mabn_jax.nnx.replace_batchnorm: the model's BatchNorms were already replaced, "
            f"with other hyper-parameters than {config} ({differ[0]}); a second call cannot "
            "change them. Call it once, on a fresh copy of the BatchNorm model, with the "
            "configuration you want."
        )
