"""One layer's train step stays small: jaxpr lines, optimized HLO instructions and
fusions against nn.BatchNorm's (deterministic figures of benchmarks/graph_size.py).

The bounds are today's figures with a little room, so that a change that
grows the graph fails here; `python benchmarks/graph_size.py` prints the table.
(The per-layer ``jit`` that lets a deep model trace each layer shape once is
inlined, so the jaxpr shows the layer's equations themselves.)
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import graph_size  # noqa: E402

# (jaxpr lines, HLO instructions, fusions) at most this many times BN's. The plain
# layer's are issue 29's targets (2.5×, 2.5×, 2×), as are the centered layer's
# jaxpr and fusions (3.5×); its HLO (4.22× today) is not there yet.
BOUNDS = {
    "MABN": (2.5, 2.5, 2.0),
    "MABN centered": (3.5, 4.3, 3.5),
    "BatchRenorm": (1.9, 2.2, 2.0),
}


@pytest.fixture(scope="module")
def sizes():
    return {name: graph_size.sizes(layer) for name, layer in graph_size.layers().items()}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_layer_graph_within_bounds_of_batchnorm(sizes, name):
    bn, got = sizes["BN"], sizes[name]
    for key, bound in zip(("jaxpr", "hlo", "fusions"), BOUNDS[name]):
        assert got[key] <= bound * bn[key], (name, key, got[key], bn[key])


def test_no_nested_jit_per_select(sizes):
    """The layer's selects and clips are single ops (mabn_jax._stats.where),
    not jnp.where's nested jit: the graph does not grow by a sub-jaxpr each."""
    import jax

    import mabn_jax

    step, args = graph_size.layer_step(mabn_jax.MABN())
    text = str(jax.make_jaxpr(step)(*args))
    assert "name=_where" not in text and "name=clip" not in text
