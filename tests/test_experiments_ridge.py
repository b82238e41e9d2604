"""``psd-experiments --quick --only sam_sps_ridge``: the SAM-SPS paper's Section 4.1.

Runs the ridge experiment alone (about 10 s of CPU) and checks its CSV columns, the
four panel figures plus the overview, the methods of each panel, and the qualitative
claims the results page makes: deterministic USAM-SPS (gamma_b = inf) converges
linearly and ahead of the theory step sizes, normalized SAM-SPS at a fixed radius
plateaus at O(rho^2) while a decreasing rho_t does not, and the stochastic
(mini-batch, regularized) runs stay in a neighbourhood of f*.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from psd_experiments import ridge
from psd_experiments.__main__ import main
from psd_experiments._common import read_csv

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FIGURES = [
    "sam_sps_ridge.png",
    "sam_sps_ridge_theory_det.png",
    "sam_sps_ridge_theory_stoch.png",
    "sam_sps_ridge_adaptive_det.png",
    "sam_sps_ridge_adaptive_stoch.png",
]
THEORY = {"USAM-SPS (gamma_b=1)", "USAM-SPS rho_t", "USAM A&F", "USAM Oikonomou"}
ADAPTIVE = {
    "SAM-SPS",
    "SAM-SPS rho_t",
    "AdaSAM",
    "LightSAM-I",
    "LightSAM-II",
    "LightSAM-III",
    "SA-SAM",
}


@pytest.fixture(scope="module")
def ridge_quick(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ridge"))
    rc = main(["--quick", "--only", "sam_sps_ridge", "--out", out, "--no-progress"])
    assert rc == 0
    return out, read_csv(os.path.join(out, "sam_sps_ridge.csv"))


def _row(rows, panel, regime, method, **match):
    hits = [
        r
        for r in rows
        if (r["panel"], r["regime"], r["method"]) == (panel, regime, method)
        and all(r[k] == v for k, v in match.items())
    ]
    assert len(hits) == 1, (panel, regime, method, match)
    return hits[0]


def test_files_and_columns(ridge_quick):
    out, rows = ridge_quick
    assert list(rows[0]) == ridge.COLUMNS
    import matplotlib.image as mpimg

    shapes = {}
    for name in FIGURES:
        path = os.path.join(out, name)
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", name
        shapes[name] = mpimg.imread(path).shape
    # the overview tiles the four panels 2 x 2
    h, w = shapes["sam_sps_ridge_theory_det.png"][:2]
    assert shapes["sam_sps_ridge.png"][:2] == (2 * h, 2 * w)
    summary = open(os.path.join(out, "summary.md")).read()
    assert "![sam_sps_ridge](sam_sps_ridge.png)" in summary
    for name in FIGURES[1:]:
        assert name in summary


def test_panels_hold_the_papers_methods(ridge_quick):
    _, rows = ridge_quick

    def methods(panel, regime):
        return {r["method"] for r in rows if (r["panel"], r["regime"]) == (panel, regime)}

    det_theory = THEORY | {"USAM-SPS (gamma_b=inf)", "USAM Khanh"}
    assert methods("theory", "deterministic") == det_theory
    assert methods("theory", "stochastic") == THEORY  # Khanh et al.: deterministic only
    assert methods("adaptive", "deterministic") == ADAPTIVE | {"USAM-SPS (gamma_b=inf)"}
    assert methods("adaptive", "stochastic") == ADAPTIVE | {"USAM-SPS (gamma_b=1)"}
    assert {"USAM-SPS", "SAM-SPS", "USAM-const", "USAM-AF"} == methods("grid", "deterministic")
    for r in rows:
        stochastic = r["regime"] == "stochastic"
        assert r["batch_size"] == ("10" if stochastic else "100")
        assert r["seeds"] == ("2" if stochastic else "1")
    steps = int(rows[0]["steps"])
    sa = _row(rows, "adaptive", "stochastic", "SA-SAM")
    assert int(sa["grad_evals"]) == 2 + 3 * (steps - 1)
    assert _row(rows, "adaptive", "stochastic", "AdaSAM")["grad_evals"] == str(2 * steps)


def test_deterministic_claims(ridge_quick):
    _, rows = ridge_quick
    u = _row(rows, "theory", "deterministic", "USAM-SPS (gamma_b=inf)")
    # linear convergence on the interpolated problem (Hessian condition number 100)
    assert float(u["final_rel"]) < 1e-4
    assert float(u["rate"]) < 0.97
    for other in ("USAM A&F", "USAM Khanh", "USAM Oikonomou", "USAM-SPS (gamma_b=1)"):
        assert float(u["final_rel"]) < float(
            _row(rows, "theory", "deterministic", other)["final_rel"]
        )
    # normalized SAM-SPS at a fixed rho: a plateau at O(rho^2) ...
    s = _row(rows, "grid", "deterministic", "SAM-SPS", rho="0.1")
    assert 1e-3 * 0.1**2 < float(s["final_value"]) < 1e2 * 0.1**2
    # ... which a decreasing rho_t removes
    fixed = float(_row(rows, "adaptive", "deterministic", "SAM-SPS")["final_value"])
    decreasing = float(_row(rows, "adaptive", "deterministic", "SAM-SPS rho_t")["final_value"])
    assert decreasing < 1e-2 * fixed


def test_stochastic_neighbourhood(ridge_quick):
    _, rows = ridge_quick
    sps = [r for r in rows if r["regime"] == "stochastic" and "SPS" in r["method"]]
    assert sps
    for r in sps:
        # regularized, not interpolated: a neighbourhood of f*, not f* itself
        assert float(r["final_value"]) > 1e-6
        assert float(r["final_value_std"]) > 0.0  # two mini-batch orders differ
        assert np.isfinite(float(r["final_value"]))
