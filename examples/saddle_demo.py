"""A short demo of the pure API on the saddle problems.

Run: ``python examples/saddle_demo.py`` (NumPy), or ``--backend torch|jax`` for the same
computation on another array library. It calls the pure update functions directly,
then the whole-loop solvers, and prints what happened.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

import psd_core
from psd_core import functions as F
from psd_core import solvers as S


def as_backend(x: np.ndarray, backend: str):
    if backend == "torch":
        import torch

        return torch.from_numpy(x)
    if backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        return jax.numpy.asarray(x)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["numpy", "torch", "jax"], default="numpy")
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    p = F.separable_quartic(args.dim)
    eps = 0.05
    c = psd_core.psd_constants(eps, p.ell, p.rho, dim=args.dim)
    print(f"separable quartic, d={args.dim}, backend={args.backend}")
    print(
        f"PSD constants: gamma={c.gamma:.4g} r={c.radius:.4g} T={c.episode_length} "
        f"M={c.max_episodes} eta={c.step_size:.4g} decrease/episode={c.episode_decrease:.3g}"
    )

    # 1. The pure transformation, driven by hand from the saddle.
    tx = psd_core.psd_from_theory(eps, p.ell, p.rho, dim=args.dim)
    x = [as_backend(p.saddle(), args.backend)]
    state = tx.init(x)
    draws = psd_core.HostDraws(args.seed)
    for _ in range(400):
        g = [p.grad(x[0])]
        upd, state = tx.update(
            g, state, x, normals=draws.normals_like(g), uniform=draws.uniform_like(g[0])
        )
        x = psd_core.apply_updates(x, upd)
    print(
        f"pure psd transformation, 400 steps: f={float(p.value(x[0])):.6f} "
        f"(minimum {-args.dim / 4:.2f}), episodes={int(state.episodes)}"
    )

    # 2. Whole-loop solvers from the saddle, stopping at the first (eps, gamma)-SOSP.
    x0 = as_backend(p.saddle(), args.backend)
    sosp = (eps, math.sqrt(p.rho * eps))
    rows = [
        ("GD", S.gd(p, x0, lr=c.step_size, max_grad_evals=5000, sosp=sosp)),
        ("PSD", S.psd(p, x0, epsilon=eps, ell=p.ell, rho=p.rho, seed=args.seed, sosp=sosp)),
        (
            "PSD-Probe",
            S.psd_probe(p, x0, epsilon=eps, ell=p.ell, rho=p.rho, seed=args.seed, sosp=sosp),
        ),
        (
            "PSD-HVP",
            S.psd_probe(
                p, x0, epsilon=eps, ell=p.ell, rho=p.rho, probe="hvp", seed=args.seed, sosp=sosp
            ),
        ),
    ]
    print(f"{'method':10s} {'grad evals':>10s} {'SOSP':>5s} {'f(x)':>10s}")
    for name, r in rows:
        print(f"{name:10s} {r.grad_evals:10d} {str(r.converged):>5s} {float(p.value(r.x)):10.5f}")

    # 3. SAM-SPS on consistent ridge regression.
    ridge = F.ridge_regression()
    for lam, label in [(0.0, "USAM-SPS"), (1.0, "SAM-SPS")]:
        r = S.sam_sps(ridge, as_backend(np.zeros(100), args.backend), rho=0.1, lambd=lam, steps=200)
        print(f"{label} on ridge (rho=0.1), 200 steps: f={r.history['value'][-1]:.3e}")


if __name__ == "__main__":
    main()
