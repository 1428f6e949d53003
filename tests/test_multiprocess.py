"""A real multi-process run: two processes on localhost, two CPU devices each.

tests/mp_mabn.py is the worker (``jax.distributed.initialize`` with
``coordinator_address='127.0.0.1:PORT'``, gloo CPU collectives, ``shard_map``
over one global mesh); tests/launch.py starts it with a time limit, a clean
environment and a neutral working directory, and leaves no process behind.

* Synchronized MABN (``axis_name='batch'``, statistics over the 8 examples of
  the global batch, all-reduced across the processes) equals the
  single-process run on the same global batch, step by step, through warm-up,
  the window phase and renormalization with ``r`` clipped.
* Per-device MABN with its state sharded across the processes checkpoints
  with orbax (every process writing its shards) and, restored in two fresh
  processes, resumes bit for bit.
"""

import time

import mp_mabn as mp
import numpy as np
import pytest
from launch import launch, launch_distributed
from tree_assert import assert_trees_close

WORKER = mp.__file__
TIMEOUT = 60  # per launch; a run takes a few seconds


def _gone(pid, wait=5.0):
    """Whether ``pid`` has exited (a zombie awaiting its new parent counts as gone)."""
    end = time.time() + wait
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        if time.time() > end:
            return False
        time.sleep(0.05)


@pytest.mark.multiprocess
def test_launcher_stops_hung_workers_and_their_children(tmp_path):
    """A worker that never ends, with a child of its own: the launch returns at its
    time limit and neither process is left."""
    script = tmp_path / "hang.py"
    script.write_text(
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "open('child.pid', 'w').write(str(child.pid))\n"
        "print('xla', os.environ.get('XLA_FLAGS'), 'cwd', os.getcwd(), flush=True)\n"
        "time.sleep(600)\n"
    )
    result = launch(str(script), [{}], cwd=str(tmp_path), timeout=2.0)
    assert result.timed_out and not result.ok  # 2 s: a hang guard, not a speed claim
    assert f"xla None cwd {tmp_path}" in result.outputs[0]  # clean env, neutral cwd
    child = int((tmp_path / "child.pid").read_text())
    assert _gone(result.pids[0]) and _gone(child)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_sync_equals_single_process_and_sharded_state_resumes(tmp_path):
    t0 = time.time()
    train = launch_distributed(
        WORKER, mp.NPROC, {"MP_MODE": "train"}, cwd=str(tmp_path), timeout=TIMEOUT
    )
    assert train.ok, train.report()
    assert all(_gone(pid) for pid in train.pids)

    ref = mp.reference_trajectory()
    clipped = False
    for pid in range(mp.NPROC):
        dump = np.load(tmp_path / f"sync_p{pid}.npz")
        for t, (loss, state) in enumerate(ref):
            got = {k[len(str(t)) :]: dump[k] for k in dump.files if k.startswith(f"{t}[")}
            want = mp.flat((np.float32(loss), state))
            assert sorted(got) == sorted(want)
            assert_trees_close(
                [got[k] for k in sorted(want)],
                [want[k] for k in sorted(want)],
                rtol=2e-5,
                atol=2e-6,
                what=f"process {pid} step {t + 1}",
            )
        assert int(dump["9[1]['batch_stats']['MABN_0']['step']"]) == mp.STEPS
    for t in range(6, mp.STEPS):  # coverage: renormalization (t > 6) with r clipped
        layer, prev = ref[t][1]["batch_stats"]["MABN_1"], ref[t - 1][1]["batch_stats"]["MABN_1"]
        var = layer["var_window"].mean(0) + (
            (layer["mean_window"] - layer["mean_window"].mean(0)) ** 2
        ).mean(0)
        r = np.sqrt(var + 1e-5) / np.sqrt(prev["ema_var"] + 1e-5)  # before clipping
        inside = (r > 1 / mp.R_MAX) & (r < mp.R_MAX)
        clipped |= bool(np.any(inside) and np.any(~inside))
    assert clipped

    resume = launch_distributed(
        WORKER, mp.NPROC, {"MP_MODE": "resume"}, cwd=str(tmp_path), timeout=TIMEOUT
    )
    assert resume.ok, resume.report()
    assert all("resumed bitwise" in out for out in resume.outputs), resume.report()
    assert all(_gone(pid) for pid in resume.pids)
    print(
        f"\ntrain {train.wall_s:.1f} s, resume {resume.wall_s:.1f} s, "
        f"whole test {time.time() - t0:.1f} s"
    )
