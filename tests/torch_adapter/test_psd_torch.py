"""psd_torch.PSD against the core transformation, psd-optimizer's PSDTorch, and behaviour."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from psd.framework_optimizers import PSDTorch

import psd_core
from psd_core.functions import separable_quartic
from psd_core.theory import psd_constants
from psd_torch import PSD

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers


def quartic_grad(x: torch.Tensor) -> torch.Tensor:
    return separable_quartic(int(x.numel())).grad(x)


def mlp_loss(params, X, y):
    w1, b1, w2, b2 = params
    h = torch.tanh(X @ w1 + b1)
    return torch.nn.functional.cross_entropy(h @ w2 + b2, y)


def mlp_data():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:120] / 16.0, dtype=F64)
    y = torch.tensor(y[:120])
    return X, y


def mlp_init(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        0.1 * torch.randn(64, 8, generator=g, dtype=F64),
        torch.zeros(8, dtype=F64),
        0.1 * torch.randn(8, 10, generator=g, dtype=F64),
        torch.zeros(10, dtype=F64),
    ]


def run_core(tx, x0, grad_fn, steps, draws, *, uniform_needed=True):
    """Run a core transformation, drawing from ``draws`` only on perturbing calls
    (the perturb decision does not depend on the draws, so probe with zeros first)."""
    x = [t.clone() for t in x0]
    state = tx.init(x)
    traj = []
    for _ in range(steps):
        g = grad_fn(x)
        zeros = [torch.zeros_like(t) for t in g]
        half = torch.tensor(0.5, dtype=g[0].dtype)
        _, probe = tx.update(g, state, x, normals=zeros, uniform=half)
        if bool(probe.perturbed):
            normals = draws.normals_like(g)
            u = draws.uniform_like(g[0]) if uniform_needed else half
        else:
            normals, u = zeros, half
        upd, state = tx.update(g, state, x, normals=normals, uniform=u)
        x = psd_core.apply_updates(x, upd)
        traj.append([t.clone() for t in x])
    return traj, state


def host_noise_fn(seed, uniform_needed=True):
    draws = psd_core.HostDraws(seed)

    def fn(params):
        normals = draws.normals_like([p.detach() for p in params])
        u = draws.uniform_like(params[0].detach()) if uniform_needed else None
        return normals, u

    return fn


def run_adapter(opt, params, grad_fn, steps):
    traj = []
    for _ in range(steps):
        gs = grad_fn([p.detach() for p in params])
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        traj.append([p.detach().clone() for p in params])
    return traj


def assert_traj_close(a, b, tol=1e-10):
    assert len(a) == len(b)
    for k, (xa, xb) in enumerate(zip(a, b)):
        for ta, tb in zip(xa, xb):
            err = (ta - tb).abs().max().item()
            scale = max(1.0, tb.abs().max().item())
            assert err <= tol * scale, f"step {k}: max abs diff {err}"


def quartic_leaves(seed=0, scale=1e-3):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(s, generator=g, dtype=F64) for s in [(3,), (2, 2), (5,)]]


def quartic_tree_grad(x):
    return [quartic_grad(t.reshape(-1)).reshape(t.shape) for t in x]


# ----------------------------------------------------------------------------- core conformance

CORE_CASES = [
    dict(noise="ball", step_on_perturb=False, gate="grad_norm", t_thres=0),
    dict(noise="ball", step_on_perturb=True, gate="ema", t_thres=2),
    dict(noise="gaussian", step_on_perturb=False, gate="grad_norm", t_thres=3, max_episodes=2),
]


@pytest.mark.parametrize("case", CORE_CASES)
def test_quartic_matches_core(case):
    hp = dict(learning_rate=0.05, epsilon=0.05, radius=0.2, episode_length=6)
    tx = psd_core.psd(**hp, **case)
    x0 = quartic_leaves()
    ball = case["noise"] == "ball"
    ref, ref_state = run_core(
        tx, x0, quartic_tree_grad, 60, psd_core.HostDraws(3), uniform_needed=ball
    )
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = PSD(
        params,
        lr=hp["learning_rate"],
        epsilon=hp["epsilon"],
        radius=hp["radius"],
        episode_length=hp["episode_length"],
        noise_fn=host_noise_fn(3, ball),
        **case,
    )
    out = run_adapter(opt, params, quartic_tree_grad, 60)
    assert int(ref_state.episodes) >= 1
    assert_traj_close(out, ref)
    st = opt.psd_state
    for name in ("count", "since_perturb", "episode_left", "episodes", "skipped"):
        assert int(getattr(st, name)) == int(getattr(ref_state, name)), name
    assert abs(float(st.grad_sq_ema) - float(ref_state.grad_sq_ema)) <= 1e-10 * max(
        1.0, float(ref_state.grad_sq_ema)
    )


def test_mlp_matches_core_two_groups():
    X, y = mlp_data()

    def grad_fn(x):
        leaves = [t.detach().clone().requires_grad_(True) for t in x]
        return list(torch.autograd.grad(mlp_loss(leaves, X, y), leaves))

    x0 = mlp_init()
    tx = psd_core.psd(0.5, epsilon=0.4, radius=0.05, episode_length=4)
    ref, ref_state = run_core(tx, x0, grad_fn, 25, psd_core.HostDraws(7))
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    # Two parameter groups with the same lr: the global gate still sees all of them.
    opt = PSD(
        [{"params": params[:2]}, {"params": params[2:]}],
        lr=0.5,
        epsilon=0.4,
        radius=0.05,
        episode_length=4,
        noise_fn=host_noise_fn(7),
    )
    out = run_adapter(opt, params, grad_fn, 25)
    assert int(ref_state.episodes) >= 2
    assert int(opt.psd_state.episodes) == int(ref_state.episodes)
    assert_traj_close(out, ref)


def test_default_generator_draw_order_matches_core():
    """Without noise_fn the optimizer draws, in parameter order, standard normals shaped
    like each parameter and then one float64 uniform from its torch.Generator(seed);
    the core fed the same stream (replicated here) gives the same trajectory."""
    seed = 11
    x0 = quartic_leaves(1)
    tx = psd_core.psd(0.05, epsilon=0.05, radius=0.2, episode_length=6)
    gen = torch.Generator().manual_seed(seed)

    class TorchDraws:
        def normals_like(self, tree):
            return [torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in tree]

        def uniform_like(self, like):
            return torch.rand((), dtype=torch.float64, generator=gen)

    ref, st = run_core(tx, x0, quartic_tree_grad, 50, TorchDraws())
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = PSD(params, lr=0.05, epsilon=0.05, radius=0.2, episode_length=6, seed=seed)
    out = run_adapter(opt, params, quartic_tree_grad, 50)
    assert int(st.episodes) >= 1
    assert_traj_close(out, ref)


# ----------------------------------------------------------------------------- PSDTorch


def test_psdtorch_compatible_mode_matches_peer():
    """noise='gaussian', step_on_perturb=True, episode_length=0 is psd-optimizer's PSDTorch
    (with max_grad_norm=None). Both draw torch.randn from a CPU generator with the same seed
    in parameter order, so the noise is identical.

    Published flaws not copied: PSDTorch clones every parameter every step (for its NaN
    rollback), gates per parameter group (not globally), and on a non-finite value it
    restores only the first offending tensor, halves the lr and keeps the others' update;
    the core skips the whole step instead."""
    seed = 123
    x0 = quartic_leaves(2, scale=1e-2)
    hp = dict(lr=0.02, t_thres=4)
    a = [torch.nn.Parameter(t.clone()) for t in x0]
    b = [torch.nn.Parameter(t.clone()) for t in x0]
    ours = PSD(
        a,
        epsilon=0.5,
        radius=0.01,
        episode_length=0,
        noise="gaussian",
        step_on_perturb=True,
        seed=seed,
        **hp,
    )
    torch.manual_seed(seed)
    peer = PSDTorch(b, g_thres=0.5, r=0.01, max_grad_norm=None, **hp)
    out_a = run_adapter(ours, a, quartic_tree_grad, 80)
    out_b = run_adapter(peer, b, quartic_tree_grad, 80)
    assert int(ours.psd_state.episodes) >= 3
    assert_traj_close(out_a, out_b, tol=1e-12)


# ----------------------------------------------------------------------------- behaviour


def test_escapes_strict_saddle_where_sgd_cannot():
    """Deep linear net y = w2 * w1 * x, loss (w2 w1 - 1)^2 / 2, started at (0, 0): a strict
    saddle (Hessian eigenvalues +-1) with zero gradient. SGD never moves; PSD escapes."""

    def run(make_opt):
        w = [
            torch.nn.Parameter(torch.zeros(1, dtype=F64)),
            torch.nn.Parameter(torch.zeros(1, dtype=F64)),
        ]
        opt = make_opt(w)
        for _ in range(200):
            opt.zero_grad()
            loss = 0.5 * (w[1] * w[0] - 1.0).pow(2).sum()
            loss.backward()
            opt.step()
        return float(0.5 * (w[1] * w[0] - 1.0).pow(2).sum().detach())

    sgd_loss = run(lambda w: torch.optim.SGD(w, lr=0.1))
    psd_loss = run(lambda w: PSD(w, lr=0.1, epsilon=1e-3, radius=0.1, episode_length=20, seed=0))
    assert sgd_loss == pytest.approx(0.5)
    assert psd_loss < 1e-6


def _train(opt_factory, steps, model=None, ckpt_at=None):
    torch.manual_seed(0)
    X, y = mlp_data()
    model = (
        model
        or torch.nn.Sequential(
            torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)
        ).double()
    )
    opt = opt_factory(model.parameters())
    for k in range(steps):
        if ckpt_at is not None and k == ckpt_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            torch.manual_seed(999)  # disturb the global RNG: the optimizer must not depend on it
            model = torch.nn.Sequential(
                torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)
            ).double()
            opt = opt_factory(model.parameters())
            ck = torch.load(buf, weights_only=False)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


def test_checkpoint_resume_is_bitwise():
    def factory(ps):
        return PSD(ps, lr=0.5, epsilon=0.4, radius=0.05, episode_length=3, seed=4)

    full, opt_a = _train(factory, 30)
    resumed, opt_b = _train(factory, 30, ckpt_at=13)
    assert int(opt_a.psd_state.episodes) >= 3
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)
    assert torch.equal(opt_a.generator.get_state(), opt_b.generator.get_state())


def test_nonfinite_gradient_is_skipped_and_counted():
    x0 = quartic_leaves()
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = PSD(params, lr=0.05, epsilon=0.05, radius=0.2, episode_length=2, seed=0)
    run_adapter(opt, params, quartic_tree_grad, 5)
    before_p = [p.detach().clone() for p in params]
    before_s = opt.psd_state
    for p in params:
        p.grad = torch.zeros_like(p)  # would perturb (zero gradient, gate open)
    params[1].grad[0, 0] = float("nan")
    params[2].grad[1] = float("inf")
    opt.step()
    after_s = opt.psd_state
    for a, b in zip(before_p, params):
        assert torch.equal(a, b.detach())
    assert int(after_s.skipped) == int(before_s.skipped) + 1
    for name in ("since_perturb", "episode_left", "episodes"):
        assert int(getattr(after_s, name)) == int(getattr(before_s, name))
    assert int(after_s.count) == int(before_s.count) + 1  # every call counts (contract C6)
    assert torch.isfinite(after_s.grad_sq_ema)
    run_adapter(opt, params, quartic_tree_grad, 3)
    assert int(opt.psd_state.count) == int(before_s.count) + 4
    assert all(torch.isfinite(p).all() for p in params)


def test_foreach_and_per_tensor_paths_agree():
    x0 = quartic_leaves(5)
    outs = []
    for fe in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in x0]
        opt = PSD(params, lr=0.05, epsilon=0.05, radius=0.2, episode_length=5, seed=2, foreach=fe)
        outs.append(run_adapter(opt, params, quartic_tree_grad, 40))
    assert_traj_close(outs[0], outs[1], tol=1e-15)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(radius=-0.1), "radius"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(episode_length=-1), "episode_length"),
        (dict(t_thres=-2), "t_thres"),
        (dict(max_episodes=-1), "max_episodes"),
        (dict(gate="nope"), "gate"),
        (dict(noise="uniform"), "noise"),
        (dict(ema_beta=1.5), "ema_beta"),
        (dict(curvature="grad_diff"), "curvature_gamma"),
        (dict(curvature="exact"), "curvature"),
        (dict(seed=-3), "seed"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    base = dict(lr=0.1, epsilon=1e-3, radius=0.1)
    base.update(kwargs)
    with pytest.raises(ValueError, match=name):
        PSD([torch.nn.Parameter(torch.zeros(2))], **base)


def test_empty_params_raise():
    with pytest.raises(ValueError, match="params"):
        PSD([], lr=0.1, epsilon=1e-3, radius=0.1)


def test_from_theory_fills_the_paper_constants():
    ps = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    opt = PSD.from_theory(ps, epsilon=1e-2, ell=10.0, rho=24.0, delta=0.1, delta_f=1.0)
    c = psd_constants(1e-2, 10.0, 24.0, 0.1, 1.0, dim=17)
    cfg = opt.config
    assert opt.param_groups[0]["lr"] == c.step_size == 1.0 / 20.0
    assert (cfg.radius, cfg.episode_length, cfg.max_episodes, cfg.epsilon) == (
        c.radius,
        c.episode_length,
        c.max_episodes,
        c.epsilon,
    )


def test_half_precision_norm_accumulates_in_float32_and_float64_stays_float64():
    # fp16 gradients of 300 in 100 entries: sum of squares 9e6 overflows float16 (max 65504).
    p = torch.nn.Parameter(torch.zeros(100, dtype=torch.float16))
    opt = PSD([p], lr=1e-4, epsilon=1e-3, radius=0.1, gate="ema", ema_beta=0.5, seed=0)
    p.grad = torch.full((100,), 300.0, dtype=torch.float16)
    opt.step()
    st = opt.psd_state
    assert int(st.skipped) == 0 and int(st.count) == 1
    assert st.grad_sq_ema.dtype == torch.float32
    ref = psd_core.psd(1e-4, 1e-3, 0.1, gate="ema", ema_beta=0.5)
    x32 = [np.zeros(100, dtype=np.float32)]
    _, ref_state = ref.update(
        [np.full(100, 300.0, dtype=np.float32)],
        ref.init(x32),
        x32,
        normals=x32,
        uniform=np.float32(0.5),
    )
    assert float(st.grad_sq_ema) == pytest.approx(float(ref_state.grad_sq_ema), rel=1e-6)
    assert float(st.grad_sq_ema) >= 4e6  # would be inf (and the step skipped) in float16
    assert torch.allclose(p.detach().float(), torch.full((100,), -0.03), rtol=1e-3)
    q = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    opt64 = PSD([q], lr=0.1, epsilon=1e-3, radius=0.1, gate="ema", seed=0)
    q.grad = torch.tensor([1e-200, 0.0, 0.0], dtype=F64) * 1e50
    opt64.step()
    assert opt64.psd_state.grad_sq_ema.dtype == F64
    assert float(opt64.psd_state.grad_sq_ema) > 0.0  # 1e-300 survives only in float64


@pytest.mark.parametrize("mode", ["grad_diff", "hvp"])
def test_curvature_check_perturbs_only_at_strict_saddles(mode):
    def run(loss_fn):
        x = torch.nn.Parameter(torch.zeros(4, dtype=F64))
        opt = PSD(
            [x],
            lr=0.1,
            epsilon=1e-3,
            radius=0.1,
            episode_length=5,
            seed=0,
            curvature=mode,
            curvature_gamma=0.5,
            curvature_iters=4,
        )

        def closure():
            opt.zero_grad()
            loss = loss_fn(x)
            if mode == "grad_diff":
                loss.backward()
                return loss
            # mode "hvp": the closure returns the loss; gradients for the step come from backward here too
            loss.backward(create_graph=False, retain_graph=True)
            return loss

        for _ in range(3):
            opt.step(closure)
        return int(opt.psd_state.episodes), x.detach()

    eps_min, x_min = run(lambda x: (x * x).sum())  # zero gradient at a minimum: no perturbation
    eps_sad, x_sad = run(lambda x: ((x * x) ** 2 - x * x).sum())  # Hessian -2I: strict saddle
    assert eps_min == 0 and torch.count_nonzero(x_min) == 0
    assert eps_sad == 1 and torch.count_nonzero(x_sad) == 4


def test_works_with_torch_compile_model():
    X, y = mlp_data()

    def run(compiled):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)
        ).double()
        fwd = torch.compile(model, backend="aot_eager") if compiled else model
        opt = PSD(model.parameters(), lr=0.5, epsilon=0.4, radius=0.05, episode_length=3, seed=1)
        for _ in range(12):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(fwd(X), y).backward()
            opt.step()
        return [p.detach() for p in model.parameters()], int(opt.psd_state.episodes)

    a, ea = run(False)
    b, eb = run(True)
    assert ea == eb >= 1
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=0, atol=1e-10)
