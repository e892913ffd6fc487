"""colab/03_prompt_to_video.ipynb is stored without outputs and runs top to bottom on the tiny random pipeline
folder of the fixtures (no MODEL_PATH, no download): dense and TeaCache, 5 frames at 48x32, 8 steps
(TeaCache computes its first 5)."""

import re

import nbformat
from notebook_runner import ROOT, cells_with_outputs, execute, read_notebook

NOTEBOOK = ROOT / "colab" / "03_prompt_to_video.ipynb"
TINY = {"FRAMES": 5, "WIDTH, HEIGHT": (48, 32), "STEPS": 8, "METHOD": "teacache"}


def test_stored_valid_and_without_outputs():
    nb = read_notebook(NOTEBOOK)
    nbformat.validate(nb)
    assert not cells_with_outputs(nb), "cells carry outputs; clear them before committing"


def test_runs_on_the_tiny_pipeline(tmp_path):
    text, html = execute(NOTEBOOK, TINY, tmp_path)
    assert "tests/fixtures/wan_pipeline/t2v" in text
    for name in ("dense", "teacache"):
        assert re.search(rf"^{name} +denoise +[\d.]+ s", text, re.M), f"no result row for {name} in:\n{text}"
    assert html.count("data:video/mp4;base64,") == 2
    passes = re.search(r"^teacache +denoise +[\d.]+ s +block-stack passes +(\d+) / +(\d+) calls", text, re.M)
    assert int(passes[1]) < int(passes[2]) == 16, "TeaCache skipped no step in 8"
    assert list(tmp_path.iterdir()) == [], "the notebook wrote files into its working folder"

