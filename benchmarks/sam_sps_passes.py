"""Where ``psd_torch.SAM_SPS``'s optimizer step spends its time, pass by pass, next to
``torch.optim.SGD(foreach=True)``, and how the passes cost at smaller chunk sizes.

Issue 16 asks for SAM_SPS <= 4.5x SGD at 10M float32 parameters by fusing passes so that
each reads and writes each parameter byte once. The step is made of four passes (the
gradient's squared norm; stash ``x`` and move to ``e``; ``||g_e||^2`` and
``<g_e, e - x>``; restore and descend), each built from stock ATen kernels. This script
times each pass, interleaved with SGD's step: passes 1 and 3 through the optimizer's own
helpers (``global_sq_norm``, ``sq_norm_and_dot``), passes 2 and 4 as the same stock
kernels it launches (a foreach copy and add; ``torch.addcmul(out=)``), and then the same passes with the parameters cut into smaller chunks
(``--chunks``): a chunk small enough to stay in the L2 cache between two kernels is the
only way stock kernels could share a read, and the sweep shows what each kernel launch
costs at that size.

Usage::

    python benchmarks/sam_sps_passes.py                    # 10M params, 100 tensors
    python benchmarks/sam_sps_passes.py --params 1000000 --rounds 5 --chunks 65536
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from psd_torch import _common as C
from psd_torch import _sam_helpers as H


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median kept)")
    ap.add_argument(
        "--chunks",
        default="8192,32768,131072,262144",
        help=f"chunk sizes (elements) of the sweep; the optimizer's default is {C.CHUNK_NUMEL}",
    )
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    k = args.tensors
    n = args.params // k
    ps = [torch.randn(n, generator=g) for _ in range(k)]
    gs = [1e-3 * torch.randn(n, generator=g) for _ in range(k)]
    ge = [1e-3 * torch.randn(n, generator=g) for _ in range(k)]
    xs = [torch.empty_like(p) for p in ps]
    c = torch.tensor(1e-6)
    cpu = torch.device("cpu")
    scratch: dict = {}

    def sgd() -> None:
        torch._foreach_add_(ps, gs, alpha=-1e-9)

    def norm() -> None:  # ||g||^2, as first_step computes it
        C.global_sq_norm(gs, device=cpu, dtype=torch.float32)

    def stash(m: int) -> None:  # save x, move to e = x + c g (first_step, restore="copy")
        for cp, cx, cg in C.chunked(ps, xs, gs, max_numel=m):
            torch._foreach_copy_(cx, cp)
            torch._foreach_add_(cp, cg, alpha=1e-9)

    def dots(m: int) -> None:  # ||g_e||^2 and <g_e, e - x> in one chunked pass
        saved = C.CHUNK_NUMEL, H.CHUNK_NUMEL
        C.CHUNK_NUMEL = H.CHUNK_NUMEL = m
        try:
            H.sq_norm_and_dot(ge, ps, xs, torch.float32, cpu, diff=True, scratch=scratch)
        finally:
            C.CHUNK_NUMEL, H.CHUNK_NUMEL = saved

    def descend(m: int) -> None:  # p = x + c g_e (second_step's restore-and-descend)
        for cp, cx, cg in C.chunked(ps, xs, ge, max_numel=m):
            for p, x, gg in zip(cp, cx, cg):
                torch.addcmul(x, gg, c, out=p)

    default = C.CHUNK_NUMEL
    rows: dict[str, Callable[[], None]] = {
        "SGD(foreach) step": sgd,
        "pass 1: squared norm of g": norm,
        "pass 2: stash x, x -> e": lambda: stash(default),
        "pass 3: squared norm of g_e, <g_e, e - x>": lambda: dots(default),
        "pass 4: restore and descend": lambda: descend(default),
    }
    sweep = [int(s) for s in args.chunks.split(",") if s]
    for m in sweep:
        rows[f"chunk {m}: pass 2"] = lambda m=m: stash(m)
        rows[f"chunk {m}: pass 3"] = lambda m=m: dots(m)
        rows[f"chunk {m}: pass 4"] = lambda m=m: descend(m)
    times: dict[str, list[float]] = {r: [] for r in rows}
    warm = 3
    for _ in range(args.rounds + warm):
        for name, fn in rows.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {r: statistics.median(ts[warm:]) for r, ts in times.items()}
    base = med["SGD(foreach) step"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.params:,} float32 parameters in {k} tensors, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds "
        f"after {warm}; load average {load:.1f}; default chunk {default} elements\n"
    )
    print("| pass | ms | x SGD(foreach) step |")
    print("|---|---:|---:|")
    for r, m in med.items():
        print(f"| {r} | {m * 1e3:.3f} | {m / base:.2f} |")
    four = [r for r in rows if r.startswith("pass ")]
    total = sum(med[r] for r in four)
    print(f"| sum of the four passes | {total * 1e3:.3f} | {total / base:.2f} |")
    for m in sweep:
        s = sum(med[f"chunk {m}: pass {i}"] for i in (2, 3, 4)) + med["pass 1: squared norm of g"]
        print(f"| sum, chunk {m} | {s * 1e3:.3f} | {s / base:.2f} |")


if __name__ == "__main__":
    main()
