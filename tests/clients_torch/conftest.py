"""Shared setup of the real-client tests (Lightning, Hugging Face, FSDP)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _torch_backend_flags_mutable() -> Iterator[None]:
    """Let the clients set ``torch.backends`` flags, as they do in a user's process.

    ``torch.testing._internal.common_utils`` (imported by the OptimizerInfo tests when
    pytest-xdist puts them on the same worker) calls ``torch.backends.disable_global_flags()``
    at import, after which ``lightning.Trainer(deterministic=True)`` raises
    ``RuntimeError: not allowed to set torch.backends.cudnn flags``. Torch's own context
    manager lifts that freeze for the duration of one test.
    """
    torch = pytest.importorskip("torch")
    allow = getattr(torch.backends, "__allow_nonbracketed_mutation")
    with allow():
        yield
