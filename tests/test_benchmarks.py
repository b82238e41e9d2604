"""Smoke runs of the benchmark scripts on tiny problems.

The numbers of a tiny run mean nothing (timings are never asserted: the machines
are noisy); these tests keep the scripts working and check that every documented
row is printed with a positive, finite ratio.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 2 and not set(cells[-1]) <= set("-:"):
            rows[cells[0]] = cells[1:]
    return rows


def ratios(cells: list[str]) -> list[float]:
    return [float(c[:-1]) for c in cells if re.fullmatch(r"[0-9.]+x", c)]


def test_bench_optax_prints_every_row():
    pytest.importorskip("optax")
    text = run(
        "bench_optax.py", "--params", "20000", "--leaves", "4", "--steps", "1", "--repeats", "1"
    )
    rows = table_rows(text)
    expected = {
        "sgd": "sgd",
        "psd": "sgd",
        "psd (fused)": "sgd",
        "polyak_sgd": "sgd",
        "sam_sps": "sgd",
        "contrib.sam": "sgd",
        "adam": "adam",
        "adam + update norm": "adam",
        "apply_if_finite(adam)": "adam",
        "perturbed_adam": "adam",
        "perturbed_adam (fused)": "adam",
    }
    assert {k: v[0] for k, v in rows.items() if k != "optimizer"} == expected
    for name in expected:
        r = ratios(rows[name])
        assert len(r) == 2 and all(math.isfinite(x) and x > 0 for x in r), (name, rows[name])
    assert ratios(rows["sgd"]) == [1.0, 1.0] and ratios(rows["adam"]) == [1.0, 1.0]
    assert "psd (fused) / polyak_sgd (donated):" in text


def test_bench_torch_prints_every_row_and_state_memory():
    pytest.importorskip("torch")
    text = run(
        "bench_torch.py", "--params", "20000", "--tensors", "4", "--steps", "2", "--warmup", "1"
    )
    rows = table_rows(text)
    ours = {
        "torch.optim.SGD(foreach=True)": 0.0,
        "torch.optim.Adam(foreach=True)": 2.0,
        "psd_torch.PSD (gate closed)": 0.0,
        "psd_torch.PSD (perturbs every step, ball)": 0.0,
        "psd_torch.PerturbedAdam (no perturbation)": 2.0,
        "psd_torch.SAM_SPS (optimizer work)": 1.0,
    }
    for name, extra_state in ours.items():
        cells = rows[name]
        assert float(cells[1]) > 0 and math.isfinite(float(cells[1])), (name, cells)
        # parameter-sized state held by the optimizer, in parameter bytes (deterministic)
        assert float(cells[-1]) == pytest.approx(extra_state, abs=0.01), (name, cells)
    assert float(rows["torch.optim.SGD(foreach=True)"][1]) == 1.0


def test_bench_torch_cpu_clock_and_threads_options():
    pytest.importorskip("torch")
    text = run(
        "bench_torch.py",
        *("--params", "20000", "--tensors", "4", "--steps", "2", "--warmup", "1"),
        *("--threads", "1", "--clock", "cpu", "--floor"),
    )
    assert "1 threads" in text and "cpu clock" in text and "nice" in text
    rows = table_rows(text)
    assert float(rows["torch.optim.SGD(foreach=True)"][1]) == 1.0
    assert float(rows["psd_torch.SAM_SPS (optimizer work)"][1]) > 0
    # the plain-torch floors: timed, and the SAM-SPS floor holds one x buffer (1x)
    floors = {k: v for k, v in rows.items() if k.startswith("floor: ")}
    assert len(floors) == 2
    for name, cells in floors.items():
        assert float(cells[1]) > 0 and math.isfinite(float(cells[1])), (name, cells)
    assert [float(c[-1]) for c in floors.values()] == [0.0, 1.0]


def test_sam_sps_passes_prints_each_pass_and_the_sweep():
    pytest.importorskip("torch")
    out = run(
        "sam_sps_passes.py",
        "--params",
        "40000",
        "--tensors",
        "4",
        "--rounds",
        "2",
        "--chunks",
        "4096,65536",
    )
    rows = table_rows(out)
    names = [
        "SGD(foreach) step",
        "pass 1: squared norm of g",
        "pass 2: stash x, x -> e",
        "pass 3: squared norm of g_e, <g_e, e - x>",
        "pass 4: restore and descend",
        "sum of the four passes",
        "sum, chunk 4096",
        "sum, chunk 65536",
    ]
    for name in names:
        assert name in rows, (name, out)
        ms, ratio = (float(c) for c in rows[name])
        assert ms > 0 and math.isfinite(ratio) and ratio > 0, (name, rows[name])
    assert float(rows["SGD(foreach) step"][1]) == 1.0
    parts = sum(float(rows[n][0]) for n in names[1:5])
    assert math.isclose(float(rows["sum of the four passes"][0]), parts, rel_tol=0.02, abs_tol=0.02)
