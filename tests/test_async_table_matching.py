"""The async table's compute matching: TeaCache's polynomial fitted without the window-crossing rows, its
threshold from replaying the rule on whole videos (checked against a live run's counters), why the papers'
polynomial cannot reach the targets, and the shared, interpolating threshold search."""

import numpy as np
import pytest

from experiments.async_cache_table import (
    Row,
    Runner,
    Setup,
    fit_window_polynomial,
    geometry,
    papers_reach,
    teacache_match,
    window_starts,
)
from experiments.cache_thresholds import calibration_inputs, choose_mc_threshold
from experiments.flowcache import df_method
from experiments.teacache import probe
from models.ar.diffusion_forcing import df_sample, df_work
from models.ar.window import df_window_denoiser
from models.shapes.pretrained import load_shapes_model
from vidaccel.transforms import branch_states


def test_polynomial_fit_leaves_out_window_starts():
    rng = np.random.default_rng(3)
    rows = [7, 6, 6]
    coeffs = np.array([3.0, -2.0, 0.5, 1.5, 0.01])
    x = rng.uniform(0.005, 0.06, (2, sum(rows)))
    y = np.polyval(coeffs, x)
    x[:, window_starts(rows)] = rng.uniform(1.0, 2.0, (2, 3))      # cross-window changes: far out of range
    y[:, window_starts(rows)] = rng.uniform(-5.0, 5.0, (2, 3))
    fit = fit_window_polynomial(x, y, rows)
    assert list(window_starts(rows)) == [0, 7, 13]
    np.testing.assert_allclose(fit["coefficients"], coeffs, rtol=1e-5, atol=1e-6)
    assert fit["max_change"] == pytest.approx(np.delete(x, [0, 7, 13], axis=1).max())
    assert fit["fit_relative_error"] < 1e-6


def test_papers_polynomial_stops_at_the_first_window():
    rng = np.random.default_rng(4)
    rows = [20, 16, 16]
    x = rng.uniform(0.01, 0.05, (2, sum(rows)))
    x[:, window_starts(rows)] = 1.4          # the size of a cross-window e0 change on the shapes model
    reach = papers_reach(x, 0.0)
    assert 0 < reach <= rows[0] / sum(rows) + 1e-9     # nothing after the first window start is computed
    with pytest.raises(ValueError, match="target"):
        teacache_match(x, (1.0, 0.0), 2.0, 0.0, 0.0)


def test_choose_threshold_shares_runs_across_targets():
    calls = []

    def fraction(t):                         # smooth, falling in the threshold
        calls.append(t)
        return float(1.0 / (1.0 + 10.0 * t))

    seen = {}
    t50, f50 = choose_mc_threshold(fraction, 0.5, 0.05, lambda m: None, tol=0.005, seen=seen, interpolate=True)
    n50 = len(calls)
    t30, f30 = choose_mc_threshold(fraction, 0.3, 0.05, lambda m: None, tol=0.005, seen=seen, interpolate=True)
    assert abs(f50 - 0.5) <= 0.005 and abs(f30 - 0.3) <= 0.005 and t30 > t50
    assert len(set(calls)) == len(calls) == len(seen)          # every threshold run once
    assert n50 <= 6 and len(calls) - n50 <= 6


def test_teacache_match_equals_the_live_counters():
    """The replayed threshold's FLOPs fraction is what a live TeaCache run over the same windows counts."""
    setup = Setup(n=1, steps=6, ar_step=1, length=2, calib_n=1)
    model = load_shapes_model("ar")
    geom = geometry(setup, model.cfg.num_frame_per_block)
    _, ctx, noise = calibration_inputs(setup, geom["frames"])
    run = Runner(model, setup, ctx, noise, geom)
    out = df_sample(probe(df_window_denoiser(model), "e0"), noise, ctx, **run.kwargs("main", 0))
    changes = np.stack([np.asarray(b.input_change) for b in branch_states(out.state)])
    outputs = np.stack([np.asarray(b.output_change) for b in branch_states(out.state)])
    assert changes.shape[1] == sum(geom["rows_per_window"]) and geom["windows"] == 3
    van, tc = Row("vanilla", "", 0.0), Row("teacache", "", None, calibrated=True)
    work = df_work(out.state)
    vflops = run.flops(van, work)
    share = run.flops(van, {**work, "block_passes": 0, "token_layers": 0, "attn_pairs": 0.0}) / vflops
    poly = fit_window_polynomial(changes, outputs, geom["rows_per_window"])
    m = teacache_match(changes, poly["coefficients"], poly["max_change"], share, 0.75)
    live = run.flops(tc, df_work(run.one(tc, m["threshold"], 0, poly).state)) / vflops
    assert live == pytest.approx(m["replayed_fraction"], rel=1e-6)
    assert 0.5 < live < 1.0


def test_df_method_reuses_one_denoiser_per_setting():
    """df_sample compiles per denoiser object: a second prompt of the same row must get the same one."""
    model = load_shapes_model("ar")
    a = df_method("flowcache", model, window_frames=8, thresh=0.1)[0]
    assert df_method("flowcache", model, window_frames=8, thresh=0.1)[0] is a
    assert df_method("flowcache", model, window_frames=8, thresh=0.15)[0] is not a
    poly = df_method("teacache", model, window_frames=8, thresh=0.1, coefficients=[1.0, 0.0], max_change=0.2)[0]
    assert df_method("teacache", model, window_frames=8, thresh=0.1, coefficients=(1.0, 0.0), max_change=0.2)[0] \
        is poly
    with pytest.raises(ValueError, match="thresh"):
        df_method("flowcache", model, window_frames=8, thresh=-1.0)
