"""Test-session setup: eight simulated CPU devices for the multi-device tests.

XLA reads ``XLA_FLAGS`` once, when JAX initializes its backends, so the flag
must be in the environment before any test module imports JAX. pytest imports
this file first. On CPU the extra devices are host threads; single-device
code still runs on device 0 and is not slowed down.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
