"""Every example and benchmark script runs end to end in its quick mode.

Examples take ``--quick`` and benchmarks ``--smoke`` (in aot.py and
aot_resnet.py ``--quick`` is a shorter real measurement; in bench.py it is the
default): tiny shapes, one round, a few steps, so each runs in seconds. Each is
checked for exit 0, the lines of its tables, and no NaN anywhere in its output;
timings are printed, never asserted. The scripts with assertions of their own
have their own files: examples/small_batch.py (test_small_batch_example.py),
finetune.py (test_finetune_example.py), quickstart.py (test_train_digits.py),
quickstart_nnx.py (test_quickstart_nnx.py). The five TPU-compiler scripts need
libtpu (``pip install -e '.[aot]'``) and are skipped, saying so, without it.
"""

import importlib.util
import re

import pytest
from subprocess_env import run_script

_NO_LIBTPU = importlib.util.find_spec("libtpu") is None
_needs_libtpu = pytest.mark.skipif(
    _NO_LIBTPU, reason="libtpu (the TPU compiler) is not installed: pip install -e '.[aot]'"
)


def _case(script, args, expected, marks=()):
    """A script, its arguments, and pieces of lines its output must contain."""
    stem = script.rsplit("/", 1)[-1].removesuffix(".py")
    return pytest.param(script, args, expected, marks=marks, id=stem)


SCRIPTS = [
    _case(
        "examples/data_parallel.py",
        ["--quick"],
        [
            "nn.BatchNorm per device (2) ",
            "MABN per device (2), m=8 ",
            "MABN synchronized (16), m=8 ",
        ],
    ),
    _case(
        "examples/batch_statistics.py",
        ["--quick", "--out", "{tmp}"],
        ["l2 norm over the last half", "Ψ_B  : BN, batch 32", "MABN used", "wrote"],
    ),
    _case(
        "examples/centered_ablation.py",
        ["--quick"],
        [
            "| variant | true batch 2 |",
            "| plain MABN (reference) |",
            "| centered: batch g_B and Ψ_B (BN's backward) |",
        ],
    ),
    _case(
        "benchmarks/bench.py",
        ["--smoke"],
        [
            "### Layer fwd+bwd",
            "| float32 | (2,4,4,32) |",
            "### ResNet10 train step",
            "| MABN + CenteredConv ",
            "### ResNet10 inference",
            "| MABN folded ",
            "### Memory",
            "| ResNet10 MABN train step, batch 2 ",
            "### Compiled layer fwd+bwd",
            "| MABN-centered ",
        ],
    ),
    _case(
        "benchmarks/bench_nnx.py",
        ["--smoke"],
        ["| nnx.jit  | MABN + CenteredConv", "| cached   |", "| compiled | MABN + CenteredConv"],
    ),
    _case(
        "benchmarks/brn_references.py",
        ["--smoke"],
        ["| Keras 3 defaults (no clipping), batch 2 |", "| sbx defaults (warm-up 50 here)"],
    ),
    _case(
        "benchmarks/aot.py",
        ["--smoke"],
        [
            "### Layer fwd+bwd on the TPU compiler",
            "| float32 | (2,4,4,32) |",
            "### Plain MABN / nn.BatchNorm bytes by window length",
        ],
        marks=_needs_libtpu,
    ),
    _case(
        "benchmarks/aot_resnet.py",
        ["--smoke"],
        [
            "| v5e:2x2  | sync ",
            "| CenteredConv + MABN(centered=False) ",
            "| nn.Conv + MABN(centered=False, buffer_size=1) ",
            "batch_stats per chip (MiB): BN ",
            "| MABN folded ",
            "| GN unfolded ",
        ],
        marks=_needs_libtpu,
    ),
    _case(
        "benchmarks/aot_centering.py",
        ["--smoke"],
        [
            "| nn.Conv + MABN + centralize ",
            "| projected-gradient conv + MABN, from the activations ",
            "| projected-gradient conv + MABN, from the cheaper of the two ",
        ],
        marks=_needs_libtpu,
    ),
    _case(
        "benchmarks/aot_ops.py",
        ["MABN", "float32", "2,4,4,32", "--top", "5"],
        ["MABN float32 (2, 4, 4, 32): bytes accessed", "| fusion |"],
        marks=_needs_libtpu,
    ),
    _case(
        "benchmarks/aot_pallas.py",
        [],
        ["y = 2 · x (moves 2 |x|):", "y = 2 · pallas_copy(x) (moves 4 |x|):"],
        marks=_needs_libtpu,
    ),
]


@pytest.mark.parametrize("script,args,expected", SCRIPTS)
def test_script_quick_mode(script, args, expected, tmp_path):
    stdout = run_script(script, *(a.format(tmp=tmp_path) for a in args))
    missing = [line for line in expected if line not in stdout]
    assert not missing, f"{script}: {missing} not in its output:\n{stdout[-3000:]}"
    assert not re.search(r"\bnan\b", stdout, re.IGNORECASE), stdout[-3000:]


def test_bench_smoke_folds_exactly():
    """bench.py's folding check: folded and unfolded inference agree (to float32)."""
    stdout = run_script("benchmarks/bench.py", "--smoke", "--only", "infer")
    errors = [float(e) for e in re.findall(r"max \|unfolded\| = ([\d.e+-]+)", stdout)]
    assert len(errors) == 2 and max(errors) < 1e-5, stdout
