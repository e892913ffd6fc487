"""colab/01_quickstart.ipynb is stored without outputs and runs top to bottom in a Jupyter kernel, at its
shortest setting (its tagged parameters cell is overridden: STEPS = 4, PROMPTS = 1)."""

import re

import nbformat
import pytest
from notebook_runner import ROOT, cells_with_outputs, execute, override, read_notebook

NOTEBOOK = ROOT / "colab" / "01_quickstart.ipynb"
SHORT = {"STEPS": 4, "PROMPTS": 1}


def test_stored_valid_and_without_outputs():
    nb = read_notebook(NOTEBOOK)
    nbformat.validate(nb)
    assert not cells_with_outputs(nb), "cells carry outputs; clear them before committing"


def test_override_replaces_each_parameter():
    assert override("STEPS = 50  # steps\nPROMPTS = 4\n", SHORT) == "STEPS = 4\nPROMPTS = 1\n"
    with pytest.raises(AssertionError, match="PROMPTS 0 times"):
        override("STEPS = 50\n", SHORT)


def test_runs_top_to_bottom(tmp_path):
    """About 30 s on 2 CPU cores: load the model, dense + TeaCache + HASTE at 4 steps on one prompt."""
    text, html = execute(NOTEBOOK, SHORT, tmp_path)
    for name in ("dense", "TeaCache", "HASTE (XAttention)"):
        assert re.search(rf"^{re.escape(name)} +\d", text, re.M), f"no result row for {name} in:\n{text}"
    assert html.count("data:image/gif;base64,") == 4, "expected 4 GIFs: rendered scene + 3 methods, 1 prompt"
    assert "density of the sparse calls" in text
    assert list(tmp_path.iterdir()) == [], "the notebook wrote files into its working folder"
