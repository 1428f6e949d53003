"""`examples/quickstart_nnx.py --quick` runs end to end, and its MABN model learns."""

import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "quickstart_nnx.py"


def _example():
    spec = importlib.util.spec_from_file_location("quickstart_nnx", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quickstart_nnx_quick(capsys):
    qs = _example()
    results = qs.main(["--quick"])
    out = capsys.readouterr().out
    assert "nnx.BatchNorm: train loss" in out and "mabn_jax.nnx.MABN: train loss" in out
    mabn = results["mabn_jax.nnx.MABN"]
    assert mabn["accuracy"] > 0.8, mabn["accuracy"]  # chance is 0.1
    stats = nnx.to_pure_dict(nnx.state(mabn["model"], nnx.BatchStat))
    assert int(stats["layers"][1]["step"]) == 300  # 600 images / batch 2, every step recorded
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(stats))
    assert qs.train_step.jitted_fn._cache_size() == 2  # one compilation per model
