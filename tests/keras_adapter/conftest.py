"""Shared fixtures of the Keras adapter tests (run once per backend, see tests/test_keras_backends.py)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits


@pytest.fixture(autouse=True)
def _reset_keras():
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture(scope="session")
def digits3():
    """Digits 0-2 (load_digits), scaled to [0, 1], float32; one-hot targets."""
    X, y = load_digits(n_class=3, return_X_y=True)
    X = (X / 16.0).astype(np.float32)[:96]
    y = y[:96]
    Y = np.eye(3, dtype=np.float32)[y]
    return X, y, Y


@pytest.fixture(scope="session")
def digits10():
    X, y = load_digits(return_X_y=True)
    return (X / 16.0).astype(np.float32)[:640], y[:640]


def _init_params(seed=0, hidden=8):
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((64, hidden)) * 0.3).astype(np.float32),
        (rng.standard_normal(hidden) * 0.1).astype(np.float32),
        (rng.standard_normal((hidden, 3)) * 0.3).astype(np.float32),
        (rng.standard_normal(3) * 0.1).astype(np.float32),
    ]


class NumpyMLP:
    """Independent NumPy transcription of Dense(h, tanh) -> Dense(3) with mean squared error."""

    def __init__(self, X, Y):
        self.X, self.Y = X, Y

    def loss(self, p):
        h = np.tanh(self.X @ p[0] + p[1])
        out = h @ p[2] + p[3]
        return np.float32(np.mean((out - self.Y) ** 2))

    def value_and_grad(self, p):
        X, Y = self.X, self.Y
        a = X @ p[0] + p[1]
        h = np.tanh(a)
        out = h @ p[2] + p[3]
        r = out - Y
        n = r.size
        loss = np.float32(np.mean(r**2))
        d_out = (2.0 / n) * r
        g_w2 = h.T @ d_out
        g_b2 = d_out.sum(axis=0)
        d_h = d_out @ p[2].T
        d_a = d_h * (1.0 - h**2)
        g_w1 = X.T @ d_a
        g_b1 = d_a.sum(axis=0)
        return loss, [g.astype(np.float32) for g in (g_w1, g_b1, g_w2, g_b2)]


@pytest.fixture
def mlp_factory():
    """``make(params, cls=keras.Sequential) -> model`` with the given initial weights."""

    def make(params=None, cls=None, hidden=8):
        params = _init_params(hidden=hidden) if params is None else params
        cls = keras.Sequential if cls is None else cls
        model = cls(
            [
                keras.Input((64,)),
                keras.layers.Dense(params[0].shape[1], activation="tanh"),
                keras.layers.Dense(3),
            ]
        )
        model.set_weights([np.array(p) for p in params])
        return model

    return make


@pytest.fixture
def init_params():
    return _init_params


@pytest.fixture
def numpy_mlp():
    return NumpyMLP
