r"""Explicit randomness.

The pure updates never draw random numbers themselves: they take the draws
(standard normals shaped like the parameters and, for the uniform ball, one
uniform number) as arguments. That keeps them pure, traceable and identical on
every backend given identical draws.

:func:`uniform_ball` turns draws into a sample of :math:`\mathrm{Uniform}(B_d(0, r))`:
direction :math:`z/\|z\|` with :math:`z\sim N(0, I)`, radius :math:`r\,u^{1/d}` with
:math:`u\sim U(0,1)`.

:class:`HostDraws` is a convenience for drivers (solvers, experiments, tests): it
draws from one NumPy generator on the host and converts the draws to the caller's
array namespace, so a run given a NumPy, PyTorch or JAX start point consumes the
same random stream and computes the same thing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

from ._array import (
    Array,
    Tree,
    as_scalar,
    namespace,
    number_like,
    real_dtype,
    scalar_device,
    tree_size,
    tree_sq_norm,
)

__all__ = ["HostDraws", "ball_scale", "uniform_ball"]

_TINY = 1e-30


def ball_scale(noise_sq_norm: Array, uniform: Array, radius: Any, dim: int) -> Array:
    r"""Scale :math:`s` such that :math:`s\,z \sim \mathrm{Uniform}(B_d(0, r))`:
    :math:`s = r\,u^{1/d}/\|z\|` (0-d array; safe when :math:`\|z\| = 0`)."""
    xp = namespace(noise_sq_norm)
    dev = scalar_device(noise_sq_norm)
    norm = xp.sqrt(xp.maximum(noise_sq_norm, number_like(xp, _TINY, noise_sq_norm, dev)))
    u = as_scalar(uniform, noise_sq_norm)
    return number_like(xp, radius, noise_sq_norm, dev) * u ** (1.0 / dim) / norm


def uniform_ball(normals: Tree, uniform: Array, radius: Any) -> list[Array]:
    r"""A sample of :math:`\mathrm{Uniform}(B_d(0, r))` from explicit draws.

    Args:
        normals: standard normal draws shaped like the parameters (a tree).
        uniform: a 0-d draw from :math:`U(0, 1)`.
        radius: ball radius :math:`r \ge 0`.

    Returns:
        :math:`\xi = r\,u^{1/d} z/\|z\|`, a tree like ``normals``.
    """
    scale = ball_scale(tree_sq_norm(normals), uniform, radius, tree_size(normals))
    return [as_scalar(scale, z) * z for z in normals]


class HostDraws:
    """Draws from one ``numpy.random.Generator``, converted to the caller's namespace.

    Args:
        seed: seed of the NumPy generator (``numpy.random.default_rng(seed)``).
    """

    def __init__(self, seed: int | None = 0) -> None:
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def _convert(values: np.ndarray, like: Array) -> Array:
        xp = array_namespace(like)
        try:
            return xp.asarray(values, dtype=like.dtype, device=device(like))
        except (TypeError, ValueError):  # namespaces that refuse NumPy input (array-api-strict)
            return xp.asarray(values.tolist(), dtype=like.dtype, device=device(like))

    def normals_like(self, tree: Tree) -> list[Array]:
        """Standard normal draws shaped like ``tree`` (float64 on the host, then cast).

        A complex leaf gets independent :math:`N(0, 1)` real and imaginary parts
        (real part drawn first).
        """
        out = []
        for x in tree:
            z = self.rng.standard_normal(tuple(x.shape))
            if array_namespace(x).isdtype(x.dtype, "complex floating"):
                z = z + 1j * self.rng.standard_normal(tuple(x.shape))
            out.append(self._convert(z, x))
        return out

    def uniform_like(self, like: Array) -> Array:
        """One :math:`U(0, 1)` draw as a 0-d array of ``like``'s real dtype."""
        xp = array_namespace(like)
        dt = real_dtype(xp, like.dtype)
        v = np.asarray(self.rng.random())
        try:
            return xp.asarray(v, dtype=dt, device=device(like))
        except (TypeError, ValueError):
            return xp.asarray(float(v), dtype=dt, device=device(like))

    def unit_vector_like(self, tree: Tree) -> list[Array]:
        """A uniformly random unit vector shaped like ``tree``."""
        z = self.normals_like(tree)
        xp = array_namespace(*z)
        inv = 1.0 / xp.sqrt(tree_sq_norm(z))
        return [as_scalar(inv, v, real_dtype(xp, v.dtype)) * v for v in z]
