"""Issue 11's regressions through ``psd_torch`` in float16 / bfloat16 / float32, each
against an independent reference (``torch.optim.SGD``/``Adam`` with the extras off, the
float64 SPEC transcription in ``tests/reference.py``, or the analytic minimum)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import sam_sps_reference

from psd_torch import PSD, SAM_SPS, PerturbedAdam

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# relative resolution of each dtype (tolerances are a few of these)
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}


def _huge(dtype):
    """A finite gradient whose squared norm overflows the accumulation dtype (float32):
    1e20 where the dtype holds it; float16 (max 65504) squares safely in float32, so
    there it is a sanity check at 2e4 (2x and Adam's 1e-3 g^2 stay inside float16)."""
    return 2e4 if dtype == torch.float16 else 1e20


@pytest.mark.parametrize("dtype", DTYPES)
def test_psd_huge_finite_gradient_is_a_gradient_step(dtype):
    g = torch.tensor([_huge(dtype), -_huge(dtype), 0.0, 1.0], dtype=dtype)
    p = torch.ones(4, dtype=dtype, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = PSD([p], lr=1e-21, epsilon=1e-3, radius=0.1, episode_length=0, seed=0)
    ref = torch.optim.SGD([q], lr=1e-21)
    for _ in range(3):
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(p, q)
    st = opt.psd_state
    assert int(st.skipped) == 0 and int(st.count) == 3 and int(st.episodes) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_psd_nan_gradient_still_skips(dtype):
    p = torch.ones(3, dtype=dtype, requires_grad=True)
    opt = PSD([p], lr=0.1, epsilon=1e-3, radius=0.1, seed=0)
    p.grad = torch.tensor([1.0, float("nan"), 1e20 if dtype != torch.float16 else 1.0], dtype=dtype)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3, dtype=dtype))
    assert int(opt.psd_state.skipped) == 1 and int(opt.psd_state.count) == 1


def _adam_pair(dtype, lr=1e-2):
    torch.manual_seed(0)
    x0 = torch.randn(6, 5)
    # clones: in float32 ``.to(dtype)`` and ``.float()`` return ``x0`` itself, and p and q
    # were one tensor stepped by both optimizers (so the comparison could not fail)
    p = x0.to(dtype).clone().requires_grad_()
    q = x0.to(dtype).float().clone().requires_grad_()  # the float32 reference, same start
    assert p.data_ptr() != q.data_ptr()
    # g_thres=0 with a huge t_thres: never perturbs, i.e. plain Adam (extras off)
    opt = PerturbedAdam([p], lr=lr, g_thres=0.0, t_thres=10**12, r=0.0, seed=0)
    ref = torch.optim.Adam([q], lr=lr, foreach=False)
    return p, q, opt, ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_perturbed_adam_huge_finite_gradient_not_skipped(dtype):
    p, q, opt, ref = _adam_pair(dtype)
    g = torch.zeros(6, 5)
    # float16 moments (as torch.optim.Adam's) hold (1 - b2) g^2 only up to 65504
    h = 2e3 if dtype == torch.float16 else _huge(dtype)
    g[0, 0], g[1, 1], g[2] = h, -h, 0.5
    for _ in range(3):
        p.grad, q.grad = g.to(dtype), g.to(dtype).float()
        opt.step()
        ref.step()
    st = opt.adam_state
    assert int(st["skipped"]) == 0 and int(st["count"]) == 3
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.float(), q, rtol=4 * EPS[dtype], atol=4 * EPS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_perturbed_adam_16bit_moves_with_zero_gradient_entries(dtype):
    """Issue 11 bug 3: float16 PerturbedAdam skipped every step (0/0 with eps = 0 in
    float16). The direction is now float32; compared with float32 torch.optim.Adam."""
    p, q, opt, ref = _adam_pair(dtype)
    start = p.detach().clone()
    for t in range(50):
        torch.manual_seed(t)
        g = torch.randn(6, 5)
        g[:, :2] = 0.0  # zero entries: 0/0 in a 16-bit direction
        p.grad, q.grad = g.to(dtype), g.to(dtype).float()
        opt.step()
        ref.step()
    assert int(opt.adam_state["skipped"]) == 0 and int(opt.adam_state["count"]) == 50
    assert not torch.equal(p.detach(), start)
    # 50 steps of lr 1e-2, each rounded to the dtype: a tolerance of 50 roundings of p
    tol = 50 * EPS[dtype] * 4 if dtype != torch.float32 else 1e-5
    torch.testing.assert_close(p.float(), q, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perturbed_adam_16bit_tiny_gradient_entries_equal_fused_adam(dtype):
    """Issue 11 bug 3, tiny entries: in float16 (1 - b2) g^2 underflows to 0 for |g| below
    about 8e-3, and the direction was computed from the stored (rounded) moments: such an
    entry stepped by lr |g| / eps (1 -> -4900 in 50 steps). The direction now comes from
    the float32 moments of the step, as torch's fused Adam kernel (the reference)."""
    g = torch.tensor([1e-4, -2e-3, 5e-3, 0.5, -1.0, 0.0]).to(dtype)
    p = torch.ones(6, dtype=dtype, requires_grad=True)
    q = torch.ones(6, dtype=dtype, requires_grad=True)
    opt = PerturbedAdam([p], lr=1e-2, g_thres=0.0, t_thres=10**12, r=0.0, seed=0)
    ref = torch.optim.Adam([q], lr=1e-2, fused=True)
    for _ in range(50):
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert int(opt.adam_state["skipped"]) == 0
    torch.testing.assert_close(p, q, rtol=0, atol=2 * EPS[dtype])
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[p][k], ref.state[q][k], rtol=2 * EPS[dtype], atol=0)
    assert (p - 1).abs().max() < 3  # the bug: thousands


def _value_and_grad_np(a):
    def f(x):
        (xi,) = x
        return float(np.sum(a * xi)), [a.copy()]

    return f


@pytest.mark.parametrize("dtype", DTYPES)
def test_sam_sps_huge_finite_gradient_not_skipped(dtype):
    """A linear loss <a, x> with |a| ~ 1e20: ||g||^2 overflows float32, ||g|| does not."""
    h = _huge(dtype)
    a = torch.tensor([h, 2 * h, -h, 0.5 * h], dtype=dtype)
    x0 = torch.ones(4, dtype=dtype)
    p = x0.clone().requires_grad_()
    opt = SAM_SPS([p], rho=0.1, gamma_b=10.0)

    def closure():
        p.grad = a.clone()
        return (a.double() * p.detach().double()).sum()

    for _ in range(2):
        opt.step(closure)
    assert int(opt.skipped) == 0 and int(opt.steps) == 2
    ref = sam_sps_reference(
        _value_and_grad_np(a.double().numpy()),
        [x0.double().numpy()],
        steps=2,
        rho=0.1,
        gamma_b=10.0,
    )
    want = torch.from_numpy(ref[-1]["params"][0])
    torch.testing.assert_close(p.detach().double(), want, rtol=8 * EPS[dtype], atol=8 * EPS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sam_sps_tiny_gradient_16bit_stays_finite(dtype):
    """Issue 11 bug 4: ||g|| < rho / 65504, so rho/||g|| overflows float16; the offset is
    now computed in float32 and cast once."""
    c = 3e-7
    x0 = torch.ones(4, dtype=dtype)
    p = x0.clone().requires_grad_()
    opt = SAM_SPS([p], rho=0.1, gamma_b=1.0)

    def closure():
        p.grad = (c * p.detach().float()).to(dtype)
        return 0.5 * c * (p.detach().double() ** 2).sum()

    for _ in range(3):
        opt.step(closure)
    assert int(opt.skipped) == 0
    assert torch.isfinite(p).all() and bool(torch.isfinite(torch.as_tensor(opt.step_size)))

    def vg(x):
        (xi,) = x
        return 0.5 * c * float(np.sum(xi * xi)), [c * xi]

    ref = sam_sps_reference(vg, [x0.double().numpy()], steps=3, rho=0.1, gamma_b=1.0)
    want = torch.from_numpy(ref[-1]["params"][0])
    torch.testing.assert_close(p.detach().double(), want, rtol=2 * EPS[dtype], atol=0.0)
    assert float(opt.step_size) == pytest.approx(ref[-1]["step_size"], rel=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_psd_from_theory_budget_beyond_int32_escapes_quartic_saddle(dtype):
    """Issue 11 bug 1: M = 1 + ceil(128 ell Delta_f / eps^2) > 2^31 at eps = 1e-3; PSD
    must still perturb and reach the minimum of sum(x^4 - x^2) (-2.5 at dim 10)."""
    x = torch.zeros(10, dtype=dtype, requires_grad=True)
    opt = PSD.from_theory([x], epsilon=1e-3, ell=20.0, rho=24.0, seed=0)
    assert opt.param_groups[0]["max_episodes"] > 2**31
    for _ in range(3000):
        xf = x.detach().float()
        x.grad = (4 * xf**3 - 2 * xf).to(dtype)
        opt.step()
    st = opt.psd_state
    assert st.episodes.dtype == torch.int64 and int(st.episodes) == 1
    f = float((x.detach().double() ** 4 - x.detach().double() ** 2).sum())
    assert f == pytest.approx(-2.5, abs=0.02 if dtype != torch.float32 else 1e-6)
