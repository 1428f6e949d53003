"""How big one norm layer's train step is: jaxpr lines, optimized HLO instructions, fusions.

``python benchmarks/graph_size.py`` prints, for ``nn.BatchNorm`` (Flax's
defaults), the plain MABN, the centered MABN and BatchRenorm, the size of the
jitted ``value_and_grad`` of one layer (NHWC ``[2, 8, 8, 16]``, loss
``mean(y²)``, the updated ``batch_stats`` returned): the jaxpr's lines, the
optimized HLO's instructions (XLA CPU; its source-location tables left out),
and its fusions. MABN's step is the BN step with ``mabn_jax.value_and_grad``
in place of ``jax.value_and_grad``. These figures are deterministic for a
given jax/XLA version; ``tests/test_graph_size.py`` asserts the ratios to BN.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import linen as nn

import mabn_jax

SHAPE = (2, 8, 8, 16)


def layers() -> dict:
    return {
        "BN": nn.BatchNorm(),
        "MABN": mabn_jax.MABN(centered=False),
        "MABN centered": mabn_jax.MABN(centered=True),
        "BatchRenorm": mabn_jax.BatchRenorm(),
    }


def layer_step(layer):
    """``(step, args)``: one layer's jittable train step and its inputs."""
    x = jnp.ones(SHAPE)
    variables = layer.init(jax.random.key(0), x, use_running_average=True)
    is_mabn = isinstance(layer, mabn_jax.MABN)
    grad = mabn_jax.value_and_grad if is_mabn else jax.value_and_grad

    def step(params, batch_stats, x):
        def loss_fn(params):
            y, updates = layer.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )
            return jnp.mean(y**2), updates

        kw = {"batch_stats": batch_stats} if is_mabn else {}
        (loss, updates), grads = grad(loss_fn, has_aux=True, **kw)(params)
        return loss, grads, updates["batch_stats"]

    return step, (variables["params"], variables["batch_stats"], x)


def sizes(layer) -> dict[str, int]:
    """``{'jaxpr': lines, 'hlo': lines, 'fusions': count}`` of one layer's step."""
    step, args = layer_step(layer)
    jaxpr = str(jax.make_jaxpr(step)(*args))
    hlo = jax.jit(step).lower(*args).compile().as_text()
    fusions = len(re.findall(r"^\s*(?:ROOT )?\S+ = \S+ fusion\(", hlo, re.M))
    return {"jaxpr": len(jaxpr.splitlines()), "hlo": hlo_instructions(hlo), "fusions": fusions}


def hlo_instructions(hlo: str) -> int:
    """The instructions of an optimized HLO module (every computation's), not its
    source-location tables (``FileNames``, ``StackFrames``, ...), which grow with
    the number of source files and functions the code spans, not with the graph."""
    return len(re.findall(r"^\s+(?:ROOT )?%\S+ = ", hlo, re.M))


def main():
    rows = {name: sizes(layer) for name, layer in layers().items()}
    bn = rows["BN"]
    print(f"jax {jax.__version__}, XLA {jax.devices()[0].platform}; one layer, {SHAPE}")
    print("| layer | jaxpr lines | optimized HLO instructions | fusions |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        cells = [f"{r[k]} ({r[k] / bn[k]:.2f}×)" for k in ("jaxpr", "hlo", "fusions")]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
