"""generate_timestep_matrix equals diffusers' SkyReels-V2 diffusion-forcing schedule, case by case.

Fixtures: tests/fixtures/df_schedule (scripts/fixtures/make_df_schedule.py, diffusers 0.42.1). For every
recorded case: where diffusers returns, the four outputs are equal (values, dtypes, shapes, interval
types), except the documented deviations, where vidaccel raises a ValueError instead; where diffusers
raises (any exception), vidaccel raises a ValueError.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from models.ar import generate_timestep_matrix
from vidaccel.solvers import unipc

FIX = Path(__file__).parent / "fixtures" / "df_schedule"
META = json.loads((FIX / "meta.json").read_text())
DATA = np.load(FIX / "df_schedule.npz")
CASES = META["cases"]


def _call(case):
    return generate_timestep_matrix(case["num_latent_frames"], DATA["template_" + case["template"]],
                                    case["base_num_latent_frames"], case["ar_step"], case["num_pre_ready"],
                                    case["causal_block_size"], case["shrink_interval_with_mask"])


def _deviation(case) -> str | None:
    """Inputs diffusers accepts but vidaccel rejects on purpose (see models/ar/schedules.py)."""
    F, cbs, pre = case["num_latent_frames"], case["causal_block_size"], case["num_pre_ready"]
    if case["ar_step"] < 0:
        return "ar_step"
    if pre < 0:
        return "num_pre_ready"
    if case["base_num_latent_frames"] < 1:
        return "base_num_latent_frames"
    if cbs >= 1 and F >= 1 and F % cbs:
        return "multiple of causal_block_size"
    if cbs >= 1 and pre % cbs:
        return "multiple of causal_block_size"
    return None


def test_fixture_provenance():
    assert META["diffusers"] == "0.42.1" and META["torch"].startswith("2.13.0")
    ok = [c for c in CASES if c["raises"] is None]
    assert len(ok) > 150 and len(CASES) - len(ok) > 50  # the grid covers both outcomes
    # the grid has the structure it claims: async, sync, blocks, prefixes, windows smaller than the video
    assert {c["ar_step"] for c in ok} >= {0, 1, 2, 5}
    assert {c["causal_block_size"] for c in ok} >= {1, 2, 3, 5}
    assert any(c["num_pre_ready"] > 0 for c in ok)
    assert any(c["base_num_latent_frames"] < c["num_latent_frames"] for c in ok)


@pytest.mark.parametrize("j", range(len(CASES)))
def test_matches_diffusers(j):
    case = CASES[j]
    why = _deviation(case)
    if case["raises"] is not None or why is not None:
        with pytest.raises(ValueError, match=why):
            _call(case)
        return
    step_matrix, step_index, update_mask, valid = _call(case)
    assert [str(a.dtype) for a in (step_matrix, step_index, update_mask)] == ["int64", "int64", "bool"]
    assert case["dtypes"] == ["torch.int64", "torch.int64", "torch.bool"]
    np.testing.assert_array_equal(step_matrix, DATA[f"c{j}_step_matrix"])
    np.testing.assert_array_equal(step_index, DATA[f"c{j}_step_index"])
    np.testing.assert_array_equal(update_mask, DATA[f"c{j}_update_mask"])
    assert isinstance(valid, list) and all(type(a) is int and type(b) is int for a, b in valid)
    assert case["valid_interval_types"] == ["int"]
    assert [list(p) for p in valid] == DATA[f"c{j}_valid_interval"].tolist()


def test_deviation_cases_are_real_diffusers_behaviour():
    """Each deviation class is exercised, and diffusers really does accept those inputs."""
    dev = [c for c in CASES if _deviation(c) is not None and c["raises"] is None]
    kinds = {_deviation(c) for c in dev}
    assert kinds == {"ar_step", "num_pre_ready", "base_num_latent_frames", "multiple of causal_block_size"}
    for j, c in enumerate(CASES):
        if c in dev and c["num_latent_frames"] % c["causal_block_size"]:
            # diffusers drops the trailing frames: fewer columns than frames
            assert DATA[f"c{j}_step_matrix"].shape[1] < c["num_latent_frames"]


def test_skyreels_default_schedule():
    """97 frames -> 25 latents, blocks of 5, ar_step 5, 50 steps: 50 + 4*5 = 70 rows (spec 3.1)."""
    t = unipc(50, 8.0).timesteps
    sm, si, um, vi = generate_timestep_matrix(25, t, 25, ar_step=5, causal_block_size=5)
    assert sm.shape == (70, 25)
    # every frame takes each of its 50 solver steps exactly once, in order, at step index - 1
    for f in range(25):
        np.testing.assert_array_equal(si[um[:, f], f] - 1, np.arange(50))
        np.testing.assert_array_equal(sm[um[:, f], f], t)
    assert vi == [(0, 25)] * 70


def test_errors():
    t = np.array([999, 800, 500])
    with pytest.raises(ValueError, match="ar_step=1 is too small.*needs ar_step >= 2"):
        generate_timestep_matrix(6, t, 2, ar_step=1)
    with pytest.raises(ValueError, match="smaller than causal_block_size"):
        generate_timestep_matrix(6, t, 1, ar_step=5, causal_block_size=2)
    with pytest.raises(ValueError, match="num_latent_frames=7 must be a multiple of causal_block_size=2"):
        generate_timestep_matrix(7, t, 7, causal_block_size=2)
    with pytest.raises(ValueError, match="num_pre_ready=1 must be a multiple"):
        generate_timestep_matrix(6, t, 6, num_pre_ready=1, causal_block_size=2)
    with pytest.raises(ValueError, match="leaves no frame to denoise"):
        generate_timestep_matrix(6, t, 6, num_pre_ready=6)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        generate_timestep_matrix(6, [], 6)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        generate_timestep_matrix(6, np.ones((2, 3)), 6)
    with pytest.raises(ValueError, match="finite"):
        generate_timestep_matrix(6, [999.0, np.nan], 6)
    with pytest.raises(TypeError, match="real numbers"):
        generate_timestep_matrix(6, np.array(["a", "b"]), 6)
    with pytest.raises(ValueError, match="ar_step must be >= 0, got -1"):
        generate_timestep_matrix(6, t, 6, ar_step=-1)
    with pytest.raises(ValueError, match="causal_block_size must be >= 1, got 0"):
        generate_timestep_matrix(6, t, 6, causal_block_size=0)
    with pytest.raises(ValueError, match="num_latent_frames must be >= 1, got 0"):
        generate_timestep_matrix(0, t, 6)
    with pytest.raises(TypeError, match="num_latent_frames must be an int"):
        generate_timestep_matrix(6.0, t, 6)
    with pytest.raises(TypeError, match="ar_step must be an int"):
        generate_timestep_matrix(6, t, 6, ar_step=True)
    with pytest.raises(ValueError, match="shrink_interval_with_mask=True is not supported"):
        generate_timestep_matrix(6, t, 6, shrink_interval_with_mask=True)
