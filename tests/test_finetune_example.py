"""Smoke test: `examples/finetune.py --quick` runs end to end (pretrain with BN,
fine-tune with every method, MABN through the converter) and prints finite errors.

A separate process: the example sets JAX's default PRNG, which must not leak
into the other tests.
"""

import json
import math
import os
import subprocess
import sys

import pytest
from subprocess_env import env_with_this_mabn_jax

EXAMPLE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "finetune.py"
)


@pytest.mark.slow  # ~70 s of CPU: six compilations of a scanned ResNet
def test_finetune_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, EXAMPLE, "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env_with_this_mabn_jax(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| MABN through the converter |" in proc.stdout
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
