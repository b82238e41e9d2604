"""psd_torch optimizers on FSDP2 (``torch.distributed.fsdp.fully_shard``): 2 gloo ranks, CPU.

FSDP2 runs on CPU with gloo: every parameter, gradient and optimizer buffer is a
``DTensor`` sharded along dim 0 (unevenly here: a 5-row weight splits 3/2). Each rank
trains on its half of every batch (FSDP averages the gradients), so the sharded run must
equal an independent single-process full-batch run without FSDP (to 1e-6; float64).
PSD's gate, PerturbedAdam's gate and SAM-SPS's norms and inner product are then global
across the shards, and the noise is the single-process draw, sharded.

``torch.distributed.checkpoint.state_dict``: after 4 of 8 steps each rank takes
``get_optimizer_state_dict`` / ``get_model_state_dict``, saves them, builds a fresh
sharded model and a fresh optimizer with *another* seed, restores both with
``set_model_state_dict`` / ``set_optimizer_state_dict`` and finishes the run: equal to
the uninterrupted 8 steps bit for bit (the generator state travels in the checkpoint).
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

STEPS = 8
HALF = 4

COMMON = textwrap.dedent(
    """
    import torch
    from psd_torch import PSD, PerturbedAdam, SAM_SPS

    OPTS = {
        # epsilon above every gradient norm: a perturbation after every 2-step episode.
        "PSD": lambda ps, seed: PSD(ps, lr=0.2, epsilon=1e3, radius=0.05, episode_length=2, seed=seed),
        # g_thres above every Adam step norm: a perturbation every 3rd step.
        "PerturbedAdam": lambda ps, seed: PerturbedAdam(
            ps, lr=0.02, g_thres=1e3, t_thres=2, r=0.02, noise="ball", seed=seed
        ),
        "SAM_SPS": lambda ps, seed: SAM_SPS(ps, rho=0.1, gamma_b=0.5, weight_decay=1e-3),
    }

    def data():
        g = torch.Generator().manual_seed(0)
        X = torch.randn(STEPS, 16, 6, generator=g, dtype=torch.float64)
        y = torch.randn(STEPS, 16, 2, generator=g, dtype=torch.float64)
        return X, y

    def model():
        torch.manual_seed(3)
        return torch.nn.Sequential(
            torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
        ).double()

    def train(net, opt, X, y, steps):
        for t in steps:
            def closure(t=t):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(net(X[t]), y[t])
                loss.backward()
                return loss
            opt.step(closure)
    """
)

WORKER = (
    textwrap.dedent(
        """
    import os, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict,
        set_model_state_dict, set_optimizer_state_dict,
    )

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    STEPS, HALF = int(sys.argv[5]), int(sys.argv[6])
    """
    )
    + COMMON
    + textwrap.dedent(
        """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    X, y = data()
    Xr, yr = X[:, rank::world], y[:, rank::world]

    def sharded():
        net = model()
        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        return net

    def full(net):
        return [p.full_tensor().detach().clone() for p in net.parameters()]

    res = {}
    for name, make in OPTS.items():
        net = sharded()
        opt = make(net.parameters(), 11)
        assert type(next(net.parameters())).__name__ == "DTensor"
        train(net, opt, Xr, yr, range(HALF))
        msd = get_model_state_dict(net)
        osd = get_optimizer_state_dict(net, opt)
        torch.save({"model": msd, "optim": osd}, f"{out}/{name}_ckpt_{rank}.pt")
        train(net, opt, Xr, yr, range(HALF, STEPS))
        res[name] = {"params": full(net), "sd": opt.state_dict()}

        # restore into fresh objects (another seed: the generator must come from the checkpoint)
        ckpt = torch.load(f"{out}/{name}_ckpt_{rank}.pt", weights_only=False)
        net2 = sharded()
        opt2 = make(net2.parameters(), 99)
        err = None
        if name == "SAM_SPS":
            # DCP fills an *empty* optimizer state by calling step(closure=None), which
            # SAM_SPS refuses (no closure); its state is never empty, so this must not raise.
            try:
                set_optimizer_state_dict(net2, opt2, ckpt["optim"])
            except ValueError as e:
                err = str(e)
            for p in net2.parameters():
                p.grad = torch.zeros_like(p)
        set_model_state_dict(net2, ckpt["model"])
        set_optimizer_state_dict(net2, opt2, ckpt["optim"])
        opt2.zero_grad(set_to_none=True)
        train(net2, opt2, Xr, yr, range(HALF, STEPS))
        res[name]["resumed"] = full(net2)
        res[name]["dcp_error"] = err
        if hasattr(opt, "generator"):
            res[name]["gen"] = (opt.generator.get_state(), opt2.generator.get_state())
    torch.save(res, f"{out}/rank{rank}.pt")
    dist.barrier()
    os._exit(0)  # skip gloo's C++ destructors (they can abort at interpreter exit)
    """
    )
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def _single_process() -> dict:
    ns: dict = {"STEPS": STEPS}
    exec(COMMON, ns)
    X, y = ns["data"]()
    out = {}
    for name, make in ns["OPTS"].items():
        net = ns["model"]()
        opt = make(net.parameters(), 11)
        ns["train"](net, opt, X, y, range(STEPS))
        out[name] = {"params": [p.detach() for p in net.parameters()], "opt": opt}
    return out


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("fsdp")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", port, str(tmp), str(STEPS), str(HALF)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = []
    for p in procs:
        try:
            so, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:  # pragma: no cover
            for q in procs:
                q.kill()
            pytest.fail("FSDP workers timed out")
        logs.append(so.decode(errors="replace"))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam", "SAM_SPS"])
def test_fsdp2_sharded_run_equals_single_process(fsdp_results, name: str) -> None:
    ref = _single_process()[name]
    r0, r1 = (r[name] for r in fsdp_results)
    for a, b, c in zip(r0["params"], r1["params"], ref["params"]):
        assert torch.equal(a, b)  # both ranks gather the same parameters
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)  # float64: only summation order
    opt = ref["opt"]
    sd = r0["sd"]
    if name == "PSD":
        assert int(opt.psd_state.episodes) >= 2
        assert int(opt.psd_state.episodes) == int(_packed(sd)["psd"]["episodes"])
    elif name == "PerturbedAdam":
        assert int(opt.adam_state["perturbations"]) >= 2
        assert int(opt.adam_state["perturbations"]) == int(
            _packed(sd)["perturbed_adam"]["perturbations"]
        )
    else:
        assert int(opt.steps) == STEPS


def _packed(sd: dict) -> dict:
    """The optimizer-global entries of a psd_torch ``state_dict()``: under their
    ``optimizer.state`` keys (the plain layout ``opt.state_dict()`` returns), or packed
    into the first parameter's entry (the layout ``torch.distributed.checkpoint`` gets)."""
    from psd_torch._dtensor import GLOBAL_KEY

    for entry in sd["state"].values():
        if isinstance(entry, dict) and GLOBAL_KEY in entry:
            return entry[GLOBAL_KEY]["state"]
    glob = {k: v for k, v in sd["state"].items() if isinstance(k, str)}
    if glob.keys() - {GLOBAL_KEY}:
        return glob
    raise AssertionError("no global entry")


def test_state_dict_layouts() -> None:
    """``opt.state_dict()`` keeps the global entries under their ``optimizer.state`` keys
    (what torch's state-dict hooks see); ``get_optimizer_state_dict`` gets them packed
    into the first parameter's entry, and either layout loads."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from psd_torch import PSD
    from psd_torch._dtensor import GLOBAL_KEY

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = PSD(net.parameters(), lr=0.1, epsilon=1e3, radius=0.1, episode_length=1, seed=0)
    net(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    plain = opt.state_dict()
    assert {"psd", "generator"} <= {k for k in plain["state"] if isinstance(k, str)}
    dcp = get_optimizer_state_dict(net, opt)
    assert not any(k in ("psd", "generator") for k in dcp["state"])
    entries = [v for v in dcp["state"].values() if isinstance(v, dict) and GLOBAL_KEY in v]
    assert len(entries) == 1
    assert torch.equal(_packed(dcp)["psd"]["count"], plain["state"]["psd"]["count"])
    for sd in (plain, opt.state_dict()):
        opt2 = PSD(net.parameters(), lr=0.1, epsilon=1e3, radius=0.1, episode_length=1, seed=5)
        opt2.load_state_dict(sd)
        assert int(opt2.psd_state.count) == int(opt.psd_state.count)
        assert torch.equal(opt2.generator.get_state(), opt.generator.get_state())


@pytest.mark.parametrize("name", ["PSD", "PerturbedAdam", "SAM_SPS"])
def test_dcp_state_dict_round_trip_resumes_exactly(fsdp_results, name: str) -> None:
    for res in fsdp_results:
        r = res[name]
        for a, b in zip(r["resumed"], r["params"]):
            assert torch.equal(a, b)
        if "gen" in r:
            assert torch.equal(*r["gen"])
        # SAM_SPS's counters exist from __init__, so DCP never takes its
        # step(closure=None) initialization (which SAM_SPS would refuse).
        assert r["dcp_error"] is None
