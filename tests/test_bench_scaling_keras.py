"""Smoke runs of benchmarks/bench_scaling.py and benchmarks/bench_keras.py on tiny problems.

Timings are never asserted (the machines are noisy): these tests keep the scripts
working and check that every documented row is printed with a finite, positive
ratio. The Keras script runs one child process per backend; together they get a
budget of ``PSD_BENCH_KERAS_BUDGET_S`` seconds (default 60): a backend that would
start after the budget is spent, or that runs past it, is skipped, not failed.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = float(os.environ.get("PSD_BENCH_KERAS_BUDGET_S", "60"))
_spent = [0.0]


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        separator = all(c and set(c) <= set("-:") for c in cells)
        if line.startswith("| ") and len(cells) > 2 and not separator:
            rows.append(cells)
    return rows


def ratio(cell: str) -> float:
    assert cell.endswith("x"), cell
    return float(cell[:-1])


def test_bench_scaling_prints_every_row_and_the_figure(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    fig = tmp_path / "cost_growth.png"
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_scaling.py"),
            "--sizes", "2000,4000",
            "--tensors", "2",
            "--rounds", "1",
            "--work", "1",
            "--min-steps", "1",
            "--plot", str(fig),
            "--json-out", str(tmp_path / "s.json"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [r for r in table_rows(out.stdout) if r[0] != "framework"]
    seen = {(r[0], r[1], r[3], r[4]) for r in rows}
    expected_names = {
        "torch": {"PSD", "SAM_SPS", "PerturbedAdam"},
        "optax": {"psd", "psd (fused)", "sam_sps", "perturbed_adam", "perturbed_adam (fused)"},
    }
    layouts = {("2 tensors", "2,000"), ("2 tensors", "4,000")}
    for fw, names in expected_names.items():
        for name in names:
            for layout, n in layouts:
                assert (fw, name, layout, n) in seen, (fw, name, layout, n)
            assert any(r[0] == fw and r[1] == name and "MLP" in r[3] for r in rows)
    for r in rows:
        x = ratio(r[7])
        assert math.isfinite(x) and x > 0, r
    mlp = next(r for r in rows if "MLP" in r[3])
    assert mlp[4] == "98,696"  # 20 tensors, about 100k parameters
    assert fig.stat().st_size > 10_000
    # the JSON round trip prints the same table
    again = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_scaling.py"),
            "--json-in",
            str(tmp_path / "s.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert [r for r in table_rows(again.stdout) if r[0] != "framework"] == rows


def test_bench_scaling_train_step_rows():
    """``--train-step``: whole training steps of the 100k MLP, one row per optimizer."""
    pytest.importorskip("torch")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_scaling.py"),
            "--frameworks", "torch",
            "--sizes", "2000",
            "--tensors", "2",
            "--no-mlp",
            "--train-step", "8",
            "--rounds", "1",
            "--work", "1",
            "--min-steps", "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [r for r in table_rows(out.stdout) if r[3] == "MLP train step (batch 8)"]
    assert {r[1] for r in rows} == {"PSD", "SAM_SPS", "PerturbedAdam"}
    for r in rows:
        assert r[4] == "98,696"
        x = ratio(r[7])
        assert math.isfinite(x) and x > 0, r


KERAS_ROWS = {
    "keras SGD": "keras SGD",
    "psd_keras.PSD (gate closed)": "keras SGD",
    "psd_keras.PSD (perturbs every step)": "keras SGD",
    "keras Adam": "keras Adam",
    "psd_keras.PerturbedAdam (no perturbation)": "keras Adam",
    "fit: keras SGD": "fit: keras SGD",
    "fit: psd_keras.PSD (gate closed)": "fit: keras SGD",
    "fit: psd_keras.SAM_SPS (two passes)": "fit: keras SGD",
    "floor: keras SGD + gradient norm": "keras SGD",
    "floor: keras Adam + gradient and direction norms": "keras Adam",
}


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_bench_keras_prints_every_row(backend):
    pytest.importorskip("keras")
    pytest.importorskip(backend)
    left = BUDGET_S - _spent[0]
    if left <= 0:
        pytest.skip(f"the Keras smoke budget of {BUDGET_S:.0f} s is spent (slow machine)")
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "adapters"), env.get("PYTHONPATH", "")]
    )
    args = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_keras.py"),
        "--backend", backend,
        "--params", "2000", "--variables", "3", "--steps", "1", "--rounds", "1",
        "--mlp-in", "8", "--mlp-width", "8", "--mlp-batch", "4", "--mlp-batches", "3",
        "--floor",
    ]  # fmt: skip
    t0 = time.perf_counter()
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=left, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        _spent[0] = BUDGET_S
        pytest.skip(f"bench_keras on {backend} ran past the {BUDGET_S:.0f} s smoke budget")
    finally:
        _spent[0] += time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-4000:]
    rows = {r[0]: r[1:] for r in table_rows(out.stdout) if r[0] != "optimizer"}
    assert {k: v[0] for k, v in rows.items()} == KERAS_ROWS
    for name, cells in rows.items():
        x = ratio(cells[2])
        assert math.isfinite(x) and x > 0, (name, cells)
        if name == KERAS_ROWS[name]:
            assert x == 1.0
    assert f"Keras backend {backend}" in out.stdout
