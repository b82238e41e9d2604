"""Experiment 2 — dimension scaling of one escape.

From the saddle (the origin) of two families, measure the gradient evaluations
until :math:`f(x) \\le f(x_s) - \\Delta` (:math:`\\Delta = 0.5`) and, for the PSD variants
that perturb on their first step, the episode steps after the perturbation
(``grad_evals - 1``), against the theory's episode length
:math:`T = \\lceil 8\\ell/\\gamma \\log(16 d M/\\delta)\\rceil` (:func:`psd_core.psd_constants`).

* ``random_quadratic``: :math:`\\tfrac12x^\\top Ax`, one eigenvalue :math:`-1`, the rest in
  :math:`[0.5, 2]`: the uniform-ball perturbation puts only :math:`\\sim r/\\sqrt d` on the
  escape direction, so the escape time should grow like :math:`\\tfrac12\\log d/\\log(1+\\eta)`.
* ``quartic``: Hessian :math:`-2I` at the saddle: every direction escapes, so the
  escape time should not depend on :math:`d`.

Methods: PSD (exact ``eigvalsh`` test, :math:`d \\le 2000`), PSD-Lanczos
(:func:`psd_core.solvers.psd` with ``curvature="lanczos"``, exact HVPs from the
problem, not counted as gradients; the only one run at :math:`d = 10^4`) and
PSD-Probe (random unit probes, 2 gradients each).
"""

from __future__ import annotations

import math
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
from ._oracle import Reached, Watched

NAME = "dimension_scaling"
COLUMNS = [
    "problem",
    "dim",
    "method",
    "runs",
    "success_rate",
    "grad_evals_mean",
    "grad_evals_std",
    "episode_steps_mean",
    "T_theory",
    "epsilon",
    "log_d",
]
DROP = 0.5
EPSILON = 1e-3


def _grid(quick: bool) -> list[tuple[str, int, str]]:
    rq = [10, 30, 100, 300] if quick else [10, 30, 100, 300, 1000, 2000]
    qu = [10, 100, 1000] if quick else [10, 100, 1000, 10_000]
    jobs = []
    for d in rq:
        for m in ("PSD", "PSD-Lanczos", "PSD-Probe"):
            jobs.append(("random_quadratic", d, m))
    for d in qu:
        for m in ("PSD", "PSD-Lanczos", "PSD-Probe"):
            if d > 2000 and m != "PSD-Lanczos":
                continue
            jobs.append(("quartic", d, m))
    return jobs


def _problem(kind: str, d: int, seed: int) -> Any:
    if kind == "random_quadratic":
        return F.random_quadratic(d, seed=seed, n_negative=1)
    return F.separable_quartic(d)


def run(cfg: RunConfig) -> ExperimentResult:
    seeds = [cfg.seed + k for k in range(4 if cfg.quick else 10)]
    cap = 20_000
    rows = []
    cache: dict[tuple[str, int], Any] = {}
    for kind, d, method in progress(_grid(cfg.quick), NAME, cfg):
        if (kind, d) not in cache:
            cache = {(kind, d): _problem(kind, d, cfg.seed)}
        p = cache[(kind, d)]
        c = psd_constants(EPSILON, p.ell, p.rho, dim=d)
        x0_np = p.saddle()
        f0 = float(p.value(x0_np))
        evals, ok, steps = [], [], []
        for s in seeds:
            w = Watched(p, "escape", threshold=f0 - DROP)
            x0 = to_backend(x0_np, cfg.backend)
            kw = dict(seed=s, max_grad_evals=cap, record_every=10**9)
            success = False
            try:
                if method == "PSD":
                    S.psd(w, x0, epsilon=EPSILON, ell=p.ell, rho=p.rho, curvature="exact", **kw)
                elif method == "PSD-Lanczos":
                    S.psd(w, x0, epsilon=EPSILON, ell=p.ell, rho=p.rho, curvature="lanczos", **kw)
                else:
                    S.psd_probe(w, x0, epsilon=EPSILON, ell=p.ell, rho=p.rho, probe="random", **kw)
            except Reached:
                success = True
            ok.append(success)
            evals.append(w.evals if success else cap)
            if success and method != "PSD-Probe":
                steps.append(w.evals - 1)
        rows.append(
            dict(
                problem=kind,
                dim=d,
                method=method,
                runs=len(seeds),
                success_rate=float(np.mean(ok)),
                grad_evals_mean=float(np.mean(evals)),
                grad_evals_std=float(np.std(evals)),
                episode_steps_mean=float(np.mean(steps)) if steps else float("nan"),
                T_theory=c.episode_length,
                epsilon=EPSILON,
                log_d=math.log(d),
            )
        )
    path = cfg.path(f"{NAME}.csv")
    write_csv(path, COLUMNS, rows)
    png = cfg.path(f"{NAME}.png")
    _figure(rows, png)
    rq = [r for r in rows if r["problem"] == "random_quadratic" and r["method"] == "PSD"]
    headline = "random quadratic, PSD episode steps: " + ", ".join(
        f"d={r['dim']}: {r['episode_steps_mean']:.0f}" for r in rq
    )
    notes = [
        f"Target f <= f(x_s) - {DROP}; epsilon = {EPSILON}; seeds {seeds}; budget {cap} gradients "
        "(failures count as the budget). T_theory is the theory's episode length, a worst-case bound.",
        "PSD-Probe's random unit probes measure the average Rayleigh quotient, so with a single "
        "negative eigenvalue they usually declare a second-order point and stop (success_rate < 1).",
        "PSD and PSD-Lanczos coincide wherever both run: they use the same seeds for the "
        "perturbation, and at the saddle both curvature tests (dense eigvalsh, Lanczos on exact "
        "HVPs) return the same verdict, so the trajectories are identical; they differ only in "
        "the cost of the test (not counted as gradients in either) and in that only Lanczos "
        "scales to d = 10^4. In the figure the PSD-Lanczos line is drawn thin on top of PSD's.",
    ]
    return ExperimentResult(NAME, path, png, rows, COLUMNS, headline, notes)


def _figure(rows: list[dict[str, Any]], path: str) -> None:
    fig, (ax1, ax2) = new_figure(2, width=5.5, height=4.0)
    colors = {"PSD": "C0", "PSD-Lanczos": "C4"}  # colour = method, in both panels
    styles = {"random_quadratic": ("o", "-"), "quartic": ("s", "--")}  # marker/line = problem
    for kind, (marker, ls) in styles.items():
        for method, lw, ms in (("PSD", 3.0, 7), ("PSD-Lanczos", 1.0, 4)):
            sel = [r for r in rows if r["problem"] == kind and r["method"] == method]
            if not sel:
                continue
            ax1.plot(
                [r["dim"] for r in sel],
                [r["episode_steps_mean"] for r in sel],
                marker=marker,
                color=colors[method],
                ls=ls,
                lw=lw,
                ms=ms,
                label=f"{method}, {kind}",
            )
        sel = [r for r in rows if r["problem"] == kind and r["method"] == "PSD"]
        ax2.plot(
            [r["dim"] for r in sel],
            [r["T_theory"] for r in sel],
            marker=marker,
            ls=ls,
            color="k",
            label=f"T (theory), {kind}",
        )
    ax1.set_xscale("log")
    ax1.set_xlabel("dimension d")
    ax1.set_ylabel("episode steps to escape (measured, mean over seeds)")
    ax1.legend(fontsize=8)
    ax1.set_title(
        "Measured escape vs d (PSD-Lanczos thin line lies on PSD:\n"
        "same draws, same verdict 'saddle', identical runs)",
        fontsize=8,
    )
    ax2.set_xscale("log")
    ax2.set_xlabel("dimension d")
    ax2.set_ylabel("T = ceil(8 ell/gamma log(16 d M/delta))")
    ax2.legend(fontsize=8)
    ax2.set_title("Theory episode length (a worst-case bound)", fontsize=9)
    save_figure(fig, path)
