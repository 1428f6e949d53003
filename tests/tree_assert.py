"""Leaf-by-leaf comparison of pytrees, naming the leaf that differs."""

import jax
import numpy as np


def assert_trees_close(actual, expected, *, rtol, atol, what=""):
    actual, expected = jax.device_get((actual, expected))
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_e = jax.tree.leaves(expected)
    assert len(flat_a) == len(flat_e)
    for (path, a), e in zip(flat_a, flat_e):
        np.testing.assert_allclose(
            np.asarray(a, np.float64),
            np.asarray(e, np.float64),
            rtol=rtol,
            atol=atol,
            err_msg=f"{what} {jax.tree_util.keystr(path)}",
        )


def assert_close(actual, expected, rtol=1e-6, atol=1e-7, what=""):
    """`assert_trees_close` with float32 defaults tight enough for one code path
    against another that computes the same thing."""
    assert_trees_close(actual, expected, rtol=rtol, atol=atol, what=what)
