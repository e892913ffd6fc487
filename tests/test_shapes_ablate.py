"""The diagnosis switches of shapes training (issue 16) and the ablation command."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.shapes_ablate import VARIANTS, eval_prompts, variant_config
from experiments.shapes_ablate import main as ablate_main
from experiments.shapes_coupling import attention_profile
from models.shapes import sample_prompts
from models.shapes.pretrained import training_info
from models.shapes.train import TrainConfig, decay_mask, init_model, make_batch, model_config, optimizer, shapes_config
from models.wan.config import WanConfig, wan21_t2v_1_3b, wan21_t2v_14b, wan_tiny
from models.wan.rope import rope_cos_sin
from models.wan.transformer import init_transformer

_POS = jnp.array([[[0, 0, 0], [0, 7, 7], [7, 3, 5]]])


def test_rope_theta_default_is_wans_and_a_smaller_one_rotates_more():
    for cfg in (wan21_t2v_1_3b(), wan21_t2v_14b(), wan_tiny(), shapes_config("t2v")):
        assert cfg.rope_theta == 10000.0
    _, sin_wan = rope_cos_sin(_POS, 32)
    _, sin_small = rope_cos_sin(_POS, 32, theta=100.0)
    # position 0 is unrotated either way; elsewhere the slower frequencies turn further with a smaller base
    np.testing.assert_array_equal(sin_wan[0, 0], sin_small[0, 0])
    assert not np.allclose(sin_wan[0, 1:], sin_small[0, 1:])
    x = jax.random.normal(jax.random.key(0), (1, 2, 4, 4, 4))
    ctx, t = jnp.ones((1, 3, 16)), jnp.array([500.0])
    m_wan, m_small = init_transformer(wan_tiny()), init_transformer(wan_tiny(rope_theta=100.0))
    nnx.update(m_small, nnx.state(m_wan, nnx.Param))
    m_wan.proj_out.kernel[...] = m_small.proj_out.kernel[...] = jnp.ones_like(m_wan.proj_out.kernel[...])
    assert not np.allclose(m_wan(x, t, ctx), m_small(x, t, ctx))


@pytest.mark.parametrize("bad", [1.0, 0.5, True, "100"])
def test_wan_config_refuses_a_bad_rope_theta(bad):
    with pytest.raises(ValueError, match="WanConfig.rope_theta=.*a float > 1"):
        WanConfig(rope_theta=bad)


def test_default_train_config_is_the_committed_recipe():
    tc = TrainConfig("t2v")
    committed = training_info("t2v")["train_config"]
    for key, value in committed.items():
        if key not in ("steps", "cooldown", "save_every", "init_from"):
            assert getattr(tc, key) == value, key
    assert model_config(tc) == shapes_config("t2v")
    assert model_config(TrainConfig("ar")) == shapes_config("ar")
    a = nnx.state(init_model(tc), nnx.Param)
    b = nnx.state(init_transformer(shapes_config("t2v"), seed=0), nnx.Param)
    assert all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a, b)))
    # batch 5 at batch size 3, as the code before the switches drew it (shift 3, any train prompt)
    batch = make_batch(TrainConfig("t2v", batch=3), 5)
    np.testing.assert_allclose(batch["sigma"].ravel(), [0.66592985, 0.2594034, 0.96656227], rtol=1e-6)
    np.testing.assert_allclose(batch["context"].sum(), 332.7385, rtol=1e-5)
    base = variant_config("baseline", 300, 50)
    assert dataclasses.replace(base, steps=tc.steps, warmup=tc.warmup, save_every=tc.save_every) == tc


def test_decay_mask_spares_norms_biases_and_embeddings():
    tc = TrainConfig("t2v", decay_all=False, weight_decay=0.5, lr=0.1, warmup=1)
    params = nnx.state(init_transformer(wan_tiny()), nnx.Param)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
    decayed = {k for k, v in flat.items() if v}
    assert decayed and all("kernel" in k for k in decayed)
    assert not any(s in k for k in decayed for s in ("norm", "bias", "scale_shift", "embed"))
    assert any("attn1" in k and "to_q" in k for k in decayed) and any("ffn" in k for k in decayed)
    # with zero gradients, AdamW moves only what it decays
    opt = optimizer(tc)
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = opt.update(zeros, opt.init(params), params)[1]
    updates, _ = opt.update(zeros, state, params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    moved = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(moved)[0]}
    assert {k for k, v in moved.items() if v} == {k for k in decayed if not k.startswith("['proj_out']")}
    # (the zero-initialised head kernel decays by zero)
    updates_all, _ = optimizer(dataclasses.replace(tc, decay_all=True)).update(zeros, state, params)
    assert bool(jnp.any(updates_all["layers"]["attn1"]["norm_q"]["weight"][...] != 0))


def test_text_init_redraws_only_the_text_projection():
    base = nnx.state(init_model(TrainConfig("t2v")), nnx.Param)
    wide = nnx.state(init_model(TrainConfig("t2v", text_init="xavier")), nnx.Param)
    k_base, k_wide = base["text_embedder"]["linear_1"]["kernel"][...], wide["text_embedder"]["linear_1"]["kernel"][...]
    assert float(jnp.std(k_base)) == pytest.approx(0.02, rel=0.1)
    assert float(jnp.std(k_wide)) == pytest.approx((2 / (32 + 128)) ** 0.5, rel=0.1)
    np.testing.assert_array_equal(base["layers"]["attn1"]["to_q"]["kernel"][...],
                                  wide["layers"]["attn1"]["to_q"]["kernel"][...])


def test_heads_shift_and_prompt_pool():
    assert (model_config(TrainConfig("t2v", heads=2)).attention_head_dim, model_config(TrainConfig("t2v", heads=2)).dim
            ) == (64, 128)
    with pytest.raises(ValueError, match=r"TrainConfig.heads=3 is not allowed; choose one of \(1, 2, 4, 8\)"):
        TrainConfig("t2v", heads=3)
    with pytest.raises(ValueError, match="TrainConfig.shift"):
        TrainConfig("t2v", shift=0.0)
    low = make_batch(TrainConfig("t2v", batch=8), 3)["sigma"]
    high = make_batch(TrainConfig("t2v", batch=8, shift=8.0), 3)["sigma"]
    assert np.all(high >= low) and np.any(high > low)        # the same u, mapped higher
    tc = TrainConfig("t2v", batch=6, prompt_pool=1)
    ctx = make_batch(tc, 0)["context"]
    kept = ctx[np.abs(ctx).sum(axis=(1, 2)) > 0]              # rows not dropped for CFG
    assert len(kept) >= 2 and all(np.array_equal(kept[0], row) for row in kept)
    assert eval_prompts(tc, 4) == [eval_prompts(tc, 4)[0]] * 4
    assert len(set(eval_prompts(variant_config("overfit16", 10, 5), 16))) == 16


def test_ablate_refuses_an_unknown_variant(capsys):
    with pytest.raises(SystemExit):
        ablate_main(["baseline", "bogus"])
    err = capsys.readouterr().err
    assert "unknown variant(s) bogus" in err and all(v in err for v in VARIANTS)
    with pytest.raises(ValueError, match="unknown variant 'x'; allowed: baseline, overfit1"):
        variant_config("x", 10, 5)


def test_ablate_trains_scores_and_records(tmp_path):
    ablate_main(["overfit1", "--steps", "1", "--warmup", "1", "--n", "2", "--eval-steps", "2",
                 "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    runs = json.loads((tmp_path / "out" / "ablations.json").read_text())["runs"]
    assert [(r["variant"], r["steps"], r["eval"]["prompts"]) for r in runs] == [("overfit1", 1, "training pool")]
    assert 0.0 <= runs[0]["score"] <= 1.0 and np.isfinite(runs[0]["final_loss"])
    assert [r["noise_level"] for r in runs[0]["denoise"]] == [0.5, 0.7, 0.85]
    assert all(r["x0_mse"] > 0.0 and 0.0 <= r["score"] <= 1.0 for r in runs[0]["denoise"])
    md = (tmp_path / "out" / "ablations.md").read_text()
    assert "| overfit1 | 1 |" in md and "x0 mse / one-call score at 0.85" in md


def test_local_attention_init_makes_the_first_heads_local_and_keeps_the_others():
    prompts = sample_prompts(2, 0, "heldout")
    plain = attention_profile(init_model(TrainConfig("t2v")), prompts, levels=(0.7,))
    local = attention_profile(init_model(TrainConfig("t2v", local_heads=2)), prompts, levels=(0.7,))
    for p, q in zip(plain, local):
        assert all(x > 4.0 for x in q["local"][:2]) and all(x < 1.3 for x in p["local"][:2])
        # the other heads keep their (near-uniform, content-driven) attention: the gain offsets the bias's rms
        np.testing.assert_allclose(q["entropy"][2:], p["entropy"][2:], atol=0.1)
        assert all(x < 1.3 for x in q["local"][2:])
    # only the self-attention q/k biases and norm gains change, and only with local_heads > 0
    a = nnx.state(init_model(TrainConfig("t2v")), nnx.Param)
    b = nnx.state(init_model(TrainConfig("t2v", local_heads=2)), nnx.Param)
    changed = {jax.tree_util.keystr(p).removesuffix(".value") for p, same in jax.tree_util.tree_flatten_with_path(
        jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a, b))[0] if not same}
    assert changed == {f"['layers']['attn1']['{m}']['{w}']" for m, w in
                       (("to_q", "bias"), ("to_k", "bias"), ("norm_q", "weight"), ("norm_k", "weight"))}
    with pytest.raises(ValueError, match="TrainConfig.local_heads"):
        TrainConfig("t2v", heads=2, local_heads=3)


def test_width_and_video_pool_switches():
    wide = model_config(TrainConfig("t2v", dim=256))
    assert (wide.dim, wide.num_attention_heads, wide.attention_head_dim, wide.ffn_dim) == (256, 4, 64, 1024)
    with pytest.raises(ValueError, match=r"TrainConfig.dim=100 is not allowed"):
        TrainConfig("t2v", dim=100)
    with pytest.raises(ValueError, match="TrainConfig.video_pool"):
        TrainConfig("t2v", video_pool=-1)
    # video_pool=1 with one prompt: every video of every batch is the same render; the noise still differs
    tc = TrainConfig("t2v", batch=4, prompt_pool=1, video_pool=1)
    a, b = make_batch(tc, 0), make_batch(tc, 7)
    assert all(np.array_equal(a["x0"][0], x) for x in (*a["x0"], *b["x0"]))
    assert not np.array_equal(a["noise"], b["noise"])
    # the switch leaves everything else of the batch as the default draws it
    plain = make_batch(TrainConfig("t2v", batch=4, prompt_pool=1), 0)
    for key in ("context", "noise", "sigma"):
        np.testing.assert_array_equal(a[key], plain[key])
    assert not np.array_equal(plain["x0"][0], plain["x0"][1])
