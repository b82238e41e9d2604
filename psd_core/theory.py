r"""The explicit constants of Perturbed Saddle-escape Descent.

References:
    Alpay & Alakkad, *Escaping Saddle Points via Curvature-Calibrated Perturbations: A
    Complete Analysis with Explicit Constants and Empirical Validation*, 2025,
    arXiv:2508.16540.
    Jin, Ge, Netrapalli, Kakade, Jordan, *How to Escape Saddle Points Efficiently*, ICML 2017.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

from ._array import as_scalar, namespace
from .validation import (
    check_choice,
    check_int,
    check_nonnegative,
    check_open_unit,
    check_positive,
)

__all__ = [
    "PSDConstants",
    "ProbeConstants",
    "psd_constants",
    "probe_constants",
    "psgd_batch_size",
    "psgd_gate_threshold",
]


class PSDConstants(NamedTuple):
    """The paper's constants for given :math:`(\\epsilon, \\ell, \\rho, \\delta, \\Delta_f, d)`."""

    gamma: float
    """Curvature threshold :math:`\\gamma = \\sqrt{\\rho\\epsilon}`."""
    radius: float
    """Perturbation radius :math:`r = \\tfrac18\\sqrt{\\epsilon/\\rho}`."""
    max_episodes: int
    """Episode budget :math:`M = 1 + \\lceil 128\\,\\ell\\,\\Delta_f/\\epsilon^2\\rceil`."""
    episode_length: int
    """Steps per episode :math:`T = \\lceil (8\\ell/\\gamma)\\log(16 d M/\\delta)\\rceil`."""
    step_size: float
    """Step size :math:`\\eta = 1/(2\\ell)` (or :math:`1/\\ell`)."""
    episode_decrease: float
    """Predicted decrease per successful episode :math:`\\epsilon^2/(128\\ell)`."""
    epsilon: float
    dim: int


def psd_constants(
    epsilon: float,
    ell: float,
    rho: float,
    delta: float = 0.1,
    delta_f: float = 1.0,
    *,
    dim: int,
    step_size_rule: str = "half",
) -> PSDConstants:
    r"""Constants of PSD (SPEC §1).

    .. math::
        \gamma = \sqrt{\rho\epsilon},\quad r = \tfrac18\sqrt{\epsilon/\rho},\quad
        M = 1 + \lceil 128\ell\Delta_f/\epsilon^2\rceil,\quad
        T = \lceil (8\ell/\gamma)\log(16 d M/\delta)\rceil,\quad \eta = 1/(2\ell).

    Args:
        epsilon: gradient tolerance :math:`\epsilon > 0`.
        ell: gradient Lipschitz constant :math:`\ell > 0`.
        rho: Hessian Lipschitz constant :math:`\rho > 0`.
        delta: failure probability in (0, 1).
        delta_f: bound :math:`\Delta_f > 0` on :math:`f(x_0) - f^*`.
        dim: number of scalars :math:`d \ge 1`.
        step_size_rule: ``"half"`` for :math:`1/(2\ell)` (the paper), ``"full"`` for :math:`1/\ell`
            (allowed by the reference code).

    Array inputs (any of the five reals, or ``dim``, given as an array, e.g. a
    JAX tracer under ``optax.inject_hyperparams`` inside ``jit``) are not validated
    (their values may be unknown) and every field is then a 0-d array of their
    float dtype, ``max_episodes`` and ``episode_length`` included (integral values).

    References:
        Alpay & Alakkad 2025, arXiv:2508.16540, Theorem 1 and Algorithm 1.
    """
    reals = (epsilon, ell, rho, delta, delta_f, dim)
    if any(_is_array(v) for v in reals):
        return _psd_constants_arrays(*reals, step_size_rule=step_size_rule)
    epsilon = check_positive("epsilon", epsilon)
    ell = check_positive("ell", ell)
    rho = check_positive("rho", rho)
    delta = check_open_unit("delta", delta)
    delta_f = check_positive("delta_f", delta_f)
    dim = check_int("dim", dim, minimum=1)
    check_choice("step_size_rule", step_size_rule, ("half", "full"))
    gamma = math.sqrt(rho * epsilon)
    radius = math.sqrt(epsilon / rho) / 8.0
    max_episodes = 1 + math.ceil(128.0 * ell * delta_f / epsilon**2)
    episode_length = math.ceil(8.0 * ell / gamma * math.log(16.0 * dim * max_episodes / delta))
    step_size = 1.0 / (2.0 * ell) if step_size_rule == "half" else 1.0 / ell
    return PSDConstants(
        gamma=gamma,
        radius=radius,
        max_episodes=max_episodes,
        episode_length=episode_length,
        step_size=step_size,
        episode_decrease=epsilon**2 / (128.0 * ell),
        epsilon=epsilon,
        dim=dim,
    )


def _is_array(value: object) -> bool:
    return not isinstance(value, numbers.Real) and hasattr(value, "dtype")


def _psd_constants_arrays(
    epsilon: Any,
    ell: Any,
    rho: Any,
    delta: Any,
    delta_f: Any,
    dim: Any,
    *,
    step_size_rule: str,
) -> PSDConstants:
    """:func:`psd_constants` in array arithmetic (no validation, traceable)."""
    check_choice("step_size_rule", step_size_rule, ("half", "full"))
    arrays = [v for v in (epsilon, ell, rho, delta, delta_f, dim) if _is_array(v)]
    xp = namespace(*arrays)
    dtype = xp.result_type(*[a.dtype for a in arrays], xp.float32)
    like = xp.astype(arrays[0], dtype)
    eps, ell_, rho_, delta_, df, d = (
        as_scalar(v, like) for v in (epsilon, ell, rho, delta, delta_f, dim)
    )
    gamma = xp.sqrt(rho_ * eps)
    max_episodes = 1.0 + xp.ceil(128.0 * ell_ * df / eps**2)
    episode_length = xp.ceil(8.0 * ell_ / gamma * xp.log(16.0 * d * max_episodes / delta_))
    step_size = 1.0 / (2.0 * ell_) if step_size_rule == "half" else 1.0 / ell_
    return PSDConstants(
        gamma=gamma,
        radius=xp.sqrt(eps / rho_) / 8.0,
        max_episodes=max_episodes,
        episode_length=episode_length,
        step_size=step_size,
        episode_decrease=eps**2 / (128.0 * ell_),
        epsilon=eps,
        dim=dim,
    )


class ProbeConstants(NamedTuple):
    """Constants of the PSD-Probe curvature test."""

    num_probes: int
    """:math:`m = \\lceil 16\\log(16 d/\\delta)\\rceil` random unit probes."""
    fd_step: float
    """Finite-difference step :math:`h = \\sqrt{\\epsilon/\\rho}`."""
    step: float
    """Step :math:`\\alpha = r` along a detected negative-curvature direction."""
    gamma: float


def probe_constants(epsilon: float, rho: float, delta: float = 0.1, *, dim: int) -> ProbeConstants:
    r"""Constants of PSD-Probe: :math:`m=\lceil 16\log(16d/\delta)\rceil`, :math:`h=\sqrt{\epsilon/\rho}`, :math:`\alpha=r`.

    References:
        Alpay & Alakkad 2025, arXiv:2508.16540, Algorithm 2 (PSD-Probe).
    """
    epsilon = check_positive("epsilon", epsilon)
    rho = check_positive("rho", rho)
    delta = check_open_unit("delta", delta)
    dim = check_int("dim", dim, minimum=1)
    return ProbeConstants(
        num_probes=math.ceil(16.0 * math.log(16.0 * dim / delta)),
        fd_step=math.sqrt(epsilon / rho),
        step=math.sqrt(epsilon / rho) / 8.0,
        gamma=math.sqrt(rho * epsilon),
    )


def psgd_batch_size(sigma_sq: float, epsilon: float, delta_fp: float = 0.1) -> int:
    r"""Mini-batch size :math:`B = \max(1, \lceil (2\sigma^2/\epsilon^2)\log(2/\delta_{fp})\rceil)` of PSGD."""
    epsilon = check_positive("epsilon", epsilon)
    delta_fp = check_open_unit("delta_fp", delta_fp)
    sigma_sq = check_nonnegative("sigma_sq", sigma_sq)
    return max(1, math.ceil(2.0 * sigma_sq / epsilon**2 * math.log(2.0 / delta_fp)))


def psgd_gate_threshold(epsilon: float, sigma_sq: float, batch_size: int) -> float:
    r"""PSGD gate :math:`\epsilon\sqrt{1 + 2\sigma^2/(B\epsilon^2)}`.

    Args:
        epsilon: gradient tolerance :math:`\epsilon > 0`.
        sigma_sq: gradient-noise variance :math:`\sigma^2 \ge 0` (a negative or
            non-finite value raises ``ValueError`` naming ``sigma_sq``).
        batch_size: mini-batch size :math:`B \ge 1`.
    """
    epsilon = check_positive("epsilon", epsilon)
    sigma_sq = check_nonnegative("sigma_sq", sigma_sq)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    return epsilon * math.sqrt(1.0 + 2.0 * sigma_sq / (batch_size * epsilon**2))
