"""torch conventions of PSD, PerturbedAdam and SAM_SPS beyond torch's generic suite:
copies and checkpoints continue bit for bit, every hyperparameter lives in
``param_groups`` (per-group values honoured, checked against ``torch.optim``), empty
groups, schedulers that change momentum, the two-pass API's hooks and errors."""

# ruff: noqa: B023  (the closures run inside the loop iteration that defines them)
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.nn import Parameter

from psd_torch import PSD, SAM_SPS, PerturbedAdam

F64 = torch.float64


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)
    ).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g, dtype=F64), torch.randn(32, 1, generator=g, dtype=F64)


# Configurations that perturb within a few steps, so the generator and the counters matter.
FACTORIES = {
    "PSD": lambda ps: PSD(ps, lr=0.05, epsilon=10.0, radius=0.05, episode_length=2, seed=3),
    "PerturbedAdam": lambda ps: PerturbedAdam(
        ps, lr=0.01, g_thres=10.0, t_thres=2, r=0.01, noise="ball", seed=4
    ),
    "SAM_SPS": lambda ps: SAM_SPS(ps, rho=0.05, interval=2, weight_decay=1e-3),
}


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def _steps(model, opt, n):
    x, y = _data()
    for _ in range(n):
        opt.step(_closure(model, opt, x, y))


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _via_pickle(obj):
    return pickle.loads(pickle.dumps(obj))


def _via_torch_save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_copies_of_model_and_optimizer_continue_bitwise(name, how):
    """(model, optimizer) copied together with deepcopy / pickle / torch.save continue
    exactly like the original (perturbations, counters and generator included)."""
    model = _model()
    opt = FACTORIES[name](model.parameters())
    _steps(model, opt, 4)
    copier = {"deepcopy": copy.deepcopy, "pickle": _via_pickle, "torch.save": _via_torch_save}[how]
    model2, opt2 = copier((model, opt))
    _steps(model, opt, 6)
    _steps(model2, opt2, 6)
    assert torch.equal(_flat(model), _flat(model2))
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    for k, v in sd["state"].items():
        if isinstance(k, str):
            for kk, vv in v.items():
                got = sd2["state"][k][kk]
                assert torch.equal(vv, got) if isinstance(vv, torch.Tensor) else vv == got
    if name == "PSD":
        assert int(opt.psd_state.episodes) >= 1
    if name == "PerturbedAdam":
        assert int(opt.adam_state["perturbations"]) >= 1


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_load_state_dict_into_default_optimizer_restores_every_hyperparameter(name):
    """A checkpoint loaded into an optimizer built with *default* hyperparameters
    continues like the original (every hyperparameter comes from the checkpoint)."""
    model = _model()
    opt = FACTORIES[name](model.parameters())
    _steps(model, opt, 4)
    model2 = copy.deepcopy(model)
    defaults = {
        "PSD": lambda ps: PSD(ps, lr=1.0, epsilon=0.0, radius=0.0),
        "PerturbedAdam": lambda ps: PerturbedAdam(ps),
        "SAM_SPS": lambda ps: SAM_SPS(ps),
    }
    opt2 = defaults[name](model2.parameters())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for g, g2 in zip(opt.param_groups, opt2.param_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {
            k: v for k, v in g2.items() if k != "params"
        }
    _steps(model, opt, 6)
    _steps(model2, opt2, 6)
    assert torch.equal(_flat(model), _flat(model2))


def test_perturbed_adam_betas_from_checkpoint():
    """The issue's case: betas (0.5, 0.6) come back from the checkpoint."""
    p = Parameter(torch.randn(4, dtype=F64))
    opt = PerturbedAdam([p], betas=(0.5, 0.6))
    opt2 = PerturbedAdam([Parameter(p.detach().clone())])
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["betas"] == (0.5, 0.6)
    assert (opt2.config.b1, opt2.config.b2) == (0.5, 0.6)


# ------------------------------------------------------------------ per-group values
def _two_group_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = Parameter(torch.randn(5, 3, generator=g, dtype=F64))
    b = Parameter(torch.randn(3, generator=g, dtype=F64))
    return a, b


def _loss(a, b):
    return ((a @ b).sin() ** 2).sum() + (b**4).sum()


def _run_reference(opt_ours, opt_ref, ours, ref, steps=8):
    for _ in range(steps):
        for o, (a, b) in ((opt_ours, ours), (opt_ref, ref)):
            o.zero_grad()
            _loss(a, b).backward()
            o.step()
    for u, v in zip(ours, ref):
        torch.testing.assert_close(u.detach(), v.detach(), rtol=1e-12, atol=1e-14)


def test_perturbed_adam_per_group_betas_eps_lr_maximize_match_torch_adam():
    """With the gate shut (g_thres=0), per-group lr, betas, eps and maximize give exactly
    torch.optim.Adam's per-group steps (an independent reference)."""
    ours, ref = _two_group_params(), _two_group_params()
    kw2 = dict(lr=0.03, betas=(0.0, 0.0), eps=1e-3, maximize=True)
    o = PerturbedAdam([{"params": [ours[0]]}, dict(params=[ours[1]], **kw2)], lr=0.01, g_thres=0.0)
    r = torch.optim.Adam([{"params": [ref[0]]}, dict(params=[ref[1]], **kw2)], lr=0.01)
    _run_reference(o, r, ours, ref)


def test_psd_per_group_lr_and_maximize_match_torch_sgd():
    """With the gate shut (epsilon=0), per-group lr and maximize are torch.optim.SGD's."""
    ours, ref = _two_group_params(), _two_group_params()
    kw2 = dict(lr=0.002, maximize=True)
    o = PSD(
        [{"params": [ours[0]]}, dict(params=[ours[1]], **kw2)], lr=0.01, epsilon=0.0, radius=1.0
    )
    r = torch.optim.SGD([{"params": [ref[0]]}, dict(params=[ref[1]], **kw2)], lr=0.01)
    _run_reference(o, r, ours, ref)


def test_sam_sps_per_group_weight_decay_is_applied():
    a, b = _two_group_params()
    o = SAM_SPS([{"params": [a]}, {"params": [b], "weight_decay": 0.5}], rho=0.0, gamma_b=0.1)
    assert [g["weight_decay"] for g in o.param_groups] == [0.0, 0.5]
    a0, b0 = a.detach().clone(), b.detach().clone()

    def closure():
        loss = _loss(a, b)
        loss.backward()
        return loss

    o.step(closure)
    # rho = 0: the SPS_max step; its decay part on b is -gamma * 0.5 * b, none on a.
    gamma = o.param_groups[1]["lr"]
    torch.testing.assert_close(o.param_groups[0]["lr"], gamma)
    a1, b1 = a.detach().clone(), b.detach().clone()
    with torch.no_grad():
        a.copy_(a0)
        b.copy_(b0)
    a.grad = b.grad = None
    _loss(a, b).backward()
    torch.testing.assert_close(a1, a0 - gamma * a.grad)
    torch.testing.assert_close(b1, b0 - gamma * (b.grad + 0.5 * b0))


@pytest.mark.parametrize(
    "make,key,value",
    [
        (lambda gs: PSD(gs, lr=0.1, epsilon=1e-3, radius=1e-3), "radius", 0.5),
        (lambda gs: PSD(gs, lr=0.1, epsilon=1e-3, radius=1e-3), "foreach", False),
        (lambda gs: PerturbedAdam(gs), "t_thres", 3),
        (lambda gs: PerturbedAdam(gs), "noise", "ball"),
        (lambda gs: SAM_SPS(gs), "first_pass", "per_rank"),
        (lambda gs: SAM_SPS(gs), "foreach", False),
    ],
)
def test_global_hyperparameter_per_group_is_rejected(make, key, value):
    groups = [{"params": [Parameter(torch.zeros(2))]}, {"params": [Parameter(torch.zeros(2))]}]
    groups[1][key] = value
    with pytest.raises(ValueError, match=f"Invalid {key}.*group 1"):
        make(groups)
    opt = make(groups[:1])
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        opt.add_param_group({"params": [Parameter(torch.zeros(2))], key: value})


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_empty_parameter_group_is_accepted(name):
    model = _model()
    opt = FACTORIES[name]([{"params": []}, {"params": list(model.parameters())}])
    before = _flat(model).clone()
    _steps(model, opt, 3)
    assert not torch.equal(before, _flat(model))


def test_defaults_record_foreach_and_maximize():
    p = [Parameter(torch.zeros(2))]
    for opt in (PSD(p, lr=0.1, epsilon=0.1, radius=0.1), PerturbedAdam(p), SAM_SPS(p)):
        assert "foreach" in opt.defaults and "maximize" in opt.defaults
        assert all("foreach" in g and "maximize" in g for g in opt.param_groups)


def test_one_cycle_lr_cycles_perturbed_adam_betas():
    p = Parameter(torch.randn(3, dtype=F64))
    opt = PerturbedAdam([p], lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    b1s = []
    for _ in range(5):
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()
        sched.step()
        b1s.append(opt.param_groups[0]["betas"][0])
    assert len(set(b1s)) > 1 and opt.config.b1 == b1s[-1]


def test_one_cycle_lr_default_momentum_cycling_matches_torch_adam():
    """OneCycleLR with its defaults (cycle_momentum=True cycles betas[0]) on PerturbedAdam
    with the gate shut equals the same schedule on torch.optim.Adam."""
    ours, ref = _two_group_params(), _two_group_params()
    o = PerturbedAdam(list(ours), lr=0.01, g_thres=0.0)
    r = torch.optim.Adam(list(ref), lr=0.01)
    s_o = torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=12)
    s_r = torch.optim.lr_scheduler.OneCycleLR(r, max_lr=0.1, total_steps=12)
    for _ in range(10):
        for opt, sched, (a, b) in ((o, s_o, ours), (r, s_r, ref)):
            opt.zero_grad()
            _loss(a, b).backward()
            opt.step()
            sched.step()
        assert o.param_groups[0]["betas"] == r.param_groups[0]["betas"]
    for u, v in zip(ours, ref):
        torch.testing.assert_close(u.detach(), v.detach(), rtol=1e-12, atol=1e-14)


def test_from_theory_takes_named_parameters_and_group_generators():
    model = _model()
    n = sum(p.numel() for p in model.parameters())
    a = PSD.from_theory(model.named_parameters(), epsilon=1e-2, ell=1.0, rho=1.0)
    b = PSD.from_theory([{"params": model.parameters()}], epsilon=1e-2, ell=1.0, rho=1.0)
    c = PSD.from_theory(list(model.parameters()), epsilon=1e-2, ell=1.0, rho=1.0)
    assert len(b.param_groups[0]["params"]) == len(list(model.parameters()))
    assert sum(p.numel() for g in a.param_groups for p in g["params"]) == n
    assert a.param_groups[0]["radius"] == b.param_groups[0]["radius"] == c.param_groups[0]["radius"]


# ------------------------------------------------------------------ SAM_SPS two-pass API
def test_sam_sps_two_pass_api_fires_step_hooks_once_per_step():
    model = _model()
    x, y = _data()
    opt = SAM_SPS(model.parameters(), rho=0.05)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    assert opt.first_step(loss) and calls == ["pre"]
    loss_e = torch.nn.functional.mse_loss(model(x), y)
    loss_e.backward()
    opt.second_step(loss_e)
    assert calls == ["pre", "post"]
    opt.step(_closure(model, opt, x, y))  # step(): the hooks once, not three times
    assert calls == ["pre", "post", "pre", "post"]


def test_sam_sps_without_gradients_is_a_noop():
    p = Parameter(torch.randn(3))
    opt = SAM_SPS([p])
    before = p.detach().clone()
    assert opt.first_step(torch.tensor(1.0)) is False
    assert opt.step(lambda: torch.tensor(2.0)) == 2.0
    assert torch.equal(p.detach(), before) and int(opt.steps) == 0


def test_sam_sps_closure_returning_none_is_a_clear_error_and_leaves_x():
    p = Parameter(torch.randn(3, dtype=F64))
    opt = SAM_SPS([p])
    before = p.detach().clone()

    def closure():
        (p**2).sum().backward()

    with pytest.raises(ValueError, match="loss.*returned None"):
        opt.step(closure)
    assert torch.equal(p.detach(), before)
    opt.step(lambda: (p**2).sum().backward() or (p**2).sum().detach())  # usable afterwards
    assert int(opt.steps) == 1


def test_sam_sps_state_dict_with_non_dict_state_entry():
    model = _model()
    opt = SAM_SPS(model.parameters())
    _steps(model, opt, 1)
    opt.state["note"] = 1
    assert opt.state_dict()["state"]["note"] == 1


def test_sam_sps_weight_decay_default_is_zero():
    assert SAM_SPS([Parameter(torch.zeros(1))]).defaults["weight_decay"] == 0.0
