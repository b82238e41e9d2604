"""Smoke test of ``psd-experiments --quick`` (the CI run) and the qualitative claims.

The quick suite is run once (module fixture, ~2 minutes on 2 CPU cores); the
tests then read its CSVs back and check structure and the claims the README
makes: PSD below the GD cap on every escape problem, every per-episode decrease above
the theory's prediction (the ridge / SAM-SPS claims: tests/test_experiments_ridge.py). The
cross-backend test compares a NumPy run with a PyTorch run given the same draws.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from psd_core.theory import psd_constants
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
        "stop_evals",
        "stop_ci_low",
        "stop_ci_high",
        "stop_rate",
        "escape_evals",
        "escape_ci_low",
        "escape_ci_high",
        "escape_rate",
        "perturbations",
        "final_value",
        "runs",
    ]
    problems = ["Quartic-10", "Random-100"]  # the quick subset
    methods = ["GD", "PGD", "PSD", "PSD-Probe", "PSD-HVP"]
    assert [(r["problem"], r["method"]) for r in rows] == [
        (p, m) for p in problems for m in methods
    ]
    by = {(r["problem"], r["method"]): r for r in rows}
    for p in problems:
        psd = by[(p, "PSD")]
        assert float(psd["escape_rate"]) == 1.0
        assert (
            float(psd["escape_ci_low"])
            <= float(psd["escape_evals"])
            <= float(psd["escape_ci_high"])
        )
    q = by[("Quartic-10", "PSD")]
    # PSD's own stopping rule: T = 14,639 steps after its one perturbation, far after the escape
    assert float(q["stop_rate"]) == 1.0 and float(q["perturbations"]) == 1.0
    assert float(q["stop_evals"]) > 14_639 > 100 * float(q["escape_evals"]) / 10
    # PGD (Jin et al.) stops by its f_thres test: one extra perturbation at the minimum
    pgd = by[("Quartic-10", "PGD")]
    assert float(pgd["stop_rate"]) == 1.0 and float(pgd["perturbations"]) == 2.0
    assert pgd["stop_evals"] != q["stop_evals"]
    # GD started exactly at a stationary saddle never moves and has no stopping rule
    for p in problems:
        assert float(by[(p, "GD")]["escape_rate"]) == 0.0
    # Random-100 has no second-order point: stop_evals is n/a; random unit probes
    # wrongly certify the saddle (stop fires, no escape), the Lanczos probe escapes.
    assert math.isnan(float(by[("Random-100", "PSD")]["stop_evals"]))
    assert float(by[("Random-100", "PSD-Probe")]["escape_rate"]) < 1.0
    assert float(by[("Random-100", "PSD-HVP")]["escape_rate"]) == 1.0
    assert float(by[("Quartic-10", "PSD")]["final_value"]) == pytest.approx(-2.5, abs=1e-4)


def test_pgd_jin_follows_algorithm_2():
    """pgd_jin against a hand transcription of Jin et al. (2017), Algorithm 2 (same draws)."""
    from psd_core import functions as F
    from psd_core import solvers as S

    p = F.separable_quartic(4)
    c = S.jin_pgd_constants(1e-2, p.ell, p.rho, dim=4)
    res = S.pgd_jin(
        p,
        p.saddle(),
        lr=c.lr,
        g_thres=c.g_thres,
        t_thres=c.t_thres,
        f_thres=c.f_thres,
        radius=c.radius,
        seed=5,
        max_grad_evals=100_000,
    )
    rng = np.random.default_rng(5)  # HostDraws(seed): normals then one uniform per perturbation
    x, t_noise, evals, xt = p.saddle(), -c.t_thres - 1, 0, None
    for t in range(100_000):
        g = p.grad(x)
        evals += 1
        if xt is not None and t - t_noise == c.t_thres and p.value(x) - p.value(xt) > -c.f_thres:
            break
        if np.linalg.norm(g) <= c.g_thres and t - t_noise > c.t_thres:
            xt, t_noise = x, t
            z = rng.standard_normal(4)
            u = rng.random()
            x = x + c.radius * u ** (1 / 4) * z / np.linalg.norm(z)
            continue
        x = x - c.lr * g
    assert res.converged and res.grad_evals == evals
    np.testing.assert_allclose(np.asarray(res.x), xt, rtol=0, atol=1e-12)


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
        # an episode is its perturbation plus at most T steps, not the whole descent
        eps = float(r["epsilon"])
        p = _problem(r["problem"])
        assert int(r["steps"]) <= psd_constants(eps, p.ell, p.rho, dim=p.dim).episode_length + 1
    # the perturbation is what clears the prediction: the same steps from the saddle
    # without it stay below (this fails if an episode's decrease is only the descent)
    controls = [r for r in rows if r["control_decrease"] not in ("", "nan")]
    assert controls
    for r in controls:
        assert float(r["control_decrease"]) < float(r["predicted"]) <= float(r["decrease"])


def _problem(name: str):
    from psd_core import functions as F

    kind, d = name.split("-")
    if kind == "quartic":
        return F.separable_quartic(int(d))
    if kind == "coupled_quartic":
        return F.coupled_quartic(int(d))
    return F.gaussian_wells(int(d), 5 if d == "2" else 8, seed=0)


def _ell(problem: str) -> float:
    from psd_core import functions as F

    if problem.startswith("quartic"):
        return 10.0
    if problem.startswith("coupled"):
        return F.coupled_quartic(int(problem.split("-")[1])).ell
    d = int(problem.split("-")[1])
    return F.gaussian_wells(d, 5 if d == 2 else 8, seed=0).ell


# sam_sps_ridge (the SAM-SPS paper's Section 4.1): its columns, figures and claims are checked
# in tests/test_experiments_ridge.py, which runs that experiment alone.


def test_ridge_cond_A_is_the_papers_setup():
    from psd_core import functions as F

    p = F.ridge_regression(100, 100, cond_A=10.0, seed=0)
    assert np.allclose(p.A, p.A.T) and np.all(np.linalg.eigvalsh(p.A) > 0)
    assert np.linalg.cond(p.A) == pytest.approx(10.0, rel=1e-9)
    assert p.L / p.mu == pytest.approx(100.0, rel=1e-9)
    old = F.ridge_regression(100, 100, cond=10.0, seed=0)  # unchanged default
    assert old.L / old.mu == pytest.approx(10.0, rel=1e-9)
    with pytest.raises(ValueError, match="cond_A"):
        F.ridge_regression(50, 100, cond_A=10.0)


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
        assert int(r["starts"]) == 500
        assert "wall_time_s" not in r
        assert (r["perturbations_per_start"] != "") == (r["method"] == "PSD")
        assert np.isfinite(float(r["final_mean_loss"]))


def test_digits(quick_run):
    _, out = quick_run
    rows = _csv(out, "digits")
    assert list(rows[0]) == [
        "method",
        "rho",
        "lr",
        "implementation",
        "seeds",
        "test_acc_mean",
        "test_acc_std",
        "final_train_loss",
        "epochs",
        "steps",
        "perturbations",
        "episodes",
        "min_batch_grad_norm",
    ]
    names = [(r["method"], r["rho"]) for r in rows]
    for rho in ("0.05", "0.1", "0.2"):
        assert ("SAM-SPS", rho) in names and ("USAM-SPS", rho) in names
    methods = {r["method"] for r in rows}
    assert {"SGD (tuned lr)", "SGD+cosine", "Adam (tuned lr)", "PSD", "PerturbedAdam"} <= methods
    for r in rows:
        assert r["implementation"]
        assert 0.3 < float(r["test_acc_mean"]) <= 1.0
        assert int(r["seeds"]) >= 2  # intervals do not collapse, even in --quick
        if r["method"] in ("PSD", "PerturbedAdam"):
            assert float(r["perturbations"]) >= 0 and r["episodes"] != ""
    summary = open(os.path.join(out, "summary.md")).read()
    by = {r["method"]: r for r in rows}
    for m, twin in (("PSD", "SGD (tuned lr)"), ("PerturbedAdam", "Adam (tuned lr)")):
        if float(by[m]["perturbations"]) == 0:
            assert f"{m} never perturbed" in summary and f"Its row IS {twin}" in summary
            assert by[m]["test_acc_mean"] == by[twin]["test_acc_mean"]


def test_sam_sps_digits(quick_run):
    _, out = quick_run
    rows = _csv(out, "sam_sps_digits")
    assert list(rows[0]) == [
        "base",
        "schedule",
        "rho",
        "lr",
        "seeds",
        "test_acc_mean",
        "test_acc_std",
        "final_train_loss",
        "epochs",
    ]
    keys = {(r["base"], r["schedule"], r["rho"]) for r in rows}
    for base in ("USAM", "SAM"):
        for sched in ("constant (tuned)", "cosine", "SPS"):
            for rho in ("0.1", "0.4"):
                assert (base, sched, rho) in keys
    summary = open(os.path.join(out, "summary.md")).read()
    assert "published CIFAR-100 range (SPEC)" in summary and "91.6-92.2" in summary


def test_real_saddles(quick_run):
    _, out = quick_run
    rows = _csv(out, "real_saddles")
    assert list(rows[0]) == [
        "model",
        "framework",
        "method",
        "seeds",
        "half_steps",
        "half_ci_low",
        "half_ci_high",
        "half_rate",
        "final_loss",
        "final_ci_low",
        "final_ci_high",
        "perturbations",
        "steps",
    ]
    by = {(r["model"], r["framework"], r["method"]): r for r in rows}
    for fw in ("torch", "optax (jit)"):
        for m in ("SGD", "PSD", "Adam", "PerturbedAdam"):
            for model in ("deep_linear", "matrix_factorization"):
                assert int(by[(model, fw, m)]["seeds"]) >= 2
        # from W = 0 the gradient is exactly zero: SGD and Adam never move, PSD does
        assert float(by[("deep_linear", fw, "SGD")]["half_rate"]) == 0.0
        assert float(by[("deep_linear", fw, "Adam")]["half_rate"]) == 0.0
        assert float(by[("deep_linear", fw, "PSD")]["perturbations"]) >= 1
        assert float(by[("deep_linear", fw, "SGD")]["perturbations"]) == 0


def test_psgd_noise(quick_run):
    _, out = quick_run
    rows = _csv(out, "psgd_noise")
    assert list(rows[0]) == [
        "sigma_sq",
        "batch_size",
        "gate_threshold",
        "seeds",
        "escape_rate",
        "escape_grad_evals",
        "ci_low",
        "ci_high",
        "escape_steps",
        "test_says_escaped",
        "test_agrees",
    ]
    assert float(rows[0]["sigma_sq"]) == 0.0 and int(rows[0]["batch_size"]) == 1
    # B grows with sigma^2 (SPEC's batch size), and so does the gradient cost of an escape
    assert int(rows[-1]["batch_size"]) > int(rows[0]["batch_size"])
    assert float(rows[-1]["escape_grad_evals"]) > float(rows[0]["escape_grad_evals"])
    for r in rows:
        assert 0.0 <= float(r["test_agrees"]) <= 1.0


def test_escape_numpy_matches_torch():
    """The same seed gives the same run on NumPy and PyTorch inputs (same host draws)."""
    from psd_experiments.escape import problem_setup, run_method

    setup = problem_setup("Quartic-10", 0)
    for method in ("PSD-HVP", "PGD"):
        a = run_method(method, setup, 3, 50_000, "numpy")
        b = run_method(method, setup, 3, 50_000, "torch")
        for k in ("stop_evals", "escape_evals", "perturbations"):
            assert a[k] == b[k]
        assert a["final_value"] == pytest.approx(b["final_value"], abs=1e-12)


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
