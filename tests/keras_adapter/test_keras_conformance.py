"""Trajectories of the Keras optimizers vs the core's pure transformations run in NumPy.

Same initial weights, same data (load_digits, classes 0-2), full-batch steps, and
for PSD / PerturbedAdam the same random draws (fed to both from one HostDraws
stream through the optimizer's test hook). The NumPy side computes gradients with
an independent transcription of the model (conftest.NumpyMLP). float32, 1e-5.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import psd_core
import psd_keras
from psd_core.random import HostDraws


def _np(x):
    return keras.ops.convert_to_numpy(x)


STEPS = 12
TOL = dict(rtol=1e-5, atol=1e-5)


def _inject(opt, seed, ball):
    draws = HostDraws(seed)

    def noise_fn(variables):
        like = [np.zeros(tuple(v.shape), np.float32) for v in variables]
        normals = [keras.ops.convert_to_tensor(z) for z in draws.normals_like(like)]
        uniform = None
        if ball:
            uniform = keras.ops.convert_to_tensor(draws.uniform_like(np.zeros((), np.float32)))
        return normals, uniform

    opt._set_noise_fn(noise_fn)


def _core_run(tx, params, mlp, steps, seed, ball, noise=True):
    draws = HostDraws(seed)
    state = tx.init(params)
    traj = []
    for _ in range(steps):
        _, g = mlp.value_and_grad(params)
        normals = draws.normals_like(params) if noise else [np.zeros_like(p) for p in params]
        uniform = (
            draws.uniform_like(params[0][0, 0])
            if (noise and ball)
            else (np.float32(0.5) if ball else None)
        )
        upd, state = tx.update(g, state, params, normals=normals, uniform=uniform)
        params = psd_core.apply_updates(params, upd)
        traj.append([p.copy() for p in params])
    return traj, state


def _keras_run(model, opt, X, Y, steps, run_eagerly=True, jit_compile=False):
    model.compile(optimizer=opt, loss="mse", run_eagerly=run_eagerly, jit_compile=jit_compile)
    traj = []
    for _ in range(steps):
        model.fit(X, Y, batch_size=len(X), epochs=1, shuffle=False, verbose=0)
        traj.append([np.array(w) for w in model.get_weights()])
    return traj


def _compare(traj_k, traj_c, tol=TOL):
    assert len(traj_k) == len(traj_c)
    for step, (pk, pc) in enumerate(zip(traj_k, traj_c)):
        for leaf, (a, b) in enumerate(zip(pk, pc)):
            assert a.dtype == np.float32
            np.testing.assert_allclose(a, b, **tol, err_msg=f"step {step} leaf {leaf}")


# SAM-SPS fit: 8 float32 steps whose Polyak step size divides by a difference of losses
# and gradient inner products, so float32 rounding (XLA's fusion order on JAX, which
# depends on what the process compiled before) is amplified: a lone run of this file on
# JAX gave 1.2e-5 absolute (1e-4 relative) at step 6 against the NumPy core run. Dropping
# the weight decay (1e-3) from the reference moves the trajectory by far more (checked).
SAM_TOL = dict(rtol=1e-4, atol=3e-5)


PSD_CASES = [
    # (kwargs, description): epsilon large so the gate decision is not borderline.
    (dict(learning_rate=0.2, epsilon=1e3, radius=0.05, episode_length=2), "ball, paper semantics"),
    (
        dict(
            learning_rate=0.2,
            epsilon=1e3,
            radius=0.05,
            episode_length=1,
            t_thres=2,
            noise="gaussian",
            step_on_perturb=True,
        ),
        "gaussian, step_on_perturb, t_thres",
    ),
    (
        dict(
            learning_rate=0.2,
            epsilon=1e3,
            radius=0.05,
            gate="ema",
            max_episodes=2,
            episode_length=1,
        ),
        "ema gate, budget",
    ),
    (dict(learning_rate=0.3, epsilon=0.0, radius=0.05), "gate never fires"),
]


@pytest.mark.parametrize("kwargs,desc", PSD_CASES, ids=[c[1] for c in PSD_CASES])
def test_psd_matches_core_with_same_draws(
    kwargs, desc, digits3, mlp_factory, init_params, numpy_mlp
):
    X, _, Y = digits3
    params = init_params()
    ball = kwargs.get("noise", "ball") == "ball"
    keras_kw = {("g_thres" if k == "epsilon" else k): v for k, v in kwargs.items()}
    opt = psd_keras.PSD(**keras_kw, seed=0)
    _inject(opt, 123, ball)
    traj_k = _keras_run(mlp_factory(params), opt, X, Y, STEPS)
    tx = psd_core.psd(**kwargs)
    traj_c, state = _core_run(tx, [p.copy() for p in params], numpy_mlp(X, Y), STEPS, 123, ball)
    _compare(traj_k, traj_c)
    ks = opt.psd_state
    for name in ("count", "since_perturb", "episode_left", "episodes", "skipped"):
        assert int(_np(getattr(ks, name))) == int(getattr(state, name)), name
    np.testing.assert_allclose(_np(ks.grad_sq_ema), state.grad_sq_ema, rtol=1e-5)
    if kwargs["epsilon"] > 0:
        assert int(state.episodes) >= 2  # the perturbation path was exercised
    else:
        assert int(state.episodes) == 0


@pytest.mark.parametrize("noise", ["gaussian", "ball"])
def test_perturbed_adam_matches_core_with_same_draws(
    noise, digits3, mlp_factory, init_params, numpy_mlp
):
    X, _, Y = digits3
    params = init_params()
    kw = dict(learning_rate=0.01, g_thres=1e3, t_thres=3, noise=noise)
    opt = psd_keras.PerturbedAdam(
        kw["learning_rate"], g_thres=1e3, t_thres=3, radius=0.05, noise=noise, seed=0
    )
    _inject(opt, 7, noise == "ball")
    traj_k = _keras_run(mlp_factory(params), opt, X, Y, STEPS)
    tx = psd_core.perturbed_adam(
        kw["learning_rate"],
        eps=1e-7,
        g_thres=1e3,
        t_thres=3,
        radius=0.05,
        noise=noise,
        eps_mode="keras",
    )
    traj_c, state = _core_run(
        tx, [p.copy() for p in params], numpy_mlp(X, Y), STEPS, 7, noise == "ball"
    )
    _compare(traj_k, traj_c)
    assert int(state.perturbations) >= 3
    assert int(_np(opt._state["perturbations"])) == int(state.perturbations)
    for m_k, m_c in zip(opt._mu, state.mu):
        np.testing.assert_allclose(_np(m_k), m_c, **TOL)
    for v_k, v_c in zip(opt._nu, state.nu):
        np.testing.assert_allclose(_np(v_k), v_c, **TOL)


def _jit_options():
    if keras.backend.backend() == "torch":
        return [False]  # torch.compile is not exercised here (slow on CPU)
    return [False, True]


@pytest.mark.parametrize("jit_compile", _jit_options())
def test_psd_and_adam_compiled_fit_match_core(
    jit_compile, digits3, mlp_factory, init_params, numpy_mlp
):
    """Compiled fit (tf.function / jax.jit, XLA with jit_compile): radius 0 makes the draws irrelevant
    while the gate still decides (PSD skips the gradient step on a perturbing call)."""
    X, _, Y = digits3
    params = init_params()
    opt = psd_keras.PSD(0.2, 1e3, 0.0, 2, seed=0)
    traj_k = _keras_run(
        mlp_factory(params), opt, X, Y, 8, run_eagerly=False, jit_compile=jit_compile
    )
    traj_c, state = _core_run(
        psd_core.psd(0.2, 1e3, 0.0, 2),
        [p.copy() for p in params],
        numpy_mlp(X, Y),
        8,
        0,
        True,
        noise=False,
    )
    _compare(traj_k, traj_c)
    assert int(_np(opt.psd_state.episodes)) == int(state.episodes) == 3

    keras.backend.clear_session()
    opt = psd_keras.PerturbedAdam(0.01, g_thres=1e3, t_thres=3, radius=0.0, seed=0)
    traj_k = _keras_run(
        mlp_factory(params), opt, X, Y, 8, run_eagerly=False, jit_compile=jit_compile
    )
    tx = psd_core.perturbed_adam(
        0.01, eps=1e-7, g_thres=1e3, t_thres=3, radius=0.0, eps_mode="keras"
    )
    traj_c, state = _core_run(
        tx, [p.copy() for p in params], numpy_mlp(X, Y), 8, 0, False, noise=False
    )
    _compare(traj_k, traj_c)
    assert int(state.perturbations) == 2


@pytest.mark.parametrize("jit_compile", _jit_options())
@pytest.mark.parametrize("lambd,weight_decay,variant", [(1.0, 0.0, "sps+"), (0.0, 1e-3, "sps")])
def test_sam_sps_fit_matches_core(
    lambd, weight_decay, variant, jit_compile, digits3, mlp_factory, init_params, numpy_mlp
):
    X, _, Y = digits3
    params = init_params()
    cfg = dict(
        rho=0.05, lambd=lambd, f_star=0.0, gamma_b=2.0, weight_decay=weight_decay, variant=variant
    )
    opt = psd_keras.SAM_SPS(**cfg)
    model = mlp_factory(params, cls=psd_keras.SAMSequential)
    traj_k = _keras_run(model, opt, X, Y, 8, run_eagerly=False, jit_compile=jit_compile)
    mlp = numpy_mlp(X, Y)
    tx = psd_core.sam_sps(**{k: v for k, v in cfg.items() if k != "variant"}, variant=variant)
    p = [q.copy() for q in params]
    state = tx.init(p)
    traj_c = []
    for _ in range(8):
        loss, g = mlp.value_and_grad(p)
        upd, state = tx.update(g, state, p, value_and_grad_fn=mlp.value_and_grad, value=loss)
        p = psd_core.apply_updates(p, upd)
        traj_c.append([q.copy() for q in p])
    _compare(traj_k, traj_c, SAM_TOL)
    np.testing.assert_allclose(_np(opt.step_size), state.step_size, rtol=1e-4)
    assert float(state.step_size) > 0
    assert int(_np(opt._state["count"])) == 8
