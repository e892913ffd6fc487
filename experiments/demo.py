"""`vidaccel demo`: generate shapes-world videos with the tiny trained text-to-video model, dense and accelerated.

For each method in `DEMO_METHODS` it samples the same prompts from the same noise (UniPC, CFG), writes a GIF
grid (one column per prompt, upscaled), and reports wall time (a second, compiled run), speed-up over dense,
model calls and block-stack passes (TeaCache skips passes, not calls), prompt adherence, and PSNR/SSIM
against the dense run. Everything lands in one output folder (`report.json`, `report.md`, `<method>.gif`) and
a summary table is printed.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

DEFAULT_OUT = Path("out/demo")
GIF_SCALE = 4


def _dense(model):
    from models.wan.denoiser import wan_denoiser

    return wan_denoiser(model)


def _teacache(model):
    from experiments.teacache import shapes_t2v_teacache

    return shapes_t2v_teacache(model)


def _teacache_note() -> str:
    from experiments.teacache import T2V_CALIBRATION

    if T2V_CALIBRATION.exists():
        return f"TeaCache slow: coefficients and threshold from {T2V_CALIBRATION.name} (experiments.cache_table)"
    return "TeaCache slow: calibrated on the spot on 2 prompts (no results/caching/teacache_t2v.json)"


def _haste_xattn(model):
    from experiments.haste import haste_shapes

    return haste_shapes(model, "xattention")


def _haste_note() -> str:
    from experiments.haste import DEFAULT_EBC_PATHS

    path = DEFAULT_EBC_PATHS["xattention"]
    if path.exists():
        return f"HASTE on XAttention: temporal mask reuse + per-head thresholds from {path.name} (EBC)"
    return "HASTE on XAttention: temporal mask reuse, shared threshold (no EBC table in results/sparse/)"


# name -> builder(model) -> Denoiser, and what each accelerated run uses (printed in the report).
DEMO_METHODS: dict[str, Callable] = {"dense": _dense, "teacache": _teacache, "haste_xattn": _haste_xattn}
DEMO_NOTES: dict[str, Callable[[], str]] = {"teacache": _teacache_note, "haste_xattn": _haste_note}


def write_gif(videos: np.ndarray, path: Path, scale: int = GIF_SCALE, fps: int = 8) -> None:
    """Videos (B, T, H, W, 3) uint8 -> one looping GIF, the B videos side by side, upscaled `scale`x (nearest)."""
    from PIL import Image

    b, t, h, w, _ = videos.shape
    grid = videos.transpose(1, 2, 0, 3, 4).reshape(t, h, b * w, 3)
    grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    frames = [Image.fromarray(f) for f in grid]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)


def run_demo(out_dir: Path = DEFAULT_OUT, *, num_prompts: int = 4, steps: int = 50, guidance: float = 5.0,
             seed: int = 0, methods: list[str] | None = None, log=print) -> dict:
    """Run the demo and write its files; returns the report dict."""
    from models.shapes import adherence, sample_prompts
    from models.shapes.pretrained import generate_t2v, load_shapes_model, training_info
    from vidaccel.checks import int_arg
    from vidaccel.metrics import psnr, ssim
    from vidaccel.transforms import total_work

    int_arg("num_prompts", num_prompts, 1)
    int_arg("steps", steps, 1)
    methods = list(methods or DEMO_METHODS)
    unknown = [m for m in methods if m not in DEMO_METHODS]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; known: {list(DEMO_METHODS)}")
    if "dense" not in methods:
        methods = ["dense", *methods]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_shapes_model("t2v")
    prompts = sample_prompts(num_prompts, seed, "heldout")
    rows, dense_videos = [], None
    for name in methods:
        den = DEMO_METHODS[name](model)
        log(f"[{name}] compiling and sampling {num_prompts} prompts, UniPC {steps} steps, CFG {guidance} ...")
        first = generate_t2v(den, prompts, seed=seed, steps=steps, guidance=guidance)
        gen = generate_t2v(den, prompts, seed=seed, steps=steps, guidance=guidance, progress=f"{name}")
        adh = adherence(gen.videos, prompts)
        work = total_work(gen.state)
        write_gif(gen.videos, out_dir / f"{name}.gif")
        row = {"method": name, "seconds": round(gen.seconds, 3), "first_call_seconds": round(first.seconds, 3),
               "model_calls": work["calls"], "block_passes": work["block_passes"], "adherence": round(adh["score"], 4),
               "adherence_per_prompt": [round(r["score"], 4) for r in adh["per_video"]]}
        if name == "dense":
            dense_videos, dense_seconds = gen.videos, gen.seconds
        else:
            ref = dense_videos.astype(np.float32) / 255.0
            x = gen.videos.astype(np.float32) / 255.0
            row.update(speedup=round(dense_seconds / gen.seconds, 3),
                       psnr_vs_dense=round(float(np.mean(psnr(x, ref))), 2),      # psnr/ssim are per video
                       ssim_vs_dense=round(float(np.mean(ssim(x, ref))), 4))
        if name in DEMO_NOTES:
            row["setup"] = DEMO_NOTES[name]()
        rows.append(row)
    report = {"prompts": prompts, "seed": seed, "steps": steps, "guidance": guidance, "solver": "unipc",
              "model": training_info("t2v"), "machine": f"{platform.machine()}, {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d %H:%M"), "methods": rows}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    table = format_table(rows)
    md = ["# vidaccel demo", "", "Prompts (GIF columns, left to right):", ""]
    md += [f"{i + 1}. {p}" for i, p in enumerate(prompts)]
    md += ["", f"UniPC {steps} steps, CFG {guidance}, seed {seed}; seconds = a compiled second run.", "", table, ""]
    md += [f"- {r['method']}: {r['setup']}" for r in rows if "setup" in r] + [""]
    (out_dir / "report.md").write_text("\n".join(md))
    log(table)
    log(f"wrote {out_dir}/report.md, report.json and {', '.join(f'{m}.gif' for m in methods)}")
    return report


def format_table(rows: list[dict]) -> str:
    head = ("| method | seconds | speed-up | model calls | block-stack passes | adherence | PSNR vs dense "
            "| SSIM vs dense |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seconds']:.2f} | {r.get('speedup', 1.0):.2f}x | {r['model_calls']} | "
                     f"{r['block_passes']} | {r['adherence']:.3f} | {r.get('psnr_vs_dense', '-')} | "
                     f"{r.get('ssim_vs_dense', '-')} |")
    return "\n".join(lines)
