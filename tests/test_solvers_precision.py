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
from backends import backend_dtype_params, backend_params, convert, to_numpy

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


# ------------------------------------------------------------------------------------
# float16 / bfloat16: every public solver on every backend that has the dtype
# ------------------------------------------------------------------------------------

LOW = [
    p
    for p in backend_dtype_params()
    if p.values[1] in ("float16", "bfloat16")  # numpy/torch/jax float16, torch/jax bfloat16
]

# Per-dtype tolerance on the end point (max over coordinates), at |x| ~ 0.7 where float16's
# ulp is 4.9e-4 and bfloat16's 3.9e-3. The parameters are stored in the 16-bit dtype, so
# gradient descent stalls where a step rounds away: lr |f''| |dx| < ulp/2, i.e.
# |dx| < ulp / (2 lr f'') with f'' = 4 (the separable quartic at its minimizers):
# 1.2e-3 / 9.8e-3 (float16 / bfloat16) at lr = 0.05 (gd, pgd), 6e-4 / 4.9e-3 at lr = 0.1
# (psd, psgd). Measured on PyTorch: gd 1.0e-3 / 7.9e-3, psd 5.6e-4 / 4.0e-3; the largest
# over all the solvers below 3.0e-3 (sa_sam) / 8.2e-3 (sam_sps). About 10 ulps leaves room
# for the rounding of every step on the way.
XTOL = {"float16": 5e-3, "bfloat16": 3e-2}


def _psd_family(p):
    """Runs whose discrete decisions do not depend on rounding (checked against float64).
    ell = 5 (an over-estimate of the curvature is not needed: |f''| <= 10 on the box, and
    lr = 1/(2 ell) = 0.1 is stable there) and delta_f = 0.01 give T = 343 instead of 960
    (CI time: JAX runs these op by op)."""
    kw = dict(epsilon=0.1, ell=5.0, rho=p.rho, delta_f=0.01, seed=5)
    return {
        "psd": lambda x: S.psd(p, x, **kw, max_grad_evals=3000),
        "psd_lanczos": lambda x: S.psd(p, x, **kw, curvature="lanczos", max_grad_evals=3000),
        "psgd": lambda x: S.psgd(p, x, **kw, sigma=0.0, max_grad_evals=500),
        "pgd": lambda x: S.pgd(
            p, x, lr=0.05, g_thres=0.1, t_thres=10, radius=0.01, seed=5, max_grad_evals=300
        ),
        "pgd_jin": lambda x: S.pgd_jin(
            p,
            x,
            lr=0.05,
            g_thres=0.1,
            t_thres=30,
            f_thres=0.05,  # far above the 16-bit resolution of f ~ 1 (see the test)
            radius=0.05,
            seed=5,
            max_grad_evals=2000,
        ),
        "gd": lambda x: S.gd(p, x, lr=0.05, max_grad_evals=100),
        "momentum": lambda x: S.momentum(p, x, lr=0.02, beta=0.5, max_grad_evals=100),
        "adam": lambda x: S.adam(p, x, lr=0.05, max_grad_evals=100),
    }


def _check_end_point(p, got, ref, dtype: str, name: str) -> np.ndarray:
    x = to_numpy(got.x)
    assert str(got.x.dtype).endswith(dtype), name  # no promotion to float32
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x)), name
    np.testing.assert_allclose(x, ref.x, atol=XTOL[dtype], rtol=0, err_msg=name)
    # by Taylor around the float64 end point: |f(x) - f(ref)| <= |g| dx + ell/2 dx^2
    dx = float(np.linalg.norm(x - ref.x))
    g = float(np.linalg.norm(p.grad(ref.x)))
    bound = g * dx + 0.5 * p.ell * dx**2 + 1e-9
    assert abs(float(p.value(x)) - float(p.value(ref.x))) <= bound, name
    return x


@pytest.mark.parametrize(("backend", "dtype"), LOW)
def test_16bit_psd_family_takes_the_float64_decisions(backend: str, dtype: str) -> None:
    """float16 / bfloat16 parameters: the same episodes, convergence and (up to the
    step where ||g|| crosses its threshold) gradient evaluations as float64 NumPy.
    Before the fix ``psd`` raised (no backend has a 16-bit ``eigvalsh``) and ``adam``
    promoted x to float32 and, in float16, ended at NaN (the second moment underflowed)."""
    p = F.separable_quartic(6)
    x0 = p.saddle() + 1e-3 * np.arange(6)
    for name, fn in _psd_family(p).items():
        what = f"{name} on {backend}/{dtype}"
        ref = fn(x0.copy())
        got = fn(convert(x0, backend, dtype))
        assert got.episodes == ref.episodes, what
        assert got.converged == ref.converged, what
        # the gradient norm may cross its threshold one step apart where it lands within
        # 16-bit rounding of it: one step of slack per episode, as for float32
        assert abs(got.grad_evals - ref.grad_evals) <= 1 + ref.episodes, what
        _check_end_point(p, got, ref, dtype, what)
        if name in ("psd", "psd_lanczos", "pgd", "psgd", "pgd_jin"):
            assert ref.episodes >= 1, what  # the scenario escapes the saddle


@pytest.mark.parametrize(("backend", "dtype"), LOW)
def test_16bit_psd_probe_escapes_and_certifies(backend: str, dtype: str) -> None:
    """PSD-Probe in float16 / bfloat16. Its discrete decisions cannot match float64 here:
    at the saddle the gradient is ~1e-3, and the sign of each negative-curvature step
    (<g, s v> <= 0) and the probes' finite differences (h = sqrt(eps/rho) = 0.065,
    gradient differences of ~0.1 resolved to 16-bit) are decided by rounding, so the
    walk takes another number of steps and ends at another of the 2^d minimizers
    (measured: 10-12 steps in 16-bit vs 15 in float64, random probes). Asserted instead:
    it escapes, it certifies, every coordinate reaches a minimizer's basin, and the final
    f agrees with float64's within what an (eps, gamma)-SOSP allows: each run stops at
    ||g|| <= eps = 0.1 where f''>= 2 (|x_i| >= 0.58), so f - f* <= eps^2/(2*2) = 2.5e-3."""
    p = F.separable_quartic(6)
    x0 = p.saddle() + 1e-3 * np.arange(6)
    for probe in ("random", "hvp"):
        what = f"psd_probe/{probe} on {backend}/{dtype}"

        def fn(x, probe=probe):
            return S.psd_probe(
                p, x, epsilon=0.1, ell=p.ell, rho=p.rho, probe=probe, seed=5, max_grad_evals=6000
            )

        ref = fn(x0.copy())
        got = fn(convert(x0, backend, dtype))
        assert str(got.x.dtype).endswith(dtype), what
        x = np.asarray(to_numpy(got.x), np.float64)
        assert np.all(np.isfinite(x)), what
        assert got.episodes >= 1 and ref.episodes >= 1, what
        assert got.converged and ref.converged, what
        assert got.grad_evals < 6000, what
        np.testing.assert_allclose(np.abs(x), 1 / np.sqrt(2), atol=0.12, err_msg=what)
        assert abs(float(p.value(x)) - float(p.value(ref.x))) <= 5e-3, what


def _other_solvers(p):
    """The baselines and the SAM family: fixed step counts, so the gradient-evaluation
    counts are fixed; each run converges or oscillates at a scale the 16-bit dtypes
    resolve (SA-SAM's radius sqrt(eta) ~ 0.4 makes it chaotic past ~12 steps even in
    float32 vs float64, so it runs 8)."""
    return {
        "langevin": lambda x: S.langevin(p, x, lr=0.05, sigma=0.01, max_grad_evals=60),
        "newton": lambda x: S.newton(p, x, lr=1.0, max_grad_evals=10),
        "condition_scaled_gd": lambda x: S.condition_scaled_gd(p, x, lr=0.5, max_grad_evals=60),
        "bfgs": lambda x: S.bfgs(p, x, lr=0.5, max_grad_evals=40),
        "sam_sps": lambda x: S.sam_sps(p, x, rho=0.05, f_star=p.f_star, steps=30),
        "sam": lambda x: S.sam(p, x, lr=0.05, rho=0.05, steps=30),
        "adasam": lambda x: S.adasam(p, x, lr=0.01, rho=0.05, steps=30),
        "lightsam_I": lambda x: S.lightsam(p, x, lr=0.3, rho=0.05, steps=30),
        "lightsam_II": lambda x: S.lightsam(p, x, lr=0.3, rho=0.05, variant="II", steps=30),
        "lightsam_III": lambda x: S.lightsam(p, x, lr=0.01, rho=0.05, variant="III", steps=30),
        "sa_sam": lambda x: S.sa_sam(p, x, lr0=0.05, steps=8),
    }


@pytest.mark.parametrize(("backend", "dtype"), LOW)
def test_16bit_baselines_and_sam_family_match_float64(backend: str, dtype: str) -> None:
    """Before the fix: newton raised (no 16-bit ``solve``), bfgs ended at NaN in float16
    (1/y's overflowed), AdaSAM and LightSAM-III at NaN in bfloat16 (1 - 0.999 = 0 there)
    and LightSAM-II in float16 (eps^2 = 1e-16 = 0 there, 0/0 at a zero gradient entry)."""
    p = F.separable_quartic(4)
    x0 = 0.3 + 0.1 * np.arange(4)
    for name, fn in _other_solvers(p).items():
        what = f"{name} on {backend}/{dtype}"
        ref = fn(x0.copy())
        got = fn(convert(x0, backend, dtype))
        assert got.grad_evals == ref.grad_evals, what
        assert got.converged == ref.converged, what
        _check_end_point(p, got, ref, dtype, what)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_baseline_rules_are_finite_and_keep_the_dtype(dtype: str) -> None:
    """The pure rules behind the solvers above, at the inputs that broke them: a zero
    gradient entry (0/0 with eps^2 = 1e-16 stored in float16), b2 = 0.999 (1 - b2 = 0 in
    bfloat16), a curvature pair with y's ~ 1e-6 (1/y's overflows float16), a 16-bit solve."""
    from psd_core import baselines as B
    from psd_core import sam_baselines as SB

    backend = "numpy" if dtype == "float16" else "torch"
    if backend == "torch":
        pytest.importorskip("torch")
    c = lambda a: convert(np.asarray(a, np.float64), backend, dtype)  # noqa: E731
    x, g = c([0.5, -0.25, 1.0]), c([0.0, 0.5, -1.0])
    outs = {}
    st = SB.adasam_init(x)
    for _ in range(3):
        outs["adasam"], st = SB.adasam_update(g, st, 0.01)
    for v in SB.LIGHTSAM_VARIANTS:
        st = SB.lightsam_init(x, v)
        for _ in range(3):
            outs[f"lightsam_{v}_offset"], st = SB.lightsam_perturbation(g, st, 0.05, v)
            outs[f"lightsam_{v}"], st = SB.lightsam_update(g, st, 0.1, v)
    outs["offset"] = SB.normalized_offset(g, 0.05)
    outs["newton"] = B.newton_step(x, g, c(np.diag([4.0, 2.0, 1.0])), 1.0)
    outs["bfgs"] = B.bfgs_inverse_update(c(np.eye(3)), c([1e-3, 0, 0]), c([1e-3, 0, 0]))
    for name, out in outs.items():
        assert str(out.dtype).endswith(dtype), name
        assert np.all(np.isfinite(to_numpy(out))), name
    # the values: AdaSAM's first moments 0.271 g, second 0.003 g^2 -> m/sqrt(v_hat) = 4.95 sign(g)
    np.testing.assert_allclose(
        to_numpy(outs["adasam"]), -0.01 * np.array([0.0, 4.948, -4.948]), rtol=1e-2, atol=1e-6
    )
    np.testing.assert_allclose(to_numpy(outs["newton"]), [0.5, -0.5, 2.0], rtol=1e-2)
    # s = y = 1e-3 e1: y's = 1e-6 > 1e-12, so the update sets H[0, 0] = s's / y's = 1
    np.testing.assert_allclose(to_numpy(outs["bfgs"]), np.eye(3), atol=1e-2)
