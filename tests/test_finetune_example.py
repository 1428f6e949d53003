"""Smoke test: `examples/finetune.py --quick` runs end to end (pretrain with BN,
fine-tune with every method, MABN through the converter) and prints finite errors.

(Through tests/subprocess_env.py's ``run_script``, as every script's smoke test;
the scripts without assertions of their own are in tests/test_scripts_smoke.py.)
"""

import json
import math

import pytest
from subprocess_env import run_script


@pytest.mark.slow  # ~70 s of CPU: six compilations of a scanned ResNet
def test_finetune_quick(tmp_path):
    stdout = run_script("examples/finetune.py", "--quick", "--out", str(tmp_path), timeout=600)
    assert "| MABN through the converter |" in stdout
    saved = json.loads((tmp_path / "finetune.json").read_text())
    assert set(saved["results"]) == {
        "BN@2",
        "BN-frozen@2",
        "BN-frozen-affine@2",
        "GN@2",
        "MABN@2",
        "BN@32",
    }
    for key, cell in saved["results"].items():
        for split in ("val", "test"):
            errors = [e for row in cell[split] for e in row]
            assert len(errors) == 2 and all(math.isfinite(e) and 0 <= e <= 100 for e in errors), (
                key,
                split,
                errors,
            )
    # The pretrained BN networks learned digits 0-4 (chance: 80 %).
    assert all(e < 40 for e in saved["pretrain_test_error"]), saved["pretrain_test_error"]
