"""The TensorFlow namespace bridge, function by function against NumPy, and the core through it."""

from __future__ import annotations

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TF bridge")


@pytest.fixture(scope="module")
def xp():
    import psd_keras  # noqa: F401 - registers the hook
    from psd_keras import _tf_namespace

    return _tf_namespace


@pytest.fixture(scope="module")
def tf():
    import tensorflow as tf

    return tf


A = np.array([[1.5, -2.0, np.inf], [0.0, np.nan, 3.0]], np.float32)
B = np.array([[0.5, 4.0, 1.0], [-1.0, 2.0, 3.5]], np.float32)


def test_namespace_resolution(xp, tf):
    from psd_core._array import namespace

    assert namespace(tf.constant(A)) is xp
    assert namespace([tf.Variable(B)]) is xp
    assert namespace(np.asarray(A)) is not xp


@pytest.mark.parametrize("fn", ["sqrt", "square", "abs", "exp", "log", "isfinite"])
def test_unary(fn, xp, tf):
    with np.errstate(all="ignore"):
        expect = getattr(np, fn)(np.abs(B) if fn in ("sqrt", "log") else B)
    got = getattr(xp, fn)(tf.constant(np.abs(B) if fn in ("sqrt", "log") else B))
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-6)
    np.testing.assert_array_equal(xp.isfinite(tf.constant(A)).numpy(), np.isfinite(A))
    np.testing.assert_array_equal(xp.isfinite(tf.constant([1, 2])).numpy(), [True, True])


@pytest.mark.parametrize("fn", ["maximum", "minimum"])
def test_binary(fn, xp, tf):
    np.testing.assert_array_equal(
        getattr(xp, fn)(tf.constant(B), tf.constant(B[::-1])).numpy(), getattr(np, fn)(B, B[::-1])
    )


@pytest.mark.parametrize("fn", ["all", "max", "min"])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_reductions(fn, axis, xp, tf):
    x = B > 0 if fn == "all" else B
    np.testing.assert_array_equal(
        getattr(xp, fn)(tf.constant(x), axis=axis).numpy(), getattr(np, fn)(x, axis=axis)
    )


def test_real_imag(xp, tf):
    z = (B + 1j * B[::-1]).astype(np.complex64)
    np.testing.assert_array_equal(xp.real(tf.constant(z)).numpy(), z.real)
    np.testing.assert_array_equal(xp.imag(tf.constant(z)).numpy(), z.imag)
    assert xp.complex64 == tf.complex64 and xp.complex128 == tf.complex128


def test_where_sum_reshape_astype(xp, tf):
    c = B > 1.0
    np.testing.assert_array_equal(
        xp.where(tf.constant(c), tf.constant(B), tf.constant(-B)).numpy(), np.where(c, B, -B)
    )
    np.testing.assert_allclose(xp.sum(tf.constant(B)).numpy(), np.sum(B), rtol=1e-6)
    np.testing.assert_allclose(xp.sum(tf.constant(B), axis=1).numpy(), np.sum(B, axis=1), rtol=1e-6)
    s16 = xp.sum(tf.constant(B, tf.float16), dtype=xp.float32)
    assert s16.dtype == tf.float32
    np.testing.assert_array_equal(xp.reshape(tf.constant(B), (-1,)).numpy(), B.reshape(-1))
    assert xp.astype(tf.constant(B), xp.float64).dtype == tf.float64
    np.testing.assert_array_equal(xp.astype(tf.constant(B), xp.int32).numpy(), B.astype(np.int32))


def test_creation(xp, tf):
    t = tf.constant(B)
    np.testing.assert_array_equal(xp.zeros_like(t).numpy(), np.zeros_like(B))
    np.testing.assert_array_equal(xp.ones_like(t).numpy(), np.ones_like(B))
    np.testing.assert_array_equal(xp.full_like(t, 3).numpy(), np.full_like(B, 3))
    np.testing.assert_array_equal(
        xp.full((2,), 7, dtype=xp.int32).numpy(), np.full((2,), 7, np.int32)
    )
    np.testing.assert_array_equal(xp.full((), True, dtype=xp.bool).numpy(), np.full((), True))
    assert xp.asarray(2.5, dtype=xp.float32, device=t.device).dtype == tf.float32
    assert xp.asarray(t, dtype=xp.float64).dtype == tf.float64
    np.testing.assert_array_equal(xp.zeros((2, 3), dtype=xp.float64).numpy(), np.zeros((2, 3)))


def test_dtype_functions(xp, tf):
    assert xp.isdtype(xp.float16, "real floating") and not xp.isdtype(xp.int32, "real floating")
    assert xp.isdtype(xp.int32, ("integral", "bool")) and xp.isdtype(xp.bool, "bool")
    assert xp.isdtype(xp.float32, xp.float32)
    for d, n in [(xp.float16, np.float16), (xp.float32, np.float32), (xp.float64, np.float64)]:
        assert xp.finfo(d).bits == np.finfo(n).bits
        assert xp.finfo(d).eps == pytest.approx(float(np.finfo(n).eps))
    assert xp.finfo(xp.bfloat16).bits == 16
    assert xp.iinfo(xp.int32).max == np.iinfo(np.int32).max
    assert xp.result_type(xp.float16, xp.float32) == tf.float32
    assert xp.result_type(xp.float16, xp.bfloat16) == tf.float32
    assert xp.result_type(tf.constant(B), xp.float64) == tf.float64
    assert xp.result_type(xp.int32, xp.float16) == tf.float16


def test_core_scalar_layer_through_bridge_matches_numpy(xp, tf):
    """psd_coefficients / perturbed_adam_coefficients / SAM-SPS scalars on TF tensors == on NumPy."""
    from psd_core import perturbation as P
    from psd_core import polyak

    cfg = P.psd_config(0.1, 0.5, 0.2, 3, t_thres=1, gate="ema")
    like_np = np.zeros(3, np.float32)
    st_np = P.psd_init(like_np, cfg)
    st_tf = P.PSDState(*[tf.constant(np.asarray(s)) for s in st_np])
    for g2, u in [(0.01, 0.3), (4.0, 0.9), (np.inf, 0.5), (0.1, 0.7), (0.0, 0.2)]:
        c_np, st_np = P.psd_coefficients(
            np.float32(g2), st_np, cfg, dim=7, noise_sq_norm=np.float32(5.0), uniform=np.float32(u)
        )
        c_tf, st_tf = P.psd_coefficients(
            tf.constant(np.float32(g2)),
            st_tf,
            cfg,
            dim=7,
            noise_sq_norm=tf.constant(np.float32(5.0)),
            uniform=tf.constant(np.float32(u)),
        )
        for a, b in zip(c_tf, c_np):
            np.testing.assert_allclose(a.numpy(), np.asarray(b), rtol=1e-6)
        for a, b in zip(st_tf, st_np):
            np.testing.assert_allclose(a.numpy(), np.asarray(b), rtol=1e-6)

    acfg = P.perturbed_adam_config(g_thres=1.0, t_thres=2, noise="ball")
    ast_np = P.perturbed_adam_init([like_np], acfg)
    ast_tf = P.PerturbedAdamState(
        *[tf.constant(np.asarray(s)) if not isinstance(s, list) else s for s in ast_np]
    )
    for s2, g2 in [(0.5, 1.0), (0.25, 2.0), (9.0, 1.0), (np.nan, 1.0)]:
        c_np, ast_np = P.perturbed_adam_coefficients(
            np.float32(s2),
            np.float32(g2),
            ast_np,
            acfg,
            dim=3,
            noise_sq_norm=np.float32(2.0),
            uniform=np.float32(0.4),
        )
        c_tf, ast_tf = P.perturbed_adam_coefficients(
            tf.constant(np.float32(s2)),
            tf.constant(np.float32(g2)),
            ast_tf,
            acfg,
            dim=3,
            noise_sq_norm=tf.constant(np.float32(2.0)),
            uniform=tf.constant(np.float32(0.4)),
        )
        for a, b in zip(c_tf, c_np):
            np.testing.assert_allclose(a.numpy(), np.asarray(b), rtol=1e-6)
    bc_tf = P.adam_bias_corrections(tf.constant(3), 0.9, 0.999, tf.constant(np.float32(0)))
    bc_np = P.adam_bias_corrections(np.asarray(3, np.int32), 0.9, 0.999, np.float32(0))
    np.testing.assert_allclose([b.numpy() for b in bc_tf], bc_np, rtol=1e-6)

    scfg = polyak.sam_sps_config(rho=0.1, lambd=0.5, gamma_b=2.0, weight_decay=0.01)
    np.testing.assert_allclose(
        polyak.sam_perturbation_scale(tf.constant(np.float32(4.0)), 0.1, 0.5).numpy(),
        polyak.sam_perturbation_scale(np.float32(4.0), 0.1, 0.5),
        rtol=1e-6,
    )
    for le, ge2, inner in [(1.0, 4.0, 0.1), (0.05, 1e-14, 0.0), (np.nan, 1.0, 0.0)]:
        a = polyak.sam_sps_coefficients(
            tf.constant(np.float32(le)),
            tf.constant(np.float32(ge2)),
            tf.constant(np.float32(inner)),
            scfg,
        )
        b = polyak.sam_sps_coefficients(np.float32(le), np.float32(ge2), np.float32(inner), scfg)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x.numpy(), np.asarray(y), rtol=1e-6)


def test_core_traces_under_tf_function_with_xla(xp, tf):
    import psd_core

    tx = psd_core.psd(0.1, 10.0, 0.5, 2)

    @tf.function(jit_compile=True)
    def step(g, normals, u, count, since, left, eps, ema, sk, pert):
        st = psd_core.PSDState(count, since, left, eps, ema, sk, pert)
        upd, st = tx.update([g], st, normals=[normals], uniform=u)
        return upd[0], st.episodes

    g = np.full(5, 0.1, np.float32)
    z = np.linspace(-1, 1, 5).astype(np.float32)
    upd, ep = step(
        tf.constant(g),
        tf.constant(z),
        tf.constant(np.float32(0.25)),
        *[tf.constant(np.asarray(s)) for s in psd_core.psd(0.1, 10.0, 0.5, 2).init([g])],
    )
    st0 = tx.init([g])
    upd_np, st_np = tx.update([g], st0, normals=[z], uniform=np.float32(0.25))
    np.testing.assert_allclose(upd.numpy(), upd_np[0], rtol=1e-6)
    assert int(ep) == int(st_np.episodes) == 1
