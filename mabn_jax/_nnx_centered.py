"""Flax NNX linear and convolution layers with weight-centralized kernels.

``nnx.Linear`` / ``nnx.Conv`` whose applied kernel is
:func:`~mabn_jax.center_kernel` of the stored one (see
:mod:`mabn_jax._linen_centered` for why the plain MABN needs it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, TypeVar

from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import PromoteDtypeFn

from mabn_jax import _shell

_Arrays = TypeVar("_Arrays", bound=tuple)  # flax.typing.PromoteDtypeFn's TupleArg

__all__ = ["CenteredLinear", "CenteredConv"]


@dataclasses.dataclass(frozen=True)
class _CenteringPromote:
    """``promote_dtype`` that first centers the kernel (the second array):
    the hook every ``nnx.Linear`` / ``nnx.Conv`` call passes its kernel through."""

    promote_dtype: PromoteDtypeFn

    def __call__(self, args: _Arrays, /, *, dtype: Any = None, inexact: bool = True) -> _Arrays:
        inputs, kernel, *rest = args
        centered = (inputs, _shell.center_kernel(kernel), *rest)
        return self.promote_dtype(centered, dtype=dtype, inexact=inexact)  # type: ignore[return-value]


class CenteredLinear(nnx.Linear):
    """:class:`flax.nnx.Linear` with a weight-centralized kernel (same arguments).

    The kernel applied is ``W − mean_fan_in(W)`` (each output unit's column
    minus its mean), as :class:`mabn_jax.CenteredDense`; the stored ``kernel``
    is ``W``. The centering runs inside ``promote_dtype`` (yours, if given,
    runs after it).

    Args:
      in_features, out_features, use_bias, ..., rngs: as for ``nnx.Linear``.
      promote_dtype: as for ``nnx.Linear``; it receives the centered kernel.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import mabn_jax.nnx
      >>> linear = mabn_jax.nnx.CenteredLinear(5, 3, rngs=nnx.Rngs(0))
      >>> linear(jnp.ones((2, 5))).shape
      (2, 3)
    """

    @functools.wraps(nnx.Linear.__init__, assigned=("__signature__",))  # type: ignore[misc]
    def __init__(self, *args, promote_dtype: PromoteDtypeFn = dtypes.promote_dtype, **kwargs):
        super().__init__(*args, promote_dtype=_CenteringPromote(promote_dtype), **kwargs)


class CenteredConv(nnx.Conv):
    """:class:`flax.nnx.Conv` with a weight-centralized kernel (same arguments).

    The kernel applied is ``W − mean(W)`` over the spatial and input-feature
    axes, per output feature, as :class:`mabn_jax.CenteredConv`. ``mask`` is
    not supported (centering a masked kernel moves the masked-out weights off
    zero).

    Args:
      in_features, out_features, kernel_size, strides, padding, ..., rngs: as
        for ``nnx.Conv``.
      promote_dtype: as for ``nnx.Conv``; it receives the centered kernel.
      mask: must be None.

    Raises:
      ValueError: a ``mask`` is given.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import mabn_jax.nnx
      >>> conv = mabn_jax.nnx.CenteredConv(2, 4, (3, 3), use_bias=False, rngs=nnx.Rngs(0))
      >>> conv(jnp.ones((1, 8, 8, 2))).shape
      (1, 8, 8, 4)
    """

    @functools.wraps(nnx.Conv.__init__, assigned=("__signature__",))  # type: ignore[misc]
    def __init__(
        self, *args, promote_dtype: PromoteDtypeFn = dtypes.promote_dtype, mask=None, **kwargs
    ):
        if mask is not None:
            raise ValueError(
                "CenteredConv: mask is not supported: the centered kernel "
                "W - mean(W) is nonzero where the mask is zero. Use nnx.Conv "
                "with mask, or leave mask=None."
            )
        super().__init__(*args, promote_dtype=_CenteringPromote(promote_dtype), **kwargs)
