"""Smoke test of the asynchronous caching table (`python -m experiments.async_cache_table`): a tiny run writes
both files with the expected columns, vanilla's FLOP ratio is 1, and a rerun resumes instead of recomputing."""

import json

import pytest

from experiments.async_cache_table import COLUMNS, Setup, geometry, main, method_specs


def test_geometry_is_the_papers_setting():
    g = geometry(Setup(), 2)
    assert (g["frames"], g["window_frames"], g["overlap_frames"], g["windows"]) == (32, 8, 2, 5)
    # vanilla: 4 chunks x (65 + 4 x 60) rows per branch; chunks: 4 x 50 + 4 x (3 x 50 + 1 prefix)
    assert (g["vanilla_units"], g["chunk_units"]) == (1220, 804)
    names = method_specs(4)
    assert {"vanilla", "teacache-paper-slow", "flowcache-magi-30", "motioncache-50",
            "flowcache-paper-slow+kvc"} <= set(names)
    with pytest.raises(ValueError, match="unknown rows"):
        Setup(methods=("nope",))


def test_tiny_table_writes_both_files(tmp_path, capsys):
    args = ["--n", "1", "--steps", "4", "--ar-step", "1", "--length", "1",
            "--methods", "vanilla,flowcache-paper-slow", "--out", str(tmp_path)]
    main(args)
    report = json.loads((tmp_path / "async_table.json").read_text())
    md = (tmp_path / "async_table.md").read_text()
    assert report["complete"] and [r["method"] for r in report["rows"]] == ["vanilla", "flowcache-paper-slow"]
    van, fc = report["rows"]
    assert van["flops_fraction"] == 1.0 and van["psnr"] is None
    assert 0 < fc["flops_fraction"] < 1 and fc["psnr"] > 10
    assert van["kv_bytes_per_video"] == 0 and fc["kv_bytes_per_video"] > 0
    header = md.split("\n\n")[1].splitlines()[0]
    assert header == "| " + " | ".join(COLUMNS) + " |"
    assert "FlowCache > TeaCache at the papers' slow thresholds: not measured" in md
    main(args)                                   # same setup: resumes, nothing is recomputed
    assert "resuming: ['vanilla', 'flowcache-paper-slow'] already done" in capsys.readouterr().out
