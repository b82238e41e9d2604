"""Behaviour of the core on the shared test problems."""

from __future__ import annotations

import math

import numpy as np
import pytest

import psd_core
from psd_core import curvature as C
from psd_core import functions as F
from psd_core import solvers as S


@pytest.mark.parametrize("dim", [2, 10])
def test_gd_stays_at_the_quartic_saddle_while_psd_and_probe_reach_a_minimum(dim: int) -> None:
    p = F.separable_quartic(dim)
    x0 = p.saddle()
    eps = 0.05
    gamma = math.sqrt(p.rho * eps)
    gd = S.gd(p, x0, lr=1 / (2 * p.ell), max_grad_evals=5000)
    np.testing.assert_array_equal(gd.x, x0)  # exactly zero gradient: GD never moves
    minimum = -dim / 4
    for res in [
        S.psd(p, x0, epsilon=eps, ell=p.ell, rho=p.rho, seed=1),
        S.psd(p, x0, epsilon=eps, ell=p.ell, rho=p.rho, curvature="lanczos", seed=1),
        S.psd_probe(p, x0, epsilon=eps, ell=p.ell, rho=p.rho, seed=1),
        S.psd_probe(p, x0, epsilon=eps, ell=p.ell, rho=p.rho, probe="hvp", seed=1),
    ]:
        assert res.converged
        assert res.episodes >= 1
        g = p.grad(res.x)
        assert np.linalg.norm(g) <= eps
        assert np.linalg.eigvalsh(p.hess(res.x))[0] >= -gamma
        assert float(p.value(res.x)) < minimum + 0.01


def test_psd_escapes_a_strict_saddle_of_an_indefinite_quadratic_with_lanczos() -> None:
    p = F.random_quadratic(30, seed=2)
    res = S.psd(
        p,
        p.saddle(),
        epsilon=0.05,
        ell=p.ell,
        rho=1.0,
        curvature="lanczos",
        max_grad_evals=400,
        seed=0,
    )
    assert float(p.value(res.x)) < -0.1  # unbounded below: moved down the negative direction


@pytest.mark.parametrize("d", [5, 50, 200])
def test_min_curvature_matches_eigvalsh(d: int) -> None:
    rng = np.random.default_rng(d)
    for trial in range(3):
        m = rng.standard_normal((d, d))
        h = (m + m.T) / 2
        res = C.min_curvature(lambda _x, v, h=h: h @ v, np.zeros(d), iters=d, seed=trial)
        lam = np.linalg.eigvalsh(h)[0]
        assert res.hvps <= d
        assert abs(float(res.value) - lam) <= 1e-6
        u = res.direction
        assert abs(np.linalg.norm(u) - 1) < 1e-10
        assert abs(u @ h @ u - lam) <= 1e-6


def test_min_curvature_with_repeated_eigenvalues_has_no_spurious_zero() -> None:
    """-2 I exhausts the Krylov space after one step; the dead steps must not report 0."""
    res = C.min_curvature(lambda _x, v: -2.0 * v, np.zeros(10), iters=10, seed=0)
    assert float(res.value) == pytest.approx(-2.0)
    res = C.min_curvature(lambda _x, v: 3.0 * v, np.zeros(10), iters=10, seed=0)
    assert float(res.value) == pytest.approx(3.0)


def test_probes_from_gradients_and_values_agree_with_the_exact_hvp() -> None:
    p = F.coupled_quartic(8)
    x = np.linspace(-0.5, 0.5, 8)
    v = np.ones(8) / np.sqrt(8)
    exact = float(C.rayleigh_hvp(p.hvp, x, v))
    assert float(C.rayleigh_grad_diff(p.grad, x, v, 1e-4)) == pytest.approx(exact, rel=1e-6)
    assert float(C.rayleigh_grad_diff(p.grad, x, v, 1e-6, central=False)) == pytest.approx(
        exact, rel=1e-4
    )
    assert float(C.rayleigh_values(p.value, x, v, 1e-3)) == pytest.approx(exact, rel=1e-4)


def test_usam_sps_converges_linearly_on_consistent_ridge() -> None:
    p = F.ridge_regression(n=100, d=100, cond=10.0, seed=0, consistent=True)
    res = S.sam_sps(p, np.zeros(100), rho=0.1, lambd=0.0, steps=200)
    v = np.asarray(res.history["value"])
    assert v[-1] < 1e-10
    # linear rate: log f decreases at least by a constant factor per 10 steps until 1e-10
    k = int(np.argmax(v < 1e-10))
    rates = np.log(v[10:k:10]) - np.log(v[: k - 10 : 10])
    assert np.all(rates < -1.0), rates


def test_sam_sps_with_fixed_rho_stalls_at_the_predicted_level() -> None:
    """Normalized SAM (lambd = 1) keeps ||e - x|| = rho. For a quadratic the Polyak
    numerator is (||x - x*||_H^2 - ||e - x||_H^2)/2, so the step size drops to 0 once
    f(x) <= rho^2 u'Hu/2 <= rho^2 L/2: SAM-SPS converges linearly into that level,
    not to the minimum (reported in the docs; the ridge experiment shows it)."""
    p = F.ridge_regression(n=100, d=100, cond=10.0, seed=0, consistent=True)
    for rho in (0.1, 0.01):
        res = S.sam_sps(p, np.zeros(100), rho=rho, lambd=1.0, steps=300)
        final = res.history["value"][-1]
        assert final <= rho**2 * p.L / 2
        assert final > 1e-3 * rho**2 * p.mu  # it does stall: well above USAM's 1e-10
        # the step size is 0 up to float64 rounding of the numerator (a few ulps of f)
        assert res.history["step_size"][-2] <= 1e-12


def test_non_finite_gradients_skip_the_step_and_leave_the_state() -> None:
    x = [np.ones(3)]
    bad = [np.array([1.0, np.nan, 0.0])]
    z = [np.ones(3)]
    for tx, kwargs in [
        (psd_core.psd(0.1, 1.0, 0.1, 3), {"normals": z, "uniform": np.asarray(0.5)}),
        (psd_core.perturbed_adam(0.1), {"normals": z}),
    ]:
        state = tx.init(x)
        upd, new = tx.update([np.ones(3)], state, x, **kwargs)  # one good step first
        upd, newer = tx.update(bad, new, x, **kwargs)
        np.testing.assert_array_equal(upd[0], np.zeros(3))
        assert int(newer.skipped) == 1
        assert bool(newer.perturbed) == bool(new.perturbed)
        if isinstance(newer, psd_core.PSDState):  # C6: PSD's count counts every call
            assert int(newer.count) == int(new.count) + 1
            new, newer = new[1:], newer[1:]
        for a, b in zip(new[:-3], newer[:-3]):
            np.testing.assert_array_equal(np.asarray(a, dtype=object), np.asarray(b, dtype=object))
    tx = psd_core.sam_sps()

    def vg(tree):
        return np.inf, [np.ones(3)]

    state = tx.init(x)
    upd, new = tx.update([np.ones(3)], state, x, value_and_grad_fn=vg, value=np.asarray(1.0))
    np.testing.assert_array_equal(upd[0], np.zeros(3))
    assert int(new.skipped) == 1 and float(new.step_size) == 0.0


def test_batched_scalar_layer_runs_independent_problems() -> None:
    """The PSD scalar layer is shape-polymorphic: n problems at once equal n separate runs."""
    from psd_core import perturbation as P

    cfg = P.psd_config(0.1, 0.5, 0.2, 2, t_thres=1)
    g2 = np.array([1.0, 0.01, 0.1])
    zsq = np.array([4.0, 9.0, 1.0])
    u = np.array([0.3, 0.6, 0.9])
    batched = P.psd_init(np.zeros(3), cfg, batch_shape=(3,))
    cb, sb = P.psd_coefficients(g2, batched, cfg, dim=4, noise_sq_norm=zsq, uniform=u)
    for i in range(3):
        single = P.psd_init(np.zeros(3), cfg)
        cs, ss = P.psd_coefficients(
            np.asarray(g2[i]),
            single,
            cfg,
            dim=4,
            noise_sq_norm=np.asarray(zsq[i]),
            uniform=np.asarray(u[i]),
        )
        assert float(cs.grad) == cb.grad[i] and float(cs.noise) == cb.noise[i]
        assert int(ss.episode_left) == sb.episode_left[i]


@pytest.mark.parametrize("sigma_sq", [-1.0, float("nan"), float("inf")])
def test_psgd_gate_threshold_rejects_a_bad_variance_by_name(sigma_sq: float) -> None:
    from psd_core.theory import psgd_batch_size, psgd_gate_threshold

    with pytest.raises(ValueError, match="sigma_sq"):
        psgd_gate_threshold(0.1, sigma_sq, 4)
    with pytest.raises(ValueError, match="sigma_sq"):
        psgd_batch_size(sigma_sq, 0.1)


def test_sam_sps_halves_take_precomputed_norms_and_checks() -> None:
    """``sam_sps_perturbation`` / ``sam_sps_descent`` with the norms and finiteness checks
    given (as ``psd_keras`` passes them) equal the transformation that computes them, and a
    given ``finite=False`` skips the step."""
    from psd_core import polyak as P
    from psd_core._array import tree_all_finite, tree_norm, tree_sq_norm

    rng = np.random.default_rng(3)
    x = [rng.normal(size=(4, 3)), rng.normal(size=(5,))]
    g = [rng.normal(size=(4, 3)), rng.normal(size=(5,))]
    ge = [rng.normal(size=(4, 3)), rng.normal(size=(5,))]
    cfg = P.sam_sps_config(0.05, 0.5, 0.0, 1.0, 1e-3, "sps+")
    st = P.sam_sps_init(x)
    tx = psd_core.sam_sps(0.05, 0.5, 0.0, 1.0, 1e-3, variant="sps+")
    ref, ref_state = tx.update(g, st, x, value_and_grad_fn=lambda e: (np.asarray(2.0), ge))
    e, off = P.sam_sps_perturbation(
        g, x, st, cfg, grad_sq_norm=tree_sq_norm(g), grad_norm=np.sqrt(tree_sq_norm(g))
    )
    kw = dict(
        finite=tree_all_finite(g),
        grad_e_sq_norm=tree_sq_norm(ge),
        grad_e_norm=tree_norm(ge),
        finite_e=tree_all_finite(ge),
    )
    upd, new = P.sam_sps_descent(g, ge, np.asarray(2.0), off, x, st, cfg, **kw)
    for a, b in zip(upd, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(new.step_size, ref_state.step_size, rtol=1e-12)
    assert int(new.count) == 1 and int(new.skipped) == 0
    kw["finite"] = np.asarray(False)
    upd, new = P.sam_sps_descent(g, ge, np.asarray(2.0), off, x, st, cfg, **kw)
    assert all(not np.any(u) for u in upd) and int(new.skipped) == 1 and int(new.count) == 0
