"""Shared pytest configuration.

* JAX runs with float64 enabled (``jax_enable_x64``) so that float64 conformance
  tests compare like with like; float32 tests ask for float32 explicitly.
* Keras reads ``KERAS_BACKEND`` once, at import. The Keras tests under
  ``tests/keras_adapter`` therefore run in child processes, one per backend, started by
  ``tests/test_keras_backends.py``; the parent run does not collect them.
"""

from __future__ import annotations

import os

try:  # pragma: no cover - depends on the environment
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # pragma: no cover
    pass

collect_ignore_glob: list[str] = []
if os.environ.get("PSD_KERAS_CHILD") != "1":
    collect_ignore_glob.append("keras_adapter/*")
