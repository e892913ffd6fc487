"""Prompt to pixels: the JAX pipeline against diffusers' WanPipeline on a tiny random pipeline folder
(tests/fixtures/wan_pipeline, made by scripts/fixtures/make_wan_pipeline.py), `vidaccel generate`, and the
errors for unusable folders and sizes."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.cli import main as cli_main
from experiments.generate import method_denoiser, parse_size
from experiments.video_files import read_video, write_video
from models.wan_pipeline import (
    encode_prompt,
    generate,
    load_pipeline,
    read_pipeline_folder,
    to_uint8,
    with_causal_block_size,
)

FIX = Path(__file__).parent / "fixtures" / "wan_pipeline"
FOLDER = FIX / "t2v"


@pytest.fixture(scope="module")
def run():
    return dict(np.load(FIX / "t2v_run.npz")), json.loads((FIX / "t2v_run.json").read_text())


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(FOLDER, dtype="float32")


def test_folder_settings():
    folder = read_pipeline_folder(FOLDER)
    assert folder.kind == "t2v" and folder.class_name == "WanPipeline"
    assert folder.scheduler.solver == "unipc" and folder.scheduler.shift == 3.0 and folder.scheduler.solver_order == 2


def test_prompt_embeddings_equal_diffusers(pipe, run):
    ref, cfg = run
    ours = np.asarray(encode_prompt(pipe, cfg["prompt"] + cfg["negative_prompt"]))
    want = np.concatenate([ref["prompt_embeds"], ref["negative_prompt_embeds"]])
    np.testing.assert_allclose(ours, want, atol=1e-5, rtol=1e-5)


def test_whole_pipeline_equals_diffusers(pipe, run):
    ref, cfg = run
    latents = jnp.asarray(ref["latents"].transpose(0, 2, 3, 4, 1))  # (B, C, F, H, W) -> channels-last
    out = generate(pipe, cfg["prompt"], cfg["negative_prompt"], frames=cfg["num_frames"], height=cfg["height"],
                   width=cfg["width"], steps=cfg["num_inference_steps"], guidance=cfg["guidance_scale"],
                   latents=latents, output="float", progress=False)
    np.testing.assert_allclose(np.asarray(out.latents), ref["final_latents"].transpose(0, 2, 3, 4, 1),
                               atol=1e-4, rtol=1e-4)
    assert out.frames.shape == ref["frames"].shape
    # Stated tolerance: 1e-4 absolute on [0, 1] frames (fp32; the VAE's 3D convolutions sum in another order).
    np.testing.assert_allclose(out.frames, ref["frames"], atol=1e-4)
    assert out.work == {"calls": 8, "block_passes": 8, "token_layers": 8 * 3 * 2 * 3 * 2}
    assert set(out.seconds) == {"encode", "denoise", "decode"}
    levels = np.abs(to_uint8(out.frames).astype(int) - np.round(ref["frames"] * 255).astype(int))
    assert levels.max() <= 1 and levels.mean() < 1e-3  # only values on a rounding boundary may differ


def test_generate_cli_writes_mp4(tmp_path, capsys):
    out = tmp_path / "video.mp4"
    rc = cli_main(["generate", "--model", str(FOLDER), "--prompt", "a red ball rolls", "--frames", "5",
                   "--size", "48x32", "--steps", "2", "--method", "teacache", "--dtype", "float32",
                   "--out", str(out), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    frames = read_video(out)
    assert frames.shape == (5, 32, 48, 3)
    assert report["frames"] == 5 and report["size"] == [48, 32] and report["work"]["calls"] == 4


def test_video_files_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.zeros((3, 16, 24, 3), np.uint8)
    frames[:, 4:12, 6:18] = rng.integers(0, 255, (3, 1, 1, 3), dtype=np.uint8)
    for name in ("a.mp4", "a.gif"):
        back = read_video(write_video(tmp_path / name, frames, fps=8))
        assert back.shape == frames.shape
        assert np.abs(back.astype(int) - frames).mean() < 8
    with pytest.raises(ValueError, match="unsupported video format"):
        write_video(tmp_path / "a.avi", frames)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "b.mp4", frames.astype(np.float32))
    with pytest.raises(ValueError, match="even height and width"):
        write_video(tmp_path / "c.mp4", frames[:, :15])


@pytest.mark.parametrize("part", ["text_encoder", "vae", "tokenizer"])
def test_missing_part_is_one_clear_error(tmp_path, part):
    folder = tmp_path / "pipe"
    shutil.copytree(FOLDER, folder)
    shutil.rmtree(folder / part)
    (folder / "scheduler").rename(folder / "sched")
    with pytest.raises(ValueError, match=f"missing {part}/") as err:
        load_pipeline(folder)
    assert "missing scheduler/" in str(err.value)  # every problem in the one message


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no model_index.json"):
        load_pipeline(FOLDER / "transformer")


def test_mismatched_parts(tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(FOLDER, folder)
    shutil.rmtree(folder / "text_encoder")
    shutil.copytree(FIX / "text_encoder_24", folder / "text_encoder")
    with pytest.raises(ValueError, match="text_encoder d_model 24 != transformer text_dim 16"):
        load_pipeline(folder, dtype="float32")


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(frames=10), r"frames=10: the VAE takes 4k\+1 frames \(e.g. 9 or 13\)"),
    (dict(height=40), "height=40 must be a multiple of 16"),
    (dict(width=50), "width=50 must be a multiple of 16"),
    (dict(output="png"), "output='png' is not allowed"),
])
def test_bad_sizes(pipe, kwargs, match):
    args = dict(frames=5, height=32, width=48, steps=1, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(pipe, "a cat", **args)


def test_unknown_method(pipe, capsys):
    with pytest.raises(ValueError, match="method='fastcache' is not allowed"):
        method_denoiser(pipe, "fastcache")
    with pytest.raises(ValueError, match="method 'flowcache' does not run on WanPipeline folders"):
        method_denoiser(pipe, "flowcache")
    with pytest.raises(ValueError, match="--threshold applies to teacache, flowcache and motioncache"):
        method_denoiser(pipe, "haste-svg2", 0.5)
    with pytest.raises(SystemExit):
        cli_main(["generate", "--model", str(FOLDER), "--prompt", "x", "--method", "fastcache"])
    assert "invalid choice: 'fastcache'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("832by480")


# ------------------------------------------------------------------ SkyReels-V2 diffusion forcing
DF = FIX / "df"


@pytest.fixture(scope="module")
def df_pipe():
    return load_pipeline(DF, dtype="float32")


@pytest.mark.parametrize("name", ["sync", "async"])
def test_df_pipeline_equals_diffusers(df_pipe, name):
    """One window, synchronous (causal block 1) and asynchronous (block 2, ar_step 2), CFG 6, from diffusers'
    recorded noise; long videos over several windows are checked on latents in tests/test_df_pipeline.py."""
    ref = np.load(FIX / "df_run.npz")
    cfg = json.loads((FIX / "df_run.json").read_text())
    opts = cfg["runs"][name]
    pipe = with_causal_block_size(df_pipe, opts["causal_block_size"])
    assert df_pipe.folder.kind == "diffusion_forcing" and pipe.transformer.cfg.num_frame_per_block == opts[
        "causal_block_size"]
    out = generate(pipe, cfg["prompt"], cfg["negative_prompt"], frames=cfg["num_frames"],
                   base_frames=cfg["base_num_frames"], height=cfg["height"], width=cfg["width"],
                   steps=cfg["num_inference_steps"], guidance=cfg["guidance_scale"], ar_step=opts["ar_step"],
                   latents=jnp.asarray(ref[f"{name}_latents"].transpose(0, 2, 3, 4, 1)), output="float",
                   progress=False)
    np.testing.assert_allclose(out.frames, ref[f"{name}_frames"], atol=1e-4)
    rows = cfg["num_inference_steps"] + (4 // opts["causal_block_size"] - 1) * opts["ar_step"]
    assert out.work["calls"] == 2 * rows  # one call per row and CFG branch (vanilla: the whole window)


def test_df_generate_cli_flowcache(tmp_path, capsys):
    out = tmp_path / "long.gif"
    rc = cli_main(["generate", "--model", str(DF), "--prompt", "a cube", "--frames", "21", "--base-frames", "13",
                   "--overlap-history", "5", "--addnoise-condition", "20", "--ar-step", "1",
                   "--causal-block-size", "2", "--size", "32x32", "--steps", "12", "--method", "flowcache",
                   "--threshold", "0.5", "--dtype", "float32", "--out", str(out), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert read_video(out).shape == (21, 32, 32, 3)
    assert 0 < report["work"]["block_passes"] < report["work"]["calls"], report["work"]  # FlowCache skipped some


def test_df_errors(df_pipe, pipe):
    with pytest.raises(ValueError, match=r"frames=25 \(7 latent frames\) does not split into windows of 4 latent "
                                         r"frames overlapping by 2; the nearest frame counts that do are \[21, 29\]"):
        generate(df_pipe, "x", frames=25, base_frames=13, overlap_history=5, height=32, width=32, steps=1,
                 progress=False)
    with pytest.raises(ValueError, match="a long video needs overlap_history"):
        generate(df_pipe, "x", frames=25, base_frames=13, height=32, width=32, steps=1, progress=False)
    with pytest.raises(ValueError, match="diffusion-forcing options; WanPipeline folders do not take them"):
        generate(pipe, "x", frames=5, height=32, width=48, steps=1, ar_step=2, progress=False)
    with pytest.raises(ValueError, match="method 'haste-xattention' does not run on SkyReelsV2"):
        method_denoiser(df_pipe, "haste-xattention", window_frames=4)
