"""colab/02_cache_policies.ipynb is stored without outputs and runs top to bottom in a Jupyter kernel at its
shortest setting (its tagged parameters cell is overridden: STEPS = 8, ITERS = 2, PROMPTS = 1)."""

import re

import nbformat
from notebook_runner import ROOT, cells_with_outputs, execute, read_notebook

NOTEBOOK = ROOT / "colab" / "02_cache_policies.ipynb"
SHORT = {"STEPS": 8, "ITERS": 2, "PROMPTS": 1}


def test_stored_valid_and_without_outputs():
    nb = read_notebook(NOTEBOOK)
    nbformat.validate(nb)
    assert not cells_with_outputs(nb), "cells carry outputs; clear them before committing"


def test_runs_top_to_bottom(tmp_path):
    text, _ = execute(NOTEBOOK, SHORT, tmp_path)
    computed = {}
    for name in ("TeaCache (calibrated)", "learned schedule"):
        m = re.search(rf"^{re.escape(name)} +([\d.]+) +([\d.]+)", text, re.M)
        assert m, f"no result row for {name} in:\n{text}"
        computed[name] = float(m.group(1))
    # counters on held-out prompts: the learned schedule's hard version spends the budget (0.5 of 8 steps);
    # TeaCache what its replay on the training prompts' recorded changes said (its e0 changes depend on t only)
    assert computed["learned schedule"] == 0.5
    replayed = re.search(r"^TeaCache threshold [\d.]+ computes ([\d.]+) of the calls", text, re.M)
    assert replayed and abs(computed["TeaCache (calibrated)"] - float(replayed.group(1))) < 1e-6
    assert re.search(r"^learned schedule: +[X.]{8}$", text, re.M)
    assert list(tmp_path.iterdir()) == [], "the notebook wrote files into its working folder"
