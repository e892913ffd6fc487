"""Wan2.1 / SkyReels-V2 transformer: parity with diffusers, stages, subsets, presets and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.wan import (
    WanConfig,
    abstract_transformer,
    count_params,
    init_transformer,
    load_transformer,
    wan21_t2v_1_3b,
    wan21_t2v_14b,
    wan_tiny,
)
from tests.wan_fixtures import FIXTURES, case_io, rel_l2
from vidaccel.checks import assert_finite

PARITY_RTOL = 1e-5  # relative L2 against diffusers, fp32 throughout


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_wan_matches_diffusers(case):
    """Three tiny configs: odd token grids, batch 1-3, text lengths 3/7/512, head dims 8/12/16."""
    model = load_transformer(FIXTURES / case / "model")
    x, t, ctx, ref = case_io(case)
    out = jax.jit(lambda x, t, c: model(x, t, c))(x, t, ctx)
    assert out.shape == ref.shape
    assert rel_l2(out, ref) <= PARITY_RTOL


@pytest.mark.parametrize("case,nfpb", [("df1", 1), ("df2", 2), ("df3", 3)])
def test_skyreels_df_matches_diffusers(case, nfpb):
    """Per-frame timesteps (B, F) and block-causal attention with num_frame_per_block in {1, 2, 3}."""
    model = load_transformer(FIXTURES / case / "model")
    assert model.cfg.num_frame_per_block == nfpb
    x, t, ctx, ref = case_io(case)
    assert t.shape == (x.shape[0], x.shape[1])
    out = model(x, t, ctx)
    assert rel_l2(out, ref) <= PARITY_RTOL


def test_block_causal_mask_really_masks():
    """With nfpb=2, changing the last block's frames must not change earlier frames' output."""
    model = init_transformer(wan_tiny(num_frame_per_block=2), seed=1)
    model.proj_out.kernel.set_value(jax.random.normal(jax.random.key(5), model.proj_out.kernel.shape) * 0.1)
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (1, 4, 4, 4, 4))
    ctx = jax.random.normal(k[1], (1, 3, 16))
    t = jnp.array([[900.0, 900.0, 500.0, 500.0]])
    y = model(x, t, ctx)
    x2 = x.at[:, 2:].set(jax.random.normal(k[2], (1, 2, 4, 4, 4)))
    y2 = model(x2, t, ctx)
    np.testing.assert_allclose(y[:, :2], y2[:, :2], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(y[:, 2:] - y2[:, 2:]).max()) > 1e-3


def test_stages_compose_and_subset_forward():
    """embed/blocks/head equal the whole call; a gathered subset sees its own positions and modulation."""
    cfg = wan_tiny()
    model = init_transformer(cfg, seed=2)
    model.proj_out.kernel.set_value(jax.random.normal(jax.random.key(6), model.proj_out.kernel.shape) * 0.1)
    k = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(k[0], (2, 3, 4, 6, 4))
    ctx = jax.random.normal(k[1], (2, 5, 16))
    t = jnp.array([[10.0, 400.0, 999.0], [3.0, 3.0, 700.0]])
    emb = model.embed(x, t, ctx)
    tokens, _ = model.blocks(emb)
    np.testing.assert_allclose(model.head(tokens, emb), model(x, t, ctx), rtol=1e-6, atol=1e-6)

    idx = jnp.array([[0, 5, 13, 30, 31], [2, 3, 17, 20, 35]])
    sub = emb.take(idx)
    assert sub.tokens.shape == (2, 5, cfg.dim)
    np.testing.assert_array_equal(sub.positions, jnp.take_along_axis(emb.positions, idx[..., None], axis=1))
    np.testing.assert_array_equal(sub.frame_index, jnp.take_along_axis(emb.frame_index, idx, axis=1))
    # Attention that ignores keys (returns v) makes every token independent: subset == gathered full output.
    def value_only(q, k, v, info, ls):
        return v, ls
    full, _ = model.blocks(emb, attention=value_only)
    part, _ = model.blocks(sub, attention=value_only)
    np.testing.assert_allclose(part, jnp.take_along_axis(full, idx[..., None], axis=1), rtol=1e-5, atol=1e-6)


def test_layer_state_threads_through_scan():
    """Per-layer state with a leading layer axis reaches each layer's attention and comes back updated."""
    cfg = wan_tiny(num_layers=3)
    model = init_transformer(cfg, seed=0)
    x = jax.random.normal(jax.random.key(2), (1, 2, 4, 4, 4))
    ctx = jnp.ones((1, 2, 16))

    def counting(q, k, v, info, ls):
        return jax.nn.dot_product_attention(q, k, v), {"calls": ls["calls"] + 1, "layer": info.layer}

    emb = model.embed(x, 5.0, ctx)
    _, ls = model.blocks(emb, attention=counting,
                         layer_state={"calls": jnp.zeros(3, jnp.int32), "layer": jnp.zeros(3, jnp.int32)})
    np.testing.assert_array_equal(ls["calls"], [1, 1, 1])
    np.testing.assert_array_equal(ls["layer"], [0, 1, 2])


def test_presets_parameter_counts():
    assert count_params(abstract_transformer(wan21_t2v_1_3b())) == 1_418_996_800
    assert count_params(abstract_transformer(wan21_t2v_14b())) == 14_288_491_584


def test_bf16_policy_keeps_fp32_where_wan_does():
    model = abstract_transformer(wan_tiny(param_dtype="bfloat16", dtype="bfloat16"))
    assert model.layers.attn1.to_q.kernel.dtype == jnp.bfloat16
    assert model.layers.scale_shift_table.dtype == jnp.float32
    assert model.time_embedder.linear_1.kernel.dtype == jnp.float32
    assert model.layers.norm2.weight.dtype == jnp.float32
    real = init_transformer(wan_tiny(param_dtype="bfloat16", dtype="bfloat16"))
    y = real(jnp.ones((1, 1, 2, 2, 4)), 3.0, jnp.ones((1, 2, 16)))
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y)))


def test_bad_inputs_raise_clear_errors():
    model = init_transformer(wan_tiny())
    ctx = jnp.ones((1, 3, 16))
    with pytest.raises(ValueError, match="channels"):
        model(jnp.ones((1, 2, 4, 4, 5)), 1.0, ctx)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(jnp.ones((1, 2, 5, 4, 4)), 1.0, ctx)
    with pytest.raises(ValueError, match=r"\(B, F, H, W, C\)"):
        model(jnp.ones((2, 4, 4, 4)), 1.0, ctx)
    with pytest.raises(ValueError, match="t must have shape"):
        model(jnp.ones((1, 2, 4, 4, 4)), jnp.ones((1, 3)), ctx)
    with pytest.raises(ValueError, match="context must be"):
        model(jnp.ones((1, 2, 4, 4, 4)), 1.0, jnp.ones((1, 3, 15)))
    with pytest.raises(ValueError, match="non-finite"):
        assert_finite("latents", jnp.array([0.0, jnp.nan]))


@pytest.mark.parametrize("field,value", [("num_layers", 0), ("attention_head_dim", 7), ("freq_dim", 3),
                                         ("param_dtype", "int8"), ("qk_norm", "layer_norm"), ("eps", 0.0),
                                         ("patch_size", (1, 2))])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"WanConfig.{field}"):
        WanConfig(**{field: value})
