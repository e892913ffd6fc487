"""`vidaccel demo` (experiments.demo): prompt counts checked before any sampling; a tiny run writes its report
and GIFs that read back with every frame."""

import json

import imageio.v3 as iio
import numpy as np
import pytest

import experiments.demo as demo
from models.shapes import VIDEO_FRAMES, VIDEO_SIZE


@pytest.mark.parametrize("bad", [0, demo.MAX_PROMPTS + 1, 600])
def test_prompt_count_is_checked_before_sampling(tmp_path, monkeypatch, bad):
    def never(*args, **kwargs):
        raise AssertionError("the demo loaded the model or sampled before checking its arguments")

    monkeypatch.setattr(demo, "load_shapes_model", never)
    monkeypatch.setattr(demo, "generate_t2v", never)
    with pytest.raises(ValueError, match=rf"num_prompts={bad} is out of range; allowed: 1 to {demo.MAX_PROMPTS}"):
        demo.run_demo(tmp_path / "out", num_prompts=bad, steps=2)
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError, match="num_prompts must be an int"):
        demo.run_demo(tmp_path, num_prompts=2.0)


def test_the_gif_width_limit_gives_the_prompt_limit():
    width = VIDEO_SIZE * demo.GIF_SCALE
    assert demo.MAX_PROMPTS * width <= 65_535 < (demo.MAX_PROMPTS + 1) * width
    assert demo.check_num_prompts(demo.MAX_PROMPTS) == demo.MAX_PROMPTS


def test_write_gif_lays_videos_side_by_side(tmp_path):
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (3, 5, 4, 6, 3), dtype=np.uint8)
    demo.write_gif(videos, tmp_path / "v.gif", scale=2)
    frames = iio.imread(tmp_path / "v.gif", index=None)
    assert frames.shape[:3] == (5, 8, 36)
    first = frames[0, ..., :3].astype(int)            # GIF palettes are lossy: compare loosely, per video
    for b in range(3):
        want = videos[b, 0].repeat(2, 0).repeat(2, 1).astype(int)
        assert np.abs(first[:, 12 * b:12 * (b + 1)] - want).mean() < 24
    with pytest.raises(ValueError, match="at most 65,535"):
        demo.write_gif(np.zeros((2, 1, 4, 40_000, 3), np.uint8), tmp_path / "wide.gif", scale=1)
    rows = rng.integers(0, 256, (2, 3, 5, 4, 6, 3), dtype=np.uint8)     # (R, B, T, H, W, 3): rows of videos
    demo.write_gif(rows, tmp_path / "rows.gif", scale=1)
    frames = iio.imread(tmp_path / "rows.gif", index=None)[..., :3].astype(int)
    assert frames.shape[:3] == (5, 8, 18)
    for r in range(2):
        for b in range(3):
            assert np.abs(frames[0, 4 * r:4 * (r + 1), 6 * b:6 * (b + 1)] - rows[r, b, 0]).mean() < 24
    with pytest.raises(ValueError, match="expected"):
        demo.write_gif(np.zeros((4, 6, 3), np.uint8), tmp_path / "bad.gif")


def test_tiny_demo_writes_report_and_gifs(tmp_path):
    report = demo.run_demo(tmp_path, num_prompts=1, steps=4, log=lambda *a: None)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [r["method"] for r in saved["methods"]] == list(demo.DEMO_METHODS) == [r["method"] for r in
                                                                                   report["methods"]]
    md = (tmp_path / "report.md").read_text()
    for row in saved["methods"]:
        frames = iio.imread(tmp_path / f"{row['method']}.gif", index=None)
        assert frames.shape[:3] == (VIDEO_FRAMES, VIDEO_SIZE * demo.GIF_SCALE, VIDEO_SIZE * demo.GIF_SCALE)
        assert f"| {row['method']} |" in md and row["seconds"] > 0 and 0.0 <= row["adherence"] <= 1.0
        if row["method"] != "dense":
            assert row["setup"] in md and row["psnr_vs_dense"] <= 100.0 and row["speedup"] > 0
    truth = iio.imread(tmp_path / "ground_truth.gif", index=None)
    assert truth.shape[:3] == (VIDEO_FRAMES, VIDEO_SIZE * demo.GIF_SCALE, VIDEO_SIZE * demo.GIF_SCALE)
    assert saved["ground_truth_adherence"] > 0.9 and "ground_truth.gif" in md    # a render follows its prompt
    rows = len(saved["methods"]) + 1
    assert iio.imread(tmp_path / "compare.gif", index=None).shape[1] == rows * VIDEO_SIZE * demo.GIF_SCALE
    # TeaCache's packaged calibration is for 50 steps: at 4 it calibrates on the spot, and the report says so
    assert "calibrated on the spot" in saved["methods"][1]["setup"]
    assert "per-head thresholds from ebc_xattention.json" in saved["methods"][2]["setup"]
