"""Regression tests for issue 11's numerics bugs (each failed on the code before the fix).

Bug 1 (counters beyond 2^31), 3 (PerturbedAdam float16), 4 (SAM-SPS float16), 5 (a finite
1e20 gradient skipped), 6 (a skipped step changed ``perturbed``), 8 (complex parameters),
plus the contracts C6 (PSD ``count`` counts every call), C7 (``eps_mode``) and C8
(``gamma_b=inf``, ``rho`` schedules). References are plain float64 transcriptions
(``tests/reference.py``) or the real-pair (``view_as_real``) form of the same problem.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from backends import backend_params, convert, to_numpy
from reference import (
    fused_adam_reference,
    perturbed_adam_reference,
    psd_reference,
    sam_sps_reference,
)

import psd_core
from psd_core import _array as A

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------
# Bug 1: counters and budgets beyond 2^31 - 1
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
def test_huge_episode_budget_still_perturbs(backend: str) -> None:
    """M = 10**12 (the paper's M for a small epsilon) must not disable the gate."""
    x = [convert(np.zeros(4), backend)]
    z = [convert(np.ones(4), backend)]
    tx = psd_core.psd(0.1, 1e-3, 0.1, 10**9, t_thres=10**10, max_episodes=10**12)
    state = tx.init(x)
    upd, state = tx.update(x, state, x, normals=z, uniform=convert(np.asarray(0.5), backend))
    assert bool(state.perturbed) and int(state.episodes) == 1
    assert int(state.episode_left) == 10**9
    assert float(np.linalg.norm(to_numpy(upd[0]))) > 0


@pytest.mark.parametrize("backend", backend_params())
def test_psd_solver_escapes_with_the_papers_constants(backend: str) -> None:
    """Issue 11's reproduction: epsilon = 1e-3 gives M > 2^31; every backend escapes."""
    from psd_core import functions, solvers

    p = functions.separable_quartic(10)
    res = solvers.psd(
        p,
        convert(np.zeros(10), backend),
        epsilon=1e-3,
        ell=20.0,
        rho=24.0,
        seed=0,
        max_grad_evals=3000,
    )
    assert res.episodes >= 1


@pytest.mark.parametrize("backend", backend_params())
def test_counters_are_int64_and_saturate(backend: str) -> None:
    x = [convert(np.zeros(3), backend)]
    tx = psd_core.psd(0.1, 1e-3, 0.1, 2)
    state = tx.init(x)
    assert "int64" in str(state.count.dtype)
    top = 2**63 - 1
    state = state._replace(count=A.int_constant(top - 1, state.count))
    for _ in range(3):
        _, state = tx.update(x, state, x, normals=x, uniform=convert(np.asarray(0.5), backend))
    assert int(state.count) == top


@pytest.mark.parametrize("backend", backend_params())
def test_array_budgets_clamp_like_python_ints(backend: str) -> None:
    """Budgets given as arrays (the array-valued theory constants; traced values under
    ``optax.inject_hyperparams`` + ``jit``) saturate exactly as Python ints do."""
    like = psd_core.psd(0.1, 1e-3, 0.1, 2).init([convert(np.zeros(2), backend)]).count
    top = 2**63 - 1
    for value, want in [(5, 5), (0, 0), (2**62, 2**62), (1e30, top), (-1e30, -(2**63))]:
        got = A.int_constant(convert(np.asarray(value, dtype=np.float64), backend), like)
        assert int(got) == want, (value, int(got))
        assert str(got.dtype) == str(like.dtype)
    for value in (7, top):
        got = A.int_constant(convert(np.asarray(value, dtype=np.int64), backend), like)
        assert int(got) == value
    # a float budget reaches the state: t_thres = 3.0 (array) acts like t_thres = 3
    x = [convert(np.zeros(2), backend)]
    t = convert(np.asarray(3.0), backend)
    state = psd_core.perturbation.psd_init(
        x[0], psd_core.perturbation.psd_config(0.1, 1e-3, 0.1, 2, t_thres=3)
    )
    state_a = psd_core.perturbation.psd_init(
        x[0], psd_core.perturbation.psd_config(0.1, 1e-3, 0.1, 2)._replace(t_thres=t)
    )
    assert int(state_a.since_perturb) == int(state.since_perturb) == 4


@pytest.mark.parametrize("backend", backend_params())
def test_huge_t_thres_gate_stays_open_until_the_first_perturbation(backend: str) -> None:
    """``t_thres`` beyond the counter range is clamped to ``max - 1``; ``since_perturb``
    starts at ``max`` ("more than t_thres steps ago"). A quiet step (gradient above
    epsilon) must leave it there. Before round 10 it computed ``since + 1`` first, which
    wrapped to the dtype's minimum and closed the gate for good: the first small
    gradient after any large one never perturbed."""
    tx = psd_core.psd(0.1, 1.0, 0.1, 0, t_thres=2**70)
    x = [convert(np.zeros(4), backend)]
    z = [convert(np.ones(4), backend)]
    u = convert(np.asarray(0.5), backend)
    state = tx.init(x)
    top = int(state.since_perturb)
    big = [convert(np.full(4, 10.0), backend)]
    for _ in range(2):
        _, state = tx.update(big, state, x, normals=z, uniform=u)
        assert int(state.since_perturb) == top and not bool(state.perturbed)
    small = [convert(np.full(4, 1e-3), backend)]
    _, state = tx.update(small, state, x, normals=z, uniform=u)
    assert bool(state.perturbed) and int(state.episodes) == 1
    assert int(state.since_perturb) == 1
    for _ in range(3):  # and now it never perturbs again
        _, state = tx.update(small, state, x, normals=z, uniform=u)
        assert not bool(state.perturbed) and int(state.since_perturb) >= 2


def test_jax_without_x64_saturates_and_clamps() -> None:
    """JAX without x64 (a fresh process: tests/conftest.py enables x64 here)."""
    pytest.importorskip("jax")
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, psd_core
        from psd_core import _array as A
        assert not jax.config.jax_enable_x64
        x = [jnp.zeros(3, dtype=jnp.float32)]
        tx = psd_core.psd(0.1, 1e-3, 0.1, 10**9, t_thres=10**10, max_episodes=10**12)
        st = tx.init(x)
        assert st.count.dtype == jnp.int32, st.count.dtype
        upd, st = jax.jit(lambda g, s: tx.update(g, s, g, normals=[g[0] + 1], uniform=jnp.float32(.5)))(x, st)
        assert bool(st.perturbed) and int(st.episodes) == 1 and int(st.episode_left) == 10**9
        st = st._replace(count=jnp.int32(2**31 - 2), skipped=jnp.int32(2**31 - 1))
        for _ in range(3):
            _, st = tx.update(x, st, x, normals=[x[0] + 1], uniform=jnp.float32(.5))
        assert int(st.count) == 2**31 - 1, st.count
        big = psd_core.psd(0.1, 1e-3, 0.1, 2**40, max_episodes=2**40)
        s2 = big.init(x)
        _, s2 = big.update(x, s2, x, normals=[x[0] + 1], uniform=jnp.float32(.5))
        assert int(s2.episode_left) == 2**31 - 1 and bool(s2.perturbed)
        ad = psd_core.perturbed_adam(1e-3, t_thres=10**12)
        sa = ad.init(x)
        assert sa.count.dtype == jnp.int32
        _, sa = ad.update([x[0] + 1], sa, x, normals=x)
        assert int(sa.count) == 1 and not bool(sa.perturbed)
        # the paper's constants at their extremes (M ~ 1e18, T ~ 5e6, d = 1e6) under jit
        from psd_core.theory import psd_constants
        c = psd_constants(1e-8, 1.0, 1.0, 0.1, 1.0, dim=10**6)
        assert c.max_episodes > 10**18 and c.episode_length > 10**6
        th = psd_core.psd_from_theory(1e-8, 1.0, 1.0, 0.1, 1.0, dim=10**6)
        y = [jnp.zeros(10**6, dtype=jnp.float32)]
        s3 = th.init(y)
        _, s3 = jax.jit(lambda g, s: th.update(g, s, g, normals=[g[0] + 1], uniform=jnp.float32(.5)))(y, s3)
        assert bool(s3.perturbed) and int(s3.episodes) == 1
        assert int(s3.episode_left) == c.episode_length, (int(s3.episode_left), c.episode_length)
        print("ok")
        """
    )
    env = dict(os.environ)
    env.pop("JAX_ENABLE_X64", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT, os.path.join(ROOT, "adapters"), env.get("PYTHONPATH", "")]
    )
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_integer_hyperparameters_validate_at_construction() -> None:
    psd_core.psd(0.1, 1e-3, 0.1, 10**12, t_thres=10**12, max_episodes=10**12)
    # beyond int64: clamped ("effectively unlimited"), never an OverflowError later
    from psd_core.perturbation import perturbed_adam_config, psd_config

    assert psd_config(0.1, 1e-3, 0.1, max_episodes=10**30).max_episodes == 2**63 - 1
    assert perturbed_adam_config(t_thres=10**30).t_thres == 2**63 - 1
    with pytest.raises(ValueError, match="max_episodes"):
        psd_core.psd(0.1, 1e-3, 0.1, 1, max_episodes=-1)
    with pytest.raises(TypeError, match="t_thres"):
        psd_core.perturbed_adam(t_thres=1.5)


# ---------------------------------------------------------------------------------------
# Bugs 3 and 4: float16 / bfloat16 scalars and the Adam direction
# ---------------------------------------------------------------------------------------

LOW = [
    ("numpy", "float16"),
    ("torch", "float16"),
    ("torch", "bfloat16"),
    ("jax", "float16"),
    ("jax", "bfloat16"),
]


@pytest.mark.parametrize(("backend", "dtype"), LOW)
def test_perturbed_adam_low_precision_with_zero_gradient_entries(backend: str, dtype: str) -> None:
    pytest.importorskip(backend) if backend != "numpy" else None
    g = [np.array([0.0, 0.5, -1.0, 0.0])]
    x0 = [np.array([1.0, 1.0, 1.0, 1.0])]
    ref = perturbed_adam_reference(
        [g] * 5, x0, lr=0.01, g_thres=0.0, t_thres=100, radius=0.0, normals=[g] * 5
    )
    tx = psd_core.perturbed_adam(0.01, g_thres=0.0, t_thres=100, radius=0.0)
    x = [convert(x0[0], backend, dtype)]
    st = tx.init(x)
    for _ in range(5):
        upd, st = tx.update([convert(g[0], backend, dtype)], st, x, normals=x)
        x = psd_core.apply_updates(x, upd)
    assert int(st.skipped) == 0
    np.testing.assert_allclose(
        np.asarray(to_numpy(x[0]), dtype=float),
        ref[-1]["params"][0],
        atol=3e-2 if dtype == "bfloat16" else 1e-2,
    )


@pytest.mark.parametrize(("backend", "dtype"), LOW)
def test_sam_sps_low_precision_small_gradient(backend: str, dtype: str) -> None:
    """||g|| = 1.4e-5 < rho / 65504 = 1.5e-5: rho/||g|| overflows float16."""
    pytest.importorskip(backend) if backend != "numpy" else None
    scale = 1e-5

    def vg_np(t):
        return 0.5 * scale * float(np.sum(t[0] ** 2)) + 1.0, [scale * t[0]]

    def vg(t):
        xp = A.namespace(t)
        return 0.5 * scale * xp.sum(t[0] * t[0]) + 1.0, [scale * t[0]]

    x0 = [np.array([1.0, -0.75, 0.5])]
    ref = sam_sps_reference(vg_np, x0, steps=2, rho=1.0, gamma_b=1e4)
    tx = psd_core.sam_sps(rho=1.0, gamma_b=1e4)
    x = [convert(x0[0], backend, dtype)]
    st = tx.init(x)
    for _ in range(2):
        loss, g = vg(x)
        upd, st = tx.update(g, st, x, value_and_grad_fn=vg, value=loss)
        x = psd_core.apply_updates(x, upd)
    assert int(st.skipped) == 0
    got = np.asarray(to_numpy(x[0]), dtype=float)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref[-1]["params"][0], rtol=3e-2, atol=1e-2)


# |g| = 1e-4 and 2e-3: (1 - b2) g^2 underflows to 0 in float16 (and is inexact in bfloat16)
TINY_G = np.array([1e-4, -2e-3, 0.5, -1.0, 0.0])


@pytest.mark.parametrize(("backend", "dtype"), LOW)
def test_perturbed_adam_16bit_tiny_gradient_entries_step_like_fused_adam(
    backend: str, dtype: str
) -> None:
    """Bug 3, tiny entries: the direction came from the moments after their cast to
    float16, where v = 1e-3 g^2 underflows to 0 for |g| < ~8e-3, so such an entry stepped
    by lr |g| / eps (1e-4 -> 100 lr per step; psd_torch float16 went from 1 to -4900 in
    50 steps). Now the direction comes from the new moments in float32."""
    pytest.importorskip(backend) if backend != "numpy" else None

    def cast(a: np.ndarray) -> np.ndarray:
        return np.asarray(to_numpy(convert(a, backend, dtype)), dtype=float)

    steps, lr = 20, 0.01
    ref = fused_adam_reference(TINY_G, np.ones(5), steps, lr, cast)
    tx = psd_core.perturbed_adam(lr, g_thres=0.0, t_thres=100, radius=0.0)
    x = [convert(np.ones(5), backend, dtype)]
    st = tx.init(x)
    for _ in range(steps):
        upd, st = tx.update([convert(TINY_G, backend, dtype)], st, x, normals=x)
        x = psd_core.apply_updates(x, upd)
    got = np.asarray(to_numpy(x[0]), dtype=float)
    assert int(st.skipped) == 0 and x[0].dtype == convert(TINY_G, backend, dtype).dtype
    # one rounding of the parameter dtype per step at most
    ulp = 2.0**-10 if dtype == "float16" else 2.0**-7
    np.testing.assert_allclose(got, ref, atol=steps * ulp)
    # and the tiny entries moved by a few lr per step (with v's history lost in storage,
    # fused Adam's step there grows like sqrt(t) lr); the bug moved the 1e-4 entry by
    # 100 lr per step and the 2e-3 entry by 2000 lr
    assert np.all(np.abs(got - 1.0) <= 1.0)


# ---------------------------------------------------------------------------------------
# Bug 5: a finite 1e20 gradient in float32 is not skipped
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
def test_huge_finite_gradient_is_not_skipped(backend: str) -> None:
    c = lambda a: convert(np.asarray(a), backend, "float32")  # noqa: E731
    x0 = np.array([1.0, -2.0, 3.0])
    g0 = np.array([1e20, -1e20, 5e19])
    # PSD: the plain gradient step, as SGD takes it
    tx = psd_core.psd(1e-20, 1e-3, 0.1, 2)
    st = tx.init([c(x0)])
    upd, st = tx.update([c(g0)], st, [c(x0)], normals=[c(x0)], uniform=c(0.5))
    assert int(st.skipped) == 0 and not bool(st.perturbed)
    np.testing.assert_allclose(to_numpy(upd[0]), -1e-20 * g0, rtol=1e-5)
    # PerturbedAdam: Adam's first step -lr * sign(g) (up to eps)
    ta = psd_core.perturbed_adam(0.01, g_thres=0.0, radius=0.0)
    sa = ta.init([c(x0)])
    upd, sa = ta.update([c(g0)], sa, [c(x0)], normals=[c(x0)])
    assert int(sa.skipped) == 0 and int(sa.count) == 1
    assert np.all(np.isfinite(to_numpy(upd[0])))
    ref = perturbed_adam_reference(
        [[g0]], [x0], lr=0.01, g_thres=0.0, t_thres=10, radius=0.0, normals=[[x0]]
    )
    # v = ((1 - b2) g) g = 1e37 and sqrt(v) / sqrt(bc2) stay finite, so the first step is
    # -lr sign(g), as torch.optim.Adam's (g^2 = 1e40 or v / bc2 = 1e40 overflowed to inf
    # and gave a zero step)
    got = to_numpy(upd[0])
    np.testing.assert_allclose(got, -0.01 * np.sign(g0), rtol=1e-5)
    np.testing.assert_allclose(got, ref[0]["params"][0] - x0, rtol=1e-5)
    assert ref[0]["skipped"] == 0
    # SAM-SPS on a linear loss with a 1e20 slope
    slope = g0

    def vg(t):
        xp = A.namespace(t)
        s = c(slope)
        return xp.sum(s * t[0]) + c(1e22), [s * xp.ones_like(t[0])]

    def vg_np(t):
        return float(np.sum(slope * t[0])) + 1e22, [slope.copy()]

    ts = psd_core.sam_sps(rho=0.1, gamma_b=math.inf)
    ss = ts.init([c(x0)])
    loss, g = vg([c(x0)])
    upd, ss = ts.update(g, ss, [c(x0)], value_and_grad_fn=vg, value=loss)
    want = sam_sps_reference(vg_np, [x0], steps=1, rho=0.1, gamma_b=math.inf)
    assert int(ss.skipped) == 0
    np.testing.assert_allclose(
        to_numpy(psd_core.apply_updates([c(x0)], upd)[0]), want[0]["params"][0], rtol=1e-4
    )


# ---------------------------------------------------------------------------------------
# Bug 6 and C6: a skipped step keeps `perturbed`; PSD's count counts every call
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
def test_skipped_step_keeps_perturbed_and_counts(backend: str) -> None:
    c = lambda a: convert(np.asarray(a), backend)  # noqa: E731
    x = [c(np.zeros(3))]
    tx = psd_core.psd(0.1, 1e-3, 0.1, 5)
    st = tx.init(x)
    _, st = tx.update(x, st, x, normals=[c(np.ones(3))], uniform=c(0.5))
    assert bool(st.perturbed)
    bad = [c(np.array([np.nan, 0.0, 0.0]))]
    upd, st2 = tx.update(bad, st, x, normals=[c(np.ones(3))], uniform=c(0.5))
    assert bool(st2.perturbed) and int(st2.skipped) == 1
    assert int(st2.count) == 2  # C6: every call
    assert int(st2.episode_left) == int(st.episode_left)
    np.testing.assert_array_equal(to_numpy(upd[0]), 0.0)
    ta = psd_core.perturbed_adam(0.01, g_thres=1e9, t_thres=1)
    sa = ta.init(x)
    _, sa = ta.update([c(np.ones(3))], sa, x, normals=[c(np.ones(3))])
    assert bool(sa.perturbed)
    _, sa2 = ta.update(bad, sa, x, normals=[c(np.ones(3))])
    assert bool(sa2.perturbed) and int(sa2.skipped) == 1
    assert int(sa2.count) == int(sa.count)  # Adam's bias-correction count: applied steps only


# ---------------------------------------------------------------------------------------
# Bug 8 / C9: complex parameters use the real inner product
# ---------------------------------------------------------------------------------------

CA = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]])


def _complex_problem():
    """f(w) = 1/2 (re^T A re + im^T A im) + 1/4 sum |w|^4 on w in C^3; gradient re-grad + i im-grad."""

    def vg_real(t):  # on the real pairs [re, im] as one (3, 2) array
        u = t[0]
        r2 = u[:, 0] ** 2 + u[:, 1] ** 2
        val = 0.5 * float(u[:, 0] @ CA @ u[:, 0] + u[:, 1] @ CA @ u[:, 1]) + 0.25 * float(
            np.sum(r2**2)
        )
        g = np.stack([CA @ u[:, 0] + r2 * u[:, 0], CA @ u[:, 1] + r2 * u[:, 1]], axis=1)
        return val, [g]

    return vg_real


@pytest.mark.parametrize("backend", backend_params())
def test_sam_sps_and_psd_on_complex_parameters_equal_the_real_pairs(backend: str) -> None:
    vg_real = _complex_problem()
    w0 = np.array([0.5 + 0.2j, -0.3 + 0.7j, 0.1 - 0.4j])
    pair0 = np.stack([w0.real, w0.imag], axis=1)
    amat = convert(CA, backend)

    def vg(t):
        xp = A.namespace(t)
        w = t[0]
        re, im = xp.real(w), xp.imag(w)
        r2 = re * re + im * im
        val = 0.5 * (xp.sum(re * (amat @ re)) + xp.sum(im * (amat @ im))) + 0.25 * xp.sum(r2 * r2)
        gre, gim = amat @ re + r2 * re, amat @ im + r2 * im
        one_j = xp.asarray(1j, dtype=w.dtype)
        return val, [xp.astype(gre, w.dtype) + xp.astype(gim, w.dtype) * one_j]

    ref = sam_sps_reference(vg_real, [pair0], steps=5, rho=0.1, weight_decay=1e-2)
    tx = psd_core.sam_sps(rho=0.1, weight_decay=1e-2)
    w = [convert(w0, backend, "complex128")]
    st = tx.init(w)
    for k in range(5):
        loss, g = vg(w)
        upd, st = tx.update(g, st, w, value_and_grad_fn=vg, value=loss)
        w = psd_core.apply_updates(w, upd)
        got = to_numpy(w[0])
        np.testing.assert_allclose(
            np.stack([got.real, got.imag], 1), ref[k]["params"][0], rtol=1e-10, atol=1e-12
        )
        np.testing.assert_allclose(float(st.step_size), ref[k]["step_size"], rtol=1e-10)

    # PSD: complex noise with independent real/imaginary normals, dimension 2 per scalar
    zr = np.random.default_rng(0).standard_normal((4, 3, 2))
    normals_c = [[convert(z[:, 0] + 1j * z[:, 1], backend, "complex128")] for z in zr]
    ref = psd_reference(
        lambda t: vg_real(t)[1],
        [0.01 * pair0],
        steps=4,
        lr=0.1,
        epsilon=0.05,
        radius=0.3,
        episode_length=2,
        normals=[[z] for z in zr],
        uniforms=[0.3, 0.6, 0.4, 0.8],
    )
    tp = psd_core.psd(0.1, 0.05, 0.3, 2)
    w = [convert(0.01 * w0, backend, "complex128")]
    st = tp.init(w)
    assert A.tree_size(w) == 6
    for k in range(4):
        g = vg(w)[1]
        upd, st = tp.update(
            g,
            st,
            w,
            normals=normals_c[k],
            uniform=convert(np.asarray([0.3, 0.6, 0.4, 0.8][k]), backend),
        )
        w = psd_core.apply_updates(w, upd)
        got = to_numpy(w[0])
        assert bool(st.perturbed) == ref[k]["perturbed"]
        np.testing.assert_allclose(
            np.stack([got.real, got.imag], 1), ref[k]["params"][0], rtol=1e-10, atol=1e-12
        )
    assert ref[0]["perturbed"]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_perturbed_adam_on_complex_parameters_equals_the_real_pairs(backend: str) -> None:
    pytest.importorskip(backend) if backend != "numpy" else None
    rng = np.random.default_rng(5)
    gs = [rng.standard_normal((3, 2)) for _ in range(4)]
    pair0 = rng.standard_normal((3, 2))
    ref = perturbed_adam_reference(
        [[g] for g in gs],
        [pair0],
        lr=0.05,
        g_thres=0.0,
        t_thres=10,
        radius=0.0,
        normals=[[pair0]] * 4,
    )
    tx = psd_core.perturbed_adam(0.05, g_thres=0.0, t_thres=10, radius=0.0)
    cx = lambda u: convert(u[:, 0] + 1j * u[:, 1], backend, "complex128")  # noqa: E731
    w = [cx(pair0)]
    st = tx.init(w)
    for g in gs:
        upd, st = tx.update([cx(g)], st, w, normals=w)
        w = psd_core.apply_updates(w, upd)
    got = to_numpy(w[0])
    np.testing.assert_allclose(np.stack([got.real, got.imag], 1), ref[-1]["params"][0], rtol=1e-10)
    if backend == "torch":  # and torch's own Adam on complex parameters
        import torch

        p = torch.nn.Parameter(torch.tensor(pair0[:, 0] + 1j * pair0[:, 1]))
        opt = torch.optim.Adam([p], lr=0.05, eps=1e-8)
        for g in gs:
            p.grad = torch.tensor(g[:, 0] + 1j * g[:, 1])
            opt.step()
        np.testing.assert_allclose(p.detach().numpy(), got, rtol=1e-10)


# ---------------------------------------------------------------------------------------
# C7 and C8
# ---------------------------------------------------------------------------------------


def test_eps_mode_keras_matches_keras_adam_formula() -> None:
    g = [np.array([1e-4, -2e-4, 0.0])]
    x0 = [np.array([1.0, 2.0, 3.0])]
    for mode in ("hat", "keras"):
        ref = perturbed_adam_reference(
            [g] * 3,
            x0,
            lr=0.1,
            eps=1e-3,
            g_thres=0.0,
            t_thres=10,
            radius=0.0,
            normals=[x0] * 3,
            eps_mode=mode,
        )
        tx = psd_core.perturbed_adam(0.1, eps=1e-3, g_thres=0.0, radius=0.0, eps_mode=mode)
        x, st = x0, tx.init(x0)
        for _ in range(3):
            upd, st = tx.update(g, st, x, normals=x0)
            x = psd_core.apply_updates(x, upd)
        np.testing.assert_allclose(x[0], ref[-1]["params"][0], rtol=1e-12)
    # Keras's own formulation: alpha = lr sqrt(1-b2^t)/(1-b1^t); x -= alpha m/(sqrt(v)+eps)
    m = v = np.zeros(3)
    xk = x0[0].copy()
    for t in range(1, 4):
        m = 0.9 * m + 0.1 * g[0]
        v = 0.999 * v + 0.001 * g[0] ** 2
        xk = xk - 0.1 * math.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(x[0], xk, rtol=1e-12)
    with pytest.raises(ValueError, match="eps_mode"):
        psd_core.perturbed_adam(eps_mode="torch")


def test_sam_sps_gamma_b_and_rho_validation() -> None:
    psd_core.sam_sps(gamma_b=math.inf)
    psd_core.sam_sps(rho=lambda t: 0.1 / (1 + t))
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="gamma_b"):
            psd_core.sam_sps(gamma_b=bad)
    with pytest.raises(ValueError, match="rho"):
        psd_core.sam_sps(rho=-0.1)
