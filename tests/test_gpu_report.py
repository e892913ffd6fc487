"""The prepared GPU run (`experiments.gpu_report`): its CPU dry run end to end, the per-part time limits, and
that it imports nothing the GPU machine's image lacks."""

import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import gpu_report as G

ROOT = Path(__file__).resolve().parents[1]
CPU_ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
# what the device image has (issue 19); their own dependencies come with them
IMAGE = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "einops", "chex", "safetensors", "numpy", "scipy",
         "matplotlib", "imageio", "tqdm", "pytest")


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_dry")
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_report", "--out", str(out), "--dry-run",
                           "--budget-s", "1200"],
                          cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "report.json").read_text())


def test_dry_run_reports_every_part(dry):
    out, stdout, rep = dry
    assert rep["dry_run"] and list(rep["parts"]) == list(G.PARTS)
    bad = {n: (p["status"], p.get("stderr_tail")) for n, p in rep["parts"].items() if p["status"] != "ok"}
    assert not bad
    md = (out / "report.md").read_text()
    for name in G.PARTS:
        assert f"part {name}: ok" in stdout and f"| {name} | ok |" in md
        assert (out / "parts" / f"{name}.json").exists()
    assert "Correctness" in md and "Kernel speed" in md and "One denoising step" in md
    assert (out / "gpu_report.log").read_text().count("part ") >= 2 * len(G.PARTS)


def test_dry_run_correctness_rows_pass(dry):
    rows = dry[2]["parts"]["correctness"]["rows"]
    kernels = ("block_sparse", "cluster_sparse", "quantized_kv_int8", "quantized_kv_int4")
    assert {(r["kernel"], r["dtype"]) for r in rows} == {(k, d) for k in kernels for d in ("float32", "bfloat16")}
    for r in rows:
        assert r["error"] is None and r["finite"] and r["passed"], r
        assert 0 < r["rel_l2"] <= r["tolerance_rel_l2"] and 0 < r["max_abs_err"] < 0.1


def _finite_positive(*xs):
    return all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in xs)


def test_dry_run_numbers_are_finite(dry):
    parts = dry[2]["parts"]
    kern = parts["kernels"]
    assert _finite_positive(kern["copy_gbps"])
    names = {r["kernel"] for r in kern["rows"]}
    assert {"dense_xla", "block_sparse", "cluster_sparse", "quantized_kv_int8", "quantized_kv_int4"} <= names
    for r in kern["rows"]:
        assert r["error"] is None, r
        assert _finite_positive(r["seconds"], r["tflops_actual"], r["gbytes_per_s"], r["speedup_vs_xla"],
                                r["fraction_of_ideal"], r["copy_fraction"]), r
        assert r["ideal_speedup"] == pytest.approx(1 / r["actual_density"])
    step = {"dense", "teacache_skip", "fixed_mask@0.25", "haste_tmr_reuse@0.25", "xattention_topk@0.25"}
    for name, expected in (("step", step), ("step14b", {"dense", "teacache_skip"})):
        rows = parts[name]["rows"]
        assert expected <= {r["variant"] for r in rows}
        assert any(r["variant"].startswith("mask_prediction") for r in rows) == (name == "step")
        for r in rows:
            assert r["error"] is None and _finite_positive(r["seconds"], r["first_call_s"], r["vs_dense"]), r


def _writer(name, out, done=True, rows=(), then=""):
    rec = json.dumps({"rows": list(rows), "done": done})
    return [sys.executable, "-c", f"import pathlib, time; (pathlib.Path(r'{out}') / 'parts' / '{name}.json')"
                                  f".write_text({rec!r}); {then}"]


def test_part_over_its_limit_is_timed_out_and_next_part_runs(tmp_path):
    def command(name, out, dry):
        if name == "step":   # saves a row, then hangs
            return _writer(name, out, False, [{"variant": "dense", "seconds": 1.5}], "time.sleep(120)")
        if name == "kernels":
            return [sys.executable, "-c", "import sys; sys.exit('kernels broke')"]
        return _writer(name, out)

    t0 = time.monotonic()
    rep = G.orchestrate(tmp_path, ["env", "step", "kernels", "step14b"], True, 100.0, command=command,
                        limits={"env": 30, "step": 3, "kernels": 30, "step14b": 30})
    assert time.monotonic() - t0 < 60
    p = rep["parts"]
    assert p["step"]["status"] == "timed_out" and 3 <= p["step"]["seconds"] < 20
    assert p["step"]["rows"] == [{"variant": "dense", "seconds": 1.5}]   # what it measured before the limit
    assert p["kernels"]["status"] == "error" and "kernels broke" in p["kernels"]["stderr_tail"]
    assert p["env"]["status"] == "ok" and p["step14b"]["status"] == "ok"
    assert json.loads((tmp_path / "report.json").read_text())["parts"]["step"]["status"] == "timed_out"
    md = (tmp_path / "report.md").read_text()
    assert "| step | timed_out |" in md and "kernels broke" in md


def test_parts_past_the_budget_are_skipped(tmp_path):
    rep = G.orchestrate(tmp_path, ["env", "correctness"], True, 5.0, command=lambda n, o, d: _writer(n, o))
    assert [p["status"] for p in rep["parts"].values()] == ["skipped", "skipped"]


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_dependencies(dists) -> set[str]:
    seen, todo = set(), [_canon(d) for d in dists]
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        try:
            reqs = importlib.metadata.requires(d) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_canon(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in reqs if "extra ==" not in r]
    return seen


def test_imports_only_what_the_gpu_image_has():
    """Import the report with every installed package outside the image (and its dependencies) made
    unimportable, as on the device machine; optional imports (e.g. IPython) may fail quietly."""
    owners = importlib.metadata.packages_distributions()
    allowed = _with_dependencies(IMAGE) | {"vidaccel"}
    blocked = sorted(m for m, dists in owners.items()
                     if m not in sys.stdlib_module_names and not {_canon(d) for d in dists} & allowed)
    assert "dm_pix" in blocked and "jax" not in blocked
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "import experiments.gpu_report\nfrom jax._src import xla_bridge\nprint(len(xla_bridge._backends))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=CPU_ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # importing it starts no backend: the orchestrating process holds no GPU memory its parts need
    assert proc.stdout.split() == ["0"]
