"""The statistics monitor: sown forward statistics, probe-gradient backward ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mabn_jax


class _Silent(mabn_jax.MABN):
    def sow(self, *args, **kwargs):  # the layer without its monitor
        return False


def _loss(module, variables, x, mutable):
    """The unchanged nn.BatchNorm loss function (for mabn_jax.value_and_grad)."""

    def f(params):
        y, up = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            use_running_average=False,
            mutable=mutable,
        )
        return jnp.sum(jnp.sin(y)), up

    return f


def _probed_loss(module, variables, x, mutable):
    """The low-level form: probes passed, differentiated separately."""

    def f(params, probes):
        y, up = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"], "mabn_probes": probes},
            x,
            use_running_average=False,
            mutable=mutable,
        )
        return jnp.sum(jnp.sin(y)), up

    return f


@pytest.mark.slow
def test_monitor_records_forward_and_backward_statistics():
    x = jax.random.normal(jax.random.key(0), (8, 3, 3, 4)) * 3.0
    module = mabn_jax.MABN(norm_batch_size=2, buffer_size=4, warmup_steps=0, centered=False)
    variables = module.init(jax.random.key(1), x, use_running_average=False)
    probes = mabn_jax.init_probes(variables["batch_stats"])  # ghost batches need nothing
    f = _probed_loss(module, variables, x, ["batch_stats", "intermediates"])
    (_, up), (_, pg) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        variables["params"], probes
    )
    fwd = mabn_jax.monitor.forward_stats(up["intermediates"])
    groups = x.reshape(4, 2, 3, 3, 4)
    np.testing.assert_allclose(fwd["chi2_B"], (groups**2).mean((1, 2, 3)), rtol=1e-5)
    # The first groups are in the batch phase (t <= m): the statistic used is the batch's.
    np.testing.assert_allclose(fwd["chi2"], fwd["chi2_B"], rtol=1e-6)
    bwd = mabn_jax.monitor.backward_stats(pg)
    assert set(bwd) == {"psi"} and bwd["psi"].shape == (4, 4)  # the window's [m, C]
    # Ψ_B = mean(ĝ · z) per group, with ĝ = cos(y) (γ = 1, r = 1) and z = y.
    # Group i is window step t = 1 + i and sits in slot t mod m.
    y = jax.jit(
        lambda v: module.apply(v, x, use_running_average=False, mutable=["batch_stats"])[0]
    )({**variables, "mabn_probes": probes})
    z = y.reshape(4, 2, 3, 3, 4)
    per_group = (jnp.cos(z) * z).mean((1, 2, 3))
    np.testing.assert_allclose(bwd["psi"], np.roll(per_group, 1, axis=0), rtol=1e-5, atol=1e-6)
    norms = mabn_jax.monitor.l2_norms(fwd)
    assert norms["chi2_B"].shape == (4,)

    # Through mabn_jax.value_and_grad, with 'intermediates' mutable as well: the
    # same forward statistics, and the backward ones recorded in the window.
    (_, up2), _ = jax.jit(
        mabn_jax.value_and_grad(
            _loss(module, variables, x, ["batch_stats", "intermediates"]),
            has_aux=True,
            batch_stats=variables["batch_stats"],
        )
    )(variables["params"])
    jax.tree.map(np.testing.assert_array_equal, up2["intermediates"], up["intermediates"])
    np.testing.assert_array_equal(up2["batch_stats"]["psi_window"], bwd["psi"])


def test_monitor_off_leaves_the_traced_step_unchanged():
    x = jax.random.normal(jax.random.key(0), (4, 5))
    with_monitor, without = mabn_jax.MABN(centered=True), _Silent(centered=True)
    variables = with_monitor.init(jax.random.key(1), x, use_running_average=False)

    def jaxpr(module):
        step = mabn_jax.value_and_grad(
            _loss(module, variables, x, ["batch_stats"]),
            has_aux=True,
            batch_stats=variables["batch_stats"],
        )
        return str(jax.make_jaxpr(step)(variables["params"]))

    assert jaxpr(with_monitor) == jaxpr(without)
    # ... while with 'intermediates' mutable the monitor does record.
    (_, up), _ = jax.jit(
        mabn_jax.value_and_grad(
            _loss(with_monitor, variables, x, ["batch_stats", "intermediates"]),
            has_aux=True,
            batch_stats=variables["batch_stats"],
        )
    )(variables["params"])
    assert set(mabn_jax.monitor.forward_stats(up["intermediates"])) == {
        "mu_B",
        "sigma2_B",
        "mu",
        "sigma2",
        "ema_mean",
        "ema_var",
        "r",
        "d",
    }
