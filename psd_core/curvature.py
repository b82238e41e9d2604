r"""Curvature probes: detecting and following negative curvature.

Curvature along a unit direction :math:`v` (a Rayleigh quotient) from

* an exact Hessian-vector product: :math:`q(v) = \langle v, Hv\rangle`
  (:func:`rayleigh_hvp`);
* gradients only: :math:`q(v) = \langle v, \nabla f(x+hv) - \nabla f(x-hv)\rangle/(2h)`
  (central, :func:`rayleigh_grad_diff`; forward differences with ``central=False``);
* function values only: :math:`q(v) = (f(x+hv) - 2f(x) + f(x-hv))/h^2`
  (:func:`rayleigh_values`).

:func:`random_probe_test` is the PSD-Probe test (minimum of :math:`q` over
:math:`m` random unit probes). Random probes see the *average* eigenvalue, so in
high dimension they rarely detect a single negative direction;
:func:`min_curvature` instead finds :math:`\lambda_{\min}` and its eigenvector with
``iters`` Hessian-vector products by Lanczos with full reorthogonalization
(memory :math:`O(d\cdot k)`).

Vectors are trees (lists of arrays) or single arrays. Everything is pure
``xp`` code with static loop counts, so it traces under ``jax.jit``.

References:
    Alpay & Alakkad, *Escaping Saddle Points via Curvature-Calibrated Perturbations: A
    Complete Analysis with Explicit Constants and Empirical Validation*, 2025,
    arXiv:2508.16540 (PSD-Probe).
    Lanczos, 1950; Paige, 1972 (Lanczos with reorthogonalization).
    Xu, Jin, Yang, *First-order stochastic algorithms for escaping from saddle points
    in almost linear time*, NeurIPS 2018 (negative-curvature finding from gradients).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ._array import (
    Array,
    as_scalar,
    namespace,
    tree_dot,
    tree_lincomb,
    tree_sq_norm,
)
from .validation import check_int, check_positive

__all__ = [
    "MinCurvature",
    "ProbeResult",
    "hvp_from_grad",
    "is_strict_saddle",
    "min_curvature",
    "negative_curvature_step",
    "random_probe_test",
    "rayleigh_grad_diff",
    "rayleigh_hvp",
    "rayleigh_values",
]


def _as_tree(x: Any) -> tuple[list[Array], bool]:
    if isinstance(x, list | tuple):
        return list(x), True
    return [x], False


def _from_tree(t: list[Array], was_tree: bool) -> Any:
    return t if was_tree else t[0]


def _add(x: list[Array], v: list[Array], h: Any) -> list[Array]:
    return tree_lincomb([1.0, h], [x, v])


def rayleigh_hvp(hvp: Callable[[Any, Any], Any], x: Any, v: Any) -> Array:
    r""":math:`\langle v, H v\rangle / \langle v, v\rangle` from a Hessian-vector product ``hvp(x, v)``."""
    xt, _ = _as_tree(x)
    vt, was = _as_tree(v)
    hv, _ = _as_tree(hvp(x, v))
    return tree_dot(vt, hv) / tree_sq_norm(vt)


def rayleigh_grad_diff(
    grad: Callable[[Any], Any],
    x: Any,
    v: Any,
    h: float,
    *,
    central: bool = True,
    grad_x: Any = None,
) -> Array:
    r"""Curvature along unit ``v`` from gradient differences.

    Central: :math:`\langle v, \nabla f(x+hv) - \nabla f(x-hv)\rangle/(2h)` (2 gradients,
    error :math:`O(\rho h^2)`... for cubic terms :math:`O(h^2)`). Forward (the paper's
    formula): :math:`\langle v, \nabla f(x+hv) - \nabla f(x)\rangle/h` (1 gradient when
    ``grad_x`` is given, error :math:`O(\rho h)`).
    """
    h = check_positive("h", h)
    xt, was = _as_tree(x)
    vt, _ = _as_tree(v)
    gp, _ = _as_tree(grad(_from_tree(_add(xt, vt, h), was)))
    if central:
        gm, _ = _as_tree(grad(_from_tree(_add(xt, vt, -h), was)))
        return (tree_dot(vt, gp) - tree_dot(vt, gm)) / (2.0 * h)
    g0, _ = _as_tree(grad(x) if grad_x is None else grad_x)
    return (tree_dot(vt, gp) - tree_dot(vt, g0)) / h


def rayleigh_values(
    f: Callable[[Any], Array], x: Any, v: Any, h: float, *, f_x: Array | None = None
) -> Array:
    r"""Curvature along unit ``v`` from function values only: :math:`(f(x+hv) - 2f(x) + f(x-hv))/h^2`."""
    h = check_positive("h", h)
    xt, was = _as_tree(x)
    vt, _ = _as_tree(v)
    fp = f(_from_tree(_add(xt, vt, h), was))
    fm = f(_from_tree(_add(xt, vt, -h), was))
    f0 = f(x) if f_x is None else f_x
    return (fp - 2.0 * f0 + fm) / (h * h)


def hvp_from_grad(grad: Callable[[Any], Any], h: float) -> Callable[[Any, Any], Any]:
    r"""A Hessian-vector product from gradients only: :math:`Hv \approx (\nabla f(x+hv) - \nabla f(x-hv))/(2h)`.

    The returned ``hvp(x, v)`` costs two gradient evaluations; ``v`` need not be
    unit (it is scaled internally so the step is ``h`` in norm... exactly ``h v``).
    """
    h = check_positive("h", h)

    def hvp(x: Any, v: Any) -> Any:
        xt, was = _as_tree(x)
        vt, _ = _as_tree(v)
        gp, _ = _as_tree(grad(_from_tree(_add(xt, vt, h), was)))
        gm, _ = _as_tree(grad(_from_tree(_add(xt, vt, -h), was)))
        return _from_tree(tree_lincomb([0.5 / h, -0.5 / h], [gp, gm]), was)

    return hvp


def is_strict_saddle(lambda_min: Array, gamma: Any) -> Array:
    r"""Bool 0-d: :math:`\lambda_{\min} < -\gamma` (the PSD curvature test fails, so perturb)."""
    return lambda_min < -as_scalar(gamma, lambda_min)


class ProbeResult(NamedTuple):
    min_curvature: Array
    """Smallest probed curvature :math:`\\min_k q(v_k)` (0-d)."""
    index: Array
    """Index of the probe that attained it (0-d int)."""
    direction: Any
    """That probe direction (a tree or array like the probes)."""
    curvatures: Array
    """All probed curvatures, shape ``(m,)``."""


def random_probe_test(curvature_fn: Callable[[Any], Array], probes: Sequence[Any]) -> ProbeResult:
    """The PSD-Probe test: evaluate ``curvature_fn(v)`` on each unit probe and take the minimum.

    Args:
        curvature_fn: ``v -> q(v)``, e.g. ``lambda v: rayleigh_grad_diff(grad, x, v, h)``.
        probes: ``m`` unit directions (explicit draws, e.g. from
            :meth:`psd_core.HostDraws.unit_vector_like`).

    The selection of the minimizing direction uses ``xp.where`` (no host read).
    """
    if len(probes) == 0:
        raise ValueError("random_probe_test: probes is empty (need m >= 1)")
    qs = [curvature_fn(v) for v in probes]
    xp = namespace(*qs)
    q = xp.stack(qs)
    idx = xp.argmin(q)
    best = xp.min(q)
    first, was = _as_tree(probes[0])
    direction = [xp.zeros_like(leaf) for leaf in first]
    for k, v in enumerate(probes):
        vt, _ = _as_tree(v)
        sel = idx == k
        direction = [xp.where(sel, a, d) for a, d in zip(vt, direction)]
    return ProbeResult(
        min_curvature=best, index=idx, direction=_from_tree(direction, was), curvatures=q
    )


def negative_curvature_step(grad: Any, direction: Any, step: Any) -> Any:
    r"""The PSD-Probe move :math:`\alpha s v` with :math:`s = \pm 1` chosen so that
    :math:`\langle g, s v\rangle \le 0` (never uphill to first order)."""
    gt, was = _as_tree(grad)
    vt, _ = _as_tree(direction)
    d = tree_dot(gt, vt)
    xp = namespace(d)
    sign = xp.where(d > 0, -xp.ones_like(d), xp.ones_like(d))
    return _from_tree(tree_lincomb([as_scalar(step, d) * sign], [vt]), was)


class MinCurvature(NamedTuple):
    value: Array
    """Estimate of :math:`\\lambda_{\\min}(\\nabla^2 f(x))` (0-d), the smallest Ritz value."""
    direction: Any
    """Unit Ritz vector for it (a tree or array like ``x``)."""
    hvps: int
    """Hessian-vector products used."""
    ritz_values: Array
    """Ritz values, shape ``(k,)``: the ``krylov_dim`` valid ones in ascending order,
    then NaN for the steps after the Krylov space was exhausted (never a made-up value)."""
    krylov_dim: Array | None = None
    """Number of Lanczos vectors actually built (0-d int, ``1 <= krylov_dim <= k``):
    the number of valid entries of ``ritz_values``. Smaller than ``k`` when the
    Krylov space became invariant (breakdown) and the iteration stopped."""


_BREAKDOWN_FACTOR = 64.0
"""Default breakdown tolerance of :func:`min_curvature`, in units of the vectors'
machine epsilon times the running estimate of :math:`\\|H\\|`."""


def _finfo_eps(xp: Any, tree: list[Array]) -> float:
    """Largest machine epsilon over the leaves' floating dtypes (static)."""
    eps = 0.0
    for leaf in tree:
        if xp.isdtype(leaf.dtype, "real floating"):
            eps = max(eps, float(xp.finfo(leaf.dtype).eps))
    return eps if eps > 0 else float(xp.finfo(xp.float64).eps)


def min_curvature(
    hvp: Callable[[Any, Any], Any],
    x: Any,
    *,
    iters: int,
    seed: int | None = 0,
    v0: Any = None,
    tol: float | None = None,
) -> MinCurvature:
    r"""Estimate :math:`\lambda_{\min}` of the Hessian at ``x`` and its direction with ``iters`` HVPs.

    Lanczos with full reorthogonalization: builds an orthonormal Krylov basis
    :math:`V_k` and the tridiagonal :math:`T_k = V_k^\top H V_k`, then returns the
    smallest eigenvalue of :math:`T_k` and :math:`V_k y`. With ``iters = d`` the
    estimate equals :math:`\lambda_{\min}` up to rounding; a few dozen iterations
    usually resolve the extreme eigenvalues.

    Each new vector :math:`w = Hv_j` is orthogonalized against the whole basis by
    classical Gram-Schmidt, twice. The iteration *stops* (breakdown: the Krylov space
    is invariant, up to rounding) when either

    * :math:`\beta_j = \|w\| \le \tau\,\varepsilon\,s_j`, with :math:`\varepsilon`
      the machine epsilon of the vectors' dtype (float32: :math:`1.2\cdot 10^{-7}`),
      :math:`s_j` the largest :math:`|\alpha_i|`, :math:`\beta_i`, :math:`\|Hv_i\|`
      seen so far (a lower bound of :math:`\|H\|`) and :math:`\tau` = ``tol``
      (default 64; for 16-bit vectors the default threshold is capped at
      :math:`\sqrt{\varepsilon}\,s_j`, since bfloat16's :math:`64\varepsilon = 0.5`
      would stop after one step): what is left of :math:`w` is rounding noise; or
    * the second Gram-Schmidt pass removes more than half of :math:`\|w\|^2` (Kahan's
      "twice is enough" test): :math:`w` lies numerically in the span of the basis,
      and normalizing it would break orthogonality.

    After a breakdown no new direction is made from rounding noise: the remaining
    steps are masked off (fixed shapes, ``xp.where``; the HVPs are still evaluated,
    on zero vectors, so the loop traces under ``jax.jit``) and their Ritz values are
    reported as NaN; ``krylov_dim`` counts the valid ones.

    Args:
        hvp: ``hvp(x, v) -> H v`` (exact, e.g. by autodiff, or :func:`hvp_from_grad`).
        x: the point (tree or array).
        iters: number of Lanczos steps / HVPs, ``1 <= iters``; capped at ``d``.
        seed: seed of the start vector (drawn on the host with NumPy and converted to
            ``x``'s namespace); ignored when ``v0`` is given.
        v0: explicit start vector (tree or array like ``x``).
        tol: breakdown tolerance :math:`\tau` in units of machine epsilon times the
            scale estimate (keyword-only, default 64, with the threshold capped at
            :math:`\sqrt{\varepsilon}` relative for 16-bit dtypes; an explicit ``tol`` is
            used as given). Raise it for a noisy ``hvp``
            (e.g. :func:`hvp_from_grad` with a small ``h``).

    Returns:
        A :class:`MinCurvature`.
    """
    iters = check_int("iters", iters, minimum=1)
    tau = _BREAKDOWN_FACTOR if tol is None else check_positive("tol", tol)
    xt, was = _as_tree(x)
    xp = namespace(xt)
    from ._array import tree_size

    dim = tree_size(xt)
    k = min(iters, dim)
    if v0 is None:
        from .random import HostDraws

        vt = HostDraws(seed).normals_like(xt)
    else:
        vt, _ = _as_tree(v0)
    eps = _finfo_eps(xp, list(xt) + list(vt))
    # default: 64 eps, capped at sqrt(eps) (active for 16-bit vectors only: bfloat16's
    # 64 eps = 0.5 would call a Krylov space invariant after one step)
    rel = tau * eps if tol is not None else min(tau * eps, math.sqrt(eps))
    like = tree_sq_norm(vt)
    v = tree_lincomb([1.0 / xp.sqrt(like)], [vt])
    basis: list[list[Array]] = [v]
    alphas: list[Array] = []
    betas: list[Array] = []
    alive: list[Array] = [xp.ones_like(like) > 0]
    zero = xp.zeros_like(like)
    scale = zero
    for j in range(k):
        w, _ = _as_tree(hvp(_from_tree(xt, was), _from_tree(basis[j], was)))
        a = tree_dot(basis[j], w)
        alphas.append(a)
        scale = xp.maximum(scale, xp.maximum(xp.abs(a), xp.sqrt(tree_sq_norm(w))))
        if j == k - 1:
            break
        # w <- w - V (V^T w), twice (classical Gram-Schmidt with reorthogonalization)
        norms = []
        for _ in range(2):
            coeffs = [tree_dot(b, w) for b in basis]
            w = tree_lincomb([1.0] + [-c for c in coeffs], [w] + basis)
            norms.append(tree_sq_norm(w))
        b2 = norms[1]
        beta = xp.sqrt(b2)
        scale = xp.maximum(scale, beta)
        ok = alive[-1] & (beta > as_scalar(rel, beta) * scale) & (2.0 * b2 > norms[0])
        safe_beta = xp.where(ok, beta, xp.ones_like(beta))
        nxt = [xp.where(ok, leaf / as_scalar(safe_beta, leaf), xp.zeros_like(leaf)) for leaf in w]
        betas.append(xp.where(ok, beta, zero))
        alive.append(ok)
        basis.append(nxt)
    n = len(alphas)
    dev = _device(like)
    # Tridiagonal T. A dead row is decoupled (zero off-diagonals) and gets the diagonal
    # 4 s > 3 s >= every live Ritz value (Gershgorin), so dead rows sort last.
    big = 4.0 * scale
    diag = xp.stack([xp.where(alive[i], alphas[i], big) for i in range(n)])
    eye = xp.eye(n, dtype=diag.dtype, device=dev)
    T = eye * diag[None, :]
    if n > 1:
        off = xp.concat([xp.stack(betas), xp.zeros((1,), dtype=diag.dtype, device=dev)])
        # Off-diagonals without item assignment: T += B + B^T with B[i, i+1] = beta_i.
        upper = xp.concat([xp.zeros((n, 1), dtype=diag.dtype, device=dev), eye[:, :-1]], axis=1)
        B = upper * off[:, None]
        T = T + B + xp.permute_dims(B, (1, 0))
    evals, evecs = xp.linalg.eigh(T)
    krylov_dim = xp.sum(xp.astype(xp.stack(alive), xp.int32))  # k is small: int32 suffices
    index = xp.arange(n, dtype=xp.int32, device=dev)
    ritz = xp.where(index < krylov_dim, evals, xp.full_like(evals, float("nan")))
    y = evecs[:, 0]
    coeffs = [y[i] for i in range(n)]
    direction = tree_lincomb(coeffs, basis[:n])
    nrm = xp.sqrt(tree_sq_norm(direction))
    direction = tree_lincomb([1.0 / nrm], [direction])
    return MinCurvature(
        value=evals[0],
        direction=_from_tree(direction, was),
        hvps=n,
        ritz_values=ritz,
        krylov_dim=krylov_dim,
    )


def _device(a: Array) -> Any:
    from array_api_compat import device

    return device(a)
