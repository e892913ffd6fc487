"""The layers import one way: pallas_kernels <- vidaccel <- models <- experiments (the CLI and demo live in
experiments, the application layer). No module imports a higher layer, or a private name (`_x`) of another
package. Read from the source with `ast`, so a lazy import inside a function is caught too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"pallas_kernels": 0, "vidaccel": 1, "models": 2, "experiments": 3}


def _modules():
    for top in LAYERS:
        yield from sorted((ROOT / top).rglob("*.py"))


def _package_of(path: Path) -> str:
    """Dotted package that holds `path` (e.g. models.ar for models/ar/rollout.py)."""
    return ".".join(path.relative_to(ROOT).parent.parts)


def _imports(tree: ast.AST, package: str):
    """(line, imported module, imported names) for every import of a project module in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LAYERS:
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if module.split(".")[0] in LAYERS:
                yield node.lineno, module, [a.name for a in node.names]


def _violations(path: Path, source: str) -> list[str]:
    package = _package_of(path)
    layer = LAYERS[package.split(".")[0]]
    found = []
    for line, module, names in _imports(ast.parse(source), package):
        where = f"{path.relative_to(ROOT)}:{line}"
        if LAYERS[module.split(".")[0]] > layer:
            found.append(f"{where} imports {module}, a higher layer than {package.split('.')[0]}")
        parts = module.split(".")
        # the package the imported module belongs to: itself if it is a package, else its parent
        target_is_pkg = (ROOT.joinpath(*parts) / "__init__.py").exists()
        target_pkg = module if target_is_pkg else ".".join(parts[:-1])
        if target_pkg == package:
            continue
        private = [p for p in parts if p.startswith("_")] + [n for n in names if n.startswith("_")]
        if private:
            found.append(f"{where} imports private {private} of {target_pkg} from {package}")
    return found


def test_no_upward_or_private_imports():
    bad = [v for path in _modules() for v in _violations(path, path.read_text())]
    assert not bad, "layering violations:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, expect", [
    ("import experiments.teacache\n", "a higher layer"),
    ("import experiments\n", "a higher layer"),
    ("def f():\n    from experiments.demo import run_demo\n", "a higher layer"),
    ("from pallas_kernels._common import ALLOWED_BLOCKS\n", "private"),
    ("from pallas_kernels import _common\n", "private"),
    ("from vidaccel.sampling import _tick\n", "private"),
    ("from models.wan.transformer import _x\n", "private"),
])
def test_the_walker_catches_each_kind(source, expect):
    """The checker itself fails on each kind of violation (here as if written in models/ar/rollout.py)."""
    assert any(expect in v for v in _violations(ROOT / "models" / "ar" / "rollout.py", source))


def test_the_walker_allows_downward_and_same_package_imports():
    src = "from pallas_kernels import block_sparse_attention\nfrom vidaccel.checks import int_arg\n"
    assert _violations(ROOT / "models" / "wan" / "loader.py", src) == []
    assert _violations(ROOT / "pallas_kernels" / "reference.py", "from pallas_kernels._common import x\n") == []
