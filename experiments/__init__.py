"""One module per paper (config with the paper's defaults, the transform, the command reproducing its table),
plus the evaluations of the embedded models.

`RESULTS_ROOT` is the repository's `results/` folder: commands write there by default (relative to the
working directory, like any CLI), and files the library reads back at run time (calibrations used by
`vidaccel demo`) are looked up there wherever the command is started from.
"""

from pathlib import Path

RESULTS_ROOT = Path(__file__).resolve().parents[1] / "results"
