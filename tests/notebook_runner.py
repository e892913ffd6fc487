"""Shared by the notebook tests: read a notebook, override its tagged parameters cell, execute it top to bottom
in a Jupyter kernel, and collect what it printed and displayed."""

import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def read_notebook(path: Path):
    return nbformat.read(path, as_version=4)


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged 'parameters', found {len(cells)}"
    return cells[0]


def override(source: str, values: dict) -> str:
    """Replace each `NAME = ...` line of a parameters cell (each must be assigned exactly once)."""
    for name, value in values.items():
        source, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", source, flags=re.M)
        assert n == 1, f"the parameters cell assigns {name} {n} times, not once"
    return source


def cells_with_outputs(nb) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]


def execute(path: Path, values: dict, cwd: Path, timeout: int = 600) -> tuple[str, str]:
    """Run the notebook with `values` in its parameters cell, in folder `cwd`; returns (stdout text, html).

    Only stdout is returned: progress bars and warnings on stderr would interleave with printed rows."""
    nb = read_notebook(path)
    cell = parameters_cell(nb)
    cell.source = override(cell.source, values)
    # The kernel inherits this process's environment: JAX_PLATFORMS=cpu (tests/conftest.py).
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.get("name") == "stdout")
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs if o.output_type == "display_data")
    return text, html
