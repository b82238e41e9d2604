"""compile/fit on real data (load_digits), schedules, jit_compile and mixed precision."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import psd_keras


def _np(x):
    return keras.ops.convert_to_numpy(x)


BACKEND = keras.backend.backend()


def _model(cls=keras.Sequential, batchnorm=False, dropout=False):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((64,)), keras.layers.Dense(32)]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Activation("tanh"))
    if dropout:
        layers.append(keras.layers.Dropout(0.1))
    layers.append(keras.layers.Dense(10))
    layers.append(keras.layers.Activation("linear", dtype="float32"))
    return cls(layers)


def _optimizers():
    return {
        "PSD": lambda: psd_keras.PSD(0.1, g_thres=0.05, radius=0.01, episode_length=5, seed=1),
        "PerturbedAdam": lambda: psd_keras.PerturbedAdam(
            0.01, g_thres=0.05, t_thres=5, radius=1e-3, seed=1
        ),
        "SAM_SPS": lambda: psd_keras.SAM_SPS(rho=0.05, gamma_b=1.0),
    }


def _fit(name, X, y, epochs=4, jit_compile="auto", lr=None, **model_kw):
    opt = _optimizers()[name]() if lr is None else lr
    cls = psd_keras.SAMSequential if name == "SAM_SPS" else keras.Sequential
    model = _model(cls, **model_kw)
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
        auto_scale_loss=name != "SAM_SPS",
    )
    hist = model.fit(X, y, batch_size=64, epochs=epochs, verbose=0, shuffle=False)
    return model, opt, hist.history["loss"]


@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam", "SAM_SPS"])
def test_fit_lowers_loss_on_digits(name, digits10):
    X, y = digits10
    _, opt, losses = _fit(name, X, y, batchnorm=True, dropout=True)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(_np(opt.iterations)) == 4 * 10


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="torch: jit_compile is torch.compile (not exercised); jax: every other fit test already runs under jax.jit",
)
@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam", "SAM_SPS"])
def test_fit_jit_compile(name, digits10):
    X, y = digits10
    model, _, losses = _fit(name, X, y, epochs=2, jit_compile=True)
    assert model.jit_compile is True
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam"])
def test_learning_rate_schedule(name, digits10):
    X, y = digits10
    sched = keras.optimizers.schedules.ExponentialDecay(0.1 if name == "PSD" else 0.01, 10, 0.5)
    opt = (
        psd_keras.PSD(sched, 0.0, 0.0, seed=0)
        if name == "PSD"
        else psd_keras.PerturbedAdam(sched, seed=0)
    )
    _, _, losses = _fit(name, X, y, epochs=3, lr=opt)
    assert losses[-1] < losses[0]
    cfg = opt.get_config()
    assert isinstance(cfg["learning_rate"], dict)
    again = type(opt).from_config(cfg)
    assert isinstance(again._learning_rate, keras.optimizers.schedules.ExponentialDecay)


@pytest.mark.parametrize(
    "policy,name",
    [
        ("mixed_bfloat16", "PSD"),
        ("mixed_bfloat16", "PerturbedAdam"),
        ("mixed_bfloat16", "SAM_SPS"),
        ("mixed_float16", "PSD"),
    ],
)
def test_mixed_precision_fit(policy, name, digits10):
    X, y = digits10
    keras.config.set_dtype_policy(policy)
    model, opt, losses = _fit(name, X, y, epochs=3)
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    assert all(str(w.dtype) == "float32" for w in model.trainable_weights)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_norm_accumulates_in_float32(dtype):
    """1000 gradient entries of 300: ||g||^2 = 9e7 overflows float16 (max 65504).
    Reduced in float32 (the core's rule) the step is finite and is taken, not skipped."""
    v = keras.Variable(np.zeros(1000), dtype=dtype)
    g = keras.ops.full((1000,), 300.0, dtype=dtype)
    opt = psd_keras.PSD(1e-3, g_thres=0.0, radius=0.0, seed=0)
    opt.apply([g], [v])
    assert int(_np(opt.psd_state.skipped)) == 0
    assert int(_np(opt.psd_state.count)) == 1
    assert keras.backend.standardize_dtype(opt.psd_state.grad_sq_ema.dtype) == "float32"
    np.testing.assert_allclose(_np(opt.psd_state.grad_sq_ema), 9e7, rtol=1e-2)
    np.testing.assert_allclose(_np(keras.ops.cast(v.value, "float32")), -0.3, rtol=1e-2)


@pytest.mark.skipif(
    BACKEND == "jax", reason="on JAX the custom loop is stateless_apply (tested below)"
)
def test_custom_loop_apply(digits10):
    """optimizer.apply(grads, variables) in a hand-written loop (per-backend gradients)."""
    X, y = digits10
    model = _model()
    opt = psd_keras.PSD(0.2, 0.01, 0.01, 3, seed=0)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    xb, yb = keras.ops.convert_to_tensor(X[:128]), keras.ops.convert_to_tensor(y[:128])
    losses = []
    for _ in range(15):
        loss, grads = _value_and_grad(model, loss_fn, xb, yb)
        losses.append(float(_np(loss)))
        opt.apply(grads, model.trainable_variables)
    assert losses[-1] < losses[0]
    assert int(_np(opt.psd_state.count)) == 15


def _value_and_grad(model, loss_fn, x, y):
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return loss, tape.gradient(loss, model.trainable_variables)
    if BACKEND == "torch":
        model.zero_grad()
        loss = loss_fn(y, model(x, training=True))
        loss.backward()
        return loss.detach(), [v.value.grad for v in model.trainable_variables]
    import jax

    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]

    def f(tv):
        out, _ = model.stateless_call(tv, ntv, x, training=True)
        return loss_fn(y, out)

    return jax.value_and_grad(f)(tv)


@pytest.mark.skipif(BACKEND != "jax", reason="stateless_apply is JAX's custom-loop API")
def test_jax_stateless_apply_in_jit(digits10):
    import jax

    X, y = digits10
    model = _model()
    opt = psd_keras.PerturbedAdam(0.01, g_thres=1e3, t_thres=3, radius=0.01, seed=3)
    opt.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    ntv = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def step(tv, ov, x, y):
        def f(tv):
            out, _ = model.stateless_call(tv, ntv, x, training=True)
            return loss_fn(y, out)

        loss, g = jax.value_and_grad(f)(tv)
        tv, ov = opt.stateless_apply(ov, g, tv)
        return loss, tv, ov

    tv = [v.value for v in model.trainable_variables]
    ov = [v.value for v in opt.variables]
    losses = []
    for _ in range(12):
        loss, tv, ov = step(tv, ov, X[:128], y[:128])
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    names = [v.name for v in opt.variables]
    assert int(ov[names.index("perturbations")]) >= 1  # the gate fired inside jit
    # the seed generator state advanced (noise drawn inside jit, carried in the state)
    seed_idx = [i for i, v in enumerate(opt.variables) if v is opt._seed_generator.state][0]
    assert not np.array_equal(_np(ov[seed_idx]), _np(opt.variables[seed_idx].value))
