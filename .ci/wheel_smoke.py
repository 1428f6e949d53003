"""Run by .ci/check_wheel from a fresh environment holding only the built wheel.

Checks that the installed package (not a checkout) imports, reports the version
its metadata has, ships py.typed, and trains: one jitted MABN train step with
mabn_jax.value_and_grad, linen and NNX.
"""

import importlib.metadata
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import mabn_jax
import mabn_jax.nnx

package = pathlib.Path(mabn_jax.__file__).parent
assert "site-packages" in package.parts, f"imported from {package}, not the installed wheel"
assert importlib.metadata.version("mabn_jax") == mabn_jax.__version__
assert (package / "py.typed").is_file()


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = mabn_jax.CenteredDense(8, use_bias=False)(x)
        x = mabn_jax.MABN(use_running_average=not train, warmup_steps=1, buffer_size=2)(x)
        return nn.Dense(1)(nn.relu(x))


model = Net()
x, y = jax.random.normal(jax.random.key(0), (2, 3)), jnp.ones((2, 1))
variables = model.init(jax.random.key(1), x, train=False)


@jax.jit
def train_step(params, batch_stats):
    def loss_fn(params):
        out, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean((out - y) ** 2), updates

    (loss, updates), grads = mabn_jax.value_and_grad(
        loss_fn, has_aux=True, batch_stats=batch_stats
    )(params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return params, updates["batch_stats"], loss


params, batch_stats = variables["params"], variables["batch_stats"]
losses = []
for _ in range(3):
    params, batch_stats, loss = train_step(params, batch_stats)
    losses.append(float(loss))
assert all(jnp.isfinite(jnp.array(losses))), losses
assert float(batch_stats["MABN_0"]["step"]) == 3.0
print(f"linen: mabn_jax {mabn_jax.__version__} from {package}: losses {losses}")


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.dense = mabn_jax.nnx.CenteredLinear(3, 8, use_bias=False, rngs=rngs)
        self.norm = mabn_jax.nnx.MABN(8, warmup_steps=1, buffer_size=2, rngs=rngs)
        self.head = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.norm(self.dense(x))))


net = NnxNet(nnx.Rngs(0))
loss, grads = mabn_jax.nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(net)
assert jnp.isfinite(loss) and float(net.norm.step[...]) == 1.0
print(f"nnx: loss {float(loss):.4f}")
