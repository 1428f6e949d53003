"""The behaviour of jax and flax that mabn_jax relies on beyond their public API.

Everything else uses documented API only; these three cannot (yet), so they
live here, each behind one function, and ``tests/test_upstream.py`` checks
each assumption directly against the installed jax/flax: after an upgrade
that breaks one, that test fails naming the function below, before any
layer misbehaves.

- :func:`per_apply_registry`: Flax linen gives every ``apply`` (and every
  lifted trace, e.g. an ``nn.scan`` body) its own root ``Scope`` object, which
  takes attributes and lives as long as that apply. Flax has no public
  per-apply storage; the linen MABN counts its training calls there.
- :func:`is_forward_mode_error`: JAX refuses forward-mode differentiation of
  a ``jax.custom_vjp`` function with a ``TypeError`` whose text says
  "forward-mode". JAX has no public exception class for it; the MABN
  training step turns it into an error that says what to do instead.
- :func:`in_nnx_capture`: inside ``nnx.capture`` Flax NNX puts a
  ``__captures__`` attribute on each module, which ``Module.sow`` checks; a
  sow outside ``nnx.capture`` is deprecated (and would add attributes to the
  model), so the NNX layers sow only inside it.

Tested version range (the versions the whole test suite ran with; the
minimums of ``pyproject.toml``): jax 0.10.2 (jaxlib 0.10.2) and flax 0.12.8.
Newer releases are expected to work where ``tests/test_upstream.py`` passes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TESTED_WITH", "per_apply_registry", "is_forward_mode_error", "in_nnx_capture"]

#: The jax and flax versions the test suite (this module's assumptions included) ran with.
TESTED_WITH = {"jax": "0.10.2", "flax": "0.12.8"}

# The words of JAX's TypeError for jax.jvp of a custom_vjp function
# ("can't apply forward-mode autodiff (jvp) to a custom_vjp function.").
_FORWARD_MODE_TEXT = "forward-mode"


def per_apply_registry(module: Any, name: str) -> set:
    """A set private to the current ``apply`` (or lifted trace) of a bound
    linen ``module``, created empty on first use under ``name``."""
    root = module.scope.root
    return root.__dict__.setdefault(name, set())


def is_forward_mode_error(error: TypeError) -> bool:
    """Whether ``error`` is JAX refusing forward mode through a ``custom_vjp``."""
    return _FORWARD_MODE_TEXT in str(error)


def in_nnx_capture(module: Any) -> bool:
    """Whether an NNX ``module`` is called inside ``nnx.capture`` (so that
    ``Module.sow`` records into the capture instead of onto the module)."""
    return hasattr(module, "__captures__")
