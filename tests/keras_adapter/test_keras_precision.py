"""psd_keras inherits the core's issue-11 precision fixes, in float16/bfloat16/float32.

References: Keras's own ``SGD`` / ``Adam`` (PSD extras off) or the float64
transcriptions of ``tests/reference.py``. Runs on every backend (see
tests/test_keras_backends.py).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import psd_core
import psd_keras

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference import (  # noqa: E402
    fused_adam_reference,
    perturbed_adam_reference,
    psd_reference,
    sam_sps_reference,
)

DTYPES = ["float16", "bfloat16", "float32"]
HUGE = {"float16": 3e4, "bfloat16": 1e20, "float32": 1e20}
RTOL = {"float16": 2e-2, "bfloat16": 2e-2, "float32": 1e-5}
ops = keras.ops


def _np(x):
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")), np.float64)


def _t(x, dtype):
    return ops.cast(ops.convert_to_tensor(np.asarray(x, np.float32)), dtype)


def _var(x, dtype):
    return keras.Variable(_t(x, dtype), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_finite_gradient_is_applied_like_sgd_and_adam(dtype):
    h = HUGE[dtype]
    x0 = np.array([1.5, -2.0, 3.0, 0.5])
    g0 = np.array([h, -h, 0.5 * h, 1.0])
    lr = 1e-3 if dtype == "float16" else 1e-20
    v, w = _var(x0, dtype), _var(x0, dtype)
    opt = psd_keras.PSD(lr, g_thres=1e-3, radius=0.1, episode_length=2, seed=0)
    opt.apply([_t(g0, dtype)], [v])
    keras.optimizers.SGD(lr).apply([_t(g0, dtype)], [w])
    assert int(_np(opt.psd_state.skipped)) == 0
    np.testing.assert_allclose(_np(v), _np(w), rtol=RTOL[dtype])
    assert not np.allclose(_np(v), x0)
    # PerturbedAdam, gate off, 3 steps, not skipped. float32: equals keras Adam
    # (eps_mode="keras"). 16-bit: Keras's Adam runs in the variable's dtype (in bfloat16
    # 1 - 0.999 rounds to 0 and it never moves), so the float64 transcription is the
    # reference for the moderate entry; the huge entries stay finite.
    v, w = _var(x0, dtype), _var(x0, dtype)
    pa = psd_keras.PerturbedAdam(0.01, g_thres=0.0, t_thres=10**6, radius=0.0, seed=0)
    adam = keras.optimizers.Adam(0.01)
    for _ in range(3):
        pa.apply([_t(g0, dtype)], [v])
        adam.apply([_t(g0, dtype)], [w])
    assert np.all(np.isfinite(_np(v)))
    assert int(_np(pa._state["skipped"])) == 0 and int(_np(pa._state["count"])) == 3
    # every entry, as fused Adam computes it (float64 transcription, moments and
    # parameters rounded to the dtype for storage): ((1 - b2) g) g and sqrt(v) / sqrt(bc2)
    # do not overflow, so the huge entries step by about lr (in float16 the stored
    # v = 9e5 overflows to inf after the first step, as in torch's fused Adam)
    want = fused_adam_reference(
        g0, x0, 3, 0.01, lambda a: _np(_t(a, dtype)), eps=1e-7, eps_mode="keras"
    )
    np.testing.assert_allclose(_np(v), want, rtol=RTOL[dtype], atol=1e-6)
    if dtype == "float32":
        # where v = g^2 overflows Keras's Adam gives 0 (torch, TF) or NaN (JAX): compare
        # where it moved (always the moderate entry)
        ref = _np(w)
        ok = np.isfinite(ref) & (ref != x0)
        assert ok[3]
        np.testing.assert_allclose(_np(v)[ok], ref[ok], rtol=RTOL[dtype], atol=1e-6)
    else:
        ref = perturbed_adam_reference(
            [[g0]] * 3,
            [x0],
            lr=0.01,
            eps=1e-7,
            eps_mode="keras",
            g_thres=0.0,
            t_thres=10**6,
            radius=0.0,
            normals=[[np.zeros(4)]] * 3,
        )
        np.testing.assert_allclose(_np(v)[3], ref[-1]["params"][0][3], rtol=RTOL[dtype])
    # SAM-SPS on a linear loss with a huge slope (loss in float32)
    offset = 10.0 * h
    gq = _t(g0, dtype)

    def fn(e):
        lin = ops.sum(ops.cast(gq, "float32") * ops.cast(e[0], "float32"))
        return lin + offset, [gq]

    def vg_np(t):
        return float(np.sum(_np(gq) * t[0])) + offset, [_np(gq)]

    v = _var(x0, dtype)
    sam = psd_keras.SAM_SPS(rho=0.1, gamma_b=math.inf)
    loss, _ = fn([v])
    sam.sam_apply([gq], [v], value_and_grad_fn=fn, loss=loss)
    want = sam_sps_reference(vg_np, [_np(v) * 0 + x0], steps=1, rho=0.1, gamma_b=math.inf)
    np.testing.assert_allclose(_np(v), want[0]["params"][0], rtol=RTOL[dtype], atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_perturbed_adam_moves_with_zero_gradient_entries(dtype):
    x0 = np.array([0.5, -0.25, 1.0, 2.0])
    grads = [np.array([0.5, 0.0, -0.25, 0.0]) * (k + 1) for k in range(5)]
    v = _var(x0, dtype)
    pa = psd_keras.PerturbedAdam(0.01, g_thres=0.0, t_thres=10**6, radius=0.0, seed=0)
    want = perturbed_adam_reference(
        [[g] for g in grads],
        [x0],
        lr=0.01,
        eps=1e-7,
        eps_mode="keras",
        g_thres=0.0,
        t_thres=10**6,
        radius=0.0,
        normals=[[np.zeros(4)]] * 5,
    )
    for k, g in enumerate(grads):
        pa.apply([_t(g, dtype)], [v])
        assert np.all(np.isfinite(_np(v))), (k, _np(v))
        np.testing.assert_allclose(_np(v), want[k]["params"][0], rtol=RTOL[dtype], atol=1e-3)
    moved = np.abs(_np(v) - x0)
    assert moved[0] > 0.03 and moved[2] > 0.03
    np.testing.assert_array_equal(moved[[1, 3]], 0.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_perturbed_adam_16bit_tiny_gradient_entries_step_like_fused_adam(dtype):
    """Issue 11 bug 3, tiny entries: in float16 (1 - b2) g^2 underflows to 0 for |g| below
    about 8e-3 and the direction came from the stored (rounded) moments, so such an
    entry stepped by lr |g| / eps. Now from the step's float32 moments, as fused Adam
    (the transcription of tests/reference.py is the reference)."""
    g = np.array([1e-4, -2e-3, 5e-3, 0.5, -1.0, 0.0])
    v = _var(np.ones(6), dtype)
    pa = psd_keras.PerturbedAdam(0.01, g_thres=0.0, t_thres=10**6, radius=0.0, seed=0)
    for _ in range(20):
        pa.apply([_t(g, dtype)], [v])
    assert int(_np(pa._state["skipped"])) == 0
    want = fused_adam_reference(
        _np(_t(g, dtype)),
        np.ones(6),
        20,
        0.01,
        lambda a: _np(_t(a, dtype)),
        eps=1e-7,
        eps_mode="keras",
    )
    ulp = 2.0**-10 if dtype == "float16" else 2.0**-7
    np.testing.assert_allclose(_np(v), want, atol=20 * ulp)
    assert np.all(np.abs(_np(v) - 1.0) <= 1.0)  # the bug: 10 to 2000 lr per step


@pytest.mark.parametrize("dtype", DTYPES)
def test_sam_sps_tiny_gradient_stays_finite(dtype):
    rho = 0.1
    d = np.array([8.0, -8.0, 4.0, 6.0]) * 2.0**-24  # exact in float16 (subnormal)
    assert np.linalg.norm(d) < rho / 65504
    d32 = _t(d, "float32")

    def fn(e):
        r = ops.cast(e[0], "float32") + d32
        return 0.5 * ops.sum(r * r) + 1.0, [ops.cast(r, dtype)]

    def vg_np(t):
        r = t[0] + d
        return 0.5 * float(r @ r) + 1.0, [r]

    v = _var(np.zeros(4), dtype)
    sam = psd_keras.SAM_SPS(rho=rho, gamma_b=1.0)
    want = sam_sps_reference(vg_np, [np.zeros(4)], steps=3, rho=rho, gamma_b=1.0)
    for k in range(3):
        loss, g = fn([v])
        sam.sam_apply(g, [v], value_and_grad_fn=fn, loss=loss)
        assert np.all(np.isfinite(_np(v))), (k, _np(v))
        np.testing.assert_allclose(_np(v), want[k]["params"][0], rtol=RTOL[dtype], atol=2e-3)
    assert np.linalg.norm(_np(v)) > 0.05


@pytest.mark.parametrize("dtype", DTYPES)
def test_budget_beyond_int32_escapes_the_quartic_saddle(dtype):
    c = psd_core.psd_constants(1e-4, 5.0, 24.0, 0.1, 1.0, dim=4)
    assert c.max_episodes > 2**31
    z = np.array([0.3, -1.0, 0.7, 0.5])
    opt = psd_keras.PSD(
        c.step_size,
        g_thres=c.epsilon,
        radius=c.radius,
        episode_length=c.episode_length,
        max_episodes=c.max_episodes,
        seed=0,
    )
    opt._set_noise_fn(lambda variables: ([_t(z, dtype)], _t(0.5, "float32")))
    v = _var(np.zeros(4), dtype)
    steps = 120
    for _ in range(steps):
        x = ops.cast(v, "float32")
        opt.apply([ops.cast(4.0 * x**3 - 2.0 * x, dtype)], [v])
    want = psd_reference(
        lambda t: [4.0 * t[0] ** 3 - 2.0 * t[0]],
        [np.zeros(4)],
        steps=steps,
        lr=c.step_size,
        epsilon=c.epsilon,
        radius=c.radius,
        episode_length=c.episode_length,
        max_episodes=c.max_episodes,
        normals=[[z]] * steps,
        uniforms=[0.5] * steps,
    )
    assert int(_np(opt.psd_state.episodes)) == want[-1]["episodes"] == 1
    np.testing.assert_allclose(np.abs(_np(v)), 1 / math.sqrt(2), rtol=RTOL[dtype], atol=1e-3)
    np.testing.assert_allclose(_np(v), want[-1]["params"][0], rtol=RTOL[dtype], atol=1e-3)


@pytest.mark.parametrize(
    "case",
    ["finite", "huge_finite", "nan", "pos_inf", "neg_inf", "with_empty", "bfloat16_nan"],
)
def test_gradient_finiteness_check_is_entrywise(case):
    """The adapter's finiteness check (``_all_finite``, a cheap reduction per tensor on
    PyTorch and a guarded entrywise check on TF/JAX) against NumPy's entrywise
    ``isfinite``: a finite gradient whose square overflows is finite, a single NaN,
    +inf or -inf anywhere is not, and an empty tensor does not change the verdict."""
    from psd_keras.optimizers import _all_finite

    inf = float("inf")
    dtype = "float32"
    leaves = [np.linspace(-2.0, 3.0, 12).reshape(3, 4), np.ones(5)]
    if case == "huge_finite":
        leaves[1] = np.full(5, 1e20)
    elif case == "nan":
        leaves[0][1, 2] = np.nan
    elif case == "pos_inf":
        leaves[1][4] = inf
    elif case == "neg_inf":
        leaves[0][0, 0] = -inf
    elif case == "with_empty":
        leaves.append(np.zeros((0, 3)))
    elif case == "bfloat16_nan":
        dtype = "bfloat16"
        leaves[1][0] = np.nan
    expected = all(np.isfinite(x).all() for x in leaves)
    grads = [keras.ops.convert_to_tensor(x.astype(np.float32), dtype=dtype) for x in leaves]
    sq = sum(keras.ops.sum(keras.ops.square(keras.ops.cast(g, "float32"))) for g in grads)
    got = bool(keras.ops.convert_to_numpy(_all_finite(grads, sq)))
    assert got == expected
