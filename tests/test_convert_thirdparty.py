"""The converters on models we did not write: unmodified sources from the installed
Flax's release archive (its sdist, downloaded at test time by tests/_flax_examples.py;
nothing of it is committed here): Flax's ImageNet ResNet18 and ResNet50 (linen,
trained under pmap with axis_name='batch'), Flax's MNIST CNN and its scan-over-layers
MLP (NNX, layers stacked by nnx.vmap and applied by nnx.scan). Each: BatchNorm trained a few
steps, converted, equal in inference, trained with the one-line step (loss
falling, state finite), checkpointed with orbax and restored."""

import functools

import _flax_examples
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import mabn_jax
import mabn_jax.nnx

MABN_CONFIG = dict(buffer_size=4, warmup_steps=2, renorm_start=3)


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Compile without most XLA optimizations (as Flax's ImageNet train_test does),
    for this module only: the BatchNorm and MABN models compile the same way."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def flax_examples():
    """(imagenet models module, mnist classes, scan-over-layers classes) from the sdist."""
    try:
        root = _flax_examples.fetch_examples()
    except RuntimeError as err:
        pytest.skip(
            f"Flax's example sources could not be downloaded (needs the package registry): {err}"
        )
    return _flax_examples.load(root)


def assert_inference_equal(got, want):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()))


def assert_finite(tree):
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(tree))


def assert_falls(losses):
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


def checkpoint_roundtrip(path, tree, abstract):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "ckpt", tree)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path / "ckpt", abstract)
    jax.tree.map(np.testing.assert_array_equal, restored, tree)
    return restored


# -- linen: Flax's ImageNet example models under pmap -----------------------------

N_DEV = 2


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def pmap_step(model, value_and_grad, **grad_kw):
    """The example's kind of step: pmapped over 'batch', whose BatchNorms
    (axis_name='batch' in its source) synchronize their statistics, gradients
    pmean'ed. For MABN the one change is mabn_jax.value_and_grad."""

    @functools.partial(jax.pmap, axis_name="batch", devices=jax.devices()[:N_DEV])
    def step(params, bs, x, labels):
        def loss_fn(p):
            logits, up = model.apply(
                {"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"]
            )
            return xent(logits, labels), up

        kw = {k: bs for k in grad_kw}  # batch_stats=bs for mabn_jax.value_and_grad
        (loss, up), g = value_and_grad(loss_fn, has_aux=True, **kw)(params)
        g = jax.lax.pmean(g, "batch")
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, g)
        return params, up["batch_stats"], jax.lax.pmean(loss, "batch")

    return step


def train_pmapped(step, variables, x, labels, steps):
    replicate = lambda tree: jax.tree.map(lambda leaf: jnp.stack([leaf] * N_DEV), tree)
    params, bs = replicate(variables["params"]), replicate(variables["batch_stats"])
    xs, ys = x.reshape(N_DEV, -1, *x.shape[1:]), labels.reshape(N_DEV, -1)
    losses = []
    for _ in range(steps):
        params, bs, loss = step(params, bs, xs, ys)
        losses.append(float(loss[0]))
    # Synchronized statistics: every device holds the same state, with no pmean of it.
    jax.tree.map(lambda leaf: np.testing.assert_array_equal(leaf[0], leaf[1]), bs)
    unreplicated = lambda tree: jax.tree.map(lambda leaf: np.asarray(leaf[0]), tree)
    return {"params": unreplicated(params), "batch_stats": unreplicated(bs)}, losses


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ResNet18", "ResNet50"])
def test_flax_imagenet_resnet_converted_trains_under_pmap_and_checkpoints(
    name, tmp_path, flax_examples
):
    """ResNet18/50 from flax's sdist (the installed version), examples/imagenet/models.py,
    unmodified."""
    imagenet = flax_examples[0]
    bn_model = getattr(imagenet, name)(num_classes=10, num_filters=8)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((N_DEV * 2, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, N_DEV * 2))
    bn_vars = bn_model.init(jax.random.key(0), x, train=False)
    bn_vars, _ = train_pmapped(pmap_step(bn_model, jax.value_and_grad), bn_vars, x, labels, 3)

    model = mabn_jax.replace_batchnorm(bn_model, **MABN_CONFIG)  # keeps axis_name='batch'
    variables = mabn_jax.convert_batchnorm_variables(model, bn_vars, x, train=False)
    infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
    assert_inference_equal(infer(variables, x), bn_model.apply(bn_vars, x, train=False))

    step = pmap_step(model, mabn_jax.value_and_grad, batch_stats=True)
    trained, losses = train_pmapped(step, variables, x, labels, 4)
    assert_falls(losses)
    assert_finite(trained)

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, trained)
    restored = checkpoint_roundtrip(tmp_path, trained, abstract)
    np.testing.assert_array_equal(infer(restored, x), infer(trained, x))


# -- NNX: Flax's MNIST CNN and scan-over-layers MLP --------------------------------


def nnx_train(model, loss_fn, steps, value_and_grad, lr):
    optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(steps)]


def nnx_case(make, x, loss_fn, tmp_path, lr):
    """The NNX recipe: BN trained, replaced, equal in inference, trained, checkpointed."""
    model = make()
    nnx_train(model, loss_fn, 3, nnx.value_and_grad, lr)
    model.eval()
    before = model(x)
    mabn_jax.nnx.replace_batchnorm(model, **MABN_CONFIG)
    assert not any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(model))
    assert_inference_equal(model(x), before)

    model.train()
    assert_falls(nnx_train(model, loss_fn, 5, mabn_jax.nnx.value_and_grad, lr))
    variables = (nnx.Param, nnx.BatchStat)
    assert_finite(nnx.state(model, variables))

    model.eval()
    restored = mabn_jax.nnx.replace_batchnorm(make(), **MABN_CONFIG)  # a fresh model
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(restored, variables))
    nnx.update(restored, checkpoint_roundtrip(tmp_path, nnx.state(model, variables), abstract))
    restored.eval()
    np.testing.assert_array_equal(restored(x), model(x))


@pytest.mark.slow
def test_flax_mnist_cnn_nnx_converted_trains_and_checkpoints(tmp_path, flax_examples):
    """CNN from flax's sdist (the installed version), examples/mnist/train.py, its class
    source unmodified."""
    mnist = flax_examples[1]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 28, 28, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 4))

    class WithRngs(nnx.Module):  # the example's __call__(x, rngs), as its loss_fn calls it
        def __init__(self):
            self.cnn = mnist.CNN(nnx.Rngs(0))
            self.rngs = nnx.Rngs(dropout=1)

        def __call__(self, x):
            return self.cnn(x, self.rngs)

    nnx_case(WithRngs, x, lambda m: xent(m(x), labels), tmp_path, lr=0.05)


def test_flax_scan_over_layers_nnx_converted_trains_and_checkpoints(tmp_path, flax_examples):
    """Block/ScanMLP from flax's sdist (the installed version),
    examples/nnx_toy_examples/06_scan_over_layers.py, class sources unmodified."""
    scan = flax_examples[2]
    x = jax.random.normal(jax.random.key(1), (4, 8)) + 1.0
    target = jax.random.normal(jax.random.key(2), (4, 8))

    def make():
        model = scan.ScanMLP(8, n_layers=3, rngs=nnx.Rngs(0))
        # Dropout(0.5) off for a clean loss curve (the BatchNorms are what is tested).
        model.set_attributes(deterministic=True, raise_if_not_found=False)
        return model

    model = make()
    assert model.layers.bn.mean.shape == (3, 8)  # stacked by nnx.vmap
    nnx_case(make, x, lambda m: ((m(x) - target) ** 2).mean(), tmp_path, lr=0.05)
