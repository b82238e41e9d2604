"""The README's quick start runs as written, and its commands are the ones CI uses."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quick_start_runs_and_escapes_the_saddle(capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python block"
    exec(compile(blocks[0], "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    value, episodes = lines[0].split()
    assert float(value) < -2.49 and int(episodes) >= 1
    evals, converged = lines[1].split()
    assert converged == "True" and int(evals) < 50_000
    assert 0.0 <= float(lines[2]) <= 1.0


def test_ci_runs_the_readme_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "readme_command test-command" in script
    out = subprocess.run(
        [
            "bash",
            "-c",
            f"source <(sed -n '/^readme_command()/,/^}}/p' {ROOT / '.ci' / 'run'}); cd {ROOT}; readme_command test-command",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out.startswith("python3 -m venv .venv") and "pip install torch==2.13.0" in out
    assert out.index("torch==2.13.0") < out.index('-e ".[all]"') and out.endswith(
        "python -m pytest -n 2"
    )
    main = re.search(r"<!-- main-command -->\n```bash\n(.*?)\n```", README).group(1)
    assert main.endswith("psd-experiments --quick") and "torch==2.13.0" in main
