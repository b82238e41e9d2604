"""Build the docs' results page from a finished run.

``python -m psd_experiments.docs RESULTS_DIR docs/results.md`` copies the figures
into ``docs/results_figures/`` (next to the page, so they render) and rewrites
``summary.md``'s image links to point there.
"""

from __future__ import annotations

import os
import re
import shutil
import sys


def build(results_dir: str, page: str) -> str:
    # "<page stem>_figures": a plain "results/" would match the repository's .gitignore
    fig_dir_name = os.path.splitext(os.path.basename(page))[0] + "_figures"
    fig_dir = os.path.join(os.path.dirname(page) or ".", fig_dir_name)
    os.makedirs(fig_dir, exist_ok=True)
    for f in sorted(os.listdir(results_dir)):
        if f.endswith((".png", ".csv")):
            shutil.copy2(os.path.join(results_dir, f), os.path.join(fig_dir, f))
    with open(os.path.join(results_dir, "summary.md")) as fh:
        text = fh.read()
    text = re.sub(r"!\[([^\]]*)\]\(([^)]*?)([^/)]+\.png)\)", rf"![\1]({fig_dir_name}/\3)", text)
    note = (
        f"\n\nThis page was built from the `summary.md` of the run described below by "
        f"`python -m psd_experiments.docs {results_dir} {page}`; the figures and CSVs are in "
        f"`{fig_dir_name}/`.\n"
    )
    text = text.replace("\n", note, 1) if text.startswith("# ") else text
    with open(page, "w") as fh:
        fh.write(text)
    return page


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m psd_experiments.docs RESULTS_DIR PAGE.md", file=sys.stderr)
        return 2
    print(build(argv[0], argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
