"""The curvature probes across the dtype matrix, against a float64 NumPy reference.

Each probe of :mod:`psd_core.curvature` (Rayleigh quotients from an HVP, from gradient
differences and from values; ``hvp_from_grad``; the PSD-Probe test; the
negative-curvature step; ``is_strict_saddle``) runs on every conformance backend in
every float dtype it has (float16, bfloat16 on torch and JAX, float32, float64) on a
quadratic with a known spectrum. The reference is computed here in float64 from the
formulas, not by the core. For a quadratic every probe is exact in exact arithmetic,
so what is left is rounding, bounded per dtype by a multiple of its machine epsilon.
"""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace
from backends import backend_dtype_params, convert, to_numpy

from psd_core import curvature as C

SPECTRUM = np.array([-1.0, 2.0, 3.0, 0.5, 1.5, 2.5])
H = 0.5  # probe step: a quadratic's probes do not depend on it, only the rounding does


def _eps(dtype: str) -> float:
    return {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}[
        dtype
    ]


def _problem(backend: str, dtype: str):
    a = convert(SPECTRUM, backend, dtype)

    def grad(x):
        return a * x

    def value(x):
        xp = array_namespace(x)
        return 0.5 * xp.sum(a * x * x)

    def hvp(x, v):
        return a * v

    return grad, value, hvp


def _point_and_probe(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, SPECTRUM.size)
    v = rng.standard_normal(SPECTRUM.size)
    return x, v / np.linalg.norm(v)


def _close(got, want: float, dtype: str, scale: float) -> None:
    got = float(to_numpy(got))
    assert np.isfinite(got)
    assert abs(got - want) <= 8 * _eps(dtype) * scale, (got, want, dtype)


@pytest.mark.parametrize(("backend", "dtype"), backend_dtype_params())
def test_rayleigh_quotients_match_float64(backend, dtype):
    grad, value, hvp = _problem(backend, dtype)
    x_np, v_np = _point_and_probe()
    want = float(v_np @ (SPECTRUM * v_np))
    x, v = convert(x_np, backend, dtype), convert(v_np, backend, dtype)
    norm_a = float(np.max(np.abs(SPECTRUM)))
    _close(C.rayleigh_hvp(hvp, x, v), want, dtype, norm_a)
    # gradient differences: rounding of g(x +- h v) (size ||A|| ||x||) divided by h
    g_scale = norm_a * (np.linalg.norm(x_np) + H) / H
    _close(C.rayleigh_grad_diff(grad, x, v, H), want, dtype, g_scale)
    _close(C.rayleigh_grad_diff(grad, x, v, H, central=False), want, dtype, g_scale)
    # values: rounding of the four f terms (each at most ||A|| (||x|| + h)^2 / 2) over h^2
    f_scale = 4 * 0.5 * norm_a * (np.linalg.norm(x_np) + H) ** 2 / H**2
    _close(C.rayleigh_values(value, x, v, H), want, dtype, f_scale)


@pytest.mark.parametrize(("backend", "dtype"), backend_dtype_params())
def test_hvp_from_grad_matches_float64(backend, dtype):
    grad, _, _ = _problem(backend, dtype)
    x_np, v_np = _point_and_probe(1)
    hv = to_numpy(
        C.hvp_from_grad(grad, H)(convert(x_np, backend, dtype), convert(v_np, backend, dtype))
    )
    assert hv.dtype.kind == "f" and np.all(np.isfinite(hv))
    scale = np.max(np.abs(SPECTRUM)) * (np.linalg.norm(x_np) + H) / H
    np.testing.assert_allclose(
        hv.astype(np.float64), SPECTRUM * v_np, rtol=0, atol=8 * _eps(dtype) * scale
    )


@pytest.mark.parametrize(("backend", "dtype"), backend_dtype_params())
def test_probe_test_and_step_take_the_float64_decisions(backend, dtype):
    """The PSD-Probe test picks the same probe, says "saddle" where float64 does, and the
    negative-curvature step points the same way (the probes are well separated)."""
    grad, _, hvp = _problem(backend, dtype)
    x_np, _ = _point_and_probe(2)
    probes_np = [np.eye(SPECTRUM.size)[i] for i in (1, 0, 2)]  # curvatures 2, -1, 3
    x = convert(x_np, backend, dtype)
    probes = [convert(p, backend, dtype) for p in probes_np]
    res = C.random_probe_test(lambda v: C.rayleigh_hvp(hvp, x, v), probes)
    assert int(to_numpy(res.index)) == 1
    _close(res.min_curvature, -1.0, dtype, 3.0)
    np.testing.assert_array_equal(to_numpy(res.direction).astype(np.float64), probes_np[1])
    for gamma, want in ((0.5, True), (1.5, False)):
        assert bool(to_numpy(C.is_strict_saddle(res.min_curvature, gamma))) is want
    g_np = SPECTRUM * x_np
    step = to_numpy(C.negative_curvature_step(convert(g_np, backend, dtype), res.direction, 0.25))
    sign = -1.0 if g_np @ probes_np[1] > 0 else 1.0
    np.testing.assert_allclose(
        step.astype(np.float64), 0.25 * sign * probes_np[1], atol=4 * _eps(dtype)
    )
    assert float(g_np @ step.astype(np.float64)) <= 0.0
