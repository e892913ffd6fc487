"""Checkpoint loaders: every layout reproduces the diffusers output; every fault gives one clear error."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from models.wan import load_transformer, restore_converted
from models.wan.loader import official_to_diffusers_key
from models.wan.safetensors_reader import SafetensorsFile
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


def test_orbax_round_trip(tmp_path):
    m = load_transformer(A / "model", cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "wan_config.json").exists()
    r = restore_converted(tmp_path / "cache")
    _check_output(r)
    again = load_transformer(tmp_path / "does-not-matter", cache_dir=tmp_path / "cache")
    _check_output(again)
    assert r.cfg == m.cfg


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
    from safetensors.numpy import save_file
    st = SafetensorsFile(path)
    tensors = edit({k: np.array(st.read(k)) for k in st.keys()})
    save_file(tensors, str(path))


def test_missing_key(tmp_path):
    d = _copy(tmp_path)
    _rewrite(d / "diffusion_pytorch_model.safetensors", lambda t: {k: v for k, v in t.items() if "blocks.1.ffn" not in k})
    with pytest.raises(ValueError, match=r"missing keys \(4\): blocks.1.ffn.net.0.proj.bias"):
        load_transformer(d)


def test_unexpected_key(tmp_path):
    d = _copy(tmp_path)
    _rewrite(d / "diffusion_pytorch_model.safetensors", lambda t: {**t, "blocks.0.extra.weight": np.ones(3, np.float32)})
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
    with pytest.raises(ValueError, match="truncated"):
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
