"""psd-core: one audited array-API implementation of saddle-escaping and sharpness-aware optimization.

The core is pure and functional, written against the Python array API standard
(``array-api-compat``), so it runs unchanged on NumPy, PyTorch, JAX, CuPy and
array-api-strict arrays and traces under ``jax.jit``.

Modules:
    :mod:`psd_core.perturbation` — PSD gate, uniform-ball perturbations, escape episodes, PerturbedAdam.
    :mod:`psd_core.curvature` — Rayleigh quotients, random probes, Lanczos ``min_curvature``.
    :mod:`psd_core.polyak` — SAM / USAM with the stochastic Polyak step size.
    :mod:`psd_core.theory` — the paper's explicit constants.
    :mod:`psd_core.functions` — test problems; :mod:`psd_core.solvers` — whole-loop reference solvers.
"""

from . import curvature, perturbation, polyak, theory
from ._array import tree_dot, tree_lincomb, tree_size, tree_sq_norm
from .curvature import min_curvature
from .perturbation import (
    PerturbedAdamState,
    PSDState,
    perturbed_adam,
    psd,
    psd_from_theory,
)
from .polyak import SAMSPSState, polyak_step_size, sam_perturbation_scale, sam_sps
from .random import HostDraws, uniform_ball
from .theory import psd_constants
from .transform import Transformation, apply_updates

__version__ = "0.1.0"

__all__ = [
    "HostDraws",
    "PSDState",
    "PerturbedAdamState",
    "SAMSPSState",
    "Transformation",
    "apply_updates",
    "curvature",
    "min_curvature",
    "perturbation",
    "perturbed_adam",
    "polyak",
    "polyak_step_size",
    "psd",
    "psd_constants",
    "psd_from_theory",
    "sam_perturbation_scale",
    "sam_sps",
    "theory",
    "tree_dot",
    "tree_lincomb",
    "tree_size",
    "tree_sq_norm",
    "uniform_ball",
]
