"""psd_torch.PerturbedAdam against the core transformation and psd-optimizer's PerturbedAdam."""

from __future__ import annotations

import io

import psd_optimizer
import pytest
import torch

import psd_core
from psd_core.functions import separable_quartic
from psd_core.perturbation import adam_direction, adam_moments
from psd_torch import PerturbedAdam

F64 = torch.float64


def quartic_tree_grad(x):
    return [separable_quartic(int(t.numel())).grad(t.reshape(-1)).reshape(t.shape) for t in x]


def leaves(seed=0, scale=1e-3, shapes=((3,), (2, 2), (5,))):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(s, generator=g, dtype=F64) for s in shapes]


def run_core(tx, x0, grad_fn, steps, draws, ball):
    x = [t.clone() for t in x0]
    state = tx.init(x)
    traj = []
    for _ in range(steps):
        g = grad_fn(x)
        zeros = [torch.zeros_like(t) for t in g]
        half = torch.tensor(0.5, dtype=F64)
        _, probe = tx.update(g, state, x, normals=zeros, uniform=half)
        if bool(probe.perturbed):
            normals = draws.normals_like(g)
            u = draws.uniform_like(g[0]) if ball else half
        else:
            normals, u = zeros, half
        upd, state = tx.update(g, state, x, normals=normals, uniform=u)
        x = psd_core.apply_updates(x, upd)
        traj.append([t.clone() for t in x])
    return traj, state


def host_noise_fn(seed, ball):
    draws = psd_core.HostDraws(seed)

    def fn(params):
        return draws.normals_like([p.detach() for p in params]), (
            draws.uniform_like(params[0].detach()) if ball else None
        )

    return fn


def run_adapter(opt, params, grad_fn, steps):
    traj = []
    for _ in range(steps):
        for p, g in zip(params, grad_fn([p.detach() for p in params])):
            p.grad = g.clone()
        opt.step()
        traj.append([p.detach().clone() for p in params])
    return traj


def assert_traj_close(a, b, tol=1e-10):
    for k, (xa, xb) in enumerate(zip(a, b)):
        for ta, tb in zip(xa, xb):
            err = (ta - tb).abs().max().item()
            assert err <= tol * max(1.0, tb.abs().max().item()), f"step {k}: {err}"
    assert len(a) == len(b)


@pytest.mark.parametrize("foreach", [True, False])
def test_inplace_moments_and_direction_equal_core(foreach):
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (7,), (2, 2, 2)]
    grads = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    mu = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    nu = [torch.rand(s, generator=g, dtype=F64) for s in shapes]
    ref_mu, ref_nu = adam_moments(grads, mu, nu, 0.9, 0.999)
    mu2, nu2 = [t.clone() for t in mu], [t.clone() for t in nu]
    PerturbedAdam._moments_(grads, mu2, nu2, 0.9, 0.999, foreach)
    bc1, bc2 = 1 - 0.9**3, 1 - 0.999**3
    ref_d = adam_direction(
        ref_mu, ref_nu, torch.tensor(bc1, dtype=F64), torch.tensor(bc2, dtype=F64), 1e-8
    )
    d = PerturbedAdam._direction(mu2, nu2, bc1, bc2, 1e-8, foreach)
    for a, b in zip(mu2 + nu2 + d, ref_mu + ref_nu + ref_d):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)
    # moments are updated in place, the direction is a separate buffer
    assert all(x is not y for x, y in zip(d, mu2))


@pytest.mark.parametrize("noise", ["gaussian", "ball"])
def test_quartic_matches_core_global_gate(noise):
    hp = dict(learning_rate=0.01, g_thres=3.0, t_thres=3, radius=0.05)
    tx = psd_core.perturbed_adam(**hp, noise=noise)
    x0 = leaves()
    ball = noise == "ball"
    ref, ref_state = run_core(tx, x0, quartic_tree_grad, 80, psd_core.HostDraws(5), ball)
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = PerturbedAdam(
        params,
        lr=0.01,
        g_thres=3.0,
        t_thres=3,
        r=0.05,
        noise=noise,
        noise_fn=host_noise_fn(5, ball),
    )
    out = run_adapter(opt, params, quartic_tree_grad, 80)
    assert int(ref_state.perturbations) >= 2
    assert_traj_close(out, ref)
    st = opt.adam_state
    for name in ("count", "small_steps", "perturbations", "skipped"):
        assert int(st[name]) == int(getattr(ref_state, name)), name
    for p, m, v in zip(params, ref_state.mu, ref_state.nu):
        assert torch.allclose(opt.state[p]["exp_avg"], m, rtol=1e-10, atol=1e-14)
        assert torch.allclose(opt.state[p]["exp_avg_sq"], v, rtol=1e-10, atol=1e-14)


def test_mlp_matches_core():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = torch.tensor((X[:100] - X[:100].mean(0)) / (X[:100].std(0) + 1e-9), dtype=F64)
    y = torch.tensor(y[:100], dtype=F64)

    def loss_fn(ps):
        w1, b1, w2 = ps
        return torch.nn.functional.binary_cross_entropy_with_logits(
            (torch.tanh(X @ w1 + b1) @ w2).squeeze(-1), y
        )

    def grad_fn(x):
        lv = [t.detach().clone().requires_grad_(True) for t in x]
        return list(torch.autograd.grad(loss_fn(lv), lv))

    g = torch.Generator().manual_seed(1)
    x0 = [
        0.1 * torch.randn(30, 6, generator=g, dtype=F64),
        torch.zeros(6, dtype=F64),
        0.1 * torch.randn(6, 1, generator=g, dtype=F64),
    ]
    tx = psd_core.perturbed_adam(0.01, g_thres=20.0, t_thres=2, radius=0.01)
    ref, st = run_core(tx, x0, grad_fn, 30, psd_core.HostDraws(2), False)
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = PerturbedAdam(
        params, lr=0.01, g_thres=20.0, t_thres=2, r=0.01, noise_fn=host_noise_fn(2, False)
    )
    out = run_adapter(opt, params, grad_fn, 30)
    assert int(st.perturbations) >= 1
    assert_traj_close(out, ref)


def test_single_tensor_matches_psd_optimizer():
    """With one parameter tensor the global gate is the published per-tensor gate. Both
    draw torch.randn from a CPU generator with the same seed, so the noise is identical."""
    seed = 31
    x0 = leaves(3, scale=1e-2, shapes=((6,),))[0]
    a = torch.nn.Parameter(x0.clone())
    b = torch.nn.Parameter(x0.clone())
    ours = PerturbedAdam([a], lr=0.01, g_thres=2.0, t_thres=4, r=0.02, seed=seed)
    torch.manual_seed(seed)
    peer = psd_optimizer.PerturbedAdam([b], lr=0.01, g_thres=2.0, t_thres=4, r=0.02)
    out_a = run_adapter(ours, [a], quartic_tree_grad, 120)
    out_b = run_adapter(peer, [b], quartic_tree_grad, 120)
    assert int(ours.adam_state["perturbations"]) >= 3
    assert_traj_close(out_a, out_b, tol=1e-12)
    assert torch.allclose(ours.state[a]["exp_avg_sq"], peer.state[b]["exp_avg_sq"], rtol=1e-12)


def _model():
    return torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    ).double()


def _train(steps, ckpt_at=None, foreach=True):
    torch.manual_seed(0)
    X = torch.randn(32, 5, dtype=F64)
    y = torch.randn(32, 1, dtype=F64)
    model = _model()
    opt = PerturbedAdam(
        model.parameters(), lr=0.05, g_thres=10.0, t_thres=3, r=0.05, seed=9, foreach=foreach
    )
    for k in range(steps):
        if k == ckpt_at:
            buf = io.BytesIO()
            torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
            buf.seek(0)
            torch.manual_seed(1234)
            model = _model()
            opt = PerturbedAdam(
                model.parameters(),
                lr=0.05,
                g_thres=10.0,
                t_thres=3,
                r=0.05,
                seed=0,
                foreach=foreach,
            )
            ck = torch.load(buf, weights_only=False)
            model.load_state_dict(ck["m"])
            opt.load_state_dict(ck["o"])
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


def test_checkpoint_resume_is_bitwise():
    full, oa = _train(40)
    resumed, ob = _train(40, ckpt_at=17)
    assert int(oa.adam_state["perturbations"]) >= 2
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)


def test_foreach_and_per_tensor_paths_agree():
    a, oa = _train(30, foreach=True)
    b, ob = _train(30, foreach=False)
    assert int(oa.adam_state["perturbations"]) >= 1
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=0, atol=1e-14)


def test_nonfinite_gradient_is_skipped_and_counted():
    params = [torch.nn.Parameter(t.clone()) for t in leaves()]
    opt = PerturbedAdam(params, lr=0.01, g_thres=3.0, t_thres=3, r=0.05, seed=0)
    run_adapter(opt, params, quartic_tree_grad, 4)
    before = [p.detach().clone() for p in params]
    moments = [
        (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()) for p in params
    ]
    counters = {k: int(v) for k, v in opt.adam_state.items()}
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[1] = float("nan")
    opt.step()
    for p, b, (m, v) in zip(params, before, moments):
        assert torch.equal(p.detach(), b)
        assert torch.equal(opt.state[p]["exp_avg"], m) and torch.equal(
            opt.state[p]["exp_avg_sq"], v
        )
    after = {k: int(v) for k, v in opt.adam_state.items()}
    assert after["skipped"] == counters["skipped"] + 1
    assert after["count"] == counters["count"] and after["small_steps"] == counters["small_steps"]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(eps=0.0), "eps"),
        (dict(g_thres=-1.0), "g_thres"),
        (dict(t_thres=-1), "t_thres"),
        (dict(r=-0.5), "r"),
        (dict(noise="cauchy"), "noise"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PerturbedAdam([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_empty_params_raise():
    with pytest.raises(ValueError, match="params"):
        PerturbedAdam([])
