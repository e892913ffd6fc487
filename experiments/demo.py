"""`vidaccel demo`: generate shapes-world videos with the tiny trained text-to-video model, dense and accelerated.

For each method in `DEMO_METHODS` it samples the same prompts from the same noise (UniPC, CFG), writes a GIF
grid (one column per prompt, upscaled), and reports wall time (compiled runs, timed round-robin), speed-up
over dense, model calls and block-stack passes (TeaCache skips passes, not calls), prompt adherence, and
PSNR/SSIM against the dense run (`experiments.harness.video_fidelity`). The accelerated methods are the
presets of `experiments.shapes_presets`, with the packaged calibrations; the report says which calibration
each row used. To show what each prompt asks for, it also renders every prompt with the shapes world's
renderer (`ground_truth.gif`, same column order; one of the many videos a prompt allows, since object
placement is random) and stacks ground truth, dense and every method as rows of one GIF (`compare.gif`).
Everything lands in one output folder (`report.json`, `report.md`, `<method>.gif`, `ground_truth.gif`,
`compare.gif`) and a summary table is printed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from experiments.harness import interleaved_times, machine, markdown_table, video_fidelity, write_results
from experiments.shapes_presets import calibration_note, shapes_haste, shapes_teacache
from models.shapes import LATENT_FRAMES, VIDEO_SIZE, adherence, render_batch, sample_prompts
from models.shapes.pretrained import generate_t2v, load_shapes_model, training_info
from models.wan.denoiser import wan_denoiser
from vidaccel.checks import float_arg, int_arg
from vidaccel.transforms import Denoiser, total_work

DEFAULT_OUT = Path("out/demo")
GIF_SCALE = 4
GIF_MAX_WIDTH = 65_535                                   # a GIF's width is a 16-bit number
MAX_PROMPTS = GIF_MAX_WIDTH // (VIDEO_SIZE * GIF_SCALE)  # one upscaled video per GIF column

# name -> (builder(model, steps, log) -> Denoiser, the `calibration_note` method it uses or None)
DEMO_METHODS: dict[str, tuple[Callable[..., Denoiser], str | None]] = {
    "dense": (lambda model, steps, log: wan_denoiser(model), None),
    "teacache": (lambda model, steps, log: shapes_teacache(model, steps=steps, log=log), "teacache"),
    "haste_xattn": (lambda model, steps, log: shapes_haste(model, "xattention"), "haste-xattention"),
}


def check_num_prompts(num_prompts) -> int:
    """`num_prompts` if the demo can show that many videos side by side in one GIF, else ValueError."""
    int_arg("num_prompts", num_prompts)
    if not 1 <= num_prompts <= MAX_PROMPTS:
        raise ValueError(f"num_prompts={num_prompts} is out of range; allowed: 1 to {MAX_PROMPTS} (each prompt is "
                         f"a {VIDEO_SIZE * GIF_SCALE}-pixel column of the GIF, and a GIF is at most "
                         f"{GIF_MAX_WIDTH:,} pixels wide)")
    return num_prompts


def write_gif(videos: np.ndarray, path: Path, scale: int = GIF_SCALE, fps: int = 8) -> None:
    """Videos -> one looping GIF, upscaled `scale`x (nearest).

    (B, T, H, W, 3) uint8 lays the B videos side by side; (R, B, T, H, W, 3) adds R rows of them (e.g. ground
    truth above each method's samples of the same prompts).
    """
    if videos.ndim == 5:
        videos = videos[None]
    if videos.ndim != 6 or videos.shape[-1] != 3:
        raise ValueError(f"write_gif: videos shape {videos.shape} is invalid; expected (B, T, H, W, 3) or "
                         f"(R, B, T, H, W, 3)")
    r, b, t, h, w, _ = videos.shape
    if b * w * scale > GIF_MAX_WIDTH or r * h * scale > GIF_MAX_WIDTH:
        raise ValueError(f"{r} x {b} videos of {h} x {w} upscaled {scale}x are {r * h * scale:,} x {b * w * scale:,} "
                         f"pixels; a GIF holds at most {GIF_MAX_WIDTH:,} per side")
    grid = videos.transpose(2, 0, 3, 1, 4, 5).reshape(t, r * h, b * w, 3)
    grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    iio.imwrite(path, grid, extension=".gif", duration=int(1000 / fps), loop=0)


def run_demo(out_dir: Path = DEFAULT_OUT, *, num_prompts: int = 4, steps: int = 50, guidance: float = 5.0,
             seed: int = 0, methods: list[str] | None = None, log=print) -> dict:
    """Run the demo and write its files; returns the report dict.

    Args:
      out_dir: output folder (created).
      num_prompts: held-out prompts, 1 to `MAX_PROMPTS` (one GIF column each).
      steps, guidance, seed: UniPC steps, CFG scale, noise seed.
      methods: names from `DEMO_METHODS` (default all); dense is always run, as the reference.
    """
    check_num_prompts(num_prompts)
    int_arg("steps", steps, minimum=1)
    float_arg("guidance", guidance)
    int_arg("seed", seed, minimum=0)
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

    def generate(den, progress=False):
        return generate_t2v(den, prompts, seed=seed, steps=steps, guidance=guidance, progress=progress)

    dens = {name: DEMO_METHODS[name][0](model, steps, log) for name in methods}   # calibrates first if needed
    truth = render_batch(prompts, num_frames=2 * LATENT_FRAMES, seeds=[seed * 100_003 + i for i in range(num_prompts)])
    write_gif(truth, out_dir / "ground_truth.gif")
    rows, samples = [], [truth]
    for name in methods:
        note = DEMO_METHODS[name][1]
        log(f"[{name}] compiling and sampling {num_prompts} prompts, UniPC {steps} steps, CFG {guidance} ...")
        gen = generate(dens[name], progress=name)
        write_gif(gen.videos, out_dir / f"{name}.gif")
        samples.append(gen.videos)
        adh = adherence(gen.videos, prompts)
        work = total_work(gen.state)
        row = {"method": name, "first_call_seconds": round(gen.seconds, 3), "model_calls": work["calls"],
               "block_passes": work["block_passes"], "adherence": round(adh["score"], 4),
               "adherence_per_prompt": [round(r["score"], 4) for r in adh["per_video"]]}
        if name == "dense":
            dense_videos = gen.videos
        else:
            fid = video_fidelity(gen.videos, dense_videos)
            row.update(psnr_vs_dense=round(fid["psnr"], 2), ssim_vs_dense=round(fid["ssim"], 4))
        if note is not None:
            row["setup"] = calibration_note(note, steps=steps)
        rows.append(row)
    write_gif(np.stack(samples), out_dir / "compare.gif")
    truth_adh = adherence(truth, prompts)["score"]
    log("timing a compiled run of every method (round-robin) ...")
    times = interleaved_times({name: (lambda den=den: generate(den).videos) for name, den in dens.items()}, 1)
    for row in rows:
        row["seconds"] = round(times[row["method"]][0], 3)
        if row["method"] != "dense":
            row["speedup"] = round(times["dense"][0] / times[row["method"]][0], 3)
    report = {"prompts": prompts, "seed": seed, "steps": steps, "guidance": guidance, "solver": "unipc",
              "model": training_info("t2v"), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "ground_truth_adherence": round(truth_adh, 4), "methods": rows}
    table = format_table(rows)
    md = ["# vidaccel demo", "", "Prompts (GIF columns, left to right):", ""]
    md += [f"{i + 1}. {p}" for i, p in enumerate(prompts)]
    md += ["", f"`ground_truth.gif`: each prompt rendered by the shapes world (adherence {truth_adh:.3f}); "
           f"`compare.gif`: rows ground truth, {', '.join(methods)}."]
    md += ["", f"UniPC {steps} steps, CFG {guidance}, seed {seed}; seconds = a compiled run, methods timed "
           "round-robin.", "", table, ""]
    md += [f"- {r['method']}: {r['setup']}" for r in rows if "setup" in r]
    write_results(out_dir, "report", report, "\n".join(md))
    log(table)
    gifs = ", ".join(f"{m}.gif" for m in ["ground_truth", *methods, "compare"])
    log(f"wrote {out_dir}/report.md, report.json and {gifs}")
    return report


def format_table(rows: list[dict]) -> str:
    """The demo's summary table (markdown)."""
    return markdown_table(rows, {
        "method": "method", "seconds": lambda r: f"{r['seconds']:.2f}",
        "speed-up": lambda r: f"{r.get('speedup', 1.0):.2f}x", "model calls": "model_calls",
        "block-stack passes": "block_passes", "adherence": lambda r: f"{r['adherence']:.3f}",
        "PSNR vs dense": "psnr_vs_dense", "SSIM vs dense": "ssim_vs_dense"})
