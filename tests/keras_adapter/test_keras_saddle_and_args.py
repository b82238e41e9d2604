"""PSD escapes a strict saddle where SGD cannot; non-finite policy; bad arguments."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import psd_keras


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _deep_linear(X):
    """y = W2 W1 x, all weights zero: a strict saddle (zero gradient, Hessian with
    negative eigenvalues -|<x, y>|-ish from the cross terms)."""
    z = "zeros"
    return keras.Sequential(
        [
            keras.Input((X.shape[1],)),
            keras.layers.Dense(4, use_bias=False, kernel_initializer=z),
            keras.layers.Dense(1, use_bias=False, kernel_initializer=z),
        ]
    )


@pytest.fixture(scope="module")
def regression():
    from sklearn.datasets import load_breast_cancer

    X, _ = load_breast_cancer(return_X_y=True)
    X = X[:, :6]
    X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)[:200]
    w = np.array([1.0, -0.5, 0.3, 0.0, 0.2, -0.4], np.float32)
    return X, (X @ w)[:, None].astype(np.float32)


def test_psd_escapes_strict_saddle_sgd_does_not(regression):
    X, Y = regression
    fit = dict(batch_size=len(X), epochs=60, verbose=0, shuffle=False)

    sgd_model = _deep_linear(X)
    sgd_model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    h_sgd = sgd_model.fit(X, Y, **fit).history["loss"]

    psd_model = _deep_linear(X)
    opt = psd_keras.PSD(0.1, g_thres=1e-3, radius=0.5, episode_length=20, seed=0)
    psd_model.compile(optimizer=opt, loss="mse")
    h_psd = psd_model.fit(X, Y, **fit).history["loss"]

    assert h_sgd[0] == pytest.approx(h_sgd[-1])  # stuck at the saddle
    assert all(np.count_nonzero(_np(w)) == 0 for w in sgd_model.get_weights())
    assert h_psd[-1] < 0.5 * h_sgd[-1]  # escaped and descended
    assert int(_np(opt.psd_state.episodes)) >= 1


@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam"])
def test_non_finite_gradient_is_skipped(name):
    v = keras.Variable(np.ones((3, 2), np.float32))
    w = keras.Variable(np.ones(2, np.float32))
    opt = (
        psd_keras.PSD(0.1, g_thres=1.0, radius=0.1, seed=0)
        if name == "PSD"
        else psd_keras.PerturbedAdam(0.1, seed=0)
    )
    good = [keras.ops.ones((3, 2)), keras.ops.ones((2,))]
    opt.apply(good, [v, w])
    before = [_np(x.value).copy() for x in (v, w)]
    state_before = {k: _np(s.value).copy() for k, s in opt._state.items()}
    moments_before = [_np(m.value).copy() for m in getattr(opt, "_mu", [])]
    bad = [keras.ops.ones((3, 2)), keras.ops.convert_to_tensor(np.array([np.nan, 1.0], np.float32))]
    opt.apply(bad, [v, w])
    for x, b in zip((v, w), before):
        np.testing.assert_array_equal(_np(x.value), b)
    for k, s in opt._state.items():
        # contract C6: PSD's count advances on every call (schedules see every step)
        expect = state_before[k] + (1 if k == "skipped" or (name == "PSD" and k == "count") else 0)
        if k == "perturbed":
            continue
        np.testing.assert_array_equal(_np(s.value), expect, err_msg=k)
    for m, b in zip(getattr(opt, "_mu", []), moments_before):
        np.testing.assert_array_equal(_np(m.value), b)


def test_sam_sps_non_finite_loss_is_skipped():
    v = keras.Variable(np.ones(4, np.float32))
    opt = psd_keras.SAM_SPS(rho=0.1)
    g = [keras.ops.ones((4,))]

    def value_and_grad_fn(e):
        return keras.ops.convert_to_tensor(np.float32(np.nan)), [keras.ops.ones((4,))]

    opt.sam_apply(
        g,
        [v],
        value_and_grad_fn=value_and_grad_fn,
        loss=keras.ops.convert_to_tensor(np.float32(1.0)),
    )
    np.testing.assert_array_equal(_np(v.value), np.ones(4, np.float32))
    assert int(_np(opt._state["skipped"])) == 1
    assert int(_np(opt._state["count"])) == 0


def test_sam_sps_plain_apply_explains():
    opt = psd_keras.SAM_SPS()
    with pytest.raises(TypeError, match="SAMModel"):
        opt.apply([keras.ops.ones((2,))], [keras.Variable(np.ones(2, np.float32))])


def test_sam_model_requires_sam_optimizer(digits3):
    X, y, _ = digits3
    model = psd_keras.SAMSequential([keras.Input((64,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    with pytest.raises(TypeError, match="SAM_SPS"):
        model.fit(X, np.eye(3, dtype=np.float32)[y], epochs=1, verbose=0)


BAD = [
    (lambda: psd_keras.PSD(-0.1, 1e-3, 0.1), "learning_rate"),
    (lambda: psd_keras.PSD(0.1, -1e-3, 0.1), "g_thres"),
    (lambda: psd_keras.PSD(0.1, 1e-3, -0.1), "radius"),
    (lambda: psd_keras.PSD(0.1, 1e-3, 0.1, -1), "episode_length"),
    (lambda: psd_keras.PSD(0.1, 1e-3, 0.1, t_thres=-2), "t_thres"),
    (lambda: psd_keras.PSD(0.1, 1e-3, 0.1, gate="hessian"), "gate"),
    (lambda: psd_keras.PSD(0.1, 1e-3, 0.1, noise="cauchy"), "noise"),
    (lambda: psd_keras.PSD(0.1, 1e-3, 0.1, ema_beta=1.5), "ema_beta"),
    (lambda: psd_keras.PSD(0.1, float("nan"), 0.1), "g_thres"),
    (lambda: psd_keras.PerturbedAdam(beta_1=1.0), "beta_1"),
    (lambda: psd_keras.PerturbedAdam(beta_2=-0.1), "beta_2"),
    (lambda: psd_keras.PerturbedAdam(epsilon=0.0), "epsilon"),
    (lambda: psd_keras.PerturbedAdam(radius=-1.0), "radius"),
    (lambda: psd_keras.PerturbedAdam(g_thres=-1.0), "g_thres"),
    (lambda: psd_keras.PerturbedAdam(learning_rate=-1.0), "learning_rate"),
    (lambda: psd_keras.SAM_SPS(rho=-0.1), "rho"),
    (lambda: psd_keras.SAM_SPS(lambd=1.5), "lambd"),
    (lambda: psd_keras.SAM_SPS(gamma_b=-1.0), "gamma_b"),
    (lambda: psd_keras.SAM_SPS(weight_decay=-1.0), "weight_decay"),
    (lambda: psd_keras.SAM_SPS(variant="adam"), "variant"),
]


@pytest.mark.parametrize("make,arg", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_hyperparameters_raise_value_error_naming_the_argument(make, arg):
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        make()


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="episode_length"):
        psd_keras.PSD(0.1, 1e-3, 0.1, episode_length=2.5)
    with pytest.raises(TypeError, match="seed"):
        psd_keras.PSD(0.1, 1e-3, 0.1, seed="x")
