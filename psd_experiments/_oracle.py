"""A measuring wrapper around a :mod:`psd_core.functions` problem.

The experiments need "gradient evaluations until the target is reached" with the
*same* stopping rule for every method. :class:`Watched` counts every call of
``grad`` and raises :class:`Reached` at the first gradient evaluation at a point
that meets the target:

* ``"sosp"``: :math:`\\|\\nabla f(x)\\| \\le \\epsilon` and
  :math:`\\lambda_{\\min}(\\nabla^2 f(x)) \\ge -\\gamma` (dense ``eigvalsh`` on the
  host, memoized per point, so a method sitting still at a saddle does not pay a
  fresh eigendecomposition per step; its cost is not counted, as in the
  solvers' own ``sosp`` oracle);
* ``"escape"``: :math:`f(x) \\le f(x_s) - \\Delta` (for problems without a
  second-order stationary point, e.g. an indefinite quadratic).

It measures; it does not optimize: the methods themselves are the core's solvers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from psd_core._array import tree_sq_norm

from ._common import to_numpy


class Reached(Exception):
    """Raised by :meth:`Watched.grad` when the target is met."""


class Watched:
    def __init__(
        self,
        problem: Any,
        criterion: str,
        *,
        epsilon: float | None = None,
        gamma: float | None = None,
        threshold: float | None = None,
    ) -> None:
        if criterion not in ("sosp", "escape"):
            raise ValueError(f"criterion must be 'sosp' or 'escape', got {criterion!r}")
        self.problem = problem
        self.criterion = criterion
        self.epsilon = epsilon
        self.gamma = gamma
        self.threshold = threshold
        self.evals = 0
        self.reached_value: float | None = None
        self._memo: dict[bytes, float] = {}

    def __getattr__(self, name: str) -> Any:  # dim, name, ell, rho, f_star, n, ...
        return getattr(self.problem, name)

    def value(self, x: Any) -> Any:
        return self.problem.value(x)

    def hvp(self, x: Any, v: Any) -> Any:
        return self.problem.hvp(x, v)

    def hess(self, x: Any) -> Any:
        return self.problem.hess(x)

    def lambda_min(self, x: Any) -> float:
        key = to_numpy(x).tobytes()
        lam = self._memo.get(key)
        if lam is None:
            h = to_numpy(self.problem.hess(x))
            lam = float(np.linalg.eigvalsh(h)[0])
            if len(self._memo) > 64:
                self._memo.clear()
            self._memo[key] = lam
        return lam

    def met(self, x: Any, g: Any) -> bool:
        if self.criterion == "escape":
            return float(self.problem.value(x)) <= float(self.threshold)
        gn = math.sqrt(max(float(tree_sq_norm([g])), 0.0))
        if not gn <= float(self.epsilon):
            return False
        return self.lambda_min(x) >= -float(self.gamma)

    def grad(self, x: Any) -> Any:
        self.evals += 1
        g = self.problem.grad(x)
        if self.met(x, g):
            self.reached_value = float(self.problem.value(x))
            raise Reached
        return g


class EscapeClock:
    """Counts ``grad`` calls and remembers the first one at a point with
    :math:`f(x) \\le` ``threshold`` (the escape time); never stops the method."""

    def __init__(self, problem: Any, threshold: float) -> None:
        self.problem = problem
        self.threshold = float(threshold)
        self.evals = 0
        self.first_below: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.problem, name)

    def value(self, x: Any) -> Any:
        return self.problem.value(x)

    def hvp(self, x: Any, v: Any) -> Any:
        return self.problem.hvp(x, v)

    def hess(self, x: Any) -> Any:
        return self.problem.hess(x)

    def grad(self, x: Any) -> Any:
        self.evals += 1
        if self.first_below is None and float(self.problem.value(x)) <= self.threshold:
            self.first_below = self.evals
        return self.problem.grad(x)
