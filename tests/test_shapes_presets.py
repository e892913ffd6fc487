"""The shapes-model presets: the packaged calibrations are the results/ files byte for byte, the sparse settings
and HASTE read the packaged EBC table, and TeaCache never uses thresholds calibrated for another step count."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments.shapes_presets as presets
from experiments.haste import load_ebc_table
from experiments.shapes_presets import (
    CALIBRATION_DIR,
    SHAPES_TMR,
    calibrate_shapes_teacache,
    calibration_note,
    ebc_file,
    shapes_base_policy,
    shapes_haste,
    shapes_teacache,
    svg2_shapes,
    xattention_shapes,
)
from models.shapes import encode_prompts, sample_prompts
from models.shapes.pretrained import latent_noise, load_shapes_model
from vidaccel.sparse_attention import find_sparse_state
from vidaccel.transforms import DenoiseSpec

RESULTS = Path(__file__).resolve().parents[1] / "results"
PACKAGED = {"teacache_t2v.json": RESULTS / "caching" / "teacache_t2v.json",
            "ebc_xattention.json": RESULTS / "sparse" / "ebc_xattention.json",
            "ebc_svg2.json": RESULTS / "sparse" / "ebc_svg2.json"}


def test_packaged_calibrations_are_the_results_files():
    """Each package copy equals the file its result command writes under results/ (refresh one after the other)."""
    assert sorted(p.name for p in CALIBRATION_DIR.glob("*.json")) == sorted(PACKAGED)
    for name, source in PACKAGED.items():
        assert (CALIBRATION_DIR / name).read_bytes() == source.read_bytes(), \
            f"experiments/calibrations/{name} differs from {source.relative_to(RESULTS.parent)}: copy it over"


def test_sparse_settings_and_base_policies():
    x, s = xattention_shapes(), svg2_shapes()
    assert (x.block_size, x.stride, x.threshold) == (16, 4, 0.9)
    assert (s.num_q_clusters, s.num_k_clusters, s.block_q, s.block_k) == (16, 32, 32, 16)
    assert xattention_shapes(stride=8, backend="gather").stride == 8 and svg2_shapes(top_p=0.5).top_p == 0.5
    assert shapes_base_policy("xattention", 0.7).thresholds == 0.7
    assert shapes_base_policy("svg2", 0.6).thresholds == 0.6 and shapes_base_policy("svg2").thresholds == 0.9
    assert SHAPES_TMR.pool_block == 32
    with pytest.raises(ValueError, match="base='flash' is not allowed"):
        shapes_base_policy("flash")


def _spec(model_steps=10):
    ctx = jnp.asarray(encode_prompts(sample_prompts(1, 0, "train")))
    noise = latent_noise(1, 0)
    return DenoiseSpec(jax.ShapeDtypeStruct(noise.shape, noise.dtype), jax.ShapeDtypeStruct(ctx.shape, ctx.dtype),
                       model_steps)


def test_shapes_haste_reads_the_packaged_ebc_table():
    """By default the per-head thresholds are the packaged table's (it is not uniform); ebc=None is the shared
    threshold; TMR wraps the policy unless tmr=None."""
    model = load_shapes_model("t2v")
    table = load_ebc_table(ebc_file("xattention")).thresholds
    assert len(np.unique(table)) > 1
    den = shapes_haste(model, "xattention", backend="reference")
    st = find_sparse_state(den.init(_spec()))
    np.testing.assert_array_equal(st.thresholds, table)
    assert st.policy.anchor_step.shape == (table.shape[0],)              # TMR's per-layer state
    plain = find_sparse_state(shapes_haste(model, "svg2", ebc=None, tmr=None, backend="reference").init(_spec()))
    np.testing.assert_array_equal(plain.thresholds, np.full(table.shape, 0.9, np.float32))
    assert not hasattr(plain.policy, "anchor_step")


def test_teacache_calibration_is_for_its_step_count(monkeypatch):
    """A calibration records its step count; shapes_teacache refuses a given calibration made for another count,
    recalibrates on the spot (saying so) when the packaged one is for another count, and uses the packaged
    one at its own count; calibration_note says which."""
    model = load_shapes_model("t2v")
    logs = []
    cal = calibrate_shapes_teacache(model, num_prompts=1, steps=8, log=logs.append)
    assert cal["steps"] == 8 and set(cal["thresholds"]) == {"slow", "fast"} and "8 steps" in logs[0]
    with pytest.raises(ValueError, match="steps=3: TeaCache calibration needs at least 4 sampler steps"):
        calibrate_shapes_teacache(model, num_prompts=1, steps=3)
    assert all(np.isfinite(cal["coefficients"])) and 0 < cal["replayed_fractions"]["slow"] <= 1
    with pytest.raises(ValueError, match="made for 8 steps, not steps=10"):
        shapes_teacache(model, "slow", steps=10, calibration=cal)
    assert shapes_teacache(model, "fast", steps=8, calibration=cal).name == "teacache"

    calls = []
    monkeypatch.setattr(presets, "calibrate_shapes_teacache", lambda m, **kw: calls.append(kw) or cal)
    logs.clear()
    shapes_teacache(model, "slow", steps=8, log=logs.append)
    assert [(c["steps"], c["num_prompts"]) for c in calls] == [(8, presets.ON_THE_SPOT_PROMPTS)]
    assert logs == ["TeaCache: the packaged teacache_t2v.json is for 50 steps; recalibrating on the spot for 8 steps"]
    assert "calibrated on the spot on 2 prompts for 8 steps" in calibration_note("teacache", steps=8)
    calls.clear()
    shapes_teacache(model, "slow", steps=50, log=logs.append)
    assert calls == [] and len(logs) == 1                       # the packaged 50-step calibration, silently
    assert "from teacache_t2v.json (50-step calibration" in calibration_note("teacache", steps=50)
    with pytest.raises(ValueError, match="speed='medium' is not allowed"):
        shapes_teacache(model, "medium", steps=50)


def test_calibration_notes_name_the_files():
    assert "ebc_xattention.json (EBC at 50 steps" in calibration_note("haste-xattention")
    assert "ebc_svg2.json" in calibration_note("haste-svg2")
    with pytest.raises(ValueError, match="method='dense' is not allowed"):
        calibration_note("dense")
