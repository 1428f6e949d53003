"""The NNX layers are the linen layers' math: step by step, every number.

A small network (centered linear, norm, relu, linear) is trained with SGD in
NNX (``mabn_jax.nnx.value_and_grad``, ``nnx.Optimizer``) and in linen
(``mabn_jax.value_and_grad``) from the same parameters, in float64, through
the batch, window and renormalization phases. And MABN configured as batch
norm (centered, buffer_size=1, renormalization off) is ``nnx.BatchNorm``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tree_assert import assert_trees_close

import mabn_jax
import mabn_jax.nnx as mnnx

STEPS = 9
# m=3, warm-up 4, renormalization after step 6: all phases within STEPS.
SCHEDULE = dict(buffer_size=3, warmup_steps=4, renorm_start=6, r_max=1.5, d_max=0.5)
CONFIGS = {
    "plain": dict(SCHEDULE),
    "centered": dict(SCHEDULE, centered=True),
    "ghost-centered": dict(SCHEDULE, norm_batch_size=2, centered=True),
}


class NNXNet(nnx.Module):
    def __init__(self, norm, kwargs, rngs):
        self.linear = mnnx.CenteredLinear(5, 6, rngs=rngs, param_dtype=jnp.float64)
        self.norm = norm(6, rngs=rngs, param_dtype=jnp.float64, **kwargs)
        self.head = nnx.Linear(6, 3, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        return self.head(nnx.relu(self.norm(self.linear(x))))


class LinenNet(nn.Module):
    norm: type
    kwargs: dict

    @nn.compact
    def __call__(self, x, train):
        x = mabn_jax.CenteredDense(6, param_dtype=jnp.float64, name="linear")(x)
        x = self.norm(
            use_running_average=not train, param_dtype=jnp.float64, name="norm", **self.kwargs
        )(x)
        return nn.Dense(3, param_dtype=jnp.float64, name="head")(nn.relu(x))


def _data():
    rng = np.random.default_rng(0)
    scale = np.linspace(1.0, 4.0, STEPS)[:, None, None]  # drifting statistics: r, d clip
    xs = rng.normal(size=(STEPS, 4, 5)) * scale + 0.5
    return jnp.asarray(xs), jnp.asarray(rng.integers(0, 3, size=(STEPS, 4)))


def _loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def nnx_step(model, optimizer, x, y):
    def loss_fn(model):
        logits = model(x)
        return _loss(logits, y), logits

    (loss, logits), grads = mnnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, logits, grads


def _linen_step(model, tx):
    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return _loss(logits, y), (logits, updates)

        (loss, (logits, updates)), grads = mabn_jax.value_and_grad(
            loss_fn, has_aux=True, batch_stats=batch_stats
        )(params)
        upd, opt_state = tx.update(grads, opt_state, params)
        return (
            optax.apply_updates(params, upd),
            updates["batch_stats"],
            opt_state,
            loss,
            logits,
            grads,
        )

    return step


def _pure(state):
    return nnx.to_pure_dict(state)


def run_both(nnx_norm, linen_norm, kwargs):
    """Per step: (nnx, linen) outputs, losses, grads, params and state."""
    tx = optax.sgd(0.1, momentum=0.9)
    model = NNXNet(nnx_norm, kwargs, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    linen = LinenNet(linen_norm, kwargs)
    params = _pure(nnx.state(model, nnx.Param))
    batch_stats = _pure(nnx.state(model, nnx.BatchStat))
    opt_state = tx.init(params)
    step = _linen_step(linen, tx)
    xs, ys = _data()
    compiled = nnx_step.jitted_fn._cache_size()
    out = []
    for x, y in zip(xs, ys):
        loss, logits, grads = nnx_step(model, optimizer, x, y)
        params, batch_stats, opt_state, l_loss, l_logits, l_grads = step(
            params, batch_stats, opt_state, x, y
        )
        out.append(
            (
                (loss, logits, _pure(grads), _pure(nnx.state(model))),
                (
                    l_loss,
                    l_logits,
                    l_grads,
                    {k: {**params[k], **batch_stats.get(k, {})} for k in params},
                ),
            )
        )
    assert nnx_step.jitted_fn._cache_size() - compiled == 1
    return out


# plain and ghost+centered run by default; centered alone is covered by the latter
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "centered" else n for n in CONFIGS]
)
def test_nnx_mabn_equals_linen_step_by_step(name):
    with jax.enable_x64(True):
        steps = run_both(mnnx.MABN, mabn_jax.MABN, CONFIGS[name])
    for t, (ours, theirs) in enumerate(steps, 1):
        # outputs, loss, gradients, and every parameter and state leaf: bitwise
        assert_trees_close(ours, theirs, rtol=0, atol=0, what=f"{name} step {t}")
    state = steps[-1][0][3]["norm"]
    assert int(state["step"]) == STEPS * (2 if "ghost" in name else 1)
    assert int(state["skipped"]) == 0 and np.isfinite(state["psi_window"]).all()


@pytest.mark.slow
def test_nnx_batch_renorm_equals_linen_step_by_step():
    kwargs = dict(warmup_steps=2, ramp_steps=3, r_max=1.5, d_max=0.5)
    with jax.enable_x64(True):
        steps = run_both(mnnx.BatchRenorm, mabn_jax.BatchRenorm, kwargs)
    for t, (ours, theirs) in enumerate(steps, 1):
        assert_trees_close(ours, theirs, rtol=0, atol=0, what=f"BatchRenorm step {t}")


@pytest.mark.parametrize("fast_variance", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_mabn_configured_as_batch_norm_is_nnx_batchnorm(fast_variance):
    """centered, buffer_size=1 (the window is this batch), renormalization off:
    training outputs, gradients, optimizer steps, the EMAs and inference all
    equal nnx.BatchNorm's (to float64 rounding)."""
    kwargs = dict(momentum=0.9, epsilon=1e-3, use_fast_variance=fast_variance)
    as_bn = dict(
        kwargs,
        centered=True,
        buffer_size=1,
        warmup_steps=0,
        renorm_start=mabn_jax._config.MAX_SCHEDULE_STEP,
    )
    xs, ys = _data()
    with jax.enable_x64(True):
        runs = {}
        for name, norm, kw in (("bn", nnx.BatchNorm, kwargs), ("mabn", mnnx.MABN, as_bn)):
            model = NNXNet(norm, kw, nnx.Rngs(0))
            if norm is nnx.BatchNorm:  # its statistics are float32 by default
                for v in (model.norm.mean, model.norm.var):
                    v.set_value(v.get_value().astype(jnp.float64))
            optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
            trace = [nnx_step(model, optimizer, x, y) for x, y in zip(xs, ys)]
            model.eval()
            runs[name] = (trace, _pure(nnx.state(model, nnx.Param)), model(xs[0] * 3.0), model.norm)
    (bn_trace, bn_params, bn_eval, bn), (trace, params, eval_out, mabn) = runs["bn"], runs["mabn"]
    assert_trees_close(trace, bn_trace, rtol=1e-12, atol=1e-12, what="train")
    assert_trees_close(params, bn_params, rtol=1e-12, atol=1e-12, what="params")
    np.testing.assert_allclose(mabn.ema_mean[...], bn.mean[...], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mabn.ema_var[...], bn.var[...], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(eval_out, bn_eval, rtol=1e-12, atol=1e-12)
