"""Smoke test: `examples/small_batch.py --quick` runs end to end (CI runs it).

(Through tests/subprocess_env.py's ``run_script``, as every script's smoke test;
the scripts without assertions of their own are in tests/test_scripts_smoke.py.)
"""

import json

import numpy as np
from subprocess_env import run_script


def test_small_batch_quick(tmp_path):
    stdout = run_script("examples/small_batch.py", "--quick", "--out", str(tmp_path))
    assert "| BatchNorm at 32 (reference) |" in stdout and "Gap closed" in stdout
    assert (tmp_path / "small_batch.png").stat().st_size > 0
    saved = json.loads((tmp_path / "small_batch.json").read_text())
    assert len(saved["results"]) == 6
    for errors in saved["results"].values():
        assert len(errors) == 2 and all(0 <= e <= 100 for e in errors)
    # MABN trains through mabn_jax.value_and_grad, with ghost batches in the
    # simulated regime: every seed must learn (a diverged run is saved as 90 %,
    # chance level; these runs reach about 40-60 % in one quick epoch).
    mabn_runs = {k: v for k, v in saved["results"].items() if k.startswith("MLP/MABN@")}
    assert set(mabn_runs) == {"MLP/MABN@2/batch2", "MLP/MABN@2/batch32", "MLP/MABN@32/batch32"}
    for key, errors in mabn_runs.items():
        assert max(errors) < 75, (key, errors)
    # The gap closures are computed from the per-seed errors that were saved.
    row = saved["summary"]["MLP/true/MABN"]
    bn32 = np.mean(saved["results"]["MLP/BN@32/batch32"])
    bn2 = np.mean(saved["results"]["MLP/BN@2/batch2"])
    mabn2 = np.mean(saved["results"]["MLP/MABN@2/batch2"])
    assert np.isclose(row["bn32"], bn32) and np.isclose(row["bn_n"], bn2)
    assert np.isclose(row["err"], mabn2) and np.isclose(row["gap"], bn2 - bn32)
    assert row["gap"] > 1 and np.isclose(row["closed"], (bn2 - mabn2) / (bn2 - bn32))
