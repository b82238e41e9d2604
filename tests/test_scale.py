"""Scale: the paper's constants at their extremes on every backend.

M up to 1e12 and beyond, T up to 1e9, epsilon down to 1e-8, dim up to 1e6. The theory
constants are checked against SPEC's formulas transcribed here; the transformations
built from them must construct, trace and perturb at a saddle on every backend (JAX
without x64 is covered in ``test_precision_regressions.py``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from backends import backend_params, convert, to_numpy

import psd_core
from psd_core.theory import psd_constants

EXTREMES = [
    # epsilon, ell, rho, delta, delta_f, dim
    (1e-8, 1.0, 1.0, 0.1, 1.0, 10**6),
    (1e-6, 20.0, 24.0, 1e-3, 10.0, 10**6),
    (1e-3, 20.0, 24.0, 0.1, 1.0, 10),
    (1e-5, 1.0, 1e-4, 0.1, 1.0, 10**3),  # gamma = 3e-5: T ~ 1e7
]


@pytest.mark.parametrize("args", EXTREMES)
def test_theory_constants_match_spec_at_extremes(args) -> None:
    eps, ell, rho, delta, delta_f, dim = args
    c = psd_constants(eps, ell, rho, delta, delta_f, dim=dim)
    gamma = math.sqrt(rho * eps)
    big_m = 1 + math.ceil(128 * ell * delta_f / eps**2)
    big_t = math.ceil(8 * ell / gamma * math.log(16 * dim * big_m / delta))
    assert c.max_episodes == big_m and isinstance(c.max_episodes, int)
    assert c.episode_length == big_t and isinstance(c.episode_length, int)
    assert math.isclose(c.radius, math.sqrt(eps / rho) / 8, rel_tol=1e-12)
    assert math.isclose(c.step_size, 1 / (2 * ell), rel_tol=1e-12)
    assert big_m > 2**31  # every row exercises counters beyond int32


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("args", EXTREMES[1:])
def test_psd_from_theory_perturbs_at_a_saddle_at_extremes(backend: str, args) -> None:
    eps, ell, rho, delta, delta_f, _ = args
    d = 6
    c = psd_constants(eps, ell, rho, delta, delta_f, dim=d)
    tx = psd_core.psd_from_theory(eps, ell, rho, delta, delta_f, dim=d)
    x = [convert(np.zeros(d), backend, "float32")]
    z = [convert(np.linspace(-1, 1, d), backend, "float32")]
    state = tx.init(x)
    upd, state = tx.update(
        x, state, x, normals=z, uniform=convert(np.asarray(0.5), backend, "float32")
    )
    assert bool(state.perturbed) and int(state.episodes) == 1
    assert int(state.episode_left) == c.episode_length
    norm = float(np.linalg.norm(to_numpy(upd[0])))
    want = c.radius * 0.5 ** (1 / d)
    assert math.isclose(norm, want, rel_tol=1e-5)
    # the episode runs without consulting the gate; counters keep counting
    for _ in range(3):
        upd, state = tx.update(
            x, state, x, normals=z, uniform=convert(np.asarray(0.5), backend, "float32")
        )
    assert int(state.episode_left) == c.episode_length - 3
    assert int(state.count) == 4 and int(state.episodes) == 1


@pytest.mark.parametrize("backend", backend_params())
def test_dimension_one_million_constants_and_ball(backend: str) -> None:
    """d = 1e6: the ball scale r u^(1/d)/||z|| stays finite and the radius is r u^(1/d)."""
    from psd_core import random as R

    d = 10**6
    z = [convert(np.random.default_rng(0).standard_normal(d), backend, "float32")]
    u = convert(np.asarray(1e-30), backend, "float32")
    xi = R.uniform_ball(z, u, 1e-3)
    n = float(np.linalg.norm(np.asarray(to_numpy(xi[0]), dtype=np.float64)))
    assert math.isclose(n, 1e-3 * (1e-30) ** (1 / d), rel_tol=1e-4)
