"""Step-time and memory benchmark of the PyTorch optimizers, side by side in one run.

Measures, on ``--params`` float32 parameters split into ``--tensors`` tensors with
gradients pre-filled, the median time of ``--steps`` optimizer steps (after
``--warmup`` steps) and reports it as a ratio to ``torch.optim.SGD(foreach=True)``
(``PerturbedAdam`` also against ``torch.optim.Adam(foreach=True)``), plus the extra
memory each optimizer holds (bytes of all tensors in ``optimizer.state``) relative to
the parameter bytes.

SAM-SPS variants run ``step(closure)`` with a closure that only re-attaches the
pre-filled gradients and returns a constant loss, so the time is the optimizer's
work (both passes) without forward/backward.

Usage::

    python benchmarks/bench_torch.py                      # 10M params, 100 tensors
    python benchmarks/bench_torch.py --params 1000000 --tensors 10 --steps 5
    python benchmarks/bench_torch.py --threads 1 --clock cpu  # on a shared, loaded machine

``--clock cpu`` times each step with ``time.process_time()`` (CPU time of this
process) instead of the wall clock: on a machine shared with other jobs it leaves out
the time the process waits for a core. Use it with ``--threads 1``: with more threads
it would count the threads' spin-waits. The load average and the process's priority
(``nice``) are printed with the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def make_params(n: int, k: int, device: str) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    sizes = [n // k] * k
    sizes[-1] += n - sum(sizes)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in sizes]
    grads = [1e-3 * torch.randn(s, generator=g).to(device) for s in sizes]
    return params, grads


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0

    def visit(v: Any) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, list | tuple):
            for x in v:
                visit(x)

    for k, v in opt.state.items():
        if isinstance(k, torch.Tensor):  # per-parameter state (global entries are O(1))
            visit(v)
    return total


def floor_psd(
    params: list[torch.Tensor], grads: list[torch.Tensor]
) -> tuple[Callable[[], None], int]:
    """PSD's two passes with nothing else: the global squared norm (a BLAS dot per
    tensor), one host read of its finiteness, ``p += -lr g`` (SGD's foreach op)."""

    @torch.no_grad()
    def step() -> None:
        g2 = torch.stack([torch.dot(g.view(-1), g.view(-1)) for g in grads]).sum()
        if bool(torch.isfinite(g2)):
            torch._foreach_add_(params, grads, alpha=-1e-3)

    return step, 0


def floor_sam_sps(
    params: list[torch.Tensor], grads: list[torch.Tensor]
) -> tuple[Callable[[], None], int]:
    """SAM-SPS in the fewest stock torch kernels per chunk that keep ``x`` bit-exactly
    (1x extra memory), without the core, checks or hooks; the gradient at ``e`` is the
    pre-filled one. Per parameter element, in accesses of the kernels (R read, W write):

    1. ``||g||^2``: dot (R g) -- 1
    2. to ``e``: copy ``x -> buf`` (R p, W buf), ``p += c g`` (R p, R g, W p) -- 5
    3. ``||g_e||^2`` and ``<g_e, e - x>``: ``d = e - x`` into a reused chunk buffer
       (R p, R buf, W d), dot(g, d) (R g, R d), dot(g, g) (R g) -- 6
    4. back and descend: ``p = x + c' g`` with ``out=`` (R buf, R g, W p) -- 3

    15 accesses (SGD: 3); 11 of them reach memory when each chunk stays in cache, the
    least any implementation of these four passes can do.
    """
    from psd_torch._common import chunked

    bufs = [torch.empty_like(p) for p in params]
    tmp = torch.empty(1 << 18, dtype=params[0].dtype, device=params[0].device)

    @torch.no_grad()
    def step() -> None:
        g2 = torch.stack([torch.dot(g.view(-1), g.view(-1)) for g in grads]).sum()
        c = 0.1 / g2.sqrt()
        for cp, cb, cg in chunked(params, bufs, grads):
            torch._foreach_copy_(cb, cp)
            torch._foreach_addcmul_(cp, cg, [c] * len(cp))
        sq, dots = [], []
        for cp, cb, cg in chunked(params, bufs, grads):
            for g, e, x in zip(cg, cp, cb):
                d = torch.sub(e, x, out=tmp[: e.numel()].view(e.shape))
                dots.append(torch.dot(g.view(-1), d.view(-1)))
                sq.append(torch.dot(g.view(-1), g.view(-1)))
        ge2, inner = torch.stack(sq).sum(), torch.stack(dots).sum()
        coef = -((1.0 - inner).clamp_min(0.0) / ge2).clamp_max(1.0)
        for p, x, g in zip(params, bufs, grads):
            torch.addcmul(x, g, coef, out=p)

    return step, sum(b.numel() * b.element_size() for b in bufs)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="add two plain-torch rows: PSD's and SAM-SPS's passes with nothing else",
    )
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    from psd_torch import PSD, PerturbedAdam

    cases: list[tuple[str, str, Callable[[list[torch.nn.Parameter]], Any], str]] = []
    # (name, baseline key, factory, mode)
    cases.append(
        (
            "torch.optim.SGD(foreach=True)",
            "sgd",
            lambda ps: torch.optim.SGD(ps, lr=1e-3, foreach=True),
            "plain",
        )
    )
    cases.append(
        (
            "torch.optim.Adam(foreach=True)",
            "sgd",
            lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
            "plain",
        )
    )
    cases.append(
        (
            "psd_torch.PSD (gate closed)",
            "sgd",
            lambda ps: PSD(ps, lr=1e-3, epsilon=0.0, radius=1e-3, seed=0),
            "plain",
        )
    )
    cases.append(
        (
            "psd_torch.PSD (perturbs every step, ball)",
            "sgd",
            lambda ps: PSD(ps, lr=1e-3, epsilon=1e9, radius=1e-3, episode_length=0, seed=0),
            "plain",
        )
    )
    cases.append(
        (
            "psd_torch.PerturbedAdam (no perturbation)",
            "adam",
            lambda ps: PerturbedAdam(ps, lr=1e-3, g_thres=0.0, seed=0),
            "plain",
        )
    )
    try:
        from psd_torch import SAM_SPS

        cases.append(
            ("psd_torch.SAM_SPS (optimizer work)", "sgd", lambda ps: SAM_SPS(ps), "closure")
        )
    except Exception as exc:  # the SAM_SPS adapter is written separately
        print(f"# psd_torch.SAM_SPS not importable: {exc!r}")
    try:
        from psd.framework_optimizers import PSDTorch

        cases.append(
            (
                "published psd PSDTorch (gate closed)",
                "sgd",
                lambda ps: PSDTorch(ps, lr=1e-3, g_thres=0.0, r=1e-3, max_grad_norm=None),
                "plain",
            )
        )
    except Exception as exc:
        print(f"# psd.framework_optimizers.PSDTorch not importable: {exc!r}")
    try:
        import psd_optimizer

        cases.append(
            (
                "published psd_optimizer.PerturbedAdam",
                "adam",
                lambda ps: psd_optimizer.PerturbedAdam(ps, lr=1e-3, g_thres=1e-12),
                "plain",
            )
        )
    except Exception as exc:
        print(f"# psd_optimizer not importable: {exc!r}")
    try:
        import sam_sps

        cases.append(
            (
                "published sam_sps.SAM_SPS (optimizer work)",
                "sgd",
                lambda ps: sam_sps.SAM_SPS(ps),
                "closure",
            )
        )
    except Exception as exc:
        print(f"# sam_sps not importable: {exc!r}")

    # All optimizers are built first and timed in interleaved rounds (one step of each per
    # round), so that background load affects every row alike.
    param_bytes = args.params * 4
    steppers: dict[str, Callable[[], None]] = {}
    mem: dict[str, float] = {}
    for name, _, factory, mode in cases:
        params, grads = make_params(args.params, args.tensors, args.device)
        for p, g in zip(params, grads):
            p.grad = g
        opt = factory(params)
        if mode == "closure":
            loss = torch.tensor(1.0, device=args.device)

            def closure(
                params: list[torch.nn.Parameter] = params,
                grads: list[torch.Tensor] = grads,
                loss: torch.Tensor = loss,
            ) -> torch.Tensor:
                for p, g in zip(params, grads):
                    p.grad = g
                return loss

            def step(opt: Any = opt, closure: Callable[[], torch.Tensor] = closure) -> None:
                opt.step(closure)

        else:

            def step(opt: Any = opt) -> None:
                opt.step()

        for _ in range(args.warmup):
            step()
        steppers[name] = step
        mem[name] = state_bytes(opt) / param_bytes
    if args.floor:
        for name, make in (
            ("floor: norm + SGD step (plain torch)", floor_psd),
            ("floor: SAM-SPS in 7 stock kernels (plain torch)", floor_sam_sps),
        ):
            params, grads = make_params(args.params, args.tensors, args.device)
            step, extra = make([p.detach() for p in params], grads)
            for _ in range(args.warmup):
                step()
            steppers[name] = step
            mem[name] = extra / param_bytes
            cases.append((name, "sgd", lambda ps: None, "plain"))
    samples: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(args.steps):
        for name, step in steppers.items():
            sync(args.device)
            t0 = clock()
            step()
            sync(args.device)
            samples[name].append(clock() - t0)
    times = {name: statistics.median(v) for name, v in samples.items()}

    sgd = times[cases[0][0]]
    adam = times[cases[1][0]]
    threads = torch.get_num_threads()
    print(
        f"\n{args.params:,} float32 parameters in {args.tensors} tensors, device={args.device}, "
        f"torch {torch.__version__}, {threads} threads, median of {args.steps} interleaved steps after {args.warmup} warmup, {args.clock} clock; load average {os.getloadavg()[0]:.1f}, nice {os.nice(0)}\n"
    )
    print(
        "| optimizer | step (ms) | x SGD(foreach) | x Adam(foreach) | extra state / param bytes |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, base, _, _ in cases:
        t = times[name]
        vs_adam = f"{t / adam:.2f}" if base == "adam" or "Adam" in name else ""
        print(f"| {name} | {t * 1e3:.1f} | {t / sgd:.2f} | {vs_adam} | {mem[name]:.2f} |")


if __name__ == "__main__":
    main()
