"""The noise draws of psd_keras: which numbers, in which order, and the same under ``jit``.

The reference is Keras's own ``SeedGenerator`` semantics (each draw seeded by the
generator's state, which then advances by ``[0, 1]``), not the adapter: a perturbing
step makes one ``keras.random.normal`` call over all float32 parameters (split into
the variables), a step that does not perturb neither draws nor advances the seed.
On JAX the step is also run as ``jax.jit(optimizer.stateless_apply)`` and must give
the same parameters, moments and seed state as the eager ``optimizer.apply``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import psd_keras

BACKEND = keras.backend.backend()
SHAPES = [(7,), (3, 4)]


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _params():
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _grads():
    """Zero (gate opens), large (gate closed: a gradient step), zero, zero."""
    rng = np.random.default_rng(1)
    big = [(3.0 * rng.standard_normal(s)).astype(np.float32) for s in SHAPES]
    zero = [np.zeros(s, np.float32) for s in SHAPES]
    return [zero, big, zero, zero]


def _psd():
    # gate threshold 1: the zero gradients open it, the large ones (norm ~ 10) do not
    return psd_keras.PSD(0.1, g_thres=1.0, radius=0.5, noise="gaussian", seed=11)


def _eager(opt, params, grads):
    vs = [keras.Variable(p) for p in params]
    opt.build(vs)
    traj = []
    for g in grads:
        opt.apply([keras.ops.convert_to_tensor(x) for x in g], vs)
        traj.append(([_np(v.value) for v in vs], [_np(v.value) for v in opt.variables]))
    return traj


def test_psd_draws_are_the_seed_generators_normals_and_skip_quiet_steps():
    params, grads = _params(), _grads()
    opt = _psd()
    traj = _eager(opt, params, grads)
    ref = keras.random.SeedGenerator(11)  # the same seed: the same state sequence
    n = sum(int(np.prod(s)) for s in SHAPES)
    prev = [p.astype(np.float64) for p in params]
    perturbed = []
    for (vals, _), g in zip(traj, grads):
        delta = np.concatenate([(v - p).ravel() for v, p in zip(vals, prev)])
        if np.all(g[0] == 0):  # a perturbing step: delta = c * z, z the next normals
            z = _np(keras.random.normal((n,), dtype="float32", seed=ref)).astype(np.float64)
            c = float(delta @ z / (z @ z))
            assert c > 0
            np.testing.assert_allclose(delta, c * z, rtol=1e-4, atol=1e-6)
            perturbed.append(True)
        else:  # plain gradient step, no draw
            step = np.concatenate([-0.1 * x.ravel() for x in g])
            np.testing.assert_allclose(delta, step, rtol=1e-5, atol=1e-6)
            perturbed.append(False)
        prev = [v.astype(np.float64) for v in vals]
    assert perturbed == [True, False, True, True]
    assert int(_np(opt.psd_state.episodes)) == 3
    # three draws: the state advanced by [0, 3], exactly as the reference generator
    np.testing.assert_array_equal(_np(opt._seed_generator.state.value), _np(ref.state.value))
    seed0 = _np(keras.random.SeedGenerator(11).state.value)
    np.testing.assert_array_equal(_np(ref.state.value) - seed0, [0, 3])


@pytest.mark.skipif(BACKEND != "jax", reason="stateless_apply under jax.jit is JAX's API")
@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam", "PerturbedAdam-ball"])
def test_jax_jit_stateless_apply_equals_eager_apply(name):
    """Parameters, optimizer variables (moments, counters, seed state) after each
    step of ``jax.jit(stateless_apply, donate_argnums=(0, 1))`` equal the eager run."""
    import jax

    def make():
        if name == "PSD":
            return _psd()
        noise = "ball" if name.endswith("ball") else "gaussian"
        # g_thres 5 > sqrt(19) >= the step norm: every step perturbs, and the moments,
        # nonzero after a large gradient, are reset
        return psd_keras.PerturbedAdam(
            0.01, g_thres=5.0, t_thres=0, radius=0.05, noise=noise, seed=5
        )

    params, grads = _params(), _grads()
    eager = _eager(make(), params, grads)

    opt = make()
    vs = [keras.Variable(p) for p in params]
    opt.build(vs)
    fn = jax.jit(lambda tv, ov, g: opt.stateless_apply(ov, g, tv), donate_argnums=(0, 1))
    tv = [v.value.copy() for v in vs]
    ov = [v.value.copy() for v in opt.variables]
    names = [v.name for v in opt.variables]
    for (e_vals, e_opt), g in zip(eager, grads):
        tv, ov = fn(tv, ov, [jax.numpy.asarray(x) for x in g])
        for a, b in zip(tv, e_vals):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7)
        for a, b, nm in zip(ov, e_opt, names):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7, err_msg=nm)
    seed = np.asarray(
        ov[[i for i, v in enumerate(opt.variables) if v is opt._seed_generator.state][0]]
    )
    assert not np.array_equal(seed, _np(opt._seed_generator.state.value))  # draws were made
    if name != "PSD":
        assert int(np.asarray(ov[names.index("perturbations")])) == len(grads)
        # the last step perturbed: both moments were reset to zero inside the jitted step
        for nm, a in zip(names, ov):
            if "momentum" in nm or "velocity" in nm:
                np.testing.assert_array_equal(np.asarray(a), 0.0, err_msg=nm)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_perturbed_adam_moments_and_step_match_core_and_keras_adam(dtype, monkeypatch):
    """PerturbedAdam with the gate never firing (``g_thres=0``) against the core's
    ``adam_moments`` / ``adam_bias_corrections`` / ``adam_direction`` run on NumPy
    (``eps_mode="keras"``) and against ``keras.optimizers.Adam``; a non-finite
    gradient in the middle is skipped (moments and parameters untouched). On PyTorch
    the moments and the direction run on ``psd_torch``'s foreach kernels (checked)."""
    from psd_core.perturbation import adam_bias_corrections, adam_direction, adam_moments

    calls = []
    if BACKEND == "torch":
        from psd_torch.perturbed_adam import PerturbedAdam as TorchPerturbedAdam

        orig = TorchPerturbedAdam._moments_

        def counted(*args):
            calls.append(1)
            return orig(*args)

        monkeypatch.setattr(TorchPerturbedAdam, "_moments_", staticmethod(counted))

    rng = np.random.default_rng(3)
    shapes = [(6,), (4, 5)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(5)]
    grads[2][1][1, 2] = np.nan  # skipped step
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-7

    opt = psd_keras.PerturbedAdam(lr, b1, b2, eps, g_thres=0.0, seed=0)
    ref = keras.optimizers.Adam(lr, b1, b2, eps)
    vs = [keras.Variable(p, dtype=dtype) for p in params]
    rs = [keras.Variable(p, dtype=dtype) for p in params]
    opt.build(vs)
    ref.build(rs)
    x = [p.copy() for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    count = 0
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == "float32" else dict(rtol=1e-12, atol=1e-14)
    for g in grads:
        opt.apply([keras.ops.convert_to_tensor(a) for a in g], vs)
        if all(np.isfinite(a).all() for a in g):
            ref.apply([keras.ops.convert_to_tensor(a) for a in g], rs)
            count += 1
            m, v = adam_moments(g, m, v, b1, b2)
            like = np.zeros((), dtype)
            bc1, bc2 = adam_bias_corrections(np.asarray(count), b1, b2, like)
            d = adam_direction(m, v, bc1, bc2, eps, eps_mode="keras")
            # Keras keeps the learning rate in a float32 variable
            step = np.asarray(np.float32(lr), dtype)
            x = [xi - step * di.astype(dtype) for xi, di in zip(x, d)]
        for a, b in zip(vs, x):
            np.testing.assert_allclose(_np(a.value), b, **tol)
        for a, b in zip(vs, rs):  # Keras's TF Adam rounds some float64 scalars to float32
            np.testing.assert_allclose(_np(a.value), _np(b.value), rtol=2e-6, atol=1e-6)
        for a, b in zip(opt._mu, m):
            np.testing.assert_allclose(_np(a.value), b, **tol)
        for a, b in zip(opt._nu, v):
            np.testing.assert_allclose(_np(a.value), b, **tol)
    assert int(_np(opt._state["skipped"])) == 1
    if BACKEND == "torch":
        assert len(calls) == 4  # the foreach kernels ran on every finite step
