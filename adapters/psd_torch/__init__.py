"""PyTorch adapter for :mod:`psd_core`: ``torch.optim.Optimizer`` subclasses.

``PSD``, ``PerturbedAdam`` and ``SAM_SPS`` take their math from ``psd_core`` and
apply it in place with ``torch._foreach_*`` ops. :mod:`psd_torch.peers` holds the
peer-exact compatibility classes (``PSDTorch``, ``PSDOptimizer``, and the peers'
``PerturbedAdam`` and ``SAM_SPS`` signatures), also importable from here.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "PSDOptimizer": ".peers",
    "PSDTorch": ".peers",
    "peers": ".peers",
    "SAM_SPS": ".sam_sps",
    "PSD": ".psd",
    "PerturbedAdam": ".perturbed_adam",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name == "peers":
        return import_module(".peers", __name__)
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
