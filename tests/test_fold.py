"""Folding inference-mode MABN / nn.BatchNorm into the preceding Conv/Dense."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import mabn_jax

F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
NORMS = {
    "mabn": functools.partial(mabn_jax.MABN, centered=False, buffer_size=4, **F64),
    "mabn_centered": functools.partial(mabn_jax.MABN, centered=True, buffer_size=4, **F64),
    "batchnorm": functools.partial(nn.BatchNorm, **F64),
}


class Net(nn.Module):
    """conv → norm → relu → dense → norm; ``norm=None`` is the deployment form."""

    conv: type = nn.Conv
    dense: type = nn.Dense
    norm: object = None
    use_bias: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        bias = self.use_bias or self.norm is None
        x = self.conv(6, (3, 3), padding="SAME", use_bias=bias, name="conv", **F64)(x)
        if self.norm is not None:
            x = self.norm(use_running_average=not train, name="conv_norm")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        x = self.dense(5, use_bias=bias, name="dense", **F64)(x)
        if self.norm is not None:
            x = self.norm(use_running_average=not train, name="dense_norm")(x)
        return x


def _random_variables(model, x, seed):
    """Trained-looking float64 variables: positive second moments and scales.

    Filled with NumPy from the shapes alone (jax.random inside jit compiles
    slowly on CPU); nn.BatchNorm would otherwise keep its statistics in float32.
    MABN's counters (floats since mabn_jax 0.2) get whole step counts.
    """
    rng = np.random.default_rng(seed)

    def fill(path, v):
        name = jax.tree_util.keystr(path[-1:])
        if name in ("['step']", "['skipped']"):
            return jnp.full(v.shape, rng.integers(0, 1000), v.dtype)
        if not jnp.issubdtype(v.dtype, jnp.floating):
            return jnp.zeros(v.shape, v.dtype)
        if any(s in name for s in ("var", "x2", "scale")):
            return jnp.asarray(rng.uniform(0.3, 3.0, v.shape))
        return jnp.asarray(rng.normal(size=v.shape))

    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    return jax.tree_util.tree_map_with_path(fill, shapes)


PAIRS = [("conv", "conv_norm"), ("dense", "dense_norm")]


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_folded_model_equals_unfolded(norm):
    """For Conv/Dense and CenteredConv/CenteredDense, with and without use_bias."""
    with jax.enable_x64(True):  # float64, so the tolerance can be tight
        x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 5, 4), jnp.float64)

        for centered in (False, True):
            layers = (
                (mabn_jax.CenteredConv, mabn_jax.CenteredDense) if centered else (nn.Conv, nn.Dense)
            )
            for use_bias in (False, True):
                model = Net(*layers, NORMS[norm], use_bias)
                variables = _random_variables(model, x, seed=int(centered) + 2 * use_bias)
                params = mabn_jax.fold_params(model, variables, PAIRS, x)
                assert set(params) == {"conv", "dense"}  # the norms are gone
                assert set(params["conv"]) == {"kernel", "bias"}
                got = Net(nn.Conv, nn.Dense, None).apply({"params": params}, x)
                want = model.apply(variables, x)
                assert got.dtype == want.dtype == jnp.float64
                np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)
                assert float(jnp.abs(want).max()) > 0.1  # not trivially 0 == 0


class Mixed(nn.Module):
    """A centered conv and a plain dense, norms of non-default epsilons; or,
    with ``deploy``, the folded form."""

    deploy: bool = False

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv if self.deploy else mabn_jax.CenteredConv
        x = conv(6, (3, 3), use_bias=self.deploy, name="conv", **F64)(x)
        if not self.deploy:
            x = mabn_jax.MABN(
                use_running_average=True, epsilon=0.3, buffer_size=4, name="conv_norm", **F64
            )(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        x = nn.Dense(5, use_bias=True, name="dense", **F64)(x)
        if not self.deploy:
            x = mabn_jax.MABN(
                use_running_average=True,
                centered=True,
                epsilon=0.7,
                buffer_size=4,
                name="dense_norm",
                **F64,
            )(x)
        return x


def test_fold_reads_centering_and_epsilon_from_the_model():
    """Mixed centered and plain layers and non-default epsilons fold exactly; the
    defaults a hand-written fold would have used are far off."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 5, 4), jnp.float64)
        variables = _random_variables(Mixed(), x, seed=7)
        want = Mixed().apply(variables, x)
        params = mabn_jax.fold_params(Mixed(), variables, PAIRS, x)
        got = Mixed(deploy=True).apply({"params": params}, x)
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)

        def by_hand(epsilon, centered_kernel):
            p = dict(variables["params"])
            for layer, norm in PAIRS:
                p[layer] = mabn_jax.fold_norm(
                    p[layer],
                    p.pop(norm, {}),
                    variables["batch_stats"][norm],
                    epsilon=epsilon,
                    centered_kernel=centered_kernel,
                )
            return Mixed(deploy=True).apply({"params": p}, x)

        for wrong in (by_hand(1e-5, True), by_hand(0.3, False)):
            assert float(jnp.abs(wrong - want).max()) > 1e-2 * float(jnp.abs(want).max())


def test_fold_params_keeps_other_params_and_accepts_key_tuples():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(3, (1, 1), use_bias=False, name="conv")(x)
            return nn.BatchNorm(use_running_average=True, name="norm")(x)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1, name="head")(Block(name="block")(x))

    x = jnp.ones((2, 4, 4, 2))
    variables = Model().init(jax.random.key(0), x)
    variables = {
        "params": variables["params"],
        "batch_stats": {"block": {"norm": {"mean": jnp.zeros(3), "var": jnp.full((3,), 4.0)}}},
    }
    out = mabn_jax.fold_params(Model(), variables, [(("block", "conv"), ("block", "norm"))], x)
    assert set(out["block"]) == {"conv"}
    np.testing.assert_array_equal(out["head"]["kernel"], variables["params"]["head"]["kernel"])
    kernel = variables["params"]["block"]["conv"]["kernel"]
    np.testing.assert_allclose(
        out["block"]["conv"]["kernel"], kernel / np.sqrt(4 + 1e-5), rtol=1e-6
    )
    assert "norm" in variables["params"]["block"]  # the input is not modified


def test_fold_errors_name_the_problem():
    kernel = {"kernel": jnp.ones((3, 3, 2, 4))}
    stats = {"mean": jnp.zeros(4), "var": jnp.ones(4)}
    with pytest.raises(TypeError, match="epsilon"):  # no silent default
        mabn_jax.fold_norm(kernel, {}, stats, centered_kernel=False)
    with pytest.raises(TypeError, match="centered_kernel"):
        mabn_jax.fold_norm(kernel, {}, stats, epsilon=1e-5)
    with pytest.raises(ValueError, match="output features"):
        mabn_jax.fold_norm(
            kernel,
            {},
            {"mean": jnp.zeros(5), "var": jnp.ones(5)},
            epsilon=1e-5,
            centered_kernel=False,
        )
    with pytest.raises(ValueError, match="neither an MABN"):
        mabn_jax.fold_norm(kernel, {}, {"mu": jnp.zeros(4)}, epsilon=1e-5, centered_kernel=False)
    with jax.enable_x64(True):
        x = jnp.ones((2, 5, 5, 4), jnp.float64)
        variables = _random_variables(Mixed(), x, seed=0)
        with pytest.raises(KeyError, match="no module at 'conv_bn'"):
            mabn_jax.fold_params(Mixed(), variables, [("conv", "conv_bn")], x)
        with pytest.raises(TypeError, match="'dense' is a Dense, not MABN"):
            mabn_jax.fold_params(Mixed(), variables, [("conv", "dense")], x)
        with pytest.raises(TypeError, match="only nn.Conv, nn.Dense"):
            mabn_jax.fold_params(Mixed(), variables, [("conv_norm", "dense_norm")], x)
