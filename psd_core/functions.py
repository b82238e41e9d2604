r"""Test problems for Perturbed Saddle-escape Descent (PSD) and SAM-SPS.

Every problem is a small object satisfying the :class:`Problem` protocol:

* ``dim`` (int) and ``name`` (str, the key of :data:`PROBLEMS` that builds it);
* ``value(x)`` -> 0-d array, ``grad(x)`` -> 1-D array, ``hvp(x, v)`` -> 1-D array
  (Hessian-vector product, never forms the Hessian), ``hess(x)`` -> dense 2-D array
  (meant for small ``dim``: tests, eigenvalue checks);
* the constants of the PSD theory: ``ell`` (gradient-Lipschitz bound
  :math:`\|\nabla^2 f(x)\|_2\le\ell` on the region stated in the class docstring),
  ``rho`` (Hessian-Lipschitz bound :math:`\|\nabla^2 f(x)-\nabla^2 f(y)\|_2\le
  \rho\|x-y\|`), ``rho_assumed`` (``True`` when the true constant is 0 and ``rho`` is
  only a positive placeholder the theory needs), ``f_star`` (global minimum value, or
  ``None`` if unknown / unbounded below);
* ``saddle()`` -> NumPy float64 1-D array: the strict saddle point to start from, and
  ``has_saddle`` telling whether that point really is a strict saddle (it is not for
  :func:`rosenbrock` and :func:`ridge_regression`, which return a documented start).

``x`` may be a 1-D array of any array-API library (NumPy, PyTorch, JAX, CuPy,
array-api-strict). All array code goes through ``xp = array_namespace(x)`` and only
standard functions: no in-place updates, no host reads of array values, so everything
traces under ``jax.jit``. Random data (matrices, well centres) is drawn once at
construction with ``np.random.default_rng(seed)`` in float64 and converted on each call
to ``x``'s namespace, dtype and device (cached per namespace/dtype/device, except for
JAX where conversion may happen under a trace).

References:
    Alpay & Alakkad, *Escaping Saddle Points via Curvature-Calibrated Perturbations: A
    Complete Analysis with Explicit Constants and Empirical Validation*, 2025,
    arXiv:2508.16540 (quartic saddle, Rosenbrock and Gaussian-well benchmarks).
    Oikonomou & Loizou, *Adaptive Sharpness-Aware Minimization with a Polyak-type Step
    Size* (SAM-SPS; interpolating least-squares / ridge benchmarks, ``L_max`` and
    ``f_star``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
from array_api_compat import array_namespace, device, is_jax_namespace

Array = Any

__all__ = [
    "PROBLEMS",
    "CoupledQuartic",
    "GaussianWells",
    "Problem",
    "RandomQuadratic",
    "RidgeRegression",
    "Rosenbrock",
    "SeparableQuartic",
    "coupled_quartic",
    "gaussian_wells",
    "random_quadratic",
    "ridge_regression",
    "rosenbrock",
    "separable_quartic",
]


@runtime_checkable
class Problem(Protocol):
    """What the optimizers and experiments need from a test problem."""

    dim: int
    name: str
    ell: float
    rho: float
    f_star: float | None

    def value(self, x: Array) -> Array: ...

    def grad(self, x: Array) -> Array: ...

    def hvp(self, x: Array, v: Array) -> Array: ...

    def hess(self, x: Array) -> Array: ...

    def saddle(self) -> np.ndarray: ...


def _check_dim(dim: Any, minimum: int = 1, what: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or int(dim) < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {dim!r}")
    return int(dim)


class _Base:
    """Shared helpers: constant conversion to the caller's namespace/dtype/device."""

    dim: int
    name: str
    ell: float
    rho: float
    f_star: float | None
    rho_assumed: bool = False
    has_saddle: bool = True

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], Array] = {}

    def _const(self, key: str, arr: np.ndarray, like: Array) -> Array:
        """NumPy float64 ``arr`` as an array of ``like``'s namespace, dtype and device."""
        xp = array_namespace(like)
        dev = device(like)
        if is_jax_namespace(xp):
            # Under jax.jit the result may be a tracer: never cache it.
            return xp.asarray(arr, dtype=like.dtype, device=dev)
        ck = (key, xp.__name__, str(like.dtype), str(dev))
        out = self._cache.get(ck)
        if out is None:
            out = xp.asarray(arr, dtype=like.dtype, device=dev)
            self._cache[ck] = out
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


# ---------------------------------------------------------------------------------------
# Quartics
# ---------------------------------------------------------------------------------------


class SeparableQuartic(_Base):
    r"""Separable quartic :math:`f(x)=\sum_{i=1}^d (x_i^4 - x_i^2)`.

    .. math::
        \nabla f(x)_i = 4x_i^3 - 2x_i,\qquad
        \nabla^2 f(x) = \operatorname{diag}(12x_i^2 - 2).

    The origin is stationary with :math:`\nabla^2 f(0) = -2I` (a strict local maximum;
    the PSD paper, Alpay & Alakkad 2025, arXiv:2508.16540, calls it the saddle: every
    direction escapes). The :math:`2^d` global minimizers are
    :math:`x_i=\pm1/\sqrt2`, with :math:`f^\star=-d/4`.

    Constants on the box :math:`\|x\|_\infty\le 1`:
    ``ell = 10`` since :math:`|12x_i^2-2|\le 10`;
    ``rho = 24`` since :math:`|12x_i^2-12y_i^2| = 12|x_i+y_i||x_i-y_i|\le 24\|x-y\|_2`.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = _check_dim(dim)
        self.name = "quartic"
        self.ell = 10.0
        self.rho = 24.0
        self.f_star = -self.dim / 4.0

    def value(self, x: Array) -> Array:
        xp = array_namespace(x)
        x2 = x * x
        return xp.sum(x2 * x2 - x2)

    def grad(self, x: Array) -> Array:
        return 4.0 * x * x * x - 2.0 * x

    def hvp(self, x: Array, v: Array) -> Array:
        return (12.0 * x * x - 2.0) * v

    def hess(self, x: Array) -> Array:
        xp = array_namespace(x)
        eye = xp.eye(self.dim, dtype=x.dtype, device=device(x))
        return eye * (12.0 * x * x - 2.0)

    def saddle(self) -> np.ndarray:
        """The origin (Hessian :math:`-2I`)."""
        return np.zeros(self.dim)

    def minimizer(self) -> np.ndarray:
        """One global minimizer, :math:`x_i = 1/\\sqrt2`."""
        return np.full(self.dim, 1.0 / math.sqrt(2.0))


class CoupledQuartic(_Base):
    r"""Coupled quartic :math:`f(x)=\sum_i (x_i^4-x_i^2) + c\sum_{i<j}x_ix_j`.

    Evaluated in :math:`O(d)` with :math:`\sum_{i<j}x_ix_j = \tfrac12(s^2-\|x\|^2)`,
    :math:`s=\sum_i x_i`:

    .. math::
        \nabla f(x) = 4x^3 - 2x + c(s\mathbf 1 - x),\qquad
        \nabla^2 f(x) = \operatorname{diag}(12x^2-2) + c(\mathbf 1\mathbf 1^\top - I).

    The origin is stationary with :math:`\nabla^2 f(0) = -2I + c(\mathbf 1\mathbf
    1^\top - I)`, eigenvalues :math:`-2-c` (multiplicity :math:`d-1`) and
    :math:`-2+c(d-1)` (along :math:`\mathbf 1`): a strict saddle, and a genuine saddle
    (both signs) once :math:`c(d-1)>2`. Reference: the coupled variant of the PSD
    quartic benchmark (Alpay & Alakkad 2025, arXiv:2508.16540).

    Constants on :math:`\|x\|_\infty\le1`: ``ell = 10 + c*d`` (diagonal part
    :math:`\le 10`, :math:`\|c(\mathbf 1\mathbf 1^\top-I)\|_2 = |c|(d-1)`),
    ``rho = 24`` (the coupling is quadratic). ``f_star`` is ``None`` (no closed form).
    """

    def __init__(self, dim: int, coupling: float = 0.1) -> None:
        super().__init__()
        self.dim = _check_dim(dim)
        self.coupling = float(coupling)
        self.name = "coupled_quartic"
        self.ell = 10.0 + abs(self.coupling) * self.dim
        self.rho = 24.0
        self.f_star = None

    def value(self, x: Array) -> Array:
        xp = array_namespace(x)
        x2 = x * x
        s = xp.sum(x)
        q = xp.sum(x2)
        return xp.sum(x2 * x2) - q + (0.5 * self.coupling) * (s * s - q)

    def grad(self, x: Array) -> Array:
        xp = array_namespace(x)
        s = xp.sum(x)
        return 4.0 * x * x * x - 2.0 * x + self.coupling * (s - x)

    def hvp(self, x: Array, v: Array) -> Array:
        xp = array_namespace(x, v)
        return (12.0 * x * x - 2.0) * v + self.coupling * (xp.sum(v) - v)

    def hess(self, x: Array) -> Array:
        xp = array_namespace(x)
        dev = device(x)
        eye = xp.eye(self.dim, dtype=x.dtype, device=dev)
        ones = xp.ones((self.dim, self.dim), dtype=x.dtype, device=dev)
        return eye * (12.0 * x * x - 2.0 - self.coupling) + self.coupling * ones

    def saddle(self) -> np.ndarray:
        """The origin."""
        return np.zeros(self.dim)


# ---------------------------------------------------------------------------------------
# Rosenbrock
# ---------------------------------------------------------------------------------------


class Rosenbrock(_Base):
    r"""Rosenbrock function :math:`f(x)=\sum_{i=1}^{d-1} 100(x_{i+1}-x_i^2)^2+(1-x_i)^2`.

    :math:`f^\star = 0` at :math:`x=\mathbf 1`. With :math:`a=x_{1:d-1}`,
    :math:`b=x_{2:d}`, :math:`r=b-a^2`:

    .. math::
        \partial_{a_i} = -400a_ir_i - 2(1-a_i),\quad \partial_{b_i} = 200r_i,\\
        H_{ii} = [i<d]\,(1200x_i^2-400x_{i+1}+2) + [i>1]\,200,\quad
        H_{i,i+1} = H_{i+1,i} = -400x_i

    (tridiagonal; ``hvp`` uses the three diagonals, never a dense matrix).

    ``saddle()`` returns the origin, *the paper's start* (Alpay & Alakkad 2025,
    arXiv:2508.16540). Caveat: it is **not** stationary
    (:math:`\nabla f(0) = (-2,\dots,-2,0)`) and :math:`\nabla^2 f(0) =
    \operatorname{diag}(2,202,\dots,202,200)` is positive definite; Rosenbrock has no
    strict saddle near it, so ``has_saddle`` is ``False``: it is the ill-conditioned
    curved-valley control problem.

    Constants on the box :math:`\|x\|_\infty\le R` (``radius``, default 1.5), both
    from Gershgorin / the :math:`\infty`-norm of a symmetric tridiagonal matrix:
    ``ell = 1200R^2 + 1200R + 202`` (:math:`|H_{ii}|\le1200R^2+400R+202`, two
    off-diagonals :math:`\le400R` each; 4702 at :math:`R=1.5`) and
    ``rho = 2400R + 1200`` (row sums of :math:`H(x)-H(y)`:
    :math:`2400R\delta+400\delta` on the diagonal, :math:`400\delta` per off-diagonal,
    :math:`\delta=\|x-y\|_\infty\le\|x-y\|_2`; 4800 at :math:`R=1.5`).
    """

    def __init__(self, dim: int, radius: float = 1.5) -> None:
        super().__init__()
        self.dim = _check_dim(dim, 2)
        self.radius = float(radius)
        if not self.radius > 0:
            raise ValueError(f"radius must be > 0, got {radius!r}")
        self.name = "rosenbrock"
        r = self.radius
        self.ell = 1200.0 * r * r + 1200.0 * r + 202.0
        self.rho = 2400.0 * r + 1200.0
        self.f_star = 0.0
        self.has_saddle = False

    def value(self, x: Array) -> Array:
        xp = array_namespace(x)
        a = x[:-1]
        r = x[1:] - a * a
        return xp.sum(100.0 * r * r + (1.0 - a) * (1.0 - a))

    def _zero(self, xp: Any, x: Array) -> Array:
        return xp.zeros((1,), dtype=x.dtype, device=device(x))

    def grad(self, x: Array) -> Array:
        xp = array_namespace(x)
        a = x[:-1]
        r = x[1:] - a * a
        z = self._zero(xp, x)
        ga = -400.0 * a * r - 2.0 * (1.0 - a)
        return xp.concat([ga, z]) + xp.concat([z, 200.0 * r])

    def _diagonals(self, xp: Any, x: Array) -> tuple[Array, Array]:
        a = x[:-1]
        b = x[1:]
        z = self._zero(xp, x)
        diag = xp.concat([1200.0 * a * a - 400.0 * b + 2.0, z]) + xp.concat(
            [z, xp.full_like(b, 200.0)]
        )
        return diag, -400.0 * a

    def hvp(self, x: Array, v: Array) -> Array:
        xp = array_namespace(x, v)
        diag, off = self._diagonals(xp, x)
        z = self._zero(xp, x)
        return diag * v + xp.concat([off * v[1:], z]) + xp.concat([z, off * v[:-1]])

    def hess(self, x: Array) -> Array:
        xp = array_namespace(x)
        dev = device(x)
        diag, off = self._diagonals(xp, x)
        col = xp.reshape(xp.concat([off, self._zero(xp, x)]), (self.dim, 1))
        upper = xp.eye(self.dim, k=1, dtype=x.dtype, device=dev) * col
        eye = xp.eye(self.dim, dtype=x.dtype, device=dev)
        return eye * diag + upper + xp.matrix_transpose(upper)

    def saddle(self) -> np.ndarray:
        """The origin: the paper's start, *not* a stationary point (see class doc)."""
        return np.zeros(self.dim)

    def minimizer(self) -> np.ndarray:
        return np.ones(self.dim)


# ---------------------------------------------------------------------------------------
# Random indefinite quadratic
# ---------------------------------------------------------------------------------------


def _haar_orthogonal(rng: np.random.Generator, n: int, k: int | None = None) -> np.ndarray:
    """``n x k`` matrix with orthonormal columns, Haar-distributed (QR with sign fix)."""
    k = n if k is None else k
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return q * signs


class RandomQuadratic(_Base):
    r"""Random indefinite quadratic :math:`f(x)=\tfrac12x^\top Ax+b^\top x`.

    :math:`A = Q\Lambda Q^\top` with :math:`Q` Haar-orthogonal (QR of a Gaussian
    matrix, signs fixed) and :math:`\Lambda` holding ``n_negative`` eigenvalues
    :math:`-1` and :math:`d-` ``n_negative`` eigenvalues uniform in :math:`[0.5, 2]`;
    :math:`b = ` ``b_scale`` :math:`\cdot\mathcal N(0,I)` (default 0).

    The unique stationary point :math:`x_s=-A^{-1}b` (the origin for ``b = 0``) is a
    strict saddle with :math:`\lambda_{\min}(A)=-1` when ``n_negative > 0``; ``f`` is
    then unbounded below along the negative eigenvectors, so ``f_star`` is ``None``
    (for ``n_negative = 0`` it is convex and ``f_star`` is
    :math:`-\tfrac12b^\top A^{-1}b`). This is the linearised saddle-escape model of
    PSD (Alpay & Alakkad 2025, arXiv:2508.16540).

    Constants: ``ell`` :math:`=\max_i|\lambda_i|` (exact, global). The Hessian is
    constant so the true Hessian-Lipschitz constant is 0, but the PSD formulas divide by
    :math:`\rho`; ``rho = 1.0`` is an **assumed** placeholder (``rho_assumed = True``),
    override it to study the dependence.
    """

    def __init__(self, dim: int, seed: int = 0, n_negative: int = 1, b_scale: float = 0.0) -> None:
        super().__init__()
        self.dim = _check_dim(dim)
        n_negative = _check_dim(n_negative, 0, "n_negative")
        if n_negative > self.dim:
            raise ValueError(f"n_negative={n_negative} exceeds dim={self.dim}")
        self.n_negative = n_negative
        self.seed = seed
        self.b_scale = float(b_scale)
        rng = np.random.default_rng(seed)
        eig = np.concatenate([-np.ones(n_negative), rng.uniform(0.5, 2.0, self.dim - n_negative)])
        q = _haar_orthogonal(rng, self.dim)
        a = (q * eig) @ q.T
        self.A = 0.5 * (a + a.T)
        self.eigvals = np.sort(eig)
        self.b = self.b_scale * rng.standard_normal(self.dim)
        self.name = "random_quadratic"
        self.ell = float(np.max(np.abs(eig)))
        self.rho = 1.0
        self.rho_assumed = True
        self.has_saddle = n_negative > 0
        self._x_s = np.linalg.solve(self.A, -self.b)
        self.f_star = None if n_negative > 0 else float(0.5 * self.b @ self._x_s)

    def value(self, x: Array) -> Array:
        xp = array_namespace(x)
        a = self._const("A", self.A, x)
        b = self._const("b", self.b, x)
        return 0.5 * xp.sum(x * (a @ x)) + xp.sum(b * x)

    def grad(self, x: Array) -> Array:
        return self._const("A", self.A, x) @ x + self._const("b", self.b, x)

    def hvp(self, x: Array, v: Array) -> Array:
        return self._const("A", self.A, x) @ v

    def hess(self, x: Array) -> Array:
        return self._const("A", self.A, x)

    def saddle(self) -> np.ndarray:
        """The stationary point :math:`-A^{-1}b` (the origin when ``b_scale == 0``)."""
        return self._x_s.copy()


# ---------------------------------------------------------------------------------------
# Gaussian wells
# ---------------------------------------------------------------------------------------

# max_a |3a - a^3| exp(-a^2/2), attained at a^2 = 3 - sqrt(6): sup of the third
# directional derivative of exp(-|z|^2/2).
_A3 = math.sqrt(3.0 - math.sqrt(6.0))
_GAUSS_D3 = abs(3.0 * _A3 - _A3**3) * math.exp(-0.5 * _A3 * _A3)  # ~1.3801


class GaussianWells(_Base):
    r"""Mixture of Gaussian wells :math:`L(x) = -\sum_{p=1}^P A_p
    \exp\!\big(-\|x-\mu_p\|^2/(2\sigma_p^2)\big)`.

    :math:`A_p\sim U[0.5,2]`, :math:`\mu_p\sim U[-3,3]^d`,
    :math:`\sigma_p\sim U[0.5,1.5]` from ``seed`` (exposed as NumPy ``amps``, ``mus``,
    ``sigmas``). With :math:`\Delta_p=x-\mu_p`, :math:`e_p=A_p\exp(-\|\Delta_p\|^2/
    (2\sigma_p^2))`, :math:`w_p=e_p/\sigma_p^2`:

    .. math::
        \nabla L = \sum_p w_p\Delta_p,\qquad
        \nabla^2 L = \Big(\sum_p w_p\Big) I - \sum_p \frac{w_p}{\sigma_p^2}
        \Delta_p\Delta_p^\top.

    **Batched:** ``value``, ``grad``, ``hess``, ``hvp`` and :meth:`nearest_well` also
    accept ``x`` of shape ``(n, d)`` (and ``v`` of shape ``(n, d)`` or ``(d,)``),
    returning shapes ``(n,)``, ``(n, d)``, ``(n, d, d)``, ``(n, d)`` and ``(n,)``;
    vectorized over points and wells.

    At construction a damped Newton descent (NumPy float64) is run from every centre:
    ``local_minima[p]`` / ``local_values[p]`` is where it lands; ``global_well`` is the
    index of the well whose descent reaches the lowest value, ``x_star`` that point and
    ``f_star`` its value. ``f_star`` is therefore *approximate*: the best local minimum
    reachable from a centre (every stationary point is a positively weighted mean of the
    centres, so it lies in their convex hull), not a certified global minimum.
    ``f_star <= min_p L(mu_p)`` always.

    ``saddle()`` is found numerically (computed on first use): from the maximum of
    ``L`` on the segment between the global minimum and another local minimum,
    Levenberg–Marquardt on :math:`\nabla L = 0`; accepted if
    :math:`\|\nabla L\|\le10^{-10}` and :math:`\lambda_{\min}\le-10^{-6}\ell`. If no
    such point exists (e.g. a single basin, or well-separated wells in high
    dimension, where the pass is numerically flat), ``has_saddle`` is ``False`` and
    ``saddle()`` raises ``ValueError``. This is the multi-well benchmark of PSD
    (Alpay & Alakkad 2025, arXiv:2508.16540).

    Constants (global, valid on all of :math:`\mathbb R^d`): each well's Hessian has
    eigenvalues :math:`(A_p/\sigma_p^2)e^{-s}` and :math:`(A_p/\sigma_p^2)e^{-s}
    (1-2s)`, :math:`s=\|\Delta_p\|^2/2\sigma_p^2`, both at most
    :math:`A_p/\sigma_p^2` in modulus, so ``ell`` :math:`=\sum_p A_p/\sigma_p^2`;
    its third derivative satisfies :math:`|T[u,u,u]|\le (A_p/\sigma_p^3)\max_a
    |3a-a^3|e^{-a^2/2}` with the max :math:`\approx1.380` at :math:`a^2=3-\sqrt6`, so
    ``rho`` :math:`=1.380\sum_p A_p/\sigma_p^3` (for symmetric tensors the operator
    norm is the max over :math:`u` of :math:`|T[u,u,u]|`).
    """

    def __init__(self, dim: int, n_wells: int = 5, seed: int = 0) -> None:
        super().__init__()
        self.dim = _check_dim(dim)
        self.n_wells = _check_dim(n_wells, 1, "n_wells")
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.amps = rng.uniform(0.5, 2.0, self.n_wells)
        self.mus = rng.uniform(-3.0, 3.0, (self.n_wells, self.dim))
        self.sigmas = rng.uniform(0.5, 1.5, self.n_wells)
        self._inv_s2 = 1.0 / self.sigmas**2
        self.name = "gaussian_wells"
        self.ell = float(np.sum(self.amps / self.sigmas**2))
        self.rho = float(_GAUSS_D3 * np.sum(self.amps / self.sigmas**3))

        minima = np.stack([self._descend(m) for m in self.mus])
        values = np.asarray(self.value(minima), dtype=np.float64)
        self.local_minima = minima
        self.local_values = values
        self.global_well = int(np.argmin(values))
        self.x_star = minima[self.global_well].copy()
        self.f_star = float(values[self.global_well])
        self._saddle: np.ndarray | None = None
        self._saddle_done = False

    # -- array-API evaluation (single point or batch) ---------------------------------

    def _terms(self, x: Array) -> tuple[Any, Array, Array, Array]:
        xp = array_namespace(x)
        mu = self._const("mus", self.mus, x)
        amps = self._const("amps", self.amps, x)
        inv_s2 = self._const("inv_s2", self._inv_s2, x)
        diff = xp.expand_dims(x, axis=-2) - mu  # (..., P, d)
        r2 = xp.sum(diff * diff, axis=-1)  # (..., P)
        e = amps * xp.exp(-0.5 * r2 * inv_s2)  # (..., P)
        return xp, diff, e, inv_s2

    def value(self, x: Array) -> Array:
        xp, _, e, _ = self._terms(x)
        return -xp.sum(e, axis=-1)

    def grad(self, x: Array) -> Array:
        xp, diff, e, inv_s2 = self._terms(x)
        w = e * inv_s2
        return xp.sum(xp.expand_dims(w, axis=-1) * diff, axis=-2)

    def hvp(self, x: Array, v: Array) -> Array:
        xp, diff, e, inv_s2 = self._terms(x)
        w = e * inv_s2
        dv = xp.sum(diff * xp.expand_dims(v, axis=-2), axis=-1)  # (..., P)
        corr = xp.sum(xp.expand_dims(w * inv_s2 * dv, axis=-1) * diff, axis=-2)
        return xp.expand_dims(xp.sum(w, axis=-1), axis=-1) * v - corr

    def hess(self, x: Array) -> Array:
        xp, diff, e, inv_s2 = self._terms(x)
        w = e * inv_s2
        u = xp.expand_dims(w * inv_s2, axis=-1) * diff  # (..., P, d)
        m = xp.matmul(xp.matrix_transpose(diff), u)  # (..., d, d)
        sw = xp.expand_dims(xp.expand_dims(xp.sum(w, axis=-1), axis=-1), axis=-1)
        eye = xp.eye(self.dim, dtype=x.dtype, device=device(x))
        return sw * eye - m

    def nearest_well(self, x: Array) -> Array:
        """Index of the centre :math:`\\mu_p` closest to each point (integer array).

        A cheap proxy for "which basin is ``x`` in"; shape ``()`` or ``(n,)``.
        """
        xp = array_namespace(x)
        diff = xp.expand_dims(x, axis=-2) - self._const("mus", self.mus, x)
        return xp.argmin(xp.sum(diff * diff, axis=-1), axis=-1)

    def in_well(self, x: Array, index: int) -> Array:
        """Boolean array: is :meth:`nearest_well` equal to ``index``?"""
        return self.nearest_well(x) == index

    # -- NumPy float64 set-up: minima and a saddle --------------------------------------

    def _descend(self, x0: np.ndarray, max_iter: int = 200, tol: float = 1e-11) -> np.ndarray:
        """Damped Newton (gradient step where the Hessian is not PD) with Armijo."""
        x = np.array(x0, dtype=np.float64)
        f = float(self.value(x))
        for _ in range(max_iter):
            g = np.asarray(self.grad(x))
            if np.linalg.norm(g) <= tol:
                break
            h = np.asarray(self.hess(x))
            try:
                np.linalg.cholesky(h)
                p = np.linalg.solve(h, -g)
            except np.linalg.LinAlgError:
                p = -g
            slope = float(g @ p)
            if slope >= 0.0:
                p, slope = -g, -float(g @ g)
            t = 1.0
            while True:
                x_new = x + t * p
                f_new = float(self.value(x_new))
                if f_new <= f + 1e-4 * t * slope or t < 1e-12:
                    break
                t *= 0.5
            if t < 1e-12:
                break
            x, f = x_new, f_new
        return x

    def _stationary(self, x0: np.ndarray, max_iter: int = 200, tol: float = 1e-10):
        """Levenberg–Marquardt on ``grad(x) = 0`` (any stationary point); None if stuck."""
        x = np.array(x0, dtype=np.float64)
        g = np.asarray(self.grad(x))
        ng = float(np.linalg.norm(g))
        eye = np.eye(self.dim)
        h = np.asarray(self.hess(x))
        lam = 1e-3 * max(float(np.sum(h * h)), 1e-300)
        for _ in range(max_iter):
            if ng <= tol:
                return x
            h = np.asarray(self.hess(x))
            p = np.linalg.solve(h @ h + lam * eye, -h @ g)
            x_new = x + p
            g_new = np.asarray(self.grad(x_new))
            ng_new = float(np.linalg.norm(g_new))
            if ng_new < ng:
                x, g, ng = x_new, g_new, ng_new
                lam = max(lam * 0.1, 1e-300)
            else:
                lam *= 10.0
                if lam > 1e12:
                    return None
        return x if ng <= tol else None

    def _find_saddle(self) -> np.ndarray | None:
        xg = self.x_star
        others = [
            m
            for m in self.local_minima
            if np.linalg.norm(m - xg) > 1e-6 * max(1.0, float(np.linalg.norm(xg)))
        ]
        others.sort(key=lambda m: float(np.linalg.norm(m - xg)))
        ts = np.linspace(0.0, 1.0, 257)[:, None]
        for m in others:
            pts = xg + ts * (m - xg)
            start = pts[int(np.argmax(np.asarray(self.value(pts))))]
            xs = self._stationary(start)
            if xs is None:
                continue
            lam_min = float(np.linalg.eigvalsh(np.asarray(self.hess(xs)))[0])
            if lam_min <= -1e-6 * self.ell:
                return xs
        return None

    @property
    def has_saddle(self) -> bool:  # type: ignore[override]
        return self._get_saddle() is not None

    def _get_saddle(self) -> np.ndarray | None:
        if not self._saddle_done:
            self._saddle = self._find_saddle()
            self._saddle_done = True
        return self._saddle

    def saddle(self) -> np.ndarray:
        """A numerically found strict saddle between the global and another minimum."""
        s = self._get_saddle()
        if s is None:
            raise ValueError(
                f"gaussian_wells(dim={self.dim}, n_wells={self.n_wells}, seed={self.seed}): "
                "no strict saddle found between the local minima"
            )
        return s.copy()


# ---------------------------------------------------------------------------------------
# Ridge / least-squares regression (finite sum)
# ---------------------------------------------------------------------------------------


class RidgeRegression(_Base):
    r"""Finite-sum ridge regression :math:`f(x)=\frac1{2n}\|Ax-y\|^2+\frac{\lambda}2
    \|x\|^2 = \frac1n\sum_{i=1}^n f_i(x)`, :math:`f_i(x)=\tfrac12(a_i^\top x-y_i)^2+
    \tfrac\lambda2\|x\|^2` (:math:`\lambda` = ``reg``).

    :math:`A=U\operatorname{diag}(s)V^\top` with Haar :math:`U\in\mathbb R^{n\times r}`,
    :math:`V\in\mathbb R^{d\times r}` (:math:`r=\min(n,d)`) and
    :math:`s_k^2/n` = ``np.geomspace(1, 1/cond, r)``, so the nonzero eigenvalues of
    :math:`A^\top A/n` run from exactly 1 down to ``1/cond``: for :math:`n\ge d` the
    condition number of :math:`A^\top A/n` is exactly ``cond`` (with ``reg > 0`` the
    Hessian's is :math:`(1+\lambda)/(1/\mathrm{cond}+\lambda)`; for :math:`n<d`,
    :math:`A^\top A/n` is singular and ``cond`` refers to its range).
    ``x_true`` :math:`\sim\mathcal N(0,I)`; :math:`y=Ax_{\rm true}` if ``consistent``
    (interpolation: every :math:`f_i(x_{\rm true})=0`, ``f_star = 0`` when ``reg == 0``),
    else :math:`y = Ax_{\rm true}+` ``noise`` :math:`\cdot\mathcal N(0,I)`.

    ``cond_A`` (keyword, default ``None``): the setup of Oikonomou & Loizou (ICML 2025)
    and the ``sam_sps`` repository, a square symmetric :math:`A = PP^\top` (``n == d``
    required) with :math:`\kappa(A)` = ``cond_A``: :math:`A = U\operatorname{diag}(s)U^\top`,
    :math:`s_k^2/n` = ``np.geomspace(1, 1/cond_A**2, n)``, so the Hessian
    :math:`A^\top A/n` has condition number ``cond_A**2`` (``cond`` is then ignored).

    Attributes: ``A``, ``y``, ``x_true``, ``n`` (NumPy / int); ``mu`` =
    :math:`\lambda_{\min}(\nabla^2 f)`, ``L`` = :math:`\lambda_{\max}(\nabla^2 f)`,
    ``L_max`` = :math:`\max_i\|a_i\|^2+\lambda` (the largest smoothness constant of the
    :math:`f_i`, used by SPS / SAM-SPS, Oikonomou & Loizou); ``x_opt`` a
    minimizer (``x_true`` in the interpolating full-rank case, otherwise the
    least-squares / ridge solution, minimum-norm if not unique) and ``f_star = f(x_opt)``.

    Mini-batches: :meth:`value_batch`, :meth:`grad_batch`, :meth:`hvp_batch` take an
    integer index array (NumPy, list, or the caller's namespace) and average the
    :math:`f_i` over it (repeats allowed).

    Constants: ``ell = L`` (exact, global); the Hessian is constant, so ``rho = 1.0`` is
    an **assumed** placeholder (``rho_assumed = True``). Convex: ``has_saddle`` is
    ``False`` and ``saddle()`` returns the origin as the default start.
    """

    def __init__(
        self,
        n: int = 100,
        d: int = 100,
        cond: float = 10.0,
        seed: int = 0,
        consistent: bool = True,
        reg: float = 0.0,
        noise: float = 0.1,
        *,
        cond_A: float | None = None,
    ) -> None:
        super().__init__()
        self.n = _check_dim(n, 1, "n")
        self.dim = _check_dim(d, 1, "d")
        self.cond = float(cond)
        if not self.cond >= 1.0:
            raise ValueError(f"cond must be >= 1, got {cond!r}")
        self.reg = float(reg)
        if not self.reg >= 0.0:
            raise ValueError(f"reg must be >= 0, got {reg!r}")
        self.seed = seed
        self.consistent = bool(consistent)
        self.noise = float(noise)
        rng = np.random.default_rng(seed)
        r = min(self.n, self.dim)
        self.cond_A = None if cond_A is None else float(cond_A)
        if self.cond_A is None:
            u = _haar_orthogonal(rng, self.n, r)
            v = _haar_orthogonal(rng, self.dim, r)
            lam = np.geomspace(1.0, 1.0 / self.cond, r)
        else:
            if not self.cond_A >= 1.0:
                raise ValueError(f"cond_A must be >= 1, got {cond_A!r}")
            if self.n != self.dim:
                raise ValueError(f"cond_A needs a square A (n == d), got n={n!r}, d={d!r}")
            self.cond = self.cond_A**2
            u = v = _haar_orthogonal(rng, self.n, r)
            lam = np.geomspace(1.0, 1.0 / self.cond, r)
        self.A = (u * np.sqrt(self.n * lam)) @ v.T
        self.x_true = rng.standard_normal(self.dim)
        self.y = self.A @ self.x_true
        if not self.consistent:
            self.y = self.y + self.noise * rng.standard_normal(self.n)
        self.name = "ridge"
        self.L = float(lam[0]) + self.reg
        self.mu = (float(lam[-1]) if self.n >= self.dim else 0.0) + self.reg
        self.L_max = float(np.max(np.sum(self.A * self.A, axis=1))) + self.reg
        self.ell = self.L
        self.rho = 1.0
        self.rho_assumed = True
        self.has_saddle = False
        if self.consistent and self.reg == 0.0:
            self.x_opt = (
                self.x_true.copy()
                if self.n >= self.dim
                else np.linalg.lstsq(self.A, self.y, rcond=None)[0]
            )
            self.f_star: float | None = 0.0
        else:
            if self.reg > 0.0:
                h = self.A.T @ self.A / self.n + self.reg * np.eye(self.dim)
                self.x_opt = np.linalg.solve(h, self.A.T @ self.y / self.n)
            else:
                self.x_opt = np.linalg.lstsq(self.A, self.y, rcond=None)[0]
            self.f_star = float(self.value(self.x_opt))

    def _ay(self, x: Array) -> tuple[Array, Array]:
        return self._const("A", self.A, x), self._const("y", self.y, x)

    def _reg_value(self, xp: Any, x: Array) -> Array | float:
        return 0.5 * self.reg * xp.sum(x * x) if self.reg else 0.0

    def value(self, x: Array) -> Array:
        xp = array_namespace(x)
        a, y = self._ay(x)
        r = a @ x - y
        return (0.5 / self.n) * xp.sum(r * r) + self._reg_value(xp, x)

    def grad(self, x: Array) -> Array:
        a, y = self._ay(x)
        g = ((a @ x - y) @ a) / self.n
        return g + self.reg * x if self.reg else g

    def hvp(self, x: Array, v: Array) -> Array:
        a = self._const("A", self.A, x)
        hv = ((a @ v) @ a) / self.n
        return hv + self.reg * v if self.reg else hv

    def hess(self, x: Array) -> Array:
        xp = array_namespace(x)
        a = self._const("A", self.A, x)
        h = (xp.matrix_transpose(a) @ a) / self.n
        if self.reg:
            h = h + self.reg * xp.eye(self.dim, dtype=x.dtype, device=device(x))
        return h

    def _rows(self, x: Array, idx: Any) -> tuple[Any, Array, Array, int]:
        xp = array_namespace(x)
        idx = xp.asarray(idx, device=device(x))
        a, y = self._ay(x)
        m = int(idx.shape[0])
        if m == 0:
            raise ValueError("empty mini-batch")
        return xp, xp.take(a, idx, axis=0), xp.take(y, idx, axis=0), m

    def value_batch(self, x: Array, idx: Any) -> Array:
        r"""Mini-batch value :math:`\frac1{|B|}\sum_{i\in B} f_i(x)`."""
        xp, a, y, m = self._rows(x, idx)
        r = a @ x - y
        return (0.5 / m) * xp.sum(r * r) + self._reg_value(xp, x)

    def grad_batch(self, x: Array, idx: Any) -> Array:
        r"""Mini-batch gradient :math:`\frac1{|B|}\sum_{i\in B}\nabla f_i(x)`."""
        _, a, y, m = self._rows(x, idx)
        g = ((a @ x - y) @ a) / m
        return g + self.reg * x if self.reg else g

    def hvp_batch(self, x: Array, v: Array, idx: Any) -> Array:
        """Mini-batch Hessian-vector product."""
        _, a, _, m = self._rows(x, idx)
        hv = ((a @ v) @ a) / m
        return hv + self.reg * v if self.reg else hv

    def saddle(self) -> np.ndarray:
        """The origin (no saddle: the problem is convex)."""
        return np.zeros(self.dim)


# ---------------------------------------------------------------------------------------
# Constructors and registry
# ---------------------------------------------------------------------------------------


def separable_quartic(dim: int) -> SeparableQuartic:
    r""":math:`\sum_i (x_i^4 - x_i^2)`; see :class:`SeparableQuartic`."""
    return SeparableQuartic(dim)


def coupled_quartic(dim: int, coupling: float = 0.1) -> CoupledQuartic:
    r""":math:`\sum_i (x_i^4-x_i^2)+c\sum_{i<j}x_ix_j`; see :class:`CoupledQuartic`."""
    return CoupledQuartic(dim, coupling)


def rosenbrock(dim: int, radius: float = 1.5) -> Rosenbrock:
    """Rosenbrock; ``radius`` sets the box for ``ell``/``rho``. See :class:`Rosenbrock`."""
    return Rosenbrock(dim, radius)


def random_quadratic(
    dim: int, seed: int = 0, n_negative: int = 1, b_scale: float = 0.0
) -> RandomQuadratic:
    r""":math:`\tfrac12x^\top Ax+b^\top x`, indefinite; see :class:`RandomQuadratic`."""
    return RandomQuadratic(dim, seed=seed, n_negative=n_negative, b_scale=b_scale)


def gaussian_wells(dim: int, n_wells: int = 5, seed: int = 0) -> GaussianWells:
    """Negative Gaussian mixture (batched); see :class:`GaussianWells`."""
    return GaussianWells(dim, n_wells=n_wells, seed=seed)


def ridge_regression(
    n: int = 100,
    d: int = 100,
    cond: float = 10.0,
    seed: int = 0,
    consistent: bool = True,
    reg: float = 0.0,
    noise: float = 0.1,
    *,
    cond_A: float | None = None,
) -> RidgeRegression:
    r"""Finite-sum ridge regression with mini-batches; see :class:`RidgeRegression`
    (``cond_A``: the SAM-SPS paper's :math:`A = PP^\top` with :math:`\kappa(A)` = ``cond_A``)."""
    return RidgeRegression(
        n=n, d=d, cond=cond, seed=seed, consistent=consistent, reg=reg, noise=noise, cond_A=cond_A
    )


PROBLEMS: dict[str, Callable[..., Any]] = {
    "quartic": separable_quartic,
    "coupled_quartic": coupled_quartic,
    "rosenbrock": rosenbrock,
    "random_quadratic": random_quadratic,
    "gaussian_wells": gaussian_wells,
    "ridge": ridge_regression,
}
"""Name -> constructor. Each instance's ``name`` is its key here. Signatures differ:
all take the dimension first except ``ridge`` (``n`` samples first, then ``d``)."""
