"""Checkpoint loaders: every layout reproduces the diffusers output; every fault gives one clear error."""

import json
import logging
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models.wan import load_transformer, restore_converted, save_converted
from models.wan import loader as wan_loader
from models.wan.loader import official_to_diffusers_key, read_converted
from tests.wan_fixtures import FIXTURES, case_io, rel_l2

A = FIXTURES / "a"


def _check_output(model, rtol=1e-5):
    x, t, ctx, ref = case_io("a")
    assert rel_l2(model(x, t, ctx), ref) <= rtol


@pytest.mark.parametrize("folder", ["model", "model_sharded", "official"])
def test_layouts_reproduce_diffusers(folder):
    _check_output(load_transformer(A / folder))


def test_pipeline_root_with_transformer_subfolder(tmp_path):
    shutil.copytree(A / "model", tmp_path / "transformer")
    _check_output(load_transformer(tmp_path))


def test_bf16_checkpoint_and_bf16_dtype():
    """bf16 weights loaded as fp32 stay close; loaded as bf16 the run is bf16 and close to fp32."""
    m32 = load_transformer(A / "model_bf16", dtype="float32")
    _check_output(m32, rtol=2e-2)  # the weights themselves were rounded to bf16
    m16 = load_transformer(A / "model", dtype="bfloat16")
    assert m16.layers.attn1.to_q.kernel.dtype == jnp.bfloat16
    assert m16.time_embedder.linear_1.kernel.dtype == jnp.float32
    x, t, ctx, ref = case_io("a")
    y = m16(x.astype(jnp.bfloat16), t, ctx)
    assert y.dtype == jnp.bfloat16
    assert rel_l2(np.asarray(y, np.float32), ref) <= 5e-2


def test_orbax_round_trip(tmp_path, monkeypatch):
    m = load_transformer(A / "model", cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "wan_config.json").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []  # no temp file left
    r = restore_converted(tmp_path / "cache")
    _check_output(r)
    assert r.cfg == m.cfg
    cfg, source = read_converted(tmp_path / "cache")
    assert cfg == m.cfg and source["checkpoint"] == str((A / "model").resolve()) and source["dtype"] == "float32"
    monkeypatch.setattr(wan_loader, "_load_weights", _no_conversion)
    _check_output(load_transformer(A / "model", cache_dir=tmp_path / "cache"))  # restored, not converted
    with pytest.raises(FileNotFoundError, match=r"does-not-matter does not exist.*use restore_converted"):
        load_transformer(tmp_path / "does-not-matter", cache_dir=tmp_path / "cache")


def _no_conversion(*args):
    raise AssertionError("converted the checkpoint although the cache matches it")


def _scaled_copy(tmp_path, name, factor):
    """A copy of fixture a's checkpoint with every tensor times `factor`: same config, other weights."""
    d = _copy(tmp_path / name)
    _rewrite(d / "diffusion_pytorch_model.safetensors", lambda t: {k: v * factor for k, v in t.items()})
    return d


def test_cache_of_another_checkpoint_is_converted_again(tmp_path, caplog):
    """A cache made from checkpoint A, asked for checkpoint B, gives B (and says so), not A."""
    cache = tmp_path / "cache"
    a = load_transformer(A / "model", cache_dir=cache)
    b_dir = _scaled_copy(tmp_path, "b", 0.5)
    x, t, ctx, ref = case_io("a")
    with caplog.at_level(logging.WARNING, logger="models.wan.loader"):
        b = load_transformer(b_dir, cache_dir=cache)
    want = load_transformer(b_dir)
    np.testing.assert_array_equal(np.asarray(b(x, t, ctx)), np.asarray(want(x, t, ctx)))
    assert rel_l2(b(x, t, ctx), a(x, t, ctx)) > 0.1
    msg = caplog.text
    assert str(b_dir) in msg and str(cache) in msg and f"another checkpoint, {(A / 'model').resolve()}" in msg
    assert read_converted(cache)[1]["checkpoint"] == str(b_dir.resolve())   # the cache now holds B
    np.testing.assert_array_equal(np.asarray(restore_converted(cache)(x, t, ctx)), np.asarray(want(x, t, ctx)))
    # another architecture (fixture b) into the same cache works too
    xb, tb, cb, refb = case_io("b")
    assert rel_l2(load_transformer(FIXTURES / "b" / "model", cache_dir=cache)(xb, tb, cb), refb) <= 1e-5


def test_cache_is_converted_again_when_files_or_dtype_change(tmp_path, caplog):
    d = _scaled_copy(tmp_path, "ckpt", 1.0)
    cache = tmp_path / "cache"
    load_transformer(d, cache_dir=cache)
    f = d / "diffusion_pytorch_model.safetensors"
    _rewrite(f, lambda t: {k: v * 0.5 for k, v in t.items()})        # same path and size, new weights
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    x, t, ctx, _ = case_io("a")
    with caplog.at_level(logging.WARNING, logger="models.wan.loader"):
        got = load_transformer(d, cache_dir=cache)
    assert "the checkpoint's files changed" in caplog.text
    np.testing.assert_array_equal(np.asarray(got(x, t, ctx)), np.asarray(load_transformer(d)(x, t, ctx)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.wan.loader"):
        m16 = load_transformer(d, "bfloat16", cache_dir=cache)
    assert "it holds float32 parameters, not bfloat16" in caplog.text
    assert m16.layers.attn1.to_q.kernel.dtype == jnp.bfloat16 and read_converted(cache)[1]["dtype"] == "bfloat16"


def test_cache_honours_num_frame_per_block(tmp_path, monkeypatch):
    """An override that changes no parameter applies to the restored model without converting again."""
    cache = tmp_path / "cache"
    load_transformer(A / "model", cache_dir=cache)
    monkeypatch.setattr(wan_loader, "_load_weights", _no_conversion)
    m = load_transformer(A / "model", cache_dir=cache, num_frame_per_block=3)
    assert m.cfg.num_frame_per_block == 3 and m.cfg.block_causal
    assert read_converted(cache)[0].num_frame_per_block == 1    # the cache itself is unchanged


def test_interrupted_save_and_corrupt_marker(tmp_path):
    cache = tmp_path / "cache"
    load_transformer(A / "model", cache_dir=cache)
    marker = cache / "wan_config.json"
    text = marker.read_text()
    marker.write_text(text[: len(text) // 2])                       # truncated marker
    for call in (lambda: restore_converted(cache), lambda: load_transformer(A / "model", cache_dir=cache)):
        with pytest.raises(ValueError, match="corrupt or truncated") as err:
            call()
        assert str(marker) in str(err.value) and f"delete the folder {cache}" in str(err.value)
    marker.unlink()                                                 # params saved, marker never written
    with pytest.raises(ValueError, match=r"no wan_config.json; .*interrupted \(delete the folder"):
        restore_converted(cache)
    _check_output(load_transformer(A / "model", cache_dir=cache))   # converts again
    _check_output(restore_converted(cache))


def test_save_without_source_and_old_marker_format(tmp_path, caplog):
    """Folders of save_converted without a source (training exports) and bare-config markers still restore;
    as a load_transformer cache they are converted again."""
    m = load_transformer(A / "model")
    save_converted(m, tmp_path / "export")
    assert read_converted(tmp_path / "export") == (m.cfg, None)
    marker = tmp_path / "export" / "wan_config.json"
    marker.write_text(json.dumps(json.loads(marker.read_text())["config"]))    # the old format
    _check_output(restore_converted(tmp_path / "export"))
    with caplog.at_level(logging.WARNING, logger="models.wan.loader"):
        _check_output(load_transformer(A / "model", cache_dir=tmp_path / "export"))
    assert "does not record which checkpoint" in caplog.text


def test_official_key_renames():
    assert official_to_diffusers_key("blocks.3.self_attn.o.weight") == "blocks.3.attn1.to_out.0.weight"
    assert official_to_diffusers_key("blocks.0.norm3.bias") == "blocks.0.norm2.bias"
    assert official_to_diffusers_key("blocks.1.modulation") == "blocks.1.scale_shift_table"
    assert official_to_diffusers_key("head.modulation") == "scale_shift_table"
    assert official_to_diffusers_key("time_projection.1.weight") == "condition_embedder.time_proj.weight"
    assert official_to_diffusers_key("blocks.2.ffn.0.weight") == "blocks.2.ffn.net.0.proj.weight"


# ------------------------------------------------------------------------------------------- faults
def _copy(tmp_path, folder="model"):
    dst = tmp_path / folder
    shutil.copytree(A / folder, dst)
    return dst


def _rewrite(path, edit):
    """Rewrite one safetensors file through the header, with `edit(dict) -> dict` of numpy arrays."""
    save_file(edit(load_file(str(path))), str(path))


def test_missing_key(tmp_path):
    d = _copy(tmp_path)
    weights = d / "diffusion_pytorch_model.safetensors"
    _rewrite(weights, lambda t: {k: v for k, v in t.items() if "blocks.1.ffn" not in k})
    with pytest.raises(ValueError, match=r"missing keys \(4\): blocks.1.ffn.net.0.proj.bias"):
        load_transformer(d)


def test_unexpected_key(tmp_path):
    d = _copy(tmp_path)
    weights = d / "diffusion_pytorch_model.safetensors"
    _rewrite(weights, lambda t: {**t, "blocks.0.extra.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): blocks.0.extra.weight"):
        load_transformer(d)


def test_misshaped_key(tmp_path):
    d = _copy(tmp_path)
    _rewrite(d / "diffusion_pytorch_model.safetensors",
             lambda t: {**t, "proj_out.bias": np.ones(5, np.float32)})
    with pytest.raises(ValueError, match=r"mis-shaped keys \(1\): proj_out.bias"):
        load_transformer(d)


def test_truncated_file(tmp_path):
    d = _copy(tmp_path)
    f = d / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated") as err:
        load_transformer(d)
    assert str(f) in str(err.value)
    f.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match=r"not a readable safetensors file .*header too small.*truncated"):
        load_transformer(d)


def test_corrupt_header(tmp_path):
    d = _copy(tmp_path)
    f = d / "diffusion_pytorch_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[10:20] = b"\xff" * 10
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt"):
        load_transformer(d)


def test_missing_shard(tmp_path):
    d = _copy(tmp_path, "model_sharded")
    (d / "diffusion_pytorch_model-00002-of-00005.safetensors").unlink()
    with pytest.raises(ValueError, match="shards that are not there"):
        load_transformer(d)


def test_config_that_does_not_match_weights(tmp_path):
    d = _copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_layers"] = 3
    cfg["ffn_dim"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not match the model built from its config.json.*layers=3") as err:
        load_transformer(d)
    assert "missing keys" in str(err.value) and "mis-shaped keys" in str(err.value)


def test_bad_paths_and_args(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_transformer(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_transformer(tmp_path)
    with pytest.raises(ValueError, match="dtype='float16'"):
        load_transformer(A / "model", dtype="float16")
    (tmp_path / "config.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="neither a diffusers"):
        load_transformer(tmp_path)
