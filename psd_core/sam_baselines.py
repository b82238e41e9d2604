r"""Pure update rules of the SAM baselines compared in the SAM-SPS paper (Section 4.1).

Each function takes arrays and returns new arrays (no mutation); the namespace comes
from the inputs, so the rules run on NumPy, PyTorch, JAX and array-api-strict and
trace under ``jax.jit``. They act on one point ``x`` of shape ``(d,)``; norms are
over the last axis. :math:`s_t = \nabla f_{S_t}(x_t)` is the (mini-batch) gradient
at the iterate, :math:`g_t` the gradient at the perturbed point, with the same
mini-batch :math:`S_t`. The drivers are :func:`psd_core.solvers.adasam`,
:func:`~psd_core.solvers.lightsam` and :func:`~psd_core.solvers.sa_sam`.

* AdaSAM (AMSGrad-type moments on the SAM gradient):

  .. math::
      e_t = x_t + \rho\, s_t/\|s_t\|,\quad g_t = \nabla f_{S_t}(e_t),\quad
      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\\
      \hat v_t = \max(\hat v_{t-1}, v_t),\quad x_{t+1} = x_t - \gamma\, m_t/\sqrt{\hat v_t}

* LightSAM, variants I (AdaGrad-Norm), II (AdaGrad) and III (Adam): an adaptive
  radius *and* an adaptive step,

  .. math::
      \text{I:}\ \ u_t = u_{t-1} + \|s_t\|^2,\ w_t = x_t + \rho\, s_t/\sqrt{u_t},\
      v_t = v_{t-1} + \|g_t\|^2,\ x_{t+1} = x_t - \eta\, g_t/\sqrt{v_t}\\
      \text{II:}\ \ u_t = u_{t-1} + s_t^2,\ w_t = x_t + \rho\, s_t/\sqrt{u_t},\
      v_t = v_{t-1} + g_t^2,\ x_{t+1} = x_t - \eta\, g_t/\sqrt{v_t}\\
      \text{III:}\ \ r_t = \beta_1 r_{t-1} + (1-\beta_1)s_t,\ u_t = \beta_2 u_{t-1} +
      (1-\beta_2)s_t^2,\ w_t = x_t + \rho\, r_t/\sqrt{u_t},\\
      \phantom{\text{III:}\ \ } m_t = \beta_1 m_{t-1} + (1-\beta_1)g_t,\
      v_t = \beta_2 v_{t-1} + (1-\beta_2)g_t^2,\ x_{t+1} = x_t - \eta\, m_t/\sqrt{v_t}

  with :math:`g_t = \nabla f_{S_t}(w_t)`, squares and divisions coordinatewise, and no
  bias correction (as in the reference code).

* SA-SAM (smoothness-adaptive SAM): the step of adaptive gradient descent
  (Malitsky & Mishchenko, 2020) with the radius tied to it,

  .. math::
      \eta_t = \min\Big\{\frac{\|x_t - x_{t-1}\|}{2\|\nabla f_{S_t}(x_t) -
      \nabla f_{S_t}(x_{t-1})\|},\ \sqrt{1+\theta_{t-1}}\,\eta_{t-1}\Big\},\quad
      \theta_t = \eta_t/\eta_{t-1},\quad \rho_t = \sqrt{\eta_t},\\
      x_{t+1} = x_t - \eta_t\,\nabla f_{S_t}\big(x_t + \rho_t s_t/\|s_t\|\big)

  started from a given :math:`\eta_0` with :math:`\theta_0 = +\infty`.

Initialisation (the reference code's): second-moment / accumulator states start at
:math:`\epsilon^2` (``eps``), first moments at 0, so the first division is finite.
Norms in the normalized perturbations are clamped below by ``1e-12``
(:data:`psd_core.polyak.NORM_FLOOR`), so a zero gradient gives a zero offset.

Precision: states live in the accumulation dtype of ``x`` (float32 for
float16/bfloat16: :math:`\epsilon^2 = 10^{-16}` is 0 in float16, so a zero gradient
entry gave 0/0; :math:`1-\beta_2 = 10^{-3}` is 0 in bfloat16, so the second moment
never grew and :math:`m/\sqrt{v}` blew up). The formulas run in that dtype; offsets
and updates are returned in the gradient's dtype.

References:
    Sun, Shen, Chen, Ding & Tao, *AdaSAM: Boosting sharpness-aware minimization with
    adaptive learning rate and momentum for training deep neural networks*, Neural
    Networks, 2024.
    LightSAM (parameter-agnostic SAM with AdaGrad-Norm / AdaGrad / Adam steps) and
    SA-SAM, as specified in the SAM-SPS authors' experiment code
    (``dimitris-oik/sam_sps``, ``numpy_exps/methods_ada.py``).
    Malitsky & Mishchenko, *Adaptive gradient descent without descent*, ICML 2020.
    Oikonomou & Loizou, *Adaptive Sharpness-Aware Minimization with a Polyak-type Step
    Size*, Section 4.1 (the comparison these baselines serve).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._array import Array, as_scalar, cast, namespace
from .baselines import _work_dtype
from .validation import check_choice

__all__ = [
    "LIGHTSAM_VARIANTS",
    "AdaSAMState",
    "LightSAMState",
    "adasam_init",
    "adasam_update",
    "lightsam_init",
    "lightsam_perturbation",
    "lightsam_update",
    "normalized_offset",
    "sa_sam_radius",
    "sa_sam_step_size",
]

LIGHTSAM_VARIANTS = ("I", "II", "III")
"""LightSAM-I (AdaGrad-Norm), LightSAM-II (AdaGrad), LightSAM-III (Adam)."""

_FLOOR = 1e-12


def _sq_norm(x: Array) -> Array:
    xp = namespace(x)
    x = _acc(xp, x)
    return xp.sum(x * x, axis=-1)


def _acc_dtype(xp: Any, x: Array) -> Any:
    return _work_dtype(xp, x.dtype)


def _acc(xp: Any, x: Array, dtype: Any = None) -> Array:
    """``x`` in ``dtype`` (default: its accumulation dtype)."""
    return cast(xp, x, _acc_dtype(xp, x) if dtype is None else dtype)


def normalized_offset(s: Array, rho: Any) -> Array:
    r"""SAM's ascent offset :math:`\rho\, s/\max(\|s\|, 10^{-12})`."""
    xp = namespace(s)
    sa = _acc(xp, s)
    norm = xp.maximum(xp.sqrt(_sq_norm(sa)), as_scalar(_FLOOR, sa))
    return _acc(xp, (as_scalar(rho, sa) / norm) * sa, s.dtype)


class AdaSAMState(NamedTuple):
    m: Array
    """First moment :math:`m_t`."""
    v: Array
    """Second moment :math:`v_t`."""
    v_hat: Array
    """Running maximum :math:`\\hat v_t` of :math:`v_t`."""


def adasam_init(x: Array, eps: float = 1e-8) -> AdaSAMState:
    r"""AdaSAM state: :math:`m_0 = 0`, :math:`v_0 = \hat v_0 = \epsilon^2` (shaped like ``x``)."""
    xp = namespace(x)
    acc = _acc_dtype(xp, x)
    e2 = xp.full_like(x, eps * eps, dtype=acc)
    return AdaSAMState(m=xp.zeros_like(x, dtype=acc), v=e2, v_hat=e2)


def adasam_update(
    g: Array, state: AdaSAMState, lr: Any, b1: Any = 0.9, b2: Any = 0.999
) -> tuple[Array, AdaSAMState]:
    r"""AdaSAM descent from the gradient :math:`g_t` at the perturbed point.

    :math:`m_t = \beta_1 m + (1-\beta_1)g`, :math:`v_t = \beta_2 v + (1-\beta_2)g^2`,
    :math:`\hat v_t = \max(\hat v, v_t)`; returns the update :math:`-\gamma\, m_t/\sqrt{\hat v_t}`
    and the new state.
    """
    xp = namespace(g, state.m)
    ga = _acc(xp, g, state.m.dtype)
    b1_, b2_ = as_scalar(b1, ga), as_scalar(b2, ga)
    m = b1_ * state.m + (1.0 - b1_) * ga
    v = b2_ * state.v + (1.0 - b2_) * (ga * ga)
    v_hat = xp.maximum(state.v_hat, v)
    # divide first: -lr * m underflows to a subnormal for a tiny m (float32 g = 1.2e-38)
    upd = -as_scalar(lr, ga) * (m / xp.sqrt(v_hat))
    return _acc(xp, upd, g.dtype), AdaSAMState(m=m, v=v, v_hat=v_hat)


class LightSAMState(NamedTuple):
    r: Array
    """Perturbation first moment :math:`r_t` (variant III; zeros otherwise)."""
    u: Array
    """Perturbation accumulator :math:`u_t` (0-d for variant I)."""
    m: Array
    """Descent first moment :math:`m_t` (variant III; zeros otherwise)."""
    v: Array
    """Descent accumulator :math:`v_t` (0-d for variant I)."""


def _variant(variant: str) -> str:
    return check_choice("variant", variant, LIGHTSAM_VARIANTS)


def lightsam_init(x: Array, variant: str = "I", eps: float = 1e-8) -> LightSAMState:
    r"""LightSAM state: :math:`u_0 = v_0 = \epsilon^2` (scalars for variant I,
    coordinatewise for II/III), :math:`r_0 = m_0 = 0`."""
    variant = _variant(variant)
    xp = namespace(x)
    acc = _acc_dtype(xp, x)
    if variant == "I":
        u = as_scalar(eps * eps, x, acc)
    else:
        u = xp.full_like(x, eps * eps, dtype=acc)
    z = xp.zeros_like(x, dtype=acc)
    return LightSAMState(r=z, u=u, m=z, v=u)


def lightsam_perturbation(
    s: Array, state: LightSAMState, rho: Any, variant: str = "I", b1: Any = 0.9, b2: Any = 0.999
) -> tuple[Array, LightSAMState]:
    r"""The offset :math:`w_t - x_t` from the gradient :math:`s_t` at the iterate.

    I: :math:`u_t = u + \|s\|^2`, offset :math:`\rho s/\sqrt{u_t}`; II: :math:`u_t = u + s^2`,
    offset :math:`\rho s/\sqrt{u_t}`; III: :math:`r_t = \beta_1 r + (1-\beta_1)s`,
    :math:`u_t = \beta_2 u + (1-\beta_2)s^2`, offset :math:`\rho r_t/\sqrt{u_t}`.
    """
    variant = _variant(variant)
    xp = namespace(s, state.r)
    out = s.dtype
    s = _acc(xp, s, state.r.dtype)
    rho_ = as_scalar(rho, s)
    r = state.r
    if variant == "I":
        u = state.u + _sq_norm(s)
        offset = (rho_ / xp.sqrt(u)) * s
    elif variant == "II":
        u = state.u + s * s
        offset = rho_ * (s / xp.sqrt(u))
    else:
        b1_, b2_ = as_scalar(b1, s), as_scalar(b2, s)
        r = b1_ * state.r + (1.0 - b1_) * s
        u = b2_ * state.u + (1.0 - b2_) * (s * s)
        offset = rho_ * (r / xp.sqrt(u))
    return _acc(xp, offset, out), state._replace(r=r, u=u)


def lightsam_update(
    g: Array, state: LightSAMState, lr: Any, variant: str = "I", b1: Any = 0.9, b2: Any = 0.999
) -> tuple[Array, LightSAMState]:
    r"""The descent update from the gradient :math:`g_t` at the perturbed point.

    I: :math:`v_t = v + \|g\|^2`, update :math:`-\eta g/\sqrt{v_t}`; II: :math:`v_t = v + g^2`,
    update :math:`-\eta g/\sqrt{v_t}`; III: :math:`m_t = \beta_1 m + (1-\beta_1)g`,
    :math:`v_t = \beta_2 v + (1-\beta_2)g^2`, update :math:`-\eta m_t/\sqrt{v_t}`.
    """
    variant = _variant(variant)
    xp = namespace(g, state.m)
    out = g.dtype
    g = _acc(xp, g, state.m.dtype)
    lr_ = as_scalar(lr, g)
    m = state.m
    if variant == "I":
        v = state.v + _sq_norm(g)
        upd = -(lr_ / xp.sqrt(v)) * g
    elif variant == "II":
        v = state.v + g * g
        upd = -lr_ * (g / xp.sqrt(v))
    else:
        b1_, b2_ = as_scalar(b1, g), as_scalar(b2, g)
        m = b1_ * state.m + (1.0 - b1_) * g
        v = b2_ * state.v + (1.0 - b2_) * (g * g)
        upd = -lr_ * (m / xp.sqrt(v))
    return _acc(xp, upd, out), state._replace(m=m, v=v)


def sa_sam_step_size(
    x: Array, x_prev: Array, g: Array, g_prev: Array, eta_prev: Any, theta_prev: Any
) -> tuple[Array, Array]:
    r"""SA-SAM's step :math:`\eta_t` and ratio :math:`\theta_t = \eta_t/\eta_{t-1}` (0-d arrays in the
    accumulation dtype).

    :math:`\eta_t = \min\{\|x_t - x_{t-1}\| / (2\|g_t - g_{t-1}\|),\ \sqrt{1+\theta_{t-1}}\,\eta_{t-1}\}`,
    where ``g`` and ``g_prev`` are the gradients at :math:`x_t` and :math:`x_{t-1}` on the
    *same* mini-batch :math:`S_t`. A zero gradient difference makes the first candidate
    :math:`+\infty`; ``theta_prev = math.inf`` (the first step) makes the second one
    :math:`+\infty`. Where both are infinite (or the result is not finite) the step
    stays :math:`\eta_{t-1}`.
    """
    xp = namespace(x, g)
    num = xp.sqrt(_sq_norm(_acc(xp, x) - _acc(xp, x_prev)))
    den = xp.sqrt(_sq_norm(_acc(xp, g) - _acc(xp, g_prev)))
    inf = as_scalar(math.inf, num)
    safe = xp.where(den > 0, den, xp.ones_like(den))
    cand1 = xp.where(den > 0, num / (2.0 * safe), inf)
    eta_prev_ = as_scalar(eta_prev, num)
    cand2 = xp.sqrt(1.0 + as_scalar(theta_prev, num)) * eta_prev_
    eta = xp.minimum(cand1, cand2)
    eta = xp.where(xp.isfinite(eta), eta, eta_prev_)
    return eta, eta / eta_prev_


def sa_sam_radius(eta: Any, like: Array) -> Array:
    r"""SA-SAM's radius :math:`\rho_t = \sqrt{\eta_t}` (0-d, ``like``'s dtype)."""
    xp = namespace(like)
    return xp.sqrt(as_scalar(eta, like))
