"""Cross-backend conformance of every public core function.

Each scenario runs the same core calls on identical inputs (and identical random
draws) converted to NumPy, array-api-strict, PyTorch and JAX, and compares the
results with the NumPy run: float64 to 1e-12, float32 to 1e-5. JAX additionally
runs each core update under ``jax.jit`` and must match its eager result.

This file checks that the backends agree with each other. Correctness against an
independent float64 transcription of SPEC (``tests/reference.py``), in every dtype
(float16, bfloat16, float32, float64), is checked in ``tests/test_precision_matrix.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from backends import backend_params, convert, to_numpy, tol
from reference import perturbed_adam_reference, psd_reference, sam_sps_reference

import psd_core
from psd_core import _array as A
from psd_core import baselines as B
from psd_core import curvature as C
from psd_core import perturbation as P
from psd_core import polyak as Y
from psd_core import random as R

RNG = np.random.default_rng(1234)
SHAPES = [(3, 4), (5,), (2, 2, 2)]
X = [RNG.standard_normal(s) for s in SHAPES]
G = [RNG.standard_normal(s) for s in SHAPES]
Z = [RNG.standard_normal(s) for s in SHAPES]
U = np.asarray(0.37)
D = 20
M = RNG.standard_normal((D, D))
HMAT = (M + M.T) / 2
V = RNG.standard_normal(D)


def quad_value_and_grad(xp, hmat):
    """f(x) = 1/2 sum_leaves ||x||^2 + 1/4 sum x^4 on a tree, written in xp (a smooth test loss)."""

    def vg(tree):
        val = None
        grads = []
        for x in tree:
            v = 0.5 * xp.sum(x * x) + 0.25 * xp.sum(x * x * x * x)
            val = v if val is None else val + v
            grads.append(x + x * x * x)
        return val, grads

    return vg


def scenario(backend: str, dtype: str) -> dict[str, object]:
    c = lambda a: convert(a, backend, dtype)  # noqa: E731
    x = [c(a) for a in X]
    g = [c(a) for a in G]
    z = [c(a) for a in Z]
    u = c(U)
    out: dict[str, object] = {}
    # tree helpers
    out["sq_norm"] = A.tree_sq_norm(g)
    out["dot"] = A.tree_dot(g, z)
    out["lincomb"] = A.tree_lincomb([0.5, -2.0], [g, z])
    out["select"] = A.tree_select(c(np.asarray(True)), g, z)
    out["uniform_ball"] = R.uniform_ball(z, u, 0.3)
    out["ball_scale"] = R.ball_scale(A.tree_sq_norm(z), u, 0.3, A.tree_size(z))

    # PSD transformation: 6 steps, the gate opens at step 2 (small gradient)
    for noise, sop in [("ball", False), ("gaussian", True)]:
        tx = psd_core.psd(0.1, 0.5, 0.2, 2, t_thres=1, noise=noise, step_on_perturb=sop)
        state = tx.init(x)
        params = x
        traj = []
        for k in range(6):
            scale = 1.0 if k % 3 == 0 else 0.01
            gk = [scale * gi for gi in g]
            upd, state = tx.update(gk, state, params, normals=z, uniform=u)
            params = psd_core.apply_updates(params, upd)
            traj.append([params, state.episodes, state.episode_left, state.perturbed])
        out[f"psd_{noise}"] = traj
    # EMA gate
    tx = psd_core.psd(0.1, 0.5, 0.2, 0, gate="ema", ema_beta=0.5)
    state = tx.init(x)
    upd, state = tx.update([0.01 * gi for gi in g], state, x, normals=z, uniform=u)
    out["psd_ema"] = [upd, state.grad_sq_ema, state.perturbed]
    # scalar layer directly
    cfg = P.psd_config(0.1, 1.0, 0.2, 3)
    st = P.psd_init(x[0], cfg)
    coeffs, st2 = P.psd_coefficients(
        A.tree_sq_norm(g) * 0.0001,
        st,
        cfg,
        dim=A.tree_size(g),
        noise_sq_norm=A.tree_sq_norm(z),
        uniform=u,
    )
    out["psd_coefficients"] = [coeffs.grad, coeffs.noise, coeffs.perturb, st2.episode_left]
    out["psd_gate"] = [P.psd_gate(A.tree_sq_norm(g), st, cfg).open]
    # the applier, whole and in its two parts (the fused optax step uses the parts)
    both = P.PSDCoefficients(
        grad=c(np.asarray(-0.1)),
        noise=c(np.asarray(0.3)),
        finite=coeffs.finite,
        perturb=coeffs.perturb,
    )
    out["psd_updates"] = [
        P.psd_updates(both, g, z),
        P.psd_updates(both, g, None),
        P.psd_updates(both, None, z),
    ]

    # Perturbed Adam: 5 steps, the last ones small enough to perturb
    tx = psd_core.perturbed_adam(0.01, g_thres=5.0, t_thres=2)
    state = tx.init(x)
    params = x
    traj = []
    for k in range(5):
        gk = [(1.0 if k < 2 else 1e-6) * gi for gi in g]
        upd, state = tx.update(gk, state, params, normals=z)
        params = psd_core.apply_updates(params, upd)
        traj.append([params, state.mu, state.nu, state.perturbations])
    out["perturbed_adam"] = traj
    mu, nu = P.adam_moments(g, z, [zi * zi for zi in z], 0.9, 0.99)
    bc1, bc2 = P.adam_bias_corrections(
        c(np.asarray(3, dtype=np.int32)), 0.9, 0.99, A.tree_sq_norm(g)
    )
    out["adam"] = [mu, nu, bc1, bc2, P.adam_direction(mu, nu, bc1, bc2, 1e-8)]

    # SAM-SPS
    xp = A.namespace(x)
    vg = quad_value_and_grad(xp, None)
    for lam, wd in [(0.0, 0.0), (1.0, 5e-4)]:
        tx = psd_core.sam_sps(rho=0.1, lambd=lam, weight_decay=wd)
        state = tx.init(x)
        params = x
        traj = []
        for _ in range(4):
            loss, gr = vg(params)
            upd, state = tx.update(gr, state, params, value_and_grad_fn=vg, value=loss)
            params = psd_core.apply_updates(params, upd)
            traj.append([params, state.step_size])
        out[f"sam_sps_{lam}"] = traj
    out["sam_scale"] = Y.sam_perturbation_scale(A.tree_sq_norm(g), 0.1, 0.5)
    out["polyak"] = Y.polyak_step_size(
        c(np.asarray(2.0)), 0.5, c(np.asarray(0.1)), A.tree_sq_norm(g), 1.0
    )

    # curvature
    h = c(HMAT)
    v = c(V)
    xv = c(np.zeros(D))
    hvp = lambda _x, w: h @ w  # noqa: E731
    grad_q = lambda y: h @ y  # noqa: E731
    val_q = lambda y: 0.5 * xp.sum(y * (h @ y))  # noqa: E731
    vn = v / xp.sqrt(xp.sum(v * v))
    out["rayleigh_hvp"] = C.rayleigh_hvp(hvp, xv, vn)
    out["rayleigh_grad_diff"] = C.rayleigh_grad_diff(grad_q, xv, vn, 0.1)
    out["rayleigh_values"] = C.rayleigh_values(val_q, xv, vn, 0.1)
    out["hvp_from_grad"] = C.hvp_from_grad(grad_q, 0.01)(xv, v)
    mc = C.min_curvature(hvp, xv, iters=D, seed=3)
    out["min_curvature"] = [mc.value, mc.ritz_values]
    # the eigenvector's sign is arbitrary: compare |<u, e_min>| via the Rayleigh quotient
    out["min_curvature_dir"] = C.rayleigh_hvp(hvp, xv, mc.direction)
    probes = [c(p / np.linalg.norm(p)) for p in RNG_PROBES]
    pr = C.random_probe_test(lambda w: C.rayleigh_hvp(hvp, xv, w), probes)
    out["probe"] = [pr.min_curvature, pr.index, pr.direction, pr.curvatures]
    out["nc_step"] = C.negative_curvature_step(v, vn, 0.25)
    out["strict_saddle"] = C.is_strict_saddle(mc.value, 0.5)

    # baselines (batched rows)
    xb = c(RNG_XB)
    gb = c(RNG_GB)
    hb = c(RNG_HB)
    out["gd_step"] = B.gd_step(xb, gb, 0.1)
    out["momentum_step"] = list(B.momentum_step(xb, gb, gb, 0.1, 0.9))
    out["langevin_step"] = B.langevin_step(xb, gb, xb, 0.1, 0.5)
    out["newton_step"] = B.newton_step(xb, gb, hb, 0.5, 0.1)
    out["condition_scaled_step"] = B.condition_scaled_step(xb, gb, hb, 0.5)
    out["bfgs_direction"] = B.bfgs_direction(hb, gb)
    out["bfgs_update"] = B.bfgs_inverse_update(hb, xb, gb)
    out["row_sq_norm"] = B.row_sq_norm(xb)
    return out


RNG_PROBES = [RNG.standard_normal(D) for _ in range(7)]
RNG_XB = RNG.standard_normal((4, 3))
RNG_GB = RNG.standard_normal((4, 3))
_HB = RNG.standard_normal((4, 3, 3))
RNG_HB = _HB @ np.swapaxes(_HB, -1, -2) + 3 * np.eye(3)


def flatten(value) -> list[np.ndarray]:
    if isinstance(value, list | tuple):
        out = []
        for v in value:
            out.extend(flatten(v))
        return out
    return [
        np.asarray(to_numpy(value), dtype=np.float64)
        if np.asarray(to_numpy(value)).dtype.kind == "f"
        else np.asarray(to_numpy(value))
    ]


_REFERENCE: dict[str, dict] = {}


def reference(dtype: str) -> dict:
    if dtype not in _REFERENCE:
        _REFERENCE[dtype] = scenario("numpy", dtype)
    return _REFERENCE[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", backend_params())
def test_every_core_function_matches_numpy(backend: str, dtype: str) -> None:
    ref = reference(dtype)
    got = scenario(backend, dtype)
    assert set(got) == set(ref)
    for key in ref:
        a, b = flatten(got[key]), flatten(ref[key])
        assert len(a) == len(b), key
        for i, (u, w) in enumerate(zip(a, b)):
            assert u.shape == w.shape, (key, i, u.shape, w.shape)
            if u.dtype.kind in "biu":
                np.testing.assert_array_equal(u, w, err_msg=f"{key}[{i}]")
            else:
                np.testing.assert_allclose(
                    u, w, **tol(dtype), err_msg=f"{key}[{i}] on {backend}/{dtype}"
                )


def test_scenarios_exercise_the_state_machines() -> None:
    """Guard against a scenario that silently never perturbs (which would make the
    conformance test weaker than it looks)."""
    ref = reference("float64")
    assert any(bool(step[3]) for step in ref["psd_ball"])
    assert int(ref["psd_ball"][-1][1]) >= 1
    assert int(ref["perturbed_adam"][-1][3]) >= 1
    assert float(ref["sam_sps_1.0"][0][1]) > 0
    assert bool(ref["psd_coefficients"][2])


# ------------------------------------------------------------------------------------
# Every core update under jax.jit equals its eager result
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_core_updates_trace_under_jax_jit(dtype: str) -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x = [jnp.asarray(a, dtype=dtype) for a in X]
    g = [jnp.asarray(a, dtype=dtype) * 0.01 for a in G]
    z = [jnp.asarray(a, dtype=dtype) for a in Z]
    u = jnp.asarray(U, dtype=dtype)
    t = tol(dtype)

    for tx in [
        psd_core.psd(0.1, 0.5, 0.2, 2, t_thres=1),
        psd_core.psd(0.1, 0.5, 0.2, noise="gaussian", gate="ema"),
    ]:
        state = tx.init(x)
        eager = tx.update(g, state, x, normals=z, uniform=u)
        jitted = jax.jit(lambda g, s, p, z, u, tx=tx: tx.update(g, s, p, normals=z, uniform=u))(
            g, state, x, z, u
        )
        for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), **t)

    tx = psd_core.perturbed_adam(0.01, g_thres=5.0, t_thres=0)
    state = tx.init(x)
    eager = tx.update(g, state, x, normals=z)
    jitted = jax.jit(lambda g, s, p, z: tx.update(g, s, p, normals=z))(g, state, x, z)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **t)

    vg = quad_value_and_grad(jnp, None)
    tx = psd_core.sam_sps(rho=0.1, lambd=1.0, weight_decay=1e-3)
    state = tx.init(x)
    loss, gr = vg(x)
    eager = tx.update(gr, state, x, value_and_grad_fn=vg, value=loss)
    jitted = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value_and_grad_fn=vg, value=v))(
        gr, state, x, loss
    )
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **t)

    h = jnp.asarray(HMAT, dtype=dtype)
    v0 = jnp.asarray(V, dtype=dtype)
    f = jax.jit(lambda x0, v0: C.min_curvature(lambda _x, w: h @ w, x0, iters=8, v0=v0)[:2])
    lam_j, dir_j = f(jnp.zeros(D, dtype=dtype), v0)
    lam_e, dir_e, *_ = C.min_curvature(
        lambda _x, w: h @ w, jnp.zeros(D, dtype=dtype), iters=8, v0=v0
    )
    np.testing.assert_allclose(
        float(lam_j), float(lam_e), rtol=1e-4 if dtype == "float32" else 1e-10
    )


# ------------------------------------------------------------------------------------
# Solvers: the same seed gives the same run on every backend
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
def test_solvers_give_the_same_run_on_every_backend(backend: str) -> None:
    from psd_core import functions as F
    from psd_core import solvers as S

    p = F.separable_quartic(6)
    x0 = p.saddle() + 1e-3 * np.arange(6)
    runs = {
        "psd": lambda x: S.psd(
            p, x, epsilon=0.1, ell=p.ell, rho=p.rho, seed=5, max_grad_evals=3000
        ),
        "pgd": lambda x: S.pgd(
            p, x, lr=0.05, g_thres=0.1, t_thres=10, radius=0.01, seed=5, max_grad_evals=3000
        ),
        "psd_probe": lambda x: S.psd_probe(
            p, x, epsilon=0.1, ell=p.ell, rho=p.rho, seed=5, max_grad_evals=6000
        ),
        "adam": lambda x: S.adam(p, x, lr=0.05, max_grad_evals=300),
    }
    for name, fn in runs.items():
        ref = fn(x0.copy())
        got = fn(convert(x0, backend))
        assert got.grad_evals == ref.grad_evals, name
        assert got.episodes == ref.episodes, name
        np.testing.assert_allclose(to_numpy(got.x), ref.x, atol=1e-8, err_msg=name)


# ------------------------------------------------------------------------------------
# The NumPy run itself against independent float64 formulas (SPEC, tests/reference.py)
# ------------------------------------------------------------------------------------


def _steps(grads):
    """A ``grad_fn`` for tests/reference.py that returns the given gradients in order."""
    it = iter(grads)
    return lambda _x: next(it)


def test_numpy_reference_run_matches_independent_formulas() -> None:
    """The run every backend is compared with above equals, entry by entry, a float64
    transcription written here from SPEC and the docstrings (never the core), so each
    backend agrees with an independent reference (issue 11: no backend vs itself)."""
    ref = reference("float64")
    f = lambda key: flatten(ref[key])  # noqa: E731
    close = lambda got, want, **kw: np.testing.assert_allclose(  # noqa: E731
        got, want, **({"rtol": 1e-12, "atol": 1e-12} | kw)
    )
    g, z, x = G, Z, X
    gn, zn = np.sqrt(sum(np.sum(a * a) for a in g)), np.sqrt(sum(np.sum(a * a) for a in z))
    d = sum(a.size for a in g)
    u = float(U)
    # tree helpers and the ball
    close(f("sq_norm")[0], gn**2)
    close(f("dot")[0], sum(np.sum(a * b) for a, b in zip(g, z)))
    for got, a, b in zip(f("lincomb"), g, z):
        close(got, 0.5 * a - 2.0 * b)
    for got, a in zip(f("select"), g):
        close(got, a)
    ball = 0.3 * u ** (1 / d) / zn
    for got, a in zip(f("uniform_ball"), z):
        close(got, ball * a)
    close(f("ball_scale")[0], ball)

    # PSD trajectories against SPEC's loop (tests/reference.py)
    for noise, sop in [("ball", False), ("gaussian", True)]:
        grads = [[(1.0 if k % 3 == 0 else 0.01) * a for a in g] for k in range(6)]
        want = psd_reference(
            _steps(grads),
            x,
            steps=6,
            lr=0.1,
            epsilon=0.5,
            radius=0.2,
            episode_length=2,
            t_thres=1,
            noise=noise,
            step_on_perturb=sop,
            normals=[z] * 6,
            uniforms=[u] * 6,
        )
        for k, (params, episodes, _left, perturbed) in enumerate(ref[f"psd_{noise}"]):
            for got, w in zip(params, want[k]["params"]):
                close(to_numpy(got), w)
            assert int(episodes) == want[k]["episodes"] and bool(perturbed) == want[k]["perturbed"]
        assert want[-1]["episodes"] >= 1
    want = psd_reference(
        _steps([[0.01 * a for a in g]]),
        x,
        steps=1,
        lr=0.1,
        epsilon=0.5,
        radius=0.2,
        episode_length=0,
        gate="ema",
        ema_beta=0.5,
        normals=[z],
        uniforms=[u],
    )
    upd, ema, perturbed = ref["psd_ema"]
    for got, w, a in zip(upd, want[0]["params"], x):
        close(to_numpy(got), w - a)
    assert bool(perturbed) == want[0]["perturbed"]
    close(float(ema), (0.01 * gn) ** 2)

    # the PSD scalar layer: ||g|| * 0.01 <= epsilon = 1 opens the gate (episode T = 3)
    grad_c, noise_c, perturb, left = ref["psd_coefficients"]
    assert bool(perturb) and int(left) == 3
    close(float(grad_c), 0.0)
    close(float(noise_c), 0.2 * u ** (1 / d) / zn)
    assert bool(ref["psd_gate"][0]) == (gn <= 1.0)
    whole, grad_part, noise_part = ref["psd_updates"]
    for w, gp, npart, a, b in zip(whole, grad_part, noise_part, g, z):
        close(w, -0.1 * a + 0.3 * b)
        close(gp, -0.1 * a)
        close(npart, 0.3 * b)

    # PerturbedAdam (psd-optimizer's loop) and Adam's pieces
    grads = [[(1.0 if k < 2 else 1e-6) * a for a in g] for k in range(5)]
    want = perturbed_adam_reference(
        grads, x, lr=0.01, g_thres=5.0, t_thres=2, radius=1e-3, normals=[z] * 5
    )
    for k, (params, _mu, _nu, perturbations) in enumerate(ref["perturbed_adam"]):
        for got, w in zip(params, want[k]["params"]):
            close(to_numpy(got), w)
        assert int(perturbations) == want[k]["perturbations"]
    assert want[-1]["perturbations"] >= 1
    mu, nu, bc1, bc2, direction = ref["adam"]
    for m, v, dd, a, b in zip(mu, nu, direction, g, z):
        m_w, v_w = 0.9 * b + 0.1 * a, 0.99 * b * b + 0.01 * a * a
        close(m, m_w)
        close(v, v_w)
        close(dd, (m_w / (1 - 0.9**3)) / (np.sqrt(v_w / (1 - 0.99**3)) + 1e-8))
    close(float(bc1), 1 - 0.9**3)
    close(float(bc2), 1 - 0.99**3)

    # SAM-SPS (SPEC section 2) and its scalars
    def vg(tree):
        val = sum(0.5 * np.sum(a * a) + 0.25 * np.sum(a**4) for a in tree)
        return float(val), [a + a**3 for a in tree]

    for lam, wd in [(0.0, 0.0), (1.0, 5e-4)]:
        want = sam_sps_reference(vg, x, steps=4, rho=0.1, lambd=lam, weight_decay=wd)
        for k, (params, step_size) in enumerate(ref[f"sam_sps_{lam}"]):
            for got, w in zip(params, want[k]["params"]):
                close(to_numpy(got), w)
            close(float(step_size), want[k]["step_size"])
    close(float(ref["sam_scale"]), 0.1 * (0.5 + 0.5 / gn))
    close(float(ref["polyak"]), min(max(2.0 - 0.5 - 0.1, 0.0) / gn**2, 1.0))

    # curvature on the quadratic 1/2 x^T H x (every probe is exact up to rounding)
    vn = V / np.linalg.norm(V)
    q = float(vn @ HMAT @ vn)
    close(float(ref["rayleigh_hvp"]), q)
    close(float(ref["rayleigh_grad_diff"]), q, atol=1e-10)
    close(float(ref["rayleigh_values"]), q, atol=1e-10)
    close(to_numpy(ref["hvp_from_grad"]), HMAT @ V, atol=1e-10)
    eig = np.linalg.eigvalsh(HMAT)
    value, ritz = ref["min_curvature"]
    close(float(value), eig[0], atol=1e-9)
    close(to_numpy(ritz), eig, atol=1e-9)
    close(float(ref["min_curvature_dir"]), eig[0], atol=1e-9)
    probes = [p / np.linalg.norm(p) for p in RNG_PROBES]
    curv = np.array([p @ HMAT @ p for p in probes])
    pmin, pidx, pdir, pcurv = ref["probe"]
    close(to_numpy(pcurv), curv)
    assert int(pidx) == int(np.argmin(curv))
    close(float(pmin), curv.min())
    close(to_numpy(pdir), probes[int(np.argmin(curv))])
    close(to_numpy(ref["nc_step"]), 0.25 * (-1.0 if V @ vn > 0 else 1.0) * vn)
    assert bool(ref["strict_saddle"]) == (eig[0] < -0.5)

    # baselines (batched rows), from their docstrings' formulas
    xb, gb, hb = RNG_XB, RNG_GB, RNG_HB
    close(ref["gd_step"], xb - 0.1 * gb)
    x_m, v_m = ref["momentum_step"]
    close(v_m, 0.9 * gb - 0.1 * gb)
    close(x_m, xb + 0.9 * gb - 0.1 * gb)
    close(ref["langevin_step"], xb - 0.1 * (gb + 0.5 * xb))
    newton = np.stack(
        [xi - 0.5 * np.linalg.solve(h + 0.1 * np.eye(3), gi) for xi, gi, h in zip(xb, gb, hb)]
    )
    close(ref["newton_step"], newton, atol=1e-10)
    fro = np.sqrt(np.sum(hb * hb, axis=(-1, -2)))
    close(ref["condition_scaled_step"], xb - (0.5 / fro)[:, None] * gb)
    close(ref["bfgs_direction"], -np.einsum("nij,nj->ni", hb, gb))
    bfgs = []
    for h, s, y in zip(hb, xb, gb):
        ys = float(y @ s)
        if ys > 1e-12:
            r = 1.0 / ys
            left = np.eye(3) - r * np.outer(s, y)
            h = left @ h @ left.T + r * np.outer(s, s)
        bfgs.append(h)
    close(ref["bfgs_update"], np.stack(bfgs), atol=1e-10)
    close(ref["row_sq_norm"], np.sum(xb * xb, axis=-1))
