"""PSD under DDP (2 processes, gloo, CPU): identical parameters on every rank, equal to a
single-process full-batch run (perturbations included: same seed on every rank)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.distributed

STEPS = 25
HP = dict(lr=0.3, epsilon=0.3, radius=0.05, episode_length=3, seed=17)

COMMON = textwrap.dedent(
    """
    import torch

    def data():
        g = torch.Generator().manual_seed(0)
        X = torch.randn(64, 6, generator=g, dtype=torch.float64)
        y = torch.randn(64, 2, generator=g, dtype=torch.float64)
        return X, y

    def model():
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    """
)

WORKER = COMMON + textwrap.dedent(
    """
    import sys
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from psd_torch import PSD

    rank, world, port, out, steps = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    hp = eval(sys.argv[6])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    X, y = data()
    n = X.shape[0] // world
    Xr, yr = X[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    net = DDP(model())
    opt = PSD(net.parameters(), **hp)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(Xr), yr).backward()  # DDP all-reduces (averages) grads
        opt.step()
    torch.save({"params": [p.detach() for p in net.module.parameters()],
                "episodes": int(opt.psd_state.episodes)}, out)
    # Both ranks have finished communicating and written their results. Leave without
    # running C++ destructors: gloo's threads can abort ("terminate called without an
    # active exception") during interpreter shutdown on a loaded machine.
    dist.barrier()
    import os
    os._exit(0)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process():
    ns: dict = {}
    exec(COMMON, ns)
    from psd_torch import PSD

    X, y = ns["data"]()
    net = ns["model"]()
    opt = PSD(net.parameters(), **HP)
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(X), y).backward()
        opt.step()
    return [p.detach() for p in net.parameters()], int(opt.psd_state.episodes)


def test_psd_ddp_two_ranks_match_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs, outs = [], []
    for rank in range(2):
        out = tmp_path / f"rank{rank}.pt"
        outs.append(out)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(rank), "2", port, str(out), str(STEPS), repr(HP)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    logs = []
    for p in procs:
        try:
            so, _ = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out")
        logs.append(so.decode(errors="replace"))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    r0, r1 = (torch.load(o, weights_only=False) for o in outs)
    ref, ref_episodes = _single_process()
    assert r0["episodes"] == r1["episodes"] == ref_episodes >= 2
    for a, b, c in zip(r0["params"], r1["params"], ref):
        assert torch.equal(a, b)  # bitwise identical on both ranks
        assert torch.allclose(a, c, rtol=0, atol=1e-12)  # equal to the full-batch run
