"""`pip install .` (not editable) gives a working library and `vidaccel` command.

The wheel ships every module and data file (the Orbax checkpoints' extensionless files included); installed
into a fresh venv, `vidaccel demo` runs from an empty folder with nothing from the source tree on the path.
The curated import surface (`from vidaccel import ...`, `from models import ...`) is checked here too.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import models
import vidaccel

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vidaccel", "pallas_kernels", "models", "experiments")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    """Run `cmd`; on failure, fail the test with its output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _package_files(root: Path) -> set[str]:
    """Every file under the packages in `root`, as the wheel names it."""
    return {p.relative_to(root).as_posix() for top in PACKAGES for p in (root / top).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a clean copy of the sources (a stale build/ in the checkout cannot leak into it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for top in PACKAGES:
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "dist", src])
    (found,) = (tmp / "dist").glob("vidaccel-*.whl")
    return found


def test_wheel_ships_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_package_files(wheel.parents[1] / "src") - names)
    assert not missing, f"files under {PACKAGES} missing from the wheel (a package without __init__.py, or a " \
                        f"data file no package-data glob covers):\n" + "\n".join(missing)
    assert any(n.startswith("models/shapes/checkpoints/t2v/params/d/") for n in names)
    assert wheel.name.startswith(f"vidaccel-{vidaccel.__version__}-")


@pytest.mark.slow
def test_fresh_venv_runs_the_demo_from_an_empty_folder(wheel, tmp_path):
    """About 1-2 minutes: venv, install with dependencies (pip's cache or PyPI), and a 4-step demo on CPU."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", "--no-compile", wheel])
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["JAX_PLATFORMS"] = "cpu"
    where = _run([py, "-c", "import vidaccel, models, experiments, pallas_kernels as p; "
                  "print('\\n'.join(m.__file__ for m in (vidaccel, models, experiments, p)))"],
                 cwd=empty, env=env).stdout.splitlines()
    assert all(Path(f).is_relative_to(venv) for f in where), f"not imported from the venv: {where}"
    out = tmp_path / "demo"
    _run([venv / "bin" / "vidaccel", "demo", "--prompts", "1", "--steps", "4", "--out", out], cwd=empty, env=env)
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["methods"]][0] == "dense" and len(report["methods"]) > 1
    setups = " ".join(r.get("setup", "") for r in report["methods"])
    assert "ebc_xattention.json" in setups, f"the installed demo did not find its packaged calibration: {setups}"
    assert list(empty.iterdir()) == [], "the demo wrote into the working folder"


@pytest.mark.parametrize("package", [vidaccel, models])
def test_curated_names_are_real_and_hide_no_submodule(package):
    for name in package.__all__:
        obj = getattr(package, name)
        assert obj.__module__.startswith(package.__name__ + "."), (name, obj.__module__)
        submodule = sys.modules.get(f"{package.__name__}.{name}")
        assert submodule is None, f"{package.__name__}.{name} hides the submodule of the same name"


def test_importing_vidaccel_imports_no_higher_layer():
    code = "import sys, vidaccel; print(sorted({m.split('.')[0] for m in sys.modules} & {'models', 'experiments'}))"
    assert _run([sys.executable, "-c", code], cwd=ROOT).stdout.strip() == "[]"
