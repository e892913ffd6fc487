"""The token-coupling diagnostic measures what self-attention carries between tokens: exactly zero when every
layer's self-attention output is zeroed (the rest of the block is per token), above zero otherwise."""

import jax.numpy as jnp
import pytest

from experiments.shapes_coupling import attention_profile, coupling, main
from models.shapes import sample_prompts
from models.shapes.train import shapes_config
from models.wan import init_transformer


def test_coupling_is_zero_without_self_attention_and_positive_with_it():
    prompts = sample_prompts(2, 0, "train")
    model = init_transformer(shapes_config("t2v"), seed=0)
    model.proj_out.kernel[...] = model.proj_out.kernel[...] + 0.05       # a non-trivial output head
    with_attention = coupling(model, prompts, levels=(0.9,))[0]
    assert with_attention["far"] > 1e-4 and with_attention["own"] > with_attention["far"]
    model.layers.attn1.to_out.kernel[...] = jnp.zeros_like(model.layers.attn1.to_out.kernel[...])
    without = coupling(model, prompts, levels=(0.9,))[0]
    assert without["far"] == 0.0 and without["own"] > 0.0


def test_attention_profile_reads_uniform_attention_as_uniform():
    prompts = sample_prompts(2, 0, "train")
    model = init_transformer(shapes_config("t2v"), seed=0)
    trained_like = attention_profile(model, prompts, levels=(0.9,))
    assert len(trained_like) == model.cfg.num_layers and len(trained_like[0]["local"]) == model.cfg.num_attention_heads
    assert all(x > 0.0 for r in trained_like for x in r["logit_std"])
    for proj in (model.layers.attn1.to_q, model.layers.attn1.to_k):        # q = k = 0: every logit is 0
        proj.kernel[...] = jnp.zeros_like(proj.kernel[...])
        proj.bias[...] = jnp.zeros_like(proj.bias[...])
    for r in attention_profile(model, prompts, levels=(0.9,)):
        assert r["logit_std"] == [0.0] * 4 and r["local"] == [1.0] * 4
        assert r["entropy"] == [round(float(jnp.log(512.0)), 3)] * 4


def test_cli_rejects_a_bad_checkpoint_spec(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--checkpoint", "no-equals-sign"])
    assert err.value.code == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
