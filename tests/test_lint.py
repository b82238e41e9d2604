"""Static checks: ruff (lint and format) on the whole tree, mypy on the core."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.skipif(
    shutil.which("ruff") is None and _run("ruff", "--version").returncode != 0,
    reason="ruff missing",
)
def test_ruff_lint_and_format() -> None:
    lint = _run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_on_the_core() -> None:
    pytest.importorskip("mypy")
    res = _run("mypy")
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_core_imports_no_framework() -> None:
    """psd_core stays framework-free (no torch/jax/tensorflow/keras imports anywhere), and the
    update modules use no NumPy and no ``.item()``/``float()`` on values (checked on the code,
    not on docstring examples)."""
    import ast

    frameworks = {"torch", "jax", "jaxlib", "tensorflow", "keras", "optax"}
    for path in (ROOT / "psd_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert not roots & frameworks, f"{path.name} imports {roots & frameworks}"
    for name in (
        "perturbation.py",
        "polyak.py",
        "curvature.py",
        "baselines.py",
        "sam_baselines.py",
        "_array.py",
        "transform.py",
    ):
        tree = ast.parse((ROOT / "psd_core" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                assert not any(m.split(".")[0] == "numpy" for m in mods), f"{name} imports numpy"
            if isinstance(node, ast.Attribute) and node.attr == "item":
                raise AssertionError(f"{name}:{node.lineno} calls .item()")
