"""The tree passes `ruff check` with the rules in pyproject.toml (imports at the top, sorted; pyflakes; bugbear)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"ruff check found problems (fix, or `ruff check --fix` for the [*] ones):\n" \
                                 f"{proc.stdout}{proc.stderr}"


def test_ruff_sees_a_violation(tmp_path):
    """The linter runs with the project's rules: a function-level import is reported (PLC0415)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import json\n\n    return json\n")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config", ROOT / "pyproject.toml",
                           bad], capture_output=True, text=True)
    assert proc.returncode == 1 and "PLC0415" in proc.stdout, proc.stdout + proc.stderr
