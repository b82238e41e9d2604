r"""SAM / USAM with the stochastic Polyak step size (SAM-SPS).

With mini-batch loss :math:`f_S` and :math:`g = \nabla f_S(x)`:

.. math::
    e &= x + \rho\Big(1 - \lambda + \frac{\lambda}{\|g\|}\Big) g
      \qquad(\lambda = 0:\ \text{USAM},\ \lambda = 1:\ \text{SAM})\\
    \gamma &= \min\Big\{\frac{[f_S(e) - \ell^* - \langle \nabla f_S(e), e - x\rangle]_+}
                          {\|\nabla f_S(e)\|^2},\ \gamma_b\Big\}\\
    x^+ &= x - \gamma\,(\nabla f_S(e) + w\,x)

:math:`\rho = 0` gives SPS_max. Norms are clamped below by ``1e-12`` (as in the
reference ``sam_sps.SAM_SPS``), so a zero gradient gives a finite step size and a
zero update, never a NaN. The step size is computed from the *unregularized* loss
and applied to gradient + weight decay, as published.

Variants of the numerator: ``"sps+"`` (default; the paper's ReLU, step in
:math:`[0, \gamma_b]`) and ``"sps"`` (no ReLU, as ``optax.polyak_sgd(variant="sps")``;
the step may be negative when the loss is below ``f_star``).

Non-finite policy: if the loss at :math:`x` (when given), the loss at :math:`e` or
either gradient norm is not finite, :math:`\gamma = 0`, the update is exactly
zero and ``skipped`` counts the step.

References:
    Oikonomou & Loizou, *Sharpness-Aware Minimization: General Analysis and Improved
    Rates*, ICML 2025 (SAM-SPS / USAM-SPS); reference code ``sam-sps`` 1.0.0.
    Loizou et al., *Stochastic Polyak Step-size for SGD*, AISTATS 2021 (SPS_max).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ._array import (
    Array,
    Tree,
    as_scalar,
    namespace,
    tree_dot,
    tree_lincomb,
    tree_select,
    tree_sq_norm,
)
from .transform import Transformation
from .validation import (
    check_choice,
    check_finite_number,
    check_nonnegative,
    check_same_shapes,
    check_tree,
    check_unit_interval,
)

__all__ = [
    "NORM_FLOOR",
    "SAMSPSConfig",
    "SAMSPSCoefficients",
    "SAMSPSState",
    "polyak_step_size",
    "sam_perturbation_scale",
    "sam_sps",
    "sam_sps_coefficients",
    "sam_sps_config",
    "sam_sps_init",
]

NORM_FLOOR = 1e-12
"""Lower clamp of :math:`\\|g\\|` and :math:`\\|\\nabla f(e)\\|^2` (as in the reference code)."""

_VARIANTS = ("sps+", "sps")


class SAMSPSConfig(NamedTuple):
    rho: float
    lambd: float
    f_star: float
    gamma_b: float
    weight_decay: float
    variant: str


def sam_sps_config(
    rho: float = 0.1,
    lambd: float = 1.0,
    f_star: float = 0.0,
    gamma_b: float = 1.0,
    weight_decay: float = 0.0,
    variant: str = "sps+",
) -> SAMSPSConfig:
    """Validate SAM-SPS hyperparameters (every adapter calls this).

    Args:
        rho: perturbation radius :math:`\\rho \\ge 0` (0 gives SPS_max).
        lambd: :math:`\\lambda \\in [0, 1]`: 0 USAM, 1 SAM.
        f_star: lower bound :math:`\\ell^*` of the mini-batch loss (finite).
        gamma_b: cap :math:`\\gamma_b \\ge 0` of the step size.
        weight_decay: L2 coefficient :math:`w \\ge 0` in the descent step.
        variant: ``"sps+"`` (ReLU numerator, the paper) or ``"sps"``.
    """
    return SAMSPSConfig(
        rho=check_nonnegative("rho", rho),
        lambd=check_unit_interval("lambd", lambd),
        f_star=check_finite_number("f_star", f_star),
        gamma_b=check_nonnegative("gamma_b", gamma_b),
        weight_decay=check_nonnegative("weight_decay", weight_decay),
        variant=check_choice("variant", variant, _VARIANTS),
    )


def sam_perturbation_scale(grad_sq_norm: Array, rho: Any, lambd: Any) -> Array:
    r"""Scale :math:`c` with :math:`e - x = c\,g`: :math:`c = \rho(1 - \lambda + \lambda/\max(\|g\|, 10^{-12}))` (0-d)."""
    xp = namespace(grad_sq_norm)
    norm = xp.maximum(xp.sqrt(grad_sq_norm), as_scalar(NORM_FLOOR, grad_sq_norm))
    rho_ = as_scalar(rho, grad_sq_norm)
    lam = as_scalar(lambd, grad_sq_norm)
    return rho_ * ((1.0 - lam) + lam / norm)


def polyak_step_size(
    loss: Array,
    f_star: Any,
    inner: Array,
    grad_sq_norm: Array,
    gamma_b: Any,
    variant: str = "sps+",
) -> Array:
    r"""Stochastic Polyak step :math:`\min\{[f(e) - \ell^* - \langle\nabla f(e), e - x\rangle]_+ / \max(\|\nabla f(e)\|^2, 10^{-12}),\ \gamma_b\}`.

    Args:
        loss: :math:`f_S(e)` (0-d).
        f_star: :math:`\ell^*`.
        inner: :math:`\langle \nabla f_S(e), e - x\rangle` (0-d; 0 for SPS_max).
        grad_sq_norm: :math:`\|\nabla f_S(e)\|^2` (0-d).
        gamma_b: cap :math:`\gamma_b`.
        variant: ``"sps+"`` clips the numerator at 0, ``"sps"`` does not.

    Returns:
        0-d step size; 0 when any input is non-finite.
    """
    xp = namespace(grad_sq_norm)
    like = grad_sq_norm
    loss = as_scalar(loss, like)
    inner = as_scalar(inner, like)
    num = loss - as_scalar(f_star, like) - inner
    if variant == "sps+":
        num = xp.maximum(num, xp.zeros_like(num))
    den = xp.maximum(grad_sq_norm, as_scalar(NORM_FLOOR, like))
    step = xp.minimum(num / den, as_scalar(gamma_b, like))
    ok = xp.isfinite(step) & xp.isfinite(grad_sq_norm)
    return xp.where(ok, step, xp.zeros_like(step))


class SAMSPSCoefficients(NamedTuple):
    """Descent ``x+ = x + grad * g_e + params * x`` (skipped when not ``finite``)."""

    step_size: Array
    grad: Array
    """``-gamma``."""
    params: Array
    """``-gamma * weight_decay``."""
    finite: Array


def sam_sps_coefficients(
    loss_e: Array,
    grad_e_sq_norm: Array,
    inner: Array,
    config: SAMSPSConfig,
    *,
    extra_finite: Array | None = None,
) -> SAMSPSCoefficients:
    """Step size and descent coefficients from the second pass's scalars.

    Args:
        loss_e: loss at the perturbed point :math:`e`.
        grad_e_sq_norm: :math:`\\|\\nabla f(e)\\|^2`.
        inner: :math:`\\langle \\nabla f(e), e - x\\rangle`.
        config: from :func:`sam_sps_config`.
        extra_finite: optional bool of further finiteness checks (first-pass loss
            and gradient norm); the step is skipped where it is false.
    """
    xp = namespace(grad_e_sq_norm)
    loss_e = as_scalar(loss_e, grad_e_sq_norm)
    finite = (
        xp.isfinite(loss_e)
        & xp.isfinite(grad_e_sq_norm)
        & xp.isfinite(as_scalar(inner, grad_e_sq_norm))
    )
    if extra_finite is not None:
        finite = finite & extra_finite
    gamma = polyak_step_size(
        loss_e, config.f_star, inner, grad_e_sq_norm, config.gamma_b, config.variant
    )
    gamma = xp.where(finite, gamma, xp.zeros_like(gamma))
    return SAMSPSCoefficients(
        step_size=gamma, grad=-gamma, params=-gamma * config.weight_decay, finite=finite
    )


class SAMSPSState(NamedTuple):
    count: Array
    step_size: Array
    """The last Polyak step size :math:`\\gamma_t` (for logging)."""
    skipped: Array


def sam_sps_init(params: Tree) -> SAMSPSState:
    from ._array import scalar_device

    check_tree("params", params)
    xp = namespace(params)
    dev = scalar_device(params[0])
    from ._array import tree_acc_dtype

    return SAMSPSState(
        count=xp.asarray(0, dtype=xp.int32, device=dev),
        step_size=xp.asarray(0.0, dtype=tree_acc_dtype(params), device=dev),
        skipped=xp.asarray(0, dtype=xp.int32, device=dev),
    )


def sam_sps(
    rho: float = 0.1,
    lambd: float = 1.0,
    f_star: float = 0.0,
    gamma_b: float = 1.0,
    weight_decay: float = 0.0,
    *,
    variant: str = "sps+",
) -> Transformation:
    """SAM-SPS as a pure transformation.

    ``update(grads, state, params, *, value_and_grad_fn, value=None)``: ``grads``
    is :math:`\\nabla f_S(x)`; ``value_and_grad_fn(tree) -> (loss, grads)`` is
    evaluated once, at the perturbed point :math:`e` (same mini-batch); ``value``
    (the loss at :math:`x`) is only used by the non-finite check. Returns the
    updates :math:`-\\gamma(\\nabla f_S(e) + w x)` and the new state (with the step
    size). See :func:`sam_sps_config` for the hyperparameters.
    """
    cfg = sam_sps_config(rho, lambd, f_star, gamma_b, weight_decay, variant)

    def init(params: Tree) -> SAMSPSState:
        return sam_sps_init(params)

    def update(
        grads: Tree,
        state: SAMSPSState,
        params: Tree,
        *,
        value_and_grad_fn: Callable[[list[Array]], tuple[Array, Tree]],
        value: Array | None = None,
    ) -> tuple[list[Array], SAMSPSState]:
        if params is None:
            raise ValueError("sam_sps.update needs params (the perturbation is taken at params)")
        check_same_shapes("grads", grads, "params", params)
        xp = namespace(grads)
        g2 = tree_sq_norm(grads)
        scale = sam_perturbation_scale(g2, cfg.rho, cfg.lambd)
        offset = tree_lincomb([scale], [grads])
        e = [
            p + (o if o.dtype == p.dtype else xp.astype(o, p.dtype)) for p, o in zip(params, offset)
        ]
        loss_e, grads_e = value_and_grad_fn(e)
        check_same_shapes("grads at the perturbed point", list(grads_e), "params", params)
        first_ok = xp.isfinite(g2)
        if value is not None:
            first_ok = first_ok & xp.isfinite(as_scalar(value, g2))
        coeffs = sam_sps_coefficients(
            loss_e,
            tree_sq_norm(grads_e),
            tree_dot(grads_e, offset),
            cfg,
            extra_finite=first_ok,
        )
        if cfg.weight_decay:
            upd = tree_lincomb([coeffs.grad, coeffs.params], [grads_e, params])
        else:
            upd = tree_lincomb([coeffs.grad], [grads_e])
        zeros = [xp.zeros_like(p) for p in params]
        upd = tree_select(coeffs.finite, upd, zeros)
        one = xp.ones_like(state.count)
        new_state = SAMSPSState(
            count=xp.where(coeffs.finite, state.count + one, state.count),
            step_size=xp.astype(coeffs.step_size, state.step_size.dtype),
            skipped=xp.where(coeffs.finite, state.skipped, state.skipped + one),
        )
        return upd, new_state

    return Transformation(init, update)
