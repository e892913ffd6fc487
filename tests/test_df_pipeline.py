"""df_sample equals a recorded `SkyReelsV2DiffusionForcingPipeline` run (diffusers 0.42.1, tiny model, fp32):
asynchronous blocks (ar_step > 0) with CFG, and long videos over several windows whose prefix is the previous
window's tail, re-noised as the pipeline's `addnoise_condition` does (fixture: scripts/fixtures/make_df_pipeline.py).
"""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from models.ar.diffusion_forcing import df_sample, df_work
from models.wan import load_transformer
from vidaccel.solvers import unipc

FIX = Path(__file__).parent / "fixtures" / "df_pipeline"
META = json.loads((FIX / "meta.json").read_text())
DATA = np.load(FIX / "cases.npz")
TOL = 1e-5


def cl(a):
    """(B, C, F, H, W) -> channels-last (B, F, H, W, C)."""
    return np.moveaxis(np.asarray(a), 1, -1)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def case_inputs(name):
    """The whole video's noise as the pipeline drew it, the recorded re-noising draws and the settings."""
    case = META["cases"][name]
    lat = lambda frames: (frames - 1) // 4 + 1                   # noqa: E731  (the VAE's temporal factor 4)
    fw = lat(case["base_num_frames"])
    ov = 0 if case["overlap_history"] is None else lat(case["overlap_history"])
    windows = [cl(DATA[f"{name}_w{w}_noise"]) for w in range(case["windows"])]
    parts = [windows[0]] + [w[:, ov:] for w in windows[1:]]
    noise = jnp.asarray(np.concatenate(parts, axis=1))
    table = None
    if case["renoise_draws"]:
        draws = np.moveaxis(DATA[f"{name}_renoise"], 2, -1)     # (draws, B, P, H, W, C)
        rows = case["rows"]
        table = np.zeros((len(rows), max(rows), *draws.shape[1:]), np.float32)
        i = 0
        for w in range(1, len(rows)):                            # window 0 has no prefix, hence no draws
            table[w, :rows[w]] = draws[i:i + rows[w]]
            i += rows[w]
        assert i == len(draws)
    kw = dict(solver=unipc(case["steps"], META["shift"], last_sample_aliasing=True), ar_step=case["ar_step"],
              causal_block_size=META["model"]["num_frame_per_block"])
    if ov:
        kw.update(window_frames=fw, overlap_frames=ov, addnoise_condition=case["addnoise_condition"])
        if table is not None:
            kw.update(prefix_noise=jnp.asarray(table))
    if case["guidance"] > 1:
        kw.update(guidance=case["guidance"], negative_context=jnp.asarray(DATA[f"{name}_uncond"]))
    return noise, jnp.asarray(DATA[f"{name}_cond"]), kw, cl(DATA[f"{name}_out"])


@pytest.fixture(scope="module")
def model():
    return load_transformer(FIX / "model")


@pytest.mark.parametrize("name", ["async", "long", "long_sync"])
def test_vanilla_equals_the_diffusers_pipeline(model, name):
    noise, ctx, kw, ref = case_inputs(name)
    out = df_sample(model, noise, ctx, **kw)
    assert out.latents.shape == ref.shape
    assert rel(out.latents, ref) <= TOL
    rows = sum(META["cases"][name]["rows"])
    assert df_work(out.state)["calls"] == rows * (2 if "guidance" in kw else 1)
