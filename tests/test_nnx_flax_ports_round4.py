"""Flax's own NNX BatchNorm tests that round 4 (issue 30, item 14) found failing.

Origin: google/flax at the commit "update to v0.12.8" (3a491108); Copyright
2024 The Flax Authors, licensed under the Apache License, Version 2.0
(http://www.apache.org/licenses/LICENSE-2.0):

- tests/nnx/graph_utils_test.py ``TestUnpack.test_unpack_with_nnx_grad_and_optimizer``
- tests/nnx/transforms_test.py ``TestVmap.test_state_axes_simple_functional``
  (graph=True, graph=False)
- tests/nnx/summary_test.py ``SummaryTest.test_nested`` (and ``test_shared``,
  which fails the same way)

Changes, as in tests/test_nnx_flax_ports.py: ``nnx.BatchNorm`` is
``MABN(**AS_BATCHNORM)``, ``nnx.grad`` is ``mabn_jax.nnx.grad``, the state is
read under MABN's names (``ema_mean`` for ``mean``), and each test runs the
original with ``nnx.BatchNorm`` too and asserts the same numbers (drop-in
checks). The unpack test also runs in graph mode, on ``x = arange`` (the
original's ``ones`` have no variance: every gradient would be 0).
``test_state_axes_simple_functional`` also differentiates the vmapped forward
with the axes built as the original builds them (from the abstract model,
before the step), as a training loop written that way does; in tree mode the
dropout keys go first (tree mode differentiates every leaf, for BatchNorm too)
and the axes are built from the model after that, still before the step.
The tests after each port check what the fixes rely on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_nnx_flax_ports import GRAD, NORMS, _vectorized_blocks, running
from tree_assert import assert_trees_close

import mabn_jax.nnx as mnnx

# ------------------------------------------------------- graph_utils_test.py


def _foo(norm):
    class Foo(nnx.Module):
        def __init__(self, rngs):
            self.batch_norm = norm(2, rngs=rngs)
            self.linear = nnx.Linear(2, 3, rngs=rngs)

        def __call__(self, x):
            return self.linear(self.batch_norm(x))

    return Foo(nnx.Rngs(0))


def _unpack_step(name, graph):
    """The original's step: unpack, merge inside the loss, grad, Optimizer."""
    x, y = jnp.arange(10.0).reshape(5, 2), jnp.ones((5, 3))
    model = _foo(NORMS[name])
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    params, rest = nnx.unpack(model, nnx.Param, ..., graph=graph)

    def loss_fn(params, rest):
        model = nnx.merge(params, rest)
        return jnp.mean((model(x) - y) ** 2)

    grads = GRAD[name](loss_fn, graph=graph)(params, rest)
    optimizer.update(model, grads)
    assert isinstance(grads, nnx.GraphState) and isinstance(grads._state, nnx.State)
    assert "linear" in grads and "kernel" in grads["linear"]
    return model, grads


@pytest.mark.parametrize("graph", [False, True], ids=["tree", "graph"])
def test_unpack_with_nnx_grad_and_optimizer(graph):
    """The helper reaches the layers through the GraphStates (the model they
    merge into shares their variables): the step is recorded in the caller's
    model, and gradient, parameters and statistics are nnx.BatchNorm's."""
    model, grads = _unpack_step("MABN", graph)
    ref, ref_grads = _unpack_step("BatchNorm", graph)
    bn = model.batch_norm
    assert int(bn.step[...]) == 1 and np.isfinite(bn.psi_window[...]).all()
    assert not hasattr(bn, "psi_probe") and "psi_probe" not in grads["batch_norm"]
    assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads), rtol=1e-5, atol=1e-6)
    assert_trees_close(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        nnx.to_pure_dict(nnx.state(ref, nnx.Param)),
        rtol=1e-5,
        atol=1e-6,
    )
    for got, want in zip(running(bn), running(ref.batch_norm)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_unpack_with_the_rest_of_the_state_closed_over_names_the_fix():
    """The rest of the state is not an argument: no model can be rebuilt from
    the differentiated GraphState, so the layer raises naming the low-level API."""
    x = jnp.ones((5, 2))
    params, rest = nnx.unpack(_foo(NORMS["MABN"]), nnx.Param, ...)
    with pytest.raises(ValueError, match=r"split before the gradient.*attach_probes"):
        mnnx.grad(lambda p: jnp.sum(nnx.merge(p, rest)(x)), graph=False)(params)


# -------------------------------------------------------- transforms_test.py


def _grad_state(grads):
    """The Param gradients as a pure dict (tree mode's gradient is module-shaped)."""
    state = nnx.state(grads, nnx.Param) if isinstance(grads, nnx.Module) else grads
    return nnx.to_pure_dict(state)


def _state_axes_run(name, graph):
    """The original (a training-mode forward under nnx.vmap, axes from nnx.prefix
    of the abstract model), then one gradient through that vmap with those axes."""
    module, axes, vec_filter = _vectorized_blocks(graph, NORMS[name])
    assert module.linear.kernel.shape == (2, 3) and module.bn.scale.shape == (3,)
    initial_mean = running(module.bn)[0]
    assert initial_mean.shape == (5, 3)
    forward = nnx.vmap(
        lambda m, x: m(x), in_axes=(axes, 0), out_axes=0, graph=graph, graph_updates=False
    )
    assert forward(module, jnp.ones((5, 1, 2))).shape == (5, 1, 3)
    assert not jnp.allclose(initial_mean, running(module.bn)[0])
    if not graph:  # tree mode differentiates every leaf (for BatchNorm too): no keys
        module.dropout.rngs, module.dropout.deterministic = None, True
        axes = nnx.prefix(module, {vec_filter: 0, ...: None}, graph=False)
        forward = nnx.vmap(lambda m, x: m(x), in_axes=(axes, 0), graph=False, graph_updates=False)
    x = jax.random.normal(jax.random.key(1), (5, 4, 2))
    grads = GRAD[name](lambda m: jnp.sum(forward(m, x) ** 2), graph=graph)(module)
    return module, grads


@pytest.mark.parametrize("graph", [True, False], ids=["graph", "tree"])
def test_state_axes_simple_functional(graph):
    """Axes built before the step fit: the helper carries the probes in the
    layers' own window and step variables (no variable is attached), and the
    step is nnx.BatchNorm's (gradient and statistics of each vmapped copy)."""
    module, grads = _state_axes_run("MABN", graph)
    ref, ref_grads = _state_axes_run("BatchNorm", graph)
    assert (np.asarray(module.bn.step[...]) == 2).all()
    assert np.isfinite(module.bn.psi_window[...]).all() and not hasattr(module.bn, "psi_probe")
    # atol: the Linear bias before a norm gets ~0 (float noise of 1e-6) in both
    assert_trees_close(_grad_state(grads), _grad_state(ref_grads), rtol=1e-5, atol=1e-5)
    for got, want in zip(running(module.bn), running(ref.bn)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if not graph:  # module-shaped: the carriers' entries are zeros, as BatchNorm's state's
        assert not np.asarray(grads.bn.psi_window[...]).any()
        assert not np.asarray(grads.bn.step[...]).any()


_WINDOWED = dict(centered=True, buffer_size=2, warmup_steps=0, renorm_start=1, r_max=1.5)
_PER_COPY = {(nnx.Param, nnx.BatchStat): 0, ...: None}  # each stacked copy its own layer


def _stacked(rngs=None):
    """Five MABN layers with a window of two steps, stacked by nnx.vmap."""
    keys = jax.random.split(jax.random.key(0), 5)
    return nnx.vmap(lambda k: mnnx.MABN(3, rngs=nnx.Rngs(k), **_WINDOWED))(keys)


def _vmapped_loss(axes, x):
    forward = nnx.vmap(lambda m, x: m(x), in_axes=(axes, 0), graph=True, graph_updates=False)
    return lambda m: jnp.sum(jnp.sin(forward(m, x)))


def test_state_axes_before_the_step_record_what_attached_probes_record():
    """A window of two steps, where the gradient reads the recorded Ψ_B (g_B):
    three steps under nnx.jit with axes built before the step give the state
    and gradients of axes built inside the loss (attached probes), exactly."""
    x = jax.random.normal(jax.random.key(1), (5, 4, 3))
    before, inside = _stacked(), _stacked()
    axes = nnx.prefix(before, _PER_COPY)
    in_loss = lambda m: _vmapped_loss(nnx.prefix(m, _PER_COPY), x)(m)
    step_before = nnx.jit(mnnx.grad(_vmapped_loss(axes, x)))
    step_inside = nnx.jit(mnnx.grad(in_loss))
    for _ in range(3):
        got, want = step_before(before), step_inside(inside)
        assert_trees_close(nnx.to_pure_dict(got), nnx.to_pure_dict(want), rtol=0, atol=0)
    assert_trees_close(
        nnx.to_pure_dict(nnx.state(before)), nnx.to_pure_dict(nnx.state(inside)), rtol=0, atol=0
    )
    assert float(jnp.abs(before.psi_window[...]).min()) > 0


def test_state_axes_before_the_step_applied_twice_raises():
    """Without attached probes the helper counts the applications through the
    step variable: two vmapped applies in one loss raise (eagerly) naming the fix."""
    x = jax.random.normal(jax.random.key(1), (5, 4, 3))
    model = _stacked()
    loss = _vmapped_loss(nnx.prefix(model, _PER_COPY), x)
    with pytest.raises(ValueError, match=r"applied in training mode 2 times in one loss"):
        mnnx.grad(lambda m: loss(m) + loss(m))(model)
    assert (np.asarray(model.step[...]) == 0).all()  # the model is as it was


def test_state_axes_before_the_step_other_model_in_training_mode_raises():
    """A second MABN model in training mode outside the transform, not
    differentiated: raises as with attached probes (its statistics cannot be
    recorded), instead of leaving its reserved slots unfilled."""
    x = jax.random.normal(jax.random.key(1), (5, 4, 3))
    model, other = _stacked(), mnnx.MABN(3, rngs=nnx.Rngs(0))
    loss = _vmapped_loss(nnx.prefix(model, _PER_COPY), x)
    with pytest.raises(ValueError, match=r"its model is not a differentiated argument"):
        mnnx.grad(lambda m: loss(m) + jnp.sum(other(x[0])))(model)


# ----------------------------------------------------------- summary_test.py


def _blocks(norm, shared):
    class Block(nnx.Module):
        def __init__(self, linear, rngs):
            self.linear = linear
            self.bn = norm(2, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(self.bn(self.linear(x)))

    class Model(nnx.Module):
        def __init__(self, rngs):
            linear = nnx.Linear(2, 2, rngs=rngs)
            self.block1 = Block(linear, rngs)
            self.block2 = Block(linear if shared else nnx.Linear(2, 2, rngs=rngs), rngs)

        def __call__(self, x):
            return self.block2(self.block1(x))

    return Model(nnx.Rngs(0))


@pytest.mark.parametrize(
    "shared, flops, calls", [(False, True, 7), (True, False, 6)], ids=["nested", "shared"]
)
def test_tabulate_counts_vjp_flops_in_training_mode(shared, flops, calls):
    """test_nested / test_shared: tabulate(compute_vjp_flops=True) differentiates
    each call of its clone of the model to count the VJP's FLOPs. The layers
    there are differentiable (throwaway probes, as linen's tabulate makes); the
    table has nnx.BatchNorm's rows, and the model is untouched."""
    x = jnp.ones((4, 2))
    kw = dict(compute_flops=flops, compute_vjp_flops=True)
    tables = {name: nnx.tabulate(_blocks(norm, shared), x, **kw) for name, norm in NORMS.items()}
    for table in tables.values():
        assert sum(s.startswith("├─") for s in table.splitlines()) == calls
    model = _blocks(NORMS["MABN"], shared)
    nnx.tabulate(model, x, **kw)
    bn = model.block1.bn
    assert int(bn.step[...]) == 0 and np.isfinite(bn.psi_window[...]).all()


def test_differentiating_a_training_call_outside_the_helper_still_raises():
    """The guard tabulate is exempt from: nnx.grad in place of the helper."""
    model = _blocks(NORMS["MABN"], False)
    with pytest.raises(ValueError, match=r"training-mode call without probes is being diff"):
        nnx.grad(lambda m: jnp.sum(m(jnp.ones((4, 2)))))(model)
