"""The `vidaccel` command: help lists the subcommands; presets and convert work; errors are clean."""

import json
import subprocess
import sys

import pytest

from experiments.cli import COMMANDS, main
from tests.wan_fixtures import FIXTURES


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "experiments.cli", "--help"], capture_output=True, text=True,
                         check=True)
    for name in COMMANDS:
        assert name in out.stdout


def test_presets_json(capsys):
    assert main(["presets", "--json"]) == 0
    rows = {r["preset"]: r["parameters"] for r in json.loads(capsys.readouterr().out)}
    assert rows["wan21_t2v_1_3b"] == 1_418_996_800


def test_convert_and_bad_checkpoint(tmp_path, capsys):
    assert main(["convert", str(FIXTURES / "a" / "model"), str(tmp_path / "c"), "--dtype", "float32"]) == 0
    assert (tmp_path / "c" / "wan_config.json").exists()
    assert main(["convert", str(tmp_path), str(tmp_path / "d")]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_demo_unwritable_out_is_one_line_error(tmp_path, capsys, where):
    """An --out that is a regular file, or lies under one, is an OSError: one clean line and exit code 2."""
    blocker = tmp_path / "taken"
    blocker.write_text("a regular file")
    out = blocker if where == "file" else blocker / "demo"
    assert main(["demo", "--out", str(out), "--prompts", "1", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vidaccel demo: error: ") and str(out) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_demo_refuses_too_many_prompts_before_sampling(capsys):
    assert main(["demo", "--prompts", "600", "--out", "/nonexistent/never-made"]) == 2
    err = capsys.readouterr().err
    assert "num_prompts=600 is out of range; allowed: 1 to 511" in err and "65,535 pixels wide" in err
