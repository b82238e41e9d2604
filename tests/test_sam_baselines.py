"""The SAM-SPS paper's Section 4.1 baselines against hand transcriptions of their update rules.

Each reference below is written from the update rule of its paper (as quoted in the
docstrings of :mod:`psd_core.sam_baselines` and the schedule factories of
:mod:`psd_core.solvers`) as a plain float64 NumPy loop over an explicit ridge
gradient, independently of the core. The solvers run on NumPy, PyTorch and JAX
(and array-api-strict where it applies); float32 runs must stay close to the float64
reference; bad arguments raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from backends import backend_params, convert, to_numpy

from psd_core import functions as F
from psd_core import sam_baselines as SB
from psd_core import solvers as S

N, D, STEPS, BSZ, SEED = 12, 6, 8, 4, 5


@pytest.fixture(scope="module")
def problem():
    return F.ridge_regression(N, D, cond=10.0, seed=3, consistent=False, reg=0.05)


@pytest.fixture(scope="module")
def x0():
    return np.random.default_rng(11).standard_normal(D)


# ---------------------------------------------------------------------------------------
# Independent float64 transcriptions
# ---------------------------------------------------------------------------------------


def _grad(p, x, idx):
    a, y = p.A[idx], p.y[idx]
    return a.T @ (a @ x - y) / len(idx) + p.reg * x


def _value(p, x):
    r = p.A @ x - p.y
    return 0.5 * np.mean(r * r) + 0.5 * p.reg * x @ x


def _batches(steps, batch_size):
    """The data order of the drivers: a fresh batch without replacement per step."""
    if batch_size is None:
        return [np.arange(N)] * steps
    rng = np.random.default_rng(SEED)
    return [rng.choice(N, size=batch_size, replace=False) for _ in range(steps)]


def ref_usam(p, x, batches, schedule):
    xs = [x]
    for t, idx in enumerate(batches):
        gamma, rho = schedule(t)
        s = _grad(p, x, idx)
        x = x - gamma * _grad(p, x + rho * s, idx)
        xs.append(x)
    return xs


def ref_adasam(p, x, batches, gamma, rho, b1, b2, eps):
    m, v, vh = np.zeros(D), np.full(D, eps**2), np.full(D, eps**2)
    xs = [x]
    for idx in batches:
        s = _grad(p, x, idx)
        g = _grad(p, x + rho * s / np.linalg.norm(s), idx)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vh = np.maximum(vh, v)
        x = x - gamma * m / np.sqrt(vh)
        xs.append(x)
    return xs


def ref_lightsam(p, x, batches, eta, rho, variant, b1, b2, eps):
    xs = [x]
    if variant == "I":
        u = v = eps**2
        for idx in batches:
            s = _grad(p, x, idx)
            u = u + float(s @ s)
            g = _grad(p, x + rho * s / math.sqrt(u), idx)
            v = v + float(g @ g)
            x = x - eta * g / math.sqrt(v)
            xs.append(x)
    elif variant == "II":
        u, v = np.full(D, eps**2), np.full(D, eps**2)
        for idx in batches:
            s = _grad(p, x, idx)
            u = u + s * s
            g = _grad(p, x + rho * s / np.sqrt(u), idx)
            v = v + g * g
            x = x - eta * g / np.sqrt(v)
            xs.append(x)
    else:
        r, m = np.zeros(D), np.zeros(D)
        u, v = np.full(D, eps**2), np.full(D, eps**2)
        for idx in batches:
            s = _grad(p, x, idx)
            r = b1 * r + (1 - b1) * s
            u = b2 * u + (1 - b2) * s * s
            g = _grad(p, x + rho * r / np.sqrt(u), idx)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            x = x - eta * m / np.sqrt(v)
            xs.append(x)
    return xs


def ref_sa_sam(p, x, batches, eta0):
    xs = [x]
    s = _grad(p, x, batches[0])
    x_prev, x = x, x - eta0 * _grad(p, x + math.sqrt(eta0) * s / np.linalg.norm(s), batches[0])
    xs.append(x)
    eta_prev, theta_prev = eta0, math.inf
    for idx in batches[1:]:
        g_t, g_tm1 = _grad(p, x, idx), _grad(p, x_prev, idx)
        diff = np.linalg.norm(g_t - g_tm1)
        cand1 = np.linalg.norm(x - x_prev) / (2 * diff) if diff > 0 else math.inf
        eta = min(cand1, math.sqrt(1 + theta_prev) * eta_prev)
        rho = math.sqrt(eta)
        x_prev, x = x, x - eta * _grad(p, x + rho * g_t / np.linalg.norm(g_t), idx)
        theta_prev, eta_prev = eta / eta_prev, eta
        xs.append(x)
    return xs


def ref_usam_sps(p, x, batches, rho_of_t, gamma_b, f_star=0.0):
    """USAM-SPS: e = x + rho_t g, gamma = min([f_S(e) - l* - <grad f_S(e), e - x>]_+ / ||.||^2, gamma_b)."""
    xs = [x]
    for t, idx in enumerate(batches):
        rho = rho_of_t(t)
        g = _grad(p, x, idx)
        e = x + rho * g
        ge = _grad(p, e, idx)
        a, y = p.A[idx], p.y[idx]
        fe = 0.5 * np.mean((a @ e - y) ** 2) + 0.5 * p.reg * e @ e
        gamma = min(max(fe - f_star - ge @ (e - x), 0.0) / (ge @ ge), gamma_b)
        x = x - gamma * ge
        xs.append(x)
    return xs


# ---------------------------------------------------------------------------------------
# The solvers under test, by name
# ---------------------------------------------------------------------------------------

ADASAM = dict(lr=0.05, rho=0.05, b1=0.9, b2=0.99, eps=1e-8)
LIGHT = {
    "I": dict(lr=0.5, rho=0.1),
    "II": dict(lr=0.2, rho=0.05),
    "III": dict(lr=0.05, rho=0.02, b1=0.8, b2=0.95),
}


def _run(name, p, x0, batch_size, steps=STEPS):
    kw = dict(steps=steps, batch_size=batch_size, seed=SEED)
    if name == "adasam":
        return S.adasam(p, x0, **ADASAM, **kw)
    if name.startswith("lightsam-"):
        v = name.split("-")[1]
        return S.lightsam(p, x0, variant=v, eps=1e-8, **LIGHT[v], **kw)
    if name == "sa_sam":
        return S.sa_sam(p, x0, lr0=0.05, **kw)
    if name == "khanh":
        return S.sam(p, x0, schedule=S.khanh_schedule(p.L), lambd=0.0, **kw)
    if name == "oikonomou":
        return S.sam(p, x0, schedule=S.oikonomou_schedule(p.L), lambd=0.0, **kw)
    if name == "oikonomou_stochastic":
        sch = S.oikonomou_stochastic_schedule(p.mu, p.L_max)
        return S.sam(p, x0, schedule=sch, lambd=0.0, **kw)
    if name == "af_deterministic":
        sch = S.andriushchenko_flammarion_deterministic_schedule(p.L)
        return S.sam(p, x0, schedule=sch, lambd=0.0, **kw)
    if name == "usam_sps_uncapped":
        return S.sam_sps(p, x0, rho=0.1, lambd=0.0, gamma_b=math.inf, **kw)
    if name == "usam_sps_rho_t":
        return S.sam_sps(p, x0, rho=lambda t: 0.2 / (1.0 + t) ** 0.5, lambd=0.0, **kw)
    raise KeyError(name)


def _reference(name, p, x0, batch_size, steps=STEPS):
    b = _batches(steps, batch_size)
    L, mu, Lm = p.L, p.mu, p.L_max
    if name == "adasam":
        return ref_adasam(p, x0, b, ADASAM["lr"], ADASAM["rho"], 0.9, 0.99, 1e-8)
    if name.startswith("lightsam-"):
        v = name.split("-")[1]
        k = LIGHT[v]
        return ref_lightsam(
            p, x0, b, k["lr"], k["rho"], v, k.get("b1", 0.9), k.get("b2", 0.999), 1e-8
        )
    if name == "sa_sam":
        return ref_sa_sam(p, x0, b, 0.05)
    if name == "khanh":
        return ref_usam(p, x0, b, lambda t: (2 / (9 * L), 1 / (2 * L)))
    if name == "oikonomou":
        rho = 1 / (6 * L)
        return ref_usam(
            p, x0, b, lambda t: ((1 - 3 * L * rho) / (2 * L * (2 * L**2 * rho**2 + 1)), rho)
        )
    if name == "oikonomou_stochastic":
        rho = mu / (2 * Lm * (mu + 2 * Lm))
        gamma = (mu - Lm * rho * (mu + 2 * Lm)) / (2 * Lm**2 * (2 * Lm**2 * rho**2 + 1))
        return ref_usam(p, x0, b, lambda t: (gamma, rho))
    if name == "af_deterministic":
        return ref_usam(p, x0, b, lambda t: (1 / (2 * L), 1 / (2 * L)))
    if name == "usam_sps_uncapped":
        return ref_usam_sps(p, x0, b, lambda t: 0.1, math.inf)
    if name == "usam_sps_rho_t":
        return ref_usam_sps(p, x0, b, lambda t: 0.2 / math.sqrt(1.0 + t), 1.0)
    raise KeyError(name)


METHODS = [
    "adasam",
    "lightsam-I",
    "lightsam-II",
    "lightsam-III",
    "sa_sam",
    "khanh",
    "oikonomou",
    "oikonomou_stochastic",
    "af_deterministic",
    "usam_sps_uncapped",
    "usam_sps_rho_t",
]


def _check(res, ref, p, rtol, atol):
    assert np.allclose(to_numpy(res.x), ref[-1], rtol=rtol, atol=atol)
    values = np.asarray(res.history["value"])
    assert values.shape == (len(ref),)
    assert np.allclose(values, [_value(p, x) for x in ref], rtol=rtol, atol=atol)


@pytest.mark.parametrize("batch_size", [None, BSZ], ids=["full", "minibatch"])
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("backend", backend_params())
def test_solver_matches_hand_transcription(problem, x0, backend, name, batch_size):
    ref = _reference(name, problem, x0, batch_size)
    moved = float(np.linalg.norm(ref[-1] - x0))
    assert moved > 1e-3, "the reference must move for the comparison to mean anything"
    res = _run(name, problem, convert(x0, backend), batch_size)
    assert (
        type(res.x).__module__.split(".")[0] == type(convert(x0, backend)).__module__.split(".")[0]
    )
    _check(res, ref, problem, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_float32_close_to_float64(problem, x0, backend, name):
    pytest.importorskip(backend if backend != "numpy" else "numpy")
    ref = _reference(name, problem, x0, BSZ)
    res = _run(name, problem, convert(x0, backend, "float32"), BSZ)
    assert str(res.x.dtype).endswith("float32")
    _check(res, ref, problem, rtol=2e-4, atol=2e-5)


def test_grad_evals_counted(problem, x0):
    assert S.adasam(problem, x0, steps=5).grad_evals == 10
    assert S.lightsam(problem, x0, variant="III", steps=5).grad_evals == 10
    # SA-SAM: 2 on the first step, then 3 with mini-batches / 2 in full batch
    assert S.sa_sam(problem, x0, steps=5, batch_size=BSZ).grad_evals == 2 + 4 * 3
    assert S.sa_sam(problem, x0, steps=5).grad_evals == 10
    res = S.sa_sam(problem, x0, lr0=0.05, steps=5)
    assert res.history["step_size"][0] == pytest.approx(0.05)


def test_schedules_reproduce_the_published_run():
    """The SAM-SPS authors' deterministic notebook prints, for L = 0.1:
    A&F rho = gamma = 5.000, Khanh rho = 5.000 / gamma = 2.222, Oikonomou rho = 1.667 /
    gamma = 2.368 (numpy_exps/exps.ipynb, cell 3 output)."""
    L = 0.1
    g, r = S.andriushchenko_flammarion_deterministic_schedule(L)(0)
    assert (round(g, 3), round(r, 3)) == (5.0, 5.0)
    g, r = S.khanh_schedule(L)(7)
    assert (round(g, 3), round(r, 3)) == (2.222, 5.0)
    g, r = S.oikonomou_schedule(L)(3)
    assert (round(g, 3), round(r, 3)) == (2.368, 1.667)
    g, r = S.oikonomou_stochastic_schedule(0.5, 2.0)(0)
    rho = 0.5 / (2 * 2.0 * 4.5)
    assert r == pytest.approx(rho)
    assert g == pytest.approx((0.5 - 2.0 * rho * 4.5) / (2 * 4.0 * (2 * 4.0 * rho**2 + 1)))
    assert g > 0


def test_sa_sam_step_size_degenerate_cases():
    x = np.array([1.0, 2.0])
    # zero gradient difference and the first step (theta = inf): both candidates
    # infinite -> the step stays eta_prev
    eta, theta = SB.sa_sam_step_size(x, x, x, x, 0.3, math.inf)
    assert float(eta) == pytest.approx(0.3) and float(theta) == pytest.approx(1.0)
    # an ordinary step: the smaller candidate wins
    eta, _ = SB.sa_sam_step_size(x, 0 * x, 2 * x, 0 * x, 10.0, 0.0)
    assert float(eta) == pytest.approx(0.25)  # ||x|| / (2 ||2x||)
    eta, _ = SB.sa_sam_step_size(x, 0 * x, 2 * x, 0 * x, 0.1, 0.0)
    assert float(eta) == pytest.approx(0.1)  # sqrt(1 + 0) * 0.1


def test_pure_rules_trace_under_jit():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x = jnp.asarray([0.5, -1.0, 2.0])
    s = jnp.asarray([1.0, 0.0, -2.0])

    @jax.jit
    def f(x, s):
        st = SB.lightsam_init(x, "III", 1e-8)
        off, st = SB.lightsam_perturbation(s, st, 0.1, "III")
        upd, st = SB.lightsam_update(s, st, 0.01, "III")
        a = SB.adasam_init(x)
        u2, a = SB.adasam_update(s, a, 0.01)
        eta, theta = SB.sa_sam_step_size(x, 0 * x, s, 0 * s, 0.2, jnp.inf)
        return off, upd, u2, eta, SB.normalized_offset(s, 0.1)

    out = f(x, s)
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in out)
    assert float(jnp.linalg.norm(out[-1])) == pytest.approx(0.1)


BAD = [
    (lambda p, x: S.adasam(p, x, lr=0.0), "lr"),
    (lambda p, x: S.adasam(p, x, lr=-1.0), "lr"),
    (lambda p, x: S.adasam(p, x, rho=-0.1), "rho"),
    (lambda p, x: S.adasam(p, x, b1=1.0), "b1"),
    (lambda p, x: S.adasam(p, x, b2=-0.5), "b2"),
    (lambda p, x: S.adasam(p, x, eps=0.0), "eps"),
    (lambda p, x: S.adasam(p, x, steps=-1), "steps"),
    (lambda p, x: S.lightsam(p, x, variant="IV"), "variant"),
    (lambda p, x: S.lightsam(p, x, lr=float("nan")), "lr"),
    (lambda p, x: S.lightsam(p, x, rho=float("inf")), "rho"),
    (lambda p, x: S.lightsam(p, x, batch_size=0), "batch_size"),
    (lambda p, x: S.sa_sam(p, x, lr0=0.0), "lr0"),
    (lambda p, x: S.khanh_schedule(0.0), "L"),
    (lambda p, x: S.khanh_schedule(1.0, rho=-1.0), "rho"),
    (lambda p, x: S.oikonomou_schedule(1.0, rho=0.5), "rho"),
    (lambda p, x: S.oikonomou_stochastic_schedule(-1.0, 1.0), "mu"),
    (lambda p, x: S.oikonomou_stochastic_schedule(0.1, 1.0, rho=1.0), "rho"),
    (lambda p, x: S.andriushchenko_flammarion_deterministic_schedule(-2.0), "L"),
    (lambda p, x: SB.lightsam_init(x, "adam"), "variant"),
]


@pytest.mark.parametrize("call,arg", BAD, ids=[f"{i}-{a}" for i, (_, a) in enumerate(BAD)])
def test_bad_arguments_raise(problem, x0, call, arg):
    with pytest.raises(ValueError, match=arg):
        call(problem, x0)
