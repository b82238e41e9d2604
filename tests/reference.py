"""Independent float64 transcriptions of SPEC's update rules (NumPy loops, no psd_core).

The precision matrix and the scale tests compare every backend and dtype with these
plain loops, never one run of the core with another. Parameters are lists of NumPy
float64 arrays; complex problems are given here as their real pairs (``view_as_real``).
Draws (normals, uniforms) are passed in, as the core takes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Tree = list[np.ndarray]


def _norm(tree: Sequence[np.ndarray]) -> float:
    """Global 2-norm in float64, scaled so that it does not overflow."""
    flat = np.concatenate([np.ravel(np.asarray(a, dtype=np.float64)) for a in tree])
    if flat.size == 0:
        return 0.0
    s = float(np.max(np.abs(flat)))
    if not math.isfinite(s) or s == 0.0:
        return s
    return s * math.sqrt(float(np.sum((flat / s) ** 2)))


def _finite(tree: Sequence[np.ndarray]) -> bool:
    return all(bool(np.all(np.isfinite(a))) for a in tree)


def _dim(tree: Sequence[np.ndarray]) -> int:
    return sum(int(np.size(a)) for a in tree)


def psd_reference(
    grad_fn: Callable[[Tree], Tree],
    x0: Tree,
    *,
    steps: int,
    lr: float,
    epsilon: float,
    radius: float,
    episode_length: int,
    t_thres: int = 0,
    max_episodes: int | None = None,
    noise: str = "ball",
    step_on_perturb: bool = False,
    gate: str = "grad_norm",
    ema_beta: float = 0.1,
    normals: Sequence[Tree],
    uniforms: Sequence[float],
) -> list[dict]:
    """SPEC section 1's loop as a per-call state machine (the gate of PSD, PGD, PSDTorch).

    Each call: skip if the gradient is not finite; else perturb when no episode runs,
    the gate statistic is at most epsilon, more than ``t_thres`` steps passed since the
    last perturbation and fewer than ``max_episodes`` episodes were used. A
    perturbation adds ``xi`` (uniform ball of radius ``radius`` from the draws, or
    ``radius * z``) and starts ``episode_length`` plain steps. Returns one record per
    call: params, perturbed, episodes, skipped, count.
    """
    x = [np.asarray(a, dtype=np.float64).copy() for a in x0]
    since, left, episodes, skipped, count, finite_steps = t_thres + 1, 0, 0, 0, 0, 0
    ema = 0.0
    perturbed = False
    budget = math.inf if max_episodes is None else max_episodes
    out = []
    for k in range(steps):
        g = [np.asarray(a, dtype=np.float64) for a in grad_fn(x)]
        count += 1
        if not _finite(g):
            skipped += 1
        else:
            gn = _norm(g)
            ema = gn * gn if finite_steps == 0 else (1 - ema_beta) * ema + ema_beta * gn * gn
            finite_steps += 1
            stat = gn if gate == "grad_norm" else math.sqrt(ema)
            perturbed = left <= 0 and stat <= epsilon and since > t_thres and episodes < budget
            if perturbed:
                z = [np.asarray(a, dtype=np.float64) for a in normals[k]]
                if noise == "ball":
                    c = radius * uniforms[k] ** (1.0 / _dim(z)) / _norm(z)
                else:
                    c = radius
                x = [
                    xi + c * zi - (lr * gi if step_on_perturb else 0.0)
                    for xi, zi, gi in zip(x, z, g)
                ]
                since, left, episodes = 1, episode_length, episodes + 1
            else:
                x = [xi - lr * gi for xi, gi in zip(x, g)]
                since = min(since + 1, t_thres + 1)
                left = max(left - 1, 0)
        out.append(
            {
                "params": [a.copy() for a in x],
                "perturbed": perturbed,
                "episodes": episodes,
                "skipped": skipped,
                "count": count,
            }
        )
    return out


def perturbed_adam_reference(
    grads: Sequence[Tree],
    x0: Tree,
    *,
    lr: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    g_thres: float,
    t_thres: int,
    radius: float,
    normals: Sequence[Tree],
    eps_mode: str = "hat",
) -> list[dict]:
    """psd-optimizer's PerturbedAdam (SPEC section 1) with the global gate, given gradients.

    ``d = m_hat / (sqrt(v_hat) + eps)`` (``eps_mode="keras"``: ``eps / sqrt(1 - b2^t)``);
    perturb (``x += radius z``, moments reset) when ``||d|| <= g_thres`` and the count of
    consecutive small steps reaches ``t_thres``; a non-finite gradient skips the step.
    """
    x = [np.asarray(a, dtype=np.float64).copy() for a in x0]
    m = [np.zeros_like(a) for a in x]
    v = [np.zeros_like(a) for a in x]
    t = small_steps = perturbations = skipped = 0
    perturbed = False
    out = []
    for k, g in enumerate(grads):
        g = [np.asarray(a, dtype=np.float64) for a in g]
        if not _finite(g):
            skipped += 1
        else:
            m1 = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
            v1 = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
            t1 = t + 1
            bc1, bc2 = 1 - b1**t1, 1 - b2**t1
            e = eps if eps_mode == "hat" else eps / math.sqrt(bc2)
            d = [(mi / bc1) / (np.sqrt(vi / bc2) + e) for mi, vi in zip(m1, v1)]
            c1 = small_steps + 1
            small = _norm(d) <= g_thres
            perturbed = small and c1 >= t_thres
            if perturbed:
                x = [
                    xi + radius * np.asarray(zi, dtype=np.float64) for xi, zi in zip(x, normals[k])
                ]
                m = [np.zeros_like(a) for a in x]
                v = [np.zeros_like(a) for a in x]
                small_steps = 0
                perturbations += 1
            else:
                x = [xi - lr * di for xi, di in zip(x, d)]
                m, v = m1, v1
                small_steps = c1 if small else 0
            t = t1
        out.append(
            {
                "params": [a.copy() for a in x],
                "perturbed": perturbed,
                "perturbations": perturbations,
                "skipped": skipped,
                "count": t,
            }
        )
    return out


def fused_adam_reference(
    g: np.ndarray,
    x0: np.ndarray,
    steps: int,
    lr: float,
    cast: Callable[[np.ndarray], np.ndarray],
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_mode: str = "hat",
) -> np.ndarray:
    """Adam as fused kernels run it on low-precision parameters (torch's ``fused=True``),
    float64 math, with a constant gradient ``g``: the moments of a step from the stored
    (rounded) ones, the direction from the new moments before rounding, the moments and
    the parameters rounded once per step by ``cast`` (e.g. to float16). Entries whose
    ``(1 - b2) g^2`` underflows in storage differ from a float64 Adam, but by about lr
    per step, not by lr |g| / eps. Returns the parameters after ``steps`` steps."""
    m, v, x = np.zeros_like(x0), np.zeros_like(x0), cast(np.asarray(x0, np.float64))
    for t in range(1, steps + 1):
        m1 = b1 * m + (1 - b1) * g
        v1 = b2 * v + (1 - b2) * g * g
        bc2 = 1 - b2**t
        e = eps if eps_mode == "hat" else eps / math.sqrt(bc2)
        d = (m1 / (1 - b1**t)) / (np.sqrt(v1) / math.sqrt(bc2) + e)
        x, m, v = cast(x - lr * d), cast(m1), cast(v1)
    return x


def sam_sps_reference(
    value_and_grad: Callable[[Tree], tuple[float, Tree]],
    x0: Tree,
    *,
    steps: int,
    rho: float | Callable[[int], float] = 0.1,
    lambd: float = 1.0,
    f_star: float = 0.0,
    gamma_b: float = 1.0,
    weight_decay: float = 0.0,
    variant: str = "sps+",
) -> list[dict]:
    """SPEC section 2: e = x + rho (1 - lam + lam/||g||) g, the (clipped) stochastic Polyak
    step at e with norms clamped below by 1e-12, then x -= gamma (grad f(e) + wd x)."""
    x = [np.asarray(a, dtype=np.float64).copy() for a in x0]
    out = []
    for t in range(steps):
        _, g = value_and_grad(x)
        g = [np.asarray(a, dtype=np.float64) for a in g]
        r = rho(t) if callable(rho) else rho
        c = r * ((1 - lambd) + lambd / max(_norm(g), 1e-12))
        e = [xi + c * gi for xi, gi in zip(x, g)]
        loss_e, ge = value_and_grad(e)
        ge = [np.asarray(a, dtype=np.float64) for a in ge]
        inner = sum(float(np.sum(a * (ei - xi))) for a, ei, xi in zip(ge, e, x))
        num = float(loss_e) - f_star - inner
        if variant == "sps+":
            num = max(num, 0.0)
        nge = max(_norm(ge), 1e-6)
        gamma = min((num / nge) / nge, gamma_b)
        x = [xi - gamma * (gi + weight_decay * xi) for xi, gi in zip(x, ge)]
        out.append({"params": [a.copy() for a in x], "step_size": gamma})
    return out
