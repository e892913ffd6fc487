"""The `vidaccel` command: help lists the subcommands; presets and convert work; errors are clean."""

import json
import subprocess
import sys

from tests.wan_fixtures import FIXTURES
from experiments.cli import COMMANDS, main


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "experiments.cli", "--help"], capture_output=True, text=True, check=True)
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
