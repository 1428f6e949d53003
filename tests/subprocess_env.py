"""The environment for a test's child Python process: it must import the
mabn_jax under test, not whichever one the interpreter would find (e.g. an
editable install of another checkout)."""

import os

import mabn_jax

PACKAGE_FILE = os.path.abspath(mabn_jax.__file__)


def env_with_this_mabn_jax() -> dict:
    root = os.path.dirname(os.path.dirname(PACKAGE_FILE))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root] + paths)}
