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

Precision: the linear algebra (solve, Frobenius norm, BFGS update) runs in the
accumulation dtype (float32 for float16/bfloat16 inputs; no backend has a 16-bit
``solve``, and :math:`\|H\|_F^2` or :math:`1/y^\top s` leave the float16 range
early); each step is rounded to ``x``'s dtype once.

References:
    Polyak, 1964 (momentum); Nocedal & Wright, *Numerical Optimization*, 2006, §6.1 (BFGS);
    Welling & Teh, 2011 (Langevin dynamics).
"""

from __future__ import annotations

from typing import Any

from ._array import Array, accumulation_dtype, as_scalar, cast, namespace

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


def _work_dtype(xp: Any, dtype: Any) -> Any:
    """The dtype the baselines compute in (static): float32 for float16/bfloat16, a
    complex dtype unchanged (its real accumulation dtype would drop the imaginary
    part), any other dtype itself."""
    if xp.isdtype(dtype, "complex floating"):
        return dtype
    return accumulation_dtype(xp, dtype)


def _acc(*arrays: Array) -> tuple[Any, Any]:
    """``(xp, dtype)``: the common working dtype of ``arrays`` (static)."""
    xp = namespace(*arrays)
    dt = None
    for a in arrays:
        d = _work_dtype(xp, a.dtype)
        dt = d if dt is None else xp.result_type(dt, d)
    return xp, dt


_to = cast  # ``x`` as ``dtype`` (psd_core._array.cast)


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
    """:math:`H^{-1} g` in the accumulation dtype of ``H`` and ``g``."""
    xp, acc = _acc(H, g)
    return xp.linalg.solve(_to(xp, H, acc), _to(xp, g, acc)[..., None])[..., 0]


def newton_step(x: Array, g: Array, H: Array, lr: Any, damping: Any = 0.0) -> Array:
    r"""Damped Newton :math:`x - \eta (H + \mu I)^{-1} g` (batched over leading axes).

    Plain Newton (:math:`\mu = 0`) is attracted by saddles: it jumps to the nearest
    stationary point of the local quadratic model, whatever its curvature.
    """
    xp, acc = _acc(H, g, x)
    d = H.shape[-1]
    Ha = _to(xp, H, acc)
    eye = xp.eye(d, dtype=acc, device=_dev(H))
    Hd = Ha + as_scalar(damping, Ha) * eye
    xa = _to(xp, x, acc)
    return _to(xp, xa - _col(lr, xa) * _solve(Hd, g), x.dtype)


def condition_scaled_step(x: Array, g: Array, H: Array, lr: Any) -> Array:
    r"""GD with step :math:`\eta/\|H\|_F` (local curvature scale; floor :math:`10^{-12}`)."""
    xp, acc = _acc(H)
    Ha = _to(xp, H, acc)
    fro = xp.sqrt(xp.sum(xp.sum(Ha * Ha, axis=-1), axis=-1))
    fro = xp.maximum(fro, as_scalar(1e-12, fro))
    return x - _col(as_scalar(lr, fro) / fro, x) * g


def bfgs_direction(Hinv: Array, g: Array) -> Array:
    r"""Quasi-Newton direction :math:`-H^{-1}_k g` (batched), in the accumulation dtype of
    ``Hinv`` and ``g``."""
    xp, acc = _acc(Hinv, g)
    return -(_to(xp, Hinv, acc) @ _to(xp, g, acc)[..., None])[..., 0]


def bfgs_inverse_update(Hinv: Array, s: Array, y: Array) -> Array:
    r"""BFGS inverse-Hessian update from step :math:`s` and gradient change :math:`y`.

    :math:`H^+ = (I - \rho s y^\top) H (I - \rho y s^\top) + \rho s s^\top`,
    :math:`\rho = 1/(y^\top s)`; where the curvature condition :math:`y^\top s > 10^{-12}`
    fails, :math:`H` is kept (so it stays positive definite). Computed in the
    accumulation dtype, returned in ``Hinv``'s dtype.
    """
    xp, acc = _acc(Hinv, s, y)
    out_dtype = Hinv.dtype
    Hinv, s, y = _to(xp, Hinv, acc), _to(xp, s, acc), _to(xp, y, acc)
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
    return _to(xp, xp.where(ok[..., None, None], new, Hinv), out_dtype)


def _dev(a: Array) -> Any:
    from array_api_compat import device

    return device(a)
