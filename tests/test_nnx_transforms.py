"""NNX transforms and checkpoints: nnx.split/merge, nnx.scan and nnx.vmap over
stacked layers, orbax checkpoints of nnx.state with a bitwise resume, and the
stored names (the linen layers' batch_stats names)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from tree_assert import assert_trees_close

import mabn_jax
import mabn_jax.nnx as mnnx

LAYERS = 3
KW = dict(buffer_size=2, warmup_steps=0, renorm_start=2, r_max=1.5, d_max=0.5)


class Block(nnx.Module):
    def __init__(self, rngs, centered=False):
        self.linear = mnnx.CenteredLinear(4, 4, rngs=rngs, param_dtype=jnp.float64)
        self.norm = mnnx.MABN(4, rngs=rngs, param_dtype=jnp.float64, centered=centered, **KW)

    def __call__(self, x):
        return nnx.relu(self.norm(self.linear(x))) + x


def stacked_blocks(centered):
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return Block(rngs, centered)

    return create(nnx.Rngs(0))


def unstacked(blocks):
    """The stacked blocks as separate modules (nnx.split / nnx.merge)."""
    graphdef, state = nnx.split(blocks)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(LAYERS)]


def scanned(x, blocks):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
        return block(x)

    return body(x, blocks)


def vmapped(xs, blocks):
    return nnx.vmap(lambda block, x: block(x), in_axes=(0, 0))(blocks, xs)


@nnx.jit(static_argnums=0)
def train_step(forward, model, x):
    def loss_fn(model):
        y = forward(x, model)
        return jnp.sum(jnp.sin(y)), y

    (_, y), grads = mnnx.value_and_grad(loss_fn, has_aux=True)(model)
    return y, grads


def sequential(x, blocks):
    for block in blocks:
        x = block(x)
    return x


def ensemble(xs, blocks):
    return jnp.stack([block(x) for block, x in zip(blocks, xs)])


@pytest.mark.parametrize("transform", ["scan", pytest.param("vmap", marks=pytest.mark.slow)])
def test_stacked_layers_train_as_separate_layers(transform):
    """4 steps (batch, window and renormalization phases) of nnx.scan / nnx.vmap
    over stacked blocks equal a Python loop over the same blocks, split apart."""
    stacked_fwd, loop_fwd = (scanned, sequential) if transform == "scan" else (vmapped, ensemble)
    with jax.enable_x64(True):
        blocks = stacked_blocks(centered=transform == "vmap")
        separate = unstacked(blocks)
        rng = np.random.default_rng(0)
        for t in range(4):
            shape = (2, 4) if transform == "scan" else (LAYERS, 2, 4)
            x = jnp.asarray(rng.normal(size=shape) * (1 + t))
            y, grads = train_step(stacked_fwd, blocks, x)
            y_loop, grads_loop = train_step(loop_fwd, separate, x)
            assert_trees_close(y, y_loop, rtol=1e-12, atol=1e-12, what=f"y {t}")
            stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
            assert_trees_close(
                nnx.to_pure_dict(grads),
                stack([nnx.to_pure_dict(g) for g in grads_loop]),
                rtol=1e-12,
                atol=1e-12,
                what=f"grads {t}",
            )
            assert_trees_close(
                nnx.to_pure_dict(nnx.state(blocks)),
                stack([nnx.to_pure_dict(nnx.state(b)) for b in separate]),
                rtol=1e-12,
                atol=1e-12,
                what=f"state {t}",
            )
    assert (np.asarray(blocks.norm.step[...]) == 4).all()
    assert np.isfinite(np.asarray(blocks.norm.psi_window[...])).all()


@pytest.mark.parametrize(
    "nnx_layer,linen_layer,kwargs",
    [
        (mnnx.MABN, mabn_jax.MABN, {}),
        (mnnx.MABN, mabn_jax.MABN, dict(centered=True)),
        (mnnx.BatchRenorm, mabn_jax.BatchRenorm, {}),
    ],
)
def test_state_has_the_linen_batch_stats_names(nnx_layer, linen_layer, kwargs):
    layer = (
        nnx_layer(5, buffer_size=3, rngs=nnx.Rngs(0), **kwargs)
        if nnx_layer is mnnx.MABN
        else nnx_layer(5, rngs=nnx.Rngs(0), **kwargs)
    )
    linen_kwargs = dict(kwargs, buffer_size=3) if nnx_layer is mnnx.MABN else kwargs
    want = jax.eval_shape(
        linen_layer(use_running_average=True, **linen_kwargs).init,
        jax.random.key(0),
        jnp.zeros((2, 5)),
    )
    _, params, stats = nnx.split(layer, nnx.Param, nnx.BatchStat)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(tree))
    assert shapes(stats) == jax.tree.map(lambda a: (a.shape, a.dtype), want["batch_stats"])
    assert shapes(params) == jax.tree.map(lambda a: (a.shape, a.dtype), want["params"])


# --------------------------------------------------------------- checkpoints

T, SAVE_AT = 8, 4  # m=2, warm-up 0, renorm after 2: step 4 is in the window phase


class Net(nnx.Module):
    def __init__(self, rngs):
        self.linear = mnnx.CenteredLinear(6, 8, rngs=rngs)
        self.norm = mnnx.MABN(8, rngs=rngs, **KW)
        self.norm2 = mnnx.MABN(8, rngs=rngs, centered=True, **KW)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm2(nnx.relu(self.norm(self.linear(x)))))


def create():
    model = Net(nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


@nnx.jit
def fit_step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = mnnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def fit(model, optimizer, start, stop):
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(T, 4, 6)).astype(np.float32) * np.linspace(1, 3, T)[:, None, None]
    ys = rng.integers(0, 3, size=(T, 4))
    return np.stack([fit_step(model, optimizer, xs[t], ys[t]) for t in range(start, stop)])


def leaves(*nodes):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.to_pure_dict(nnx.state(nodes)))]


def test_orbax_checkpoint_resumes_bitwise(tmp_path):
    model, optimizer = create()
    losses = fit(model, optimizer, 0, SAVE_AT)
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
    losses = np.concatenate([losses, fit(model, optimizer, SAVE_AT, T)])

    # A fresh model: abstract shapes only, then the restored state merged in.
    abstract_model, abstract_opt = nnx.eval_shape(create)
    graphdef, abstract_state = nnx.split(abstract_model)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(
            path, {"model": abstract_state, "optimizer": nnx.state(abstract_opt)}
        )
    fresh = nnx.merge(graphdef, restored["model"])
    fresh_opt = nnx.Optimizer(fresh, optax.adam(1e-2), wrt=nnx.Param)
    nnx.update(fresh_opt, restored["optimizer"])
    assert int(fresh.norm.step[...]) == SAVE_AT
    resumed = fit(fresh, fresh_opt, SAVE_AT, T)

    assert resumed.tobytes() == losses[SAVE_AT:].tobytes()
    for got, want in zip(leaves(fresh, fresh_opt), leaves(model, optimizer)):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
