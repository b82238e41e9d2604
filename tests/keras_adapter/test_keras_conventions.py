"""Keras's optimizer conventions, checked for PSD, PerturbedAdam and SAM_SPS on this backend.

The checks are the generic ones Keras applies to its own optimizers
(``keras/src/optimizers/optimizer_test.py`` and the per-optimizer ``*_test.py``):
iteration counter, empty gradients, clipping, EMA, loss scaling, gradient
accumulation, schedules and callables as learning rates, constraints,
``set_weights``, config / pickle / ``serialize`` round trips, ``fit`` equal to the
built-ins, raw ``tf.Variable``s, sparse (``IndexedSlices``) gradients.

The references are independent of this project's code: Keras's ``SGD`` / ``Adam``
with the same Keras options (``PSD`` with ``g_thres=0, radius=0`` is SGD;
``PerturbedAdam`` with ``g_thres=0`` is Adam), and for ``SAM_SPS`` a NumPy
transcription of SPEC section 2 with Keras's clipping, loss-scaling and EMA rules
written out.
"""

from __future__ import annotations

import pickle

import keras
import numpy as np
import pytest

import psd_keras

BACKEND = keras.backend.backend()
STEPS = 6
TOL = dict(rtol=1e-5, atol=1e-6)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _t(x):
    return keras.ops.convert_to_tensor(np.asarray(x, np.float32))


def _init(seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((3, 2)).astype(np.float32),
        rng.standard_normal(4).astype(np.float32),
    ]


def _grad_seq(seed=1, scale=3.0, steps=STEPS):
    rng = np.random.default_rng(seed)
    return [
        [(scale * rng.standard_normal(s)).astype(np.float32) for s in ((3, 2), (4,))]
        for _ in range(steps)
    ]


def _ours(name, **kw):
    lr = kw.pop("learning_rate", 0.1)
    if name == "PSD":
        return psd_keras.PSD(lr, g_thres=0.0, radius=0.0, seed=0, **kw)
    return psd_keras.PerturbedAdam(lr, g_thres=0.0, seed=0, **kw)


def _builtin(name, **kw):
    lr = kw.pop("learning_rate", 0.1)
    if name == "PSD":
        return keras.optimizers.SGD(lr, **kw)
    return keras.optimizers.Adam(lr, **kw)


def _trajectory(opt, grads, init=None, variables=None):
    vs = variables or [keras.Variable(x) for x in (init or _init())]
    out = []
    for gs in grads:
        opt.apply([None if g is None else _t(g) for g in gs], vs)
        out.append([_np(v).copy() for v in vs])
    return out, vs


def _compare(a, b, tol=TOL):
    assert len(a) == len(b)
    for step, (pa, pb) in enumerate(zip(a, b)):
        for leaf, (x, y) in enumerate(zip(pa, pb)):
            np.testing.assert_allclose(x, y, **tol, err_msg=f"step {step} leaf {leaf}")


def _schedule():
    return keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)


OPTIONS = {
    "plain": {},
    "clipnorm": dict(clipnorm=0.5),
    "global_clipnorm": dict(global_clipnorm=0.5),
    "clipvalue": dict(clipvalue=0.3),
    "weight_decay": dict(weight_decay=0.1),
    "ema": dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3),
    "loss_scale_factor": dict(loss_scale_factor=128.0),
    "accumulation": dict(gradient_accumulation_steps=3),
    "schedule": dict(learning_rate="schedule"),
    "callable_lr": dict(learning_rate="callable"),
}


def _options(key):
    kw = dict(OPTIONS[key])
    if kw.get("learning_rate") == "schedule":
        kw["learning_rate"] = _schedule()
    elif kw.get("learning_rate") == "callable":
        kw["learning_rate"] = lambda: 0.05
    return kw


# ------------------------------------------------------------ PSD / PerturbedAdam
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam"])
def test_option_matches_builtin(name, option):
    """Each standard option does to PSD / PerturbedAdam what it does to SGD / Adam."""
    grads = _grad_seq()
    if option == "loss_scale_factor":
        grads = [[g * 128.0 for g in gs] for gs in grads]
    ours, _ = _trajectory(_ours(name, **_options(option)), grads)
    ref, _ = _trajectory(_builtin(name, **_options(option)), grads)
    _compare(ours, ref)
    if option == "plain":  # the reference moved the weights: the comparison can fail
        assert not np.allclose(ref[-1][0], _init()[0])


@pytest.mark.parametrize("scale", [1.0, 1e-6])
def test_perturbed_adam_defaults_are_keras_adam(scale):
    """Issue 13 item 4 / contract C7: PerturbedAdam() with the gate off is Adam() step for
    step, defaults included (epsilon=1e-7 added to sqrt(v)); with gradients of 1e-6 the
    epsilon term is a large part of the step, so its convention is what is compared."""
    grads = _grad_seq(scale=scale, steps=8)
    ours, _ = _trajectory(psd_keras.PerturbedAdam(g_thres=0.0, seed=0), grads)
    ref, _ = _trajectory(keras.optimizers.Adam(), grads)
    _compare(ours, ref, tol=dict(rtol=1e-6, atol=1e-7))
    hat, _ = _trajectory(keras.optimizers.Adam(epsilon=1e-7 * np.sqrt(1 - 0.999)), grads)
    if scale < 1e-3:  # the other convention gives another step: the test can fail
        assert not np.allclose(hat[-1][0], ref[-1][0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam", "SAM_SPS"])
def test_iterations_counter_and_accumulated_iterations(name):
    v = keras.Variable(np.ones((2, 2), np.float32))
    opt = _make(name, gradient_accumulation_steps=None)
    for k in range(1, 3):
        _step(opt, [_t(np.ones((2, 2)))], [v])
        assert int(_np(opt.iterations)) == k
    if name != "SAM_SPS":
        opt = _ours(name, gradient_accumulation_steps=2)
        for _ in range(4):
            opt.apply([_t(np.ones((2, 2)))], [v])
        assert int(_np(opt._iterations)) == 4 and int(_np(opt.iterations)) == 2


@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam"])
def test_empty_gradients(name):
    v = keras.Variable(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="No gradients provided"):
        _ours(name).apply_gradients([(None, v)])
    grads = [[None, g[1]] for g in _grad_seq()[:2]]
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        ours, _ = _trajectory(_ours(name), grads)
    ref, _ = _trajectory(_builtin(name), [[None, g[1]] for g in _grad_seq()[:2]])
    _compare(ours, ref)
    np.testing.assert_array_equal(ours[-1][0], _init()[0])


@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam", "SAM_SPS"])
def test_only_one_clip_option(name):
    with pytest.raises(ValueError, match="Only one of"):
        _make(name, clipnorm=0.1, clipvalue=0.1)


@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam", "SAM_SPS"])
def test_constraints_are_applied(name):
    v = keras.Variable(np.full((2, 2), -0.5, np.float32))
    v.constraint = keras.constraints.NonNeg()
    _step(_make(name), [_t(np.full((2, 2), 1e-3))], [v])
    assert float(np.min(_np(v))) == 0.0


@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam", "SAM_SPS"])
def test_set_weights(name):
    x = keras.Variable(np.ones((2, 2), np.float32))
    opt1 = _make(name)
    _step(opt1, [_t([[1.0, 2.0], [3.0, 4.0]])], [x])
    opt2 = _make(name)
    with pytest.raises(ValueError, match="You are calling"):
        opt2.set_weights(opt1.variables)
    opt2.build([x])
    opt2.set_weights(opt1.variables)
    for a, b in zip(opt1.variables, opt2.variables):
        np.testing.assert_array_equal(_np(a), _np(b))


ROUND_TRIP = {
    "PSD": lambda: psd_keras.PSD(
        _schedule(),
        1e-2,
        0.05,
        3,
        t_thres=2,
        max_episodes=2**40,
        clipnorm=1.0,
        use_ema=True,
        loss_scale_factor=8.0,
        gradient_accumulation_steps=2,
        weight_decay=0.01,
        seed=3,
    ),
    "PerturbedAdam": lambda: psd_keras.PerturbedAdam(
        0.01,
        0.8,
        0.99,
        1e-6,
        1e-2,
        2**35,
        0.02,
        noise="ball",
        seed=4,
        global_clipnorm=2.0,
        use_ema=True,
        ema_momentum=0.5,
        ema_overwrite_frequency=7,
    ),
    "SAM_SPS": lambda: psd_keras.SAM_SPS(
        0.05,
        0.5,
        0.1,
        2.0,
        1e-4,
        "sps",
        clipvalue=1.0,
        use_ema=True,
        loss_scale_factor=4.0,
        name="sam",
    ),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_config_pickle_and_serialize_round_trips(name):
    opt = ROUND_TRIP[name]()
    cfg = opt.get_config()
    assert type(opt).from_config(cfg).get_config() == cfg
    assert pickle.loads(pickle.dumps(opt)).get_config() == cfg
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again) is type(opt) and again.get_config() == cfg
    for key in ("use_ema", "clipnorm", "global_clipnorm", "clipvalue", "loss_scale_factor"):
        assert cfg[key] == getattr(opt, key)


# ------------------------------------------------------------------ SAM_SPS
def _quadratic(seed=2):
    """f(x) = 0.5 sum_i a_i (x_i - t_i)^2 + 0.1 (over the leaves), gradient a (x - t)."""
    rng = np.random.default_rng(seed)
    a = [rng.uniform(0.5, 2.0, s).astype(np.float32) for s in ((3, 2), (4,))]
    t = [(3.0 * rng.standard_normal(s)).astype(np.float32) for s in ((3, 2), (4,))]

    def f(x):
        return sum(0.5 * np.sum(ai * (xi - ti) ** 2) for ai, xi, ti in zip(a, x, t)) + 0.1

    def g(x):
        return [ai * (xi - ti) for ai, xi, ti in zip(a, x, t)]

    return a, t, f, g


def _keras_fn(a, t, scale=1.0):
    ops = keras.ops
    at = [_t(x) for x in a]
    tt = [_t(x) for x in t]

    def value_and_grad_fn(e):
        e = [ops.convert_to_tensor(x) for x in e]
        loss = sum(0.5 * ops.sum(ai * (ei - ti) ** 2) for ai, ei, ti in zip(at, e, tt)) + 0.1
        return loss, [scale * ai * (ei - ti) for ai, ei, ti in zip(at, e, tt)]

    return value_and_grad_fn


def _clip(gs, kw):
    """Keras's clipping rules (base_optimizer._clip_gradients) in NumPy."""
    if kw.get("clipnorm"):
        c = kw["clipnorm"]
        return [g * c / max(np.linalg.norm(g), c) for g in gs]
    if kw.get("global_clipnorm"):
        c = kw["global_clipnorm"]
        n = np.sqrt(sum(np.sum(g * g) for g in gs))
        return [g * c / max(n, c) for g in gs]
    if kw.get("clipvalue"):
        c = kw["clipvalue"]
        return [np.clip(g, -c, c) for g in gs]
    return gs


def _sam_reference(x, f, g, steps, rho, lambd, gamma_b, wd, kw):
    """SPEC section 2 step by step (variant sps+), float64, with the Keras options."""
    x = [p.astype(np.float64) for p in x]
    avg = None
    traj = []
    m = kw.get("ema_momentum", 0.99)
    for k in range(1, steps + 1):
        gx = _clip(g(x), kw)
        gn = max(np.sqrt(sum(np.sum(q * q) for q in gx)), 1e-12)
        c = rho * (1 - lambd + lambd / gn)
        e = [p + c * q for p, q in zip(x, gx)]
        ge = _clip(g(e), kw)
        num = f(e) - 0.0 - sum(np.sum(q * (pe - p)) for q, pe, p in zip(ge, e, x))
        den = max(np.sqrt(sum(np.sum(q * q) for q in ge)), 1e-12) ** 2
        gamma = min(max(num, 0.0) / den, gamma_b)
        x = [p - gamma * (q + wd * p) for p, q in zip(x, ge)]
        if kw.get("use_ema"):
            avg = (
                [p.copy() for p in x]
                if avg is None
                else [m * a + (1 - m) * p for a, p in zip(avg, x)]
            )
            freq = kw.get("ema_overwrite_frequency")
            if freq and k % freq == 0:
                x = [a.copy() for a in avg]
        traj.append([p.copy() for p in x])
    return traj, avg


SAM_OPTIONS = ["plain", "clipnorm", "global_clipnorm", "clipvalue", "ema", "loss_scale_factor"]


@pytest.mark.parametrize("option", SAM_OPTIONS)
def test_sam_sps_option_matches_transcription(option):
    """sam_apply runs Keras's apply machinery: the option changes the step as documented
    (both passes unscaled and clipped; EMA of the weights) and matches the transcription."""
    kw = _options(option)
    a, t, f, g = _quadratic()
    cfg = dict(rho=0.3, lambd=1.0 if option != "clipvalue" else 0.5, gamma_b=5.0, weight_decay=0.01)
    opt = psd_keras.SAM_SPS(
        cfg["rho"], cfg["lambd"], 0.0, cfg["gamma_b"], cfg["weight_decay"], **kw
    )
    scale = kw.get("loss_scale_factor", 1.0)
    fn = _keras_fn(a, t, scale)
    vs = [keras.Variable(x) for x in _init()]
    traj = []
    for _ in range(STEPS):
        loss, gx = fn([v.value for v in vs])
        opt.sam_apply(gx, vs, value_and_grad_fn=fn, loss=loss)
        traj.append([_np(v).copy() for v in vs])
    ref, avg = _sam_reference(
        _init(), f, g, STEPS, cfg["rho"], cfg["lambd"], cfg["gamma_b"], cfg["weight_decay"], kw
    )
    _compare(traj, ref, tol=dict(rtol=1e-4, atol=1e-5))
    if option in ("clipnorm", "global_clipnorm", "clipvalue", "ema"):
        plain, _ = _sam_reference(
            _init(), f, g, STEPS, cfg["rho"], cfg["lambd"], cfg["gamma_b"], cfg["weight_decay"], {}
        )
        assert not np.allclose(plain[-1][0], ref[-1][0], rtol=1e-3), (
            "the option must change the run"
        )
    if option == "ema":
        for av, r in zip(opt._model_variables_moving_average, avg):
            np.testing.assert_allclose(_np(av), r, rtol=1e-4, atol=1e-5)
    assert int(_np(opt.iterations)) == STEPS


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(learning_rate=123), "learning_rate"),
        (dict(seed=5), "seed"),
        (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps"),
    ],
)
def test_sam_sps_rejects_what_it_cannot_honour(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        psd_keras.SAM_SPS(**kwargs)


def test_sam_sps_weight_decay_default_is_zero():
    assert psd_keras.SAM_SPS().get_config()["weight_decay"] == 0.0


@pytest.mark.parametrize("option", ["ema", "loss_scale_factor", "global_clipnorm"])
def test_sam_sps_fit_with_option_matches_transcription(
    option, digits3, mlp_factory, init_params, numpy_mlp
):
    """model.fit (both passes of SAMTrainStep) honours the option on this backend: the
    final weights equal the transcription's (for EMA: the average Keras writes at the end)."""
    X, _, Y = digits3
    params = init_params()
    kw = dict(
        ema=dict(use_ema=True, ema_momentum=0.8),
        loss_scale_factor=dict(loss_scale_factor=1024.0),
        global_clipnorm=dict(global_clipnorm=0.05),
    )[option]
    opt = psd_keras.SAM_SPS(rho=0.05, gamma_b=2.0, **kw)
    model = mlp_factory(params, cls=psd_keras.SAMSequential)
    model.compile(optimizer=opt, loss="mse", auto_scale_loss=False)
    model.fit(X, Y, batch_size=len(X), epochs=STEPS, shuffle=False, verbose=0)
    mlp = numpy_mlp(X, Y)
    ref, avg = _sam_reference(
        params,
        mlp.loss,
        lambda p: mlp.value_and_grad([q.astype(np.float32) for q in p])[1],
        STEPS,
        0.05,
        1.0,
        2.0,
        0.0,
        kw,
    )
    expect = avg if option == "ema" else ref[-1]
    for w, r in zip(model.get_weights(), expect):
        np.testing.assert_allclose(w, r, rtol=1e-4, atol=1e-5)
    assert np.std(model.get_weights()[0]) > 0.1  # not the all-zero EMA slots of issue 13


# -------------------------------------------------------------- fit vs built-in
@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam"])
def test_fit_matches_builtin(name, mlp_factory, init_params):
    # Dense random inputs: no gradient entry is near zero, where Adam's two epsilon
    # conventions would differ (see ADAM_EPS).
    rng = np.random.default_rng(5)
    X = rng.standard_normal((96, 64)).astype(np.float32)
    Y = rng.standard_normal((96, 3)).astype(np.float32)
    weights = []
    for make in (_ours, _builtin):
        keras.backend.clear_session()
        model = mlp_factory(init_params())
        model.compile(optimizer=make(name, learning_rate=0.05, clipnorm=1.0), loss="mse")
        model.fit(X, Y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, **TOL)


# ------------------------------------------------------------- sparse gradients
def _embedding_data(distinct=False):
    rng = np.random.default_rng(0)
    if distinct:  # no index twice in a row
        ids = np.stack([rng.permutation(6)[:4] for _ in range(32)]).astype("int32")
    else:  # many repeated indices in every batch
        ids = rng.integers(0, 6, size=(32, 4)).astype("int32")
    y = rng.standard_normal((32, 1)).astype(np.float32)
    return ids, y


def _embedding_model(cls=keras.Sequential):
    keras.utils.set_random_seed(0)
    return cls(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(6, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )


@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam"])
def test_embedding_fit_matches_builtin(name):
    """TF hands the Embedding an IndexedSlices gradient (duplicates to be summed); the
    step equals Keras's SGD / Adam on it (on JAX / torch the gradient is dense).

    Adam: with an index repeated in one batch Keras's Adam squares each slice before
    the duplicates are summed (v gets sum g_i^2, not (sum g_i)^2), PerturbedAdam uses
    the gradient itself (as torch and Optax do), so Adam is compared on batches of one
    row with distinct indices, where the two agree."""
    adam = name == "PerturbedAdam"
    ids, y = _embedding_data(distinct=adam)
    weights = []
    for make in (_ours, _builtin):
        keras.backend.clear_session()
        model = _embedding_model()
        model.compile(optimizer=make(name, learning_rate=0.05), loss="mse")
        model.fit(ids, y, batch_size=1 if adam else 16, epochs=3, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    assert not np.allclose(weights[1][0], _embedding_model().get_weights()[0])
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, **TOL)


def test_embedding_sparse_global_norm_sums_duplicates():
    """The PSD gate sees ||g|| of the dense gradient (duplicate rows summed)."""
    if BACKEND != "tensorflow":
        pytest.skip("IndexedSlices exist only on TensorFlow")
    import tensorflow as tf

    v = keras.Variable(np.zeros((4, 2), np.float32))
    g = tf.IndexedSlices(
        tf.constant([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]]),
        tf.constant([1, 1, 3]),
        tf.constant([4, 2]),
    )
    opt = psd_keras.PSD(0.5, g_thres=0.0, radius=0.0, gate="ema", ema_beta=0.5, seed=0)
    opt.apply([g], [v])
    # The EMA starts at the first ||g||^2 = 2^2 (row 1: 1 + 1) + 2^2 (row 3) = 8;
    # squaring the slices before summing the duplicates would give 6.
    np.testing.assert_allclose(_np(opt.psd_state.grad_sq_ema), 8.0)
    np.testing.assert_allclose(_np(v), [[0, 0], [-1.0, 0], [0, 0], [0, -1.0]])


def test_sam_sps_embedding_equals_one_hot_dense():
    """SAM_SPS on an Embedding (IndexedSlices on TF) equals the same model written as a
    one-hot matmul (dense gradients)."""
    ids, y = _embedding_data()
    model = _embedding_model(psd_keras.SAMSequential)
    w0 = model.get_weights()
    model.compile(optimizer=psd_keras.SAM_SPS(rho=0.05), loss="mse")
    model.fit(ids, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    onehot = np.eye(6, dtype=np.float32)[ids]  # (32, 4, 6)
    dense = psd_keras.SAMSequential(
        [
            keras.Input((4, 6)),
            keras.layers.Dense(3, use_bias=False),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    dense.set_weights(w0)
    dense.compile(optimizer=psd_keras.SAM_SPS(rho=0.05), loss="mse")
    dense.fit(onehot, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), dense.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(model.get_weights()[0], w0[0])


# ------------------------------------------------------------- raw tf.Variable
@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam", "SAM_SPS"])
def test_mixed_with_tf_variables(name):
    if BACKEND != "tensorflow":
        pytest.skip("raw tf.Variables exist only on TensorFlow")
    import tensorflow as tf

    init = _init()
    if name == "SAM_SPS":
        a, t, f, g = _quadratic()
        vs = [keras.Variable(init[0]), tf.Variable(init[1])]
        opt = psd_keras.SAM_SPS(0.3, gamma_b=5.0)
        fn = _keras_fn(a, t)
        for _ in range(3):
            loss, gx = fn([tf.convert_to_tensor(v) for v in vs])
            opt.sam_apply(gx, vs, value_and_grad_fn=fn, loss=loss)
        ref, _ = _sam_reference(init, f, g, 3, 0.3, 1.0, 5.0, 0.0, {})
        _compare([[_np(v) for v in vs]], [ref[-1]], tol=dict(rtol=1e-4, atol=1e-5))
        return
    out = []
    for make in (_ours, _builtin):
        vs = [keras.Variable(init[0]), tf.Variable(init[1])]
        out.append(_trajectory(make(name), _grad_seq(steps=3), variables=vs)[0])
    _compare(*out)
    opt = _ours(name)
    vs = [keras.Variable(init[0]), tf.Variable(init[1])]
    opt.apply([_t(np.ones((3, 2))), _t(np.ones(4))], vs)
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        opt.apply([_t(np.ones((3, 2))), None], vs)
    assert int(_np(opt.iterations)) == 2


# ------------------------------------------------------------ large integers (C1)
def test_psd_large_integers_validated_at_construction():
    """Issue 13 item 10 / contract C1: 2**31 is accepted, kept in the config, and steps."""
    big = 2**31
    opt = psd_keras.PSD(0.1, 0.0, 0.01, big, t_thres=big, max_episodes=big, seed=0)
    cfg = opt.get_config()
    assert (cfg["episode_length"], cfg["t_thres"], cfg["max_episodes"]) == (big, big, big)
    assert psd_keras.PSD.from_config(cfg).get_config() == cfg
    v = keras.Variable(np.ones(3, np.float32))
    for _ in range(2):
        opt.apply([_t(np.full(3, 0.1))], [v])  # no OverflowError at the first update
    assert int(_np(opt.psd_state.count)) == 2
    np.testing.assert_allclose(_np(v), 1.0 - 2 * 0.1 * 0.1, rtol=1e-6)  # gate closed: SGD
    # gate open: one perturbation, then an episode of 2**31 steps that never wraps
    opt = psd_keras.PSD(0.1, 1.0, 0.01, big, t_thres=big, max_episodes=big, seed=0)
    v = keras.Variable(np.ones(3, np.float32))
    for _ in range(3):
        opt.apply([_t(np.full(3, 0.1))], [v])
    assert int(_np(opt.psd_state.episodes)) == 1
    assert int(_np(opt.psd_state.episode_left)) > 2**30
    pa = psd_keras.PerturbedAdam(t_thres=2**40, seed=0)
    pa.apply([_t(np.full(3, 0.1))], [keras.Variable(np.ones(3, np.float32))])
    assert pa.get_config()["t_thres"] == 2**40
    assert psd_keras.PSD(max_episodes=10**15).get_config()["max_episodes"] == 10**15
    for make in (
        lambda: psd_keras.PSD(max_episodes=-1),
        lambda: psd_keras.PSD(t_thres=-1),
        lambda: psd_keras.PerturbedAdam(t_thres=-3),
    ):
        with pytest.raises(ValueError, match="max_episodes|t_thres"):
            make()


def test_renamed_arguments_explain():
    with pytest.raises(TypeError, match="g_thres"):
        psd_keras.PSD(0.1, epsilon=1e-3)
    with pytest.raises(TypeError, match="radius"):
        psd_keras.PerturbedAdam(r=1e-3)
    old = psd_keras.PSD(0.1, 0.2, 0.3).get_config()
    old["epsilon"] = old.pop("g_thres")  # a config saved before the rename
    assert psd_keras.PSD.from_config(old).get_config()["g_thres"] == 0.2


def test_psd_has_keras_style_defaults():
    cfg = psd_keras.PSD().get_config()
    assert cfg["learning_rate"] == pytest.approx(0.01)  # a float32 variable, as for SGD
    assert (cfg["g_thres"], cfg["radius"], cfg["episode_length"]) == (1e-3, 1e-3, 0)


# ----------------------------------------------------------------- helpers
def _make(name, **kw):
    if name == "SAM_SPS":
        return psd_keras.SAM_SPS(0.1, **kw)
    return _ours(name, **kw)


def _step(opt, grads, variables):
    if isinstance(opt, psd_keras.SAM_SPS):

        def fn(e):
            return keras.ops.sum(e[0]) * 0.0 + 1.0, [keras.ops.ones_like(x) * 1e-3 for x in e]

        opt.sam_apply(grads, variables, value_and_grad_fn=fn, loss=1.0)
    else:
        opt.apply(grads, variables)
