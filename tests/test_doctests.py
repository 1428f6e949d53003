"""The examples in the public docstrings run (doctest) and print what they show,
and the public docstrings have their Google-style sections.

Every module of the package is searched (private ``_x`` modules included: the
public names are defined there and re-exported), and every public name (the
``__all__`` of ``mabn_jax``, ``mabn_jax.nnx``, ``mabn_jax.functional``, the
functions of ``mabn_jax.monitor``) must carry an example: a new public function
without one fails ``test_every_public_name_has_an_example``. Its arguments and
result must be documented in ``Args:`` / ``Returns:`` (classes: ``Args:`` or
``Attributes:``) sections, which napoleon renders in ``make docs``.
"""

import doctest
import importlib
import inspect
import pkgutil
import re

import pytest

import mabn_jax

MODULES = sorted(m.name for m in pkgutil.walk_packages(mabn_jax.__path__, "mabn_jax."))
PUBLIC = ["mabn_jax", "mabn_jax.nnx", "mabn_jax.functional", "mabn_jax.monitor", "mabn_jax.optax"]
NOT_DOCTESTED = {"PROBES"}  # a constant (the probes' collection name), documented in api.md
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} doctest failure(s) in {name} (see output)"


def _public_names(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n, obj in vars(module).items()
            if not n.startswith("_")
            and inspect.isfunction(obj)
            and obj.__module__ == module.__name__
        ]
    return names


def _public_objects():
    for module_name in PUBLIC:
        module = importlib.import_module(module_name)
        for name in _public_names(module):
            obj = getattr(module, name)
            if not inspect.ismodule(obj) and name not in NOT_DOCTESTED:
                yield f"{module_name}.{name}", obj


def test_every_public_name_has_an_example():
    missing = [name for name, obj in _public_objects() if ">>>" not in (obj.__doc__ or "")]
    assert not missing, f"public names without a '>>>' example in their docstring: {missing}"


def test_every_example_is_collected():
    """Each public object's examples are found in the modules the doctest run searches."""
    found = set()
    for name in MODULES:
        module = importlib.import_module(name)
        found |= {test.name for test in doctest.DocTestFinder().find(module, name) if test.examples}
    qualified = {f"{obj.__module__}.{obj.__qualname__}" for _, obj in _public_objects()}
    assert qualified <= found, sorted(qualified - found)


def _section(doc, *names):
    return any(re.search(rf"^\s*{name}:\s*$", doc, re.M) for name in names)


def _documented_callables():
    """The public objects, ``mabn_jax.convert``'s, and the public methods and
    ``__call__`` their classes define (what ``docs/api.md`` renders)."""
    convert = importlib.import_module("mabn_jax.convert")
    objects = list(_public_objects())
    objects += [(f"mabn_jax.convert.{n}", getattr(convert, n)) for n in convert.__all__]
    for name, obj in list(objects):
        if inspect.isclass(obj):
            objects += [
                (f"{name}.{m}", f)
                for m, f in vars(obj).items()
                if inspect.isfunction(f)
                and f.__qualname__.startswith(obj.__qualname__ + ".")  # not a stored initializer
                and (m == "__call__" or not (m.startswith("_") or m == "setup"))  # Flax's hook
            ]
    return dict(objects)


def test_every_public_callable_has_its_sections():
    missing = []
    for name, obj in _documented_callables().items():
        doc = inspect.getdoc(obj) or ""
        params = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
        if inspect.isclass(obj):
            if params and not _section(doc, "Args", "Attributes"):
                missing.append(f"{name}: Args or Attributes")
            continue
        if params and not _section(doc, "Args"):
            missing.append(f"{name}: Args")
        if inspect.signature(obj).return_annotation not in (None, "None") and not _section(
            doc, "Returns"
        ):
            missing.append(f"{name}: Returns")
    assert not missing, f"public docstrings without their Google-style sections: {missing}"
