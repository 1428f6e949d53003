"""Test-session setup: eight simulated CPU devices for the multi-device tests.

XLA reads ``XLA_FLAGS`` once, when JAX initializes its backends, so the flag
must be in the environment before any test module imports JAX. pytest imports
this file first. On CPU the extra devices are host threads; single-device
code still runs on device 0 and is not slowed down.
"""

import os

# The suite runs on the CPU. `make aot` installs libtpu into the same venv; without
# this JAX would try (and fail, with a lock a second xdist worker trips on) to start
# a TPU backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# tests/test_aot.py compiles for TPU deviceless with libtpu: each xdist worker loads it
# (without this the second one fails on libtpu's lock), and no TPU host is probed.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# Many tests compile the same small programs (fresh closures over the same
# model), and the tests that start a child process compile what the parent
# already did: a compilation cache shared by the session (and its children,
# through the environment) compiles each program once. It lives in a fresh
# temporary folder, removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _CACHE = tempfile.mkdtemp(prefix="mabn_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=_CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )

# Property tests are reproducible: every run draws the same examples (a failure
# seen once is seen again), and no per-example deadline (compiles are slow and
# vary with the machine's load). Tests' own @settings override max_examples only.
from hypothesis import settings as _hypothesis_settings

_hypothesis_settings.register_profile("mabn_jax", derandomize=True, deadline=None, print_blob=True)
_hypothesis_settings.load_profile("mabn_jax")


# Shared scaffolding of the test modules (one definition each).
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_compiles():
    """Compile without most XLA optimizations (as Flax's ImageNet train_test does),
    for the requesting module only (``pytestmark = pytest.mark.usefixtures(
    "fast_compiles")``): for bookkeeping tests, or comparisons whose sides all
    compile the same way."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def batch_mesh(n_devices):
    """A 1-D mesh, axis ``"batch"``, over the first ``n_devices`` devices."""
    import jax

    return jax.make_mesh((n_devices,), ("batch",), devices=jax.devices()[:n_devices])
