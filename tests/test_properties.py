"""Property tests (hypothesis) of the core's formulas against plain transcriptions."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import psd_core
from psd_core import _array as A
from psd_core import polyak as Y
from psd_core import random as R
from psd_core.theory import probe_constants, psd_constants

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
vec = st.integers(1, 12).flatmap(lambda n: arrays(np.float64, (n,), elements=finite))


@settings(max_examples=200, deadline=None)
@given(
    loss=st.floats(-1e6, 1e6, allow_nan=False),
    f_star=st.floats(-10, 10),
    inner=st.floats(-1e6, 1e6, allow_nan=False),
    g=vec,
    gamma_b=st.floats(0, 10),
)
def test_polyak_step_in_range_and_finite(loss, f_star, inner, g, gamma_b) -> None:
    """For any finite input, zero gradients included, the sps+ step is finite and in [0, gamma_b]."""
    for grad in (g, np.zeros_like(g)):
        step = float(
            Y.polyak_step_size(
                np.asarray(loss), f_star, np.asarray(inner), A.tree_sq_norm([grad]), gamma_b
            )
        )
        assert math.isfinite(step)
        assert 0.0 <= step <= gamma_b
        num = max(loss - f_star - inner, 0.0)
        expected = min(num / max(float(np.sum(grad * grad)), 1e-12), gamma_b)
        assert math.isclose(step, expected, rel_tol=1e-12, abs_tol=1e-300)


@settings(max_examples=100, deadline=None)
@given(x=vec, scale=st.floats(0.01, 3.0), gamma_b=st.floats(0.01, 5.0), f_star=st.floats(-1.0, 0.0))
def test_rho_zero_is_sps_max(x, scale, gamma_b, f_star) -> None:
    """With rho = 0, SAM-SPS is SPS_max: x+ = x - min((f - f*)/||g||^2, gamma_b) g."""

    def vg(tree):
        y = tree[0]
        return scale * float(np.sum(y**2)) + 0.1 * float(np.sum(y**4)), [2 * scale * y + 0.4 * y**3]

    tx = psd_core.sam_sps(rho=0.0, lambd=1.0, f_star=f_star, gamma_b=gamma_b)
    loss, g = vg([x])
    upd, state = tx.update(g, tx.init([x]), [x], value_and_grad_fn=vg, value=loss)
    gg = float(np.sum(g[0] ** 2))
    step = min(max(loss - f_star, 0.0) / max(gg, 1e-12), gamma_b)
    np.testing.assert_allclose(upd[0], -step * g[0], rtol=1e-12, atol=1e-300)
    assert math.isclose(float(state.step_size), step, rel_tol=1e-12, abs_tol=1e-300)


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    radius=st.floats(0.0, 10.0),
    u=st.floats(0.0, 1.0),
)
def test_uniform_ball_norm_is_r_u_to_one_over_d(shape, seed, radius, u) -> None:
    z = [np.random.default_rng(seed).standard_normal(tuple(shape))]
    xi = R.uniform_ball(z, np.asarray(u), radius)
    d = int(np.prod(shape))
    norm = float(np.sqrt(A.tree_sq_norm(xi)))
    assert norm <= radius * (1 + 1e-12)
    assert math.isclose(norm, radius * u ** (1.0 / d), rel_tol=1e-10, abs_tol=1e-12)


def test_uniform_ball_radius_distribution() -> None:
    """P(||xi|| <= s r) = s^d for xi ~ Uniform(B_d(0, r)) (Kolmogorov-Smirnov distance < 0.03)."""
    d, r, n = 5, 2.0, 4000
    draws = psd_core.HostDraws(7)
    x = [np.zeros(d)]
    norms = np.sort(
        [
            float(
                np.sqrt(
                    A.tree_sq_norm(
                        R.uniform_ball(draws.normals_like(x), draws.uniform_like(x[0]), r)
                    )
                )
            )
            for _ in range(n)
        ]
    )
    cdf = (norms / r) ** d
    ks = np.max(np.abs(cdf - np.arange(1, n + 1) / n))
    assert ks < 0.03, ks


@settings(max_examples=100, deadline=None)
@given(g=vec, lr=st.floats(0.0, 1.0), steps=st.integers(1, 5))
def test_psd_with_a_gate_that_never_fires_is_gradient_descent(g, lr, steps) -> None:
    """epsilon = -- the gate threshold below every nonzero norm -- gives x+ = x - lr g exactly."""
    g = g + 1e-3  # nonzero gradient, so ||g|| > epsilon = 0
    tx = psd_core.psd(lr, 0.0, 1.0, 5)
    x = [np.ones_like(g)]
    state = tx.init(x)
    z = [np.ones_like(g)]
    for _ in range(steps):
        upd, state = tx.update([g], state, x, normals=z, uniform=np.asarray(0.5))
        np.testing.assert_array_equal(upd[0], -lr * g)
        assert not bool(state.perturbed)
    assert int(state.episodes) == 0


@settings(max_examples=200, deadline=None)
@given(
    epsilon=st.floats(1e-4, 10),
    ell=st.floats(1e-2, 1e3),
    rho=st.floats(1e-3, 1e3),
    delta=st.floats(1e-3, 0.99),
    delta_f=st.floats(1e-2, 1e2),
    dim=st.integers(1, 10**6),
)
def test_psd_constants_equal_the_spec_formulas(epsilon, ell, rho, delta, delta_f, dim) -> None:
    c = psd_constants(epsilon, ell, rho, delta, delta_f, dim=dim)
    gamma = math.sqrt(rho * epsilon)
    M = 1 + math.ceil(128 * ell * delta_f / epsilon**2)
    assert c.gamma == gamma
    assert c.radius == (1 / 8) * math.sqrt(epsilon / rho)
    assert c.max_episodes == M
    assert c.episode_length == math.ceil((8 * ell / gamma) * math.log(16 * dim * M / delta))
    assert c.step_size == 1 / (2 * ell)
    assert c.episode_decrease == epsilon**2 / (128 * ell)
    pc = probe_constants(epsilon, rho, delta, dim=dim)
    assert pc.num_probes == math.ceil(16 * math.log(16 * dim / delta))
    assert pc.fd_step == math.sqrt(epsilon / rho)
    assert pc.step == c.radius
