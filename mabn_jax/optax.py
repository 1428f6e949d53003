"""Weight centralization as an optimizer: centered kernels at no cost per step.

:class:`mabn_jax.CenteredConv` applies ``C(W)``, the stored kernel minus each
output unit's fan-in mean::

    C(W)[..., o] = W[..., o] − mean(W[..., o])       (mean over every axis but the last)

which costs a pass over every kernel in the forward pass and another over its
gradient (``∂L/∂W = C(∂L/∂W')``), each step. :func:`centralize` gets the same
effective weights from a plain ``nn.Conv`` (``nnx.Conv``) whose *stored*
kernel is kept centered: :func:`center` centers it once, and the optimizer
centralizes the gradient before the inner optimizer and its update after::

    g̃ = C(g),   (u, s') = inner.update(g̃, s, W),   W ← W + C(u)

``C`` is a linear, symmetric, idempotent projection, so with ``W₀ = C(V₀)``
this is, step by step, CenteredConv's run from ``V₀`` for any inner optimizer:
CenteredConv's gradient w.r.t. its stored ``V`` is ``C(g)`` (the same ``g̃``
enters the inner optimizer, with the same state), and its effective weights
move by ``C(u)``; weight decay (``optax.adamw``, ``add_decayed_weights``)
decays ``V`` there and ``W = C(V)`` here, which ``C`` maps to the same update.
Only float rounding differs (``tests/test_optax.py``: ≤ 1e-12 over 100 steps
in float64 for SGD with momentum, AdamW and a schedule).

What it changes elsewhere: :func:`mabn_jax.fold_params` folds the stored
kernel as it is (it is already the effective one), so a model trained this
way folds like any ``nn.Conv`` + MABN model. :func:`mabn_jax.replace_batchnorm`
is unaffected: it uses the centered MABN, which needs no centered kernels
(and a pretrained kernel must not be centered: that changes its function).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax  # a dependency of flax

from mabn_jax._shell import center_kernel

__all__ = ["centralize", "center", "CentralizeState"]

Mask = Any  # a pytree of bools shaped like the params, or a function of the params


class CentralizeState(NamedTuple):
    """The state of :func:`centralize`: the inner optimizer's (it keeps none of its own).

    Attributes:
      inner: the inner optimizer's state.

    Example:
      >>> import jax.numpy as jnp, optax, mabn_jax.optax
      >>> tx = mabn_jax.optax.centralize(optax.sgd(0.1), {"kernel": True})
      >>> tx.init({"kernel": jnp.zeros((2, 1))})
      CentralizeState(inner=(EmptyState(), EmptyState()))
    """

    inner: optax.OptState


def _resolve(mask: Mask | Callable[[Any], Any], params) -> Any:
    tree = mask(params) if callable(mask) else mask
    if jax.tree.structure(tree) != jax.tree.structure(params):  # type: ignore[operator]
        raise ValueError(
            "mabn_jax.optax: the mask must have the structure of the params (one bool per "
            "leaf: True for the kernels to keep centered), or be a function of the params "
            f"that returns one; got a tree of structure {jax.tree.structure(tree)} for params "
            f"of structure {jax.tree.structure(params)}."
        )
    return tree


def _centered(tree, mask_tree):
    def one(leaf, on):
        if not on:
            return leaf
        if getattr(leaf, "ndim", 0) < 2:
            raise ValueError(
                "mabn_jax.optax: a masked leaf has shape "
                f"{getattr(leaf, 'shape', ())}; only kernels (rank >= 2, output units "
                "last) can be centered. Mask the Conv/Dense kernels that feed a plain MABN."
            )
        return center_kernel(leaf)

    return jax.tree.map(one, tree, mask_tree)


def center(params, mask: Mask) -> Any:
    """The params with the masked kernels centered (``C(W)``): the start of a
    :func:`centralize` run (and what ``CenteredConv`` would apply to them).

    Args:
      params: a params tree.
      mask: ``True`` at the kernels to center (a tree like ``params``, or a
        function of ``params`` returning one).

    Returns:
      ``params`` with each masked kernel replaced by :func:`mabn_jax.center_kernel` of it.

    Example:
      >>> import jax.numpy as jnp, mabn_jax.optax
      >>> params = {"conv": {"kernel": jnp.array([[1.0], [3.0]]), "bias": jnp.ones(1)}}
      >>> mask = {"conv": {"kernel": True, "bias": False}}
      >>> mabn_jax.optax.center(params, mask)["conv"]["kernel"]
      Array([[-1.],
             [ 1.]], dtype=float32)
    """
    return _centered(params, _resolve(mask, params))


def centralize(
    inner: optax.GradientTransformation, mask: Mask, *, center_updates: bool = True
) -> optax.GradientTransformation:
    """``inner`` that keeps the masked (centered) kernels centered.

    ``g̃ = C(g)`` before ``inner``, ``C(u)`` after it, on the masked leaves
    (the other leaves pass through ``inner`` untouched). Start from
    :func:`center` of the initial params: with a plain ``nn.Conv``/``nn.Dense``
    holding them, training matches :class:`mabn_jax.CenteredConv`'s
    (:class:`mabn_jax.CenteredDense`'s) run for any ``inner``, without
    centering the kernels in every forward and backward pass.

    Args:
      inner: the optimizer (any ``optax.GradientTransformation``).
      mask: ``True`` at the kernels that feed a plain MABN (a tree like the
        params, or a function of the params returning one, as for ``optax.masked``).
      center_updates: center ``inner``'s update too (default). With an
        optimizer whose update is a linear combination of the (centered)
        gradients and params, from zero state (``optax.sgd`` with or without
        momentum or Nesterov, learning-rate schedules, ``add_decayed_weights``),
        the update is centered already: ``False`` skips that pass over the
        kernels. Keep ``True`` for anything elementwise-nonlinear (Adam, AdamW,
        RMSProp, clipping per element).

    Returns:
      An ``optax.GradientTransformation`` (state: :class:`CentralizeState`);
      its ``update`` needs ``params`` only if ``inner``'s does.

    Example:
      >>> import jax, jax.numpy as jnp, optax, mabn_jax.optax
      >>> params = mabn_jax.optax.center({"kernel": jnp.array([[1.0], [3.0]])}, {"kernel": True})
      >>> tx = mabn_jax.optax.centralize(optax.adam(0.1), {"kernel": True})
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"kernel": jnp.array([[1.0], [0.0]])}, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> float(params["kernel"].sum())  # still centered
      0.0
    """

    def init(params):
        return CentralizeState(inner.init(params))

    def update(updates, state, params=None):
        mask_tree = _resolve(mask, updates if params is None else params)
        updates, inner_state = inner.update(_centered(updates, mask_tree), state.inner, params)
        if center_updates:
            updates = _centered(updates, mask_tree)
        return updates, CentralizeState(inner_state)

    return optax.GradientTransformation(init, update)
