"""The jax/flax behaviour mabn_jax relies on beyond public API (``mabn_jax._upstream``).

Each test checks one assumption directly against the installed jax/flax, so an
upgrade that breaks it fails here, naming the ``_upstream`` function to fix,
before a layer misbehaves in some other test.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx

import mabn_jax
from mabn_jax import _upstream


def _broke(function: str, what: str) -> str:
    return (
        f"mabn_jax._upstream.{function}: {what} with jax {jax.__version__}, flax "
        f"{__import__('flax').__version__} (tested with {_upstream.TESTED_WITH}); "
        "adapt that function to the new behaviour."
    )


def test_per_apply_registry_is_private_to_each_apply_and_each_lifted_trace():
    seen = []

    class Leaf(nn.Module):
        @nn.compact
        def __call__(self, x):
            registry = _upstream.per_apply_registry(self, "_test_registry")
            seen.append(registry)
            registry.add(self.path)
            return x

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = Leaf()(x)
            x = Leaf()(x)
            body = nn.scan(
                lambda mdl, c, _: (Leaf()(c), None),
                variable_broadcast=False,
                split_rngs={},
                length=2,
            )
            return body(self, x, None)[0]

    model = Model()
    x = jnp.ones((2, 3))
    model.apply({}, x)
    first = seen[:]
    assert len(first) == 4  # two Leafs, then the scan body traced (and run) once more
    assert first[0] is first[1], _broke(
        "per_apply_registry", "two modules of one apply got different root scopes"
    )
    assert first[0] == {("Leaf_0",), ("Leaf_1",)}, _broke(
        "per_apply_registry", "the registry did not keep entries within one apply"
    )
    assert all(r is not first[0] for r in first[2:]), _broke(
        "per_apply_registry", "an nn.scan body shares the outer apply's root scope"
    )
    seen.clear()
    model.apply({}, x)
    assert seen[0] is not first[0] and len(seen[0]) == 2, _broke(
        "per_apply_registry", "a second apply sees the first apply's registry"
    )


def test_forward_mode_through_custom_vjp_is_recognized():
    @jax.custom_vjp
    def f(x):
        return x

    f.defvjp(lambda x: (x, None), lambda _, g: (g,))
    with pytest.raises(TypeError) as info:
        jax.jvp(f, (1.0,), (1.0,))
    assert _upstream.is_forward_mode_error(info.value), _broke(
        "is_forward_mode_error", f"JAX's forward-mode error reads {str(info.value)!r}"
    )
    assert not _upstream.is_forward_mode_error(TypeError("unsupported operand"))


def test_in_nnx_capture_is_true_exactly_inside_nnx_capture():
    seen = []

    class Probe(nnx.Module):
        def __call__(self, x):
            seen.append(_upstream.in_nnx_capture(self))
            return x

    model = Probe()
    model(1.0)
    nnx.capture(model, nnx.Intermediate)(1.0)
    assert seen == [False, True], _broke(
        "in_nnx_capture", f"outside / inside nnx.capture it read {seen}"
    )


def test_in_nnx_tabulate_is_true_exactly_in_nnx_tabulates_clone():
    seen = []

    class Probe(nnx.Module):
        def __call__(self, x):
            seen.append(_upstream.in_nnx_tabulate(self))
            return x

    model = Probe()
    model(jnp.ones(2))
    nnx.tabulate(model, jnp.ones(2), compute_vjp_flops=True)
    model(jnp.ones(2))  # tabulate marked its clone, not the model
    assert len(seen) > 2 and not seen[0] and not seen[-1] and all(seen[1:-1]), _broke(
        "in_nnx_tabulate", f"outside / inside / after nnx.tabulate it read {seen}"
    )


def test_the_layers_use_no_private_flax_module():
    """The package imports public Flax modules only (private ones are reached
    through ``_upstream`` alone)."""
    import pathlib
    import re

    root = pathlib.Path(mabn_jax.__file__).parent
    imports = {
        p.name: re.findall(r"^\s*(?:from|import) (flax[\w.]*)", p.read_text(), re.M)
        for p in root.glob("*.py")
    }
    public = {
        "flax",
        "flax.core",
        "flax.linen",
        "flax.nnx",
        "flax.training.dynamic_scale",
        "flax.linen.initializers",
        "flax.typing",
        "flax.traverse_util",
        "flax.nnx.nn",
    }
    private = {f: sorted(set(m) - public) for f, m in imports.items() if set(m) - public}
    assert not private, private


def test_inside_loop_since_sees_loop_bodies_between_two_traces():
    seen, outer = {}, {}

    def record(name):
        seen[name] = _upstream.inside_loop_since(outer["trace"])

    def f(p):
        outer["trace"] = _upstream.current_trace()  # the trace of jax.grad's function
        record("directly")
        jax.jit(lambda: record("jit"))()
        jax.checkpoint(lambda q: (record("checkpoint"), q)[1])(p)
        jax.vmap(lambda q: (record("vmap"), q)[1])(jnp.ones(2) * p)
        jax.lax.scan(lambda c, _: (record("scan"), (c, None))[1], p, None, length=2)
        jax.lax.fori_loop(0, 2, lambda i, c: (record("fori_loop"), c)[1], p)
        jax.lax.while_loop(
            lambda c: (record("while_cond"), c < 1)[1],
            lambda c: (record("while_body"), c + 1)[1],
            p,
        )
        jax.jit(
            lambda q: jax.lax.scan(
                lambda c, _: (jax.jit(lambda: record("jit in scan"))(), (c, None))[1],
                q,
                None,
                length=2,
            )
        )(p)
        return p

    jax.grad(f)(0.0)
    loops = {"scan", "fori_loop", "while_cond", "while_body", "jit in scan"}
    for name, inside in seen.items():
        assert inside == (name in loops), _broke(
            "inside_loop_since", f"code run {name!r} reads {inside}"
        )
    assert not _upstream.inside_loop_since(object()), _broke(
        "inside_loop_since", "an unrelated trace token is taken for an outer trace"
    )


def test_is_batchnorm_call_sees_batchnorms_own_call_only():
    """BatchNorm's call (also through a subclass's super()) is recognized; the
    subclass's own override and other modules' calls are not."""
    from flax import linen as nn

    from mabn_jax import _upstream

    class Sub(nn.BatchNorm):
        def __call__(self, x, **kw):
            return super().__call__(x, **kw)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(2)(x)
            x = nn.BatchNorm(use_running_average=True)(x)
            return Sub(use_running_average=True)(x)

    seen = []

    def record(next_fun, args, kwargs, context):
        seen.append((type(context.module).__name__, _upstream.is_batchnorm_call(context)))
        return next_fun(*args, **kwargs)

    x = jnp.ones((2, 3))
    variables = Net().init(jax.random.key(0), x)
    with nn.intercept_methods(record):
        Net().apply(variables, x)
    calls = [s for s in seen if s[0] != "Net"]
    want = [("Dense", False), ("BatchNorm", True), ("Sub", False), ("Sub", True)]
    assert calls == want, _broke("is_batchnorm_call", f"saw {calls}")


def test_container_attributes_are_the_users_own():
    """An NNX module's Flax bookkeeping in vars() starts with '_pytree__'; what
    remains of its lists, dicts and tuples is the user's attributes."""
    from flax import nnx

    from mabn_jax import _upstream

    class Model(nnx.Module):
        def __init__(self):
            self.blocks = nnx.data([nnx.Linear(2, 2, rngs=nnx.Rngs(0))])
            self.table = nnx.data({"a": nnx.Linear(2, 2, rngs=nnx.Rngs(0))})

    model = Model()
    got = sorted(_upstream.container_attributes(model))
    flax_own = [k for k in vars(model) if k not in ("blocks", "table")]
    assert got == ["blocks", "table"], _broke("container_attributes", f"found {got}")
    assert all(k.startswith("_pytree__") for k in flax_own), _broke(
        "container_attributes", f"Flax's own attributes are {flax_own}"
    )


def test_no_module_uses_another_modules_private_names():
    """Each module of the package uses only the public names of the others
    (``from mabn_jax._x import name`` and ``_x.name``, never ``_name``): the
    private modules' interfaces are their non-underscore names."""
    import ast
    import pathlib

    root = pathlib.Path(mabn_jax.__file__).parent
    found = []
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mabn_jax"):
                for alias in node.names:
                    if node.module == "mabn_jax":
                        modules.add(alias.asname or alias.name)
                    elif alias.name.startswith("_"):
                        found.append(f"{path.name}: from {node.module} import {alias.name}")
        for node in ast.walk(tree):
            attribute = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            private = attribute and node.attr.startswith("_") and not node.attr.startswith("__")
            if private and node.value.id in modules:
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, found


@pytest.mark.parametrize("graph", [True, False])
def test_is_prefix_mismatch_recognizes_jaxs_error_for_axes_that_do_not_fit(graph):
    """Axes that do not fit a transform's argument: JAX's error (in NNX tree mode
    the AttributeError its message formatting raises) is recognized; another
    ValueError is not."""
    from flax import nnx

    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    axes = nnx.prefix(model, {...: None}, graph=graph)  # built before a change
    model.extra = nnx.BatchStat(jnp.zeros(3))  # as the helper's probes are attached
    forward = nnx.vmap(lambda m, x: m(x), in_axes=(axes, 0), graph=graph, graph_updates=False)
    with pytest.raises((ValueError, AttributeError)) as info:
        forward(model, jnp.ones((4, 1, 2)))
    assert _upstream.is_prefix_mismatch(info.value), _broke(
        "is_prefix_mismatch", f"JAX raised {type(info.value).__name__}: {info.value}"
    )
    assert not _upstream.is_prefix_mismatch(ValueError("another error"))


def test_graph_state_parts_are_unpacks_graphdef_and_state():
    """``nnx.unpack``'s GraphStates merge back from the parts read here."""
    from flax import nnx

    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    params, rest = nnx.unpack(model, nnx.Param, ...)
    graphdef, state = _upstream.graph_state_parts(params)
    assert graphdef == _upstream.graph_state_parts(rest)[0], _broke(
        "graph_state_parts", "the two GraphStates of one unpack have different graphdefs"
    )
    merged = nnx.merge(graphdef, state, _upstream.graph_state_parts(rest)[1])
    assert jnp.array_equal(merged.kernel[...], model.kernel[...]), _broke(
        "graph_state_parts", "merging the parts does not give the model back"
    )
