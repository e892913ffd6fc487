"""The result commands' shared harness: compiled runner, interleaved timing, video fidelity, reports."""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.harness import (
    PSNR_CAP,
    CompiledRunner,
    interleaved_times,
    markdown_table,
    plot_or_skip,
    pyplot,
    video_fidelity,
    write_results,
)
from experiments.xattention import XAttentionConfig, xattention
from models.wan import init_transformer, wan_tiny
from models.wan.denoiser import wan_denoiser
from vidaccel import metrics
from vidaccel.sampling import sample
from vidaccel.solvers import unipc
from vidaccel.sparse_attention import sparse_attention, sparse_summary


@functools.cache
def _model():
    m = init_transformer(wan_tiny(num_layers=2), seed=4)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(5), m.proj_out.kernel.shape) * 0.3)
    return m


def _inputs(n=2):
    k = jax.random.split(jax.random.key(11), 2)
    return jax.random.normal(k[0], (n, 4, 8, 8, 4)), jax.random.normal(k[1], (n, 3, 16))


def test_runner_compiles_once_per_structure_and_returns_the_latents():
    noise, ctx = _inputs()
    solver = unipc(3)
    runner = CompiledRunner(noise, ctx, solver=solver, guidance=3.0)
    dense = wan_denoiser(_model())
    run = runner.run("dense", dense)
    assert run.latents.shape == noise.shape and runner.compilations == 1
    for i in range(2):              # one prompt per call, CFG against a zero context
        want = sample(dense, None, noise[i:i + 1], ctx[i:i + 1], solver=solver, guidance=3.0,
                      negative_context=jnp.zeros_like(ctx[i:i + 1])).latents[0]
        np.testing.assert_allclose(run.latents[i], want, rtol=0, atol=2e-5)
    assert int(run.state.cond.work.calls) == 2 * 3           # counters summed over the prompts
    again = runner.run("dense", wan_denoiser(_model()))      # a new Denoiser of the same structure
    assert runner.compilations == 1 and again.job == 1
    np.testing.assert_array_equal(again.latents, run.latents)

    sparse = sparse_attention(wan_denoiser(_model()), xattention(XAttentionConfig(
        block_size=16, stride=4, warmup_steps=1, backend="reference")))
    low = runner.run("sparse", sparse, thresholds=np.full((2, 2), 0.1, np.float32))
    full = runner.run("sparse", sparse, thresholds=np.ones((2, 2), np.float32))
    assert runner.compilations == 2
    assert sparse_summary(low.state)["density_sparse"] < sparse_summary(full.state)["density_sparse"] == 1.0
    assert not np.allclose(low.latents, full.latents)
    times = runner.retime(2)
    assert [len(t) for t in times] == [3] * 4 and times[0][0] == run.seconds
    with pytest.raises(ValueError, match="no sparse attention"):
        runner.run("dense-thr", wan_denoiser(_model()), thresholds=np.ones((2, 2)))


def test_interleaved_times_calls_every_function_reps_times_round_robin():
    calls, rounds = [], []

    def make(name):
        return lambda: calls.append(name) or jnp.zeros(())

    fns = {name: make(name) for name in ("a", "b", "c")}
    times = interleaved_times(fns, 3, warmup=1, after_round=lambda r, t: rounds.append((r, len(t["c"]))))
    assert calls == ["a", "b", "c"] * 4                       # one warm-up round, then 3 timed rounds
    assert rounds == [(0, 1), (1, 2), (2, 3)]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)
    calls.clear()
    interleaved_times(fns, 2)
    assert calls == ["a", "b", "c"] * 2


def test_video_fidelity_is_the_metrics_module_with_capped_psnr():
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, (3, 2, 16, 16, 3), dtype=np.uint8)
    noise = rng.integers(-20, 21, ref.shape)
    videos = np.clip(ref.astype(int) + noise, 0, 255).astype(np.uint8)
    videos[1] = ref[1]                                        # an identical video: PSNR +inf, counted as the cap
    fid = video_fidelity(videos, ref)
    want = metrics.fidelity(videos.astype(np.float32) / 255, ref.astype(np.float32) / 255)
    p = np.asarray(want["psnr"])
    assert np.isinf(p[1]) and fid["psnr_per_video"][1] == PSNR_CAP
    np.testing.assert_array_equal(fid["psnr_per_video"], np.minimum(p, PSNR_CAP))     # bit for bit
    assert fid["psnr"] == float(np.mean(np.minimum(p, PSNR_CAP)))
    for key in ("ssim", "relative_l1", "relative_l2"):
        assert fid[key] == float(np.mean(np.asarray(want[key])))
    floats = video_fidelity(videos.astype(np.float32) / 255, ref.astype(np.float32) / 255)   # [0, 1] floats alike
    assert floats["psnr"] == pytest.approx(fid["psnr"], rel=1e-6)
    assert video_fidelity(videos, ref, cap=200.0)["psnr_per_video"][1] == 200.0


def test_markdown_table():
    rows = [{"name": "dense", "x": 1.5, "y": None}, {"name": "sparse", "x": 0.25, "y": 3}]
    md = markdown_table(rows, {"method": "name", "x": lambda r: f"{r['x']:.2f}", "y": "y"})
    assert md.splitlines() == ["| method | x | y |", "|---|---:|---:|", "| dense | 1.50 | - |", "| sparse | 0.25 | 3 |"]
    assert markdown_table(rows[:1], {"a": "name", "b": "x"}, align="rl").splitlines()[1] == "|---:|---|"
    with pytest.raises(ValueError, match="align='l'"):
        markdown_table(rows, {"a": "name", "b": "x"}, align="l")


def test_write_results(tmp_path):
    paths = write_results(tmp_path / "out", "report", {"a": np.float32(0.5), "b": jnp.arange(3), "c": [1, None]},
                          "# title")
    assert [p.name for p in paths] == ["report.json", "report.md"]
    assert json.loads(paths[0].read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": [1, None]}
    assert paths[1].read_text() == "# title\n"
    assert write_results(tmp_path, "only", {"x": 1}) == [tmp_path / "only.json"]
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        write_results(tmp_path, "bad", {"x": object()})


def test_plots_without_matplotlib_say_how_to_install_it(monkeypatch):
    def plot(tag):
        pyplot()
        drawn.append(tag)

    drawn, logged = [], []
    assert plot_or_skip(plot, "with", log=logged.append) and drawn == ["with"] and logged == []
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"plots need matplotlib.*pip install 'vidaccel\[plots\]'"):
        pyplot()
    assert not plot_or_skip(plot, "without", log=logged.append) and drawn == ["with"]
    assert len(logged) == 1 and logged[0].startswith("plots skipped: plots need matplotlib")
