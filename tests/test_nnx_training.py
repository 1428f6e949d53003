"""mabn_jax.nnx.value_and_grad: a drop-in for nnx.value_and_grad, and its misuse.

What it returns (nnx.value_and_grad's gradient, without probes; exactly
nnx.value_and_grad's result for models without MABN), what it records (the
full step, a non-finite step undone), and how misuse fails: loudly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tree_assert import assert_trees_close

import mabn_jax
import mabn_jax.nnx as mnnx


class Net(nnx.Module):
    def __init__(self, rngs, norm=mnnx.MABN, **kwargs):
        if norm is mnnx.MABN:  # the paper's plain layer, after a centered kernel
            kwargs.setdefault("centered", False)
        self.linear = mnnx.CenteredLinear(4, 6, rngs=rngs)
        self.norm = norm(6, rngs=rngs, **kwargs)
        self.frozen = mnnx.MABN(6, centered=True, use_running_average=True, rngs=rngs)
        self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.frozen(nnx.relu(self.norm(self.linear(x)))))


X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)


def loss_fn(model, x, dy):
    y = model(x)
    return jnp.sum(y * dy), y


@nnx.jit
def step(model, x, dy):
    return mnnx.value_and_grad(loss_fn, has_aux=True)(model, x, dy)


def _bstats(model):
    return nnx.to_pure_dict(nnx.clone(nnx.state(model, nnx.BatchStat)))


def test_returns_param_grads_and_records_the_step():
    model = Net(nnx.Rngs(0), buffer_size=2, warmup_steps=0)
    before = _bstats(model)
    (loss, y), grads = step(model, X, jnp.ones((4, 2)))
    # the gradient has the structure of the model's nnx.Param state: no probes
    assert jax.tree.structure(grads) == jax.tree.structure(nnx.state(model, nnx.Param))
    assert not any(
        isinstance(v, mnnx.Probe)
        for v in jax.tree.leaves(grads, is_leaf=lambda v: isinstance(v, nnx.Variable))
    )
    after = _bstats(model)
    assert int(after["norm"]["step"]) == 1 and int(after["norm"]["skipped"]) == 0
    # this step's Ψ_B is in its slot (t = 1, m = 2: slot 1), finite and nonzero
    psi = after["norm"]["psi_window"]
    assert np.isfinite(psi).all() and np.abs(psi[1]).sum() > 0 and not psi[0].any()
    # the frozen (eval) layer is left exactly as it was; no probe stays attached
    assert_trees_close(after["frozen"], before["frozen"], rtol=0, atol=0)
    assert not any(hasattr(m, "psi_probe") for _, m in nnx.iter_graph(model))
    # a DiffState filter is respected (and the layers still record)
    kernels = nnx.DiffState(0, nnx.PathContains("kernel"))
    _, grads = nnx.jit(mnnx.value_and_grad(loss_fn, argnums=kernels, has_aux=True))(
        model, X, jnp.ones((4, 2))
    )
    paths = [p for p, _ in nnx.to_flat_state(grads)]
    assert sorted(paths) == [("head", "kernel"), ("linear", "kernel")]
    assert int(model.norm.step[...]) == 2 and np.isfinite(model.norm.psi_window[...]).all()


def test_is_nnx_value_and_grad_for_models_without_mabn():
    model = Net(nnx.Rngs(0), norm=nnx.BatchNorm)
    del model.frozen
    model.frozen = nnx.BatchNorm(6, use_running_average=True, rngs=nnx.Rngs(1))
    dy = jnp.ones((4, 2))
    ours = mnnx.value_and_grad(loss_fn, has_aux=True)(nnx.clone(model), X, dy)
    theirs = nnx.value_and_grad(loss_fn, has_aux=True)(model, X, dy)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    assert_trees_close(ours, theirs, rtol=0, atol=0)


def test_train_step_with_optimizer_learns():
    model = Net(nnx.Rngs(0), buffer_size=2, warmup_steps=2, renorm_start=4)
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    target = jnp.asarray([[1.0, -1.0]])

    @nnx.jit
    def train_step(model, optimizer, x):
        def loss(model):
            return jnp.mean((model(x) - target) ** 2)

        value, grads = mnnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    losses = [float(train_step(model, optimizer, X)) for _ in range(12)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(model.norm.step[...]) == 12 and int(optimizer.step[...]) == 12
    assert train_step.jitted_fn._cache_size() == 1


def test_backward_non_finite_step_is_undone():
    model = Net(nnx.Rngs(0), buffer_size=2, warmup_steps=0)
    step(model, X, jnp.ones((4, 2)))
    before = _bstats(model)
    dy = jnp.ones((4, 2)).at[0, 0].set(jnp.inf)  # Ψ_B = inf
    step(model, X, dy)
    after = _bstats(model)
    assert int(after["norm"]["skipped"]) == 1
    for k, v in after["norm"].items():
        if k != "skipped":
            np.testing.assert_array_equal(v, before["norm"][k], err_msg=k)
    (loss, _), _ = step(model, X, jnp.ones((4, 2)))  # and training goes on
    assert np.isfinite(loss) and int(model.norm.step[...]) == 2


def test_plain_nnx_value_and_grad_raises_naming_the_helper():
    model = Net(nnx.Rngs(0))
    with pytest.raises(
        ValueError,
        match=r"without probes is being differentiated.*"
        r"mabn_jax\.nnx\.value_and_grad",
    ):
        nnx.value_and_grad(loss_fn, has_aux=True)(model, X, jnp.ones((4, 2)))
    assert int(model.norm.step[...]) == 0  # the failed step changed nothing


def test_training_call_that_nothing_differentiates_advances_the_forward_statistics():
    """A plain forward in training mode (warming up statistics, shape checks,
    nnx.tabulate) works as nnx.BatchNorm's: the forward windows and EMAs
    advance, and each Ψ slot the step owns takes the window's mean before the
    step, so the state stays finite and the next differentiated step is normal."""
    model = Net(nnx.Rngs(0), buffer_size=2, warmup_steps=0)
    model.norm.psi_window[...] = jnp.asarray([[1.0] * 6, [3.0] * 6])
    before = _bstats(model)["norm"]
    y = nnx.jit(lambda m, x: m(x))(model, X)
    after = _bstats(model)["norm"]
    assert y.shape == (4, 2) and np.isfinite(y).all()
    assert int(after["step"]) == 1 and not (after["x2_window"] == before["x2_window"]).all()
    np.testing.assert_array_equal(after["psi_window"], [[1.0] * 6, [2.0] * 6])  # slot 1
    assert not (after["ema_x2"] == before["ema_x2"]).all()
    (loss, _), _ = step(model, X, jnp.ones((4, 2)))
    assert np.isfinite(loss) and int(model.norm.step[...]) == 2


def test_low_level_forgetting_to_record_gives_nan_then_refuses():
    model = Net(nnx.Rngs(0), buffer_size=2, warmup_steps=0)
    probed = nnx.DiffState(0, (nnx.Param, mnnx.Probe))
    grad_fn = nnx.jit(nnx.value_and_grad(loss_fn, argnums=probed, has_aux=True))
    dy = jnp.ones((4, 2))
    previous = mnnx.attach_probes(model)
    (loss, _), grads = grad_fn(model, X, dy)
    mnnx.record_backward_stats(model, grads, previous)
    with pytest.raises(ValueError, match="has no probes attached"):
        mnnx.record_backward_stats(model, grads, previous)  # twice
    mnnx.attach_probes(model)
    grad_fn(model, X, dy)  # ... and no record: the next training output is NaN
    (loss, _), _ = grad_fn(model, X, dy)
    assert np.isnan(loss)
    with pytest.raises(ValueError, match="already has probes attached.*was not called"):
        mnnx.attach_probes(model)


def test_graph_updates_false_is_refused_in_graph_mode():
    with pytest.raises(ValueError, match="graph_updates=False"):
        mnnx.value_and_grad(loss_fn, graph_updates=False)


def test_constructor_errors_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"MABN: buffer_size=0 is invalid; buffer_size must be"):
        mnnx.MABN(4, buffer_size=0, rngs=rngs, centered=False)
    with pytest.raises(
        TypeError,
        match=r"MABN: unexpected keyword argument 'bufer_size'.*"
        r"buffer_size",
    ):
        mnnx.MABN(4, bufer_size=8, rngs=rngs, centered=False)
    with pytest.raises(ValueError, match=r"BatchRenorm: r_max=0.5 is invalid"):
        mnnx.BatchRenorm(4, r_max=0.5, rngs=rngs)
    with pytest.raises(ValueError, match=r"num_features=\(4, 5\) does not fit axis=-1"):
        mnnx.MABN((4, 5), rngs=rngs, centered=False)
    with pytest.raises(ValueError, match=r"CenteredConv: mask is not supported"):
        mnnx.CenteredConv(3, 4, 3, mask=jnp.ones((3, 3, 4)), rngs=rngs)
    layer = mnnx.MABN(4, use_running_average=True, rngs=rngs, centered=False)
    with pytest.raises(
        ValueError,
        match=r"features \(3,\) along axis=-1 but the layer was "
        r"built with num_features=4; build it with "
        r"num_features=3",
    ):
        layer(jnp.ones((2, 3)))


def test_modes_eval_train_view_and_capture():
    model = Net(nnx.Rngs(0), buffer_size=2, warmup_steps=0, centered=True)
    model.norm.ema_mean[...] = jnp.full((6,), 0.5)
    h = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)), jnp.float32)
    want = (h - 0.5) / np.sqrt(1 + 1e-5)  # float32: entries that cancel need atol
    norm = nnx.jit(lambda layer: layer(h))
    model.eval()
    assert model.norm.use_running_average and model.frozen.use_running_average
    np.testing.assert_allclose(norm(model.norm), want, rtol=1e-6, atol=1e-6)
    model.train()
    assert not model.norm.use_running_average
    view = nnx.view(model, use_running_average=True)
    assert view.norm.use_running_average and not model.norm.use_running_average
    np.testing.assert_allclose(norm(view.norm), want, rtol=1e-6, atol=1e-6)

    def captured(model, x, dy):
        (loss, _), inter, stats = nnx.capture(loss_fn, nnx.Intermediate, mnnx.Statistic)(
            model, x, dy
        )
        return loss, (inter, stats)

    grad_fn = nnx.jit(mnnx.value_and_grad(captured, has_aux=True))
    (_, (inter, stats)), _ = grad_fn(model, X, jnp.ones((4, 2)))
    assert set(stats["norm"]) == {
        "mu_B",
        "sigma2_B",
        "mu",
        "sigma2",
        "ema_mean",
        "ema_var",
        "r",
        "d",
    }
    assert not nnx.to_flat_state(inter)  # a user's Intermediate capture holds only theirs
    assert int(model.norm.step[...]) == 1


def test_centered_layers_apply_the_centered_kernel():
    rngs = nnx.Rngs(0)
    lin = mnnx.CenteredLinear(5, 3, rngs=rngs)
    conv = mnnx.CenteredConv(2, 3, (3, 3), rngs=rngs)
    plain = nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0))
    plain.kernel[...] = mabn_jax.center_kernel(conv.kernel[...])
    x = jax.random.normal(jax.random.key(0), (2, 5))
    img = jax.random.normal(jax.random.key(1), (1, 6, 6, 2))

    @nnx.jit
    def outputs(lin, conv, plain):
        return lin(x), conv(img), plain(img), conv(jnp.ones((1, 6, 6, 2)))

    y, conv_y, plain_y, const_y = outputs(lin, conv, plain)
    want = x @ mabn_jax.center_kernel(lin.kernel[...]) + lin.bias[...]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(conv_y, plain_y, rtol=1e-5, atol=1e-6)
    # a constant input meets a zero-mean kernel: zero away from the padding
    np.testing.assert_allclose(const_y[:, 1:5, 1:5], 0.0, atol=1e-5)


def test_a_layer_called_twice_in_one_loss_is_an_error():
    """Its second call would read the slots the first reserved, and both calls'
    backward statistics would add into one slot."""
    layer = mabn_jax.nnx.MABN(3, rngs=nnx.Rngs(0), centered=False)
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="twice in one loss"):
        mabn_jax.nnx.value_and_grad(lambda m: (m(x) + m(2 * x)).sum())(layer)
    # the failed call left no probes behind: the next, correct step works
    loss, _ = mabn_jax.nnx.value_and_grad(lambda m: m(x).sum())(layer)
    assert np.isfinite(loss)
