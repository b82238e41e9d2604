"""Experiment 3 — function decrease per escape episode vs the theory's epsilon^2/(128 ell).

:func:`psd_core.solvers.psd` (exact curvature test, theory constants, stopped at the
first :math:`(\\epsilon, \\sqrt{\\rho\\epsilon})`-SOSP by the solvers' oracle) is run from a
strict saddle of each problem with ``record_every=1``. An episode starts at an
iteration where the solver's episode counter increments (the recorded value is
the one *before* the perturbation) and lasts the perturbation plus its ``T`` gradient
steps, or less where the next episode starts or the run stops first: the descent
after the episode is not counted. Its measured decrease
:math:`f(x_{start}) - f(x_{end})` is compared with the predicted per-episode decrease
:math:`\\epsilon^2/(128\\ell)` (:func:`psd_core.psd_constants`).

Control: the first episode of each run starts at the saddle itself, so the same ``T``
gradient steps from the same point *without* the perturbation are run too
(``control_decrease``). The theory's claim is that the perturbation makes the
difference: the control must stay below the prediction while the episode clears it.
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
    new_figure,
    progress,
    save_figure,
    to_backend,
    write_csv,
)

NAME = "episode_decrease"
COLUMNS = [
    "problem",
    "dim",
    "epsilon",
    "seed",
    "episode",
    "steps",
    "f_start",
    "f_end",
    "decrease",
    "predicted",
    "ratio",
    "success",
    "control_decrease",
]


def _problems(cfg: RunConfig) -> list[tuple[str, Any]]:
    out = [
        ("quartic-10", F.separable_quartic(10)),
        ("coupled_quartic-10", F.coupled_quartic(10)),
        ("gaussian_wells-2", F.gaussian_wells(2, 5, seed=cfg.seed)),
    ]
    if not cfg.quick:
        out.append(("gaussian_wells-5", F.gaussian_wells(5, 8, seed=cfg.seed)))
        out.append(("quartic-100", F.separable_quartic(100)))
    return out


def run(cfg: RunConfig) -> ExperimentResult:
    seeds = [cfg.seed + k for k in range(3 if cfg.quick else 10)]
    epsilons = [1e-2, 1e-1] if cfg.quick else [1e-3, 1e-2, 1e-1]
    rows: list[dict[str, Any]] = []
    jobs = [(pn, p, e, s) for pn, p in _problems(cfg) for e in epsilons for s in seeds]
    for pn, p, eps, s in progress(jobs, NAME, cfg):
        c = psd_constants(eps, p.ell, p.rho, dim=p.dim)
        x0 = to_backend(p.saddle(), cfg.backend)
        res = S.psd(
            p,
            x0,
            epsilon=eps,
            ell=p.ell,
            rho=p.rho,
            curvature="exact",
            seed=s,
            sosp=(eps, c.gamma),
            max_grad_evals=50_000,
        )
        ep = np.asarray(res.history["episodes"])
        val = np.asarray(res.history["value"])
        starts = list(np.flatnonzero(np.diff(ep) > 0))
        for k, i in enumerate(starts):
            j = starts[k + 1] if k + 1 < len(starts) else len(val) - 1
            j = min(j, i + c.episode_length + 1)
            dec = float(val[i] - val[j])
            control = _control_decrease(p, c, int(j - i)) if k == 0 and i == 0 else float("nan")
            rows.append(
                dict(
                    problem=pn,
                    dim=p.dim,
                    epsilon=eps,
                    seed=s,
                    episode=k + 1,
                    steps=int(j - i),
                    f_start=float(val[i]),
                    f_end=float(val[j]),
                    decrease=dec,
                    predicted=c.episode_decrease,
                    ratio=dec / c.episode_decrease,
                    success=bool(dec >= c.episode_decrease),
                    control_decrease=control,
                )
            )
    path = cfg.path(f"{NAME}.csv")
    write_csv(path, COLUMNS, rows)
    png = cfg.path(f"{NAME}.png")
    _figure(rows, png)
    frac = float(np.mean([r["success"] for r in rows])) if rows else float("nan")
    ratios = np.asarray([r["ratio"] for r in rows]) if rows else np.asarray([np.nan])
    headline = (
        f"{len(rows)} episodes; {100 * frac:.0f}% decreased f by at least eps^2/(128 ell); "
        f"median measured/predicted = {np.median(ratios):.3g}"
    )
    summary = []
    for pn in sorted({r["problem"] for r in rows}):
        for eps in epsilons:
            sel = [r for r in rows if r["problem"] == pn and r["epsilon"] == eps]
            if sel:
                summary.append(
                    dict(
                        problem=pn,
                        epsilon=eps,
                        episodes=len(sel),
                        decrease_median=float(np.median([r["decrease"] for r in sel])),
                        predicted=sel[0]["predicted"],
                        ratio_min=float(np.min([r["ratio"] for r in sel])),
                        success_rate=float(np.mean([r["success"] for r in sel])),
                    )
                )
    notes = [
        f"Seeds {seeds}; epsilon in {epsilons}; one run per (problem, epsilon, seed); "
        "An episode is its perturbation plus T gradient steps (or less where the run stops "
        "first); the descent after it is not counted. Control: the first episode starts at the "
        "saddle, where the same steps without the perturbation (control_decrease) do not "
        "reach the predicted decrease.",
    ]
    return ExperimentResult(
        NAME,
        path,
        png,
        rows,
        COLUMNS,
        headline,
        notes,
        extra_tables=[
            ("Per problem and epsilon", list(summary[0].keys()) if summary else [], summary)
        ],
    )


def _control_decrease(problem: Any, c: Any, steps: int) -> float:
    """f(x0) - f(x_steps) for plain gradient descent from the saddle, no perturbation."""
    x = np.asarray(problem.saddle(), dtype=np.float64)
    f0 = float(problem.value(x))
    for _ in range(max(steps - 1, 0)):
        x = x - c.step_size * np.asarray(problem.grad(x), dtype=np.float64)
    return f0 - float(problem.value(x))


def _figure(rows: list[dict[str, Any]], path: str) -> None:
    fig, (ax,) = new_figure(1, width=5.5)
    for k, pn in enumerate(sorted({r["problem"] for r in rows})):
        sel = [r for r in rows if r["problem"] == pn]
        ax.scatter(
            [r["predicted"] for r in sel],
            [max(r["decrease"], 1e-16) for r in sel],
            s=12,
            color=f"C{k}",
            label=pn,
        )
    if rows:
        lo = min(r["predicted"] for r in rows)
        hi = max(max(r["decrease"] for r in rows), max(r["predicted"] for r in rows))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted decrease eps^2/(128 ell)")
    ax.set_ylabel("measured decrease per episode")
    ax.legend(fontsize=7)
    ax.set_title("Per-episode decrease")
    save_figure(fig, path)
