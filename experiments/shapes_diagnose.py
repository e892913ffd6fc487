"""Where the t2v shapes model fails: denoising noised ground truth by noise level, and sampler settings.

    python -m experiments.shapes_diagnose            # 16 held-out prompts -> results/shapes/t2v_diagnosis.json, .md

1. *Denoising.* Ground-truth renders of held-out prompts are noised to level s (x_s = (1 - s) x0 + s eps, the
   training convention) and the model's one-call estimate x0 = x_s - s v (conditional, no CFG) is scored
   for adherence. A model that places and moves objects well from high noise keeps a high score up to
   s near 1; where the score falls tells at which noise level layout and motion are lost.
2. *Sampling.* Adherence of samples from pure noise under several solvers, shifts, step counts and guidance
   scales, to tell a model limit (every setting scores alike) from a sampler one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.harness import markdown_table, publish
from models.shapes import CRITERIA, adherence, decode_latents, encode_prompts, encode_video, sample_prompts
from models.shapes.pretrained import generate_t2v, load_shapes_model, training_info
from models.shapes.render import render_batch
from vidaccel.checks import int_arg
from vidaccel.solvers import euler, unipc

NOISE_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.85, 0.95, 1.0)
# (solver, steps, shift, guidance): the evaluation setting first, then one change at a time
SAMPLERS = (("unipc", 50, 3.0, 5.0), ("unipc", 50, 3.0, 1.0), ("unipc", 50, 3.0, 2.0), ("unipc", 50, 1.0, 5.0),
            ("unipc", 50, 8.0, 5.0), ("euler", 50, 3.0, 5.0), ("euler", 200, 3.0, 5.0))
_SOLVERS = {"unipc": unipc, "euler": euler}


def _row(adh: dict) -> dict:
    return {"score": round(adh["score"], 4), **{c: round(adh[c], 4) for c in CRITERIA}}


def denoise_by_level(model, prompts: list[str], seed: int, levels=NOISE_LEVELS) -> list[dict]:
    """Adherence of the one-call x0 estimate from ground truth noised to each level in `levels`."""
    x0 = encode_video(render_batch(prompts))
    ctx = jnp.asarray(encode_prompts(prompts))
    eps = np.random.default_rng(seed).standard_normal(x0.shape).astype(np.float32)
    call = jax.jit(lambda x, t: model(x, t, ctx))
    rows = []
    for s in levels:
        xt = (1 - s) * x0 + s * eps
        v = np.asarray(call(jnp.asarray(xt), jnp.full((len(prompts),), 1000.0 * s, jnp.float32)))
        x0_hat = xt - s * v
        rows.append({"noise_level": s, "x0_mse": round(float(np.mean((x0_hat - x0) ** 2)), 4),
                     **_row(adherence(decode_latents(x0_hat, uint8=True), prompts))})
    return rows


def sampler_sweep(model, prompts: list[str], seed: int, settings=SAMPLERS) -> list[dict]:
    """Adherence of samples from pure noise for each (solver, steps, shift, guidance) in `settings`."""
    rows = []
    for name, steps, shift, guidance in settings:
        gen = generate_t2v(model, prompts, seed=seed, guidance=guidance, solver=_SOLVERS[name](steps, shift),
                           progress=f"{name} {steps} shift {shift} cfg {guidance}")
        rows.append({"solver": name, "steps": steps, "shift": shift, "guidance": guidance,
                     **_row(adherence(gen.videos, prompts))})
    return rows


def _table(rows: list[dict], keys: tuple[str, ...]) -> str:
    cols = (*keys, "score", *CRITERIA)
    return markdown_table(rows, {c: c for c in cols}, align="r" * len(cols))


def report_markdown(res: dict) -> str:
    """Both diagnoses as markdown tables."""
    return "\n".join(["one-call x0 estimate from noised ground truth (conditional, no CFG):",
                      _table(res["denoise"], ("noise_level", "x0_mse")), "", "samples from pure noise:",
                      _table(res["samplers"], ("solver", "steps", "shift", "guidance"))])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.shapes_diagnose", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=16, help="held-out prompts (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, default=None, help="an exported t2v folder (default: committed)")
    p.add_argument("--out", type=Path, default=Path("results/shapes/t2v_diagnosis.json"))
    a = p.parse_args(argv)
    try:
        int_arg("--n", a.n, minimum=1)
    except ValueError as err:
        p.error(str(err))
    model = load_shapes_model("t2v", path=a.checkpoint)
    prompts = sample_prompts(a.n, 0, "heldout")
    res = {"n": a.n, "seed": a.seed, "training": training_info("t2v", a.checkpoint),
           "denoise": denoise_by_level(model, prompts, a.seed), "samplers": sampler_sweep(model, prompts, a.seed)}
    publish(a.out, res, report_markdown(res))


if __name__ == "__main__":
    main()
