"""Flax's own NNX BatchNorm tests, adapted to mabn_jax.nnx.MABN configured as BatchNorm.

Origin: google/flax at the commit "update to v0.12.8" (3a491108), files
tests/nnx/nn/normalization_test.py, graph_utils_test.py, module_test.py,
integration_test.py, transforms_test.py, summary_test.py, helpers_test.py and
bridge/wrappers_test.py; Copyright 2024 The Flax Authors, licensed under the
Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0).
Changes: ``nnx.BatchNorm`` is ``MABN(**AS_BATCHNORM)`` (centered, a window of
one step, no warm-up, no renormalization, one-pass variance, momentum 0.99),
the gradient is ``mabn_jax.nnx.grad`` / ``value_and_grad`` in place of
``nnx.grad`` / ``nnx.value_and_grad``, and most tests also run the original
with ``nnx.BatchNorm`` and assert that both give the same numbers (drop-in
checks). Where the original cannot work as it is (a gradient through axes
built before the step, state shared by scanned applications, a model split
inside the loss), the test asserts the trace-time error and the alternative
it names (docs/nnx.md, "Where MABN differs").
"""

import functools
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.nnx import bridge
from flax.nnx.nn import dtypes
from flax.nnx.training.optimizer import Optimizer
from tree_assert import assert_trees_close

import mabn_jax
import mabn_jax.nnx as mnnx
from mabn_jax._config import MAX_SCHEDULE_STEP

AS_BATCHNORM = dict(
    centered=True,
    buffer_size=1,
    warmup_steps=0,
    renorm_start=MAX_SCHEDULE_STEP,
    use_fast_variance=True,
    momentum=0.99,
)
MABNBatchNorm = functools.partial(mnnx.MABN, **AS_BATCHNORM)
NORMS = {"BatchNorm": nnx.BatchNorm, "MABN": MABNBatchNorm}
GRAD = {"BatchNorm": nnx.grad, "MABN": mnnx.grad}


def running(layer):
    """(mean, var) that inference uses, under either layer's names."""
    if isinstance(layer, mnnx.MABN):
        return layer.ema_mean[...], layer.ema_var[...]
    return layer.mean[...], layer.var[...]


# ------------------------------------------------- nn/normalization_test.py


@pytest.mark.parametrize("use_fast_variance", [True, False])
@pytest.mark.parametrize("mask", [None, np.array([True, False, True, False, True] * 2)[:, None]])
def test_batchnorm_equivalence(use_fast_variance, mask):
    """test_nnx_linen_batchnorm_equivalence, with nnx.BatchNorm as the reference
    (float32; Flax's promote_dtype=identity, as the original passes)."""
    x = jax.random.normal(jax.random.key(0), (10, 5))
    kw = dict(use_running_average=False, promote_dtype=lambda x, **kwargs: x, rngs=nnx.Rngs(42))
    ref = nnx.BatchNorm(5, use_fast_variance=use_fast_variance, **kw)
    ours = mnnx.MABN(5, **dict(AS_BATCHNORM, use_fast_variance=use_fast_variance), **kw)
    np.testing.assert_allclose(ours(x, mask=mask), ref(x, mask=mask), rtol=1e-6, atol=1e-6)
    for got, want in zip(running(ours), running(ref)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_promote_dtype_is_nnx_batchnorm_hook():
    """nnx.BatchNorm's promote_dtype argument and attribute: called on
    (x, mean, var, scale, bias) with dtype=; Flax's own promotes as BatchNorm."""
    x = jnp.ones((4, 3), jnp.bfloat16)
    calls = []

    def spy(arrays, dtype=None):
        calls.append((len(arrays), dtype))
        return dtypes.promote_dtype(arrays, dtype=dtype)

    layer = MABNBatchNorm(3, promote_dtype=spy, rngs=nnx.Rngs(0))
    assert layer.promote_dtype is spy
    ref = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    assert layer(x).dtype == ref(x).dtype == jnp.float32 and calls == [(5, None)]
    assert MABNBatchNorm(3, rngs=nnx.Rngs(0))(x).dtype == jnp.bfloat16  # default: x's


# ------------------------------------------------------------ module_test.py


class _PickledBlock(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(2, 10, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=False)
        self.batch_norm = MABNBatchNorm(10, use_running_average=False, rngs=rngs)

    def __call__(self, x):
        return self.batch_norm(self.linear(x))


def test_set_attributes_view_and_pickle():
    """test_set_attributes, test_view, test_cloud_pickle (pickle: Python 3.11's
    cloudpickle cannot pickle keys, as the original says)."""
    Block = _PickledBlock
    block = Block(nnx.Rngs(0))
    block.set_attributes(deterministic=True, use_running_average=True)
    assert block.dropout.deterministic and block.batch_norm.use_running_average
    block = Block(nnx.Rngs(0))
    block.set_attributes(nnx.Dropout, deterministic=True)
    assert block.dropout.deterministic and not block.batch_norm.use_running_average
    view = nnx.view(block, use_running_average=True)
    assert view.batch_norm.use_running_average and not block.batch_norm.use_running_average
    block.eval()
    y1 = block(jnp.ones((5, 2)))
    restored = pickle.loads(pickle.dumps(block))
    np.testing.assert_allclose(restored(jnp.ones((5, 2))), y1)


# ----------------------------------------------------------- helpers_test.py


class _TrainState(nnx.TrainState):
    batch_stats: nnx.State


def test_train_state_apply_in_training_mode():
    """test_train_state_methods: TrainState.apply(..., train=True) is a forward
    that nothing differentiates; it gives BatchNorm's output and statistics."""

    class Foo(nnx.Module):
        def __init__(self, norm, rngs):
            self.linear = nnx.Linear(2, 4, rngs=rngs)
            self.batch_norm = norm(4, rngs=rngs)

        def __call__(self, x, train):
            return self.batch_norm(self.linear(x), use_running_average=not train)

    out = {}
    for name, norm in NORMS.items():
        graphdef, params, batch_stats = nnx.split(Foo(norm, nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
        state = _TrainState.create(
            graphdef, params=params, tx=optax.sgd(1.0), batch_stats=batch_stats
        )
        x = jnp.arange(6.0).reshape(3, 2)
        y, updates = state.apply("params", "batch_stats")(x, train=True)
        state = state.apply_gradients(jax.tree.map(jnp.ones_like, state.params))
        out[name] = (y, nnx.merge(*updates).batch_norm)  # (graphdef, state) after the call
    np.testing.assert_allclose(out["MABN"][0], out["BatchNorm"][0], rtol=1e-6, atol=1e-6)
    for got, want in zip(running(out["MABN"][1]), running(out["BatchNorm"][1])):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------- summary_test.py


def test_tabulate_in_training_mode_twice():
    """test_tabulate: the model in its default training mode; a second call
    works too (Flax's tabulate keeps its patches after a raise inside it)."""

    class Block(nnx.Module):
        def __init__(self, din, dout, rngs):
            self.linear = nnx.Linear(din, dout, rngs=rngs)
            self.bn = MABNBatchNorm(dout, rngs=rngs)
            self.dropout = nnx.Dropout(0.2, rngs=rngs)

        def forward(self, x):
            return nnx.relu(self.dropout(self.bn(self.linear(x))))

    class Foo(nnx.Module):
        def __init__(self, rngs):
            self.block1 = Block(32, 128, rngs=rngs)
            self.block2 = Block(128, 10, rngs=rngs)

        def __call__(self, x):
            return self.block2.forward(self.block1.forward(x))

    foo = Foo(nnx.Rngs(0))
    for _ in range(2):
        table = nnx.tabulate(foo, jnp.ones((1, 32)), console_kwargs=dict(width=200))
        assert "block1/bn" in table and "MABN" in table and "BatchStat" in table
    assert int(foo.block1.bn.step[...]) == 0  # tabulate traces abstractly


# ---------------------------------------------------- bridge/wrappers_test.py


def test_nnx_to_linen_multiple_collections():
    class NNXInner(nnx.Module):
        def __init__(self, din, dout, rngs):
            self.w = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (din, dout)))
            self.bn = MABNBatchNorm(dout, use_running_average=False, rngs=rngs)
            self.lora = nnx.LoRA(din, 3, dout, rngs=rngs)

        def __call__(self, x):
            return self.bn(x @ self.w[...]) + self.lora(x)

    xkey, pkey, dkey = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(xkey, (2, 4))
    model = bridge.to_linen(NNXInner, 4, 3)
    var = model.init({"params": pkey, "dropout": dkey}, x)
    assert set(var.keys()) == {"LoRAParam", "params", "batch_stats"}
    assert model.apply(var, x).shape == (2, 3)


# -------------------------------------------------------- integration_test.py


def _shared_modules_run(name, graph):
    class Block(nnx.Module):
        def __init__(self, linear, *, rngs):
            self.linear = linear
            self.bn = NORMS[name](2, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(self.bn(self.linear(x)))

    class Model(nnx.Module):
        def __init__(self, *, rngs):  # tree mode refuses shared Variables
            shared = nnx.Linear(2, 2, rngs=rngs)
            self.block1 = Block(shared, rngs=rngs)
            self.block2 = Block(shared if graph else nnx.Linear(2, 2, rngs=rngs), rngs=rngs)

        def __call__(self, x):
            return self.block2(self.block1(x))

    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(4, 2)), rng.uniform(size=(4, 2))
    loss_fn = lambda model: jnp.mean((y - model(x)) ** 2)
    model = Model(rngs=nnx.Rngs(0))
    if graph:

        @nnx.jit
        def train_step(model):
            grads = GRAD[name](loss_fn)(model)
            nnx.update(
                model, jax.tree.map(lambda w, g: w - 0.1 * g, nnx.state(model, nnx.Param), grads)
            )
    else:  # test_tree_mode_multi_module: tree mode end to end

        @nnx.jit(graph=False)
        def train_step(model):
            grads = GRAD[name](loss_fn, graph=False)(model)
            return jax.tree.map(lambda w, g: w - 0.1 * g, model, grads)

    for _ in range(3):
        model = train_step(model) or model
    assert model.block1.linear is model.block2.linear or not graph
    return model


@pytest.mark.parametrize("graph", [True, False], ids=["shared_modules", "tree_mode"])
def test_shared_modules_and_tree_mode_train_as_batchnorm(graph):
    ours, ref = _shared_modules_run("MABN", graph), _shared_modules_run("BatchNorm", graph)
    assert int(ours.block2.bn.step[...]) == 3
    assert_trees_close(
        nnx.to_pure_dict(nnx.state(ours, nnx.Param)),
        nnx.to_pure_dict(nnx.state(ref, nnx.Param)),
        rtol=1e-5,
        atol=1e-6,
    )
    for got, want in zip(running(ours.block2.bn), running(ref.block2.bn)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------- graph_utils_test.py


class _Foo(nnx.Module):
    def __init__(self, rngs):
        self.batch_norm = MABNBatchNorm(2, rngs=rngs)
        self.linear = nnx.Linear(2, 3, rngs=rngs)

    def __call__(self, x):
        return self.linear(self.batch_norm(x))


def test_unpack_multiple_filters():
    params, batch_stats = nnx.unpack(_Foo(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    assert "linear" in params and "batch_norm" in params
    assert {"ema_mean", "ema_var", "step"} <= set(batch_stats["batch_norm"])


def test_unpack_with_grad_and_optimizer():
    """test_unpack_with_nnx_grad_and_optimizer through the low-level route (the
    helper, given the GraphStates, is tests/test_nnx_flax_ports_round4.py's):
    it trains as BatchNorm does."""
    x, y = jnp.arange(10.0).reshape(5, 2), jnp.ones((5, 3))

    def loss_fn(params, rest):
        return jnp.mean((nnx.merge(params, rest)(x) - y) ** 2)

    model = _Foo(nnx.Rngs(0))
    optimizer = Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    previous = mnnx.attach_probes(model)
    params, rest = nnx.unpack(model, (nnx.Param, mnnx.Probe), ...)
    grads = nnx.grad(loss_fn, graph=False)(params, rest)
    mnnx.record_backward_stats(model, grads, previous)
    optimizer.update(model, nnx.filter_state(grads, nnx.Param))

    assert int(model.batch_norm.step[...]) == 1
    assert np.isfinite(model.batch_norm.psi_window[...]).all()

    class RefFoo(_Foo):
        def __init__(self, rngs):
            self.batch_norm = nnx.BatchNorm(2, rngs=rngs)
            self.linear = nnx.Linear(2, 3, rngs=rngs)

    ref_grads = nnx.grad(loss_fn, graph=False)(*nnx.unpack(RefFoo(nnx.Rngs(0)), nnx.Param, ...))
    assert_trees_close(
        nnx.to_pure_dict(nnx.filter_state(grads, nnx.Param)),
        nnx.to_pure_dict(ref_grads),
        rtol=1e-5,
        atol=1e-6,
    )


# ---------------------------------------------------------- transforms_test.py


class _Block(nnx.Module):
    def __init__(self, rngs, norm=MABNBatchNorm):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = norm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.dropout(self.bn(self.linear(x))))


def _vectorized_blocks(graph, norm):
    vec_filter = (nnx.BatchStat, "dropout")
    rngs = nnx.Rngs(params=0, dropout=1).split({"dropout": 5})
    abs_block = nnx.eval_shape(lambda: _Block(nnx.Rngs(params=0, dropout=1), norm))
    axes = nnx.prefix(abs_block, {vec_filter: 0, ...: None}, graph=graph)

    @nnx.vmap(in_axes=(None, 0), out_axes=axes, graph=graph, graph_updates=False)
    def create(params, dropout):
        return _Block(nnx.Rngs(params=params, dropout=dropout), norm)

    return create(rngs.params, rngs.dropout), axes, vec_filter


@pytest.mark.parametrize("graph", [True, False])
def test_state_axes_simple_functional(graph):
    """The original (a training-mode forward under nnx.vmap with axes from
    nnx.prefix) as it is; then a gradient: axes that no longer fit the model
    (its dropout keys dropped after they were built) raise naming the fix, and
    axes built inside the loss train. Axes built before the step that fit the
    model train too: tests/test_nnx_flax_ports_round4.py."""
    module, axes, vec_filter = _vectorized_blocks(graph, MABNBatchNorm)
    assert module.bn.ema_mean.shape == (5, 3) and module.bn.scale.shape == (3,)
    initial_mean = module.bn.ema_mean[...]
    forward = nnx.vmap(
        lambda m, x: m(x), in_axes=(axes, 0), out_axes=0, graph=graph, graph_updates=False
    )
    x = jnp.ones((5, 1, 2))
    assert forward(module, x).shape == (5, 1, 3)
    assert not jnp.allclose(initial_mean, module.bn.ema_mean[...])

    # The dropout keys dropped after the axes were built (tree mode must: it
    # differentiates every leaf), so that the axes no longer fit the model.
    module.dropout.rngs = None
    module.dropout.deterministic = True
    with pytest.raises(
        ValueError,
        match=r"axes inside the loss do not fit.*nnx\.prefix"
        r"\(model, \{\.\.\.\}\) there",
    ):
        mnnx.grad(lambda m: forward(m, x).sum(), graph=graph)(module)

    def loss(m):
        inside = nnx.prefix(m, {vec_filter: 0, ...: None}, graph=graph)
        return nnx.vmap(
            lambda m, x: m(x), in_axes=(inside, 0), out_axes=0, graph=graph, graph_updates=False
        )(m, x).sum()

    mnnx.grad(loss, graph=graph)(module)
    assert (np.asarray(module.bn.step[...]) == 2).all()
    assert np.isfinite(module.bn.psi_window[...]).all()


def test_complex_scan_shares_state():
    """test_complex: nnx.scan over stacked blocks whose BatchStat are broadcast
    (StateAxes {Param: 0, ...: None}). The forward works as BatchNorm's (the
    transform drops the broadcast state's updates, for both); a gradient through
    the helper raises at trace time, under nnx.jit (one layer applied once per
    iteration of the scan), naming the StateAxes fix, with which it trains."""

    def mlp(state_axes):
        class MLP(nnx.Module):
            @nnx.split_rngs(splits=5)
            @nnx.vmap(in_axes=(state_axes, state_axes))
            def __init__(self, rngs):
                self.linear = nnx.Linear(3, 3, rngs=rngs)
                self.bn = MABNBatchNorm(3, rngs=rngs)

            @nnx.scan(in_axes=(state_axes, nnx.Carry))
            def __call__(self, x):
                return nnx.gelu(self.bn(self.linear(x))), None

        return MLP(rngs=nnx.Rngs(0))

    x = jnp.arange(6.0).reshape(2, 3)
    loss = lambda m: jnp.sum(m(x)[0] ** 2)
    module = mlp(nnx.StateAxes({(nnx.Param, nnx.RngState): 0, ...: None}))
    assert module(x)[0].shape == (2, 3)
    with pytest.raises(
        ValueError,
        match=r"applied in training mode inside a loop body.*"
        r"nnx\.StateAxes\(\{\(nnx\.Param, "
        r"nnx\.BatchStat\): 0",
    ):
        nnx.jit(mnnx.grad(loss))(module)
    module = mlp(nnx.StateAxes({(nnx.Param, nnx.BatchStat, nnx.RngState): 0, ...: None}))
    nnx.jit(mnnx.grad(loss))(module)
    assert (np.asarray(module.bn.step[...]) == 1).all()
    assert np.isfinite(module.bn.psi_window[...]).all()


# ------------------------------------------------------ drop-in checks (issue 20)


class _Net(nnx.Module):
    def __init__(self, norm, rngs, **kw):
        self.linear = nnx.Linear(3, 4, rngs=rngs, param_dtype=jnp.float64)
        self.bn = norm(4, rngs=rngs, param_dtype=jnp.float64, **kw)
        if isinstance(self.bn, nnx.BatchNorm):
            # nnx.BatchNorm creates its running statistics in float32 whatever
            # param_dtype is; in float64 they would take float64 updates (a scatter
            # JAX warns about) and round them. Kept in float64, as MABN's state.
            self.bn.mean = nnx.BatchStat(self.bn.mean[...].astype(jnp.float64))
            self.bn.var = nnx.BatchStat(self.bn.var[...].astype(jnp.float64))
        self.head = nnx.Linear(4, 2, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.linear(x))))


def _vmap_trajectory(name, steps=3):
    """nnx.vmap over examples, axis_name='batch', the gradient outside the vmap."""
    model = _Net(NORMS[name], nnx.Rngs(0), axis_name="batch")
    optimizer = Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    grad_fn = {"BatchNorm": nnx.value_and_grad, "MABN": mnnx.value_and_grad}[name]

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            out = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="batch")(model, x)
            return jnp.mean((out - y) ** 2)

        loss, grads = grad_fn(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    losses = [
        step(
            model,
            optimizer,
            jnp.asarray(rng.normal(size=(4, 2, 3))),
            jnp.asarray(rng.normal(size=(4, 2, 2))),
        )
        for _ in range(steps)
    ]
    return np.asarray(losses), model


def test_axis_name_under_nnx_vmap_with_the_gradient_outside():
    with jax.enable_x64(True):
        ours, model = _vmap_trajectory("MABN")
        ref, ref_model = _vmap_trajectory("BatchNorm")
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert_trees_close(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        nnx.to_pure_dict(nnx.state(ref_model, nnx.Param)),
        rtol=1e-12,
        atol=1e-14,
    )
    for got, want in zip(running(model.bn), running(ref_model.bn)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert int(model.bn.step[...]) == 3 and np.isfinite(model.bn.psi_window[...]).all()


def test_axis_name_under_vmap_records_the_full_batch_statistics():
    """A longer window: the state after nnx.vmap (shared layer, axis_name) over
    4 × 2 examples is the state of one call on the 8 examples."""
    kw = dict(centered=True, buffer_size=2, warmup_steps=0, renorm_start=1, r_max=1.5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 4)))
    with jax.enable_x64(True):
        vmapped = mnnx.MABN(4, rngs=nnx.Rngs(0), axis_name="batch", param_dtype=jnp.float64, **kw)
        whole = mnnx.MABN(4, rngs=nnx.Rngs(0), param_dtype=jnp.float64, **kw)
        vloss = lambda m: jnp.sum(
            jnp.sin(nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="batch")(m, x))
        )
        wloss = lambda m: jnp.sum(jnp.sin(m(x.reshape(8, 4))))
        for _ in range(3):
            gv = mnnx.grad(vloss)(vmapped)
            gw = mnnx.grad(wloss)(whole)
            assert_trees_close(nnx.to_pure_dict(gv), nnx.to_pure_dict(gw), rtol=1e-12, atol=1e-13)
        assert_trees_close(
            nnx.to_pure_dict(nnx.state(vmapped, nnx.BatchStat)),
            nnx.to_pure_dict(nnx.state(whole, nnx.BatchStat)),
            rtol=1e-12,
            atol=1e-13,
        )


def test_axis_name_under_linen_vmap_with_the_gradient_outside():
    """Linen: nn.vmap over examples with shared params and batch_stats equals
    one call on the whole batch (and nn.BatchNorm, which reduces in float32)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 3)))

    def vmapped(norm):
        return nn.vmap(
            norm,
            variable_axes={"params": None, "batch_stats": None},
            split_rngs={"params": False},
            in_axes=0,
            axis_name="batch",
        )

    def run(module, grad_fn, x, mabn):
        variables = module.init(jax.random.key(0), x)
        kw = dict(batch_stats=variables["batch_stats"]) if mabn else {}

        def loss(params):
            y, upd = module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(y)), upd

        (_, upd), grads = grad_fn(loss, has_aux=True, **kw)(variables["params"])
        return grads, upd["batch_stats"]

    with jax.enable_x64(True):
        kw = dict(use_running_average=False, param_dtype=jnp.float64)
        ours = run(
            vmapped(mabn_jax.MABN)(axis_name="batch", **kw, **AS_BATCHNORM),
            mabn_jax.value_and_grad,
            x,
            True,
        )
        whole = run(
            mabn_jax.MABN(**kw, **AS_BATCHNORM), mabn_jax.value_and_grad, x.reshape(8, 3), True
        )
        ref = run(
            vmapped(nn.BatchNorm)(axis_name="batch", momentum=0.99, **kw),
            jax.value_and_grad,
            x,
            False,
        )
    assert_trees_close(ours, whole, rtol=1e-12, atol=1e-14)
    assert_trees_close(ours[0], ref[0], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ours[1]["ema_var"], ref[1]["var"], rtol=1e-6)
    np.testing.assert_allclose(ours[1]["ema_mean"], ref[1]["mean"], rtol=1e-6, atol=1e-9)


_WINDOWED = dict(centered=True, buffer_size=2, warmup_steps=0, renorm_start=1, r_max=1.5)


def test_stacked_per_instance_state_synchronized_under_nnx_vmap():
    """Per-instance layers (a stack made with nnx.vmap, state axis 0) whose
    statistics are synchronized over the vmapped axis_name, the gradient taken
    outside the vmap: each copy records the full batch's Ψ_B and g_B (not its
    share), so every copy's state is that of one layer called on all examples,
    and the copies' γ/β gradients add up to its gradient."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 4)))
    with jax.enable_x64(True):
        stacked = nnx.vmap(
            lambda key: mnnx.MABN(
                4, rngs=nnx.Rngs(key), axis_name="batch", param_dtype=jnp.float64, **_WINDOWED
            )
        )(jax.random.split(jax.random.key(0), 4))
        whole = mnnx.MABN(4, rngs=nnx.Rngs(0), param_dtype=jnp.float64, **_WINDOWED)
        vloss = lambda m: jnp.sum(
            jnp.sin(nnx.vmap(lambda m, x: m(x), in_axes=(0, 0), axis_name="batch")(m, x))
        )
        wloss = lambda m: jnp.sum(jnp.sin(m(x.reshape(8, 4))))
        for _ in range(3):  # the third step reads the windows of the first two
            gv = nnx.to_pure_dict(nnx.jit(mnnx.grad(vloss))(stacked))
            gw = nnx.to_pure_dict(mnnx.grad(wloss)(whole))
            assert_trees_close(jax.tree.map(lambda g: g.sum(0), gv), gw, rtol=1e-12, atol=1e-13)
        want = nnx.to_pure_dict(nnx.state(whole, nnx.BatchStat))
        got = nnx.to_pure_dict(nnx.state(stacked, nnx.BatchStat))
        for i in range(4):
            assert_trees_close(jax.tree.map(lambda v: v[i], got), want, rtol=1e-12, atol=1e-13)
        assert float(jnp.abs(want["psi_window"]).min()) > 0


def test_stacked_per_instance_state_synchronized_under_linen_vmap():
    """Linen: nn.vmap with params and batch_stats on axis 0 (one layer per
    instance), axis_name='batch', value_and_grad outside: each copy's state is
    that of one layer on the whole batch."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 3)))
    with jax.enable_x64(True):
        stacked = nn.vmap(
            mabn_jax.MABN,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            in_axes=0,
            axis_name="batch",
        )(use_running_average=False, axis_name="batch", param_dtype=jnp.float64, **_WINDOWED)
        whole = mabn_jax.MABN(use_running_average=False, param_dtype=jnp.float64, **_WINDOWED)

        def run(module, x):
            variables = module.init(jax.random.key(0), x)
            bs = variables["batch_stats"]
            for _ in range(3):

                def loss(params, bs=bs):
                    y, upd = module.apply(
                        {"params": params, "batch_stats": bs}, x, mutable=["batch_stats"]
                    )
                    return jnp.sum(jnp.sin(y)), upd

                (_, upd), grads = jax.jit(
                    mabn_jax.value_and_grad(loss, has_aux=True, batch_stats=bs)
                )(variables["params"])
                bs = upd["batch_stats"]
            return grads, bs

        (gv, got), (gw, want) = run(stacked, x), run(whole, x.reshape(8, 3))
        assert_trees_close(jax.tree.map(lambda g: g.sum(0), gv), gw, rtol=1e-12, atol=1e-13)
        for i in range(4):
            assert_trees_close(jax.tree.map(lambda v: v[i], got), want, rtol=1e-12, atol=1e-13)
        assert float(jnp.abs(want["psi_window"]).min()) > 0


def test_user_capture_holds_only_the_users_values():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.bn = MABNBatchNorm(3, rngs=rngs)

        def __call__(self, x):
            y = self.bn(x)
            self.sow(nnx.Intermediate, "features", y)
            return y

    model = Model(nnx.Rngs(0))
    x = jnp.arange(6.0).reshape(2, 3)
    _, inter = nnx.capture(model, nnx.Intermediate)(x)
    assert [path for path, _ in nnx.to_flat_state(inter)] == [("features",)]
    _, stats = nnx.capture(model, mnnx.Statistic)(x)
    assert {"mu_B", "sigma2_B"} <= {path[1] for path, _ in nnx.to_flat_state(stats)}
