"""The examples in the public docstrings run (doctest) and print what they show.

Every module of the package is searched (private ``_x`` modules included: the
public names are defined there and re-exported), and every public name (the
``__all__`` of ``mabn_jax``, ``mabn_jax.nnx``, ``mabn_jax.functional``, the
functions of ``mabn_jax.monitor``) must carry an example: a new public function
without one fails ``test_every_public_name_has_an_example``.
"""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import mabn_jax

MODULES = sorted(m.name for m in pkgutil.walk_packages(mabn_jax.__path__, "mabn_jax."))
PUBLIC = ["mabn_jax", "mabn_jax.nnx", "mabn_jax.functional", "mabn_jax.monitor"]
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
