"""Solvers: the episode budget (issue 11, bug 7) and float32 vs float64 decisions.

* ``solvers.psd`` / ``solvers.psgd`` stop once their ``M`` episodes are used, as SPEC's
  loop and the reference ``psd/algorithms.py`` (psd-optimizer 0.1.2) do, instead of
  running gradient descent until ``max_grad_evals``.
* Precision matrix, solvers part: on every backend of the conformance suite a float32
  run takes the same discrete decisions (episodes, convergence, gradient evaluations)
  as a float64 NumPy run where the math allows, and ends at the same point within a
  float32 tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from backends import backend_params, convert, to_numpy

from psd_core import functions as F
from psd_core import solvers as S
from psd_core.theory import psd_constants


class _FlatSaddle:
    """f = 0 with a Hessian that claims -4 I everywhere: every point is a 'saddle' that a
    perturbation never escapes, so only the episode budget can stop PSD."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def value(self, x):
        return 0.0 * x[0]

    def grad(self, x):
        return 0.0 * x

    def hvp(self, x, v):
        return -4.0 * v

    def hess(self, x):
        return -4.0 * np.eye(self.dim)


EPS, ELL, RHO, DELTA_F = 1.0, 1.0, 1.0, 0.01


@pytest.mark.parametrize("curvature", ["exact", "lanczos"])
def test_psd_stops_after_its_episode_budget(curvature: str) -> None:
    p = _FlatSaddle(2)
    c = psd_constants(EPS, ELL, RHO, 0.1, DELTA_F, dim=2)
    assert c.max_episodes == 3  # 1 + ceil(128 * 0.01)
    res = S.psd(
        p,
        np.zeros(2),
        epsilon=EPS,
        ell=ELL,
        rho=RHO,
        delta_f=DELTA_F,
        curvature=curvature,
        max_grad_evals=50_000,
    )
    assert res.episodes == c.max_episodes
    assert not res.converged  # the budget ran out at a saddle: no SOSP certificate
    # M episodes of (1 check + T steps), then the final check that finds the budget spent
    assert res.grad_evals == c.max_episodes * (c.episode_length + 1) + 1
    assert res.grad_evals < 50_000  # before the fix: gradient descent until max_grad_evals


def test_psd_budget_stop_matches_the_reference_implementation() -> None:
    algorithms = pytest.importorskip("psd.algorithms")
    p = _FlatSaddle(2)
    _, ref_evals = algorithms.psd(
        np.zeros(2),
        p.grad,
        p.hess,
        EPS,
        ELL,
        RHO,
        delta_f=DELTA_F,
        max_iter=50_000,
        random_state=np.random.default_rng(0),
    )
    res = S.psd(
        p, np.zeros(2), epsilon=EPS, ell=ELL, rho=RHO, delta_f=DELTA_F, max_grad_evals=50_000
    )
    assert res.grad_evals == ref_evals


def test_psgd_stops_after_its_episode_budget() -> None:
    p = _FlatSaddle(2)
    c = psd_constants(EPS, ELL, RHO, 0.1, DELTA_F, dim=2)
    res = S.psgd(
        p,
        np.zeros(2),
        epsilon=EPS,
        ell=ELL,
        rho=RHO,
        sigma=0.0,
        delta_f=DELTA_F,
        max_grad_evals=50_000,
    )
    assert res.episodes == c.max_episodes
    assert not res.converged
    assert res.grad_evals == c.max_episodes * (c.episode_length + 1) + 1


def test_psd_with_budget_left_is_unchanged_at_a_true_minimum() -> None:
    """A point that passes the curvature test still returns converged, budget or not."""
    p = F.separable_quartic(4)
    x = np.full(4, 1 / np.sqrt(2))  # a minimum of sum(x^4 - x^2): zero gradient, Hessian 4 I
    res = S.psd(p, x, epsilon=0.1, ell=p.ell, rho=p.rho, max_grad_evals=1000)
    assert res.converged and res.episodes == 0 and res.grad_evals == 1


# ------------------------------------------------------------------------------------
# float32 vs float64: the same decisions on every backend
# ------------------------------------------------------------------------------------


def _runs(p):
    return {
        "psd": lambda x: S.psd(
            p, x, epsilon=0.1, ell=p.ell, rho=p.rho, seed=5, max_grad_evals=3000
        ),
        "psd_lanczos": lambda x: S.psd(
            p,
            x,
            epsilon=0.1,
            ell=p.ell,
            rho=p.rho,
            curvature="lanczos",
            seed=5,
            max_grad_evals=3000,
        ),
        "pgd": lambda x: S.pgd(
            p, x, lr=0.05, g_thres=0.1, t_thres=10, radius=0.01, seed=5, max_grad_evals=3000
        ),
        "psd_probe": lambda x: S.psd_probe(
            p, x, epsilon=0.1, ell=p.ell, rho=p.rho, seed=5, max_grad_evals=6000
        ),
        "psd_probe_hvp": lambda x: S.psd_probe(
            p, x, epsilon=0.1, ell=p.ell, rho=p.rho, probe="hvp", seed=5, max_grad_evals=6000
        ),
        "gd": lambda x: S.gd(p, x, lr=0.05, max_grad_evals=300),
        "adam": lambda x: S.adam(p, x, lr=0.05, max_grad_evals=300),
    }


@pytest.mark.parametrize("backend", backend_params())
def test_float32_solvers_take_the_float64_decisions(backend: str) -> None:
    p = F.separable_quartic(6)
    x0 = p.saddle() + 1e-3 * np.arange(6)
    for name, fn in _runs(p).items():
        ref = fn(x0.copy())  # float64 NumPy reference
        got = fn(convert(x0, backend, "float32"))
        x = to_numpy(got.x)
        assert x.dtype == np.float32, name
        assert np.all(np.isfinite(x)), name
        assert got.episodes == ref.episodes, name
        assert got.converged == ref.converged, name
        # the gradient norm crosses epsilon at the same step unless it lands within
        # float32 rounding of it: allow one step of slack per episode
        assert abs(got.grad_evals - ref.grad_evals) <= 1 + ref.episodes, name
        # the end point is an (eps, gamma)-SOSP, not the minimum: where the gradient norm
        # crosses eps one step apart in float32 it differs by up to ~eta*eps per coordinate
        np.testing.assert_allclose(x, ref.x, atol=5e-3, err_msg=name)
        # both are points with gradient norm <= eps = 0.1, so by Taylor the values differ
        # by at most eps*|dx| + ell/2*|dx|^2 (plus float32 rounding of f)
        dx = float(np.linalg.norm(np.asarray(x, np.float64) - ref.x))
        bound = 0.1 * dx + 0.5 * p.ell * dx**2 + 1e-6
        assert math.isclose(
            float(p.value(np.asarray(x, np.float64))), float(p.value(ref.x)), abs_tol=bound
        ), name
