"""``min_curvature`` against ``numpy.linalg.eigvalsh`` on hard spectra, in every precision.

Issue 11, bug 2: in float32 the old Lanczos turned rounding noise into new directions
once the Krylov space was exhausted and reported eigenvalues far below the true
``lambda_min`` (-87 for ``3 I``). These tests compare every backend of the conformance
suite, in float32 and float64, with an independent float64 reference (``eigvalsh`` of
the very matrix the backend multiplies by, i.e. after the cast to its dtype), for
clustered, repeated, indefinite and near-singular spectra and for iteration counts
from 1 to beyond the dimension.

Tolerances (stated per dtype, relative to ``||H||``): ``TOL[dtype] * ||H||`` with
``TOL = {float32: 1e-4, float64: 1e-10}`` (16-bit HVPs: ``{float16: 1e-2, bfloat16: 6e-2}``,
a few units of the dtype's resolution). Ritz values of an orthonormal basis lie in
``[lambda_min, lambda_max]``, so *any* iteration count must report a value no lower
than ``lambda_min - tol``; with enough iterations to span the Krylov space the value
must equal ``lambda_min`` within ``tol``.
"""

from __future__ import annotations

import numpy as np
import pytest
from backends import DTYPES, available, backend_params, convert, to_numpy

from psd_core import curvature as C

TOL = {"float32": 1e-4, "float64": 1e-10, "float16": 1e-2, "bfloat16": 6e-2}
LOW = [
    pytest.param(b, d, id=f"{b}-{d}", marks=pytest.mark.skipif(not available(b), reason=b))
    for b in ("numpy", "torch", "jax")
    for d in DTYPES[b]
    if d in ("float16", "bfloat16")
]


def _orthogonal(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _spectrum(name: str, d: int) -> np.ndarray:
    rng = np.random.default_rng(d)
    if name == "3I":  # one eigenvalue repeated d times: Krylov space of dimension 1
        return np.full(d, 3.0)
    if name == "{1,2}":  # two clusters of repeated eigenvalues
        return np.resize([1.0, 2.0], d)
    if name == "{-1,2}":  # indefinite, repeated
        return np.resize([-1.0, 2.0], d)
    if name == "tiny_negative":  # one tiny negative among many positive
        return np.concatenate([[-1e-3], rng.uniform(0.5, 2.0, d - 1)])
    if name == "near_singular":  # positive definite, one eigenvalue near 0
        return np.concatenate([[1e-6], rng.uniform(1.0, 2.0, d - 1)])
    if name == "clustered":  # a tight cluster at the bottom plus a spread
        return np.concatenate(
            [1.0 + 1e-3 * rng.standard_normal(d // 2), rng.uniform(2, 5, d - d // 2)]
        )
    raise ValueError(name)


SPECTRA = ["3I", "{1,2}", "{-1,2}", "tiny_negative", "near_singular", "clustered"]
DISTINCT = {"3I": 1, "{1,2}": 2, "{-1,2}": 2}


def _problem(name: str, d: int, dtype: str, dense: bool) -> tuple[np.ndarray, np.ndarray]:
    """(H as the backend will see it, in ``dtype``; its float64 eigenvalues)."""
    lam = _spectrum(name, d)
    h = (_orthogonal(d, 7) * lam) @ _orthogonal(d, 7).T if dense else np.diag(lam)
    h = ((h + h.T) / 2).astype(dtype)
    return h, np.linalg.eigvalsh(h.astype(np.float64))


def _check(res, eig: np.ndarray, h: np.ndarray, dtype: str, k: int, full: bool) -> None:
    tol = TOL[dtype] * float(np.max(np.abs(eig)))
    value = float(to_numpy(res.value))
    ritz = to_numpy(res.ritz_values).astype(np.float64)
    n_live = int(to_numpy(res.krylov_dim))
    assert ritz.shape == (min(k, h.shape[0]),)
    assert 1 <= n_live <= ritz.shape[0]
    # no invented eigenvalue: every valid Ritz value lies in [lambda_min, lambda_max]
    live, pad = ritz[:n_live], ritz[n_live:]
    assert np.all(np.isfinite(live)), ritz
    assert np.all(np.isnan(pad)), ritz  # padding is never reported as a value
    assert np.all(np.diff(live) >= -tol)
    assert live[0] >= eig[0] - tol and live[-1] <= eig[-1] + tol, (live, eig[[0, -1]])
    assert value == pytest.approx(live[0], abs=0.0)
    if full:
        assert abs(value - eig[0]) <= tol, (value, eig[0])
    u = to_numpy(res.direction).astype(np.float64)
    assert abs(np.linalg.norm(u) - 1.0) <= 10 * TOL[dtype]
    assert abs(u @ h.astype(np.float64) @ u - value) <= tol


# ------------------------------------------------------------------------------------
# Bug 2: the table (float32, NumPy, diagonal Hessians), fails on the old Lanczos
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spectrum", "d", "iters"),
    [
        ("3I", 10, 10),
        ("{1,2}", 20, 30),
        ("{1,2}", 100, 30),
        ("{-1,2}", 20, 50),
        ("{-1,2}", 1000, 50),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_lanczos_invents_no_negative_eigenvalue(spectrum, d, iters, seed) -> None:
    """Old results (seed 0): 3I -> -87.3, {1,2} -> -96.8 / -827, {-1,2} -> -172 / -4232."""
    h = np.resize({"3I": [3.0], "{1,2}": [1.0, 2.0], "{-1,2}": [-1.0, 2.0]}[spectrum], d)
    h = h.astype(np.float32)
    res = C.min_curvature(
        lambda _x, v: h * v, np.zeros(d, dtype=np.float32), iters=iters, seed=seed
    )
    assert float(res.value) == pytest.approx(float(h.min()), abs=1e-5)
    assert int(res.krylov_dim) == DISTINCT[spectrum]  # stopped on the invariant subspace
    ritz = np.asarray(res.ritz_values)
    np.testing.assert_allclose(ritz[: DISTINCT[spectrum]], np.unique(h), atol=1e-5)
    assert np.all(np.isnan(ritz[DISTINCT[spectrum] :]))


# ------------------------------------------------------------------------------------
# Spectra x backends x dtypes x iteration counts
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spectrum", SPECTRA)
def test_min_curvature_matches_eigvalsh_on_every_backend(backend, dtype, spectrum) -> None:
    d = 12
    for dense in (False, True):
        h_np, eig = _problem(spectrum, d, dtype, dense)
        h = convert(h_np, backend, dtype)
        x = convert(np.zeros(d), backend, dtype)
        v0 = convert(np.random.default_rng(3).standard_normal(d), backend, dtype)
        for k in (1, 3, d, 2 * d):
            res = C.min_curvature(lambda _x, v, h=h: h @ v, x, iters=k, v0=v0)
            distinct = DISTINCT.get(spectrum, d)
            _check(res, eig, h_np, dtype, k, full=k >= distinct)
            if spectrum in DISTINCT and not dense:
                assert int(to_numpy(res.krylov_dim)) <= distinct


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spectrum", SPECTRA)
def test_min_curvature_under_jax_jit_matches_eigvalsh(dtype, spectrum) -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    d = 12
    h_np, eig = _problem(spectrum, d, dtype, dense=True)
    h = jnp.asarray(h_np)
    v0 = jnp.asarray(np.random.default_rng(3).standard_normal(d), dtype=dtype)
    for k in (3, 2 * d):

        def run(x, v0, k=k):
            res = C.min_curvature(lambda _x, v: h @ v, x, iters=k, v0=v0)
            return res.value, res.direction, res.ritz_values, res.krylov_dim

        value, direction, ritz, n = jax.jit(run)(jnp.zeros(d, dtype=dtype), v0)
        eager = C.min_curvature(lambda _x, v: h @ v, jnp.zeros(d, dtype=dtype), iters=k, v0=v0)
        res = eager._replace(value=value, direction=direction, ritz_values=ritz, krylov_dim=n)
        _check(res, eig, h_np, dtype, k, full=k >= DISTINCT.get(spectrum, d))
        assert int(n) == int(eager.krylov_dim)
        tol = TOL[dtype] * float(np.max(np.abs(eig)))
        assert abs(float(value) - float(eager.value)) <= tol


def test_min_curvature_on_a_tree_of_float32_leaves() -> None:
    """A 3-leaf tree (shapes (2, 3), (4,), ()) with Hessian diag{-1, 2, ...}: same answer."""
    shapes = [(2, 3), (4,), ()]
    scales = [np.resize([-1.0, 2.0], s).astype(np.float32) for s in shapes]
    x = [np.zeros(s, dtype=np.float32) for s in shapes]
    res = C.min_curvature(lambda _x, v: [s * vi for s, vi in zip(scales, v)], x, iters=50, seed=1)
    assert float(res.value) == pytest.approx(-1.0, abs=1e-5)
    assert int(res.krylov_dim) == 2
    assert isinstance(res.direction, list) and [u.shape for u in res.direction] == shapes


def test_breakdown_tolerance_is_validated_and_can_be_raised() -> None:
    h = np.linspace(1.0, 2.0, 8)
    with pytest.raises(ValueError, match="tol"):
        C.min_curvature(lambda _x, v: h * v, np.zeros(8), iters=8, tol=-1.0)
    loose = C.min_curvature(lambda _x, v: h * v, np.zeros(8), iters=8, tol=1e15)
    assert int(loose.krylov_dim) == 1  # everything below 1e15 eps ||H|| counts as breakdown
    exact = C.min_curvature(lambda _x, v: h * v, np.zeros(8), iters=8)
    assert int(exact.krylov_dim) == 8 and float(exact.value) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(("backend", "dtype"), LOW)
@pytest.mark.parametrize("spectrum", SPECTRA)
def test_min_curvature_with_16bit_hvps_matches_eigvalsh(backend, dtype, spectrum) -> None:
    """float16 / bfloat16 parameters and HVPs (the precision matrix's 16-bit column): no
    invented eigenvalue, padding NaN, and lambda_min within a few units of the dtype's
    resolution of ``eigvalsh`` of the matrix as the backend holds it."""
    d = 12
    for dense in (False, True):
        h64, _ = _problem(spectrum, d, "float64", dense)
        h = convert(h64, backend, dtype)
        h_held = np.asarray(to_numpy(h), dtype=np.float64)  # after the cast to the dtype
        eig = np.linalg.eigvalsh(h_held)
        x = convert(np.zeros(d), backend, dtype)
        v0 = convert(np.random.default_rng(3).standard_normal(d), backend, dtype)
        for k in (1, 3, d, 2 * d):
            res = C.min_curvature(lambda _x, v, h=h: h @ v, x, iters=k, v0=v0)
            _check(res, eig, h_held, dtype, k, full=k >= DISTINCT.get(spectrum, d))
