"""Smoke run of benchmarks/bench_curvature.py on tiny problems.

Timings and memory figures are never asserted (the machines are noisy): the test
keeps the script working and checks that every documented row and column is
printed, and that both the Lanczos probe and the dense reference find the known
:math:`\\lambda_{\\min} = -1` of the benchmark's quadratic to the rounding level of
their dtype. The expected value comes from the problem's construction (the spectrum
is set), not from either method.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
# Lanczos with k = 20 on this spectrum converges far below these; they are the
# rounding level of an eigenvalue of size 1 (a few hundred ulps at d = 300).
TOL = {"float32": 1e-4, "float64": 1e-10}


def table(text: str) -> tuple[list[str], list[dict[str, str]]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip().strip("|").split("|")]
    rows = []
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        rows.append(dict(zip(header, cells)))
    return header, rows


def test_bench_curvature_quick_prints_every_row_with_small_error(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "adapters"), env.get("PYTHONPATH", "")]
    )
    stem = tmp_path / "curv"
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_curvature.py"),
            "--quick", "--dims", "300", "--repeats", "1", "--out", str(stem),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    header, rows = table(out.stdout)
    assert header == COLUMNS
    seen = {(r["backend"], r["method"], r["dtype"], r["d"]) for r in rows}
    for d in ("300",):
        for dtype in ("float32", "float64"):
            for backend in ("numpy", "torch", "jax"):
                assert (backend, "min_curvature k=20", dtype, d) in seen
            assert ("numpy", "dense H + eigvalsh", dtype, d) in seen
    assert len(rows) == 8
    for r in rows:
        err = float(r["abs error of lambda_min"])
        assert math.isfinite(err) and err <= TOL[r["dtype"]], r
        best, median = float(r["best s"]), float(r["median s"])
        assert 0 < best <= median, r
        assert r["memory by"] == ("tracemalloc" if r["backend"] == "numpy" else "RSS peak")
        assert (r["compile s"] != "") == (r["backend"] == "jax"), r
    assert "not measured in this run" in out.stdout  # no d = 1e6 row, no verdict
    # --out writes the same table and a JSON with the raw numbers
    assert stem.with_suffix(".md").read_text() == out.stdout.rstrip("\n") + "\n"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert len(data["rows"]) == 8 and data["meta"]["k"] == 20
    for r in data["rows"]:
        assert abs(r["value"] - -1.0) == pytest.approx(r["error"])


def test_bench_curvature_verdict_reads_the_d_1e6_rows():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_curvature as bc
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    row = dict(method="min_curvature k=20", d=bc.TARGET_D, peak_mib=200.0, kd_mib=152.6)
    fast = dict(row, backend="jax", dtype="float64", times=[2.0, 3.0])
    slow = dict(row, backend="numpy", dtype="float32", times=[12.0, 11.0])
    lines = bc.verdict([fast, slow])
    assert "jax float64: best 2.00 s" in lines[0] and "met" in lines[0]
    assert "numpy float32: best 11.00 s" in lines[1] and "MISSED" in lines[1]
    assert "1.31 x k d" in lines[0]
