"""Wan2.1 VAE (models/wan_vae) against diffusers' AutoencoderKLWan: parity on tiny random models (fixtures made by
scripts/fixtures/make_wan_vae.py), latent normalisation, the loader and its errors, input and config checks."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from models.wan_vae import (
    WanVAEConfig,
    abstract_wan_vae,
    count_params,
    decode_memory_report,
    denormalize_latents,
    init_wan_vae,
    load_wan_vae,
    normalize_latents,
    sample_posterior,
    wan21_vae,
    wan_vae_tiny,
)

FIX = Path(__file__).parent / "fixtures" / "wan_vae"
WEIGHTS = "diffusion_pytorch_model.safetensors"
TOL = 1e-4  # fp32 max abs error vs diffusers


@pytest.fixture(scope="module")
def vaes():
    return {case: load_wan_vae(FIX / case / "model") for case in "ab"}


def _io(case):
    return np.load(FIX / case / "io.npz")


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("case,i", [("a", 0), ("a", 1), ("b", 0)])
def test_encode_matches_diffusers(vaes, case, i):
    """9 frames (batch 2), 1 frame (batch 2), 5 frames (other architecture): mean and logvar."""
    io = _io(case)
    mean, logvar = vaes[case].encode_moments(jnp.asarray(io[f"enc{i}_video"]))
    assert mean.shape == io[f"enc{i}_mean"].shape
    assert _max_err(mean, io[f"enc{i}_mean"]) <= TOL
    assert _max_err(logvar, io[f"enc{i}_logvar"]) <= TOL


@pytest.mark.parametrize("case,i", [("a", 0), ("a", 1), ("b", 0)])
def test_decode_matches_diffusers(vaes, case, i):
    """3 latent frames -> 9 frames (batch 2, non-square), 1 -> 1, and 2 -> 3 with one temporal upsampler."""
    io = _io(case)
    video = vaes[case].decode(jnp.asarray(io[f"dec{i}_latents"]))
    ref = io[f"dec{i}_video"]
    assert video.shape == ref.shape
    assert float(jnp.max(jnp.abs(video))) <= 1.0
    assert _max_err(video, ref) <= TOL


def test_latent_normalisation_matches_pipeline_and_round_trips():
    vae_cfg = load_wan_vae(FIX / "a" / "model").cfg
    io = _io("a")
    lat = jnp.asarray(io["norm_latents"])
    den = denormalize_latents(lat, vae_cfg)
    assert _max_err(den, io["norm_denormalized"]) <= 1e-6
    assert _max_err(normalize_latents(den, vae_cfg), lat) <= 1e-5
    cfg = wan21_vae()
    assert _max_err(normalize_latents(jnp.asarray(cfg.latents_mean), cfg), np.zeros(16)) == 0.0


def test_sample_posterior():
    mean, logvar = jnp.full((4000,), 2.0), jnp.full((4000,), np.log(0.25))
    s = sample_posterior(jax.random.key(0), mean, logvar)
    assert s.shape == mean.shape and abs(float(s.mean()) - 2.0) < 0.1 and abs(float(s.std()) - 0.5) < 0.1


def test_real_param_count_matches_diffusers():
    """The real-size config, by eval_shape, against diffusers' AutoencoderKLWan() counted by the generator."""
    meta = json.loads((FIX / "meta.json").read_text())
    assert count_params(abstract_wan_vae(wan21_vae())) == meta["wan21_vae_params"] == 126_892_531


def test_decode_memory_report_compiles_without_running():
    m = decode_memory_report(wan_vae_tiny(), latent_frames=1, height=2, width=3)
    assert m["output"] == 1 * 1 * 16 * 24 * 3 * 4 and m["temp"] > 0
    assert m["peak_estimate"] == m["argument"] + m["output"] + m["temp"] - m["alias"]


def test_from_hf_real_config():
    raw = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0.dev0", "attn_scales": [], "base_dim": 96,
           "dim_mult": [1, 2, 4, 4], "dropout": 0.0, "latents_mean": list(wan21_vae().latents_mean),
           "latents_std": list(wan21_vae().latents_std), "num_res_blocks": 2,
           "temperal_downsample": [False, True, True], "z_dim": 16}
    assert WanVAEConfig.from_hf(raw) == wan21_vae()
    assert WanVAEConfig.from_hf(raw, dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"Wan2\.2.*is_residual"):
        WanVAEConfig.from_hf({**raw, "is_residual": True, "z_dim": 48})
    with pytest.raises(ValueError, match=r"Wan2\.2.*patch_size"):
        WanVAEConfig.from_hf({**raw, "patch_size": 2})
    with pytest.raises(ValueError, match="_class_name"):
        WanVAEConfig.from_hf({**raw, "_class_name": "AutoencoderKL"})


# --- loader ----------------------------------------------------------------------------------------------------
def _params(vae):
    return {k: np.asarray(v, np.float32) for k, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}


def _copy(dst: Path, case="a") -> Path:
    shutil.copytree(FIX / case / "model", dst)
    return dst


def test_pipeline_root_sharded_and_bf16(vaes, tmp_path):
    ref = _params(vaes["a"])
    # pipeline root with vae/
    assert _params(load_wan_vae(_copy(tmp_path / "pipe" / "vae").parent)).keys() == ref.keys()
    # sharded with an index
    tensors = load_file(str(FIX / "a" / "model" / WEIGHTS))
    keys = sorted(tensors)
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text((FIX / "a" / "model" / "config.json").read_text())
    weight_map = {}
    for j, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"diffusion_pytorch_model-0000{j + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(d / name))
        weight_map.update(dict.fromkeys(part, name))
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    got = _params(load_wan_vae(d))
    assert all(np.array_equal(got[k], ref[k]) for k in ref)
    # a bf16 checkpoint, loaded as fp32: the rounded weights
    b = _copy(tmp_path / "bf16")
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}, str(b / WEIGHTS))
    got = _params(load_wan_vae(b))
    assert all(np.array_equal(got[k], ref[k].astype(ml_dtypes.bfloat16).astype(np.float32)) for k in ref)


def test_bf16_dtype_runs_close_to_fp32():
    vae = load_wan_vae(FIX / "a" / "model", dtype="bfloat16")
    assert vae.encoder.conv_in.kernel.dtype == jnp.bfloat16
    io = _io("a")
    mean = vae.encode(jnp.asarray(io["enc1_video"]))
    assert mean.dtype == jnp.bfloat16
    ref = io["enc1_mean"]
    assert np.linalg.norm(np.asarray(mean, np.float32) - ref) / np.linalg.norm(ref) <= 5e-2


def test_loader_reports_missing_unexpected_and_misshaped_together(tmp_path):
    d = _copy(tmp_path / "bad")
    t = load_file(str(d / WEIGHTS))
    del t["decoder.conv_in.bias"]
    t["encoder.conv_in.weight"] = t["encoder.conv_in.weight"][:, :2]
    t["decoder.mid_block.norm.gamma"] = np.ones(3, np.float32)
    save_file(t, str(d / WEIGHTS))
    with pytest.raises(ValueError) as err:
        load_wan_vae(d)
    msg = str(err.value)
    assert "missing keys (1): decoder.conv_in.bias" in msg, msg
    assert "unexpected keys (1): decoder.mid_block.norm.gamma" in msg, msg
    assert "mis-shaped keys (1): encoder.conv_in.weight: checkpoint (4, 2, 3, 3, 3)" in msg


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="dtype='float16'"):
        load_wan_vae(FIX / "a" / "model", dtype="float16")
    with pytest.raises(FileNotFoundError):
        load_wan_vae(tmp_path / "nowhere")
    d = _copy(tmp_path / "trunc")
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_wan_vae(d)
    d = _copy(tmp_path / "wan22")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "is_residual": True}))
    with pytest.raises(ValueError, match="is_residual"):
        load_wan_vae(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_wan_vae(tmp_path / "empty")


# --- bad inputs and configs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(vaes):
    return vaes["a"]  # z_dim 4, 3 channels, 8x in space


def test_init_wan_vae():
    vae = init_wan_vae(wan_vae_tiny(), seed=1)
    assert vae.encoder.conv_in.kernel.shape == (3, 3, 3, 3, 4) and float(jnp.std(vae.encoder.conv_in.kernel)) > 0


@pytest.mark.parametrize("shape,match", [
    ((1, 4, 16, 16, 3), r"4 frames.*1 \+ 4k"),
    ((1, 6, 16, 16, 3), r"6 frames"),
    ((1, 5, 12, 16, 3), r"12 x 16.*multiples of 8"),
    ((1, 5, 16, 20, 3), r"multiples of 8"),
    ((1, 5, 16, 16, 4), r"\(batch, frames, height, width, 3\)"),
    ((5, 16, 16, 3), r"got shape \(5, 16, 16, 3\)"),
    ((0, 5, 16, 16, 3), r"empty batch"),
])
def test_bad_video(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode(jnp.zeros(shape))


def test_bad_video_dtype_and_latents(tiny):
    with pytest.raises(ValueError, match="float"):
        tiny.encode(jnp.zeros((1, 1, 8, 8, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"\(batch, latent_frames, h, w, 4\)"):
        tiny.decode(jnp.zeros((1, 2, 2, 2, 16)))
    with pytest.raises(ValueError, match="empty axis"):
        tiny.decode(jnp.zeros((1, 0, 2, 2, 4)))


@pytest.mark.parametrize("field,value,match", [
    ("base_dim", 0, "positive int"),
    ("z_dim", 2.5, "positive int"),
    ("num_res_blocks", True, "positive int"),
    ("decoder_base_dim", -1, "None"),
    ("dim_mult", (), "non-empty"),
    ("dim_mult", (1, 0, 2, 2), "non-empty sequence of positive ints"),
    ("temperal_downsample", (False, True), "3 bools"),
    ("temperal_downsample", (True, True, True), "at most 2 True"),
    ("attn_scales", (1.0,), "empty"),
    ("latents_mean", (0.0,) * 3, "z_dim=4"),
    ("latents_std", (1.0, 1.0, 0.0, 1.0), "positive"),
    ("latents_std", (1.0, 1.0, float("nan"), 1.0), "z_dim=4 real"),
    ("dtype", "float16", "bfloat16"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=rf"WanVAEConfig\.{field}=.*{match}"):
        wan_vae_tiny(**{field: value})


def test_config_frame_arithmetic():
    cfg = wan21_vae()
    assert (cfg.spatial_ratio, cfg.temporal_ratio, cfg.latent_frames(81), cfg.video_frames(21)) == (8, 4, 21, 81)
    b = WanVAEConfig.from_hf(json.loads((FIX / "b" / "model" / "config.json").read_text()))
    assert (b.spatial_ratio, b.temporal_ratio, b.latent_frames(5), b.video_frames(3)) == (4, 2, 3, 5)
