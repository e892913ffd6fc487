"""Short training runs of the t2v shapes model, one switch at a time, scored on a quick held-out subset.

    python -m experiments.shapes_ablate overfit1 baseline heads2 --steps 300
    python -m experiments.shapes_ablate --list                 # the variants and what each changes

Every variant is the committed t2v training (`models.shapes.train.TrainConfig`) with a few fields
overridden, trained from scratch for `--steps` steps (warm-up `--warmup`, constant lr) on the same
deterministic batches (`make_batch` is a pure function of seed and step), then sampled (UniPC `--eval-steps`,
CFG `--guidance`) and scored for adherence on `--n` held-out prompts. The `overfit*` variants train on a fixed
pool of training prompts and are scored on that same pool (the pool repeated to `--n` videos with different
noise): a pipeline that cannot overfit a few prompts has a bug, not a capacity limit.

Runs live in `runs/ablate/<variant>_<steps>/` (Orbax state, `log.jsonl`, the EMA export) and resume where they
stopped; a finished run is only scored again. Results accumulate, one entry per variant and step count, in
`results/shapes/ablations.json` and a table in `results/shapes/ablations.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from experiments.harness import markdown_table, write_results
from experiments.shapes_diagnose import denoise_by_level
from models.shapes import CRITERIA, adherence, sample_prompts
from models.shapes.pretrained import generate_t2v, load_shapes_model, training_info
from models.shapes.train import TrainConfig, prompt_pool, train
from vidaccel.checks import float_arg, int_arg

RESULTS = Path("results/shapes")
# Noise levels at which a run's one-call x0 estimate of noised ground truth is scored (`denoise_by_level`): where
# layout and motion are decided, a less noisy read of learning than samples from a short run.
DENOISE_LEVELS = (0.5, 0.7, 0.85)
RUNS = Path("runs/ablate")

# variant -> (TrainConfig overrides, what it tests)
VARIANTS: dict[str, tuple[dict, str]] = {
    "baseline": ({}, "the committed t2v recipe (short)"),
    "overfit1": ({"prompt_pool": 1}, "one fixed training prompt, scored on it: can the pipeline overfit?"),
    "overfit16": ({"prompt_pool": 16}, "16 fixed training prompts, scored on them"),
    "no_decay_norms": ({"decay_all": False}, "no weight decay on norms, biases, modulation tables, embeddings"),
    "heads2": ({"heads": 2}, "2 heads of 64 instead of 4 of 32 (q/k RMSNorm allows larger logits)"),
    "heads1": ({"heads": 1}, "1 head of 128"),
    "rope_theta": ({"rope_theta": 100.0}, "RoPE base 100 instead of 10,000 (positions vary over an 8x8x8 grid)"),
    "text_init": ({"text_init": "xavier"}, "xavier text projection instead of N(0, 0.02)"),
    "noise_high": ({"shift": 8.0}, "training noise levels through shift 8 instead of 3 (more high noise)"),
    "overfit1_heads1": ({"prompt_pool": 1, "heads": 1},
                        "overfit1 with 1 head of 128 (attention logits capped near +-11 instead of +-5.7)"),
    "overfit1_heads2": ({"prompt_pool": 1, "heads": 2}, "overfit1 with 2 heads of 64"),
    "overfit1_rope": ({"prompt_pool": 1, "rope_theta": 100.0},
                      "overfit1 with RoPE base 100 (4 heads of 32): do positions that vary over the grid help?"),
    "overfit1_attn": ({"prompt_pool": 1, "heads": 1, "rope_theta": 100.0, "decay_all": False},
                      "overfit1 with every attention lever at once: 1 head of 128, RoPE base 100, no decay on "
                      "norms/biases/embeddings"),
    "memorize1": ({"prompt_pool": 1, "video_pool": 1},
                  "one fixed video (one prompt, one render seed; fresh noise): can the model learn to denoise it?"),
    "local": ({"local_heads": 2}, "2 of 4 self-attention heads per layer start local (`local_attention_init`)"),
    "attn_local": ({"local_heads": 2, "rope_theta": 100.0, "decay_all": False},
                   "2 of 4 heads start local, RoPE base 100, no decay on norms/biases/embeddings"),
    "overfit1_noise_high": ({"prompt_pool": 1, "shift": 8.0}, "overfit1 with training noise levels through shift 8"),
    "overfit1_lr3x": ({"prompt_pool": 1, "lr": 1.8e-3}, "overfit1 at lr 1.8e-3 instead of 6e-4"),
    "wide": ({"dim": 256}, "width 256 (FFN 1024) instead of 128: more width per token than its 96 latent values"),
    "overfit1_wide": ({"prompt_pool": 1, "dim": 256},
                      "overfit1 at width 256 (FFN 1024): a token carries 96 latent values, 0.75 of the width 128"),
    "overfit1_local": ({"prompt_pool": 1, "local_heads": 2},
                       "overfit1 with 2 of 4 self-attention heads per layer starting local"),
}


def variant_config(variant: str, steps: int, warmup: int, **extra) -> TrainConfig:
    """The TrainConfig of `variant` (ValueError naming the allowed variants for an unknown one)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    return TrainConfig("t2v", steps=steps, warmup=warmup, save_every=min(100, steps), **VARIANTS[variant][0],
                       **extra)


def eval_prompts(tc: TrainConfig, n: int) -> list[str]:
    """Held-out prompts, or for a prompt-pool run the pool itself repeated to `n` videos."""
    pool = prompt_pool(tc)
    if pool is None:
        return sample_prompts(n, 0, "heldout")
    return [pool[i % len(pool)] for i in range(n)]


def score_export(export_dir: Path, prompts: list[str], steps: int, guidance: float, batch: int = 16) -> dict:
    """Sample `prompts` with the exported model (noise seeds 0..) and score them for adherence."""
    model = load_shapes_model("t2v", path=export_dir)
    videos, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        videos.append(generate_t2v(model, prompts[i:i + batch], seed=i, steps=steps, guidance=guidance).videos)
    adh = adherence(np.concatenate(videos), prompts)
    denoise = [{k: r[k] for k in ("noise_level", "x0_mse", "score")}
               for r in denoise_by_level(model, prompts, seed=0, levels=DENOISE_LEVELS)]
    return {"score": round(adh["score"], 4), "criteria": {c: round(adh[c], 4) for c in CRITERIA},
            "denoise": denoise, "eval_seconds": round(time.perf_counter() - t0, 1)}


def run_variant(variant: str, steps: int, warmup: int, n: int, eval_steps: int, guidance: float,
                runs: Path = RUNS) -> dict:
    """Train `variant` (resuming its run folder) and score it; the entry `ablations.json` records."""
    tc = variant_config(variant, steps, warmup)
    run_dir = runs / f"{variant}_{steps}"
    export_dir = run_dir / "export"
    done = (export_dir / "training.json").exists() and training_info("t2v", export_dir)["steps"] >= steps
    if not done:
        train(tc, run_dir, export_dir)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    info = training_info("t2v", export_dir)
    res = score_export(export_dir, eval_prompts(tc, n), eval_steps, guidance)
    changed = {k: v for k, v in dataclasses.asdict(tc).items()
               if k in VARIANTS[variant][0] or k in ("steps", "warmup")}
    return {"variant": variant, "steps": info["steps"], "what": VARIANTS[variant][1], "config": changed,
            "eval": {"prompts": "training pool" if tc.prompt_pool else "held-out", "n": n,
                     "solver": f"unipc {eval_steps}", "guidance": guidance},
            "final_loss": round(log[-1]["loss"], 4), "loss_curve": [[r["step"], round(r["loss"], 4)] for r in log],
            "train_seconds": info["train_seconds"], **res}


def _denoise_cell(entry: dict, i: int) -> str:
    rows = entry.get("denoise")
    return "-" if not rows else f"{rows[i]['x0_mse']:.4f} / {rows[i]['score']:.2f}"


def ablations_markdown(entries: list[dict]) -> str:
    cols = {"variant": "variant", "steps": "steps", "scored on": lambda r: r["eval"]["prompts"],
            "final loss": "final_loss", "adherence": "score",
            **{c: (lambda r, c=c: r["criteria"][c]) for c in CRITERIA},
            **{f"x0 mse / one-call score at {s}": (lambda r, i=i: _denoise_cell(r, i))
               for i, s in enumerate(DENOISE_LEVELS)},
            "train s": "train_seconds", "eval s": "eval_seconds"}
    return ("t2v shapes model, short runs from scratch on identical batches (`python -m experiments.shapes_ablate`);"
            " final loss is the mean over the last 25 steps. The x0 columns: the eval prompts' ground truth (render"
            " seeds 0..n-1) noised to level s, the model's one-call x0 estimate (conditional, no CFG): its MSE in"
            " latent units and its adherence score (`shapes_diagnose.denoise_by_level`).\n\n"
            + markdown_table(entries, cols))


def record(entry: dict, out_dir: Path = RESULTS) -> list[dict]:
    """Add `entry` to `ablations.json` (replacing one of the same variant and steps); rewrite the table."""
    path = out_dir / "ablations.json"
    entries = json.loads(path.read_text())["runs"] if path.exists() else []
    entries = [e for e in entries if (e["variant"], e["steps"]) != (entry["variant"], entry["steps"])] + [entry]
    write_results(out_dir, "ablations", {"runs": entries}, ablations_markdown(entries))
    return entries


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.shapes_ablate", description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="*", help=f"any of: {', '.join(VARIANTS)}")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=50, help="lr warm-up steps (default %(default)s)")
    p.add_argument("--n", type=int, default=16, help="prompts scored (default %(default)s)")
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--runs", type=Path, default=RUNS)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if a.list:
        for name, (over, what) in VARIANTS.items():
            print(f"{name:16s} {what}  {over}")
        return
    if not a.variants:
        p.error(f"name at least one variant; allowed: {', '.join(VARIANTS)}")
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    try:
        int_arg("--steps", a.steps, minimum=1)
        int_arg("--warmup", a.warmup, minimum=1, maximum=a.steps)
        int_arg("--n", a.n, minimum=1)
        int_arg("--eval-steps", a.eval_steps, minimum=1)
        float_arg("--guidance", a.guidance, low=0.0)
    except ValueError as err:
        p.error(str(err))
    for variant in a.variants:
        entry = run_variant(variant, a.steps, a.warmup, a.n, a.eval_steps, a.guidance, a.runs)
        record(entry, a.out)
        print(json.dumps({k: entry[k] for k in ("variant", "steps", "final_loss", "score", "criteria",
                                                "train_seconds", "eval_seconds")}), flush=True)


if __name__ == "__main__":
    main()
