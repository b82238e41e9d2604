"""PyTorch backend: the PSD step's scalar layer on NumPy views (CPU, eager) against
the same step with the scalar layer on torch tensors, and inside a ``StatelessScope``
(where the variables must not be written in place). Issue 16, round 8."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import psd_keras
import psd_keras.optimizers as O

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch backend")

KW = dict(learning_rate=0.1, g_thres=1e3, radius=0.05, episode_length=2, seed=3)


def _grads(step, shapes):
    rng = np.random.default_rng(step)
    gs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    if step == 2:
        gs[0][0] = np.nan  # a skipped step
    if step == 3:
        gs[1][:] = 1e20  # finite, its square overflows float32: not skipped
    return [keras.ops.convert_to_tensor(g) for g in gs]


def _run(monkeypatch, host):
    import torch

    calls = []
    real = O._scalars_on_host

    def spy(grads):
        out = real(grads) if host else False
        calls.append(out)
        return out

    monkeypatch.setattr(O, "_scalars_on_host", spy)
    shapes = [(5, 3), (7,)]
    rng = np.random.default_rng(0)
    vs = [keras.Variable(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    opt = psd_keras.PSD(**KW)
    for step in range(6):
        opt.apply(_grads(step, shapes), vs)
    assert all(isinstance(v.value, torch.Tensor) for v in vs)
    return [np.array(v) for v in vs], opt.psd_state, calls


def test_host_scalar_layer_equals_the_torch_scalar_layer(monkeypatch):
    w_host, st_host, calls_host = _run(monkeypatch, host=True)
    w_dev, st_dev, calls_dev = _run(monkeypatch, host=False)
    assert all(calls_host) and not any(calls_dev)  # both paths really ran
    for a, b in zip(w_host, w_dev):  # a few ulps: NumPy's and torch's float32 libm
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for name in st_host._fields:
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(getattr(st_host, name)),
            keras.ops.convert_to_numpy(getattr(st_dev, name)),
            rtol=1e-6,
            err_msg=name,
        )
    assert int(keras.ops.convert_to_numpy(st_host.episodes)) >= 1  # it perturbed
    assert int(keras.ops.convert_to_numpy(st_host.skipped)) == 1  # the NaN step only


def test_stateless_scope_writes_no_variable_in_place():
    shapes = [(5, 3), (7,)]
    vs = [keras.Variable(np.ones(s, np.float32)) for s in shapes]
    opt = psd_keras.PSD(**KW)
    opt.build(vs)
    before = [np.array(v) for v in opt.variables]
    # Copies: on PyTorch Keras's own SGD updates the tensors it is given in place
    # (checked), so the values handed to stateless_apply are the caller's own.
    new_vals, new_opt = opt.stateless_apply(
        [v.value.clone() for v in opt.variables],
        _grads(0, shapes),
        [v.value.clone() for v in vs],
    )
    assert O._scalars_on_host(_grads(0, shapes))  # outside the scope the host path runs
    for v in vs:  # the trainable variables are untouched
        np.testing.assert_array_equal(np.array(v), np.ones(v.shape, np.float32))
    for v, b in zip(opt.variables, before):  # and so is the optimizer's state
        np.testing.assert_array_equal(np.array(v), b)
    # the returned values are the step's: same as an eager step from the same start
    opt2 = psd_keras.PSD(**KW)
    vs2 = [keras.Variable(np.ones(s, np.float32)) for s in shapes]
    opt2.apply(_grads(0, shapes), vs2)
    for a, v in zip(new_vals, vs2):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), np.array(v), rtol=1e-6, atol=1e-7)
    count = dict(zip([v.path for v in opt.variables], new_opt))
    assert any(int(keras.ops.convert_to_numpy(x)) == 1 for k, x in count.items() if "count" in k)
