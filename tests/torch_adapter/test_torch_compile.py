"""``torch.compile(opt.step)``: the compiled step equals the eager step from the first
call (1e-6), and compiles a bounded number of graphs (no recompilation per step)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from psd_torch import PSD, SAM_SPS, PerturbedAdam

FACTORIES = {
    "PSD": lambda ps: PSD(ps, lr=0.05, epsilon=1e-3, radius=1e-3, seed=0),
    "PSD-perturbing": lambda ps: PSD(
        ps, lr=0.05, epsilon=50.0, radius=1e-2, noise="gaussian", episode_length=1, seed=0
    ),
    "PerturbedAdam": lambda ps: PerturbedAdam(ps, lr=0.01, seed=0),
    "PerturbedAdam-perturbing": lambda ps: PerturbedAdam(
        ps, lr=0.01, g_thres=10.0, t_thres=1, seed=0
    ),
    "SAM_SPS": lambda ps: SAM_SPS(ps, rho=0.05),
    "SAM_SPS-interval": lambda ps: SAM_SPS(ps, rho=0.05, interval=2, weight_decay=1e-3),
}


def _closure(model, opt, x):
    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    return closure


_FAST = ("PSD", "PerturbedAdam", "SAM_SPS")
_CASES = [(n, "aot_eager") for n in _FAST] + [
    pytest.param(n, b, marks=pytest.mark.slow)  # dynamo tracing: ~40 s each on 2 loaded cores
    for n in sorted(FACTORIES)
    for b in ("eager", "aot_eager")
    if (n, b) not in [(f, "aot_eager") for f in _FAST]
]


@pytest.mark.parametrize("name,backend", _CASES)
def test_compiled_step_equals_eager_without_recompiles(name, backend):
    torch.manual_seed(0)
    m_c = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    m_e = copy.deepcopy(m_c)
    x = torch.randn(8, 4)
    o_c, o_e = FACTORIES[name](list(m_c.parameters())), FACTORIES[name](list(m_e.parameters()))
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(o_c.step, backend=backend)
    graphs = []
    for _ in range(8):
        if isinstance(o_c, SAM_SPS):
            step(_closure(m_c, o_c, x))
            o_e.step(_closure(m_e, o_e, x))
        else:
            _closure(m_c, o_c, x)()
            step()
            _closure(m_e, o_e, x)()
            o_e.step()
        for a, b in zip(m_c.parameters(), m_e.parameters()):  # from the first call on
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0, "nothing was compiled"
    # A few graphs while the state machine visits its branches, then none per step.
    assert graphs[-1] == graphs[3], graphs
    if "perturbing" in name:
        st = o_c.psd_state.episodes if isinstance(o_c, PSD) else o_c.adam_state["perturbations"]
        assert int(st) >= 1
