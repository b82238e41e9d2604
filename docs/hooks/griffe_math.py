"""Griffe extension: render the docstrings' Sphinx roles in the MkDocs API reference.

The package's docstrings are Google style (``Args:`` / ``Returns:``) with inline math
written as Sphinx roles (``:math:`x```) and display math as ``.. math::`` directives.
mkdocstrings parses the sections but hands the text to Markdown, which would print
the roles verbatim. This extension rewrites each docstring before it is parsed:

* ``:math:`x``` becomes ``\\(x\\)`` and a ``.. math::`` block becomes ``\\[ ... \\]``
  (wrapped in ``aligned`` when it has several rows), both rendered by
  ``pymdownx.arithmatex`` + MathJax (see ``mkdocs.yml``); Arithmatex also keeps
  Markdown away from the formula (``[i<d](...)`` is not a link, ``_`` is not emphasis);
* ``:func:`a.b```, ``:class:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:data:`` become
  inline code (``~a.b`` shows ``b``, as in Sphinx).

The source docstrings stay as they are (Sphinx roles still read well in ``help()``).
Enabled in ``mkdocs.yml`` under ``mkdocstrings.handlers.python.options.extensions``;
``tests/test_docs_render.py`` builds the site and checks that no role is left.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_XREF = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc):`~?([^`]+)`")
_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<rest>.*)$")


def _xref(match: re.Match[str]) -> str:
    target = match.group(1).strip()
    if match.group(0).split("`", 1)[1].startswith("~"):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _inline(match: re.Match[str]) -> str:
    body = re.sub(r"\s*\n\s*", " ", match.group(1).strip())
    return f"\\({body}\\)"


def _display(indent: str, rows: list[str]) -> list[str]:
    body = [r.strip() for r in rows if r.strip()]
    text = "\n".join(body)
    if "\\\\" in text or "&" in text:
        body = ["\\begin{aligned}", *body, "\\end{aligned}"]
    return ["", f"{indent}\\[", *(f"{indent}{b}" for b in body), f"{indent}\\]", ""]


def _blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if m is None:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group("indent")
        rows = [m.group("rest")] if m.group("rest").strip() else []
        i += 1
        while i < len(lines):
            line = lines[i]
            if line.strip() == "":
                # a blank line ends the block unless the next line is still indented
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                if rows and not (nxt.strip() and _indent(nxt) > len(indent)):
                    break
                i += 1
                continue
            if _indent(line) <= len(indent):
                break
            rows.append(line)
            i += 1
        out.extend(_display(indent, rows))
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def convert(text: str) -> str:
    """The docstring ``text`` with Sphinx math and cross-reference roles made Markdown."""
    text = _blocks(text)
    text = _INLINE_MATH.sub(_inline, text)
    return _XREF.sub(_xref, text)


class SphinxRolesToMarkdown(griffe.Extension):
    """Rewrite every docstring with :func:`convert` as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
