"""Tests for psd_core.functions: derivatives, saddles, constants, batching, backends."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace

from psd_core import functions as F

RNG = np.random.default_rng(1234)


def _problems():
    return {
        "quartic": F.separable_quartic(5),
        "coupled_quartic": F.coupled_quartic(6, coupling=0.3),
        "coupled_quartic_big": F.coupled_quartic(30, coupling=0.1),
        "rosenbrock": F.rosenbrock(5),
        "random_quadratic": F.random_quadratic(6, seed=3, n_negative=2),
        "random_quadratic_b": F.random_quadratic(5, seed=1, n_negative=1, b_scale=1.0),
        "gaussian_wells": F.gaussian_wells(3, n_wells=5, seed=0),
        "gaussian_wells_2d": F.gaussian_wells(2, n_wells=4, seed=2),
        "ridge": F.ridge_regression(n=30, d=8, cond=10.0, seed=0),
        "ridge_noisy_reg": F.ridge_regression(
            n=25, d=6, cond=50.0, seed=1, consistent=False, reg=0.1
        ),
        "ridge_wide": F.ridge_regression(n=6, d=10, cond=5.0, seed=2),
    }


PROBLEMS = _problems()
NAMES = sorted(PROBLEMS)


def _point(p, rng=RNG, scale=0.7):
    """A generic test point inside the region where the constants hold."""
    return scale * rng.uniform(-1.0, 1.0, p.dim)


def _fd_grad(f, x, h=1e-6):
    g = np.empty_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


# ---------------------------------------------------------------------------------------
# Derivatives (NumPy float64)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_protocol(name):
    p = PROBLEMS[name]
    assert isinstance(p, F.Problem)
    assert isinstance(p.dim, int) and isinstance(p.name, str)
    assert p.name in F.PROBLEMS
    assert p.ell > 0 and p.rho > 0
    assert p.f_star is None or np.isfinite(p.f_star)
    x = _point(p)
    assert np.ndim(p.value(x)) == 0
    assert p.grad(x).shape == (p.dim,)
    assert p.hvp(x, x).shape == (p.dim,)
    assert p.hess(x).shape == (p.dim, p.dim)
    s = p.saddle()
    assert isinstance(s, np.ndarray) and s.dtype == np.float64 and s.shape == (p.dim,)


@pytest.mark.parametrize("name", NAMES)
def test_grad_matches_finite_differences(name):
    p = PROBLEMS[name]
    x = _point(p)
    g = p.grad(x)
    fd = _fd_grad(lambda z: float(p.value(z)), x)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(g).max()))


@pytest.mark.parametrize("name", NAMES)
def test_hvp_matches_hessian_and_finite_differences(name):
    p = PROBLEMS[name]
    x = _point(p)
    v = RNG.standard_normal(p.dim)
    h = p.hess(x)
    hv = p.hvp(x, v)
    scale = max(1.0, np.abs(h).max())
    np.testing.assert_allclose(hv, h @ v, rtol=1e-12, atol=1e-12 * scale * np.abs(v).sum())
    eps = 1e-6
    fd = (p.grad(x + eps * v) - p.grad(x - eps * v)) / (2 * eps)
    np.testing.assert_allclose(hv, fd, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(h, h.T, rtol=0, atol=1e-13 * scale)


@pytest.mark.parametrize("name", NAMES)
def test_ell_and_rho_bounds_hold_on_samples(name):
    p = PROBLEMS[name]
    rng = np.random.default_rng(7)
    # Region where the documented constants hold.
    scale = 1.5 if name == "rosenbrock" else 1.0 if "quartic" in name else 4.0
    for _ in range(20):
        x = rng.uniform(-scale, scale, p.dim)
        y = rng.uniform(-scale, scale, p.dim)
        hx, hy = p.hess(x), p.hess(y)
        assert np.linalg.norm(hx, 2) <= p.ell * (1 + 1e-12)
        if not p.rho_assumed:
            assert np.linalg.norm(hx - hy, 2) <= p.rho * np.linalg.norm(x - y) * (1 + 1e-12)
    # Rosenbrock's Gershgorin bound is attained up to a modest factor at the corner.
    if name == "rosenbrock":
        corner = np.full(p.dim, -1.5)
        assert np.linalg.norm(p.hess(corner), 2) > 0.5 * p.ell


# ---------------------------------------------------------------------------------------
# Saddles and minima
# ---------------------------------------------------------------------------------------


SADDLE_NAMES = [
    "quartic",
    "coupled_quartic",
    "coupled_quartic_big",
    "random_quadratic",
    "random_quadratic_b",
    "gaussian_wells",
    "gaussian_wells_2d",
]


@pytest.mark.parametrize("name", SADDLE_NAMES)
def test_saddle_is_strict(name):
    p = PROBLEMS[name]
    assert p.has_saddle
    s = p.saddle()
    assert np.linalg.norm(p.grad(s)) <= 1e-9
    eig = np.linalg.eigvalsh(p.hess(s))
    assert eig[0] < -1e-3


def test_quartic_saddle_details():
    p = F.separable_quartic(4)
    np.testing.assert_array_equal(p.saddle(), np.zeros(4))
    np.testing.assert_allclose(p.hess(p.saddle()), -2 * np.eye(4))
    xm = p.minimizer()
    assert abs(p.value(xm) - p.f_star) < 1e-14
    assert np.linalg.norm(p.grad(xm)) < 1e-14
    assert p.f_star == -1.0


def test_coupled_quartic_hessian_at_origin():
    d, c = 30, 0.1
    p = F.coupled_quartic(d, c)
    h0 = p.hess(np.zeros(d))
    np.testing.assert_allclose(h0, -2 * np.eye(d) + c * (np.ones((d, d)) - np.eye(d)))
    eig = np.linalg.eigvalsh(h0)
    np.testing.assert_allclose(eig[0], -2 - c)
    np.testing.assert_allclose(eig[-1], -2 + c * (d - 1))
    assert eig[-1] > 0  # a genuine saddle for c (d - 1) > 2
    # The O(d) pair-sum formula agrees with the explicit double sum.
    x = RNG.standard_normal(d)
    pairs = sum(x[i] * x[j] for i in range(d) for j in range(i + 1, d))
    np.testing.assert_allclose(p.value(x), np.sum(x**4 - x**2) + c * pairs, rtol=1e-12)


def test_rosenbrock_start_and_minimum():
    p = F.rosenbrock(6)
    assert not p.has_saddle
    s = p.saddle()
    np.testing.assert_array_equal(s, np.zeros(6))
    np.testing.assert_allclose(p.grad(s), [-2, -2, -2, -2, -2, 0])
    np.testing.assert_allclose(np.diag(p.hess(s)), [2, 202, 202, 202, 202, 200])
    assert p.value(np.ones(6)) == 0.0 and p.f_star == 0.0
    assert np.linalg.norm(p.grad(np.ones(6))) == 0.0
    with pytest.raises(ValueError):
        F.rosenbrock(1)


def test_random_quadratic_spectrum():
    p = F.random_quadratic(8, seed=5, n_negative=3)
    eig = np.linalg.eigvalsh(p.hess(np.zeros(8)))
    np.testing.assert_allclose(eig[:3], -1.0, atol=1e-12)
    assert np.all(eig[3:] >= 0.5 - 1e-12) and np.all(eig[3:] <= 2.0 + 1e-12)
    np.testing.assert_allclose(eig, p.eigvals, atol=1e-12)
    assert p.ell == pytest.approx(np.abs(eig).max())
    assert p.f_star is None and p.rho_assumed
    np.testing.assert_array_equal(p.saddle(), np.zeros(8))
    convex = F.random_quadratic(4, seed=0, n_negative=0, b_scale=1.0)
    assert not convex.has_saddle
    assert convex.f_star == pytest.approx(float(convex.value(convex.saddle())))
    with pytest.raises(ValueError):
        F.random_quadratic(3, n_negative=4)


def test_gaussian_wells_minima_and_attributes():
    p = F.gaussian_wells(3, n_wells=5, seed=0)
    assert p.mus.shape == (5, 3) and p.amps.shape == (5,) and p.sigmas.shape == (5,)
    assert 0 <= p.global_well < 5
    assert p.f_star == pytest.approx(float(p.value(p.x_star)))
    assert p.f_star <= float(np.min(p.value(p.mus))) + 1e-15
    np.testing.assert_allclose(p.local_values, p.value(p.local_minima))
    for m in p.local_minima:
        assert np.linalg.norm(p.grad(m)) < 1e-9
        assert np.linalg.eigvalsh(p.hess(m))[0] > 0
    # Value far from every well vanishes.
    assert abs(float(p.value(np.full(3, 100.0)))) < 1e-100


def test_gaussian_wells_batch_matches_pointwise():
    p = F.gaussian_wells(4, n_wells=6, seed=1)
    n = 7
    xs = RNG.uniform(-3, 3, (n, p.dim))
    vs = RNG.standard_normal((n, p.dim))
    val, g, h, hv = p.value(xs), p.grad(xs), p.hess(xs), p.hvp(xs, vs)
    assert val.shape == (n,) and g.shape == (n, p.dim)
    assert h.shape == (n, p.dim, p.dim) and hv.shape == (n, p.dim)
    near = p.nearest_well(xs)
    assert near.shape == (n,)
    for i in range(n):
        np.testing.assert_allclose(val[i], p.value(xs[i]), rtol=1e-14, atol=1e-300)
        np.testing.assert_allclose(g[i], p.grad(xs[i]), rtol=1e-14, atol=1e-16)
        np.testing.assert_allclose(h[i], p.hess(xs[i]), rtol=1e-14, atol=1e-16)
        np.testing.assert_allclose(hv[i], p.hvp(xs[i], vs[i]), rtol=1e-14, atol=1e-16)
        assert near[i] == np.argmin(np.linalg.norm(xs[i] - p.mus, axis=1))
        assert int(p.nearest_well(xs[i])) == near[i]
    # A single direction v broadcasts against a batch of points.
    np.testing.assert_allclose(p.hvp(xs, vs[0]), np.stack([p.hvp(x, vs[0]) for x in xs]))
    np.testing.assert_array_equal(p.in_well(xs, 2), near == 2)
    np.testing.assert_array_equal(p.nearest_well(p.mus), np.arange(6))


def test_gaussian_wells_without_saddle_raises():
    p = F.gaussian_wells(1, n_wells=5, seed=0)  # all wells merge into one basin
    assert not p.has_saddle
    with pytest.raises(ValueError):
        p.saddle()


# ---------------------------------------------------------------------------------------
# Ridge regression
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cond", [1.0, 10.0, 1e4])
def test_ridge_conditioning(cond):
    p = F.ridge_regression(n=40, d=12, cond=cond, seed=3)
    eig = np.linalg.eigvalsh(p.hess(np.zeros(p.dim)))
    assert abs(eig[-1] / eig[0] - cond) <= 1e-8 * cond
    assert p.L == pytest.approx(eig[-1], rel=1e-12)
    assert p.mu == pytest.approx(eig[0], rel=1e-8)
    assert p.ell == p.L
    np.testing.assert_allclose(p.L_max, np.max(np.sum(p.A**2, axis=1)))


def test_ridge_consistent_interpolates():
    p = F.ridge_regression(n=30, d=8, cond=10.0, seed=0)
    assert p.f_star == 0.0 and not p.has_saddle and p.rho_assumed
    assert float(p.value(p.x_true)) <= 1e-28
    assert np.linalg.norm(p.grad(p.x_true)) <= 1e-13
    for i in range(p.n):  # interpolation: every f_i vanishes at x_true
        assert float(p.value_batch(p.x_true, [i])) <= 1e-28
    wide = F.ridge_regression(n=6, d=10, cond=5.0, seed=2)
    assert wide.mu == 0.0 and wide.f_star == 0.0
    assert float(wide.value(wide.x_opt)) <= 1e-28


def test_ridge_noisy_regularized_optimum():
    p = F.ridge_regression(n=25, d=6, cond=50.0, seed=1, consistent=False, reg=0.1)
    assert np.linalg.norm(p.grad(p.x_opt)) <= 1e-12
    assert p.f_star == pytest.approx(float(p.value(p.x_opt)))
    assert p.f_star < float(p.value(p.x_true))
    eig = np.linalg.eigvalsh(p.hess(np.zeros(p.dim)))
    assert p.mu == pytest.approx(eig[0], rel=1e-10)
    assert p.L == pytest.approx(eig[-1], rel=1e-12)
    np.testing.assert_allclose(eig[-1] - 0.1, 50.0 * (eig[0] - 0.1), rtol=1e-8)
    np.testing.assert_allclose(p.L_max, np.max(np.sum(p.A**2, axis=1)) + 0.1)
    lsq = F.ridge_regression(n=25, d=6, seed=1, consistent=False)
    assert lsq.f_star > 0 and np.linalg.norm(lsq.grad(lsq.x_opt)) <= 1e-12


@pytest.mark.parametrize("name", ["ridge", "ridge_noisy_reg", "ridge_wide"])
def test_ridge_minibatch(name):
    p = PROBLEMS[name]
    x = RNG.standard_normal(p.dim)
    v = RNG.standard_normal(p.dim)
    full = np.arange(p.n)
    np.testing.assert_allclose(p.value_batch(x, full), p.value(x), rtol=1e-13)
    np.testing.assert_allclose(p.grad_batch(x, full), p.grad(x), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(p.hvp_batch(x, v, full), p.hvp(x, v), rtol=1e-12, atol=1e-13)
    idx = np.array([3, 0, 3, 5])
    vals = [float(p.value_batch(x, [i])) for i in idx]
    grads = [p.grad_batch(x, np.array([i])) for i in idx]
    np.testing.assert_allclose(p.value_batch(x, idx), np.mean(vals), rtol=1e-13)
    np.testing.assert_allclose(p.grad_batch(x, idx), np.mean(grads, axis=0), rtol=1e-12)
    a, y = p.A[3], p.y[3]
    f3 = 0.5 * (a @ x - y) ** 2 + 0.5 * p.reg * x @ x
    np.testing.assert_allclose(p.value_batch(x, [3]), f3, rtol=1e-13)


def test_registry():
    assert set(F.PROBLEMS) == {
        "quartic",
        "coupled_quartic",
        "rosenbrock",
        "random_quadratic",
        "gaussian_wells",
        "ridge",
    }
    for key, ctor in F.PROBLEMS.items():
        p = ctor(4, 3) if key == "ridge" else ctor(3)
        assert p.name == key
        assert set(F.__all__) >= {ctor.__name__, type(p).__name__}


# ---------------------------------------------------------------------------------------
# Cross-backend agreement
# ---------------------------------------------------------------------------------------


def _to_numpy(a):
    try:
        return np.asarray(a)
    except Exception:  # pragma: no cover - backends without __array__
        return np.from_dlpack(a)


@pytest.fixture(scope="module", params=["numpy", "array_api_strict", "torch", "jax"])
def backend(request):
    """``(name, to_backend)`` for float64 arrays of each available library."""
    name = request.param
    if name == "numpy":
        yield name, lambda a: np.asarray(a, dtype=np.float64)
    elif name == "array_api_strict":
        xp = pytest.importorskip("array_api_strict")
        yield name, lambda a: xp.asarray(np.asarray(a), dtype=xp.float64)
    elif name == "torch":
        torch = pytest.importorskip("torch")
        yield name, lambda a: torch.asarray(np.asarray(a), dtype=torch.float64)
    else:
        jax = pytest.importorskip("jax")
        old = jax.config.read("jax_enable_x64")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        try:
            yield name, lambda a: jnp.asarray(np.asarray(a), dtype=jnp.float64)
        finally:
            jax.config.update("jax_enable_x64", old)


def _close(got, want, tol=1e-12):
    got = _to_numpy(got)
    want = np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("name", NAMES)
def test_backends_agree_with_numpy(backend, name):
    bname, to = backend
    p = PROBLEMS[name]
    x = _point(p, np.random.default_rng(11))
    v = np.random.default_rng(12).standard_normal(p.dim)
    xb, vb = to(x), to(v)
    for _ in range(2):  # second pass exercises the constant cache
        _close(p.value(xb), p.value(x))
        _close(p.grad(xb), p.grad(x))
        _close(p.hvp(xb, vb), p.hvp(x, v))
        _close(p.hess(xb), p.hess(x))
    if name.startswith("gaussian"):
        xs = np.random.default_rng(13).uniform(-3, 3, (4, p.dim))
        vs = np.random.default_rng(14).standard_normal((4, p.dim))
        xsb, vsb = to(xs), to(vs)
        _close(p.value(xsb), p.value(xs))
        _close(p.grad(xsb), p.grad(xs))
        _close(p.hvp(xsb, vsb), p.hvp(xs, vs))
        _close(p.hess(xsb), p.hess(xs))
        np.testing.assert_array_equal(_to_numpy(p.nearest_well(xsb)), p.nearest_well(xs))
    if name.startswith("ridge"):
        idx = np.array([0, 2, 2, 5])
        _close(p.value_batch(xb, idx), p.value_batch(x, idx))
        _close(p.grad_batch(xb, idx), p.grad_batch(x, idx))
        _close(p.hvp_batch(xb, vb, idx), p.hvp_batch(x, v, idx))
        _close(p.grad_batch(xb, idx.tolist()), p.grad_batch(x, idx))
        idx_b = array_namespace(xb).asarray(idx)  # an index array of the backend itself
        _close(p.grad_batch(xb, idx_b), p.grad_batch(x, idx))


@pytest.mark.parametrize("name", ["quartic", "rosenbrock", "random_quadratic", "gaussian_wells"])
def test_float32_preserved(backend, name):
    bname, to = backend
    p = PROBLEMS[name]
    x = _point(p, np.random.default_rng(21))
    xb = to(x)
    x32 = xb.astype(np.float32) if bname == "numpy" else None
    if bname == "torch":
        import torch

        x32 = xb.to(torch.float32)
    elif bname == "jax":
        import jax.numpy as jnp

        x32 = xb.astype(jnp.float32)
    elif bname == "array_api_strict":
        import array_api_strict as xps

        x32 = xps.astype(xb, xps.float32)
    g = p.grad(x32)
    assert g.dtype == x32.dtype
    assert p.hess(x32).dtype == x32.dtype
    np.testing.assert_allclose(_to_numpy(g), p.grad(x), rtol=1e-4, atol=1e-4 * p.ell)


def test_jax_jit_traces():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    for name in ["quartic", "coupled_quartic", "rosenbrock", "random_quadratic", "gaussian_wells"]:
        p = PROBLEMS[name]
        x = jnp.asarray(_point(p), dtype=jnp.float32)
        for f in (p.value, p.grad, p.hess):
            np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), np.asarray(f(x)), rtol=1e-5)
        np.testing.assert_allclose(
            np.asarray(jax.jit(p.hvp)(x, x)), np.asarray(p.hvp(x, x)), rtol=1e-5, atol=1e-5
        )
    p = PROBLEMS["ridge"]
    x = jnp.asarray(_point(p), dtype=jnp.float32)
    idx = jnp.asarray([1, 4, 7])
    np.testing.assert_allclose(
        np.asarray(jax.jit(p.grad_batch)(x, idx)), np.asarray(p.grad_batch(x, idx)), rtol=1e-5
    )
