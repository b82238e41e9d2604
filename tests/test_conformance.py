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
