"""How far a t2v shapes model is from the best possible denoiser, by noise level.

    python -m experiments.shapes_oracle                     # the committed t2v model
    python -m experiments.shapes_oracle --checkpoint local=runs/ablate/attn_local_1000/export
    -> results/shapes/oracle.{json,md}

For a one-object prompt the clean video is fixed by the object's start position alone, so the posterior mean
E[x0 | x_s] can be computed by brute force: `candidates` renders of the prompt (render seeds 0..K-1, i.e. K
start positions) weighted by their likelihood under the noisy video, w_k ~ exp(-|x_s - (1 - s) c_k|^2 / 2 s^2).
That estimate is Bayes-optimal for the prompt's distribution as the K renders sample it; with finite K the true
start position is missed by up to half a grid cell, so its error is an upper bound on the optimum. Each test
video (render seeds from 10^6, outside the candidates) is noised once per level, and the oracle and the model
(its one-call, conditional x0 = x_s - s v) are scored on the same noisy input: x0 MSE in latent units (what
the velocity loss is, times s^2). A model near the oracle has learned what the data allow; a large gap at a
noise level is where it fails to read objects (and their motion) that the noisy video still shows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.harness import markdown_table, publish
from experiments.shapes_coupling import add_checkpoint_option, models_to_measure
from models.shapes import decode_latents, encode_prompts, encode_video, sample_prompts
from models.shapes.pretrained import load_shapes_model
from models.shapes.render import render_batch
from vidaccel.checks import int_arg

NOISE_LEVELS = (0.3, 0.5, 0.7, 0.85, 0.95)
TEST_SEED = 1_000_000


def posterior_mean(candidates: np.ndarray):
    """The oracle over `candidates` (K, ...): a function (noisy videos `xt` (B, ...), level `s`) -> E[x0 | x_s].

    The candidates go to the device and their squared norms are taken once, not per noise level.
    """
    c = jnp.asarray(candidates.reshape(len(candidates), -1))
    sq = jnp.sum(c * c, -1)[None]

    def x0(xt: np.ndarray, s: float) -> np.ndarray:
        x = jnp.asarray(xt.reshape(len(xt), -1))
        # |x - (1-s) c|^2 = |x|^2 - 2 (1-s) x.c + (1-s)^2 |c|^2; |x|^2 is the same for every candidate
        w = jax.nn.softmax((2 * (1 - s) * x @ c.T - (1 - s) ** 2 * sq) / (2 * s * s), axis=-1)
        return np.asarray(w @ c).reshape(xt.shape)

    return x0


def smooth_share(err_latents: np.ndarray) -> float:
    """Share of an x0 error's pixel-space energy kept by 2 x 2 x 2 (frame, row, col) mean pooling: 0.125 for
    white noise (noise the model failed to remove), 1.0 for an error smooth at that scale (a misplaced or missing
    object)."""
    e = decode_latents(err_latents.astype(np.float32)) - decode_latents(np.zeros_like(err_latents, np.float32))
    b, t, h, w, c = e.shape
    pooled = e.reshape(b, t // 2, 2, h // 2, 2, w // 2, 2, c).mean((2, 4, 6))
    return float(np.sum(pooled**2) * 8 / np.sum(e**2))


def gap_by_level(model, prompts: list[str], candidates: int, videos: int, seed: int = 0,
                 levels=NOISE_LEVELS) -> list[dict]:
    """Per noise level: x0 MSE of the prior mean, of `model` (`model_mse`) and of the oracle, averaged over the
    one-object `prompts`."""
    call = jax.jit(lambda x, t, c: model(x, t, c))
    rng = np.random.default_rng(seed)
    acc = {s: {"prior": [], "model_mse": [], "oracle": [], "model_smooth": []} for s in levels}
    for prompt in prompts:
        cands = encode_video(render_batch([prompt] * candidates, seeds=np.arange(candidates)))
        oracle = posterior_mean(cands)
        x0 = encode_video(render_batch([prompt] * videos, seeds=TEST_SEED + np.arange(videos)))
        ctx = jnp.asarray(encode_prompts([prompt] * videos))
        mean = cands.mean(0, keepdims=True)
        for s in levels:
            xt = ((1 - s) * x0 + s * rng.standard_normal(x0.shape)).astype(np.float32)
            v = np.asarray(call(jnp.asarray(xt), jnp.full((videos,), 1000.0 * s, jnp.float32), ctx))
            err = xt - s * v - x0
            acc[s]["model_mse"].append(np.mean(err**2))
            acc[s]["model_smooth"].append(smooth_share(err))
            acc[s]["oracle"].append(np.mean((oracle(xt, s) - x0) ** 2))
            acc[s]["prior"].append(np.mean((mean - x0) ** 2))
    return [{"noise": s, **{k: round(float(np.mean(v)), 5) for k, v in acc[s].items()},
             "model / oracle": round(float(np.mean(acc[s]["model_mse"]) / max(np.mean(acc[s]["oracle"]), 1e-12)), 1)}
            for s in levels]


def report_markdown(res: dict) -> str:
    lines = [f"x0 MSE (latent units) of the one-call estimate from ground truth noised to level s: {res['n']} "
             f"held-out one-object prompts x {res['videos']} videos; oracle = posterior mean over "
             f"{res['candidates']} renders of the prompt (an upper bound on the optimum); prior = the mean of those "
             "renders, what a model that ignores the noisy video can reach; model_smooth = share of the model error's "
             "pixel energy kept by 2 x 2 x 2 pooling (white noise 0.125, a smooth error 1.0) "
             "(`python -m experiments.shapes_oracle`).", ""]
    rows = [{"model": name, **r} for name, entry in res["models"].items() for r in entry]
    lines.append(markdown_table(rows, {c: c for c in ("model", "noise", "prior", "model_mse", "oracle",
                                                      "model / oracle", "model_smooth")}))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.shapes_oracle", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8, help="held-out one-object prompts (default %(default)s)")
    p.add_argument("--candidates", type=int, default=2048,
                   help="renders per prompt in the oracle (default %(default)s)")
    p.add_argument("--videos", type=int, default=8, help="test videos per prompt (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    add_checkpoint_option(p)
    p.add_argument("--out", type=Path, default=Path("results/shapes/oracle.json"))
    a = p.parse_args(argv)
    try:
        for flag, v in (("--n", a.n), ("--candidates", a.candidates), ("--videos", a.videos)):
            int_arg(flag, v, minimum=1)
    except ValueError as err:
        p.error(str(err))
    prompts = sample_prompts(a.n, a.seed, "heldout", max_objects=1)
    models = models_to_measure(a)
    res = {"n": a.n, "candidates": a.candidates, "videos": a.videos, "seed": a.seed, "prompts": prompts,
           "checkpoints": {k: None if v is None else str(v) for k, v in models.items()}, "models": {}}
    for name, path in models.items():
        res["models"][name] = gap_by_level(load_shapes_model("t2v", path=path), prompts, a.candidates, a.videos,
                                           a.seed)
    publish(a.out, res, report_markdown(res))


if __name__ == "__main__":
    main()
