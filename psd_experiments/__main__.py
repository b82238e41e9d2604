"""Command line: ``psd-experiments [--quick] [--backend numpy|torch|jax] [--out DIR] [--only NAME ...] [--seed N]``.

Runs the experiments, writes one CSV and one PNG per experiment plus
``summary.md`` into ``--out``, prints a summary table, and exits with status 1
if any experiment failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import resource
import shlex
import sys
import time
import traceback
from collections.abc import Sequence

from . import EXPERIMENTS
from ._common import BACKENDS, RunConfig, markdown_table
from .report import write_summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="psd-experiments",
        description="Run psd-core's experiments for real and write CSVs, figures and summary.md.",
    )
    ap.add_argument(
        "--quick", action="store_true", help="scaled-down suite (< 3 minutes on 2 CPU cores)"
    )
    ap.add_argument(
        "--backend",
        choices=BACKENDS,
        default="numpy",
        help="array library of the synthetic experiments",
    )
    ap.add_argument("--out", default="results", help="output directory (default: results/)")
    ap.add_argument(
        "--only",
        nargs="+",
        choices=sorted(EXPERIMENTS),
        metavar="NAME",
        help=f"run only these experiments: {', '.join(EXPERIMENTS)}",
    )
    ap.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    ap.add_argument("--no-progress", action="store_true", help="disable the progress bars")
    return ap.parse_args(argv)


def _cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its waited-for children.

    On an idle machine a CPU-bound run's wall time is at most its CPU time, so the CPU column
    bounds what the run would take without the load of other jobs."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    import matplotlib

    matplotlib.use("Agg")
    cfg = RunConfig(
        quick=args.quick,
        backend=args.backend,
        seed=args.seed,
        out=args.out,
        progress=not args.no_progress,
    )
    os.makedirs(cfg.out, exist_ok=True)
    names = args.only or list(EXPERIMENTS)
    results, failures, timings, cpu = [], {}, {}, {}
    load_start = os.getloadavg()[0]
    for name in names:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        try:
            mod = importlib.import_module(EXPERIMENTS[name])
            results.append(mod.run(cfg))
        except Exception as exc:  # report and keep going; exit status says it failed
            traceback.print_exc()
            failures[name] = f"{type(exc).__name__}: {exc}"
        timings[name] = time.perf_counter() - t0
        cpu[name] = _cpu_seconds() - c0
    loads = (load_start, os.getloadavg()[0])
    command = "psd-experiments " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    date = datetime.date.today().isoformat()
    summary = write_summary(
        cfg, results, failures, timings, command.strip(), date, cpu=cpu, loads=loads
    )
    width = max(len(n) for n in names)
    print()
    print(f"{'experiment':<{width}}  status  wall(s)   cpu(s)  headline")
    for r in results:
        print(
            f"{r.name:<{width}}  ok      {timings[r.name]:7.1f}  {cpu[r.name]:7.1f}  {r.headline}"
        )
    for name, err in failures.items():
        print(f"{name:<{width}}  FAILED  {timings[name]:7.1f}  {cpu[name]:7.1f}  {err}")
    for r in results:
        for title, cols, rows in r.extra_tables:
            if title.startswith("Ours vs published"):
                print(f"\n{r.name}: {title}")
                print(markdown_table(cols, rows))
    print(
        f"\nCSVs, figures and {summary} written to {cfg.out}/ (total {sum(timings.values()):.1f} s"
        f" wall, {sum(cpu.values()):.1f} s CPU; load average {loads[0]:.1f} at start,"
        f" {loads[1]:.1f} at end)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
