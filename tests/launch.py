"""Running Python workers from a test: bounded in time, no orphans, a clean env.

Each worker is started in its own session (process group), with stdin closed,
its output in a temporary file (no pipe to fill up), a neutral working
directory, ``PYTHONPATH`` set to this checkout only, and the test session's
``XLA_FLAGS`` / ``JAX_*`` settings removed, so that a worker sets up its own
devices. When the time is up, or a worker has failed and the others have not
exited ``fail_fast_grace`` seconds later, every group still alive gets
SIGTERM, then SIGKILL, and every worker is reaped.

``launch_distributed`` adds what ``jax.distributed.initialize`` needs
(``MP_COORD=127.0.0.1:PORT``, ``MP_NUM_PROCESSES``, ``MP_PROCESS_ID``) and
retries with a new port if the coordinator's port was taken in between.
(After the multi-process spike in /work/spike_mp.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


@dataclasses.dataclass
class Result:
    returncodes: list
    outputs: list  # stdout and stderr of each worker
    pids: list
    timed_out: bool
    wall_s: float

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)

    def report(self, tail: int = 4000) -> str:
        return "\n".join(
            f"--- worker {i}, exit code {rc}{' (timed out)' * self.timed_out}\n{out[-tail:]}"
            for i, (rc, out) in enumerate(zip(self.returncodes, self.outputs))
        )


def clean_env(extra: dict | None = None) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "XLA_FLAGS"
        and not k.startswith("JAX_")
        and "_proxy" not in k.lower()
        and k != "PYTHONPATH"
    }
    env.update(
        PYTHONPATH=ROOT,
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        OMP_NUM_THREADS="1",
    )
    env.update(extra or {})
    return env


def launch(
    script: str, envs: list[dict], *, cwd: str, timeout: float, fail_fast_grace: float = 10.0
) -> Result:
    """Runs ``python script`` once per entry of ``envs`` (extra variables), in parallel."""
    procs, logs = [], []
    t0 = time.time()
    try:
        for extra in envs:
            log = tempfile.TemporaryFile()  # noqa: SIM115 (read and closed below)
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, script],
                    env=clean_env(extra),
                    cwd=cwd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        timed_out, first_failure = False, None
        while any(p.poll() is None for p in procs):
            now = time.time()
            if first_failure is None and any(p.poll() not in (None, 0) for p in procs):
                first_failure = now
            if now - t0 > timeout:
                timed_out = True
                break
            if first_failure is not None and now - first_failure > fail_fast_grace:
                break
            time.sleep(0.05)
    finally:
        _stop(procs)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read().decode(errors="replace"))
        log.close()
    return Result(
        [p.returncode for p in procs], outputs, [p.pid for p in procs], timed_out, time.time() - t0
    )


def _stop(procs) -> None:
    """SIGTERM to every live worker's group, 3 s grace, then SIGKILL; reap all."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        _signal_group(p, signal.SIGTERM)
    end = time.time() + 3
    while time.time() < end and any(p.poll() is None for p in alive):
        time.sleep(0.05)
    for p in procs:
        _signal_group(p, signal.SIGKILL)  # also whatever a worker started
        p.wait()


def _signal_group(p, sig) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_distributed(
    script: str,
    num_processes: int,
    env: dict | None = None,
    *,
    cwd: str,
    timeout: float,
    port_retries: int = 2,
) -> Result:
    """``num_processes`` workers of one ``jax.distributed`` job on localhost."""
    deadline = time.time() + timeout
    for _ in range(port_retries + 1):
        port = free_port()
        envs = [
            {
                **(env or {}),
                "MP_COORD": f"127.0.0.1:{port}",
                "MP_NUM_PROCESSES": str(num_processes),
                "MP_PROCESS_ID": str(i),
            }
            for i in range(num_processes)
        ]
        result = launch(script, envs, cwd=cwd, timeout=max(deadline - time.time(), 1.0))
        if result.ok or not any(
            "Failed to add port" in o or "Address already in use" in o for o in result.outputs
        ):
            return result
    return result
