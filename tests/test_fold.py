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


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_folded_model_equals_unfolded(norm):
    """For Conv/Dense and CenteredConv/CenteredDense, with and without use_bias."""
    with jax.enable_x64(True):  # float64, so the tolerance can be tight
        x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 5, 4), jnp.float64)

        for centered in (False, True):
            layers = ((mabn_jax.CenteredConv, mabn_jax.CenteredDense) if centered
                      else (nn.Conv, nn.Dense))
            for use_bias in (False, True):
                model = Net(*layers, NORMS[norm], use_bias)
                variables = _random_variables(model, x, seed=int(centered) + 2 * use_bias)

                def folded(variables, x):
                    params = mabn_jax.fold_params(
                        variables["params"], variables["batch_stats"],
                        pairs=[("conv", "conv_norm"), ("dense", "dense_norm")],
                        centered_kernel=centered)
                    assert set(params) == {"conv", "dense"}  # the norms are gone
                    assert set(params["conv"]) == {"kernel", "bias"}
                    return Net(nn.Conv, nn.Dense, None).apply({"params": params}, x)

                got, want = folded(variables, x), model.apply(variables, x)
                assert got.dtype == want.dtype == jnp.float64
                np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)
                assert float(jnp.abs(want).max()) > 0.1  # not trivially 0 == 0


def test_fold_params_keeps_other_params_and_accepts_key_tuples():
    params = {"block": {"conv": {"kernel": jnp.ones((1, 1, 2, 3))},
                        "norm": {"scale": jnp.full((3,), 2.0), "bias": jnp.ones(3)}},
              "head": {"kernel": jnp.ones((3, 1))}}
    stats = {"block": {"norm": {"mean": jnp.zeros(3), "var": jnp.full((3,), 4.0)}}}
    out = mabn_jax.fold_params(params, stats, [(("block", "conv"), ("block", "norm"))])
    assert set(out["block"]) == {"conv"}
    np.testing.assert_array_equal(out["head"]["kernel"], params["head"]["kernel"])
    np.testing.assert_allclose(out["block"]["conv"]["kernel"], np.ones((1, 1, 2, 3)),
                               rtol=1e-5)  # 2 / sqrt(4 + eps)
    np.testing.assert_allclose(out["block"]["conv"]["bias"], np.ones(3))
    assert "norm" in params["block"]  # the input is not modified


def test_fold_errors_name_the_problem():
    kernel = {"kernel": jnp.ones((3, 3, 2, 4))}
    with pytest.raises(ValueError, match="output features"):
        mabn_jax.fold_norm(kernel, {}, {"mean": jnp.zeros(5), "var": jnp.ones(5)})
    with pytest.raises(ValueError, match="neither an MABN"):
        mabn_jax.fold_norm(kernel, {}, {"mu": jnp.zeros(4)})
    with pytest.raises(KeyError, match="conv_norm"):
        mabn_jax.fold_params({"conv": kernel}, {}, [("conv", "conv_norm")])
