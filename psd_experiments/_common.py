"""Shared plumbing of the experiments: run configuration, backends, CSV/PNG output.

Nothing here implements optimization math: the methods come from :mod:`psd_core`
(solvers, transformations, scalar layers) or from ``torch.optim``.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BACKENDS = ("numpy", "torch", "jax")


@dataclass
class RunConfig:
    """Options of one ``psd-experiments`` invocation."""

    quick: bool = False
    backend: str = "numpy"
    seed: int = 0
    out: str = "results"
    progress: bool = True
    notes: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)


@dataclass
class ExperimentResult:
    """What an experiment hands back to the driver (for the summary)."""

    name: str
    csv: str
    png: str
    rows: list[dict[str, Any]]
    columns: list[str]
    headline: str
    notes: list[str] = field(default_factory=list)
    extra_tables: list[tuple[str, list[str], list[dict[str, Any]]]] = field(default_factory=list)


def to_backend(x: np.ndarray, backend: str) -> Any:
    """A NumPy float64 array as a float64 array of ``backend`` (CPU)."""
    if backend == "numpy":
        return np.asarray(x, dtype=np.float64)
    if backend == "torch":
        import torch

        return torch.as_tensor(np.asarray(x, dtype=np.float64))
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        return jnp.asarray(np.asarray(x, dtype=np.float64))
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def to_numpy(x: Any) -> np.ndarray:
    """Any CPU array (NumPy, PyTorch, JAX) as a NumPy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def progress(iterable: Iterable[Any], desc: str, cfg: RunConfig, total: int | None = None):
    """A tqdm progress bar (disabled with ``cfg.progress = False``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not cfg.progress, leave=False)


def fmt(v: Any) -> str:
    """Compact, round-trippable CSV/markdown formatting of a cell."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.4g}"
        return f"{v:.6g}"
    return str(v)


def write_csv(path: str, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts) with exactly ``columns``, in that order."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r in rows:
            w.writerow([fmt(r.get(c, "")) for c in columns])


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def new_figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def bootstrap_ci(
    values: Sequence[float], seed: int, n_boot: int = 2000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (a point when all values agree)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1 or np.all(v == v[0]):
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = rng.choice(v, size=(n_boot, v.size), replace=True).mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
