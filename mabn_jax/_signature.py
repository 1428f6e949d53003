"""The one piece of metaprogramming: a norm's constructor with its peer's signature.

Both shells hold their hyper-parameters in a config dataclass
(:class:`~mabn_jax.MABNConfig`), so the constructor Python would give them
lists those fields in the wrong place: Flax's dataclass ``__init__`` for a
linen module puts the config's fields first (``MABN(False, -1, 0.9)`` would
set the first config field), and the NNX ``__init__`` takes them as
``**hyper``, which ``help()`` and IDEs cannot show. :func:`peer_init` wraps
the generated ``__init__`` once: it maps positional arguments to the peer's
names (``nn.BatchNorm``'s order; ``nnx.BatchNorm``'s ``num_features``) and
shows a signature with every keyword. Nothing else changes: the wrapped
``__init__`` receives keywords only.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

__all__ = ["peer_init"]


def peer_init(
    init: Callable,
    layer: str,
    positional: Sequence[str],
    shown: Sequence[inspect.Parameter],
    peer: str,
) -> Callable:
    """``init`` taking ``positional`` by position (in that order) and showing the
    signature ``(self, *positional, *, shown...)``.

    Args:
      init: the ``__init__`` to wrap (it takes every argument by keyword).
      layer: the class name, for messages.
      positional: the names positional arguments map to, in order.
      shown: every parameter of the displayed signature, ``self`` excluded
        (those named in ``positional`` are shown positional-or-keyword, in that
        order; the others keyword-only).
      peer: the layer whose order this is, for messages (``nn.BatchNorm``).

    Returns:
      The wrapped ``__init__``.
    """
    order = tuple(positional)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if len(args) > len(order):
            raise TypeError(
                f"{layer} takes at most {len(order)} positional arguments ({peer}'s "
                f"order: {', '.join(order)}), got {len(args)}; pass the others by keyword."
            )
        for name, value in zip(order, args):
            if name in kwargs:
                raise TypeError(f"{layer}: got multiple values for argument {name!r}.")
            kwargs[name] = value
        init(self, **kwargs)

    by_name = {p.name: p for p in shown}
    kinds = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("self", kinds[0])]
    params += [by_name[n].replace(kind=kinds[0]) for n in order]
    params += [p.replace(kind=kinds[1]) for p in shown if p.name not in order]
    __init__.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return __init__
