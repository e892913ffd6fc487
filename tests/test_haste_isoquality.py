"""HASTE at equal quality (experiments.haste_isoquality): the matched point on made-up curves, the budget
grid, the CLI's validation and a tiny end-to-end run that writes the files."""

import json

import numpy as np
import pytest

from experiments.haste_isoquality import IsoConfig, budget_grid, matched_point, parse_config, run_isoquality


def _curve(densities, psnrs, flops=None):
    flops = densities if flops is None else flops
    return [{"density": d, "psnr": p, "attention_flops_ratio": f, "seconds": 10 * f}
            for d, p, f in zip(densities, psnrs, flops, strict=True)]


def test_matched_point_interpolates_the_first_crossing():
    """Given out of order; target 25 lies a quarter of the way from (0.5, 24) to (0.6, 28): density 0.525,
    FLOPs and seconds interpolated alike. The later dip below the target does not matter."""
    pts = _curve([0.6, 0.4, 0.5, 0.7, 0.8], [28.0, 20.0, 24.0, 23.0, 30.0], [0.62, 0.41, 0.52, 0.72, 0.83])
    m = matched_point(pts, 25.0)
    assert m["reached"] and not m["at_first_point"]
    assert m["density"] == pytest.approx(0.525)
    assert m["attention_flops_ratio"] == pytest.approx(0.52 + 0.25 * 0.10)
    assert m["seconds"] == pytest.approx(10 * (0.52 + 0.25 * 0.10))
    assert m["between"] == [0.5, 0.6]
    exact = matched_point(pts, 24.0)                # equal to a point: that point
    assert exact["density"] == pytest.approx(0.5) and exact["attention_flops_ratio"] == pytest.approx(0.52)


def test_matched_point_never_reached_and_at_the_first_point():
    pts = _curve([0.3, 0.5, 0.7], [18.0, 22.0, 26.0])
    never = matched_point(pts, 26.5)
    assert never == {"reached": False, "at_first_point": False, "density": None, "between": None,
                     "attention_flops_ratio": None, "seconds": None}
    first = matched_point(pts, 15.0)
    assert first["reached"] and first["at_first_point"]
    assert first["density"] == 0.3 and first["attention_flops_ratio"] == 0.3 and first["seconds"] == 3.0
    assert not matched_point([], 10.0)["reached"]
    no_time = [dict(p, seconds=None) for p in pts]
    assert matched_point(no_time, 20.0)["seconds"] is None


def test_budget_grid():
    """Fractions of the densest tau's density plus each tau's own (kept exactly), floored and deduplicated."""
    cal = {0.8: 0.7, 0.9: 0.83, 0.95: 0.9}
    g = budget_grid(cal, (0.4, 0.5, 1.0), floor=0.4)
    assert g == pytest.approx([0.4, 0.45, 0.7, 0.83, 0.9])
    assert 0.83 in g and 0.9 in g and all(np.diff(g) > 0)


@pytest.mark.parametrize("args,message", [
    (["--taus", "0.9,1.5"], "taus"), (["--taus", "0"], "taus"), (["--taus", "0.75"], "not thresholds"),
    (["--taus", ""], "taus"), (["--fractions", "0,0.5"], "fractions"), (["--fractions", "0.5,1.2"], "fractions"),
    (["--fractions", "0.5,0.5"], "fractions"), (["--fractions", "x"], "could not convert"),
    (["--bases", "flash"], "bases"), (["--granularities", "block"], "granularities"), (["--prompts", "0"], "prompts"),
])
def test_cli_refuses_bad_values(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_defaults():
    cfg, out = parse_config([])
    assert cfg == IsoConfig() and str(out) == "results/sparse"
    assert cfg.taus == (0.8, 0.9, 0.95) and len(cfg.fractions) == 6 and max(cfg.fractions) == 1.0


def test_tiny_run_writes_the_files(tmp_path):
    """1 prompt, XAttention, per-head TMR, 2 budgets; 6 UniPC steps, as XAttention's 5 warm-up steps are dense
    (one sparse step; XAttention compiles in about half SVG2's time)."""
    cfg, _ = parse_config(["--prompts", "1", "--steps", "6", "--taus", "0.9", "--fractions", "0.6,1.0",
                           "--bases", "xattention", "--granularities", "head", "--repeats", "1"])
    res = run_isoquality(cfg, tmp_path, log=lambda *_: None)
    saved = json.loads((tmp_path / "isoquality.json").read_text())
    assert len(saved["budgets"]["xattention"]) == 2
    haste_rows = [r for r in saved["rows"] if r["variant"] == "haste"]
    assert len(haste_rows) == 2 and all(r["granularity"] == "head" for r in haste_rows)
    assert all(np.isfinite(r["psnr"]) and 0 < r["density"] <= 1 for r in haste_rows)
    assert all(r["head_masks_predicted"] > 0 for r in haste_rows)
    (c,) = saved["comparison"]
    assert c["tau"] == 0.9 and c["points"] == 2 and c == res["comparison"][0]
    md = (tmp_path / "isoquality.md").read_text()
    assert "## Matched quality" in md and "XAttention" in md
    try:
        import matplotlib  # noqa: F401, PLC0415  the plot is optional
    except ModuleNotFoundError:
        return
    assert (tmp_path / "isoquality.png").stat().st_size > 0
