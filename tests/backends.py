"""Backend helpers for the conformance suite: convert NumPy inputs to each array library."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

BACKENDS = ["numpy", "array_api_strict", "torch", "jax"]


def available(name: str) -> bool:
    return name == "numpy" or importlib.util.find_spec(name) is not None


def backend_params() -> list:
    return [
        pytest.param(b, marks=pytest.mark.skipif(not available(b), reason=f"{b} not installed"))
        for b in BACKENDS
    ]


def convert(value: np.ndarray, backend: str, dtype: str = "float64"):
    """A NumPy array (or scalar) as an array of ``backend`` with float ``dtype`` (ints/bools keep kind)."""
    arr = np.asarray(value)
    if arr.dtype.kind == "f":
        arr = arr.astype(dtype)
    if backend == "numpy":
        return arr
    if backend == "array_api_strict":
        import array_api_strict as xp

        return xp.asarray(arr)
    if backend == "torch":
        import torch

        return torch.from_numpy(np.array(arr, copy=True))
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(arr)
    raise ValueError(backend)


def to_numpy(value) -> np.ndarray:
    """Any backend's array (or a tree of them) back to NumPy float64 / its own kind."""
    if isinstance(value, list | tuple):
        return [to_numpy(v) for v in value]
    mod = type(value).__module__
    if mod.startswith("torch"):
        return value.detach().cpu().numpy()
    if mod.startswith("array_api_strict"):
        return np.asarray(value._array)
    return np.asarray(value)


def tol(dtype: str) -> dict:
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == "float64" else {"rtol": 1e-5, "atol": 1e-5}
