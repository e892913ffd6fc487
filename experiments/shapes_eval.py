"""Acceptance figures of the trained shapes models: prompt adherence on held-out prompts.

    python -m experiments.shapes_eval t2v                 # 64 held-out prompts, UniPC 50, CFG 5
    python -m experiments.shapes_eval ar --length 4       # AR rollout to 4x the training length

Writes `results/shapes/<model>_adherence[_x<length>].json` (per-criterion means, per-prompt scores, the
model's training record, timings) and a `.md` beside it with the per-criterion table, and prints a summary.
Fixed seeds: prompts `sample_prompts(n, 0, "heldout")`, noise `latent_noise(n, seed)`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from experiments.harness import markdown_table, write_results
from models.ar.rollout import RolloutConfig, rollout
from models.shapes import CRITERIA, adherence, decode_latents, encode_prompts, sample_prompts
from models.shapes.latents import LATENT_FRAMES
from models.shapes.pretrained import generate_t2v, latent_noise, load_shapes_model, training_info
from vidaccel.checks import int_arg
from vidaccel.solvers import unipc

RESULTS = Path("results/shapes")


def evaluate_t2v(n: int, steps: int, guidance: float, seed: int, batch: int, checkpoint=None) -> dict:
    model = load_shapes_model("t2v", path=checkpoint)
    prompts = sample_prompts(n, 0, "heldout")
    videos, seconds = [], 0.0
    for i in range(0, n, batch):
        gen = generate_t2v(model, prompts[i:i + batch], seed=seed + i, steps=steps, guidance=guidance,
                           progress=f"t2v {i}/{n}")
        videos.append(gen.videos)
        seconds += gen.seconds
    return _summary("t2v", prompts, np.concatenate(videos), seconds,
                    {"steps": steps, "guidance": guidance, "seed": seed, "solver": "unipc", "frames": LATENT_FRAMES},
                    checkpoint)


def evaluate_ar(n: int, steps: int, guidance: float, seed: int, batch: int, length: int, window: int,
                sink: int, checkpoint=None) -> dict:
    model = load_shapes_model("ar", path=checkpoint)
    prompts = sample_prompts(n, 0, "heldout")
    frames = LATENT_FRAMES * length
    config = RolloutConfig(window_chunks=window, sink_chunks=sink)
    videos, seconds = [], 0.0
    for i in range(0, n, batch):
        ctx = jnp.asarray(encode_prompts(prompts[i:i + batch]))
        t0 = time.perf_counter()
        out = rollout(model, latent_noise(len(ctx), seed + i, frames), ctx, solver=unipc(steps), guidance=guidance,
                      negative_context=jnp.zeros_like(ctx), config=config, progress=f"ar {i}/{n}")
        seconds += time.perf_counter() - t0
        videos.append(decode_latents(np.asarray(out.latents), uint8=True))
    videos = np.concatenate(videos)
    res = _summary("ar", prompts, videos, seconds,
                   {"steps": steps, "guidance": guidance, "seed": seed, "solver": "unipc", "frames": frames,
                    "length_x_training": length, "window_chunks": window, "sink_chunks": sink}, checkpoint)
    # adherence of each training-length segment, to see whether it decays along the video; later segments
    # are scored mid-video (objects may be anywhere in their bounce cycle)
    seg = 2 * LATENT_FRAMES
    res["per_segment"] = segment_adherence(videos, prompts, seg)
    res["segment_mean"] = round(float(np.mean(res["per_segment"])), 4)
    res["segment_min"] = round(float(np.min(res["per_segment"])), 4)
    return res


def segment_adherence(videos: np.ndarray, prompts, seg: int) -> list[float]:
    """Adherence of each `seg`-frame segment of long videos; segments after the first are scored mid-video."""
    return [round(adherence(videos[:, s:s + seg], prompts, mid_video=s > 0)["score"], 4)
            for s in range(0, videos.shape[1], seg)]


def summary_markdown(res: dict) -> str:
    """The per-criterion adherence of an evaluation (and per segment for AR rollouts) as markdown."""
    lines = [f"{res['model']} shapes model, {res['n']} held-out prompts, {res['setup']}", "",
             markdown_table([{"criterion": "overall", "score": res["score"]},
                             *({"criterion": c, "score": s} for c, s in res["criteria"].items())],
                            {"criterion": "criterion", "mean adherence": "score"})]
    if "per_segment" in res:
        lines += ["", f"Per training-length segment: {res['per_segment']} (mean {res['segment_mean']}, "
                      f"min {res['segment_min']})"]
    return "\n".join(lines)


def _summary(name, prompts, videos, seconds, setup, checkpoint=None) -> dict:
    adh = adherence(videos, prompts)
    return {"model": name, "n": len(prompts), "setup": setup, "score": round(adh["score"], 4),
            "criteria": {c: round(adh[c], 4) for c in CRITERIA},
            "per_prompt": [{"prompt": p, "score": round(r["score"], 4)}
                           for p, r in zip(prompts, adh["per_video"], strict=True)],
            "sampling_seconds": round(seconds, 1), "training": training_info(name, checkpoint)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.shapes_eval", description=__doc__.split("\n")[0])
    p.add_argument("model", choices=["t2v", "ar"])
    p.add_argument("--n", type=int, default=64, help="held-out prompts (default %(default)s)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=4, help="AR: video length in multiples of the training length")
    p.add_argument("--window", type=int, default=3, help="AR: rolling window in chunks (training saw at most 3)")
    p.add_argument("--sink", type=int, default=0, help="AR: sink chunks kept for good")
    p.add_argument("--checkpoint", type=Path, default=None, help="an exported model folder (default: committed)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    try:
        for flag, v in (("--n", a.n), ("--steps", a.steps), ("--batch", a.batch), ("--length", a.length)):
            int_arg(flag, v, minimum=1)
    except ValueError as err:
        p.error(str(err))
    if a.model == "t2v":
        res = evaluate_t2v(a.n, a.steps, a.guidance, a.seed, a.batch, a.checkpoint)
        out = a.out or RESULTS / "t2v_adherence.json"
    else:
        res = evaluate_ar(a.n, a.steps, a.guidance, a.seed, a.batch, a.length, a.window, a.sink, a.checkpoint)
        out = a.out or RESULTS / f"ar_adherence_x{a.length}.json"
    out = write_results(out.parent, out.stem, res, summary_markdown(res))[0]
    print(json.dumps({k: res[k] for k in ("model", "n", "score", "criteria", "setup", "sampling_seconds")}, indent=1))
    if "per_segment" in res:
        print("adherence per training-length segment:", res["per_segment"], "mean", res["segment_mean"],
              "min", res["segment_min"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
