r"""Pure update rules of the classical baselines (the optimization-in-many-dimensions notebook).

Each function takes arrays and returns new arrays. They act on the last axis, so
``x`` may be one point of shape ``(d,)`` or a batch of independent points of
shape ``(n, d)`` (Hessians ``(n, d, d)``): the bakeoff runs 500 starts as one
batch this way.

* gradient descent :math:`x^+ = x - \eta g`
* heavy-ball momentum :math:`v^+ = \beta v - \eta g,\ x^+ = x + v^+`
* Langevin-noise GD :math:`x^+ = x - \eta(g + \sigma\xi)`, :math:`\xi \sim N(0, I)` given explicitly
* damped Newton :math:`x^+ = x - \eta (H + \mu I)^{-1} g`
* condition-scaled GD :math:`x^+ = x - (\eta/\|H\|_F)\, g` (step scaled by the local curvature
  scale; :math:`\|H\|_F \ge \lambda_{\max}(|H|)`, so :math:`\eta \le 1` is stable)
* BFGS inverse-Hessian update
  :math:`H^+ = (I - \rho s y^\top) H (I - \rho y s^\top) + \rho s s^\top`, :math:`\rho = 1/y^\top s`
  (skipped where :math:`y^\top s \le 10^{-12}`, keeping :math:`H` positive definite)

Adam uses :func:`psd_core.perturbation.adam_moments` and
:func:`psd_core.perturbation.adam_direction`.

References:
    Polyak, 1964 (momentum); Nocedal & Wright, *Numerical Optimization*, 2006, §6.1 (BFGS);
    Welling & Teh, 2011 (Langevin dynamics).
"""

from __future__ import annotations

from typing import Any

from ._array import Array, as_scalar, namespace

__all__ = [
    "bfgs_direction",
    "bfgs_inverse_update",
    "condition_scaled_step",
    "gd_step",
    "langevin_step",
    "momentum_step",
    "newton_step",
    "row_sq_norm",
]


def _col(c: Array, like: Array) -> Array:
    """Make a per-row scalar broadcast against ``(..., d)``."""
    xp = namespace(like)
    c = as_scalar(c, like)
    if c.ndim > 0:
        c = xp.reshape(c, tuple(c.shape) + (1,))
    return c


def row_sq_norm(x: Array) -> Array:
    """Squared norm over the last axis: shape ``()`` for ``(d,)``, ``(n,)`` for ``(n, d)``."""
    xp = namespace(x)
    return xp.sum(x * x, axis=-1)


def gd_step(x: Array, g: Array, lr: Any) -> Array:
    r""":math:`x - \eta g`."""
    return x - _col(lr, x) * g


def momentum_step(x: Array, v: Array, g: Array, lr: Any, beta: Any) -> tuple[Array, Array]:
    r"""Heavy ball: :math:`v^+ = \beta v - \eta g`, :math:`x^+ = x + v^+`. Returns ``(x+, v+)``."""
    v_new = _col(beta, v) * v - _col(lr, g) * g
    return x + v_new, v_new


def langevin_step(x: Array, g: Array, noise: Array, lr: Any, sigma: Any) -> Array:
    r""":math:`x - \eta(g + \sigma\xi)` with explicit standard normal draws ``noise``."""
    return x - _col(lr, x) * (g + _col(sigma, x) * noise)


def _solve(H: Array, g: Array) -> Array:
    xp = namespace(H)
    return xp.linalg.solve(H, g[..., None])[..., 0]


def newton_step(x: Array, g: Array, H: Array, lr: Any, damping: Any = 0.0) -> Array:
    r"""Damped Newton :math:`x - \eta (H + \mu I)^{-1} g` (batched over leading axes).

    Plain Newton (:math:`\mu = 0`) is attracted by saddles: it jumps to the nearest
    stationary point of the local quadratic model, whatever its curvature.
    """
    xp = namespace(H)
    d = H.shape[-1]
    eye = xp.eye(d, dtype=H.dtype, device=_dev(H))
    Hd = H + as_scalar(damping, H) * eye
    return x - _col(lr, x) * _solve(Hd, g)


def condition_scaled_step(x: Array, g: Array, H: Array, lr: Any) -> Array:
    r"""GD with step :math:`\eta/\|H\|_F` (local curvature scale; floor :math:`10^{-12}`)."""
    xp = namespace(H)
    fro = xp.sqrt(xp.sum(xp.sum(H * H, axis=-1), axis=-1))
    fro = xp.maximum(fro, as_scalar(1e-12, fro))
    return x - _col(as_scalar(lr, fro) / fro, x) * g


def bfgs_direction(Hinv: Array, g: Array) -> Array:
    r"""Quasi-Newton direction :math:`-H^{-1}_k g` (batched)."""
    return -(Hinv @ g[..., None])[..., 0]


def bfgs_inverse_update(Hinv: Array, s: Array, y: Array) -> Array:
    r"""BFGS inverse-Hessian update from step :math:`s` and gradient change :math:`y`.

    :math:`H^+ = (I - \rho s y^\top) H (I - \rho y s^\top) + \rho s s^\top`,
    :math:`\rho = 1/(y^\top s)`; where the curvature condition :math:`y^\top s > 10^{-12}`
    fails, :math:`H` is kept (so it stays positive definite).
    """
    xp = namespace(Hinv)
    d = Hinv.shape[-1]
    ys = xp.sum(y * s, axis=-1)
    ok = ys > 1e-12
    rho = 1.0 / xp.where(ok, ys, xp.ones_like(ys))
    eye = xp.eye(d, dtype=Hinv.dtype, device=_dev(Hinv))
    r = rho[..., None, None]
    sy = s[..., :, None] * y[..., None, :]
    ss = s[..., :, None] * s[..., None, :]
    left = eye - r * sy
    new = left @ Hinv @ xp.matrix_transpose(left) + r * ss
    return xp.where(ok[..., None, None], new, Hinv)


def _dev(a: Array) -> Any:
    from array_api_compat import device

    return device(a)
