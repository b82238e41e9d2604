"""``keras.distribution.DataParallel`` on the JAX backend with two host devices.

``model.fit`` under ``DataParallel`` splits every batch over the two devices and keeps
the variables replicated; on the JAX backend Keras jits one global train step (GSPMD),
so the loss is the mean over the *global* batch and every reduction the optimizer does
(PSD's gradient-norm gate, SAM-SPS's ``||g||``, ``<g_e, e - x>`` and its Polyak step)
sees global quantities, as the torch adapter's "global" mode does. SAM-SPS's first
pass therefore perturbs along the global-batch gradient; there is no per-replica mode
on this backend. The reference is the same ``fit`` on one device (same weights, same
seed, ``shuffle=False``): equal to float32 rounding of the cross-device reduction.

``XLA_FLAGS=--xla_force_host_platform_device_count=2`` must be set before JAX is
imported, so the runs happen in a child process (this file runs inside the per-backend
Keras child and is skipped on the TensorFlow and PyTorch backends).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="keras.distribution runs on the JAX backend"
)

CHILD = textwrap.dedent(
    r"""
    import jax
    import keras
    import numpy as np
    from sklearn.datasets import load_digits

    import psd_keras

    assert keras.backend.backend() == "jax"
    devices = keras.distribution.list_devices("cpu")
    assert len(devices) == 2 and jax.device_count() == 2, devices
    X, y = load_digits(n_class=3, return_X_y=True)
    X = (X / 16.0).astype(np.float32)[:96]
    Y = np.eye(3, dtype=np.float32)[y[:96]]
    rng = np.random.default_rng(0)
    W0 = [
        (rng.standard_normal((64, 8)) * 0.3).astype(np.float32),
        (rng.standard_normal(8) * 0.1).astype(np.float32),
        (rng.standard_normal((8, 3)) * 0.3).astype(np.float32),
        (rng.standard_normal(3) * 0.1).astype(np.float32),
    ]

    def make_optimizer(name):
        if name == "psd":
            # the gate opens on the first step (g_thres large): an episode of noise + descent
            return psd_keras.PSD(0.05, g_thres=1e3, radius=0.05, episode_length=2, t_thres=2, seed=3)
        return psd_keras.SAM_SPS(rho=0.05, gamma_b=0.5)

    def train(name):
        keras.utils.set_random_seed(0)
        cls = psd_keras.SAMSequential if name == "sam_sps" else keras.Sequential
        model = cls([keras.Input((64,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
        model.set_weights([w.copy() for w in W0])
        opt = make_optimizer(name)
        model.compile(optimizer=opt, loss="mean_squared_error")
        hist = model.fit(X, Y, batch_size=32, epochs=3, shuffle=False, verbose=0)
        return model, opt, hist.history["loss"]

    for name in ("psd", "sam_sps"):
        keras.distribution.set_distribution(None)
        m1, o1, l1 = train(name)
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        m2, o2, l2 = train(name)
        # the variables really live on both devices (replicated), the batch was split
        v = m2.trainable_variables[0].value
        assert len(v.sharding.device_set) == 2 and v.sharding.is_fully_replicated, v.sharding
        for a, b in zip(m1.get_weights(), m2.get_weights()):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=name)
        np.testing.assert_allclose(l1, l2, rtol=2e-5, err_msg=name)
        assert l2[-1] < l2[0], (name, l2)
        if name == "psd":
            s1, s2 = o1.psd_state, o2.psd_state
            assert int(s2.episodes) >= 1 and int(s1.episodes) == int(s2.episodes), (s1, s2)
            assert int(s1.count) == int(s2.count) == 9
        else:
            assert int(o2.iterations) == 9
            np.testing.assert_allclose(np.asarray(o1.step_size), np.asarray(o2.step_size), rtol=2e-5)
        print("ok", name, l2)
    keras.distribution.set_distribution(None)
    print("KERAS-DISTRIBUTION-OK")
    """
)


@pytest.mark.slow
def test_data_parallel_fit_matches_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    env.update(JAX_PLATFORMS="cpu", KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "KERAS-DISTRIBUTION-OK" in out.stdout
