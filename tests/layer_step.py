"""A jitted single-layer MABN step shared by the tests."""

import jax
import jax.numpy as jnp

import mabn_jax


def layer_step(mod):
    """Returns jitted ``(params, batch_stats, x, dy) -> (y, dx, param grads, new batch_stats)``.

    The loss is ``sum(y · dy)``, so ``∂L/∂y = dy`` as in the golden recordings;
    the new batch_stats include this step's backward statistics (recorded by
    ``mabn_jax.value_and_grad``).
    """

    @jax.jit
    def step(params, batch_stats, x, dy):
        def loss_fn(params, x):
            y, updates = mod.apply(
                {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
            )
            return jnp.sum(y * dy), (y, updates)

        (_, (y, updates)), (dparams, dx) = mabn_jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True, batch_stats=batch_stats
        )(params, x)
        return y, dx, dparams, updates["batch_stats"]

    return step
