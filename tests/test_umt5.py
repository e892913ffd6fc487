"""umT5 text encoder: parity with transformers' UMT5EncoderModel, the loader's layouts and faults, the tokenizer
and prompt cleaning against transformers/diffusers, and encode_prompts against WanPipeline._get_t5_prompt_embeds.

Fixtures: tests/fixtures/umt5/, written by scripts/fixtures/make_umt5.py (python3.11, CPU torch).
"""

import functools
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models.umt5 import (
    UMT5Config,
    abstract_umt5,
    count_params,
    encode_prompts,
    load_tokenizer,
    load_umt5,
    prompt_clean,
    relative_position_buckets,
    tokenize,
    umt5_tiny,
    umt5_xxl,
)
from models.umt5.prompts import WHITESPACE

FIX = Path(__file__).parent / "fixtures" / "umt5"
ENC = np.load(FIX / "encoder.npz")
PROMPTS = json.loads((FIX / "prompts.json").read_text())


@functools.cache
def _loaded(case: str, dtype: str = "float32"):
    return load_umt5(FIX / f"enc_{case}", dtype=dtype)


def _run(model, case):
    return np.asarray(model(ENC[f"{case}_ids"], ENC[f"{case}_mask"])).astype(np.float32)


def _rel_l2(x, ref):
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


# ------------------------------------------------------------------ encoder parity
@pytest.mark.parametrize("case", ["a", "b", "c"])   # b: sharded checkpoint, batch 3, length 45 > max_distance
def test_fp32_parity_with_transformers(case):
    out = _run(_loaded(case), case)
    assert np.abs(out - ENC[f"{case}_out"]).max() <= 1e-5


def test_bf16_checkpoint():
    """bf16 file read as fp32 equals transformers in fp32; run in bf16 it is as close to that as transformers'
    own bf16 run is (ours keeps the residual stream fp32: rel L2 0.0059 vs transformers' 0.0071 here)."""
    ref = ENC["bf16_out_fp32"]
    assert np.abs(_run(load_umt5(FIX / "enc_bf16", dtype="float32"), "bf16") - ref).max() <= 1e-5
    m16 = load_umt5(FIX / "enc_bf16")   # default dtype: bfloat16
    assert m16.embed[...].dtype == jnp.bfloat16 and m16.layers.wo[...].dtype == jnp.bfloat16
    out = m16(ENC["bf16_ids"], ENC["bf16_mask"])
    assert out.dtype == jnp.bfloat16
    err = _rel_l2(np.asarray(out).astype(np.float32), ref)
    assert err <= 1e-2
    assert err <= _rel_l2(ENC["bf16_out"], ref)


def test_relative_position_buckets_match_transformers():
    buckets = np.load(FIX / "buckets.npz")
    for key in buckets.files:
        nb, md = map(int, key.split("_"))
        ref = buckets[key]                    # relative positions -(n-1) .. n-1
        n = (len(ref) + 1) // 2
        ours = relative_position_buckets(n, nb, md)
        assert np.array_equal(ours[0], ref[n - 1:])          # query 0: key - query = 0 .. n-1
        assert np.array_equal(ours[:, 0], ref[: n][::-1])    # key 0: -(query) .. 0


def test_xxl_parameter_count_equals_transformers():
    """eval_shape count of umt5_xxl() equals UMT5EncoderModel's on torch's meta device (tied table once)."""
    want = json.loads((FIX / "meta.json").read_text())["umt5_xxl_encoder_params"]
    assert count_params(abstract_umt5(umt5_xxl())) == want == 5_680_910_336


def test_padding_does_not_change_real_tokens():
    model = _loaded("a")
    ids = jnp.asarray([[5, 9, 7, 1, 0, 0]])
    short = model(ids[:, :4], jnp.ones((1, 4), jnp.int32))
    padded = model(ids, jnp.asarray([[1, 1, 1, 1, 0, 0]]))
    np.testing.assert_allclose(padded[:, :4], short, atol=1e-5)


def test_encoder_input_errors():
    model = abstract_umt5(umt5_tiny(num_layers=1))   # inputs are checked before any parameter is read
    with pytest.raises(ValueError, match="input_ids must be .B, L."):
        model(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="0/1 integers or booleans"):
        model(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.float32))


# ------------------------------------------------------------------ config
def test_config_presets_and_from_hf():
    xxl = umt5_xxl()
    assert (xxl.vocab_size, xxl.d_model, xxl.d_ff, xxl.num_layers, xxl.num_heads, xxl.d_kv) == \
        (256384, 4096, 10240, 24, 64, 64)
    assert (xxl.relative_attention_num_buckets, xxl.relative_attention_max_distance) == (32, 128)
    raw = json.loads((FIX / "enc_b" / "config.json").read_text())
    cfg = UMT5Config.from_hf(raw, dtype="bfloat16")
    assert (cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.num_layers, cfg.dtype) == (24, 10, 3, 3, "bfloat16")


@pytest.mark.parametrize("field,value,match", [
    ("d_model", 0, "d_model=0 is invalid: a positive int"),
    ("num_heads", 2.0, "num_heads=2.0"),
    ("relative_attention_num_buckets", 6, "a multiple of 4"),
    ("relative_attention_max_distance", 2, "relative_attention_max_distance=2"),
    ("layer_norm_epsilon", 0.0, "layer_norm_epsilon"),
    ("feed_forward_proj", "relu", "feed_forward_proj='relu'"),
    ("dtype", "float16", "dtype='float16' is invalid: one of"),
    ("pad_token_id", 64, "pad_token_id=64"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        umt5_tiny(**{field: value})


def test_from_hf_rejects_unsupported():
    raw = json.loads((FIX / "enc_a" / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type='t5': only 'umt5'"):
        UMT5Config.from_hf({**raw, "model_type": "t5"})
    with pytest.raises(ValueError, match="feed_forward_proj='gated-silu'"):
        UMT5Config.from_hf({**raw, "feed_forward_proj": "gated-silu"})
    with pytest.raises(ValueError, match=r"lacks fields \['d_ff'\]"):
        UMT5Config.from_hf({k: v for k, v in raw.items() if k != "d_ff"})


# ------------------------------------------------------------------ loader
def _copy(tmp_path, case="a"):
    folder = tmp_path / "text_encoder"
    shutil.copytree(FIX / f"enc_{case}", folder)
    return folder


def test_pipeline_root_and_embed_key_names(tmp_path):
    """A pipeline root's text_encoder/ loads; the tied table loads under either name, or both, and a full
    model's decoder tensors are skipped."""
    folder = _copy(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    tensors["decoder.final_layer_norm.weight"] = np.ones(32, np.float32)
    save_file(tensors, folder / "model.safetensors")
    assert np.abs(_run(load_umt5(tmp_path, dtype="float32"), "a") - ENC["a_out"]).max() <= 1e-5
    tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    save_file(tensors, folder / "model.safetensors")
    assert np.abs(_run(load_umt5(folder, dtype="float32"), "a") - ENC["a_out"]).max() <= 1e-5


def test_missing_unexpected_and_misshaped_keys_in_one_error(tmp_path):
    folder = _copy(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
    del tensors["shared.weight"]
    tensors["encoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((32, 31), np.float32)
    tensors["encoder.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError) as err:
        load_umt5(folder)
    msg = str(err.value)
    assert "missing keys (2): encoder.block.1.layer.1.DenseReluDense.wi_0.weight, shared.weight or " \
           "encoder.embed_tokens.weight" in msg
    assert "unexpected keys (1): encoder.extra.weight" in msg
    assert "mis-shaped keys (1): encoder.block.0.layer.0.SelfAttention.q.weight: checkpoint (32, 31) vs " \
           "model (32, 32)" in msg


def test_loader_file_faults(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_umt5(tmp_path / "nowhere")
    folder = _copy(tmp_path)
    with pytest.raises(ValueError, match="dtype='float16': allowed are"):
        load_umt5(folder, dtype="float16")
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        load_umt5(tmp_path)
    shutil.copy(FIX / "enc_a" / "config.json", folder / "config.json")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_umt5(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_umt5(folder)
    sharded = _copy(tmp_path / "s", "b")
    (sharded / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(ValueError, match=r"lists shards that are not there: \['model-00002-of-00005"):
        load_umt5(sharded)


# ------------------------------------------------------------------ tokenizer and prompts
def test_prompt_clean_equals_diffusers():
    assert [prompt_clean(p) for p in PROMPTS["prompts"]] == PROMPTS["cleaned"]
    assert [c for c in range(0x110000) if WHITESPACE.fullmatch(chr(c))] == PROMPTS["regex_whitespace"]
    with pytest.raises(ValueError, match="a prompt must be a string"):
        prompt_clean(3)


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_spm"])
@pytest.mark.parametrize("label", ["cleaned", "raw"])
def test_tokenize_equals_transformers(name, label):
    """Ids and masks equal AutoTokenizer's (transformers 5.23 T5Tokenizer) as WanPipeline calls it, at max_length
    16 (truncation) and 512; tokenizer_spm has the SentencePiece Precompiled normalizer google/umt5-xxl's has.
    Raw prompts (double spaces, tabs, entities) check the pre-tokenizer rebuild, not only cleaned text."""
    tok = load_tokenizer(FIX / name)
    for max_length in (16, 512):
        ids, mask = tokenize(tok, PROMPTS[label if label == "cleaned" else "prompts"], max_length)
        assert ids.dtype == mask.dtype == np.int32 and ids.shape == (len(PROMPTS["prompts"]), max_length)
        np.testing.assert_array_equal(ids, PROMPTS[f"{name}_{label}_ids_{max_length}"])
        np.testing.assert_array_equal(mask, PROMPTS[f"{name}_{label}_mask_{max_length}"])


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizers file"):
        load_tokenizer(tmp_path)
    tok = load_tokenizer(FIX / "tokenizer")
    with pytest.raises(ValueError, match="max_length=1"):
        tokenize(tok, ["a cat"], 1)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        tokenize(tok, [], 8)


def test_encode_prompts_equals_wan_pipeline():
    """diffusers' own WanPipeline._get_t5_prompt_embeds on the same folder: equal, zeros past each length."""
    ref = np.load(FIX / "pipeline.npz")
    prompts = json.loads((FIX / "pipeline" / "prompts.json").read_text())
    encoder, tok = load_umt5(FIX / "pipeline", dtype="float32"), load_tokenizer(FIX / "pipeline")
    for max_length in (16, 40):
        out = np.asarray(encode_prompts(encoder, tok, prompts, max_length))
        want = ref[f"embeds_{max_length}"]
        assert out.shape == want.shape
        assert np.abs(out - want).max() <= 1e-5
        _, mask = tokenize(tok, [prompt_clean(p) for p in prompts], max_length)
        assert np.all(out[mask == 0] == 0) and np.all(np.abs(out[mask == 1]).max(-1) > 0)


def test_encode_prompts_vocab_mismatch():
    small = abstract_umt5(umt5_tiny(vocab_size=8, num_layers=1))
    with pytest.raises(ValueError, match="do not belong together"):
        encode_prompts(small, load_tokenizer(FIX), "a cat walks on the beach", 16)

