"""How far mabn_jax.BatchRenorm is from Keras 3 and sbx with the settings of docs/batch_renorm.md.

Restates, in float64 ``jax.numpy`` (so gradients come from autodiff), the
training and inference computations of

* Keras 3 ``BatchNormalization(renorm=True)`` (keras-team/keras,
  ``keras/src/layers/normalization/batch_normalization.py``, first released in
  3.14): EMAs of the stddev, ``renorm_clipping`` with missing keys meaning no
  clip, stddevs initialized to 1.0 (or 0, as with Keras'
  ``moving_variance_initializer='zeros'``, against ``var = renorm_var = −ε``);
* sbx's ``BatchRenorm`` (araffin/sbx ``sbx/common/jax_layers.py``, CrossQ):
  one-pass variance, r and d folded into an "affine" mean and variance
  ``μ' = μ_B − d·sqrt(σ²_B)/r``, ``σ'² = σ²_B/r²`` normalized with ε,

and compares each with ``mabn_jax.functional.batch_renorm_train`` /
``batch_renorm_inference`` configured as the table says, on the same input
stream (float64, so only the formulas differ). Ioffe 2017's Algorithm 1 is
pinned exactly (1e-10) by ``tests/test_batch_renorm.py``.

Printed per case: the largest |Δy| of the training outputs during and after
warm-up (y is about unit scale: γ = 1, β = 0), the largest |Δ ∂L/∂x| after
warm-up relative to the largest |∂L/∂x|, and the largest |Δy| at inference
after the run.

Run: ``python benchmarks/brn_references.py`` (about 25 s on 2 CPU cores);
``--smoke``: 60 steps (past sbx's warm-up of 50) instead of 300, a test that the
script works.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mabn_jax import functional as F  # noqa: E402

sg = jax.lax.stop_gradient


def keras_step(state, x, *, momentum, renorm_momentum, eps, rmax=None, rmin=None, dmax=None):
    """Keras 3, training=True with renorm: returns (y, new state)."""
    mean, var = jnp.mean(x, 0), jnp.var(x, 0)  # ops.moments on JAX: two passes
    stddev = jnp.sqrt(var + eps)
    renorm_std = jnp.maximum(state["renorm_stddev"], jnp.sqrt(eps))
    r = stddev / renorm_std
    d = (mean - state["renorm_mean"]) / renorm_std
    if rmin is not None:
        r = jnp.maximum(r, rmin)
    if rmax is not None:
        r = jnp.minimum(r, rmax)
    if dmax is not None:
        d = jnp.clip(d, -dmax, dmax)
    gamma, beta = sg(r), sg(d)  # gamma = 1, beta = 0: the composed transform is (r, d)
    inv = jax.lax.rsqrt(var + eps) * gamma  # ops.batch_normalization on JAX
    y = x * inv + (beta - mean * inv)
    m, rho = momentum, renorm_momentum
    moving_stddev = state["moving_stddev"] * m + stddev * (1 - m)
    new = dict(
        renorm_mean=state["renorm_mean"] * rho + mean * (1 - rho),
        renorm_stddev=state["renorm_stddev"] * rho + stddev * (1 - rho),
        moving_mean=state["moving_mean"] * m + mean * (1 - m),
        moving_stddev=moving_stddev,
        moving_variance=jax.nn.relu(moving_stddev**2 - eps),
    )
    return y, jax.tree.map(sg, new)


def keras_init(c, std0=1.0):
    return dict(
        renorm_mean=jnp.zeros(c),
        renorm_stddev=jnp.full(c, std0),
        moving_mean=jnp.zeros(c),
        moving_stddev=jnp.full(c, std0),
        moving_variance=jnp.ones(c),
    )


def keras_infer(state, x, eps):
    inv = jax.lax.rsqrt(state["moving_variance"] + eps)
    return x * inv + (-state["moving_mean"] * inv)


def sbx_step(state, x, *, momentum, eps, warmup, r_max=3.0, d_max=5.0):
    """sbx BatchRenorm, use_running_average=False after init: returns (y, new state)."""
    mu, mu2 = jnp.mean(x, 0), jnp.mean(x * x, 0)  # Flax _compute_stats, fast variance
    batch_var = jnp.maximum(0.0, mu2 - mu * mu)
    std = jnp.sqrt(batch_var + eps)
    ra_std = jnp.sqrt(state["var"] + eps)
    r = jnp.clip(sg(std / ra_std), 1 / r_max, r_max)
    d = jnp.clip(sg((mu - state["mean"]) / ra_std), -d_max, d_max)
    affine_mean = mu - d * jnp.sqrt(batch_var) / r
    affine_var = batch_var / r**2
    w = (state["steps"] >= warmup).astype(x.dtype)
    custom_mean = w * affine_mean + (1 - w) * mu
    custom_var = w * affine_var + (1 - w) * batch_var
    y = (x - custom_mean) * jax.lax.rsqrt(custom_var + eps)  # Flax _normalize, γ = 1, β = 0
    new = dict(
        mean=momentum * state["mean"] + (1 - momentum) * mu,
        var=momentum * state["var"] + (1 - momentum) * batch_var,
        steps=state["steps"] + 1,
    )
    return y, jax.tree.map(sg, new)


def sbx_init(c):
    return dict(mean=jnp.zeros(c), var=jnp.ones(c), steps=jnp.zeros((), jnp.int32))


def sbx_infer(state, x, eps):
    return (x - state["mean"]) * jax.lax.rsqrt(state["var"] + eps)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    reference: str  # "keras" or "sbx"
    ref_kwargs: tuple
    config: F.BatchRenormConfig
    batch: int
    scale: float  # features' standard deviation
    warmup: int = 0
    std0: float = 1.0  # Keras' initial stddev
    var0: float | None = None  # mabn_jax's initial var and renorm_var (None: init's 1)


def stream(steps, batch, c, scale, seed=0):
    """Drifting statistics: the mean walks, the scale jumps by up to ~2x per step."""
    rng = np.random.default_rng(seed)
    mean = np.cumsum(0.3 * scale * rng.standard_normal((steps, 1, c)), 0)
    std = scale * np.exp(0.4 * rng.standard_normal((steps, 1, c)))
    x = mean + std * rng.standard_normal((steps, batch, c))
    return jnp.asarray(x), jnp.asarray(rng.standard_normal(x.shape))


def with_grad(step):
    """Jitted ``(state, x, dy) -> (y, new state, ∂(y·dy)/∂x)``."""

    def f(state, x, dy):
        y, pullback, new = jax.vjp(lambda x: step(state, x), x, has_aux=True)
        return y, new, pullback(dy)[0]

    return jax.jit(f)


def run(case: Case, steps=300, c=16):
    xs, dys = stream(steps, case.batch, c, case.scale)
    kw = dict(case.ref_kwargs)
    eps = case.config.epsilon
    if case.reference == "keras":
        ref_step = with_grad(lambda s, x: keras_step(s, x, eps=eps, **kw))
        ref_state, ref_infer = keras_init(c, case.std0), keras_infer
    else:
        ref_step = with_grad(lambda s, x: sbx_step(s, x, eps=eps, warmup=case.warmup, **kw))
        ref_state, ref_infer = sbx_init(c), sbx_infer
    ours = with_grad(lambda s, x: F.batch_renorm_train(x, None, None, s, case.config)[:2])
    state = F.init_batch_renorm_state((c,), jnp.float64)
    if case.var0 is not None:
        start = jnp.full((c,), case.var0)
        state = state._replace(var=start, renorm_var=start)
    dy_warm = dy_max = dx_max = grad_scale = 0.0
    for t in range(steps):
        y_ref, ref_state, dx_ref = ref_step(ref_state, xs[t], dys[t])
        y, state, dx = ours(state, xs[t], dys[t])
        if t < case.warmup:
            dy_warm = max(dy_warm, float(jnp.abs(y - y_ref).max()))
            continue
        dy_max = max(dy_max, float(jnp.abs(y - y_ref).max()))
        dx_max = max(dx_max, float(jnp.abs(dx - dx_ref).max()))
        grad_scale = max(grad_scale, float(jnp.abs(dx_ref).max()))
    x_test = xs[-1]
    infer = float(
        jnp.abs(
            F.batch_renorm_inference(x_test, None, None, state, case.config)
            - ref_infer(ref_state, x_test, eps)
        ).max()
    )
    return (dy_warm if case.warmup else None), dy_max, dx_max / grad_scale, infer


def cases():
    inf = math.inf
    keras = dict(momentum=0.99, renorm_momentum=0.99)
    keras_cfg = dict(
        momentum=0.99,
        renorm_momentum=0.99,
        epsilon=1e-3,
        average_stddev=True,
        use_fast_variance=False,
    )
    out = []
    for batch in (2, 32):
        out += [
            Case(
                f"Keras 3 defaults (no clipping), batch {batch}",
                "keras",
                tuple(keras.items()),
                F.BatchRenormConfig(r_max=inf, r_min=0.0, d_max=inf, **keras_cfg),
                batch,
                1.0,
            ),
            Case(
                f"  same, Keras' stddevs started at sqrt(1 + eps), batch {batch}",
                "keras",
                tuple(keras.items()),
                F.BatchRenormConfig(r_max=inf, r_min=0.0, d_max=inf, **keras_cfg),
                batch,
                1.0,
                std0=math.sqrt(1 + 1e-3),
            ),
            Case(
                f"Keras 3, clipping rmax 3, rmin 1/3, dmax 5, batch {batch}",
                "keras",
                tuple({**keras, "rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0}.items()),
                F.BatchRenormConfig(r_max=3.0, d_max=5.0, **keras_cfg),
                batch,
                1.0,
            ),
            Case(
                f"  same, Keras' stddevs started at sqrt(1 + eps), batch {batch}",
                "keras",
                tuple({**keras, "rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0}.items()),
                F.BatchRenormConfig(r_max=3.0, d_max=5.0, **keras_cfg),
                batch,
                1.0,
                std0=math.sqrt(1 + 1e-3),
            ),
            Case(
                f"Keras 3 moving_variance_initializer='zeros' (stddevs from 0), batch {batch}",
                "keras",
                tuple(keras.items()),
                F.BatchRenormConfig(r_max=inf, r_min=0.0, d_max=inf, **keras_cfg),
                batch,
                1.0,
                std0=0.0,
                var0=-1e-3,  # std 0 as var = std**2 - eps; stored back as max(., 0)
            ),
        ]
    sbx = lambda eps: F.BatchRenormConfig(
        momentum=0.99, epsilon=eps, r_max=3.0, d_max=5.0, warmup_steps=50, use_fast_variance=True
    )
    for batch in (2, 32, 256):
        for scale in (1.0, 0.1, 0.03):
            out.append(
                Case(
                    f"sbx defaults (warm-up 50 here), batch {batch}, feature std {scale}",
                    "sbx",
                    (("momentum", 0.99),),
                    sbx(1e-3),
                    batch,
                    scale,
                    warmup=50,
                )
            )
    out.append(
        Case(
            "  same with epsilon 1e-9 (the two forms agree at 0), batch 32, std 1.0",
            "sbx",
            (("momentum", 0.99),),
            sbx(1e-9),
            32,
            1.0,
            warmup=50,
        )
    )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="60 steps instead of 300 (a test)")
    steps = 60 if p.parse_args(argv).smoke else 300
    print(
        f"jax {jax.__version__}, float64; {steps} steps of 16 drifting features; "
        "gamma = 1, beta = 0\n"
    )
    print(
        "| reference and setting | max abs Δy, warm-up | max abs Δy, training | "
        "max abs Δ dL/dx / max abs dL/dx | max abs Δy, inference |"
    )
    print("| --- | --- | --- | --- | --- |")
    for case in cases():
        warm, dy, dx, infer = run(case, steps)
        warm = "-" if warm is None else f"{warm:.1e}"
        print(f"| {case.name} | {warm} | {dy:.1e} | {dx:.1e} | {infer:.1e} |", flush=True)


if __name__ == "__main__":
    main()
