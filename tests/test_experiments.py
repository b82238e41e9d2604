"""Smoke test of ``psd-experiments --quick`` (the CI run) and the qualitative claims.

The quick suite is run once (module fixture, ~2 minutes on 2 CPU cores); the
tests then read its CSVs back and check structure and the claims the README
makes: PSD below the GD cap on every escape problem, linear convergence of
deterministic USAM-SPS on interpolated ridge regression, the SAM-SPS plateau at
fixed rho, every per-episode decrease above the theory's prediction. The
cross-backend test compares a NumPy run with a PyTorch run given the same draws.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from psd_experiments import EXPERIMENTS
from psd_experiments.__main__ import main
from psd_experiments._common import read_csv
from psd_experiments.docs import build

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    rc = main(["--quick", "--out", str(out), "--no-progress"])
    return rc, str(out)


def _csv(out: str, name: str) -> list[dict[str, str]]:
    return read_csv(os.path.join(out, f"{name}.csv"))


def test_quick_suite_succeeds_and_writes_files(quick_run):
    rc, out = quick_run
    assert rc == 0
    for name in EXPERIMENTS:
        for ext in ("csv", "png"):
            path = os.path.join(out, f"{name}.{ext}")
            assert os.path.getsize(path) > 0, path
        with open(os.path.join(out, f"{name}.png"), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = open(os.path.join(out, "summary.md")).read()
    for name in EXPERIMENTS:
        assert f"![{name}]({name}.png)" in summary
    assert "published (synthetic)" in summary
    assert "FAILED" not in summary


def test_escape_table_structure_and_claims(quick_run):
    _, out = quick_run
    rows = _csv(out, "escape_table")
    assert list(rows[0]) == [
        "problem",
        "method",
        "grad_evals",
        "ci_low",
        "ci_high",
        "success_rate",
        "final_value",
        "runs",
    ]
    problems = ["Quartic-10", "Quartic-100", "Rosenbrock-10", "Random-100"]
    methods = ["GD", "PGD", "PSD", "PSD-Probe", "PSD-HVP"]
    assert [(r["problem"], r["method"]) for r in rows] == [
        (p, m) for p in problems for m in methods
    ]
    by = {(r["problem"], r["method"]): r for r in rows}
    for p in problems:
        psd = by[(p, "PSD")]
        assert float(psd["success_rate"]) == 1.0
        assert float(psd["grad_evals"]) < 50_000
        assert float(psd["ci_low"]) <= float(psd["grad_evals"]) <= float(psd["ci_high"])
    # GD started exactly at a stationary saddle never moves: it hits the cap.
    for p in ("Quartic-10", "Quartic-100", "Random-100"):
        assert float(by[(p, "GD")]["grad_evals"]) == 50_000
        assert float(by[(p, "GD")]["success_rate"]) == 0.0
    # Random unit probes cannot see the single negative eigenvalue of Random-100;
    # the Lanczos (HVP) probe can.
    assert float(by[("Random-100", "PSD-Probe")]["success_rate"]) < 1.0
    assert float(by[("Random-100", "PSD-HVP")]["success_rate"]) == 1.0
    # the escaped quartic runs end in a minimum (f* = -d/4)
    assert float(by[("Quartic-10", "PSD")]["final_value"]) == pytest.approx(-2.5, abs=1e-4)


def test_dimension_scaling(quick_run):
    _, out = quick_run
    rows = _csv(out, "dimension_scaling")
    assert list(rows[0])[:4] == ["problem", "dim", "method", "runs"]
    for r in rows:
        if r["method"] == "PSD":
            assert float(r["success_rate"]) == 1.0
            # a measured escape is far shorter than the worst-case episode length
            assert 0 < float(r["episode_steps_mean"]) < int(r["T_theory"])
            assert math.isclose(float(r["log_d"]), math.log(int(r["dim"])), rel_tol=1e-5)


def test_episode_decrease_above_prediction(quick_run):
    _, out = quick_run
    rows = _csv(out, "episode_decrease")
    assert rows
    for r in rows:
        dec, pred = float(r["decrease"]), float(r["predicted"])
        assert math.isclose(
            dec, float(r["f_start"]) - float(r["f_end"]), rel_tol=1e-4, abs_tol=1e-9
        )
        assert pred == pytest.approx(float(r["epsilon"]) ** 2 / 128 / _ell(r["problem"]), rel=1e-3)
        assert dec >= pred and r["success"] == "True"


def _ell(problem: str) -> float:
    from psd_core import functions as F

    if problem.startswith("quartic"):
        return 10.0
    if problem.startswith("coupled"):
        return F.coupled_quartic(int(problem.split("-")[1])).ell
    d = int(problem.split("-")[1])
    return F.gaussian_wells(d, 5 if d == 2 else 8, seed=0).ell


def test_sam_sps_ridge_claims(quick_run):
    _, out = quick_run
    rows = _csv(out, "sam_sps_ridge")
    det = {(r["method"], r["rho"]): r for r in rows if r["regime"] == "deterministic"}
    for rho in ("0.01", "0.1"):
        u = det[("USAM-SPS", rho)]
        # linear convergence to machine precision on the interpolated problem
        assert float(u["final_value"]) < 1e-10
        assert float(u["rate"]) < 0.95
        s = det[("SAM-SPS", rho)]
        # what the data shows for normalized SAM-SPS at fixed rho: a plateau at O(rho^2)
        assert 1e-3 * float(rho) ** 2 < float(s["final_value"]) < 1e2 * float(rho) ** 2
    assert {r["regime"] for r in rows} == {"deterministic", "stochastic"}
    assert {"USAM-SPS", "SAM-SPS", "USAM-const", "USAM-AF"} <= {r["method"] for r in rows}


def test_bakeoff(quick_run):
    _, out = quick_run
    rows = _csv(out, "bakeoff")
    assert [r["method"] for r in rows] == [
        "GD",
        "Momentum",
        "Langevin",
        "Newton",
        "CondScaledGD",
        "BFGS",
        "Adam",
        "PSD",
        "SAM-SPS",
    ]
    for r in rows:
        assert 0.0 <= float(r["frac_global_well"]) <= 1.0
        assert float(r["wall_time_s"]) > 0 and int(r["starts"]) == 500
        assert np.isfinite(float(r["final_mean_loss"]))


def test_digits(quick_run):
    _, out = quick_run
    rows = _csv(out, "digits")
    names = [(r["method"], r["rho"]) for r in rows]
    for rho in ("0.05", "0.1", "0.2"):
        assert ("SAM-SPS", rho) in names and ("USAM-SPS", rho) in names
    assert {"SGD (tuned lr)", "SGD+cosine", "Adam", "PSD", "PerturbedAdam"} <= {
        r["method"] for r in rows
    }
    for r in rows:
        assert r["implementation"]
        assert 0.5 < float(r["test_acc_mean"]) <= 1.0


def test_escape_numpy_matches_torch():
    """The same seed gives the same run on NumPy and PyTorch inputs (same host draws)."""
    from psd_experiments.escape import problem_setup, run_method

    setup = problem_setup("Quartic-10", 0)
    for method in ("PSD", "PSD-HVP", "PGD"):
        a = run_method(method, setup, 3, 50_000, "numpy")
        b = run_method(method, setup, 3, 50_000, "torch")
        assert a[:2] == b[:2]
        assert a[2] == pytest.approx(b[2], abs=1e-12)


def test_cli_failure_exit_code(tmp_path, monkeypatch):
    monkeypatch.setitem(EXPERIMENTS, "episode_decrease", "psd_experiments.does_not_exist")
    assert (
        main(["--quick", "--only", "episode_decrease", "--out", str(tmp_path), "--no-progress"])
        == 1
    )
    assert "FAILED" in open(tmp_path / "summary.md").read()
    with pytest.raises(SystemExit):
        main(["--only", "no_such_experiment"])


def test_docs_page(quick_run, tmp_path):
    _, out = quick_run
    page = build(out, str(tmp_path / "results.md"))
    text = open(page).read()
    assert "![digits](results_figures/digits.png)" in text
    assert (tmp_path / "results_figures" / "escape_table.png").exists()
