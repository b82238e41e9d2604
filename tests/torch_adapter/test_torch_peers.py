"""psd_torch.peers against the installed peers: exact signatures and defaults, the
peers' attributes, and checkpoints of each peer that continue like the peer."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch.nn import Parameter

import psd_torch
from psd_torch import peers

sam_sps = pytest.importorskip("sam_sps")
psd_optimizer = pytest.importorskip("psd_optimizer")
psd = pytest.importorskip("psd")

F64 = torch.float64


def _params_of(cls):
    sig = inspect.signature(cls.__init__)
    return [
        (p.name, p.default)
        for p in sig.parameters.values()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]


@pytest.mark.parametrize(
    "ours,peer",
    [
        (peers.SAM_SPS, sam_sps.SAM_SPS),
        (peers.PerturbedAdam, psd_optimizer.PerturbedAdam),
        (peers.PSDTorch, psd.PSDTorch),
        (peers.PSDOptimizer, psd_optimizer.PSDOptimizer),
    ],
)
def test_signature_and_defaults_are_the_peers(ours, peer):
    assert _params_of(ours) == _params_of(peer)


def test_exported_from_psd_torch():
    assert psd_torch.PSDTorch is peers.PSDTorch and psd_torch.PSDOptimizer is peers.PSDOptimizer
    assert psd_torch.peers is peers


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(64, 6, generator=g), torch.randn(64, 1, generator=g)


def _closure(model, x, y):
    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_sam_sps_attributes_and_checkpoint_continue_like_the_peer():
    x, y = _data()
    m_ref = _mlp()
    o_ref = sam_sps.SAM_SPS(m_ref.parameters(), rho=0.05, gamma_b=0.5)
    for _ in range(3):
        o_ref.step(_closure(m_ref, x, y))
    m_ours = copy.deepcopy(m_ref)
    o_ours = peers.SAM_SPS(m_ours.parameters(), rho=0.05, gamma_b=0.5)
    o_ours.load_state_dict(copy.deepcopy(o_ref.state_dict()))  # a sam_sps checkpoint
    assert (o_ours.rho, o_ours.lambd, o_ours.f_star, o_ours.gamma_b) == (
        o_ref.rho,
        o_ref.lambd,
        o_ref.f_star,
        o_ref.gamma_b,
    )
    assert o_ours.param_groups[0]["weight_decay"] == 5e-4
    for _ in range(5):
        o_ref.step(_closure(m_ref, x, y))
        o_ours.step(_closure(m_ours, x, y))
        torch.testing.assert_close(float(o_ours.param_groups[0]["lr"]), o_ref.param_groups[0]["lr"])
        torch.testing.assert_close(o_ours.grad_norm.float(), o_ref.grad_norm, rtol=1e-5, atol=0)
        rel = float((_flat(m_ours) - _flat(m_ref)).norm() / _flat(m_ref).norm())
        assert rel < 1e-6


def test_sam_sps_attribute_assignment_acts_like_the_peer():
    """The peer's users assign ``opt.rho`` (e.g. a rho schedule) and ``opt.gamma_b``
    between steps; ours takes the assignment in every group and continues like the peer."""
    x, y = _data()
    m_ref, m_ours = _mlp(), _mlp()
    o_ref = sam_sps.SAM_SPS(m_ref.parameters(), rho=0.05)
    o_ours = peers.SAM_SPS(m_ours.parameters(), rho=0.05)
    for i in range(8):
        if i == 3:
            for o in (o_ref, o_ours):
                o.rho, o.gamma_b, o.lambd = 0.2, 0.3, 0.5
        o_ref.step(_closure(m_ref, x, y))
        o_ours.step(_closure(m_ours, x, y))
        lr_ref = o_ref.param_groups[0]["lr"]
        assert abs(float(o_ours.param_groups[0]["lr"]) - lr_ref) <= 1e-5 * lr_ref  # float32
        assert lr_ref <= (0.3 if i >= 3 else 1.0)
        rel = float((_flat(m_ours) - _flat(m_ref)).norm() / _flat(m_ref).norm())
        assert rel < 1e-6
    assert (o_ours.rho, o_ours.gamma_b, o_ours.lambd) == (0.2, 0.3, 0.5)
    with pytest.raises(ValueError, match="rho"):
        o_ours.rho = -1.0
    assert o_ours.rho == 0.2 and o_ours.param_groups[0]["rho"] == 0.2


@pytest.mark.parametrize("cls", [peers.PerturbedAdam, psd_torch.PerturbedAdam])
def test_perturbed_adam_checkpoint_continues_like_the_peer(cls):
    """A psd-optimizer checkpoint, loaded into the peer-signature class or the main
    class: Adam's count continues (not restarted), so the next steps equal the peer's
    (one tensor, no perturbation in the window: g_thres=1e-12)."""
    g = torch.Generator().manual_seed(0)
    a = Parameter(torch.randn(7, generator=g, dtype=F64))
    o_ref = psd_optimizer.PerturbedAdam([a], lr=0.01, g_thres=1e-12)

    def closure(p):
        def c():
            p.grad = None
            loss = ((p**2 - 1) ** 2).sum()
            loss.backward()
            return loss

        return c

    for _ in range(5):
        o_ref.step(closure(a))
    b = Parameter(a.detach().clone())
    o_ours = cls([b], lr=0.01, g_thres=1e-12)
    o_ours.load_state_dict(copy.deepcopy(o_ref.state_dict()))
    assert int(o_ours.adam_state["count"]) == 5
    for _ in range(10):
        o_ref.step(closure(a))
        o_ours.step(closure(b))
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_psdtorch_without_perturbation_equals_the_peer(max_grad_norm):
    ours, ref = _mlp().double(), _mlp().double()
    x, y = (t.double() for t in _data())
    o = peers.PSDTorch(ours.parameters(), lr=0.05, g_thres=0.0, max_grad_norm=max_grad_norm)
    r = psd.PSDTorch(ref.parameters(), lr=0.05, g_thres=0.0, max_grad_norm=max_grad_norm)
    for _ in range(5):
        for opt, m in ((o, ours), (r, ref)):
            opt.zero_grad()
            _closure(m, x, y)()
            opt.step()
    torch.testing.assert_close(_flat(ours), _flat(ref), rtol=1e-12, atol=1e-14)


def test_psdoptimizer_runs_the_episode_inside_step():
    ours, ref = _mlp().double(), _mlp().double()
    x, y = (t.double() for t in _data())

    def clo(opt, m):
        def c():
            opt.zero_grad()
            return _closure(m, x, y)()

        return c

    # Gate shut (epsilon=0): plain clipped gradient steps, equal to the peer.
    o = peers.PSDOptimizer(ours.parameters(), lr=0.05, epsilon=0.0)
    r = psd_optimizer.PSDOptimizer(ref.parameters(), lr=0.05, epsilon=0.0)
    for _ in range(4):
        o.step(clo(o, ours))
        r.step(clo(r, ref))
    torch.testing.assert_close(_flat(ours), _flat(ref), rtol=1e-12, atol=1e-14)
    # Gate open: one call = the perturbation and T=3 episode steps (3 more closure calls).
    calls = []
    o2 = peers.PSDOptimizer(ours.parameters(), lr=0.05, epsilon=1e3, T=3)

    def counting():
        calls.append(1)
        return clo(o2, ours)()

    o2.step(counting)
    assert len(calls) == 4 and int(o2.psd_state.episodes) == 1 and int(o2.psd_state.count) == 4


def _seed_like_peer(opt, seed):
    """Our generator seeded as the peer's global one: both draw the same normals."""
    opt.state["generator"] = {"seed": seed, "state": None}
    torch.manual_seed(seed)


@pytest.mark.parametrize("name", ["PSDTorch", "PSDOptimizer", "PerturbedAdam"])
def test_perturbing_steps_equal_the_peer_with_the_same_draws(name):
    """Gate open (perturbations happen): with our generator seeded like the peer's
    global generator, the trajectory, perturbations and escape episodes included, equals
    the installed peer's (float64, 1e-12). PerturbedAdam: one tensor (the peer's gate is
    per tensor, ours global)."""
    if name == "PerturbedAdam":
        g = torch.Generator().manual_seed(0)
        a = Parameter(torch.randn(7, generator=g, dtype=F64))
        b = Parameter(a.detach().clone())
        kw = dict(lr=0.01, g_thres=10.0, t_thres=2, r=1e-2)
        o, r = peers.PerturbedAdam([a], **kw), psd_optimizer.PerturbedAdam([b], **kw)

        def closure(opt, p):
            def c():
                opt.zero_grad()
                loss = ((p**2 - 1) ** 2).sum()
                loss.backward()
                return loss

            return c

        pairs = [(o, closure(o, a), a), (r, closure(r, b), b)]
    else:
        ours, ref = _mlp().double(), _mlp().double()
        x, y = (t.double() for t in _data())
        if name == "PSDTorch":
            kw = dict(lr=1e-2, g_thres=10.0, t_thres=3, r=1e-2)
            o, r = peers.PSDTorch(ours.parameters(), **kw), psd.PSDTorch(ref.parameters(), **kw)
        else:
            kw = dict(lr=1e-2, epsilon=10.0, r=1e-2, T=3)
            o = peers.PSDOptimizer(ours.parameters(), **kw)
            r = psd_optimizer.PSDOptimizer(ref.parameters(), **kw)

        def closure(opt, m):
            def c():
                opt.zero_grad()
                return _closure(m, x, y)()

            return c

        pairs = [(o, closure(o, ours), ours), (r, closure(r, ref), ref)]
    _seed_like_peer(o, 123)
    for _ in range(10):
        for opt, c, _m in pairs:
            opt.step(c)
    got, want = pairs[0][2], pairs[1][2]
    if isinstance(got, torch.nn.Module):
        got, want = _flat(got), _flat(want)
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-12, atol=1e-14)
    events = o.adam_state["perturbations"] if name == "PerturbedAdam" else o.psd_state.episodes
    assert int(events) >= 2
