"""Experiment 1 — the escape table (PSD paper, Table 1), computed for real.

Gradient evaluations to reach the target for GD, PGD, PSD, PSD-Probe and PSD-HVP
on Quartic-10, Quartic-100, Rosenbrock-10 and Random-100. Every method is a
:mod:`psd_core.solvers` solver; :class:`~psd_experiments._oracle.Watched` counts
gradient calls and stops all methods with the same rule.

Choices (recorded in the summary):

* Quartic-d: :math:`\\sum_i x_i^4 - x_i^2` from its saddle, the origin
  (:math:`\\nabla^2 f = -2I`); target an :math:`(\\epsilon, \\sqrt{\\rho\\epsilon})`-SOSP with
  :math:`\\epsilon = 10^{-3}`, :math:`\\ell = 10`, :math:`\\rho = 24` (the problem's constants).
* Rosenbrock-10: started at the origin, the paper's start, which is *not* a saddle
  (gradient :math:`(-2,\\dots,-2,0)`, Hessian positive definite); target an SOSP with
  :math:`\\epsilon = 0.1`, :math:`\\ell = 2602`, :math:`\\rho = 3600` (the core's constants on
  the box :math:`\\|x\\|_\\infty \\le 1`).
* Random-100: :math:`\\tfrac12 x^\\top A x` with one eigenvalue :math:`-1`, from its saddle
  (the origin). It is unbounded below, so no SOSP exists: the target is
  :math:`f(x) \\le f(x_s) - 1`. :math:`\\epsilon = 10^{-3}`, :math:`\\ell = \\max|\\lambda_i|`,
  :math:`\\rho = 1` (assumed: the Hessian is constant).
* All methods use :math:`\\eta = 1/(2\\ell)`. PGD uses the same gate :math:`\\epsilon`, radius
  :math:`r` and ``t_thres`` :math:`= T` as PSD. PSD uses the exact curvature test
  (dense ``eigvalsh``, not counted as gradients, as in the paper's code). PSD-Probe
  uses :math:`m` random unit probes with central differences (2 gradients each).
  PSD-HVP is :func:`psd_core.solvers.psd_probe` with ``probe="hvp"``: Lanczos on
  central-difference HVPs (2 gradients each, counted).
* GD is deterministic (no draws), so it is run once per problem; the randomized
  methods run over several seeds. A run that stops without reaching the target
  (budget spent, or a curvature test that wrongly declares a second-order point)
  counts as failed and enters the mean as the cap.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from psd_core import functions as F
from psd_core import solvers as S
from psd_core.theory import psd_constants

from ._common import (
    ExperimentResult,
    RunConfig,
    bootstrap_ci,
    fmt,
    new_figure,
    progress,
    save_figure,
    to_backend,
    write_csv,
)
from ._oracle import EscapeClock, Reached, Watched

NAME = "escape_table"
COLUMNS = [
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
METHODS = ["GD", "PGD", "PSD", "PSD-Probe", "PSD-HVP"]
PROBLEMS = ["Quartic-10", "Quartic-100", "Rosenbrock-10", "Random-100"]
QUICK_PROBLEMS = ["Quartic-10", "Random-100"]
MARGIN = 1.0
"""Escape time: gradient evaluations until f first drops below f(x0) - MARGIN."""
COLORS = {"GD": "C7", "PGD": "C1", "PSD": "C0", "PSD-Probe": "C2", "PSD-HVP": "C3"}
"""One colour per method in every figure of the suite that shows these methods."""

PUBLISHED_SYNTHETIC = {
    # PSD paper repository's Table 1: generated from formulas plus noise, not runs (see SPEC).
    "GD": [50_000, 50_000, 50_000, 50_000],
    "PGD": [2_890, 5_950, 3_780, 6_340],
    "PSD": [2_340, 4_870, 3_150, 5_420],
    "PSD-Probe": [2_480, 5_120, 3_320, 5_680],
}


def problem_setup(name: str, seed: int) -> dict[str, Any]:
    if name.startswith("Quartic-"):
        d = int(name.split("-")[1])
        p = F.separable_quartic(d)
        return dict(
            problem=p, epsilon=1e-3, ell=p.ell, rho=p.rho, criterion="sosp", start="saddle (origin)"
        )
    if name == "Rosenbrock-10":
        p = F.rosenbrock(10, radius=1.0)
        return dict(
            problem=p,
            epsilon=0.1,
            ell=p.ell,
            rho=p.rho,
            criterion="sosp",
            start="origin (not a saddle)",
        )
    if name == "Random-100":
        p = F.random_quadratic(100, seed=seed, n_negative=1)
        return dict(
            problem=p,
            epsilon=1e-3,
            ell=p.ell,
            rho=p.rho,
            criterion="escape",
            drop=1.0,
            start="saddle (origin)",
        )
    raise ValueError(f"unknown problem {name!r}")


def run_method(
    method: str, setup: dict[str, Any], seed: int, cap: int, backend: str
) -> dict[str, Any]:
    """One run without any outside oracle: the method stops by its own rule (or the cap).

    Returns ``stop_evals`` (gradient evaluations when the method's own stopping rule
    fired; None if it did not within ``cap``), ``escape_evals`` (evaluations until f first
    fell below f(x0) - MARGIN; None if never), ``perturbations`` and ``final_value``.
    On Random-100 (unbounded below, no second-order point: no stopping rule can fire)
    the run is cut at the escape.
    """
    p = setup["problem"]
    eps, ell, rho = setup["epsilon"], setup["ell"], setup["rho"]
    x0_np = p.saddle()
    threshold = float(p.value(x0_np)) - MARGIN
    cut = setup["criterion"] == "escape"
    w = Watched(p, "escape", threshold=threshold) if cut else EscapeClock(p, threshold)
    x0 = to_backend(x0_np, backend)
    kw = dict(seed=seed, max_grad_evals=cap, record_every=10**9)
    try:
        if method == "GD":
            res = S.gd(w, x0, lr=psd_constants(eps, ell, rho, dim=p.dim).step_size, **kw)
        elif method == "PGD":
            j = S.jin_pgd_constants(eps, ell, rho, dim=p.dim)
            res = S.pgd_jin(
                w,
                x0,
                lr=j.lr,
                g_thres=j.g_thres,
                t_thres=j.t_thres,
                f_thres=j.f_thres,
                radius=j.radius,
                **kw,
            )
        elif method == "PSD":
            res = S.psd(w, x0, epsilon=eps, ell=ell, rho=rho, curvature="exact", **kw)
        elif method == "PSD-Probe":
            res = S.psd_probe(w, x0, epsilon=eps, ell=ell, rho=rho, probe="random", **kw)
        elif method == "PSD-HVP":
            res = S.psd_probe(w, x0, epsilon=eps, ell=ell, rho=rho, probe="hvp", **kw)
        else:
            raise ValueError(f"unknown method {method!r}")
    except Reached:
        return dict(
            stop_evals=None,
            escape_evals=w.evals,
            perturbations=None,
            final_value=float(w.reached_value),
        )
    if cut:
        escape = None
    else:
        escape = w.first_below
    return dict(
        stop_evals=res.grad_evals if res.converged else None,
        escape_evals=escape,
        perturbations=res.episodes,
        final_value=float(p.value(res.x)),
    )


def _mean_ci(values: list[float | None], cap: int, seed: int) -> tuple[float, float, float, float]:
    """(mean, ci_low, ci_high, rate): runs where the event did not happen enter as ``cap``."""
    hit = [v is not None for v in values]
    vals = [float(v) if v is not None else float(cap) for v in values]
    lo, hi = bootstrap_ci(vals, seed=seed)
    return float(np.mean(vals)), lo, hi, float(np.mean(hit))


def run(cfg: RunConfig) -> ExperimentResult:
    cap = 20_000 if cfg.quick else 50_000
    seeds = [cfg.seed + k for k in range(1 if cfg.quick else 3)]
    problems = QUICK_PROBLEMS if cfg.quick else PROBLEMS
    rows: list[dict[str, Any]] = []
    settings: list[dict[str, Any]] = []
    jobs = [(pn, m) for pn in problems for m in METHODS]
    for pn, method in progress(jobs, "escape_table", cfg):
        setup = problem_setup(pn, cfg.seed)
        if method == METHODS[0]:
            p = setup["problem"]
            c = psd_constants(setup["epsilon"], setup["ell"], setup["rho"], dim=p.dim)
            j = S.jin_pgd_constants(setup["epsilon"], setup["ell"], setup["rho"], dim=p.dim)
            settings.append(
                dict(
                    problem=pn,
                    start=setup["start"],
                    escape=f"f <= f(x0) - {MARGIN:g} = {float(p.value(p.saddle())) - MARGIN:g}",
                    epsilon=setup["epsilon"],
                    ell=setup["ell"],
                    rho=setup["rho"],
                    PSD_lr=c.step_size,
                    PSD_radius=c.radius,
                    PSD_T=c.episode_length,
                    PSD_M=c.max_episodes,
                    PGD_lr=j.lr,
                    PGD_radius=j.radius,
                    PGD_g_thres=j.g_thres,
                    PGD_t_thres=j.t_thres,
                    PGD_f_thres=j.f_thres,
                )
            )
        run_seeds = seeds[:1] if method == "GD" else seeds
        outs = [run_method(method, setup, s, cap, cfg.backend) for s in run_seeds]
        stop, stop_lo, stop_hi, stop_rate = _mean_ci([o["stop_evals"] for o in outs], cap, cfg.seed)
        esc, esc_lo, esc_hi, esc_rate = _mean_ci([o["escape_evals"] for o in outs], cap, cfg.seed)
        pert = [o["perturbations"] for o in outs]
        rows.append(
            dict(
                problem=pn,
                method=method,
                stop_evals=stop if setup["criterion"] == "sosp" else float("nan"),
                stop_ci_low=stop_lo if setup["criterion"] == "sosp" else float("nan"),
                stop_ci_high=stop_hi if setup["criterion"] == "sosp" else float("nan"),
                stop_rate=stop_rate,
                escape_evals=esc,
                escape_ci_low=esc_lo,
                escape_ci_high=esc_hi,
                escape_rate=esc_rate,
                perturbations=(
                    float(np.mean(pert)) if all(v is not None for v in pert) else float("nan")
                ),
                final_value=float(np.mean([o["final_value"] for o in outs])),
                runs=len(run_seeds),
            )
        )
    path = cfg.path(f"{NAME}.csv")
    write_csv(path, COLUMNS, rows)
    png = cfg.path(f"{NAME}.png")
    _figure(rows, png, cap, problems)
    published = []
    for m in METHODS:
        r = {"method": m}
        for i, pn in enumerate(PROBLEMS):
            if pn not in problems:
                continue
            ours = next(x for x in rows if x["problem"] == pn and x["method"] == m)
            pub = PUBLISHED_SYNTHETIC.get(m)
            r[pn] = (
                f"stop {fmt(ours['stop_evals'])} / escape {fmt(ours['escape_evals'])} "
                f"(published (synthetic) {pub[i]:,})"
                if pub
                else f"stop {fmt(ours['stop_evals'])} / escape {fmt(ours['escape_evals'])} (pub. -)"
            )
        published.append(r)
    by = {(r["problem"], r["method"]): r for r in rows}
    headline = "PSD stop / escape grad evals: " + ", ".join(
        f"{pn} {fmt(by[(pn, 'PSD')]['stop_evals'])} / {fmt(by[(pn, 'PSD')]['escape_evals'])}"
        for pn in problems
    )
    notes = [
        "No outside oracle: every method runs until ITS OWN stopping rule fires or the cap of "
        f"{cap:,} gradient evaluations. stop_evals = gradient evaluations until the method's own "
        "stopping rule fired (what the paper's table counts; PSD/PSD-Probe/PSD-HVP: the curvature "
        "test declares an (epsilon, sqrt(rho epsilon))-SOSP; PGD: Jin et al.'s f_thres test after a "
        "perturbation; GD has no second-order stopping rule and always runs to the cap). "
        f"escape_evals = gradient evaluations until f first drops below f(x0) - {MARGIN:g} "
        "(the escape time). A run in which the event did not happen enters the mean as the cap; "
        "stop_rate / escape_rate are the fractions of runs in which it happened.",
        f"Seeds {seeds} (GD is deterministic: one run); ci = 95% percentile-bootstrap interval of "
        "the mean over seeds (a point for one run). perturbations = mean perturbations (PSD/PGD "
        "episodes, PSD-Probe/HVP negative-curvature steps).",
        "Random-100 is unbounded below: no second-order point exists, so no stopping rule can fire "
        "correctly; the run is cut at the escape and stop_evals is n/a (nan). A stop_rate > 0 there "
        "means the method's curvature test wrongly declared the saddle second-order stationary "
        "(random unit probes cannot see its single negative eigenvalue).",
        "PGD is Jin et al. (2017) Algorithm 2 (psd_core.solvers.pgd_jin) with its own constants "
        "(psd_core.solvers.jin_pgd_constants, c = 1): eta = 1/ell (PSD: 1/(2 ell)), a much smaller "
        "radius and gate, and a stop after t_thres steps without an f_thres decrease. PSD instead "
        "tests curvature with a dense eigvalsh (not counted as gradients, the paper's convention) "
        "and runs T steps per episode. So PGD and PSD differ in both columns: PGD pays one extra "
        "perturbation plus t_thres steps at the minimum it returns; PSD pays T steps after its "
        "first perturbation even though the escape takes far fewer.",
        "Published numbers are the PSD repository's, labelled 'published (synthetic)': they were "
        "generated from formulas plus noise, not from runs.",
    ]
    return ExperimentResult(
        name=NAME,
        csv=path,
        png=png,
        rows=rows,
        columns=COLUMNS,
        headline=headline,
        notes=notes,
        extra_tables=[
            ("Settings (per problem)", list(settings[0].keys()), settings),
            (
                "Ours vs published (synthetic): mean gradient evaluations (own stop / escape)",
                ["method", *problems],
                published,
            ),
        ],
    )


def figure_from_csv(csv_path: str, png_path: str, cap: int) -> None:
    """Redraw the figure from a finished run's CSV (no rerun)."""
    from ._common import read_csv

    rows: list[dict[str, Any]] = [
        {k: (v if k in ("problem", "method") else float(v)) for k, v in r.items()}
        for r in read_csv(csv_path)
    ]
    problems = [pn for pn in PROBLEMS if any(r["problem"] == pn for r in rows)]
    _figure(rows, png_path, cap, problems)


def _figure(rows: list[dict[str, Any]], path: str, cap: int, problems: list[str]) -> None:
    fig, axes = new_figure(2, width=6.0, height=4.2)
    width = 0.15
    xs = np.arange(len(problems))
    for ax, key, title in (
        (axes[0], "stop", "until the method's own stopping rule fires"),
        (axes[1], "escape", f"until f < f(x0) - {MARGIN:g} (escape time)"),
    ):
        for k, m in enumerate(METHODS):
            vals = [
                next(r for r in rows if r["problem"] == pn and r["method"] == m) for pn in problems
            ]
            y = np.array([v[f"{key}_evals"] for v in vals], dtype=float)
            lo = np.array([v[f"{key}_ci_low"] for v in vals], dtype=float)
            hi = np.array([v[f"{key}_ci_high"] for v in vals], dtype=float)
            ax.bar(
                xs + (k - 2) * width,
                np.nan_to_num(y),
                width,
                label=m,
                color=COLORS[m],
                yerr=[np.nan_to_num(y - lo), np.nan_to_num(hi - y)],
                capsize=2,
            )
        if key == "stop":
            first = True
            for i, pn in enumerate(PROBLEMS):
                if pn not in problems:
                    continue
                xi = problems.index(pn)
                if pn == "Random-100":
                    ax.text(xi, 3, "n/a: no second-order\npoint exists", ha="center", fontsize=8)
                    continue
                for k, m in enumerate(METHODS):
                    pub = PUBLISHED_SYNTHETIC.get(m)
                    if pub:
                        ax.plot(
                            xi + (k - 2) * width,
                            pub[i],
                            "k_",
                            ms=12,
                            mew=2,
                            label="published (synthetic)" if first else None,
                        )
                        first = False
            hs, ls = ax.get_legend_handles_labels()
            keep = [(h, lab) for h, lab in zip(hs, ls) if lab == "published (synthetic)"]
            if keep:
                ax.legend(
                    [h for h, _ in keep], [lab for _, lab in keep], fontsize=8, loc="upper right"
                )
        ax.axhline(cap, color="k", lw=0.8, ls="--", label=f"cap {cap:,}")
        ax.set_yscale("log")
        ax.set_ylim(1, cap * 3)
        ax.set_xticks(xs, problems, fontsize=8)
        ax.set_ylabel("gradient evaluations (mean over seeds)")
        ax.set_title(title, fontsize=9)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)
