"""model.save / keras.models.load_model restore optimizer class, config, iterations and state,
and training continues exactly like an uninterrupted run (noise stream included)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import psd_keras


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _make(name, seed=0):
    keras.utils.set_random_seed(0)
    cls = psd_keras.SAMSequential if name == "SAM_SPS" else keras.Sequential
    model = cls(
        [keras.Input((64,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(10)]
    )
    opt = {
        "PSD": lambda: psd_keras.PSD(
            0.1, g_thres=50.0, radius=0.05, episode_length=2, t_thres=1, seed=seed
        ),
        "PerturbedAdam": lambda: psd_keras.PerturbedAdam(
            0.01, g_thres=1e3, t_thres=2, radius=0.01, noise="ball", seed=seed
        ),
        "SAM_SPS": lambda: psd_keras.SAM_SPS(rho=0.05, lambd=0.5, gamma_b=0.5, weight_decay=1e-4),
    }[name]()
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam", "SAM_SPS"])
def test_save_load_continues_identically(name, digits10, tmp_path):
    X, y = digits10
    X, y = X[:256], y[:256]
    fit = dict(batch_size=64, verbose=0, shuffle=False)

    ref = _make(name)
    ref.fit(X, y, epochs=4, **fit)
    ref_weights = [np.array(w) for w in ref.get_weights()]

    model = _make(name)
    model.fit(X, y, epochs=2, **fit)
    path = str(tmp_path / "m.keras")
    model.save(path)
    keras.backend.clear_session()
    loaded = keras.models.load_model(path)

    opt = loaded.optimizer
    assert type(opt) is getattr(psd_keras, name)
    assert type(loaded) is type(model)
    assert opt.get_config() == model.optimizer.get_config()
    assert int(_np(opt.iterations)) == 8
    for a, b in zip(opt.variables, model.optimizer.variables):
        np.testing.assert_array_equal(_np(a.value), _np(b.value), err_msg=a.name)

    loaded.fit(X, y, epochs=2, **fit)
    for a, b in zip(loaded.get_weights(), ref_weights):
        np.testing.assert_allclose(_np(a), b, rtol=1e-6, atol=1e-6)
    for a, b in zip(loaded.optimizer.variables, ref.optimizer.variables):
        np.testing.assert_allclose(_np(a.value), _np(b.value), rtol=1e-6, atol=1e-6, err_msg=a.name)
    if name == "PSD":
        assert int(_np(ref.optimizer.psd_state.episodes)) >= 2
    if name == "PerturbedAdam":
        assert int(_np(ref.optimizer._state["perturbations"])) >= 2


def test_seed_makes_noise_reproducible_and_different_seeds_differ():
    def run(seed):
        v = keras.Variable(np.zeros(20, np.float32))
        opt = psd_keras.PSD(0.1, g_thres=1.0, radius=0.5, seed=seed)
        opt.apply([keras.ops.zeros((20,))], [v])
        return _np(v.value)

    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert 0 < np.linalg.norm(a) <= 0.5 + 1e-6  # a uniform-ball sample of radius 0.5
