"""`python -m experiments.haste calibrate --base xattention|svg2`: EBC calibration of the shapes t2v model.

Writes the table to results/sparse/ebc_<base>.json (or `--out`). The shapes presets read the package copy in
experiments/calibrations/ instead: `--install` copies the new table there too; without it the command
prints the copy to make (tests/test_shapes_presets.py fails while the two files differ).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from experiments.haste.budget import SOLVERS
from experiments.haste.ebc import EBCConfig
from experiments.shapes_presets import SHAPES_BASES, calibrate_shapes_ebc, ebc_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.haste", description="HASTE's EBC calibration tool")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="measure per-head errors/densities and solve the budgeted table")
    c.add_argument("--base", choices=SHAPES_BASES, required=True)
    c.add_argument("--prompts", type=int, default=4, help="calibration prompts (train split; default %(default)s)")
    c.add_argument("--steps", type=int, default=50, help="sampler steps of the trajectory (default %(default)s)")
    c.add_argument("--positions", default="0.1,0.4,0.7", help="calibration steps as fractions of the sparse steps")
    c.add_argument("--budget", type=float, default=None, help="mean density budget (default: the shared threshold's)")
    c.add_argument("--reference", type=float, default=0.9, help="shared threshold defining the default budget")
    c.add_argument("--solver", choices=SOLVERS, default="dp")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--out", default=None, help="JSON path (default results/sparse/ebc_<base>.json)")
    c.add_argument("--install", action="store_true",
                   help="also copy the table to experiments/calibrations/ (what the shapes presets read)")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    cfg = EBCConfig(budget=a.budget, reference_threshold=a.reference, solver=a.solver,
                    positions=tuple(float(x) for x in a.positions.split(",")))
    table = calibrate_shapes_ebc(a.base, prompts=a.prompts, steps=a.steps, cfg=cfg, seed=a.seed)
    out = Path(a.out or f"results/sparse/ebc_{a.base}.json")
    table.save(out)
    pred = table.predicted()
    print(f"budget {table.budget:.4f}: table error {pred['table']['error']:.4g} at density "
          f"{pred['table']['density']:.4f}; shared {a.reference}: error "
          f"{pred[f'shared_{a.reference:g}']['error']:.4g}; wrote {out}")
    package_copy = ebc_file(a.base)
    if a.install:
        if out.resolve() != package_copy.resolve():
            shutil.copyfile(out, package_copy)
        print(f"installed it as {package_copy} (read by experiments.shapes_presets)")
    else:
        print(f"the shapes presets read {package_copy}: to use this table there, copy it over "
              f"(cp {out} {package_copy}) or rerun with --install")


if __name__ == "__main__":
    main()
