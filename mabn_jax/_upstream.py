"""The behaviour of jax and flax that mabn_jax relies on beyond their public API.

Everything else uses documented API only; these cannot (yet), so they
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
- :func:`in_nnx_tabulate`: ``nnx.tabulate`` runs on a clone of the model
  whose modules it marks with a ``_nnx_tabulate_id`` attribute (copied into
  every merge of them), and with ``compute_vjp_flops`` it differentiates each
  call only to count the FLOPs of that VJP; Flax has no public way to tell.
- :func:`current_trace`, :func:`inside_loop_since`: JAX traces a loop body
  (``lax.scan``, ``lax.while_loop``) as a jaxpr trace whose debug info says
  what it is traced for (``"scan"``, ``"fori_loop"``, ``"while_body"``, ``"while_cond"``), and
  every trace links to the trace it was started in (``parent_trace``). JAX has
  no public way to ask whether code runs inside a loop body; the value_and_grad
  helpers refuse a layer applied once per iteration of a loop inside the loss
  (its backward statistics would be summed over the iterations).

- :func:`is_batchnorm_call`: inside ``nn.intercept_methods`` the context's
  ``orig_method`` of a real ``nn.BatchNorm.__call__`` is a ``functools.partial``
  of the undecorated function, which Flax's method wrapper keeps as
  ``nn.BatchNorm.__call__.__wrapped__`` (``functools.wraps``). Flax has no
  public way to tell BatchNorm's own call from a subclass's override or a
  lifted transform's wrapper; :func:`mabn_jax.replace_batchnorm` replaces
  exactly the former.
- :func:`container_attributes`: an NNX module's ``vars()`` hold Flax's own
  bookkeeping under names starting ``_pytree__``; the others are the user's.
  Plain lists, dicts and tuples among them are pytrees that
  ``nnx.iter_children`` does not list, and
  :func:`mabn_jax.nnx.replace_batchnorm` walks into them.

- :func:`is_prefix_mismatch`: a transform's axes (``in_axes`` of ``nnx.vmap``,
  ...) that do not fit its arguments make JAX raise a ``ValueError`` whose text
  says "tree prefix"; in NNX tree mode, formatting that message fails with an
  ``AttributeError`` about ``GetAttrKey``. JAX has no exception class for it;
  :func:`mabn_jax.nnx.value_and_grad` then retries with the probes carried in
  the layers' own state (axes built before the step do not fit attached probes).
- :func:`graph_state_parts`: ``nnx.unpack``'s ``GraphState`` keeps its graph
  definition and state as ``_graphdef`` and ``_state``; Flax has no public
  accessor. The NNX helper rebuilds a model from them to probe its layers.

Tested version range (the versions the whole test suite ran with; the
minimums of ``pyproject.toml``): jax 0.10.2 (jaxlib 0.10.2) and flax 0.12.8.
Newer releases are expected to work where ``tests/test_upstream.py`` passes.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "TESTED_WITH",
    "per_apply_registry",
    "is_forward_mode_error",
    "in_nnx_capture",
    "in_nnx_tabulate",
    "current_trace",
    "inside_loop_since",
    "is_prefix_mismatch",
    "graph_state_parts",
    "is_batchnorm_call",
    "container_attributes",
]

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


def in_nnx_tabulate(module: Any) -> bool:
    """Whether an NNX ``module`` is (a copy of) the clone ``nnx.tabulate`` runs."""
    return hasattr(module, "_nnx_tabulate_id")


# What jax.lax.scan / while_loop pass as `traced_for` to their bodies' debug info.
_LOOP_BODIES = frozenset({"scan", "fori_loop", "while_body", "while_cond"})


def current_trace() -> Any:
    """The trace JAX binds operations to now (an opaque token)."""
    from jax._src import core  # private: see the module docstring

    return core.trace_ctx.trace


def inside_loop_since(outer: Any) -> bool:
    """Whether the current trace is inside a loop body that was entered after
    ``outer`` (a :func:`current_trace` token): walks the ``parent_trace`` links
    from the current trace up to ``outer``. False if ``outer`` is not on the way
    (nothing is known then)."""
    trace, loops = current_trace(), False
    while trace is not None and trace is not outer:
        frame = getattr(trace, "frame", None)
        debug = getattr(frame, "debug_info", None)
        loops |= getattr(debug, "traced_for", None) in _LOOP_BODIES
        trace = getattr(trace, "parent_trace", None)
    return loops and trace is outer


def is_batchnorm_call(context: Any) -> bool:
    """Whether a linen method interceptor's ``context`` is ``nn.BatchNorm``'s own
    ``__call__`` (also reached by a subclass's ``super()`` call, or inside a
    lifted ``nn.scan``/``nn.vmap``; not a lifted class's outer call)."""
    from flax import linen as nn

    original = nn.BatchNorm.__call__.__wrapped__  # type: ignore[attr-defined]
    return (
        context.method_name == "__call__" and getattr(context.orig_method, "func", None) is original
    )


_FLAX_BOOKKEEPING = "_pytree__"


def container_attributes(module: Any) -> dict[str, Any]:
    """An NNX module's own attributes that are plain lists, dicts or tuples."""
    return {
        k: v
        for k, v in vars(module).items()
        if isinstance(v, (list, dict, tuple)) and not k.startswith(_FLAX_BOOKKEEPING)
    }


def is_prefix_mismatch(error: Exception) -> bool:
    """Whether ``error`` is JAX's pytree-prefix mismatch of a transform's axes."""
    return "tree prefix" in str(error) or "GetAttrKey" in str(error)


def graph_state_parts(graph_state: Any) -> tuple[Any, Any]:
    """``(graphdef, state)`` of an ``nnx.GraphState`` (``nnx.unpack``'s)."""
    return graph_state._graphdef, graph_state._state
