"""The optax-shaped transformation record used by the core.

A transformation is a pair ``init(params) -> state`` and
``update(grads, state, params, **extra) -> (updates, state)``. ``params``,
``grads`` and ``updates`` are trees (lists of arrays); the new parameters are
``apply_updates(params, updates)``. States are immutable ``NamedTuple`` s of
arrays, so they are pytrees for JAX and can be checkpointed by any adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ._array import Array, Tree

__all__ = ["Transformation", "apply_updates"]


class Transformation(NamedTuple):
    """An ``(init, update)`` pair, like ``optax.GradientTransformation``."""

    init: Callable[..., Any]
    update: Callable[..., tuple[list[Array], Any]]


def apply_updates(params: Tree, updates: Tree) -> list[Array]:
    """``params + updates`` leafwise, keeping each parameter's dtype."""
    out = []
    for p, u in zip(params, updates):
        out.append(p + (u if u.dtype == p.dtype else _cast(u, p)))
    return out


def _cast(u: Array, p: Array) -> Array:
    from array_api_compat import array_namespace

    return array_namespace(u).astype(u, p.dtype)
