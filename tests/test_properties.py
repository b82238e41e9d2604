"""Property tests (hypothesis) of the core's formulas against plain transcriptions."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import example, given, settings
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
    gamma_b=st.floats(1e-6, 10),
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
    # measured with math.hypot (scaled): a plain sum of squares of a tiny radius's
    # sample (r = 5.3e-157) underflows to a subnormal and loses about 1e-11 relative
    norm = math.hypot(*np.ravel(xi[0]).tolist())
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


# ------------------------------------------------------------------------------------
# Properties over dtypes: the scalars of every step live in the accumulation dtype
# ------------------------------------------------------------------------------------

LOW_DTYPES = st.sampled_from(["float16", "float32", "float64"])
small_vec = st.integers(1, 8).flatmap(
    lambda n: arrays(np.float64, (n,), elements=st.floats(-100, 100, allow_nan=False))
)


@settings(max_examples=60, deadline=None)
@given(g=small_vec, dtype=LOW_DTYPES, zero_frac=st.floats(0, 1))
def test_adam_direction_finite_for_every_finite_gradient(g, dtype, zero_frac) -> None:
    """Any finite gradient (zeros included) gives a finite Adam direction, in every dtype,
    equal to the float64 formula within the dtype's resolution."""
    from psd_core import perturbation as P

    g = np.where(np.arange(g.size) < zero_frac * g.size, 0.0, g).astype(dtype)
    zeros = [np.zeros_like(g)]
    mu, nu = P.adam_moments([g], zeros, zeros, 0.9, 0.999, accumulate=True)
    bc1, bc2 = P.adam_bias_corrections(np.asarray(1), 0.9, 0.999, A.tree_sq_norm([g]))
    d = P.adam_direction(mu, nu, bc1, bc2, 1e-8)[0]
    assert np.all(np.isfinite(d)) and d.dtype == A.accumulation_dtype(np, np.dtype(dtype))
    # stored moments: the accumulated ones rounded once
    ms, vs = P.adam_moments([g], zeros, zeros, 0.9, 0.999)
    assert ms[0].dtype == g.dtype and np.array_equal(ms[0], mu[0].astype(g.dtype))
    assert np.array_equal(vs[0], nu[0].astype(g.dtype))
    g64 = g.astype(np.float64)
    want = g64 / (np.abs(g64) + 1e-8)
    # the direction comes from the moments before their rounding for storage, so float16's
    # tiny entries are exact too (from the stored v = 0.001 g^2 they were lost below ~1e-2);
    # in float32 m = 0.1 g itself is subnormal (precision lost) below ~1e-37, in float64
    # below ~2e-307 (hypothesis found g = 2.2e-313, a subnormal float64: 9e-11 relative)
    ok = np.abs(g64) > {"float32": 1e-36, "float64": 1e-305}.get(dtype, 0)
    np.testing.assert_allclose(
        d[ok], want[ok], rtol={"float16": 1e-5, "float32": 1e-5}.get(dtype, 1e-12)
    )


@settings(max_examples=60, deadline=None)
@given(g=small_vec, dtype=LOW_DTYPES, exp=st.integers(-30, 30))
def test_tree_norm_is_overflow_safe_and_exact(g, dtype, exp) -> None:
    """tree_norm equals the float64 norm for every finite tree whose norm fits the dtype."""
    x = (g * 10.0**exp).astype(dtype)
    if not np.all(np.isfinite(x)):
        return
    # math.hypot is scaled (np.linalg.norm squares unscaled: 1.8e-236 gives 0 in float64)
    want = math.hypot(*x.astype(np.float64).ravel())
    got = float(A.tree_norm([x]))
    acc = A.accumulation_dtype(np, x.dtype)
    if want > float(np.finfo(acc).max) / 2 or (0 < want < float(np.finfo(acc).tiny) * 1e8):
        return
    assert math.isclose(got, want, rel_tol=1e-5 if acc == np.float32 else 1e-12, abs_tol=0.0)
    assert bool(A.tree_all_finite([x]))


@settings(max_examples=60, deadline=None)
@given(g=small_vec, dtype=LOW_DTYPES, rho=st.floats(0.0, 1.0), lambd=st.floats(0.0, 1.0))
def test_sam_offset_has_norm_rho_in_every_dtype(g, dtype, rho, lambd) -> None:
    """The SAM offset c g has norm rho (1 - lam) ||g|| + rho lam, computed without overflow."""
    from psd_core import polyak as Y

    x = g.astype(dtype)
    n = float(np.linalg.norm(x.astype(np.float64)))
    c = float(Y.sam_perturbation_scale(A.tree_sq_norm([x]), rho, lambd, grad_norm=A.tree_norm([x])))
    assert math.isfinite(c)
    if n > 1e-12:
        want = rho * (1 - lambd) * n + rho * lambd
        assert math.isclose(
            c * n, want, rel_tol=1e-4 if dtype != "float64" else 1e-10, abs_tol=1e-12
        )


@settings(max_examples=60, deadline=None)
@given(g=small_vec, s=small_vec, dtype=LOW_DTYPES, zero_frac=st.floats(0, 1))
# found by Hypothesis: the smallest normal float32 gradient, whose moment 0.1 g is
# subnormal; -lr * m then lost 4.7e-5 relative before the update divided first
@example(g=np.array([1.1754944e-38]), s=np.array([1.1754944e-38]), dtype="float32", zero_frac=0.0)
def test_sam_baseline_first_step_in_every_dtype(g, s, dtype, zero_frac) -> None:
    """The first AdaSAM / LightSAM step from the initial state, for any finite gradients
    (zeros included), is finite, in the parameter dtype, and equals the float64 formula
    (of the dtype-rounded inputs) within the dtype's resolution. The solvers
    (psd_core.solvers.adasam / lightsam) are these rules in a loop; the states live in the
    accumulation dtype, where eps^2 = 1e-16 and 1 - b2 = 1e-3 are representable."""
    from psd_core import sam_baselines as SB

    n = min(g.size, s.size)
    mask = np.arange(n) < zero_frac * n
    g, s = (np.where(mask, 0.0, a[:n]).astype(dtype) for a in (g, s))
    x = np.zeros_like(g)
    g64, s64 = g.astype(np.float64), s.astype(np.float64)
    e2, lr, rho = 1e-16, 0.01, 0.05
    tol = {
        "float16": {"rtol": 2e-3, "atol": 6e-8},
        "float32": {"rtol": 1e-5, "atol": 1e-40},
    }.get(dtype, {"rtol": 1e-12, "atol": 1e-300})

    acc = np.float64 if dtype == "float64" else np.float32

    def state(a):
        """A moment as the state holds it (rounded to the accumulation dtype)."""
        return a.astype(acc).astype(np.float64)

    def check(got, want, what):
        assert got.dtype == np.dtype(dtype) and np.all(np.isfinite(got)), what
        np.testing.assert_allclose(got, want, **tol, err_msg=what)

    upd, _ = SB.adasam_update(g, SB.adasam_init(x), lr)
    v_hat = np.maximum(e2, 0.999 * e2 + 0.001 * g64 * g64)
    check(upd, -lr * state(0.1 * g64) / np.sqrt(v_hat), "adasam")
    for v in SB.LIGHTSAM_VARIANTS:
        st0 = SB.lightsam_init(x, v)
        off, st1 = SB.lightsam_perturbation(s, st0, rho, v)
        upd, _ = SB.lightsam_update(g, st1, lr, v)
        if v == "I":
            want_off = rho * s64 / np.sqrt(e2 + np.sum(s64 * s64))
            want_upd = -lr * g64 / np.sqrt(e2 + np.sum(g64 * g64))
        elif v == "II":
            want_off, want_upd = (
                rho * s64 / np.sqrt(e2 + s64 * s64),
                -lr * g64 / np.sqrt(e2 + g64 * g64),
            )
        else:
            want_off = rho * state(0.1 * s64) / np.sqrt(0.999 * e2 + 0.001 * s64 * s64)
            want_upd = -lr * state(0.1 * g64) / np.sqrt(0.999 * e2 + 0.001 * g64 * g64)
        check(off, want_off, f"lightsam {v} offset")
        check(upd, want_upd, f"lightsam {v} update")
