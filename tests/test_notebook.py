"""colab/01_quickstart.ipynb is stored without outputs and runs top to bottom in a Jupyter kernel, at its
shortest setting (its tagged parameters cell is overridden: STEPS = 4, PROMPTS = 1)."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "01_quickstart.ipynb"
SHORT = {"STEPS": 4, "PROMPTS": 1}


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged 'parameters', found {len(cells)}"
    return cells[0]


def _override(source: str, values: dict) -> str:
    for name, value in values.items():
        source, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", source, flags=re.M)
        assert n == 1, f"the parameters cell assigns {name} {n} times, not once"
    return source


def test_stored_valid_and_without_outputs():
    nb = _read()
    nbformat.validate(nb)
    with_outputs = [i for i, c in enumerate(nb.cells)
                    if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not with_outputs, f"cells {with_outputs} carry outputs; clear them before committing"


def test_override_replaces_each_parameter():
    assert _override("STEPS = 50  # steps\nPROMPTS = 4\n", SHORT) == "STEPS = 4\nPROMPTS = 1\n"
    with pytest.raises(AssertionError, match="PROMPTS 0 times"):
        _override("STEPS = 50\n", SHORT)


def test_runs_top_to_bottom(tmp_path):
    """About 30 s on 2 CPU cores: load the model, dense + TeaCache + HASTE at 4 steps on one prompt."""
    nb = _read()
    cell = _parameters_cell(nb)
    cell.source = _override(cell.source, SHORT)
    # The kernel inherits this process's environment: JAX_PLATFORMS=cpu (tests/conftest.py).
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs if o.output_type == "display_data")
    for name in ("dense", "TeaCache", "HASTE (XAttention)"):
        assert re.search(rf"^{re.escape(name)} +\d", text, re.M), f"no result row for {name} in:\n{text}"
    assert html.count("data:image/gif;base64,") == 4, "expected 4 GIFs: rendered scene + 3 methods, 1 prompt"
    assert "density of the sparse calls" in text
    assert list(tmp_path.iterdir()) == [], "the notebook wrote files into its working folder"
