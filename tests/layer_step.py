"""A jitted single-layer MABN step shared by the tests."""

import jax
import jax.numpy as jnp

import mabn_jax


def layer_step(mod):
    """Returns jitted ``(params, batch_stats, x, dy) -> (y, dx, param grads, new batch_stats)``.

    The loss is ``sum(y · dy)``, so ``∂L/∂y = dy`` as in the golden recordings;
    the new batch_stats include this step's backward statistics.
    """

    @jax.jit
    def step(params, batch_stats, x, dy):
        def loss_fn(x, params, probes):
            y, updates = mod.apply(
                {"params": params, "batch_stats": batch_stats, mabn_jax.PROBES: probes},
                x, mutable=["batch_stats"])
            return jnp.sum(y * dy), (y, updates["batch_stats"])

        (_, (y, new)), (dx, dparams, stats) = jax.value_and_grad(
            loss_fn, argnums=(0, 1, 2), has_aux=True)(
            x, params, mabn_jax.init_probes(batch_stats))
        return y, dx, dparams, mabn_jax.record_backward_stats(new, stats)

    return step
