"""Run the Keras adapter tests once per Keras backend, each in its own process.

Keras reads ``KERAS_BACKEND`` once, at import, so ``tests/keras_adapter`` runs in a
child ``pytest`` per backend (``tests/conftest.py`` skips that folder unless
``PSD_KERAS_CHILD=1``). The child's summary is printed (``-s`` / CI logs) and its
full output on failure.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


@pytest.mark.keras
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_keras_adapter_on_backend(backend):
    if (
        importlib.util.find_spec("keras") is None
        or importlib.util.find_spec(BACKENDS[backend]) is None
    ):
        pytest.skip(f"keras or {backend} not installed")
    env = dict(os.environ, KERAS_BACKEND=backend, PSD_KERAS_CHILD="1", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::DeprecationWarning",
            "tests/keras_adapter",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    out = proc.stdout + proc.stderr
    summary = [
        line
        for line in proc.stdout.splitlines()
        if " passed" in line or " failed" in line or " error" in line
    ]
    print(f"[KERAS_BACKEND={backend}] {summary[-1] if summary else '(no summary)'}")
    if proc.returncode != 0:
        print(out)
    assert proc.returncode == 0, f"Keras tests failed on backend {backend!r}:\n{out[-6000:]}"
