"""psd_optax.sam_sps against an independent NumPy transcription of SPEC §2 and optax.polyak_sgd.

Data: scikit-learn's bundled breast-cancer set, standardized, logistic regression
(full batch, float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_breast_cancer

import psd_optax

jax.config.update("jax_enable_x64", True)

_X, _Y = load_breast_cancer(return_X_y=True)
_X = (_X - _X.mean(0)) / _X.std(0)
X = _X[:200]
Y = _Y[:200].astype(np.float64)


def loss_np(w, b):
    z = X @ w + b
    return float(np.mean(np.logaddexp(0.0, z) - Y * z))


def grad_np(w, b):
    z = X @ w + b
    r = 1.0 / (1.0 + np.exp(-z)) - Y
    return X.T @ r / len(Y), np.mean(r)


def loss_jax(params):
    z = jnp.asarray(X) @ params["w"] + params["b"]
    return jnp.mean(jnp.logaddexp(0.0, z) - jnp.asarray(Y) * z)


value_and_grad = jax.value_and_grad(loss_jax)


def spec_step(w, b, rho, lambd, f_star, gamma_b, wd, variant):
    """SPEC §2, transcribed: e = x + rho(1-l+l/||g||) g,
    gamma = min([f(e)-f*-<g_e,e-x>]_+/||g_e||^2, gamma_b), x -= gamma (g_e + wd x)."""
    gw, gb = grad_np(w, b)
    gnorm = np.sqrt(np.sum(gw**2) + gb**2)
    c = rho * (1.0 - lambd + lambd / max(gnorm, 1e-12))
    ew, eb = w + c * gw, b + c * gb
    fe = loss_np(ew, eb)
    gew, geb = grad_np(ew, eb)
    num = fe - f_star - (np.dot(gew, ew - w) + geb * (eb - b))
    if variant == "sps+":
        num = max(num, 0.0)
    gamma = min(num / max(np.sum(gew**2) + geb**2, 1e-12), gamma_b)
    return w - gamma * (gew + wd * w), b - gamma * (geb + wd * b), gamma


def init_params():
    return {"w": jnp.zeros(X.shape[1]), "b": jnp.asarray(0.0)}


def make_step(tx):
    @jax.jit
    def step(params, state):
        value, grads = value_and_grad(params)
        u, state = tx.update(grads, state, params, value=value, value_and_grad_fn=value_and_grad)
        return optax.apply_updates(params, u), state

    return step


@pytest.mark.parametrize(
    ("lambd", "rho", "wd", "variant", "f_star"),
    [
        (1.0, 0.1, 0.0, "sps+", 0.0),
        (0.0, 0.1, 0.0, "sps+", 0.0),
        (1.0, 0.05, 1e-2, "sps+", 0.05),
        (0.0, 0.3, 1e-2, "sps", 0.0),
    ],
)
def test_matches_numpy_transcription(lambd, rho, wd, variant, f_star):
    gamma_b = 5.0
    tx = psd_optax.sam_sps(
        rho=rho, lambd=lambd, f_star=f_star, gamma_b=gamma_b, weight_decay=wd, variant=variant
    )
    params = init_params()
    state = tx.init(params)
    step = make_step(tx)
    w, b = np.zeros(X.shape[1]), 0.0
    losses = []
    for _ in range(15):
        params, state = step(params, state)
        w, b, gamma = spec_step(w, b, rho, lambd, f_star, gamma_b, wd, variant)
        np.testing.assert_allclose(np.asarray(params["w"]), w, rtol=0, atol=1e-10)
        np.testing.assert_allclose(float(params["b"]), b, rtol=0, atol=1e-10)
        np.testing.assert_allclose(float(state.step_size), gamma, rtol=1e-9, atol=1e-12)
        losses.append(loss_np(w, b))
    assert losses[-1] < 0.5 * np.log(2.0)  # it trains
    assert int(state.count) == 15 and int(state.skipped) == 0


@pytest.mark.parametrize("variant", ["sps", "sps+"])
def test_rho_zero_is_optax_polyak_sgd(variant):
    f_star, gamma_b = 0.02, 3.0
    tx = psd_optax.sam_sps(rho=0.0, f_star=f_star, gamma_b=gamma_b, variant=variant)
    ref = optax.polyak_sgd(max_learning_rate=gamma_b, f_min=f_star, variant=variant)
    p = q = init_params()
    s, r = tx.init(p), ref.init(q)
    step = make_step(tx)

    @jax.jit
    def ref_step(q, r):
        value, grads = value_and_grad(q)
        u, r = ref.update(grads, r, q, value=value)
        return optax.apply_updates(q, u), r

    for _ in range(20):
        p, s = step(p, s)
        q, r = ref_step(q, r)
        for a, c in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-12, atol=1e-14)


def test_rho_positive_visibly_changes_the_update():
    params = init_params()
    params = {"w": params["w"] + 0.1, "b": params["b"]}
    value, grads = value_and_grad(params)
    outs = []
    for rho in (0.0, 0.5):
        tx = psd_optax.sam_sps(rho=rho, lambd=1.0, gamma_b=10.0)
        u, s = tx.update(
            grads, tx.init(params), params, value=value, value_and_grad_fn=value_and_grad
        )
        outs.append((jnp.concatenate([u["w"], u["b"][None]]), float(s.step_size)))
    (u0, s0), (u1, s1) = outs
    rel = float(jnp.linalg.norm(u1 - u0) / jnp.linalg.norm(u0))
    assert rel > 0.05
    assert s0 != s1


def test_non_finite_loss_at_perturbed_point_is_skipped():
    tx = psd_optax.sam_sps(rho=0.1)
    params = init_params()
    state = tx.init(params)
    value, grads = value_and_grad(params)

    def bad_vg(p):
        loss, g = value_and_grad(p)
        return loss * jnp.nan, g

    u, new = jax.jit(lambda g, s, p: tx.update(g, s, p, value=value, value_and_grad_fn=bad_vg))(
        grads, state, params
    )
    assert all(bool(jnp.all(x == 0)) for x in jax.tree_util.tree_leaves(u))
    assert int(new.skipped) == 1 and int(new.count) == 0 and float(new.step_size) == 0.0
    # a NaN gradient at x as well
    g_nan = jax.tree_util.tree_map(lambda x: x * jnp.nan, grads)
    u, new = tx.update(g_nan, state, params, value=value, value_and_grad_fn=value_and_grad)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree_util.tree_leaves(u))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(new))


def test_chain_after_clip_and_inject_hyperparams_logging():
    tx = optax.chain(optax.clip_by_global_norm(1.0), psd_optax.sam_sps(rho=0.05))
    params = init_params()
    state = tx.init(params)
    step = make_step(tx)
    params, state = step(params, state)
    gamma = optax.tree_utils.tree_get(state, "step_size")
    assert float(gamma) > 0.0

    injected = optax.inject_hyperparams(psd_optax.sam_sps)(rho=0.1, lambd=1.0, gamma_b=5.0)
    plain = psd_optax.sam_sps(rho=0.1, lambd=1.0, gamma_b=5.0)
    p = q = init_params()
    si, sp = injected.init(p), plain.init(q)
    istep, pstep = make_step(injected), make_step(plain)
    for _ in range(5):
        p, si = istep(p, si)
        q, sp = pstep(q, sp)
    np.testing.assert_allclose(np.asarray(p["w"]), np.asarray(q["w"]), rtol=0, atol=1e-12)
    assert float(si.hyperparams["rho"]) == pytest.approx(0.1)
    assert float(optax.tree_utils.tree_get(si, "step_size")) == pytest.approx(float(sp.step_size))


def test_float32_params():
    tx = psd_optax.sam_sps(rho=0.05)
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), init_params())
    state = tx.init(params)
    assert state.step_size.dtype == jnp.float32

    def vg32(p):
        return jax.value_and_grad(lambda q: loss_jax(q).astype(jnp.float32))(p)

    @jax.jit
    def step(p, s):
        v, g = vg32(p)
        u, s = tx.update(g, s, p, value=v, value_and_grad_fn=vg32)
        return optax.apply_updates(p, u), s

    w, b = np.zeros(X.shape[1]), 0.0
    for _ in range(5):
        params, state = step(params, state)
        w, b, _ = spec_step(w, b, 0.05, 1.0, 0.0, 1.0, 0.0, "sps+")
    assert params["w"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(params["w"]), w, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rho": -0.1}, "rho"),
        ({"lambd": 1.5}, "lambd"),
        ({"f_star": float("inf")}, "f_star"),
        ({"gamma_b": -1.0}, "gamma_b"),
        ({"weight_decay": -1e-3}, "weight_decay"),
        ({"variant": "sps_max"}, "variant"),
    ],
)
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        psd_optax.sam_sps(**kwargs)


def test_update_needs_params():
    tx = psd_optax.sam_sps()
    params = init_params()
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params), None, value_and_grad_fn=value_and_grad)
