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
    Oikonomou & Loizou, *Adaptive Sharpness-Aware Minimization with a Polyak-type Step
    Size* (SAM-SPS / USAM-SPS); reference code ``sam-sps`` 1.0.0.
    Loizou et al., *Stochastic Polyak Step-size for SGD*, AISTATS 2021 (SPS_max).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

from ._array import (
    Array,
    Tree,
    as_scalar,
    cast,
    is_complex,
    namespace,
    saturating_increment,
    tree_all_finite,
    tree_dot,
    tree_norm,
    tree_select,
    tree_sq_norm,
)
from .transform import Transformation
from .validation import (
    check_choice,
    check_finite_number,
    check_nonnegative,
    check_positive,
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
    "sam_sps_descent",
    "sam_sps_init",
    "sam_sps_perturbation",
    "sam_sps_rho",
]

NORM_FLOOR = 1e-12
"""Lower clamp of :math:`\\|g\\|` and :math:`\\|\\nabla f(e)\\|^2` (as in the reference code)."""

_VARIANTS = ("sps+", "sps")


class SAMSPSConfig(NamedTuple):
    rho: Any
    """A number, or a schedule ``count -> rho`` (see :func:`sam_sps_rho`)."""
    lambd: float
    f_star: float
    gamma_b: float
    weight_decay: float
    variant: str


def sam_sps_config(
    rho: Any = 0.1,
    lambd: float = 1.0,
    f_star: float = 0.0,
    gamma_b: float = 1.0,
    weight_decay: float = 0.0,
    variant: str = "sps+",
) -> SAMSPSConfig:
    """Validate SAM-SPS hyperparameters (every adapter calls this).

    Args:
        rho: perturbation radius :math:`\\rho \\ge 0` (0 gives SPS_max), or a schedule
            ``count -> rho`` (e.g. Theorem 3.4's decreasing :math:`\\rho_t`) called
            with the 0-d step count; it must return values :math:`\\ge 0`.
        lambd: :math:`\\lambda \\in [0, 1]`: 0 USAM, 1 SAM.
        f_star: lower bound :math:`\\ell^*` of the mini-batch loss (finite).
        gamma_b: cap :math:`\\gamma_b > 0` of the step size; ``math.inf`` gives the
            uncapped Polyak step.
        weight_decay: L2 coefficient :math:`w \\ge 0` in the descent step.
        variant: ``"sps+"`` (ReLU numerator, the paper) or ``"sps"``.
    """
    return SAMSPSConfig(
        rho=rho if callable(rho) else check_nonnegative("rho", rho),
        lambd=check_unit_interval("lambd", lambd),
        f_star=check_finite_number("f_star", f_star),
        gamma_b=_check_gamma_b(gamma_b),
        weight_decay=check_nonnegative("weight_decay", weight_decay),
        variant=check_choice("variant", variant, _VARIANTS),
    )


def _check_gamma_b(gamma_b: Any) -> float:
    if isinstance(gamma_b, int | float) and not isinstance(gamma_b, bool) and gamma_b == math.inf:
        return math.inf
    return check_positive("gamma_b", gamma_b)


def sam_sps_rho(rho: Any, count: Array, like: Array) -> Any:
    """The radius for step ``count``: ``rho(t)`` for a schedule, ``rho`` otherwise.

    The schedule receives ``t = count`` as a 0-d float array of ``like``'s dtype (the
    accumulation dtype), so that plain arithmetic such as ``lambda t: 0.1 / (1 + t)``
    keeps full precision on every backend.
    """
    if not callable(rho):
        return rho
    xp = namespace(like)
    return rho(xp.astype(count, like.dtype))


def sam_perturbation_scale(
    grad_sq_norm: Array,
    rho: Any,
    lambd: Any,
    *,
    grad_norm: Array | None = None,
    count: Array | None = None,
) -> Array:
    r"""Scale :math:`c` with :math:`e - x = c\,g`: :math:`c = \rho(1 - \lambda + \lambda/\max(\|g\|, 10^{-12}))` (0-d).

    Computed in ``grad_sq_norm``'s dtype (the accumulation dtype: float32 for 16-bit
    parameters; :math:`\rho/\|g\|` may exceed the float16 range). ``grad_norm``
    (keyword): :math:`\|g\|` from the overflow-safe :func:`psd_core._array.tree_norm`,
    used instead of ``sqrt(grad_sq_norm)``. ``rho`` may be a schedule; then ``count``
    is required.
    """
    xp = namespace(grad_sq_norm)
    like = grad_sq_norm
    if callable(rho):
        if count is None:
            raise ValueError("sam_perturbation_scale: a rho schedule needs count=")
        rho = sam_sps_rho(rho, count, like)
    raw = xp.sqrt(grad_sq_norm) if grad_norm is None else as_scalar(grad_norm, like)
    norm = xp.maximum(raw, as_scalar(NORM_FLOOR, like))
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
    *,
    grad_norm: Array | None = None,
) -> Array:
    r"""Stochastic Polyak step :math:`\min\{[f(e) - \ell^* - \langle\nabla f(e), e - x\rangle]_+ / \max(\|\nabla f(e)\|^2, 10^{-12}),\ \gamma_b\}`.

    Args:
        loss: :math:`f_S(e)` (0-d).
        f_star: :math:`\ell^*`.
        inner: :math:`\langle \nabla f_S(e), e - x\rangle` (0-d; 0 for SPS_max).
        grad_sq_norm: :math:`\|\nabla f_S(e)\|^2` (0-d).
        gamma_b: cap :math:`\gamma_b`.
        variant: ``"sps+"`` clips the numerator at 0, ``"sps"`` does not.
        grad_norm: (keyword) :math:`\|\nabla f_S(e)\|` from the overflow-safe
            :func:`psd_core._array.tree_norm`; the step is then
            :math:`(\text{num}/n)/n` with :math:`n = \max(\|\nabla f_S(e)\|, 10^{-6})`, finite
            even where :math:`\|\nabla f_S(e)\|^2` overflows.

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
    if grad_norm is None:
        den = xp.maximum(grad_sq_norm, as_scalar(NORM_FLOOR, like))
        ratio = num / den
        ok_den = xp.isfinite(grad_sq_norm)
    else:
        n = xp.maximum(as_scalar(grad_norm, like), as_scalar(math.sqrt(NORM_FLOOR), like))
        # The select between the two divisions keeps XLA's algebraic simplifier from
        # rewriting (num / n) / n as num / (n * n), which overflows under jax.jit /
        # jit_compile (a non-finite num / n gives 0 either way: ``ok`` below).
        part = num / n
        part = xp.where(xp.isfinite(part), part, xp.zeros_like(part))
        ratio = part / n
        ok_num = xp.isfinite(num)
        ok_den = xp.isfinite(n) & ok_num
    step = xp.minimum(ratio, as_scalar(gamma_b, like))
    ok = xp.isfinite(step) & ok_den
    return xp.where(ok, step, xp.zeros_like(step))


_to = cast  # ``x`` as ``dtype`` (psd_core._array.cast)


def _acc(xp: Any, x: Array, acc: Any) -> Array:
    """``x`` in the real accumulation dtype ``acc``; complex leaves keep their dtype
    (complex64 already has float32 parts)."""
    return x if is_complex(xp, x) else _to(xp, x, acc)


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
    grad_e_norm: Array | None = None,
    finite: Array | None = None,
) -> SAMSPSCoefficients:
    """Step size and descent coefficients from the second pass's scalars.

    Args:
        loss_e: loss at the perturbed point :math:`e`.
        grad_e_sq_norm: :math:`\\|\\nabla f(e)\\|^2`.
        inner: :math:`\\langle \\nabla f(e), e - x\\rangle`.
        config: from :func:`sam_sps_config`.
        extra_finite: optional bool of further finiteness checks (first-pass loss
            and gradient norm); the step is skipped where it is false.
        grad_e_norm: :math:`\\|\\nabla f(e)\\|` from :func:`psd_core._array.tree_norm`
            (overflow-safe, see :func:`polyak_step_size`).
        finite: whether :math:`\\nabla f(e)` is finite (``tree_all_finite``); replaces
            the check ``isfinite(grad_e_sq_norm)``, which a finite gradient can fail by
            overflow. Pass the first pass's ``tree_all_finite(grads)`` in
            ``extra_finite`` likewise.
    """
    xp = namespace(grad_e_sq_norm)
    loss_e = as_scalar(loss_e, grad_e_sq_norm)
    grad_ok = xp.isfinite(grad_e_sq_norm) if finite is None else finite
    finite = xp.isfinite(loss_e) & grad_ok & xp.isfinite(as_scalar(inner, grad_e_sq_norm))
    if extra_finite is not None:
        finite = finite & extra_finite
    gamma = polyak_step_size(
        loss_e,
        config.f_star,
        inner,
        grad_e_sq_norm,
        config.gamma_b,
        config.variant,
        grad_norm=grad_e_norm,
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
    from ._array import count_dtype, tree_acc_dtype

    return SAMSPSState(
        count=xp.asarray(0, dtype=count_dtype(xp), device=dev),
        step_size=xp.asarray(0.0, dtype=tree_acc_dtype(params), device=dev),
        skipped=xp.asarray(0, dtype=count_dtype(xp), device=dev),
    )


def sam_sps_perturbation(
    grads: Tree,
    params: Tree,
    state: SAMSPSState,
    config: SAMSPSConfig,
    *,
    grad_sq_norm: Array | None = None,
    grad_norm: Array | None = None,
) -> tuple[list[Array], list[Array]]:
    """SAM-SPS's first half: the perturbed point :math:`e = x + c\\,g` and the offset.

    :math:`c` is :func:`sam_perturbation_scale` (``rho`` may follow a schedule of
    ``state.count``). The offset :math:`c\\,g` is formed in the accumulation dtype
    (:math:`c = \rho/\\|g\\|` overflows float16) and cast once to each parameter's
    dtype to form :math:`e`.

    ``grad_sq_norm`` / ``grad_norm`` (keywords, optional): :math:`\\|g\\|^2`
    (:func:`~psd_core._array.tree_sq_norm`) and :math:`\\|g\\|`
    (:func:`~psd_core._array.tree_norm`) when the caller has them (e.g. an adapter that
    takes :math:`\\sqrt{\\|g\\|^2}` whenever the one-pass square is finite); computed
    here otherwise.

    Returns:
        ``(e, offset)``: lists in the order of ``params``; ``offset`` in the
        accumulation dtype, for :func:`sam_sps_descent`.
    """
    xp = namespace(grads)
    g2 = tree_sq_norm(grads) if grad_sq_norm is None else grad_sq_norm
    gn = tree_norm(grads) if grad_norm is None else grad_norm
    scale = sam_perturbation_scale(g2, config.rho, config.lambd, grad_norm=gn, count=state.count)
    offset = [scale * _acc(xp, g, g2.dtype) for g in grads]
    e = [p + _to(xp, o, p.dtype) for p, o in zip(params, offset)]
    return e, offset


def sam_sps_descent(
    grads: Tree,
    grads_e: Tree,
    loss_e: Array,
    offset: Tree,
    params: Tree,
    state: SAMSPSState,
    config: SAMSPSConfig,
    *,
    value: Array | None = None,
    finite: Array | None = None,
    grad_e_sq_norm: Array | None = None,
    grad_e_norm: Array | None = None,
    finite_e: Array | None = None,
) -> tuple[list[Array], SAMSPSState]:
    """SAM-SPS's second half: updates :math:`-\\gamma(\nabla f_S(e) + w\\,x)` and the state.

    Args:
        grads: the first pass's gradient :math:`\nabla f_S(x)` (only its finiteness
            is used here).
        grads_e: :math:`\nabla f_S(e)`; ``loss_e``: :math:`f_S(e)`.
        offset: from :func:`sam_sps_perturbation`.
        params: :math:`x`; state and config as for :func:`sam_sps`.
        value: the loss at :math:`x`, optional, only for the non-finite check.
        finite, grad_e_sq_norm, grad_e_norm, finite_e: optional values the caller
            already has: ``tree_all_finite(grads)``, ``tree_sq_norm(grads_e)``,
            ``tree_norm(grads_e)`` and ``tree_all_finite(grads_e)`` (computed here
            when not given).

    Returns:
        ``(updates, new_state)``; the updates are zero and the step is counted in
        ``skipped`` where a loss or gradient of either pass is not finite.
    """
    xp = namespace(grads_e)
    first_ok = tree_all_finite(grads) if finite is None else finite
    if value is not None:
        first_ok = first_ok & xp.isfinite(as_scalar(value, state.step_size))
    coeffs = sam_sps_coefficients(
        loss_e,
        tree_sq_norm(grads_e) if grad_e_sq_norm is None else grad_e_sq_norm,
        tree_dot(grads_e, offset),
        config,
        extra_finite=first_ok,
        grad_e_norm=tree_norm(grads_e) if grad_e_norm is None else grad_e_norm,
        finite=tree_all_finite(grads_e) if finite_e is None else finite_e,
    )
    acc = coeffs.grad.dtype
    # a weight decay given as an array (traced) always takes part
    use_wd = not isinstance(config.weight_decay, numbers.Real) or config.weight_decay != 0
    upd = []
    for ge, p in zip(grads_e, params):
        u = coeffs.grad * _acc(xp, ge, acc)
        if use_wd:
            u = u + coeffs.params * _acc(xp, p, acc)
        upd.append(_to(xp, u, p.dtype))
    upd = tree_select(coeffs.finite, upd, [xp.zeros_like(p) for p in params])
    new_state = SAMSPSState(
        count=xp.where(coeffs.finite, saturating_increment(state.count), state.count),
        step_size=xp.astype(coeffs.step_size, state.step_size.dtype),
        skipped=xp.where(coeffs.finite, state.skipped, saturating_increment(state.skipped)),
    )
    return upd, new_state


def sam_sps(
    rho: Any = 0.1,
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
        e, offset = sam_sps_perturbation(grads, params, state, cfg)
        loss_e, grads_e = value_and_grad_fn(e)
        check_same_shapes("grads at the perturbed point", list(grads_e), "params", params)
        upd, new_state = sam_sps_descent(
            grads, list(grads_e), loss_e, offset, params, state, cfg, value=value
        )
        return upd, new_state

    return Transformation(init, update)
