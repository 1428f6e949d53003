"""Bad arguments and inputs fail at init/trace time with a message that names
the parameter, the offending value and the fix (one test per case)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax
from mabn_jax import MABN
from mabn_jax import functional as F

X = jnp.ones((4, 3))


def init(model, x=X):
    return model.init(jax.random.PRNGKey(0), x, use_running_average=False)


def train_apply(model, variables, x=X):
    probes = mabn_jax.init_probes(variables["batch_stats"])
    return model.apply(
        {**variables, "mabn_probes": probes}, x, use_running_average=False, mutable=["batch_stats"]
    )


@pytest.mark.parametrize(
    "attr, value, fix",
    [
        ("buffer_size", 0, "int >= 1, or None"),
        ("buffer_size", True, "int >= 1, or None (got a bool)"),
        ("buffer_size", 2.0, "int >= 1, or None (got a float)"),
        ("momentum", 1.0, "float in [0.0, 1.0) (a decay: new = momentum*old"),
        ("momentum", -0.1, "float in [0.0, 1.0)"),
        ("epsilon", 0.0, "float in (0.0, inf)"),
        ("warmup_steps", -1, "int >= 0"),
        ("warmup_steps", 2**22 + 1, "int >= 0 and <= 4194304"),
        ("renorm_start", -5, "int >= 0"),
        ("r_max", 0.5, "float in [1.0, inf) (r is clipped to [1/r_max, r_max])"),
        ("d_max", -1.0, "float in [0.0, inf) (d is clipped to [-d_max, d_max])"),
        ("norm_batch_size", 0, "int >= 1, or None"),
        ("centered", 1, "True or False (got a int)"),
        ("ghost_ema", "groups", "'step' or 'group'"),
    ],
)
def test_bad_hyperparameter(attr, value, fix):
    with pytest.raises(ValueError) as err:
        init(MABN(**{attr: value}))
    msg = str(err.value)
    assert f"MABN: {attr}={value!r} is invalid; {attr} must be" in msg and fix in msg


def test_numpy_ints_are_accepted():
    kw = dict(buffer_size=np.int64(3), warmup_steps=np.int32(2), norm_batch_size=np.int8(2))
    cfg = mabn_jax.MABNConfig(**kw)  # canonicalized to Python ints (a hashable static arg)
    assert (cfg.buffer_size, cfg.warmup_steps, cfg.norm_batch_size) == (3, 2, 2)
    assert all(type(v) is int for v in (cfg.buffer_size, cfg.warmup_steps, cfg.norm_batch_size))
    assert hash(cfg) == hash(mabn_jax.MABNConfig(buffer_size=3, warmup_steps=2, norm_batch_size=2))
    _, updates = train_apply(MABN(**kw), init(MABN(**kw)))
    assert updates["batch_stats"]["psi_window"].shape == (3, 3)
    assert int(updates["batch_stats"]["step"]) == 2  # two ghost batches of 2


def test_removed_skip_nonfinite_option_is_rejected():
    # Non-finite steps are always skipped: the option is gone, not silently ignored.
    with pytest.raises(TypeError, match="skip_nonfinite"):
        mabn_jax.MABNConfig(skip_nonfinite=False, centered=False)
    with pytest.raises(TypeError, match="skip_nonfinite"):
        MABN(skip_nonfinite=False, centered=False)


def test_feature_axis_out_of_range():
    with pytest.raises(
        ValueError, match=r"axis=3 is out of range .* rank 2; use an axis in \[-2, 1\]"
    ):
        init(MABN(axis=3, centered=False))


def test_input_of_rank_below_two():
    with pytest.raises(ValueError, match=r"rank 1 is invalid; use an input of rank >= 2"):
        init(MABN(centered=False), jnp.ones((4,)))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_non_float_input(dtype):
    with pytest.raises(
        TypeError,
        match=rf"input dtype {jnp.dtype(dtype).name} .* cast the "
        r"input to a float",
    ):
        init(MABN(centered=False), jnp.ones((4, 3), dtype))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_non_float_input_functional(dtype):
    cfg = F.MABNConfig(centered=False)
    state = F.init_state((3,), cfg)
    with pytest.raises(
        TypeError,
        match=rf"input dtype {jnp.dtype(dtype).name} .* cast the "
        r"input to a float",
    ):
        F.mabn_train(jnp.ones((4, 3), dtype), None, None, state, F.init_probes(state), cfg)


def test_feature_size_differs_from_state():
    model = MABN(centered=False)
    variables = init(model)  # 3 features
    with pytest.raises(ValueError, match=r"features \(5,\) \(expected \(16, 5\)\)"):
        train_apply(model, variables, jnp.ones((4, 5)))


def test_empty_batch():
    with pytest.raises(ValueError, match=r"shape \(0, 3\) is an empty batch .* drop empty batches"):
        init(MABN(centered=False), jnp.ones((0, 3)))


def test_empty_batch_after_init():
    model = MABN(centered=False)
    variables = init(model)
    with pytest.raises(
        ValueError, match=r"shape \(4, 0, 3\) is an empty batch \(size 0 along axis 1\)"
    ):
        train_apply(model, variables, jnp.ones((4, 0, 3)))


def test_ghost_group_size_that_does_not_divide_the_batch():
    with pytest.raises(
        ValueError,
        match=r"norm_batch_size=3 does not divide the batch size 4 "
        r"\(axis 0 of the input\); use a batch size that is a "
        r"multiple of norm_batch_size",
    ):
        init(MABN(norm_batch_size=3, centered=False))


def test_state_of_another_buffer_size():
    variables = init(MABN(buffer_size=4, centered=False))
    with pytest.raises(
        ValueError,
        match=r"buffer_size=2 .* load a checkpoint made with the "
        r"same buffer_size",
    ):
        train_apply(MABN(buffer_size=2, centered=False), variables)


def test_state_of_another_buffer_size_in_inference():
    # A mis-shaped state must not be usable for inference either.
    variables = init(MABN(buffer_size=4, centered=False))
    with pytest.raises(ValueError, match=r"buffer_size=2"):
        MABN(buffer_size=2, use_running_average=True, centered=False).apply(variables, X)


def test_centered_state_in_non_centered_layer():
    variables = init(MABN(centered=True))
    with pytest.raises(
        ValueError,
        match=r"was saved from a centered=True layer but this layer "
        r"has centered=False; build the model with the same "
        r"`centered`",
    ):
        train_apply(MABN(centered=False), variables)
    with pytest.raises(ValueError, match=r"centered=False layer but this layer has centered=True"):
        train_apply(MABN(centered=True), init(MABN(centered=False)))


def test_state_without_skip_counter():
    # A checkpoint written before `skipped` existed must not be silently completed.
    variables = init(MABN(centered=False))
    old = {k: v for k, v in variables["batch_stats"].items() if k != "skipped"}
    with pytest.raises(
        ValueError,
        match=r"lacks 'skipped': it was written by a mabn_jax without "
        r"the non-finite skip counter. To keep its statistics, "
        r"add 'skipped': jnp.zeros\(\(\)\)",
    ):
        train_apply(MABN(centered=False), {**variables, "batch_stats": old})


def test_functional_state_of_another_buffer_size():
    state = F.init_state((3,), F.MABNConfig(buffer_size=4, centered=False))
    cfg = F.MABNConfig(buffer_size=2, centered=False)
    with pytest.raises(
        ValueError,
        match=r"state window shape \(4, 3\) does not fit "
        r"buffer_size=2 and features \(3,\) \(expected "
        r"\(2, 3\)\); the state was built for another "
        r"configuration .* init_state\(features, config\)",
    ):
        F.mabn_train(X, None, None, state, F.init_probes(state), cfg)


def test_functional_state_of_other_variant():
    state = F.init_state((3,), F.MABNConfig(centered=True))
    with pytest.raises(
        ValueError,
        match=r"config.centered=False but the state is a centered=True "
        r"state; build it with init_state\(..., config\)",
    ):
        F.mabn_train(X, None, None, state, F.init_probes(state), F.MABNConfig(centered=False))


def test_previous_of_other_layout():
    plain = init(MABN(centered=False))["batch_stats"]
    centered = init(MABN(centered=True))["batch_stats"]
    grads = mabn_jax.init_probes(plain)
    with pytest.raises(
        ValueError,
        match=r"mix centered and plain layers; pass the three trees "
        r"of one layer and one step",
    ):
        mabn_jax.record_backward_stats(plain, grads, previous=centered)


def test_probes_of_another_shape():
    # Probes have the window's shape; e.g. those of the old API (one row) are refused.
    state = F.init_state((3,), F.MABNConfig(buffer_size=4, centered=False))
    with pytest.raises(
        ValueError,
        match=r"probe 'psi' has shape \(3,\) but this layer's window "
        r"is \(4, 3\); build the probes from this layer's own "
        r"state with init_probes\(state\)",
    ):
        F.mabn_train(
            X,
            None,
            None,
            state,
            F.Probes(jnp.zeros(3)),
            F.MABNConfig(buffer_size=4, centered=False),
        )
    with pytest.raises(
        ValueError,
        match=r"probe_grads.psi has shape \(3,\) but the state's "
        r"window is \(4, 3\)",
    ):
        F.record_backward_stats(state, F.Probes(jnp.zeros(3)), state)


def test_errors_raise_at_trace_time_under_jit():
    # The checks use static shapes/dtypes only, so they fire while tracing.
    @jax.jit
    def step(x):
        return init(MABN(centered=False), x)

    with pytest.raises(ValueError, match=r"empty batch"):
        step(jnp.ones((0, 3)))


def test_layer_applied_twice_in_one_training_apply_is_an_error():
    """Each training call is one window step, recorded once: a second call of
    the same layer in one apply would read the slots the first reserved."""

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            layer = mabn_jax.MABN(use_running_average=False, centered=False)
            return layer(layer(x))

    x = jnp.ones((4, 3))
    variables = Twice().init(jax.random.key(0), x)

    def loss_fn(params):
        y, updates = Twice().apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
        )
        return y.sum(), updates

    with pytest.raises(ValueError, match="twice in one apply.*once per training step"):
        mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=variables["batch_stats"])(
            variables["params"]
        )


def test_two_training_applies_in_one_loss_are_an_error():
    """Two applies of the model with the same batch_stats (say, two views of a
    batch) would add their backward statistics into one slot, silently."""

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return mabn_jax.MABN(use_running_average=False, centered=False)(x)

    x = jnp.ones((4, 3))
    variables = One().init(jax.random.key(0), x)
    bs = variables["batch_stats"]

    def loss_fn(params):
        y1, updates = One().apply({"params": params, "batch_stats": bs}, x, mutable=["batch_stats"])
        y2, _ = One().apply({"params": params, "batch_stats": bs}, 2 * x, mutable=["batch_stats"])
        return (y1 + y2).sum(), updates

    with pytest.raises(ValueError, match="twice in one loss.*concatenated into one batch"):
        mabn_jax.value_and_grad(loss_fn, has_aux=True, batch_stats=bs)(variables["params"])
