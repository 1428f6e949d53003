"""MABN in a multi-process ``jax.distributed`` job: the model, the steps, the worker.

Imported by tests/test_multiprocess.py (the model, the data and the
single-process reference) and run by it, via tests/launch.py, as the worker
of a 2-process job on localhost: ``jax.distributed.initialize`` with gloo
CPU collectives, ``LOCAL_DEVICES`` CPU devices per process, one global
mesh ``('batch',)`` and ``shard_map`` steps.

Worker modes (``MP_MODE``):

* ``train``: (1) synchronized MABN (``axis_name='batch'``) on the global
  batch for ``STEPS`` steps, dumping every step's loss, parameters and
  state; (2) per-device MABN with its state sharded ``P('batch')`` across the
  processes: ``SAVE_AT`` steps, an orbax checkpoint, then the remaining
  steps, dumping each process's shards.
* ``resume``: restores that checkpoint in fresh processes onto the same mesh
  (after ``check_batch_stats`` on its metadata) and replays the remaining
  steps; every local shard must equal the uninterrupted run's, bit for bit.
"""

import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mabn_jax

NPROC, LOCAL_DEVICES, PER_DEV = 2, 2, 2
GLOBAL_BATCH = NPROC * LOCAL_DEVICES * PER_DEV
STEPS, SAVE_AT, FEATURES = 10, 4, 5
# 3 warm-up steps, a window of 2 from step 4, renormalization from step 7, where
# the input scale jumps 10x so that r clips (in some channels).
SCALES = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0, 10.0, 10.0, 0.5)
R_MAX = 2.0
TX = optax.sgd(0.1, momentum=0.9)


class Net(nn.Module):
    """The plain layer after a centered Dense and the centered layer after a Dense."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        norm = lambda centered=False: mabn_jax.MABN(
            use_running_average=False,
            centered=centered,
            axis_name=self.axis_name,
            buffer_size=2,
            warmup_steps=3,
            renorm_start=6,
            r_max=R_MAX,
        )
        x = jnp.tanh(norm()(mabn_jax.CenteredDense(6, use_bias=False)(x)))
        x = jnp.tanh(norm(centered=True)(nn.Dense(6)(x)))
        return nn.Dense(3)(x)


def data(global_batch, seed=0):
    """The same global batches in every process (NumPy: no device work)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((STEPS, global_batch, FEATURES)).astype(np.float32) + 0.3
    x *= np.asarray(SCALES, np.float32)[:, None, None]
    x *= np.linspace(0.5, 3.0, global_batch, dtype=np.float32)[None, :, None]
    y = rng.integers(0, 3, (STEPS, global_batch)).astype(np.int32)
    return x, y


def init(model):
    variables = jax.jit(model.init)(jax.random.key(1), np.zeros((PER_DEV, FEATURES), np.float32))
    variables = jax.device_get(variables)
    return {
        "params": variables["params"],
        "opt_state": jax.device_get(TX.init(variables["params"])),
        "batch_stats": variables["batch_stats"],
    }


def train_step(model, state, x, y, global_batch):
    """One step; the loss is this shard's share of the global mean, so summing the
    devices' gradients (what autodiff does for replicated parameters in shard_map,
    and nothing on one device) gives the gradient of the global mean."""

    def loss_fn(params):
        logits, upd = model.apply(
            {"params": params, "batch_stats": state["batch_stats"]}, x, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum() / global_batch
        return loss, upd

    (loss, upd), grads = mabn_jax.value_and_grad(
        loss_fn, has_aux=True, batch_stats=state["batch_stats"]
    )(state["params"])
    updates, opt_state = TX.update(grads, state["opt_state"], state["params"])
    return {
        "params": optax.apply_updates(state["params"], updates),
        "opt_state": opt_state,
        "batch_stats": upd["batch_stats"],
    }, loss


def reference_trajectory():
    """The single-process run on one device with the global batch (synchronized case):
    [(loss, state)] after each step."""
    model = Net()
    step = jax.jit(lambda s, x, y: train_step(model, s, x, y, GLOBAL_BATCH))
    state, out = init(model), []
    x, y = data(GLOBAL_BATCH)
    for t in range(STEPS):
        state, loss = step(state, x[t], y[t])
        out.append((float(loss), jax.device_get(state)))
    return out


def flat(tree):
    """``{keystr: leaf}``."""
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- the worker ---------------------------------------------------------------------------


def _setup():
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_disable_most_optimizations", True)  # compiles faster
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["MP_COORD"],
        num_processes=int(os.environ["MP_NUM_PROCESSES"]),
        process_id=int(os.environ["MP_PROCESS_ID"]),
        initialization_timeout=30,
        heartbeat_timeout_seconds=10,
        shutdown_timeout_seconds=10,
    )


class Job:
    def __init__(self):
        self.pid, self.nproc = jax.process_index(), jax.process_count()
        self.mesh = jax.make_mesh((jax.device_count(),), ("batch",))
        self.n_dev = jax.device_count()
        assert self.nproc == NPROC and jax.local_device_count() == LOCAL_DEVICES
        self.global_batch = GLOBAL_BATCH
        self.rep = NamedSharding(self.mesh, P())
        self.split = NamedSharding(self.mesh, P("batch"))

    def log(self, *a):
        print(f"[p{self.pid}]", *a, flush=True)

    def local_rows(self, a):
        """This process's contiguous block of a global NumPy array (axis 0)."""
        n = a.shape[0] // self.nproc
        return a[self.pid * n : (self.pid + 1) * n]

    def put(self, tree, sharding):
        def one(a):
            a = np.asarray(a)
            local = self.local_rows(a) if sharding is self.split else a
            return jax.make_array_from_process_local_data(sharding, local, a.shape)

        return jax.tree.map(one, tree)

    def per_device(self, tree):
        """Per-device copies, as one global array sharded across processes."""
        return self.put(jax.tree.map(lambda a: np.stack([a] * self.n_dev), tree), self.split)

    def step_fn(self, model, state_spec):
        def body(state, x, y):
            if state_spec is not None:  # per device: a leading device axis of 1
                unstack = lambda a: a[0]
                state = {**state, "batch_stats": jax.tree.map(unstack, state["batch_stats"])}
            state, loss = train_step(model, state, x, y, self.global_batch)
            if state_spec is not None:
                state = {
                    **state,
                    "batch_stats": jax.tree.map(lambda a: a[None], state["batch_stats"]),
                }
            return state, jax.lax.psum(loss, "batch")

        specs = {"params": P(), "opt_state": P(), "batch_stats": state_spec or P()}
        return jax.jit(
            jax.shard_map(
                body,
                mesh=self.mesh,
                in_specs=(specs, P("batch"), P("batch")),
                out_specs=(specs, P()),
            )
        )


def local(tree):
    """This process's shards of every leaf: ``{"keystr@index": array}``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        for s in leaf.addressable_shards:
            out[f"{jax.tree_util.keystr(path)}@{s.index}"] = np.asarray(s.data)
    return out


def run_train(job, outdir):
    import orbax.checkpoint as ocp

    x, y = data(job.global_batch)

    # (1) synchronized over the global batch
    model = Net(axis_name="batch")
    state = job.put(init(model), job.rep)
    step = job.step_fn(model, None)
    dump = {}
    for t in range(STEPS):
        state, loss = step(state, job.put(x[t], job.split), job.put(y[t], job.split))
        # replicated: each process holds the whole value
        value = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), (loss, state))
        dump.update({f"{t}{k}": v for k, v in flat(value).items()})
    np.savez(os.path.join(outdir, f"sync_p{job.pid}.npz"), **dump)
    job.log("synchronized trajectory done")

    # (2) per-device state sharded across processes: save, continue, dump
    model = Net()
    fresh = init(model)
    state = {
        **job.put({k: fresh[k] for k in ("params", "opt_state")}, job.rep),
        "batch_stats": job.per_device(fresh["batch_stats"]),
    }
    step = job.step_fn(model, P("batch"))
    for t in range(SAVE_AT):
        state, loss = step(state, job.put(x[t], job.split), job.put(y[t], job.split))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(outdir, "ckpt"), state)  # every process writes its shards
    ckptr.wait_until_finished()
    cont = {"saved": local(state)}
    for t in range(SAVE_AT, STEPS):
        state, loss = step(state, job.put(x[t], job.split), job.put(y[t], job.split))
        cont[f"loss{t}"] = {"": np.asarray(loss.addressable_data(0))}
        cont[f"state{t}"] = local(state)
    np.savez(
        os.path.join(outdir, f"perdev_p{job.pid}.npz"),
        **{f"{k}|{kk}": vv for k, v in cont.items() for kk, vv in v.items()},
    )
    windows = np.asarray(state["batch_stats"]["MABN_0"]["x2_window"].addressable_data(0))
    other = np.asarray(state["batch_stats"]["MABN_0"]["x2_window"].addressable_data(1))
    assert not np.allclose(windows, other), "per-device statistics should differ"
    job.log("per-device run saved and continued")


def run_resume(job, outdir):
    import orbax.checkpoint as ocp

    x, y = data(job.global_batch)
    model = Net()
    fresh = init(model)
    like = {
        **job.put({k: fresh[k] for k in ("params", "opt_state")}, job.rep),
        "batch_stats": job.per_device(fresh["batch_stats"]),
    }
    path = os.path.join(outdir, "ckpt")
    ckptr = ocp.StandardCheckpointer()
    stored = ckptr.metadata(path).item_metadata.tree
    mabn_jax.check_batch_stats(stored["batch_stats"], like["batch_stats"])
    state = ckptr.restore(
        path,
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like),
    )
    ref = np.load(os.path.join(outdir, f"perdev_p{job.pid}.npz"))
    check = lambda tag, got: [
        np.testing.assert_array_equal(v, ref[f"{tag}|{k}"], err_msg=f"{tag} {k}")
        for k, v in got.items()
    ]
    check("saved", local(state))
    assert state["batch_stats"]["MABN_0"]["step"].sharding == job.split
    step = job.step_fn(model, P("batch"))
    for t in range(SAVE_AT, STEPS):
        state, loss = step(state, job.put(x[t], job.split), job.put(y[t], job.split))
        check(f"loss{t}", {"": np.asarray(loss.addressable_data(0))})
        check(f"state{t}", local(state))
    job.log(f"resumed bitwise: {len(local(state))} local shards x {STEPS - SAVE_AT} steps")


if __name__ == "__main__":
    t0 = time.time()
    # The launcher's clean environment: none of the test session's device flags, a
    # working directory outside the checkout, and this checkout's mabn_jax.
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert "XLA_FLAGS" not in os.environ, os.environ["XLA_FLAGS"]
    assert not os.getcwd().startswith(checkout), os.getcwd()
    assert mabn_jax.__file__.startswith(checkout), mabn_jax.__file__
    _setup()
    job = Job()
    job.log(f"{job.nproc} processes, {jax.local_device_count()} local / {job.n_dev} devices")
    {"train": run_train, "resume": run_resume}[os.environ["MP_MODE"]](job, os.getcwd())
    jax.distributed.shutdown()
    job.log(f"done in {time.time() - t0:.1f}s")
    sys.exit(0)
