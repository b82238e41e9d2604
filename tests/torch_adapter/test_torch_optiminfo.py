"""The generic optimizer checks of torch's ``test/test_optim.py::TestOptimRenewed``, written
for this project and run on ``PSD``, ``PerturbedAdam`` and ``SAM_SPS`` registered as
``OptimizerInfo``\\ s (``optim_infos.py``; the exclusions, each with its reason, are listed
there). CPU, float32 unless a check needs float64 or complex dtypes.

The torch wheel ships ``torch.testing._internal.common_optimizers`` (used here) but not
``test/test_optim.py``; the checks follow upstream's ``TestOptimRenewed`` (pytorch/pytorch
``test/test_optim.py``) test by test. ``*_upstream_form`` / ``*_fresh`` / ``*_every_input``
variants repeat an upstream check literally where the first version here differs (e.g.
steps before the hook, or a one-element ``lr``). Upstream checks that are CUDA-only,
fused-only, sparse-only or LBFGS-specific are listed in ``optim_infos.NOT_PORTED``.
"""

# ruff: noqa: B023  (the closures run inside the loop iteration that defines them)
from __future__ import annotations

import inspect
from copy import deepcopy

import pytest
import torch
from torch.nn import Parameter
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
)
from torch_adapter.optim_infos import cases

F32 = torch.float32


def assert_same(a, b, where="state_dict"):
    """Exact equality of two nested state dicts (tensors bit for bit, dtype included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b.keys())
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _all_inputs(info, skip=()):
    return _get_optim_inputs_including_global_cliquey_kwargs("cpu", F32, info, skip=skip)


def _run_step(optimizer, info, closure):
    """One step: ``step(closure)`` where the algorithm needs it (SAM_SPS evaluates the
    closure itself, twice), else the closure's backward then ``step()``."""
    if info.step_requires_closure:
        return optimizer.step(closure)
    loss = closure()
    optimizer.step()
    return loss


def _quadratic(weight, bias, x, optimizer=None):
    def closure():
        if optimizer is not None:
            optimizer.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    return closure


# ------------------------------------------------------------------ construction


@pytest.mark.parametrize("info", cases("test_optim_infos_do_not_specify_global_cliquey_kwargs"))
def test_optim_infos_do_not_specify_global_cliquey_kwargs(info):
    for oi in info.optim_inputs_func(device="cpu"):
        assert not any(f in oi.kwargs for f in ("foreach", "fused", "differentiable"))


@pytest.mark.parametrize("info", cases("test_errors"))
def test_errors(info):
    inputs = info.optim_error_inputs_func(device="cpu", dtype=F32)
    assert inputs
    for err in inputs:
        oi = err.optimizer_error_input
        if err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(err.error_type, match=err.error_regex):
                info.optim_cls(oi.params, **oi.kwargs)
        else:  # pragma: no cover - every registered error is a construction error
            opt = info.optim_cls(oi.params, **oi.kwargs)
            with pytest.raises(err.error_type, match=err.error_regex):
                opt.step()


@pytest.mark.parametrize("info", cases("test_optimizer_can_be_printed"))
def test_optimizer_can_be_printed(info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for oi in _all_inputs(info):
        text = repr(info.optim_cls(params, **oi.kwargs))
        assert info.optim_cls.__name__ in text and "Parameter Group 0" in text


# ------------------------------------------------------------------ direction


@pytest.mark.parametrize("with_lrsched", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("info", cases("test_forloop_goes_right_direction"))
def test_forloop_goes_right_direction(info, contiguous, with_lrsched):
    for schedulers_c in info.scheduler_inputs if with_lrsched else [None]:
        _forloop_goes_right_direction(info, contiguous, schedulers_c or [])


def _forloop_goes_right_direction(info, contiguous, schedulers_c):
    for oi in info.optim_inputs_func(device="cpu"):  # fresh inputs: a Tensor lr is mutated
        kwargs = dict(oi.kwargs, foreach=False)
        torch.manual_seed(0)
        if contiguous:
            weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        else:
            weight = Parameter(torch.randn(10, 5, 2)[..., 0])
            bias = Parameter(torch.randn(10, 2)[..., 0])
        x = torch.randn(5)
        opt = info.optim_cls([weight, bias], **kwargs)
        schedulers = [s(opt) for s in schedulers_c]
        closure = _quadratic(weight, bias, x, opt)
        initial = closure().item()
        for _ in range(20):
            opt.step(closure)
            for s in schedulers:
                s.step()
        if kwargs.get("maximize", False):
            assert closure().item() > initial, oi.desc
        else:
            assert closure().item() < initial, oi.desc


@pytest.mark.parametrize("info", cases("test_param_groups_lr"))
def test_param_groups_lr(info):
    for oi in _all_inputs(info):
        kwargs = dict(oi.kwargs)
        if "lr" not in kwargs or kwargs["lr"] == 0:
            kwargs["lr"] = 1e-3
        torch.manual_seed(0)
        weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        irrelevant = Parameter(torch.randn(2))
        irrelevant_before = irrelevant.detach().clone()
        x = torch.randn(5)
        # PSD's positional hyperparameters go in the outer kwargs; the first group's lr wins.
        outer = {k: v for k, v in kwargs.items() if k != "lr"}
        opt = info.optim_cls(
            [dict(params=[weight, bias], lr=kwargs["lr"]), dict(params=[irrelevant])],
            **dict(outer, lr=1e-28),
        )
        initial = (weight.mv(x) + bias).pow(2).sum().item()
        for _ in range(20):
            opt.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            opt.step()
        if kwargs.get("maximize", False):
            assert loss.item() > initial, oi.desc
        else:
            assert loss.item() < initial, oi.desc
        perturbed = opt.state.get("perturbed_adam", opt.state.get("psd", {})).get(
            "perturbations", opt.state.get("psd", {}).get("episodes", 0)
        )
        if int(perturbed) == 0:  # a perturbation moves every parameter, whatever its lr
            torch.testing.assert_close(irrelevant.detach(), irrelevant_before)


@pytest.mark.parametrize("info", cases("test_param_groups_weight_decay"))
def test_param_groups_weight_decay(info):
    for oi in _all_inputs(info):
        torch.manual_seed(0)
        weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        x = torch.randn(5)
        opt = info.optim_cls(
            [
                dict(params=[weight], **oi.kwargs),
                dict(params=[bias], **dict(oi.kwargs, weight_decay=0.0)),
            ]
        )
        closure = _quadratic(weight, bias, x, opt)
        initial = closure().item()
        for _ in range(20):
            _run_step(opt, info, closure)
        assert closure().item() < initial, oi.desc


@pytest.mark.parametrize("info", cases("test_param_group_with_lrscheduler_goes_right_direction"))
def test_param_group_with_lrscheduler_goes_right_direction(info):
    for schedulers_c in info.scheduler_inputs:
        for oi in info.optim_inputs_func(device="cpu"):
            if isinstance(oi.kwargs.get("lr"), torch.Tensor):
                continue  # torch's schedulers rewrite lr as a Python float
            torch.manual_seed(0)
            weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
            x = torch.randn(5)
            opt = info.optim_cls([{"params": [weight]}, {"params": [bias]}], **oi.kwargs)
            schedulers = [s(opt) for s in schedulers_c]
            closure = _quadratic(weight, bias, x, opt)
            initial = closure().item()
            for _ in range(20):
                opt.step(closure)
                for s in schedulers:
                    s.step()
            if oi.kwargs.get("maximize", False):
                assert closure().item() > initial, oi.desc
            else:
                assert closure().item() < initial, oi.desc


@pytest.mark.parametrize("info", cases("test_tensor_lr"))
def test_tensor_lr(info):
    """A one-element tensor ``lr`` steps exactly like the Python float."""
    for oi in info.optim_inputs_func(device="cpu"):
        if isinstance(oi.kwargs.get("lr"), torch.Tensor) or "lr" not in oi.kwargs:
            continue
        results = []
        for lr in (oi.kwargs["lr"], torch.tensor([oi.kwargs["lr"]])):
            torch.manual_seed(0)
            weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
            x = torch.randn(5)
            opt = info.optim_cls([weight, bias], **dict(oi.kwargs, lr=lr))
            closure = _quadratic(weight, bias, x, opt)
            for _ in range(5):
                opt.step(closure)
            results.append(torch.cat([weight.detach().reshape(-1), bias.detach()]))
        torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("info", cases("test_tensor_lr"))
def test_tensor_lr_every_input(info):
    """Upstream's form: every input (foreach included), ``lr`` replaced by 1e-3 and by
    ``torch.tensor(1e-3)`` (0-d); the two runs are equal."""
    for oi in _all_inputs(info):
        torch.manual_seed(0)
        weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        weight_c = weight.detach().clone().requires_grad_(True)
        bias_c = bias.detach().clone().requires_grad_(True)
        x = torch.randn(5)
        kwargs = {k: v for k, v in oi.kwargs.items() if k != "lr"}
        opt_r = info.optim_cls([weight, bias], **dict(kwargs, lr=1e-3))
        opt_t = info.optim_cls([weight_c, bias_c], **dict(kwargs, lr=torch.tensor(1e-3)))
        for _ in range(5):
            _quadratic(weight, bias, x, opt_r)()
            _quadratic(weight_c, bias_c, x, opt_t)()
            opt_r.step()
            opt_t.step()
            torch.testing.assert_close(weight, weight_c)
            torch.testing.assert_close(bias, bias_c)


# ------------------------------------------------------------------ implementations


@pytest.mark.parametrize("info", cases("test_foreach_matches_forloop"))
def test_foreach_matches_forloop(info):
    """foreach=True and foreach=False give the same parameters and state (float64), with
    a 0-d last parameter and one step without gradients."""
    for oi in info.optim_inputs_func(device="cpu"):
        params_out, states = [], []
        for flag in (False, True):
            x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=torch.float64).reshape(3, 2)
            torch.manual_seed(1)
            model = torch.nn.Sequential(
                torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
            ).double()
            empty = torch.zeros((), dtype=torch.float64, requires_grad=True)  # 0-d last param
            params = [*model.parameters(), empty]
            opt = info.optim_cls(params, **dict(oi.kwargs, foreach=flag))
            for i in range(7):
                opt.zero_grad()

                def closure(i=i):
                    if i != 3:  # a step where no parameter has a gradient: a no-op
                        model(x).sum().backward()
                        empty.grad = torch.rand_like(empty)
                    return model(x).sum().detach()

                _run_step(opt, info, closure)
            params_out.append([p.detach().clone() for p in params])
            states.append([{k: v for k, v in opt.state[p].items()} for p in params])
        for a, b in zip(*params_out):
            torch.testing.assert_close(a, b)
        for sa, sb in zip(*states):
            assert sa.keys() == sb.keys()
            for k in sa:
                torch.testing.assert_close(sa[k], sb[k])


@pytest.mark.parametrize("info", cases("test_step_is_noop_when_params_have_no_grad"))
def test_step_is_noop_when_params_have_no_grad(info):
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    before = [p.clone() for p in params]
    for oi in _all_inputs(info):
        opt = info.optim_cls(params, **oi.kwargs)
        opt.step(lambda: torch.tensor([1.0]))
        for a, b in zip(before, params):
            assert torch.equal(a, b)


@pytest.mark.parametrize("info", cases("test_step_is_noop_for_zero_grads"))
def test_step_is_noop_for_zero_grads(info):
    param = torch.randn(5, 1, requires_grad=True)
    before = param.detach().clone()
    for oi in _all_inputs(info):
        if oi.kwargs.get("weight_decay", 0) != 0:
            continue  # decay moves the parameters without a gradient
        opt = info.optim_cls([param], **oi.kwargs)

        def closure():
            param.grad = torch.zeros_like(param)
            return torch.tensor([1.0])

        _run_step(opt, info, closure)
        assert torch.equal(param.detach(), before), oi.desc


@pytest.mark.parametrize("info", cases("test_grads_are_never_inplaced_into"))
def test_grads_are_never_inplaced_into(info):
    for oi in _all_inputs(info):
        torch.manual_seed(0)
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        opt = info.optim_cls(params, **oi.kwargs)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            grads = [p.grad.clone() for p in params]
            opt.step()
            for p, g in zip(params, grads):
                assert torch.equal(p.grad, g), oi.desc


@pytest.mark.parametrize("info", cases("test_non_empty_state"))
def test_non_empty_state(info):
    """After a step the optimizer has state (its global entries at least)."""
    for oi in _all_inputs(info):
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        opt = info.optim_cls(params, **oi.kwargs)

        def closure():
            opt.zero_grad()
            loss = sum((p * p).sum() for p in params)
            loss.backward()
            return loss

        _run_step(opt, info, closure)
        assert len(opt.state) > 0
        for state in opt.state.values():  # upstream: no entry is empty
            assert len(state) > 0


@pytest.mark.parametrize("info", cases("test_non_empty_state"))
def test_non_empty_state_upstream_form(info):
    """Upstream's form: a ``Linear`` model, one backward, then ``step()`` (``step(lambda:
    1.0)`` for the closure optimizers); every state entry is non-empty."""
    for oi in info.optim_inputs_func(device="cpu"):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 5)
        opt = info.optim_cls(model.parameters(), **oi.kwargs)
        opt.zero_grad()
        model(torch.rand(2, 5)).sum().backward()
        if info.step_requires_closure:
            opt.step(lambda: 1.0)
        else:
            opt.step()
        for state in opt.state.values():
            assert len(state) > 0, oi.desc


# ------------------------------------------------------------------ complex


@pytest.mark.parametrize("info", cases("test_complex"))
def test_complex(info):
    """A complex parameter steps exactly like its ``view_as_real`` twin (the last
    parameter stays real)."""
    for oi in _all_inputs(info):
        torch.manual_seed(0)
        cplx = [
            torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, 5, dtype=F32, requires_grad=True),
        ]
        real = [
            (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
            for p in cplx
        ]
        o_c = info.optim_cls(cplx, **oi.kwargs)
        o_r = info.optim_cls(real, **oi.kwargs)
        seen_r, seen_c = [], []  # the points each closure call sees (SAM_SPS: x and e)
        for _ in range(3):
            grads = [torch.randn_like(p) for p in real]
            loss = torch.rand(())

            def closure_r(grads=grads, loss=loss):
                seen_r.append([p.detach().clone() for p in real])
                for p, g in zip(real, grads):
                    p.grad = g.clone()
                return loss

            def closure_c(grads=grads, loss=loss):
                seen_c.append(
                    [
                        torch.view_as_real(p.detach()).clone()
                        if p.is_complex()
                        else p.detach().clone()
                        for p in cplx
                    ]
                )
                for p, g in zip(cplx, grads):
                    p.grad = torch.view_as_complex(g.clone()) if p.is_complex() else g.clone()
                return loss

            _run_step(o_r, info, closure_r)
            _run_step(o_c, info, closure_c)
            torch.testing.assert_close(seen_c, seen_r)
            for pc, pr in zip(cplx, real):
                got = torch.view_as_real(pc) if pc.is_complex() else pc
                torch.testing.assert_close(got.detach(), pr.detach())


@pytest.mark.parametrize("info", cases("test_complex_2d"))
def test_complex_2d(info):
    """A complex 2-vector on Rosenbrock steps like its real and imaginary parts."""

    def rosenbrock(t):
        x, y = t
        return (1 - x) ** 2 + 100 * (y - x**2) ** 2

    for oi in _all_inputs(info):
        torch.manual_seed(0)
        a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
        re = a1.real.detach().clone().requires_grad_()
        im = a1.imag.detach().clone().requires_grad_()
        k1, k2 = dict(oi.kwargs), dict(oi.kwargs)
        if "noise_fn" in inspect.signature(info.optim_cls).parameters:
            # The twins lay the same draws out differently (one interleaved (2, 2) real
            # view against two planar 2-vectors), so both get the same draws, arranged
            # for each: z[0] the real parts, z[1] the imaginary parts.
            g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)

            def noise_c(params, g=g1):
                z = torch.randn(2, 2, generator=g)
                return [z.T.contiguous()], torch.rand((), dtype=torch.float64, generator=g)

            def noise_r(params, g=g2):
                z = torch.randn(2, 2, generator=g)
                return [z[0], z[1]], torch.rand((), dtype=torch.float64, generator=g)

            k1["noise_fn"], k2["noise_fn"] = noise_c, noise_r
        o1 = info.optim_cls([a1], **k1)
        o2 = info.optim_cls([re, im], **k2)
        for _ in range(10):

            def c1():
                o1.zero_grad()
                loss = rosenbrock(a1).abs()
                loss.backward()
                return loss

            def c2():
                o2.zero_grad()
                loss = rosenbrock(torch.complex(re, im)).abs()
                loss.backward()
                return loss

            _run_step(o1, info, c1)
            _run_step(o2, info, c2)
            torch.testing.assert_close(a1.real.detach(), re.detach())
            torch.testing.assert_close(a1.imag.detach(), im.detach())


# ------------------------------------------------------------------ state dicts


def _primed(info, kwargs, steps=10):
    torch.manual_seed(0)
    weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
    x = torch.randn(3)
    opt = info.optim_cls([weight, bias], **kwargs)
    closure = _quadratic(weight, bias, x, opt)
    for _ in range(steps):
        opt.step(closure)
    return opt, weight, bias, x


def _named(params, is_named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params


def _without_param_names(state_dict):
    out = deepcopy(state_dict)
    for group in out["param_groups"]:
        group.pop("param_names", None)
    return out


@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("info", cases("test_state_dict_deterministic"))
def test_state_dict_deterministic(info, is_named_optim0, is_named_optim1):
    for oi in _all_inputs(info):
        torch.manual_seed(0)
        weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
        x = torch.randn(3)
        opt = info.optim_cls(_named([weight, bias], is_named_optim0), **oi.kwargs)
        closure = _quadratic(weight, bias, x, opt)
        for _ in range(10):
            opt.step(closure)
        with torch.no_grad():
            wc, bc = Parameter(weight.clone()), Parameter(bias.clone())
        opt_c = info.optim_cls(_named([wc, bc], is_named_optim1), **oi.kwargs)
        closure_c = _quadratic(wc, bc, x, opt_c)
        opt_c.load_state_dict(deepcopy(opt.state_dict()))
        for _ in range(10):
            opt.step(closure)
            opt_c.step(closure_c)
            assert torch.equal(weight, wc) and torch.equal(bias, bc), oi.desc
        assert_same(
            _without_param_names(opt.state_dict()), _without_param_names(opt_c.state_dict())
        )
        opt_c.param_groups.extend(opt_c.param_groups)
        assert (
            _without_param_names(opt.state_dict())["param_groups"][-1]
            == _without_param_names(opt_c.state_dict())["param_groups"][-1]
        )


@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("info", cases("test_can_load_from_to_named_state_dict"))
def test_can_load_from_to_named_state_dict(info, is_named_optim0, is_named_optim1):
    for oi in _all_inputs(info):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
        x = torch.rand(1, 4, 16, 16)

        def fwd_bwd(opt):
            def closure():
                opt.zero_grad()
                loss = model(x).sum()
                loss.backward()
                return loss

            return closure

        ps = model.named_parameters() if is_named_optim0 else model.parameters()
        opt = info.optim_cls(ps, **oi.kwargs)
        for _ in range(3):
            _run_step(opt, info, fwd_bwd(opt))
        old = deepcopy(opt.state_dict())
        ps2 = model.named_parameters() if is_named_optim1 else model.parameters()
        opt2 = info.optim_cls(ps2, **oi.kwargs)
        opt2.load_state_dict(old)
        _run_step(opt2, info, fwd_bwd(opt2))
        if is_named_optim0 or is_named_optim1:
            assert opt2.state_dict()["param_groups"][0]["param_names"] == [
                "0.weight",
                "0.bias",
                "1.weight",
                "1.bias",
            ]


@pytest.mark.parametrize("info", cases("test_can_load_older_state_dict"))
def test_can_load_older_state_dict(info):
    for oi in _all_inputs(info):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
        x = torch.rand(1, 4, 16, 16)
        opt = info.optim_cls(model.parameters(), **oi.kwargs)

        def closure():
            opt.zero_grad()
            loss = model(x).sum()
            loss.backward()
            return loss

        for _ in range(3):
            _run_step(opt, info, closure)
        old = deepcopy(opt.state_dict())
        for group in old["param_groups"]:
            for flag in ("maximize", "foreach", "fused", "differentiable", "capturable"):
                group.pop(flag, None)
        opt.load_state_dict(old)
        _run_step(opt, info, closure)


@pytest.mark.parametrize("info", cases("test_load_nontensor_step"))
def test_load_nontensor_step(info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    for oi in _all_inputs(info):
        opt = info.optim_cls(params, **oi.kwargs)

        def closure():
            for p in params:
                p.grad = torch.rand_like(p)
            return torch.tensor(1.0)

        for _ in range(3):
            _run_step(opt, info, closure)
        sd = deepcopy(opt.state_dict())
        for st in sd["state"].values():
            if isinstance(st, dict) and torch.is_tensor(st.get("step")):
                st["step"] = st["step"].item()
        opt.load_state_dict(sd)
        _run_step(opt, info, closure)


@pytest.mark.parametrize("is_named_optim", [True, False])
@pytest.mark.parametrize("info", cases("test_save_load_equality_with_weights_only"))
def test_save_load_equality_with_weights_only(info, is_named_optim, tmp_path):
    for oi in _all_inputs(info):
        torch.manual_seed(0)
        weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
        x = torch.randn(3)
        opt = info.optim_cls(_named([weight, bias], is_named_optim), **oi.kwargs)
        closure = _quadratic(weight, bias, x, opt)
        for _ in range(3):
            opt.step(closure)
        sd = opt.state_dict()
        path = tmp_path / "opt.pt"
        torch.save(sd, path)
        assert_same(torch.load(path, weights_only=False), sd)
        assert_same(torch.load(path, weights_only=True), sd)


@pytest.mark.parametrize("info", cases("test_deepcopy_copies_all_public_attrs"))
def test_deepcopy_copies_all_public_attrs(info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    for oi in _all_inputs(info):
        opt = info.optim_cls(params, **oi.kwargs)

        def closure():
            for p in params:
                p.grad = torch.rand_like(p)
            return torch.tensor(1.0)

        for _ in range(3):
            _run_step(opt, info, closure)
        assert public(opt) == public(deepcopy(opt))


# ------------------------------------------------------------------ hooks


def _one_param_opt(info, **kw):
    p = Parameter(torch.randn(3))
    opt = info.optim_cls([p], **dict(info.optim_inputs_func()[0].kwargs, **kw))

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    return opt, closure


@pytest.mark.parametrize("info", cases("test_step_all_hooks"))
def test_step_all_hooks(info):
    opt, closure = _one_param_opt(info)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    g1 = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("gpre"))
    g2 = register_optimizer_step_post_hook(lambda o, a, k: calls.append("gpost"))
    try:
        _run_step(opt, info, closure)
        assert calls == ["gpre", "pre", "post", "gpost"]
        calls.clear()
        h1.remove()
        h2.remove()
        _run_step(opt, info, closure)
        assert calls == ["gpre", "gpost"]
    finally:
        g1.remove()
        g2.remove()


@pytest.mark.parametrize("info", cases("test_state_dict_pre_hook"))
def test_state_dict_pre_hook(info):
    opt, closure = _one_param_opt(info)
    _run_step(opt, info, closure)

    def pre(o):
        o.state["test"] = 1

    opt.register_state_dict_pre_hook(pre)
    assert opt.state_dict()["state"]["test"] == 1


@pytest.mark.parametrize("info", cases("test_state_dict_post_hook"))
def test_state_dict_post_hook(info):
    opt, closure = _one_param_opt(info)
    _run_step(opt, info, closure)

    def post(o, sd):
        sd["ran_state_dict_pre_hook"] = True
        return sd

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["ran_state_dict_pre_hook"] is True
    # The optimizers' own global entries are plain state entries the hooks see.
    assert any(isinstance(k, str) for k in sd["state"])


@pytest.mark.parametrize("info", cases("test_load_state_dict_pre_post_hook"))
def test_load_state_dict_pre_post_hook(info):
    opt, closure = _one_param_opt(info)
    _run_step(opt, info, closure)
    sd = opt.state_dict()
    opt2, closure2 = _one_param_opt(info)
    seen = []

    def pre(o, state_dict):
        seen.append(("pre", sorted(k for k in state_dict["state"] if isinstance(k, str))))
        state_dict["param_groups"][0]["lr"] = state_dict["param_groups"][0]["lr"]
        return state_dict

    def post(o):
        seen.append(("post", o is opt2))

    opt2.register_load_state_dict_pre_hook(pre)
    opt2.register_load_state_dict_post_hook(post)
    opt2.load_state_dict(sd)
    assert seen[0][0] == "pre" and seen[0][1] and seen[1] == ("post", True)


# ------------------------------------------------------------------ hooks, upstream's form
# As torch's TestOptimRenewed: fresh optimizers over every input, parameters without
# gradients, a closure returning the Python number 1 where the algorithm needs one.


def _pre_hook(opt):
    opt.state["test"] = 1


def _post_hook(opt, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def _load_pre_hook1(opt, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook2(opt, state_dict):
    my_state_dict = deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_post_hook(opt):
    opt.state["ran_load_state_dict_pre_hook2"] = opt.param_groups[0]["lr"] == 0.003
    opt.state["ran_load_state_dict_post_hook"] = True


def _fresh(info, oi):
    return info.optim_cls([torch.rand(2, 3, requires_grad=True)], **oi.kwargs)


@pytest.mark.parametrize("info", cases("test_state_dict_pre_hook"))
def test_state_dict_pre_hook_fresh(info):
    for oi in _all_inputs(info):
        opt = _fresh(info, oi)
        opt.register_state_dict_pre_hook(_pre_hook)
        assert opt.state_dict()["state"]["test"] == 1


@pytest.mark.parametrize("info", cases("test_state_dict_post_hook"))
def test_state_dict_post_hook_fresh(info):
    for oi in _all_inputs(info):
        opt = _fresh(info, oi)
        opt.register_state_dict_post_hook(_post_hook)
        assert opt.state_dict()["ran_state_dict_pre_hook"] is False


@pytest.mark.parametrize("info", cases("test_state_dict_pre_post_hook"))
def test_state_dict_pre_post_hook(info):
    for oi in _all_inputs(info):
        opt = _fresh(info, oi)
        opt.register_state_dict_pre_hook(_pre_hook)
        opt.register_state_dict_post_hook(_post_hook)
        sd = opt.state_dict()
        assert "test" not in sd["state"] and sd["ran_state_dict_pre_hook"] is True


@pytest.mark.parametrize("info", cases("test_load_state_dict_pre_hook_and_prepend"))
def test_load_state_dict_pre_hook_and_prepend(info):
    for oi in _all_inputs(info):
        opt = _fresh(info, oi)
        sd = opt.state_dict()
        opt.register_load_state_dict_pre_hook(_load_pre_hook1)
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 0.002
        opt.register_load_state_dict_pre_hook(_load_pre_hook2, prepend=True)
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 0.002  # prepended: hook 1 runs last


@pytest.mark.parametrize("info", cases("test_load_state_dict_post_hook"))
def test_load_state_dict_post_hook(info):
    for oi in _all_inputs(info):
        opt = _fresh(info, oi)
        opt.register_load_state_dict_post_hook(_load_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert not opt.state["ran_load_state_dict_pre_hook2"]  # a Tensor lr gives a 0-d bool
        assert opt.state["ran_load_state_dict_post_hook"] is True


@pytest.mark.parametrize("info", cases("test_load_state_dict_pre_post_hook"))
def test_load_state_dict_pre_post_hook_upstream_form(info):
    for oi in _all_inputs(info):
        opt = _fresh(info, oi)
        opt.register_load_state_dict_pre_hook(_load_pre_hook2)
        opt.register_load_state_dict_post_hook(_load_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert opt.state["ran_load_state_dict_pre_hook2"]
        assert opt.state["ran_load_state_dict_post_hook"] is True


def _dummy_closure(info):
    return (lambda: 1) if info.step_requires_closure else None


@pytest.mark.parametrize("info", cases("test_step_post_hook"))
def test_step_post_hook(info):
    params = [torch.tensor([1.0, 1.0])]
    for oi in _all_inputs(info):
        opt = info.optim_cls(params, **oi.kwargs)
        data = [2]
        handle = opt.register_step_post_hook(lambda o, a, k: data.append(data[-1] + 2))
        opt.step(_dummy_closure(info))
        opt.step(_dummy_closure(info))
        assert data[-1] == 6
        handle.remove()
        opt.step(_dummy_closure(info))
        assert data[-1] == 6


@pytest.mark.parametrize("info", cases("test_step_pre_hook"))
def test_step_pre_hook(info):
    params = [torch.tensor([1.0, 1.0])]
    for oi in _all_inputs(info):
        opt = info.optim_cls(params, **oi.kwargs)
        data = [5]
        handle = opt.register_step_pre_hook(lambda o, a, k: data.append(data[-1] + 2))
        opt.step(_dummy_closure(info))
        opt.step(_dummy_closure(info))
        assert data[-1] == 9
        handle.remove()
        opt.step(_dummy_closure(info))
        assert data[-1] == 9


@pytest.mark.parametrize("info", cases("test_step_all_hooks"))
def test_step_all_hooks_with_sgd(info):
    params = [torch.tensor([1.0, 1.0])]
    for oi in _all_inputs(info):
        opt = info.optim_cls(params, **oi.kwargs)
        opt2 = torch.optim.SGD(params)
        data = []
        handles = [
            register_optimizer_step_pre_hook(lambda o, a, k: data.append(0)),
            register_optimizer_step_post_hook(lambda o, a, k: data.append(5)),
        ]
        try:
            for o in (opt, opt2):
                handles.append(o.register_step_pre_hook(lambda o, a, k: data.append(1)))
                handles.append(o.register_step_post_hook(lambda o, a, k: data.append(2)))
            opt.step(_dummy_closure(info))
            assert data == [0, 1, 2, 5]
            opt2.step(_dummy_closure(info))
            assert data == [0, 1, 2, 5] * 2
            opt.step(_dummy_closure(info))
            assert data == [0, 1, 2, 5] * 3
        finally:
            for h in handles:
                h.remove()
        opt.step(_dummy_closure(info))
        opt2.step(_dummy_closure(info))
        assert data == [0, 1, 2, 5] * 3
