"""Experiment 4 — the SAM-SPS paper's Section 4.1 (Oikonomou & Loizou), on ridge regression.

:func:`psd_core.functions.ridge_regression` in the paper's setup (and the ``sam_sps``
repository's): :math:`n = d = 100`, :math:`A = PP^\\top` with :math:`\\kappa(A) = 10`
(``cond_A=10``: the Hessian :math:`A^\\top A/n` has condition number 100), started
from :math:`x_0 \\sim N(0, I)` as in the authors' notebook. Two regimes:

* deterministic: full batch (:math:`f_S = f`), consistent labels, no regularization
  (interpolation, :math:`f^* = 0`);
* stochastic: a fresh mini-batch of ``batch_size`` rows per step, noisy labels and a
  ridge penalty (``reg`` = :math:`\\lambda` > 0): no point minimizes every :math:`f_i`,
  so the SPS methods (lower bound :math:`\\ell^* = 0`) converge to a neighbourhood.
  Several seeds (mini-batch orders); curves are the mean with a min-max band.

The paper's four figures, one panel each (``sam_sps_ridge_<panel>_<regime>.png`` and a
2 x 2 overview ``sam_sps_ridge.png``):

* theory comparison: USAM-SPS (:math:`\\lambda = 0`, :math:`\\rho = 1/(2L)`; the
  uncapped deterministic step :math:`\\gamma_b = \\infty` as in the paper, and the
  reference cap :math:`\\gamma_b = 1`) against USAM with the step sizes of
  Andriushchenko & Flammarion (2022), Khanh et al. (2024) and Oikonomou et al. (2025)
  (:mod:`psd_core.solvers` schedule factories) and the best constant step of a grid;
  plus USAM-SPS with a decreasing :math:`\\rho_t = \\rho_0/(t+1)` (Theorem 3.4:
  :math:`\\rho_t \\downarrow 0`);
* adaptive comparison: SAM-SPS / USAM-SPS against AdaSAM, LightSAM-I/II/III and
  SA-SAM (:func:`psd_core.solvers.adasam`, :func:`~psd_core.solvers.lightsam`,
  :func:`~psd_core.solvers.sa_sam`) with the hyperparameters of the authors' notebook.

A ``grid`` panel (not drawn) keeps the fixed-:math:`\\rho` SPS runs with
:math:`\\gamma_b = 1`, the constant-step grid and the decreasing A&F schedule.
``rate`` is :math:`\\exp` of the least-squares slope of :math:`\\log(f - f^*)` against the
step over the steps where :math:`f - f^* > 10^{-13}` (a per-step contraction factor;
< 1 means linear convergence).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from psd_core import functions as F
from psd_core import solvers as S

from ._common import (
    ExperimentResult,
    RunConfig,
    fmt,
    new_figure,
    progress,
    save_figure,
    to_backend,
    to_numpy,
    write_csv,
)

NAME = "sam_sps_ridge"
COLUMNS = [
    "panel",
    "regime",
    "method",
    "lambd",
    "rho",
    "lr",
    "gamma_b",
    "steps",
    "batch_size",
    "seeds",
    "final_value",
    "final_value_std",
    "final_rel",
    "tail_rel",
    "steps_to_tol",
    "final_dist",
    "rate",
    "mean_step_size",
    "grad_evals",
]
PANELS = ("theory", "adaptive")
REGIMES = ("deterministic", "stochastic")
FLOOR = 1e-13
TOL = 1e-8
"""steps_to_tol: the first step where the (seed-mean) relative gap is <= TOL."""
REG = 1e-2
"""Ridge penalty of the stochastic regime (equal to the unregularized Hessian's smallest
eigenvalue; the authors' notebook uses 0.1/n on a problem 10x smaller in scale)."""
BATCH = 10
RHO_T0 = 0.5
"""rho_0 of the decreasing radius rho_t = rho_0 / (t + 1) (= 1/(2L) here)."""

# one colour (and line style) per method, the same in every panel
STYLES = {
    "USAM-SPS (gamma_b=inf)": ("#d62728", "-"),
    "USAM-SPS (gamma_b=1)": ("#ff7f0e", "--"),
    "USAM-SPS rho_t": ("#8c564b", ":"),
    "SAM-SPS": ("#e377c2", "-"),
    "SAM-SPS rho_t": ("#7f7f7f", "--"),
    "USAM A&F": ("#1f77b4", "-"),
    "USAM Khanh": ("#17becf", "--"),
    "USAM Oikonomou": ("#2ca02c", "-"),
    "USAM constant (best of grid)": ("#000000", "-."),
    "AdaSAM": ("#9467bd", "-"),
    "LightSAM-I": ("#bcbd22", "-"),
    "LightSAM-II": ("#393b79", "--"),
    "LightSAM-III": ("#8c6d31", "-."),
    "SA-SAM": ("#00a087", ":"),
}


def fitted_rate(values: list[float], f_star: float, every: int = 1) -> float:
    """Per-step contraction factor fitted on the prefix where f - f* > FLOOR (records
    ``every`` steps apart)."""
    gap = np.asarray(values, dtype=np.float64) - f_star
    ok = np.isfinite(gap) & (gap > FLOOR)
    idx = np.flatnonzero(ok)
    if idx.size < 3:
        return float("nan")
    stop = idx[-1] if np.all(ok[: idx[-1] + 1]) else np.flatnonzero(~ok)[0] - 1
    k = np.arange(stop + 1) * every
    if k.size < 3:
        return float("nan")
    slope = np.polyfit(k, np.log(gap[: stop + 1]), 1)[0]
    return float(math.exp(slope))


def _jobs(problems: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run: panel, regime, method label, solver kind and its arguments."""
    det, sto = problems["deterministic"], problems["stochastic"]
    L, Lm, mu_s = det.L, sto.L_max, sto.mu
    inf = math.inf
    jobs: list[dict[str, Any]] = []

    def add(panel, regime, method, kind, **kw):
        jobs.append(dict(panel=panel, regime=regime, method=method, kind=kind, kw=kw))

    # --- theory, deterministic (the notebook's "Theory Comparison", full batch)
    r = 1.0 / (2.0 * L)
    add("theory", "deterministic", "USAM-SPS (gamma_b=inf)", "sps", rho=r, lambd=0.0, gamma_b=inf)
    add("theory", "deterministic", "USAM-SPS (gamma_b=1)", "sps", rho=r, lambd=0.0, gamma_b=1.0)
    add(
        "theory",
        "deterministic",
        "USAM-SPS rho_t",
        "sps",
        rho=RHO_T0,
        rho_t=True,
        lambd=0.0,
        gamma_b=inf,
    )
    add(
        "theory",
        "deterministic",
        "USAM A&F",
        "sam",
        schedule=S.andriushchenko_flammarion_deterministic_schedule(L),
    )
    add("theory", "deterministic", "USAM Khanh", "sam", schedule=S.khanh_schedule(L))
    add("theory", "deterministic", "USAM Oikonomou", "sam", schedule=S.oikonomou_schedule(L))
    # --- theory, stochastic (A&F decreasing schedule, Oikonomou's stochastic step, USAM-SPS_max)
    add(
        "theory",
        "stochastic",
        "USAM-SPS (gamma_b=1)",
        "sps",
        rho=1.0 / (2.0 * Lm),
        lambd=0.0,
        gamma_b=1.0,
    )
    add(
        "theory",
        "stochastic",
        "USAM-SPS rho_t",
        "sps",
        rho=1.0 / (2.0 * Lm),
        rho_t=True,
        lambd=0.0,
        gamma_b=1.0,
    )
    add(
        "theory",
        "stochastic",
        "USAM A&F",
        "sam",
        schedule=S.andriushchenko_flammarion_schedule(mu_s, Lm),
    )
    add(
        "theory",
        "stochastic",
        "USAM Oikonomou",
        "sam",
        schedule=S.oikonomou_stochastic_schedule(mu_s, Lm),
    )
    # --- adaptive (the notebook's hyperparameters; eps = 1e-12 there)
    ada = {
        "deterministic": dict(
            ada=(1e-2, 0.01), l1=(5.0, 0.1), l2=(0.5, 0.01), l3=(0.01, 0.01), sps_rho=0.1
        ),
        "stochastic": dict(
            ada=(1e-2, 0.01), l1=(5.0, 0.01), l2=(0.5, 0.1), l3=(0.01, 0.001), sps_rho=0.01
        ),
    }
    for regime, h in ada.items():
        gb = inf if regime == "deterministic" else 1.0
        label = "USAM-SPS (gamma_b=inf)" if regime == "deterministic" else "USAM-SPS (gamma_b=1)"
        add("adaptive", regime, label, "sps", rho=h["sps_rho"], lambd=0.0, gamma_b=gb)
        add("adaptive", regime, "SAM-SPS", "sps", rho=h["sps_rho"], lambd=1.0, gamma_b=gb)
        add("adaptive", regime, "SAM-SPS rho_t", "sps", rho=0.1, rho_t=True, lambd=1.0, gamma_b=gb)
        add("adaptive", regime, "AdaSAM", "adasam", lr=h["ada"][0], rho=h["ada"][1], eps=1e-12)
        for v, key in (("I", "l1"), ("II", "l2"), ("III", "l3")):
            lr, rho = h[key]
            add(
                "adaptive",
                regime,
                f"LightSAM-{v}",
                "lightsam",
                lr=lr,
                rho=rho,
                variant=v,
                eps=1e-12,
            )
        add("adaptive", regime, "SA-SAM", "sa_sam", lr0=0.1)
    # --- grid (not drawn): fixed-rho SPS with the reference cap, constant steps, A&F decreasing
    for regime in REGIMES:
        p = problems[regime]
        scale = p.L if regime == "deterministic" else p.L_max
        for rho in (0.01, 0.1):
            add("grid", regime, "USAM-SPS", "sps", rho=rho, lambd=0.0, gamma_b=1.0)
            add("grid", regime, "SAM-SPS", "sps", rho=rho, lambd=1.0, gamma_b=1.0)
        for c in (0.1, 0.5, 1.0):
            add("grid", regime, "USAM-const", "sam", lr=c / scale, rho=0.1)
        add(
            "grid",
            regime,
            "USAM-AF",
            "sam",
            schedule=S.andriushchenko_flammarion_schedule(p.mu, p.L_max),
        )
    return jobs


def _solve(
    job: dict[str, Any], p: Any, x0: Any, steps: int, bsz: int | None, seed: int, every: int
):
    kw = dict(job["kw"])
    common = dict(steps=steps, batch_size=bsz, seed=seed, record_every=every)
    kind = job["kind"]
    if kind == "sps":
        if kw.pop("rho_t", False):
            rho0 = kw.pop("rho")
            kw["rho"] = lambda t, rho0=rho0: rho0 / (1.0 + t)
        return S.sam_sps(p, x0, f_star=0.0, **kw, **common)
    if kind == "sam":
        return S.sam(p, x0, lambd=0.0, **kw, **common)
    if kind == "adasam":
        return S.adasam(p, x0, **kw, **common)
    if kind == "lightsam":
        return S.lightsam(p, x0, **kw, **common)
    if kind == "sa_sam":
        return S.sa_sam(p, x0, **kw, **common)
    raise ValueError(kind)


def _settings(job: dict[str, Any], p: Any) -> tuple[float, float, float, float]:
    """(lambd, rho, lr, gamma_b) for the CSV (nan where the quantity is adaptive)."""
    kw, nan = job["kw"], float("nan")
    if job["kind"] == "sps":
        rho = nan if kw.get("rho_t") else kw["rho"]
        return kw["lambd"], rho, nan, kw["gamma_b"]
    if job["kind"] == "sam":
        if "schedule" in kw:
            lr, rho = kw["schedule"](0)
            if job["method"] == "USAM-AF" or (
                job["method"] == "USAM A&F" and job["regime"] == "stochastic"
            ):
                return 0.0, nan, nan, nan  # decreasing schedule
            return 0.0, rho, lr, nan
        return 0.0, kw["rho"], kw["lr"], nan
    if job["kind"] in ("adasam", "lightsam"):
        return 1.0 if job["kind"] == "adasam" else nan, kw["rho"], kw["lr"], nan
    return 1.0, nan, kw["lr0"], nan


def run(cfg: RunConfig) -> ExperimentResult:
    problems = {
        "deterministic": F.ridge_regression(100, 100, seed=cfg.seed, consistent=True, cond_A=10.0),
        "stochastic": F.ridge_regression(
            100, 100, seed=cfg.seed, consistent=False, reg=REG, cond_A=10.0
        ),
    }
    n = 120 if cfg.quick else 4000
    steps = {"deterministic": n, "stochastic": n}
    every = 1 if cfg.quick else 10
    n_seeds = 2 if cfg.quick else 3
    seeds = [cfg.seed + k for k in range(n_seeds)]
    x0_np = np.random.default_rng(cfg.seed + 1000).standard_normal(100)
    jobs = _jobs(problems)
    rows, curves = [], {}
    for job in progress(jobs, NAME, cfg):
        regime = job["regime"]
        p = problems[regime]
        bsz = None if regime == "deterministic" else BATCH
        run_seeds = seeds if regime == "stochastic" else seeds[:1]
        n_steps = steps[regime]
        f0 = float(p.value(x0_np))
        gaps, finals, dists, rates, mean_steps, evals = [], [], [], [], [], []
        for seed in run_seeds:
            res = _solve(job, p, to_backend(x0_np, cfg.backend), n_steps, bsz, seed, every)
            vals = np.asarray([float(v) for v in res.history["value"]])
            gaps.append(vals - p.f_star)
            finals.append(vals[-1] - p.f_star)
            dists.append(float(np.linalg.norm(to_numpy(res.x) - p.x_opt)))
            rates.append(fitted_rate(list(vals), p.f_star, every))
            ss = np.asarray(res.history["step_size"], dtype=float)
            mean_steps.append(
                float(np.nanmean(ss[np.isfinite(ss)])) if np.isfinite(ss).any() else float("nan")
            )
            evals.append(res.grad_evals)
        rel = np.asarray(gaps) / (f0 - p.f_star)
        mean_rel = rel.mean(axis=0)
        hit = np.flatnonzero(mean_rel <= TOL)
        tail = rel[:, -max(1, rel.shape[1] // 10) :]
        if job["panel"] != "grid":
            curves[(job["panel"], regime, job["method"])] = (np.arange(rel.shape[1]) * every, rel)
        lambd, rho, lr, gamma_b = _settings(job, p)
        rows.append(
            dict(
                panel=job["panel"],
                regime=regime,
                method=job["method"],
                lambd=lambd,
                rho=rho,
                lr=lr,
                gamma_b=gamma_b,
                steps=n_steps,
                batch_size=bsz or p.n,
                seeds=len(run_seeds),
                final_value=float(np.mean(finals)),
                final_value_std=float(np.std(finals)),
                final_rel=float(np.mean(finals)) / (f0 - p.f_star),
                tail_rel=float(tail.mean()),
                steps_to_tol=int(hit[0] * every) if hit.size else float("nan"),
                final_dist=float(np.mean(dists)),
                rate=float(np.nanmean(rates)) if np.isfinite(rates).any() else float("nan"),
                mean_step_size=float(np.nanmean(mean_steps)),
                grad_evals=int(np.mean(evals)),
            )
        )
        if job["method"] == "USAM-const":
            # the constant-step grid's best value is drawn in the theory panel
            key = ("theory", regime, "USAM constant (best of grid)")
            best = curves.get(key)
            if best is None or rel.mean(axis=0)[-1] < best[1].mean(axis=0)[-1]:
                curves[key] = (np.arange(rel.shape[1]) * every, rel)
                curves[key + ("lr",)] = lr
    paths = _figures(curves, cfg)
    path = cfg.path(f"{NAME}.csv")
    write_csv(path, COLUMNS, rows)
    sensitivity = _rounding_sensitivity(problems["deterministic"], x0_np, steps, every, cfg)
    headline, notes = _summary(rows, problems, steps, seeds, curves, sensitivity)
    notes.append(
        "Figures: " + ", ".join(f"`{os.path.basename(p)}`" for p in paths[1:]) + " (one per panel; "
        f"`{NAME}.png` is the 2 x 2 overview)."
    )
    return ExperimentResult(NAME, path, paths[0], rows, COLUMNS, headline, notes)


def _rounding_sensitivity(
    p: Any, x0_np: np.ndarray, steps: dict, every: int, cfg: RunConfig
) -> str:
    """Re-run deterministic USAM-SPS (gamma_b = inf, rho = 1/(2L)) from x0 (1 + 1e-15) and
    report how far its f departs from the x0 run (where both are above the rounding floor)."""
    n = steps["deterministic"]
    vals = []
    for x in (x0_np, x0_np * (1.0 + 1e-15)):
        res = S.sam_sps(
            p,
            to_backend(x, cfg.backend),
            rho=1.0 / (2.0 * p.L),
            lambd=0.0,
            gamma_b=math.inf,
            f_star=0.0,
            steps=n,
            record_every=every,
        )
        vals.append(np.asarray([float(v) for v in res.history["value"]]))
    a, b = vals
    f0 = a[0]
    ok = (a > 1e-12 * f0) & (b > 1e-12 * f0)
    diff = np.where(ok, np.maximum(a / np.maximum(b, 1e-300), b / np.maximum(a, 1e-300)), 1.0)
    k = int(np.argmax(diff))
    return (
        "Sensitivity to rounding, measured in this run: deterministic USAM-SPS (gamma_b = inf, "
        "rho = 1/(2L)) started from x0 (1 + 1e-15) instead of x0 differs from the x0 run by up "
        f"to a factor {diff[k]:.3g} in f - f* (at step {k * every}; compared where both are above "
        "1e-12 f(x0)): the uncapped Polyak map is chaotic in the last digits, so a single value "
        "of those runs is one sample of the trend; "
        "the fitted rate and steps_to_tol are the stable quantities."
    )


def _by(rows, panel, regime, method):
    return next(
        r for r in rows if (r["panel"], r["regime"], r["method"]) == (panel, regime, method)
    )


def _summary(rows, problems, steps, seeds, curves, sensitivity):
    p, q = problems["deterministic"], problems["stochastic"]

    def st(method, panel="theory"):
        return fmt(_by(rows, panel, "deterministic", method)["steps_to_tol"])

    sto = _by(rows, "theory", "stochastic", "USAM-SPS (gamma_b=1)")
    headline = (
        f"steps to (f-f*)/(f0-f*) <= {TOL:g}, deterministic: USAM-SPS (gamma_b=inf) "
        f"{st('USAM-SPS (gamma_b=inf)')}, A&F {st('USAM A&F')}, Khanh {st('USAM Khanh')}, "
        f"Oikonomou {st('USAM Oikonomou')}, SAM-SPS rho=0.1 {st('SAM-SPS', 'adaptive')}; "
        f"stochastic USAM-SPS neighbourhood {sto['tail_rel']:.2g}"
    )
    best_lr = curves.get(("theory", "deterministic", "USAM constant (best of grid)", "lr"))
    notes = [
        f"Deterministic: ridge_regression(100, 100, consistent=True, cond_A=10, seed=0) "
        f"(A = P P^T, kappa(A) = 10, Hessian condition number {p.L / p.mu:.4g}): mu={p.mu:.3g}, "
        f"L={p.L:.3g}, L_max={p.L_max:.3g}, f*=0, full batch, {steps['deterministic']} steps. "
        f"Stochastic: the same A with noisy labels (consistent=False) and reg={REG:g} "
        f"(not interpolated: f*={q.f_star:.4g}, mu={q.mu:.3g}, L_max={q.L_max:.3g}), "
        f"mini-batches of {BATCH} rows, {steps['stochastic']} steps, seeds {seeds} "
        "(mini-batch orders; mean, std and a min-max band over them). x0 ~ N(0, I) (seed 1000), "
        "the same for every run. Figures plot (f(x_t) - f*)/(f(x_0) - f*) against the step.",
        "Theory panel step sizes (as instantiated in the authors' notebook, numpy_exps/exps.ipynb): "
        "deterministic USAM A&F gamma = rho = 1/(2L); Khanh gamma = 2/(9L), rho = 1/(2L); "
        "Oikonomou rho = 1/(6L), gamma = (1 - 3 L rho)/(2L(2 L^2 rho^2 + 1)); USAM-SPS rho = 1/(2L). "
        "Stochastic: A&F's decreasing gamma_t = min{(8t+4)/(3 mu (t+1)^2), 1/(2 L_max)}, "
        "rho_t = sqrt(gamma_t/L_max); Oikonomou rho = mu/(2 L_max (mu + 2 L_max)), "
        "gamma = (mu - L_max rho (mu + 2 L_max))/(2 L_max^2 (2 L_max^2 rho^2 + 1)); "
        "USAM-SPS rho = 1/(2 L_max), gamma_b = 1. Khanh et al. appears only in the deterministic "
        "panel (as in the paper). 'USAM constant (best of grid)': the best final value of "
        "USAM with rho = 0.1 and lr in {0.1, 0.5, 1}/L (stochastic: /L_max)"
        + (f"; deterministic best lr = {fmt(best_lr)}." if best_lr is not None else "."),
        f"Decreasing radius (Theorem 3.4: rho_t -> 0): rho_t = rho_0/(t+1), rho_0 = {RHO_T0} "
        "(= 1/(2L)) for USAM-SPS (theory panel, stochastic: rho_0 = 1/(2 L_max)) and rho_0 = 0.1 "
        "for SAM-SPS (adaptive panel). The paper states the theorem for any rho_t -> 0; this "
        "particular sequence is our choice.",
        "Adaptive panel hyperparameters (the authors' notebook; eps = 1e-12): AdaSAM gamma = 0.01, "
        "rho = 0.01, betas (0.9, 0.999); LightSAM-I eta = 5, rho = 0.1 (stochastic 0.01); "
        "LightSAM-II eta = 0.5, rho = 0.01 (stochastic 0.1); LightSAM-III eta = 0.01, rho = 0.01 "
        "(stochastic 0.001), betas (0.9, 0.999); SA-SAM eta_0 = 0.1 (rho_t = sqrt(eta_t)); "
        "USAM-SPS and SAM-SPS rho = 0.1 (stochastic 0.01), gamma_b = inf deterministic, 1 "
        "stochastic, l* = 0. SA-SAM costs 3 gradients per mini-batch step (2 in full batch); "
        "all others 2 (grad_evals column).",
        "Known mechanism: with lambd = 1 (normalized SAM) and a fixed rho, the Polyak numerator "
        "f(e) - <grad f(e), e - x> equals (||x - x*||_H^2 - ||e - x||_H^2)/2 on a quadratic, so "
        "SAM-SPS stops descending where ||x - x*||_H ~ rho (f ~ rho^2 u'Hu/2); USAM's offset "
        "shrinks with the gradient. SA-SAM's radius sqrt(eta_t) does not shrink either.",
        "The grid panel (in the CSV, not drawn) repeats the earlier sweep: USAM-SPS / SAM-SPS at "
        "rho in {0.01, 0.1} with gamma_b = 1, USAM-const and USAM-AF (the decreasing A&F schedule "
        "in both regimes). final_value is f - f* of the regime's own problem (mean over seeds); "
        f"final_rel divides it by f(x0) - f*; tail_rel is (f - f*)/(f(x0) - f*) averaged over the "
        f"last 10% of the steps and the seeds (the size of the neighbourhood a method settles "
        f"in); steps_to_tol is the first step where the seed-mean of it is <= {TOL:g} (nan: "
        "never). Deterministic values near 1e-16 are the float64 rounding floor of f.",
    ]
    notes.append(coincident_curves(curves))
    notes.append(sensitivity)
    return headline, notes


def _figures(curves: dict, cfg: RunConfig) -> list[str]:
    """One PNG per panel (the paper's four figures) and ``sam_sps_ridge.png``, the four
    tiled 2 x 2 (theory on top, adaptive below; deterministic left)."""
    import matplotlib.image as mpimg

    paths = [cfg.path(f"{NAME}.png")]
    for panel in PANELS:
        for regime in REGIMES:
            fig, (ax,) = new_figure(1, width=8.6, height=4.8)
            _draw(ax, curves, panel, regime)
            short = "det" if regime == "deterministic" else "stoch"
            path = cfg.path(f"{NAME}_{panel}_{short}.png")
            save_figure(fig, path)
            paths.append(path)
    tiles = [mpimg.imread(p)[..., :3] for p in paths[1:]]
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    tiles = [
        np.pad(t, ((0, h - t.shape[0]), (0, w - t.shape[1]), (0, 0)), constant_values=1.0)
        for t in tiles
    ]
    rows = [np.concatenate(tiles[i : i + 2], axis=1) for i in (0, 2)]
    mpimg.imsave(paths[0], np.concatenate(rows, axis=0))
    return paths


def coincident_curves(curves: dict, tol: float = 0.05) -> str:
    """Pairs of drawn curves whose means agree within ``tol`` (relative) at every step."""
    found = []
    for panel in PANELS:
        for regime in REGIMES:
            keys = [k for k in curves if len(k) == 3 and k[:2] == (panel, regime)]
            for i, a in enumerate(keys):
                for b in keys[i + 1 :]:
                    ya = np.maximum(curves[a][1].mean(axis=0), 1e-16)
                    yb = np.maximum(curves[b][1].mean(axis=0), 1e-16)
                    above = (ya > 1e-12) & (yb > 1e-12)  # above the rounding floor
                    if ya.shape != yb.shape or above.sum() < 3:
                        continue
                    if np.all(np.abs(np.log(ya[above] / yb[above])) <= np.log1p(tol)):
                        found.append(f"{panel}/{regime}: {a[2]} and {b[2]}")
    if not found:
        return (
            f"No two drawn curves of a panel coincide (within {tol:.0%} at every step where both "
            "are above 1e-12)."
        )
    return (
        f"Coincident curves (means within {tol:.0%} at every step where both are above 1e-12; "
        "drawn with different line "
        "styles so both show): " + "; ".join(found) + "."
    )


def _draw(ax, curves, panel, regime):
    for key, val in curves.items():
        if len(key) != 3 or key[0] != panel or key[1] != regime:
            continue
        method = key[2]
        x, rel = val
        mean = np.maximum(rel.mean(axis=0), 1e-16)
        color, style = STYLES[method]
        ax.plot(x, mean, label=method, color=color, ls=style, lw=1.6)
        if rel.shape[0] > 1:
            ax.fill_between(
                x,
                np.maximum(rel.min(axis=0), 1e-16),
                np.maximum(rel.max(axis=0), 1e-16),
                color=color,
                alpha=0.15,
                lw=0,
            )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("(f(x_t) - f*) / (f(x_0) - f*)")
    what = "theory step sizes (USAM)" if panel == "theory" else "adaptive SAM methods"
    ax.set_title(
        f"{what}: {regime}"
        + (
            " (full batch, interpolated)"
            if regime == "deterministic"
            else f" (batch {BATCH}, reg {REG:g})"
        ),
        fontsize=10,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
