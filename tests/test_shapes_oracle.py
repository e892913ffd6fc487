"""The brute-force posterior-mean denoiser that bounds what a shapes model can reach at each noise level."""

import numpy as np
import pytest

from experiments.shapes_oracle import gap_by_level, main, posterior_mean, smooth_share
from models.shapes import encode_video, sample_prompts
from models.shapes.render import render_batch
from models.shapes.train import shapes_config
from models.wan import init_transformer


def test_oracle_picks_the_right_candidate_at_low_noise_and_the_mean_at_high_noise():
    prompt = sample_prompts(1, 3, "heldout", max_objects=1)[0]
    cands = encode_video(render_batch([prompt] * 6, seeds=np.arange(6)))
    rng = np.random.default_rng(0)
    eps = rng.standard_normal(cands[:2].shape).astype(np.float32)
    oracle = posterior_mean(cands)
    low = oracle(0.9 * cands[[4, 1]] + 0.1 * eps, 0.1)
    np.testing.assert_allclose(low, cands[[4, 1]], atol=1e-4)
    high = oracle(1e-4 * cands[[4, 1]] + 0.9999 * eps, 0.9999)
    np.testing.assert_allclose(high, np.broadcast_to(cands.mean(0), high.shape), atol=1e-2)


def test_gap_by_level_scores_model_oracle_and_prior_on_the_same_inputs():
    prompts = sample_prompts(1, 0, "heldout", max_objects=1)
    model = init_transformer(shapes_config("t2v"), seed=0)
    rows = gap_by_level(model, prompts, candidates=16, videos=2, levels=(0.3, 0.95))
    assert [r["noise"] for r in rows] == [0.3, 0.95]
    for r in rows:
        # the untrained head outputs v = 0, so its x0 estimate is x_s itself
        assert r["model_mse"] > r["oracle"] > 0.0 and r["prior"] > 0.0


def test_cli_rejects_bad_counts(capsys):
    with pytest.raises(SystemExit):
        main(["--candidates", "0"])
    assert "--candidates" in capsys.readouterr().err


def test_smooth_share_tells_white_noise_from_a_smooth_error():
    rng = np.random.default_rng(0)
    white = rng.standard_normal((2, 8, 16, 16, 24)).astype(np.float32)
    assert smooth_share(white) == pytest.approx(0.125, abs=0.01)
    prompt = sample_prompts(1, 0, "heldout", max_objects=1)[0]
    a, b = encode_video(render_batch([prompt] * 2, seeds=[0, 1]))
    assert smooth_share((a - b)[None]) > 0.6                     # an object in the wrong place
