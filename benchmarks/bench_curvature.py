r"""The curvature probe at scale: ``psd_core.min_curvature`` (Lanczos, k HVPs) vs dense ``eigvalsh``.

The psd reference package tests curvature by building the dense Hessian and calling
``numpy.linalg.eigvalsh``: :math:`O(d^3)` time and :math:`O(d^2)` memory.
``psd_core.min_curvature`` uses ``k`` Hessian-vector products (Lanczos with full
reorthogonalization): :math:`O(k^2 d)` time on top of the HVPs and :math:`O(k d)` memory.

The problem is a quadratic with a known spectrum and an :math:`O(d)` HVP:
:math:`H = Q \operatorname{diag}(\lambda) Q` with the Householder reflection
:math:`Q = I - 2uu^\top` (:math:`\|u\| = 1`, a random dense :math:`u`), so :math:`H` is
dense but :math:`Hv = Q(\lambda \odot Qv)` costs a few passes over :math:`d` numbers.
The spectrum is :math:`\lambda_{\min} = -1` (``--lambda-min``) and :math:`d-1` values
spread evenly over :math:`[\lambda_{\min} + \text{gap}, \lambda_{\max}]` (``--gap``,
``--lambda-max``), so the error of the estimate is :math:`|\hat\lambda - \lambda_{\min}|`.

Rows: ``min_curvature`` on NumPy, PyTorch (eager, ``torch.no_grad``) and JAX (the whole
probe under ``jax.jit``; the compile time is reported apart), in float32 and float64,
at each ``--dims``; and the dense approach (build :math:`H`, ``numpy.linalg.eigvalsh``)
for ``d <= --dense-max``. The start vector ``v0`` is the same NumPy draw for every
backend. Time: best and median of ``--repeats`` calls (``--dense-repeats`` for dense).
Peak memory of one call, two ways: ``tracemalloc`` (NumPy rows only: NumPy reports
its buffers to it; LAPACK's workspace is not counted), and for every row the rise of
the process's peak resident set (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, Linux). So that freed buffers leave the resident set,
memory is measured in a child process started with ``MALLOC_MMAP_THRESHOLD_=65536``
(glibc serves every allocation above 64 KiB by ``mmap`` and returns it on free;
without it glibc keeps recently freed buffers of up to 32 MiB in the heap and a later
call's peak reads low). The times come from this process, with glibc's default
allocator, as a user's run has it: under the fixed threshold every temporary is a
fresh ``mmap`` whose pages fault in on first touch, which made the NumPy and PyTorch
rows at d = 1e6 about 3x slower (2026-12-01). The RSS figure is page-granular: at small ``d`` it is noise. ``k d`` is
the size of the Lanczos basis, :math:`k\,d\,` itemsize bytes; the ``/ kd`` column is
the main peak (tracemalloc for NumPy, RSS otherwise) in those units: O(k d) memory
means a column that stays bounded as ``d`` grows.

Threads: PyTorch and NumPy's BLAS run on ``--torch-threads`` / ``--blas-threads``
threads (default 1: on a loaded 2-core machine, 2 OpenBLAS threads made a
2000 x 2000 ``eigvalsh`` 8x slower than 1; 0 keeps the library's default). XLA's
CPU thread pool is left as it is.

Usage::

    python benchmarks/bench_curvature.py                      # d = 1e3 .. 1e6
    python benchmarks/bench_curvature.py --quick              # d = 1e3, 1e4
    python benchmarks/bench_curvature.py --dims 1e5 --backends numpy,jax --dtypes float32
    python benchmarks/bench_curvature.py --out curvature      # also curvature.md, curvature.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "adapters"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from psd_core import min_curvature  # noqa: E402

TARGET_D = 1_000_000
TARGET_S = 10.0
COLUMNS = [
    "backend",
    "method",
    "dtype",
    "d",
    "best s",
    "median s",
    "compile s",
    "peak MiB",
    "memory by",
    "RSS peak MiB",
    "/ kd",
    "abs error of lambda_min",
]


# ---------------------------------------------------------------- the problem


def spectrum(d: int, lam_min: float, gap: float, lam_max: float) -> np.ndarray:
    """:math:`\\lambda_{\\min}` then ``d - 1`` values evenly over ``[lam_min + gap, lam_max]``."""
    rest = np.linspace(lam_min + gap, lam_max, d - 1) if d > 1 else np.zeros(0)
    return np.concatenate([[lam_min], rest])


def problem(d: int, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(eigenvalues, unit Householder vector ``u``, start vector ``v0``), float64, on the host."""
    rng = np.random.default_rng(args.seed)
    lam = spectrum(d, args.lambda_min, args.gap, args.lambda_max)
    rng.shuffle(lam)  # the negative direction is not a coordinate axis after Q either way
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    v0 = rng.standard_normal(d)
    return lam, u, v0


def make_hvp(xp_dot: Callable[[Any, Any], Any], lam: Any, u: Any) -> Callable[[Any, Any], Any]:
    """:math:`Hv = Q(\\lambda \\odot Qv)`, :math:`Qv = v - 2u\\langle u, v\\rangle`, in ``O(d)``."""

    def hvp(x: Any, v: Any) -> Any:
        qv = v - 2.0 * xp_dot(u, v) * u
        w = lam * qv
        return w - 2.0 * xp_dot(u, w) * u

    return hvp


def dense_hessian(lam: np.ndarray, u: np.ndarray, dtype: Any) -> np.ndarray:
    """:math:`H = Q\\,\\mathrm{diag}(\\lambda)\\,Q` built densely, :math:`O(d^2)` (what the reference does)."""
    lam = lam.astype(dtype)
    u = u.astype(dtype)
    lu = lam * u
    c = u @ lu
    H = np.diag(lam)
    H -= 2.0 * np.outer(u, lu)
    H -= 2.0 * np.outer(lu, u)
    H += (4.0 * c) * np.outer(u, u)
    return H


# ---------------------------------------------------------------- memory probes


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def rss_peak_mib(fn: Callable[[], Any]) -> float | None:
    """Rise of the peak resident set during ``fn()`` in MiB (Linux), ``None`` where unavailable."""
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
        before = _status_kib("VmRSS")
        fn()
        return max(_status_kib("VmHWM") - before, 0) / 1024.0
    except OSError:
        fn()
        return None


def tracemalloc_peak_mib(fn: Callable[[], Any]) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return (peak - base) / 2**20


# ---------------------------------------------------------------- backends


def numpy_runner(lam, u, v0, dtype, k):
    dt = np.dtype(dtype)
    lam_, u_, v0_ = (a.astype(dt) for a in (lam, u, v0))
    x = np.zeros_like(u_)
    hvp = make_hvp(lambda a, b: a @ b, lam_, u_)

    def run():
        r = min_curvature(hvp, x, iters=k, v0=v0_)
        return float(r.value), r

    return run, None


def torch_runner(lam, u, v0, dtype, k):
    import torch

    dt = getattr(torch, dtype)
    lam_, u_, v0_ = (torch.as_tensor(a).to(dt) for a in (lam, u, v0))
    x = torch.zeros_like(u_)
    hvp = make_hvp(torch.dot, lam_, u_)

    def run():
        with torch.no_grad():
            r = min_curvature(hvp, x, iters=k, v0=v0_)
        return float(r.value), r

    return run, None


def jax_runner(lam, u, v0, dtype, k):
    import jax
    import jax.numpy as jnp

    dt = getattr(jnp, dtype)
    lam_, u_, v0_ = (jnp.asarray(a, dtype=dt) for a in (lam, u, v0))
    x = jnp.zeros_like(u_)

    @jax.jit
    def probe(lam_, u_, x, v0_):
        r = min_curvature(make_hvp(jnp.dot, lam_, u_), x, iters=k, v0=v0_)
        return r.value, r.direction  # the direction too, so XLA cannot drop its work

    def run():
        value, direction = probe(lam_, u_, x, v0_)
        jax.block_until_ready(direction)
        return float(value), (value, direction)

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


RUNNERS = {"numpy": numpy_runner, "torch": torch_runner, "jax": jax_runner}


def timed(run: Callable[[], Any], repeats: int) -> tuple[list[float], float]:
    times, value = [], math.nan
    for _ in range(repeats):
        t0 = time.perf_counter()
        value, _ = run()
        times.append(time.perf_counter() - t0)
    return times, value


# ---------------------------------------------------------------- main


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return None


def dense_measure(
    lam: np.ndarray, u: np.ndarray, dtype: str, repeats: int
) -> tuple[list[float], float, float, float | None]:
    """(times, lambda_min, tracemalloc peak MiB, RSS peak MiB) of the dense approach.

    The first call is instrumented for both peaks at once (a dense call is expensive
    and makes a few large allocations, so tracing them costs nothing measurable).
    """
    times: list[float] = []
    values: list[float] = []

    def dense() -> None:
        t0 = time.perf_counter()
        H = dense_hessian(lam, u, np.dtype(dtype))
        ev = np.linalg.eigvalsh(H)
        del H
        times.append(time.perf_counter() - t0)
        values.append(float(ev[0]))

    peaks: list[float] = []
    rss = rss_peak_mib(lambda: peaks.append(tracemalloc_peak_mib(dense)))
    for _ in range(repeats - 1):
        dense()
    return times, values[0], peaks[0], rss


def measure(args: argparse.Namespace, memory: bool = True) -> dict[str, Any]:
    """Rows of the whole grid. ``memory=False``: no memory columns and no dense rows (those
    come whole from the memory child: the dense approach is compute-bound, so its time
    does not depend on the allocator)."""
    rows: list[dict[str, Any]] = []
    k = args.k
    for d in args.dims:
        lam, u, v0 = problem(d, args)
        lam_min = float(lam.min())
        for dtype in args.dtypes:
            itemsize = np.dtype(dtype).itemsize
            kd_mib = k * d * itemsize / 2**20
            for backend in args.backends:
                run, compile_s = RUNNERS[backend](lam, u, v0, dtype, k)
                times, value = timed(run, args.repeats)
                rss = rss_peak_mib(run) if memory else None
                if not memory:
                    peak, how = None, ""
                elif backend == "numpy":
                    peak, how = tracemalloc_peak_mib(run), "tracemalloc"
                else:
                    peak, how = rss, "RSS peak"
                rows.append(
                    dict(
                        backend=backend,
                        method=f"min_curvature k={k}",
                        dtype=dtype,
                        d=d,
                        times=times,
                        compile_s=compile_s,
                        peak_mib=peak,
                        memory_by=how,
                        rss_peak_mib=rss,
                        kd_mib=kd_mib,
                        value=value,
                        error=abs(value - lam_min),
                        load=load_average(),
                    )
                )
                print_row(rows[-1], file=sys.stderr)
                del run
                gc.collect()
            if memory and d <= args.dense_max:
                times, value, peak, rss = dense_measure(lam, u, dtype, args.dense_repeats)
                rows.append(
                    dict(
                        backend="numpy",
                        method="dense H + eigvalsh",
                        dtype=dtype,
                        d=d,
                        times=times,
                        compile_s=None,
                        peak_mib=peak,
                        memory_by="tracemalloc",
                        rss_peak_mib=rss,
                        kd_mib=kd_mib,
                        value=value,
                        error=abs(value - lam_min),
                        load=load_average(),
                    )
                )
                print_row(rows[-1], file=sys.stderr)
                gc.collect()
    return dict(meta=meta(args), rows=rows)


def meta(args: argparse.Namespace) -> dict[str, Any]:
    versions = {"numpy": np.__version__}
    for name in args.backends:
        if name != "numpy":
            mod = __import__(name)
            versions[name] = mod.__version__
    threads = None
    if "torch" in args.backends:
        import torch

        threads = torch.get_num_threads()
    blas = None
    try:
        from threadpoolctl import threadpool_info

        blas = [i.get("num_threads") for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:  # pragma: no cover
        pass
    return dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        versions=versions,
        torch_threads=threads,
        blas_threads=blas,
        malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        k=args.k,
        spectrum=dict(lambda_min=args.lambda_min, gap=args.gap, lambda_max=args.lambda_max),
        repeats=args.repeats,
        dense_repeats=args.dense_repeats,
        argv=sys.argv[1:],
    )


def fmt(x: float | None, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def cells(r: dict[str, Any]) -> list[str]:
    t = r["times"]
    peak = r["peak_mib"]
    per_kd = None if peak is None else peak / r["kd_mib"]
    return [
        r["backend"],
        r["method"],
        r["dtype"],
        f"{r['d']:,}",
        fmt(min(t), ".4f"),
        fmt(statistics.median(t), ".4f"),
        fmt(r["compile_s"], ".2f"),
        fmt(peak, ".1f"),
        r["memory_by"],
        fmt(r.get("rss_peak_mib"), ".1f"),
        fmt(per_kd, ".2f"),
        f"{r['error']:.2e}",
    ]


def print_row(r: dict[str, Any], file: Any = sys.stdout) -> None:
    print("| " + " | ".join(cells(r)) + " |", file=file, flush=True)


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    at = [r for r in rows if r["d"] == TARGET_D and r["method"].startswith("min_curvature")]
    if not at:
        return [f"Target (d = {TARGET_D:,} in under {TARGET_S:g} s): not measured in this run."]
    for r in at:
        best = min(r["times"])
        ok = "met" if best < TARGET_S else "MISSED"
        lines.append(
            f"- {r['backend']} {r['dtype']}: best {best:.2f} s at d = {TARGET_D:,} "
            f"(target < {TARGET_S:g} s: {ok}); peak {fmt(r['peak_mib'], '.0f')} MiB "
            f"= {fmt(None if r['peak_mib'] is None else r['peak_mib'] / r['kd_mib'], '.2f')}"
            f" x k d"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    sp = m["spectrum"]
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    head = (
        f"{m['date']}, {m['machine']}, {vers}"
        + (f", torch threads {m['torch_threads']}" if m["torch_threads"] else "")
        + (f", BLAS threads {m['blas_threads']}" if m.get("blas_threads") else "")
        + f". k = {m['k']} HVPs; spectrum: lambda_min = {sp['lambda_min']:g}, the other d - 1"
        f" eigenvalues evenly in [{sp['lambda_min'] + sp['gap']:g}, {sp['lambda_max']:g}]"
        f" (H = Q diag(lambda) Q, Q a Householder reflection). Best and median of"
        f" {m['repeats']} calls ({m['dense_repeats']} for dense)."
    )
    lines = [head, "", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|")
    lines += ["| " + " | ".join(cells(r)) + " |" for r in result["rows"]]
    lines += ["", *verdict(result["rows"])]
    return "\n".join(lines) + "\n"


def parse_dims(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=parse_dims, default=None, help="comma list (default 1e3..1e6)")
    ap.add_argument("--quick", action="store_true", help="d = 1e3, 1e4 (unless --dims)")
    ap.add_argument("--k", type=int, default=20, help="Lanczos steps / HVPs (default 20)")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--backends", default="numpy,torch,jax")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-repeats", type=int, default=1)
    ap.add_argument("--dense-max", type=float, default=1e4, help="largest d for the dense rows")
    ap.add_argument("--lambda-min", type=float, default=-1.0)
    ap.add_argument("--gap", type=float, default=1.0)
    ap.add_argument("--lambda-max", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-threads", type=int, default=1, help="0: torch's default")
    ap.add_argument("--blas-threads", type=int, default=1, help="0: OpenBLAS's default")
    ap.add_argument("--out", default=None, help="path stem: writes STEM.md and STEM.json")
    args = ap.parse_args(argv)
    if args.dims is None:
        args.dims = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000]
    args.dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    args.backends = [s.strip() for s in args.backends.split(",") if s.strip()]
    for b in args.backends:
        if b not in RUNNERS:
            raise ValueError(f"--backends: unknown backend {b!r} (choose from {sorted(RUNNERS)})")
    for dt in args.dtypes:
        if dt not in ("float32", "float64"):
            raise ValueError(f"--dtypes: {dt!r} is not float32 or float64")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if "jax" in args.backends:
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 rows; float32 stays float32
    if "torch" in args.backends:
        import torch  # imported before the BLAS limit below, so that it covers torch's BLAS

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
    limits = None
    if args.blas_threads:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            print("threadpoolctl not installed: --blas-threads ignored", file=sys.stderr)
        else:
            limits = threadpool_limits(limits=args.blas_threads, user_api="blas")

    if os.environ.get(_CHILD):
        result = measure(args)
        print(json.dumps(result))
        return result
    mem = memory_rows(sys.argv[1:] if argv is None else list(argv))
    result = measure(args, memory=False)
    result["rows"] = merge_memory(result["rows"], mem)
    result["meta"]["memory_child"] = "MALLOC_MMAP_THRESHOLD_=65536" if mem else None
    if limits is not None:
        limits.restore_original_limits()
    text = markdown(result)
    print(text)
    if args.out:
        stem = Path(args.out)
        if stem.suffix in (".md", ".json"):
            stem = stem.with_suffix("")
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return result


_CHILD = "PSD_BENCH_CURVATURE_MEMORY_CHILD"
_KEY = ("backend", "method", "dtype", "d")


def memory_rows(argv: list[str]) -> list[dict[str, Any]]:
    """The grid's rows measured in a child with ``MALLOC_MMAP_THRESHOLD_=65536`` (Linux;
    elsewhere this process's allocator): the memory columns of the table."""
    if not sys.platform.startswith("linux"):  # pragma: no cover
        return []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", **{_CHILD: "1"})
    out = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            *argv,
            "--repeats",
            "1",
            "--dense-repeats",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["rows"]


def merge_memory(rows: list[dict[str, Any]], mem: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Memory columns from the child's rows; the dense rows from the child, in grid order."""
    by_key = {tuple(m[k] for k in _KEY): m for m in mem}
    for r in rows:
        m = by_key.get(tuple(r[k] for k in _KEY))
        if m is not None:
            for k in ("peak_mib", "memory_by", "rss_peak_mib"):
                r[k] = m[k]
    ours = {tuple(r[k] for k in _KEY) for r in rows}
    merged = []
    for m in mem:  # the child ran the same grid in the same order
        key = tuple(m[k] for k in _KEY)
        merged.append(
            next(r for r in rows if tuple(r[k] for k in _KEY) == key) if key in ours else m
        )
    return merged if mem else rows


if __name__ == "__main__":
    main()
