"""psd_torch.SAM_SPS under DistributedDataParallel: 2 gloo processes on CPU.

Each rank trains a float64 MLP on its half of every batch with the two-pass API
(``first_pass``/``second_pass`` contexts, ``no_sync`` on the first pass for
``first_pass="per_rank"``). Asserted: every rank ends with identical parameters;
``"global"`` equals a single-process full-batch run; ``"per_rank"`` equals an
independent single-process simulation of per-rank perturbations (each shard
perturbed along its own gradient, gradients at the perturbed points averaged, the
Polyak scalars averaged) built from the core's scalar functions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from psd_core.polyak import sam_perturbation_scale, sam_sps_coefficients, sam_sps_config
from psd_torch import SAM_SPS

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

WORLD = 2
STEPS = 8
HYPER = dict(rho=0.2, lambd=1.0, weight_decay=1e-3, gamma_b=2.0, f_star=0.0)

_WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn import functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from psd_torch import SAM_SPS

    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    blob = torch.load(out + "/data.pt")
    x, y, state, hyper, steps = blob["x"], blob["y"], blob["state"], blob["hyper"], blob["steps"]
    for mode in ("global", "per_rank"):
        model = nn.Sequential(nn.Linear(x.shape[1], 8), nn.Tanh(), nn.Linear(8, 1)).double()
        model.load_state_dict(state)
        ddp = DDP(model)
        opt = SAM_SPS(ddp.parameters(), first_pass=mode, **hyper)
        for t in range(steps):
            xb, yb = blob["batches"][t]
            xl, yl = xb[rank::world], yb[rank::world]
            opt.zero_grad()
            with opt.first_pass(ddp):
                loss = F.binary_cross_entropy_with_logits(ddp(xl).squeeze(-1), yl)
                loss.backward()
            opt.first_step(loss)
            with opt.second_pass(ddp):
                loss_e = F.binary_cross_entropy_with_logits(ddp(xl).squeeze(-1), yl)
                loss_e.backward()
            opt.second_step(loss_e)
        torch.save(
            {"params": [p.detach().clone() for p in model.parameters()],
             "lr": opt.param_groups[0]["lr"], "steps": int(opt.steps)},
            f"{out}/{mode}_{rank}.pt",
        )
    # Both ranks have finished communicating and written their results. Leave without
    # running C++ destructors: gloo's threads can abort ("terminate called without an
    # active exception") during interpreter shutdown on a loaded machine.
    dist.barrier()
    import os
    os._exit(0)
    """
)


def _mlp(d_in: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _data():
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = np.asarray(d.data[:256], dtype=np.float64)
    x = (x - x.mean(0)) / x.std(0)
    x, y = torch.tensor(x), torch.tensor(d.target[:256], dtype=torch.float64)
    return [(x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]) for i in range(STEPS)]


def _loss(model, xb, yb):
    return F.binary_cross_entropy_with_logits(model(xb).squeeze(-1), yb)


def _value_and_grad(model, params, xb, yb):
    names = [n for n, _ in model.named_parameters()]
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    out = torch.func.functional_call(model, dict(zip(names, leaves)), (xb,))
    loss = F.binary_cross_entropy_with_logits(out.squeeze(-1), yb)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, leaves)]


def _per_rank_reference(model, batches):
    """Per-rank perturbations simulated in one process from the core's scalar functions."""
    cfg = sam_sps_config(**HYPER)
    x = [p.detach().clone() for p in model.parameters()]
    for xb, yb in batches:
        shards = [(xb[k::WORLD], yb[k::WORLD]) for k in range(WORLD)]
        offs, ges, losses = [], [], []
        for xs, ys in shards:
            _, g = _value_and_grad(model, x, xs, ys)
            c = sam_perturbation_scale(sum((t * t).sum() for t in g), cfg.rho, cfg.lambd)
            r = [c * t for t in g]
            loss_e, ge = _value_and_grad(model, [a + b for a, b in zip(x, r)], xs, ys)
            offs.append(r)
            ges.append(ge)
            losses.append(loss_e)
        ge = [sum(gs) / WORLD for gs in zip(*ges)]
        inner = sum(sum((a * b).sum() for a, b in zip(ge, r)) for r in offs) / WORLD
        co = sam_sps_coefficients(sum(losses) / WORLD, sum((t * t).sum() for t in ge), inner, cfg)
        x = [p + co.grad * g + co.params * p for p, g in zip(x, ge)]
    return x


def test_ddp_two_pass_ranks_agree_and_match_single_process(tmp_path: Path):
    batches = _data()
    d_in = batches[0][0].shape[1]
    model = _mlp(d_in)
    torch.save(
        {
            "x": batches[0][0],
            "y": batches[0][1],
            "batches": batches,
            "hyper": HYPER,
            "steps": STEPS,
            "state": model.state_dict(),
        },
        tmp_path / "data.pt",
    )
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    init = f"file://{tmp_path / 'rendezvous'}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(r), str(WORLD), init, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # pragma: no cover
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out")
        outputs.append(out)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out

    res = {
        (mode, r): torch.load(tmp_path / f"{mode}_{r}.pt")
        for mode in ("global", "per_rank")
        for r in range(WORLD)
    }
    for mode in ("global", "per_rank"):
        for a, b in zip(res[(mode, 0)]["params"], res[(mode, 1)]["params"]):
            assert torch.equal(a, b), f"ranks disagree ({mode})"
        assert res[(mode, 0)]["steps"] == STEPS

    # global: a single process on the full batch
    single = _mlp(d_in)
    opt = SAM_SPS(single.parameters(), **HYPER)
    for xb, yb in batches:

        def closure(xb=xb, yb=yb):
            loss = _loss(single, xb, yb)
            loss.backward()
            return loss

        opt.step(closure)
    for a, b in zip(res[("global", 0)]["params"], single.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        res[("global", 0)]["lr"], opt.param_groups[0]["lr"], rtol=1e-10, atol=0
    )

    # per_rank: the simulation of per-rank perturbations
    ref = _per_rank_reference(_mlp(d_in), batches)
    for a, b in zip(res[("per_rank", 0)]["params"], ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(res[("per_rank", 0)]["params"], res[("global", 0)]["params"])
    )
    assert diff > 1e-8, "per-rank perturbations must differ from the global ones"
