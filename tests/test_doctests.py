"""The examples in the public docstrings run (doctest) and print what they show."""

import doctest
import importlib

import pytest

MODULES = ["mabn_jax.linen", "mabn_jax._config", "mabn_jax.checkpoint", "mabn_jax.fold",
           "mabn_jax.training", "mabn_jax.monitor", "mabn_jax._nnx_layers",
           "mabn_jax._nnx_training", "mabn_jax.functional"]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} doctest failure(s) in {name} (see output)"


def test_the_layers_and_configs_have_examples():
    import mabn_jax
    for obj in (mabn_jax.MABN, mabn_jax.MABNConfig):
        assert ">>>" in obj.__doc__, obj.__name__
