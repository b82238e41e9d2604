"""``PSD``, ``PerturbedAdam`` and ``SAM_SPS`` registered as ``OptimizerInfo``\\ s of torch's
own test machinery (``torch.testing._internal.common_optimizers``), and the list of the
generic checks each algorithm cannot meet, with the reason.

``test_torch_optiminfo.py`` runs the project's version of the generic checks of torch's
``test/test_optim.py::TestOptimRenewed`` on these registrations.
"""

from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import ConstantLR, ExponentialLR, LinearLR, StepLR
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
)

from psd_torch import PSD, SAM_SPS, PerturbedAdam

# ------------------------------------------------------------------ configurations
# As in torch's registry, the configs never set the "global cliquey" flags (foreach,
# fused, differentiable); the tests add them.


def optim_inputs_psd(device=None, dtype=None):
    base = dict(lr=0.02, epsilon=1e-3, radius=1e-3)
    return [
        OptimizerInput(params=None, kwargs=dict(base), desc="default"),
        OptimizerInput(
            params=None,
            kwargs=dict(base, lr=0.05, episode_length=3, t_thres=2, seed=0),
            desc="episode, t_thres, seed",
        ),
        OptimizerInput(
            params=None,
            kwargs=dict(base, noise="gaussian", step_on_perturb=True, seed=1),
            desc="PSDTorch-style gaussian noise",
        ),
        OptimizerInput(
            params=None, kwargs=dict(base, gate="ema", ema_beta=0.3, seed=2), desc="ema gate"
        ),
        OptimizerInput(params=None, kwargs=dict(base, maximize=True, seed=3), desc="maximize"),
        OptimizerInput(
            params=None, kwargs=dict(base, lr=torch.tensor(0.02), seed=4), desc="Tensor lr"
        ),
    ]


def optim_inputs_perturbed_adam(device=None, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={"seed": 0}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.01, "seed": 1}, desc="non-default lr"),
        OptimizerInput(
            params=None, kwargs={"betas": (0.8, 0.99), "eps": 1e-6, "seed": 2}, desc="betas, eps"
        ),
        OptimizerInput(
            params=None,
            kwargs={"g_thres": 10.0, "t_thres": 2, "r": 1e-4, "noise": "ball", "seed": 3},
            desc="perturbing often (ball)",
        ),
        OptimizerInput(params=None, kwargs={"maximize": True, "seed": 4}, desc="maximize"),
        OptimizerInput(
            params=None, kwargs={"lr": torch.tensor(0.001), "seed": 5}, desc="Tensor lr"
        ),
    ]


def optim_inputs_sam_sps(device=None, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"rho": 0.005, "lambd": 0.0}, desc="USAM"),
        OptimizerInput(
            params=None,
            kwargs={"gamma_b": 0.05, "weight_decay": 1e-3, "variant": "sps"},
            desc="cap, weight_decay, sps",
        ),
        OptimizerInput(params=None, kwargs={"interval": 2}, desc="interval"),
        OptimizerInput(params=None, kwargs={"restore": "subtract"}, desc="restore=subtract"),
    ]


# ------------------------------------------------------------------ error inputs


def _p():
    return [torch.zeros(2, requires_grad=True)]


def _p2():
    return [{"params": [torch.zeros(2, requires_grad=True)]}]


def _err(kwargs, error_type, regex, params=None):
    return ErrorOptimizerInput(
        OptimizerInput(params=params if params is not None else _p(), kwargs=kwargs, desc=regex),
        error_on=OptimizerErrorEnum.CONSTRUCTION_ERROR,
        error_type=error_type,
        error_regex=regex,
    )


def _two_groups(**second):
    return [
        {"params": [torch.zeros(2, requires_grad=True)]},
        dict({"params": [torch.zeros(3, requires_grad=True)]}, **second),
    ]


def error_inputs_psd(device=None, dtype=None):
    base = dict(lr=0.1, epsilon=1e-3, radius=1e-3)
    return [
        _err(dict(base, lr=-0.1), ValueError, "Invalid lr: -0.1"),
        _err(dict(base, lr=torch.tensor([0.1, 0.2])), ValueError, "one element"),
        _err(dict(base, epsilon=-1.0), ValueError, "Invalid epsilon"),
        _err(dict(base, radius=-1.0), ValueError, "Invalid radius"),
        _err(dict(base, gate="x"), ValueError, "Invalid gate"),
        _err(dict(base, noise="x"), ValueError, "Invalid noise"),
        _err(dict(base, maximize=1), TypeError, "maximize must be a bool"),
        _err(dict(base, curvature="x"), ValueError, "Invalid curvature"),
        _err(dict(base), ValueError, "Invalid epsilon.*group 1", params=_two_groups(epsilon=0.5)),
        _err(dict(base), ValueError, "Invalid t_thres.*group 1", params=_two_groups(t_thres=3)),
        _err(dict(base), ValueError, "Invalid lr", params=_two_groups(lr=-1.0)),
        _err(dict(base), TypeError, "params argument", params=torch.zeros(2)),
    ]


def error_inputs_perturbed_adam(device=None, dtype=None):
    return [
        _err({"lr": -1e-3}, ValueError, "Invalid lr"),
        _err({"betas": (1.0, 0.999)}, ValueError, r"Invalid betas\[0\]"),
        _err({"betas": (0.9, -0.1)}, ValueError, r"Invalid betas\[1\]"),
        _err({"betas": 0.9}, TypeError, "betas must be a pair"),
        _err({"eps": 0.0}, ValueError, "Invalid eps"),
        _err({"r": -1.0}, ValueError, "Invalid r"),
        _err({"noise": "x"}, ValueError, "Invalid noise"),
        _err({}, ValueError, "Invalid g_thres.*group 1", params=_two_groups(g_thres=0.5)),
        _err({}, ValueError, "Invalid r.*group 1", params=_two_groups(r=0.5)),
        _err({}, ValueError, r"Invalid betas\[0\]", params=_two_groups(betas=(2.0, 0.9))),
    ]


def error_inputs_sam_sps(device=None, dtype=None):
    return [
        _err({"rho": -0.1}, ValueError, "Invalid rho"),
        _err({"lambd": 1.5}, ValueError, "Invalid lambd"),
        _err({"gamma_b": -1.0}, ValueError, "Invalid gamma_b"),
        _err({"weight_decay": -1.0}, ValueError, "Invalid weight_decay"),
        _err({"interval": 0}, ValueError, "Invalid interval"),
        _err({"restore": "x"}, ValueError, "Invalid restore"),
        _err({"maximize": True}, ValueError, "Invalid maximize"),
        _err({}, ValueError, "Invalid interval.*group 1", params=_two_groups(interval=2)),
        _err({}, ValueError, "Invalid restore.*group 1", params=_two_groups(restore="subtract")),
        _err({}, ValueError, "Invalid rho", params=_two_groups(rho=-1.0)),
    ]


_SCHEDULERS = (
    [lambda opt: ExponentialLR(opt, gamma=0.9)],
    [lambda opt: LinearLR(opt, start_factor=0.4, total_iters=4)],
    [lambda opt: ConstantLR(opt, factor=0.4, total_iters=4), lambda opt: StepLR(opt, 3)],
)

OPTIM_INFOS = [
    OptimizerInfo(
        PSD,
        optim_inputs_func=optim_inputs_psd,
        optim_error_inputs_func=error_inputs_psd,
        scheduler_inputs=_SCHEDULERS,
        supported_impls=("foreach",),
        not_og_supported_flags=("foreach", "maximize"),
        supports_complex=True,
    ),
    OptimizerInfo(
        PerturbedAdam,
        optim_inputs_func=optim_inputs_perturbed_adam,
        optim_error_inputs_func=error_inputs_perturbed_adam,
        scheduler_inputs=_SCHEDULERS,
        supported_impls=("foreach",),
        not_og_supported_flags=("foreach", "maximize"),
        supports_complex=True,
    ),
    OptimizerInfo(
        SAM_SPS,
        optim_inputs_func=optim_inputs_sam_sps,
        optim_error_inputs_func=error_inputs_sam_sps,
        scheduler_inputs=(),
        supported_impls=("foreach",),
        not_og_supported_flags=("foreach",),
        supports_complex=True,
        step_requires_closure=True,
    ),
]

# ------------------------------------------------------------------ exclusions
_LR_IS_OUTPUT = (
    "SAM_SPS's lr is its output (the Polyak step size, rewritten every step), not a "
    "hyperparameter: lr schedules and per-group lr do not apply"
)
EXCLUDED: dict[tuple[str, str], str] = {
    ("PSD", "test_step_is_noop_for_zero_grads"): (
        "PSD moves at a zero gradient by design: a zero gradient opens the gate and the "
        "step adds the saddle-escape perturbation"
    ),
    ("PSD", "test_param_groups_weight_decay"): "PSD has no weight_decay hyperparameter",
    ("PerturbedAdam", "test_param_groups_weight_decay"): (
        "PerturbedAdam (as psd-optimizer's) has no weight_decay hyperparameter"
    ),
    ("SAM_SPS", "test_param_groups_lr"): _LR_IS_OUTPUT,
    ("SAM_SPS", "test_param_group_with_lrscheduler_goes_right_direction"): _LR_IS_OUTPUT,
    ("SAM_SPS", "test_tensor_lr"): _LR_IS_OUTPUT,
    ("SAM_SPS", "test_grads_are_never_inplaced_into"): (
        "SAM_SPS.step(closure) evaluates the gradients itself (twice, zeroing them before "
        "each pass), so the caller's gradients are replaced by design"
    ),
}
NOT_PORTED: dict[str, str] = {
    # Upstream TestOptimRenewed checks that are not in test_torch_optiminfo.py, and why.
    "test_rosenbrock_sparse": "sparse gradients: none of the three supports them "
    "(supports_sparse=False, as for most torch optimizers)",
    "test_forloop_goes_right_direction_multigpu": "needs two CUDA devices (the suite is CPU)",
    "test_mixed_device_dtype": "needs two CUDA devices",
    "test_set_default_dtype_works_with_foreach": "onlyCUDA upstream",
    "test_foreach_large_tensor": "onlyCUDA, 72 GB",
    "test_peak_memory_foreach": "onlyCUDA (CUDA caching-allocator peak memory)",
    "test_defaults_changed_to_foreach": "onlyCUDA; patches torch's private "
    "_multi_tensor_<name> functions, which these classes do not have",
    "test_state_dict_with_cuda_params": "onlyCUDA",
    "test_cpu_load_state_dict": "fused/capturable implementations only (none here)",
    "test_fused_matches_forloop": "no fused implementation",
    "test_fused_error_on_params_on_meta": "no fused implementation",
    "test_fused_large_tensor": "no fused implementation",
    "test_fused_does_not_step_if_foundinf": "no fused implementation",
    "test_fused_cpu_matches_cuda": "no fused implementation",
    "test_second_order_optims_return_consistent_types": "LBFGS-specific: it sets "
    "LBFGS's tolerance_grad to +-inf; SAM_SPS (the only closure optimizer here) has no "
    "such argument",
}
"""Upstream checks not ported, with the reason (none of them runs on CPU for these
classes or applies to their arguments)."""
XFAIL: dict[tuple[str, str], str] = {}
"""Expected failures (strict xfail), with the reason; none since the core's complex support."""


def cases(test_name: str) -> list:
    """The registrations as ``pytest.param``\\ s for one generic test, with the
    exclusions (skip, with the reason) and the expected failures (strict xfail)."""
    out = []
    for info in OPTIM_INFOS:
        name = info.optim_cls.__name__
        marks = []
        if (name, test_name) in EXCLUDED:
            marks.append(pytest.mark.skip(reason=EXCLUDED[(name, test_name)]))
        if (name, test_name) in XFAIL:
            marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[(name, test_name)]))
        out.append(pytest.param(info, id=name, marks=marks))
    return out
