"""The trained shapes models and their tooling: loading by name, training batches, resumable training, the demo."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.demo import run_demo
from experiments.shapes_diagnose import denoise_by_level
from experiments.shapes_diagnose import main as diagnose_main
from models.shapes.latents import LATENT_CHANNELS, LATENT_FRAMES, TEXT_DIM
from models.shapes.pretrained import dense_denoiser, generate_t2v, load_shapes_model, training_info
from models.shapes.prompts import GRAMMAR, sample_prompts
from models.shapes.train import TrainConfig, lr_schedule, make_batch, shapes_config, train
from models.shapes.train import main as train_main
from vidaccel import sampling


@pytest.mark.parametrize("name", ["t2v", "ar"])
def test_committed_models_load_by_name(name):
    model = load_shapes_model(name)
    assert model.cfg == shapes_config(name)
    assert model.cfg.in_channels == LATENT_CHANNELS and model.cfg.text_dim == TEXT_DIM
    info = training_info(name)
    assert info["name"] == name and info["steps"] >= 1 and info["train_seconds"] > 0


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown shapes model 'big'"):
        load_shapes_model("big")
    with pytest.raises(FileNotFoundError, match="train it with"):
        load_shapes_model("t2v", path=tmp_path)


def test_generate_t2v_refuses_bad_prompts_before_sampling():
    model = load_shapes_model("t2v")
    with pytest.raises(ValueError, match=r"no prompts given; pass at least one, e.g. \['a small red circle"):
        generate_t2v(model, [])
    for bad, why in (("a small red circle moving right on a black background", "expected a speed word"),
                     ("", "word 0 is '<end of prompt>'")):
        with pytest.raises(ValueError) as err:
            generate_t2v(model, [sample_prompts(1, 0)[0], bad], steps=1)
        assert str(err.value).startswith(f"prompts[1]: cannot parse prompt {bad!r}") and why in str(err.value)
        assert GRAMMAR in str(err.value)


def test_generate_t2v_takes_one_str_and_reuses_its_compiled_sampler():
    """A model's dense Denoiser is made once, so a second call neither builds a new one nor compiles again;
    the model's current parameters are used."""
    model = load_shapes_model("t2v")
    prompt = sample_prompts(1, 3, "heldout")[0]
    den = dense_denoiser(model)
    assert dense_denoiser(model) is den and dense_denoiser(load_shapes_model("t2v")) is not den
    one = generate_t2v(model, prompt, steps=2)                     # a str is one prompt, not one per character
    assert one.latents.shape == (1, LATENT_FRAMES, 16, 16, LATENT_CHANNELS)
    compiled = sampling._sample_jit._cache_size()
    again = generate_t2v(model, [prompt], steps=2)
    np.testing.assert_array_equal(again.latents, one.latents)
    assert sampling._sample_jit._cache_size() == compiled and dense_denoiser(model) is den
    nnx.update(model, jax.tree.map(lambda a: a * 0.5, nnx.state(model, nnx.Param)))   # new weights, same model
    changed = generate_t2v(model, prompt, steps=2)
    assert sampling._sample_jit._cache_size() == compiled and dense_denoiser(model) is den
    assert not np.array_equal(changed.latents, one.latents)


def test_batches_are_pure_in_seed_and_step():
    tc = TrainConfig("ar", batch=4)
    a, b, c = make_batch(tc, 7), make_batch(tc, 7), make_batch(tc, 8)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["noise"], c["noise"])
    assert a["x0"].shape == (4, LATENT_FRAMES, 16, 16, LATENT_CHANNELS)
    sigma = a["sigma"]                                  # per latent frame, constant within each 2-frame chunk
    assert sigma.shape == (4, LATENT_FRAMES)
    np.testing.assert_array_equal(sigma[:, 0::2], sigma[:, 1::2])
    assert (sigma >= 0).all() and (sigma < 1).all()
    t2v = make_batch(TrainConfig("t2v", batch=4), 7)["sigma"]
    assert t2v.shape == (4, 1) and (t2v > 0).all()


def test_lr_schedule_warmup_constant_cooldown():
    const = lr_schedule(TrainConfig("t2v", steps=1000, lr=1e-3, warmup=100))
    assert float(const(0)) == 0.0 and float(const(50)) == pytest.approx(5e-4)
    assert float(const(100)) == pytest.approx(1e-3) and float(const(999)) == pytest.approx(1e-3)
    cool = lr_schedule(TrainConfig("t2v", steps=1000, lr=1e-3, warmup=100, cooldown=400))
    assert float(cool(600)) == pytest.approx(1e-3)            # the decay starts at steps - cooldown
    assert float(cool(800)) == pytest.approx(5e-4)
    assert float(cool(1000)) == pytest.approx(0.0, abs=1e-12)
    for bad in (-1, 901):                                      # negative, or longer than the run after warm-up
        with pytest.raises(ValueError, match=f"cooldown={bad} is invalid; allowed: 0 \\(none\\) or 1 to steps"):
            TrainConfig("t2v", steps=1000, warmup=100, cooldown=bad)


def test_train_cli_refuses_a_bad_cooldown(capsys):
    with pytest.raises(SystemExit):
        train_main(["t2v", "--steps", "300", "--cooldown", "250"])
    assert "--cooldown=250 is invalid; allowed: 0 (none) or 1 to steps minus the 200 warm-up steps (100)" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_training_resumes_exactly(tmp_path):
    """2 steps, then resumed to 3, give the same EMA weights as 3 steps straight (batches are pure in the step)."""
    kw = dict(batch=2, save_every=100, warmup=1)
    train(TrainConfig("t2v", steps=2, **kw), tmp_path / "run", tmp_path / "a", log_every=1)
    train(TrainConfig("t2v", steps=3, **kw), tmp_path / "run", tmp_path / "a", log_every=1)
    train(TrainConfig("t2v", steps=3, **kw), tmp_path / "run2", tmp_path / "b", log_every=1)
    a = nnx.state(load_shapes_model("t2v", path=tmp_path / "a"), nnx.Param)
    b = nnx.state(load_shapes_model("t2v", path=tmp_path / "b"), nnx.Param)
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a, b))
    assert max(diffs) <= 1e-6
    assert json.loads((tmp_path / "a" / "training.json").read_text())["steps"] == 3
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_demo_writes_report_and_gifs(tmp_path):
    report = run_demo(tmp_path, num_prompts=1, steps=2, methods=["dense"], log=lambda *a: None)
    assert (tmp_path / "dense.gif").stat().st_size > 0
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["methods"][0]["method"] == "dense" == report["methods"][0]["method"]
    assert 0.0 <= saved["methods"][0]["adherence"] <= 1.0
    assert "| dense |" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="unknown demo method"):
        run_demo(tmp_path, methods=["magic"])


def test_diagnosis_denoises_noised_ground_truth():
    """At noise level 0 the x0 estimate is the ground truth; at 0.1 the trained model must restore it."""
    rows = denoise_by_level(load_shapes_model("t2v"), sample_prompts(2, 0, "heldout"), seed=0, levels=(0.0, 0.1))
    assert [r["noise_level"] for r in rows] == [0.0, 0.1]
    assert rows[0]["x0_mse"] == 0.0 and rows[0]["score"] >= 0.98
    assert rows[1]["x0_mse"] < 0.05 and rows[1]["score"] >= 0.9


def test_diagnosis_cli_refuses_no_prompts(capsys):
    with pytest.raises(SystemExit):
        diagnose_main(["--n", "0"])
    assert "--n must be >= 1, got 0" in capsys.readouterr().err
