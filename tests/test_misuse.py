"""Round 3 of "no silent wrong answers" (issue 19): each case an adversarial
user tried on 0.2.0 either works now or fails loudly naming the fix.

One section per case, in the order of docs/reliability.md's misuse table.
Models are tiny (a Dense and a norm): each distinct program is a compilation.
"""

import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mabn_jax
import mabn_jax.nnx as mnnx

C = 3
KW = dict(buffer_size=2, warmup_steps=2, renorm_start=3)


def batch(n=4, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, C)) * 2.0 + 0.5


def assert_trees_equal(got, want):
    jax.tree.map(np.testing.assert_array_equal, got, want)


# --- 4. a bad or fully masked batch never enters the state -----------------------


def brn_apply(variables, x, mask=None):
    return mabn_jax.BatchRenorm(warmup_steps=1).apply(
        variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
    )


def brn_variables():
    """A BatchRenorm after two steps (renormalizing: r, d are in use)."""
    variables = mabn_jax.BatchRenorm(warmup_steps=1).init(
        jax.random.key(0), batch(), use_running_average=False
    )
    for seed in (1, 2):
        _, upd = brn_apply(variables, batch(seed=seed))
        variables = {**variables, **upd}
    return variables


@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_batch_renorm_keeps_its_state_on_a_nan_batch(wrap):
    variables = brn_variables()
    y, upd = wrap(brn_apply)(variables, batch(seed=3).at[1, 0].set(jnp.nan))
    assert_trees_equal(upd["batch_stats"], variables["batch_stats"])
    assert bool(jnp.isnan(y).any())  # loss guards see the step


@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_batch_renorm_fully_masked_batch_keeps_state_and_gives_finite_outputs(wrap):
    variables, x = brn_variables(), batch(seed=3)
    mask = jnp.zeros((4, 1), bool)

    def masked_loss(params):
        y, upd = brn_apply({**variables, "params": params}, x, mask)
        return jnp.sum(y * mask), (y, upd)

    (loss, (y, upd)), grads = wrap(jax.value_and_grad(masked_loss, has_aux=True))(
        variables["params"]
    )
    assert_trees_equal(upd["batch_stats"], variables["batch_stats"])
    assert bool(jnp.isfinite(y).all()) and float(loss) == 0.0
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


class DenseNorm(nn.Module):
    centered: bool = False
    norm_batch_size: int | None = None

    @nn.compact
    def __call__(self, x, mask=None):
        x = nn.Dense(C)(x)
        return mabn_jax.MABN(
            use_running_average=False,
            centered=self.centered,
            norm_batch_size=self.norm_batch_size,
            **KW,
        )(x, mask=mask)


def mabn_step(model, variables, x, mask):
    def loss_fn(params):
        y, upd = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            mask,
            mutable=["batch_stats"],
        )
        return jnp.sum(y * mask), (y, upd)

    return mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=variables["batch_stats"])(
        variables["params"]
    )


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("ghost", [False, True], ids=["batch", "one-ghost-group-empty"])
def test_mabn_fully_masked_batch_keeps_state_and_gives_finite_outputs(centered, ghost):
    model = DenseNorm(centered, 2 if ghost else None)
    x = batch()
    variables = model.init(jax.random.key(0), x)
    full = jnp.ones((4, 1), bool)
    for seed in (1, 2, 3):  # into the window phase
        (_, (_, upd)), _ = jax.jit(mabn_step, static_argnums=0)(
            model, variables, batch(seed=seed), full
        )
        variables = {**variables, **upd}
    mask = jnp.zeros((4, 1), bool).at[2:].set(ghost)  # ghost: only the first group empty
    (loss, (y, upd)), grads = jax.jit(mabn_step, static_argnums=0)(
        model, variables, batch(seed=4), mask
    )
    before, after = variables["batch_stats"]["MABN_0"], upd["batch_stats"]["MABN_0"]
    assert float(after["skipped"]) == float(before["skipped"]) + 1
    assert_trees_equal(
        {k: v for k, v in after.items() if k != "skipped"},
        {k: v for k, v in before.items() if k != "skipped"},
    )
    assert bool(jnp.isfinite(y).all()) and bool(jnp.isfinite(loss))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("layer", ["MABN", "BatchRenorm"])
def test_nnx_fully_masked_and_nan_batches_keep_the_state(layer):
    cls = getattr(mnnx, layer)
    model = cls(C, rngs=nnx.Rngs(0), **(KW if layer == "MABN" else {}))

    def loss_fn(model, x, mask):
        return jnp.sum(model(x, mask=mask) * mask)

    grad = mnnx.value_and_grad if layer == "MABN" else nnx.value_and_grad
    full = jnp.ones((4, 1), bool)
    for seed in (1, 2, 3):
        grad(loss_fn)(model, batch(seed=seed), full)
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
    counted = lambda s: {k: v for k, v in nnx.to_pure_dict(s).items() if k != "skipped"}
    loss, grads = grad(loss_fn)(model, batch(seed=4), jnp.zeros((4, 1), bool))
    assert bool(jnp.isfinite(loss))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert_trees_equal(counted(nnx.state(model, nnx.BatchStat)), counted(before))
    loss, _ = grad(loss_fn)(model, batch(seed=5).at[0, 1].set(jnp.nan), full)
    assert bool(jnp.isnan(loss))
    assert_trees_equal(counted(nnx.state(model, nnx.BatchStat)), counted(before))


# --- 5. positional arguments in nn.BatchNorm's order -----------------------------


def positional(sig):
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in sig.parameters.values() if p.kind in kinds and p.name != "self"]


@pytest.mark.parametrize("cls", [mabn_jax.MABN, mabn_jax.BatchRenorm])
def test_positional_arguments_follow_batchnorm(cls):
    assert positional(inspect.signature(cls)) == positional(inspect.signature(nn.BatchNorm))
    bn, ours = (
        nn.BatchNorm(False, -1, 0.9, 1e-3, jnp.bfloat16),
        cls(False, -1, 0.9, 1e-3, jnp.bfloat16),
    )
    for name in ("use_running_average", "axis", "momentum", "epsilon", "dtype"):
        assert getattr(ours, name) == getattr(bn, name), name
    assert cls(True, -1, momentum=0.5).momentum == 0.5
    with pytest.raises(TypeError, match="multiple values for argument 'momentum'"):
        cls(True, -1, 0.9, momentum=0.5)
    with pytest.raises(TypeError, match="at most 16 positional arguments.*by keyword"):
        cls(*([None] * 17))


@pytest.mark.parametrize("name", ["MABN", "BatchRenorm"])
def test_nnx_positional_arguments_are_nnx_batchnorms(name):
    ours = inspect.signature(getattr(mnnx, name).__init__)
    assert positional(ours) == positional(inspect.signature(nnx.BatchNorm.__init__))
    with pytest.raises(TypeError, match="positional"):
        getattr(mnnx, name)(C, False, rngs=nnx.Rngs(0))


# --- 3. fold_params folds only a layer and the norm applied to its output --------


class Between(nn.Module):
    """conv → (relu | + x | nothing) → norm, and a norm → conv pair."""

    between: str

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(C, (3, 3), padding="SAME", name="conv")(x)
        h = {"relu": nn.relu, "residual": lambda h: h + x, "none": lambda h: h}[self.between](h)
        h = mabn_jax.MABN(use_running_average=True, name="norm")(h)
        return nn.Conv(C, (1, 1), name="after")(h)


@pytest.mark.parametrize(
    "between, pair",
    [("relu", ("conv", "norm")), ("residual", ("conv", "norm")), ("none", ("after", "norm"))],
)
def test_fold_refuses_a_pair_with_something_in_between(between, pair):
    x = jnp.ones((2, 4, 4, C))
    variables = Between(between).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="not applied to the output of.*directly"):
        mabn_jax.fold_params(Between(between), variables, [pair], x)
    if between == "none":  # the real pair still folds
        params = mabn_jax.fold_params(Between(between), variables, [("conv", "norm")], x)
        assert "norm" not in params


# --- 8. a state cast below float32 is refused at trace time ----------------------


@pytest.mark.parametrize("cls", [mabn_jax.MABN, mabn_jax.BatchRenorm])
def test_low_precision_state_is_refused_naming_the_cast(cls):
    model = cls(use_running_average=False)
    x = batch()
    variables = model.init(jax.random.key(0), x)
    bs = jax.tree.map(lambda v: v.astype(jnp.bfloat16), variables["batch_stats"])

    def loss_fn(params):
        y, upd = model.apply({"params": params, "batch_stats": bs}, x, mutable=["batch_stats"])
        return y.sum(), upd

    grad = (
        mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=bs)
        if cls is mabn_jax.MABN
        else jax.value_and_grad(loss_fn, has_aux=True)
    )
    with pytest.raises(ValueError, match="bfloat16; it must be float32.*cast only the params"):
        jax.jit(grad)(variables["params"])


# --- 9. batch_stats of another configuration ------------------------------------


def test_value_and_grad_with_batch_stats_of_another_configuration():
    x = batch()
    model, other = DenseNorm(), DenseNorm(centered=True)
    variables = model.init(jax.random.key(0), x)
    wrong = other.init(jax.random.key(0), x)["batch_stats"]

    def loss_fn(params):
        y, upd = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
        )
        return y.sum(), upd

    with pytest.raises(ValueError, match="MABN_0.*Pass the batch_stats the model is applied"):
        mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=wrong)(variables["params"])


# --- 2. two training applies with params cast per apply --------------------------


def test_two_training_applies_with_params_cast_per_apply_are_an_error():
    x = batch()
    model = DenseNorm()
    variables = model.init(jax.random.key(0), x)
    bs = variables["batch_stats"]

    def apply(params, x):  # what a mixed-precision wrapper does
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        return model.apply({"params": params, "batch_stats": bs}, x, mutable=["batch_stats"])

    def loss_fn(params):
        y1, upd = apply(params, x)
        y2, _ = apply(params, 2 * x)
        return (y1 + y2).astype(jnp.float32).sum(), upd

    with pytest.raises(ValueError, match="twice in one loss.*concatenated into one batch"):
        jax.jit(mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=bs))(variables["params"])


# --- 7. a second network in training mode inside the helper (GAN) ---------------


def test_gan_discriminator_in_training_mode_names_the_layer_and_the_fixes():
    class Generator(nn.Module):
        @nn.compact
        def __call__(self, z):
            return mabn_jax.MABN(use_running_average=False)(nn.Dense(C)(z))

    class Discriminator(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(mabn_jax.MABN(use_running_average=False)(nn.Dense(C)(x)))

    z = batch()
    g_vars = Generator().init(jax.random.key(0), z)
    d_vars = Discriminator().init(jax.random.key(1), z)

    def g_loss(g_params):
        fake, upd = Generator().apply(
            {"params": g_params, "batch_stats": g_vars["batch_stats"]}, z, mutable=["batch_stats"]
        )
        score, _ = Discriminator().apply(d_vars, fake, mutable=["batch_stats"])
        return score.mean(), upd

    with pytest.raises(
        ValueError,
        match=r"'Discriminator/MABN_0'.*batch_stats were not "
        r"passed.*use_running_average=True",
    ):
        mabn_jax.value_and_grad(g_loss, has_aux=True, batch_stats=g_vars["batch_stats"])(
            g_vars["params"]
        )


def test_nnx_gan_discriminator_in_training_mode_names_the_fixes():
    gen = nnx.Sequential(nnx.Linear(C, C, rngs=nnx.Rngs(0)), mnnx.MABN(C, rngs=nnx.Rngs(0)))
    disc = nnx.Sequential(nnx.Linear(C, 5, rngs=nnx.Rngs(1)), mnnx.MABN(5, rngs=nnx.Rngs(1)))

    def g_loss(gen, disc):
        return disc(gen(batch())).mean()

    with pytest.raises(
        ValueError,
        match=r"MABN\(num_features=5\).*not a differentiated "
        r"argument.*model.eval\(\).*argnums=\(0, 1\)",
    ):
        mnnx.value_and_grad(g_loss)(gen, disc)


# --- 1. freezing γ/β with stop_gradient inside the loss ------------------------


class DenseNamedNorm(nn.Module):
    centered: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(C, name="dense")(x)
        return mabn_jax.MABN(
            use_running_average=False,
            centered=self.centered,
            buffer_size=2,
            warmup_steps=0,
            renorm_start=100,
            name="norm",
        )(x)


def linen_steps(centered, freeze_at, wrap):
    """Three helper steps (the third's gradient reads the second's Ψ_B from its
    window); the step ``freeze_at`` freezes the norm's γ/β with stop_gradient."""
    model = DenseNamedNorm(centered)
    variables = model.init(jax.random.key(0), batch())
    grads_seen, bs = [], variables["batch_stats"]
    for step in range(3):
        x = batch(seed=step + 1)

        def loss_fn(params, bs=bs, x=x, freeze=step == freeze_at):
            if freeze:
                params = {**params, "norm": jax.lax.stop_gradient(params["norm"])}
            y, upd = model.apply({"params": params, "batch_stats": bs}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y) * x), upd

        (_, upd), grads = wrap(mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=bs))(
            variables["params"]
        )
        grads_seen.append(grads)
        bs = upd["batch_stats"]
    return grads_seen, bs


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_freezing_the_norm_with_stop_gradient_records_the_same_statistics(centered, wrap):
    frozen, frozen_bs = linen_steps(centered, 1, wrap)
    plain, plain_bs = linen_steps(centered, None, wrap)
    assert_trees_equal(frozen_bs, plain_bs)  # Ψ_B (g_B) of the frozen step included
    assert float(jnp.abs(plain_bs["norm"]["psi_window"]).min()) > 0
    assert_trees_equal(frozen[2], plain[2])  # the next step's gradient
    assert_trees_equal(frozen[1]["dense"], plain[1]["dense"])
    assert_trees_equal(frozen[1]["norm"], jax.tree.map(jnp.zeros_like, plain[1]["norm"]))


def test_freezing_inside_submodels_applied_separately_records_each_layers_statistics():
    """Submodels applied one by one: a layer's path inside its apply
    (``norm``) differs from its path in the batch_stats given to the helper
    (``enc/norm``) and may be another layer's path there (the top ``norm``)."""
    enc, head = DenseNamedNorm(), mabn_jax.MABN(use_running_average=False, buffer_size=2)
    x = batch()
    enc_vars = enc.init(jax.random.key(0), x)
    head_vars = head.init(jax.random.key(1), x)
    params = {"enc": enc_vars["params"], "norm": head_vars["params"]}
    bs = {"enc": enc_vars["batch_stats"], "norm": head_vars["batch_stats"]}

    def run(freeze, wrap=lambda f: f):
        def loss_fn(params):
            p_enc = params["enc"]
            if freeze:
                p_enc = {**p_enc, "norm": jax.lax.stop_gradient(p_enc["norm"])}
            h, upd_enc = wrap(enc.apply)(
                {"params": p_enc, "batch_stats": bs["enc"]}, x, mutable=("batch_stats",)
            )
            y, upd_head = wrap(head.apply)(
                {"params": params["norm"], "batch_stats": bs["norm"]},
                jnp.sin(h) * 3.0,
                mutable=("batch_stats",),
            )
            return jnp.sum(jnp.sin(y) * x), {
                "batch_stats": {"enc": upd_enc["batch_stats"], "norm": upd_head["batch_stats"]}
            }

        (_, upd), grads = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=bs)(params)
        return upd["batch_stats"], grads

    (frozen, g_frozen), (plain, g_plain) = run(True), run(False)
    # The layers inside a jitted apply read the probes in their params: a reference.
    reference, _ = run(False, functools.partial(jax.jit, static_argnames="mutable"))
    assert_trees_equal(frozen, plain)
    assert_trees_equal(g_frozen["norm"], g_plain["norm"])
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), frozen, reference
    )


def nnx_model(centered=False):
    class Net(nnx.Module):
        def __init__(self):
            self.dense = nnx.Linear(C, C, rngs=nnx.Rngs(0))
            self.norm = mnnx.MABN(
                C,
                rngs=nnx.Rngs(0),
                centered=centered,
                buffer_size=2,
                warmup_steps=0,
                renorm_start=100,
            )

        def __call__(self, x):
            return self.norm(self.dense(x))

    return Net()


def nnx_steps(centered, freeze_at, how):
    model = nnx_model(centered)
    grads_seen = []
    for step in range(3):
        x = batch(seed=step + 1)
        freeze = step == freeze_at

        def loss_fn(model, x=x, freeze=freeze):
            if freeze and how == "stop_gradient":  # the whole layer's state, probes too
                nnx.update(model.norm, jax.lax.stop_gradient(nnx.state(model.norm)))
            return jnp.sum(jnp.sin(model(x)) * x)

        argnums = (
            nnx.DiffState(0, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("norm"))))
            if freeze and how == "DiffState"
            else 0
        )
        _, grads = nnx.jit(mnnx.value_and_grad(loss_fn, argnums=argnums))(model)
        grads_seen.append(nnx.to_pure_dict(grads))
    return grads_seen, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("how", ["stop_gradient", "DiffState"])
def test_nnx_freezing_the_norm_records_the_same_statistics(centered, how):
    frozen, frozen_bs = nnx_steps(centered, 1, how)
    plain, plain_bs = nnx_steps(centered, None, how)
    assert_trees_equal(frozen_bs, plain_bs)
    assert_trees_equal(frozen[2], plain[2])
    assert_trees_equal(frozen[1]["dense"], plain[1]["dense"])


# --- 6. lax.scan over micro-batches inside one loss ------------------------------


@pytest.mark.parametrize("carry", [True, False], ids=["state-carried", "state-closed-over"])
@pytest.mark.parametrize("loop", ["scan", "fori_loop"])
def test_micro_batches_scanned_inside_the_loss_raise_naming_ghost_batches(carry, loop):
    model = DenseNorm()
    variables = model.init(jax.random.key(0), batch())
    micro = batch(8).reshape(2, 4, C)

    def loss_fn(params):
        def body(i, state):
            bs, total = state
            y, upd = model.apply(
                {"params": params, "batch_stats": bs if carry else variables["batch_stats"]},
                micro[i],
                mutable=["batch_stats"],
            )
            return upd["batch_stats"], total + jnp.sum(y**2)

        init = (variables["batch_stats"], 0.0)
        if loop == "scan":
            (bs, total), _ = jax.lax.scan(lambda s, i: (body(i, s), None), init, jnp.arange(2))
        else:
            bs, total = jax.lax.fori_loop(0, 2, body, init)
        return total, {"batch_stats": bs}

    helper = mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=variables["batch_stats"])
    with pytest.raises(
        ValueError,
        match=r"'MABN_0' is applied in training mode inside a loop "
        r"body.*norm_batch_size to the micro-batch size.*optax\.MultiSteps",
    ):
        jax.jit(helper)(variables["params"])


def test_ghost_batches_are_the_scan_over_micro_batches_that_works():
    """The fix the message names: one apply, ghost batches of the micro-batch size."""
    model = DenseNorm(norm_batch_size=2)
    x = batch(8)
    variables = model.init(jax.random.key(0), x)
    (_, (_, upd)), grads = jax.jit(mabn_step, static_argnums=0)(
        model, variables, x, jnp.ones((8, 1), bool)
    )
    assert float(upd["batch_stats"]["MABN_0"]["step"]) == 4  # one window step per micro-batch
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_nnx_scan_over_micro_batches_raises_naming_ghost_batches():
    model = nnx_model()

    def loss_fn(model, micro):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def body(model, xb):
            return model, jnp.sum(model(xb) ** 2)

        _, losses = body(model, micro)
        return losses.sum()

    with pytest.raises(
        ValueError,
        match=r"MABN\(num_features=3\).*inside a loop body.*"
        r"norm_batch_size to the micro-batch size",
    ):
        nnx.jit(mnnx.value_and_grad(loss_fn))(model, batch(8).reshape(2, 4, C))


# --- 2 (NNX). two training calls with params cast per call ---------------------


@pytest.mark.parametrize("copy_state", [False, True], ids=["state-shared", "state-copied"])
def test_nnx_two_training_calls_with_params_cast_per_call_are_an_error(copy_state):
    model = nnx_model()

    def apply(model, x):  # a mixed-precision wrapper: split, cast, merge, call
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        if copy_state:  # e.g. a policy casting the rest to float32: new arrays
            rest = jax.tree.map(lambda a: a * 1, rest)
        copy = nnx.merge(graphdef, params, rest)
        y = copy(x)
        nnx.update(model, nnx.state(copy, nnx.BatchStat))
        return y

    def loss_fn(model):
        return (apply(model, batch()) + apply(model, batch(seed=1))).astype(jnp.float32).sum()

    for wrap in (lambda f: f, nnx.jit):
        with pytest.raises(ValueError, match="twice in one loss.*concatenated into one batch"):
            wrap(mnnx.value_and_grad(loss_fn))(model)
