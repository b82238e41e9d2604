"""The API reference renders the docstrings' math: no raw Sphinx roles in the built HTML.

The docstrings write math as Sphinx roles (``:math:`x```, ``.. math::``);
``docs/hooks/griffe_math.py`` (a griffe extension enabled in ``mkdocs.yml``) turns them
into Arithmatex math before mkdocstrings renders them. The unit tests check the
conversion; the slow test builds the site with ``mkdocs build --strict`` and greps the
HTML, as a reader would see it.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "griffe_math.py"


@pytest.fixture(scope="module")
def convert():
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("griffe_math", HOOK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.convert


def test_inline_math_role_becomes_arithmatex(convert):
    assert convert(r"radius :math:`r \ge 0`.") == r"radius \(r \ge 0\)."
    # a role broken over two lines is joined
    assert convert(":math:`a +\n    b` end") == r"\(a + b\) end"


def test_math_directive_becomes_display_math(convert):
    text = "Intro:\n\n.. math::\n    a &= b\\\\\n    c &= d\n\nAfter."
    out = convert(text)
    assert ".. math::" not in out
    assert "\\[\n\\begin{aligned}\na &= b\\\\\nc &= d\n\\end{aligned}\n\\]" in out
    assert out.endswith("After.")
    # indented inside a section, no blank line after the directive
    out = convert("Args:\n    x: y.\n\n    .. math::\n        f(x) = x^2\n\n    more")
    assert "    \\[\n    f(x) = x^2\n    \\]" in out and out.endswith("    more")


def test_cross_reference_roles_become_code(convert):
    assert convert(":func:`psd_core.polyak.sam_sps`") == "`psd_core.polyak.sam_sps`"
    assert convert(":class:`~psd_core.polyak.SAMSPSState`") == "`SAMSPSState`"
    assert convert(":meth:`nearest_well` and :mod:`psd_core`") == "`nearest_well` and `psd_core`"


@pytest.mark.slow
def test_built_api_reference_has_no_raw_roles(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pages = sorted(site.glob("api/*/index.html"))
    assert pages, list(site.iterdir())
    total_math = 0
    for page in pages:
        html = page.read_text()
        for raw in (":math:", ".. math::", ":func:`", ":class:`", ":meth:`", ":mod:`"):
            assert raw not in html, (page.name, raw)
        # a formula never turns into a link ([i<d](...) in the Rosenbrock docstring)
        assert not re.search(r'href="[^"]*\\', html), page
        total_math += html.count('class="arithmatex"')
    assert total_math > 200, total_math
    assert not (site / "hooks").exists()  # the extension is not published
