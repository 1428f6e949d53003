"""Child Python processes of the tests: the environment that imports the
mabn_jax under test, and the one way the smoke tests run a script.

A child must import the mabn_jax under test, not whichever one the
interpreter would find (e.g. an editable install of another checkout).
"""

import os
import subprocess
import sys

import mabn_jax

PACKAGE_FILE = os.path.abspath(mabn_jax.__file__)
ROOT = os.path.dirname(os.path.dirname(PACKAGE_FILE))


def env_with_this_mabn_jax() -> dict:
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT] + paths)}


def run_script(path: str, *args: str, timeout: int = 300) -> str:
    """Runs ``ROOT/path`` with ``args`` in a fresh interpreter and returns its stdout;
    fails the test, with the tail of stderr, unless it exits 0.

    A separate process, because the scripts set process-wide JAX state (the
    default PRNG, ``XLA_FLAGS``, x64) that must not leak into the other tests.
    Compiled without most XLA optimizations: a smoke run checks that a script
    works, not how fast or how exactly (the compiled programs are a few times
    quicker to build, which is most of a smoke run's time).
    """
    env = {**env_with_this_mabn_jax(), "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, (
        f"{path} {' '.join(args)} exited {proc.returncode}:\n" + (proc.stderr[-3000:])
    )
    return proc.stdout
