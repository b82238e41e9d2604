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


DTYPES = {
    # float dtypes each backend has (array-api-strict: the standard's float32/float64 only)
    "numpy": ["float16", "float32", "float64"],
    "array_api_strict": ["float32", "float64"],
    "torch": ["float16", "bfloat16", "float32", "float64"],
    "jax": ["float16", "bfloat16", "float32", "float64"],
}


def backend_dtype_params() -> list:
    """``(backend, dtype)`` pairs: every float dtype of every conformance backend."""
    return [
        pytest.param(
            b,
            d,
            id=f"{b}-{d}",
            marks=pytest.mark.skipif(not available(b), reason=f"{b} not installed"),
        )
        for b in BACKENDS
        for d in DTYPES[b]
    ]


def convert(value: np.ndarray, backend: str, dtype: str = "float64"):
    """A NumPy array (or scalar) as an array of ``backend`` with float ``dtype`` (ints/bools keep kind).

    ``dtype`` may be ``"bfloat16"`` (torch, JAX) or a complex dtype for complex input.
    """
    arr = np.asarray(value)
    bf16 = dtype == "bfloat16"
    if arr.dtype.kind == "f":
        arr = arr.astype("float32" if bf16 else dtype)
    elif arr.dtype.kind == "c":
        arr = arr.astype(dtype if dtype.startswith("complex") else "complex128")
    if backend == "numpy":
        return arr
    if backend == "array_api_strict":
        import array_api_strict as xp

        return xp.asarray(arr)
    if backend == "torch":
        import torch

        t = torch.from_numpy(np.array(arr, copy=True))
        return t.to(torch.bfloat16) if bf16 and arr.dtype.kind == "f" else t
    if backend == "jax":
        import jax.numpy as jnp

        return (
            jnp.asarray(arr, dtype=jnp.bfloat16)
            if bf16 and arr.dtype.kind == "f"
            else jnp.asarray(arr)
        )
    raise ValueError(backend)


def to_numpy(value) -> np.ndarray:
    """Any backend's array (or a tree of them) back to NumPy float64 / its own kind."""
    if isinstance(value, list | tuple):
        return [to_numpy(v) for v in value]
    mod = type(value).__module__
    if mod.startswith("torch"):
        import torch

        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.detach().cpu().numpy()
    if mod.startswith("array_api_strict"):
        return np.asarray(value._array)
    arr = np.asarray(value)
    if arr.dtype.kind == "V" or str(arr.dtype) == "bfloat16":
        arr = arr.astype(np.float32)
    return arr


def tol(dtype: str) -> dict:
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == "float64" else {"rtol": 1e-5, "atol": 1e-5}
