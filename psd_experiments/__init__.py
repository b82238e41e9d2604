"""Real experiments for psd-core: ``psd-experiments`` / ``python -m psd_experiments``.

Every number is produced by a run of :mod:`psd_core` (solvers, transformations,
batched scalar layers), the PyTorch adapters or ``torch.optim`` baselines. See
:mod:`psd_experiments.__main__` for the command line.
"""

from __future__ import annotations

EXPERIMENTS = {
    "escape_table": "psd_experiments.escape",
    "dimension_scaling": "psd_experiments.scaling",
    "episode_decrease": "psd_experiments.episodes",
    "sam_sps_ridge": "psd_experiments.ridge",
    "bakeoff": "psd_experiments.bakeoff",
    "digits": "psd_experiments.digits",
    "sam_sps_digits": "psd_experiments.sam_digits",
    "real_saddles": "psd_experiments.real_saddles",
    "psgd_noise": "psd_experiments.psgd_noise",
}
"""Experiment name (also the CSV/PNG stem) -> module with ``run(cfg) -> ExperimentResult``."""

__all__ = ["EXPERIMENTS"]
