"""The caching table in the papers' setting: asynchronous diffusion forcing on the embedded AR model.

    python -m experiments.async_cache_table                 # -> results/caching/async_table.{json,md,npz}
    python -m experiments.async_cache_table --n 1 --steps 8 --methods vanilla,flowcache-paper-slow --out /tmp/x

The setting of issue 14 (FlowCache / MotionCache on SkyReels-V2 scaled to the shapes `ar` model): causal
block 2 latent frames (the model's `num_frame_per_block`), windows of 4 chunks (8 latent frames, its training
context) overlapping by one chunk, `ar_step` 5 (a tenth of the steps), UniPC 50, CFG 5, prefix re-noising
`addnoise_condition` 20 (SkyReels-V2's), a video of 32 latent frames (4x the training length, 5 windows).
Every method runs through `experiments.flowcache.df_run` with the papers' code defaults (TeaCache's
Wan2.1-1.3B ret-steps polynomial for the e0 rules), twice:

- at the papers' own thresholds (TeaCache 0.05 / 0.10, TeaCache4Wan2.1's published 1.3B values; FlowCache
  SkyReels 0.1 / 0.15, MAGI 0.01 / 0.015; MotionCache 0.1, the only value its code ships), with whatever
  compute that gives;
- at thresholds matched to 50% and 30% of vanilla's block-stack work (token-layers), found by
  `experiments.cache_thresholds.choose_mc_threshold` over real asynchronous runs of the first window of
  training-split calibration prompts (`cache_thresholds.calibration_inputs`, never the evaluation prompts).
  The search measures the first window; the fraction it aims at is converted to the whole video from the
  schedule (later windows carry a one-chunk prefix, so per-chunk execution saves less there).

Columns: FLOPs from the counters (`df_work` -> `experiments.cache_table.flops`), wall-clock speed-up
(each method's runs timed with `harness.interleaved_times` in this process; with one prompt the time
includes compiling), PSNR / SSIM against async vanilla (`harness.video_fidelity`), adherence of the whole
video and per training-length segment (later ones scored mid-video), and the bytes of the K/V buffer.
LPIPS is left out: see docs/caching.md. Results are rewritten after every method, and a rerun with the same
setup resumes from the rows already in the JSON (vanilla's latents are kept in `async_table.npz`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.cache_report import MIB, verdict
from experiments.cache_table import flops
from experiments.cache_thresholds import calibration_inputs, choose_mc_threshold, tokens
from experiments.flowcache import MAGI_THRESH, SKYREELS_THRESH, df_run
from experiments.harness import fmt, interleaved_times, machine, markdown_table, video_fidelity, write_results
from experiments.shapes_eval import segment_adherence
from models.ar.diffusion_forcing import df_work
from models.shapes import TEMPORAL_GROUP, adherence, decode_latents, encode_prompts, sample_prompts
from models.shapes.latents import LATENT_FRAMES
from models.shapes.pretrained import latent_noise, load_shapes_model, training_info
from vidaccel.checks import int_arg
from vidaccel.solvers import unipc

RESULTS = Path("results/caching")
NAME = "async_table"
TEACACHE_THRESH = {"slow": 0.05, "fast": 0.10}     # TeaCache4Wan2.1, T2V-1.3B
MOTIONCACHE_THRESH = 0.1                            # MotionCache's SkyReels run script (one value ships)
MATCHED = (("50", 0.5), ("30", 0.3))
CACHES = {"teacache": "teacache", "flowcache": "flowcache", "flowcache-magi": "flowcache_magi",
          "motioncache": "motioncache"}


def method_specs(kv_chunks: int) -> dict[str, tuple[str, str, float | None, int | None]]:
    """name -> (df_run method, setting, papers' threshold or None (matched), kv_chunks), in run order."""
    paper = {"teacache": TEACACHE_THRESH, "flowcache": SKYREELS_THRESH, "flowcache-magi": MAGI_THRESH}
    out = {"vanilla": ("vanilla", "paper", 0.0, None)}
    for cache in ("flowcache", "teacache", "flowcache-magi"):
        for speed in ("slow", "fast"):
            out[f"{cache}-paper-{speed}"] = (CACHES[cache], "paper", paper[cache][speed], None)
    out["motioncache-paper"] = ("motioncache", "paper", MOTIONCACHE_THRESH, None)
    for cache in CACHES:
        for tag, _ in MATCHED:
            out[f"{cache}-{tag}"] = (CACHES[cache], f"{tag}% compute", None, None)
    out["flowcache-paper-slow+kvc"] = ("flowcache", "paper", SKYREELS_THRESH["slow"], kv_chunks)
    return out


@dataclasses.dataclass(frozen=True)
class Setup:
    n: int = 1                    # held-out evaluation prompts
    steps: int = 50               # UniPC steps
    guidance: float = 5.0
    seed: int = 0
    ar_step: int = 5
    window_chunks: int = 4        # the training context (8 latent frames)
    overlap_chunks: int = 1
    length: int = 4               # video length / training length
    addnoise: float = 20.0
    kv_chunks: int = 4            # KV-compression budget (MAGI's count: history + chunks in flight)
    calib_n: int = 1              # training-split prompts of the threshold search
    methods: tuple[str, ...] = ()  # () = every row

    def __post_init__(self):
        for f in ("n", "steps", "window_chunks", "overlap_chunks", "length", "calib_n", "kv_chunks"):
            int_arg(f"Setup.{f}", getattr(self, f), minimum=1)
        int_arg("Setup.ar_step", self.ar_step, minimum=0)
        if self.overlap_chunks >= self.window_chunks:
            raise ValueError(f"Setup.overlap_chunks={self.overlap_chunks} must be below window_chunks")
        unknown = set(self.methods) - set(method_specs(self.kv_chunks))
        if unknown:
            raise ValueError(f"Setup.methods has unknown rows {sorted(unknown)}; known: {list(method_specs(4))}")


def geometry(setup: Setup, cbs: int) -> dict:
    """Frames of the video and of a window, the overlap, and the work units (chunk forwards per CFG branch)
    of the window execution (vanilla) and the per-chunk execution, over the whole video and its first window."""
    wf, of = setup.window_chunks * cbs, setup.overlap_chunks * cbs
    stride = wf - of
    frames = LATENT_FRAMES * setup.length
    frames = wf + -(-(frames - wf) // stride) * stride         # the first window + k strides covering the length
    windows = 1 + (frames - wf) // stride
    rows0 = setup.steps + (setup.window_chunks - 1) * setup.ar_step
    rows_k = setup.steps + (setup.window_chunks - setup.overlap_chunks - 1) * setup.ar_step
    vanilla = setup.window_chunks * (rows0 + (windows - 1) * rows_k)
    denoise = setup.steps * (setup.window_chunks + (windows - 1) * (setup.window_chunks - setup.overlap_chunks))
    prefix = windows - 1                                        # prefix forwards (one per later window)
    return {"frames": frames, "window_frames": wf, "overlap_frames": of, "windows": windows,
            "vanilla_units": vanilla, "chunk_units": denoise + prefix, "prefix_units": prefix,
            "denoise_units": denoise, "window0_vanilla_units": setup.window_chunks * rows0,
            "window0_chunk_units": setup.window_chunks * setup.steps}


class Runner:
    """Runs df_run methods on fixed prompts and noise, one prompt per call."""

    def __init__(self, model, setup: Setup, ctx, noise, geom: dict):
        self.model, self.setup, self.ctx, self.noise, self.geom = model, setup, ctx, noise, geom
        self.solver = unipc(setup.steps)

    def one(self, method: str, thresh: float, i: int, kv_chunks=None, windows: int | None = None):
        g = self.geom
        noise = self.noise[i:i + 1]
        kw = {}
        if windows == 1:
            noise = noise[:, :g["window_frames"]]
        else:
            kw = {"window_frames": g["window_frames"], "overlap_frames": g["overlap_frames"],
                  "addnoise_condition": self.setup.addnoise, "noise_key": jax.random.key(self.setup.seed + 7)}
        ctx = self.ctx[i:i + 1]
        return df_run(method, self.model, noise, ctx, solver=self.solver, thresh=thresh, kv_chunks=kv_chunks,
                      ar_step=self.setup.ar_step, causal_block_size=self.model.cfg.num_frame_per_block,
                      guidance=self.setup.guidance, negative_context=jnp.zeros_like(ctx), **kw)


def kv_bytes(model_cfg, geom: dict, method: str, kv_chunks, chunk_tokens: int) -> int:
    """Bytes of the per-window K/V buffer (K and V, every layer, both CFG branches, float32): none for the
    window execution (it recomputes the whole window every row), `window_chunks` or `kv_chunks` chunks."""
    if method in ("vanilla", "teacache"):
        return 0
    slots = (kv_chunks if kv_chunks else geom["window_frames"] // model_cfg.num_frame_per_block) * chunk_tokens
    return 2 * 2 * model_cfg.num_layers * slots * model_cfg.dim * 4


def matched_thresholds(runner: Runner, calib: Runner, setup: Setup, log) -> dict:
    """Each cache's threshold for every MATCHED fraction of vanilla's token-layers over the whole video,
    searched on the first window of the calibration prompts."""
    g = runner.geom

    def work(method, thresh):
        return sum(df_work(calib.one(method, thresh, i, windows=1).state)["token_layers"]
                   for i in range(setup.calib_n))

    v0 = work("vanilla", 0.0)
    per_unit = v0 / g["window0_vanilla_units"]                  # token-layers of one chunk forward (both branches)
    starts = {"teacache": TEACACHE_THRESH["slow"], "flowcache": SKYREELS_THRESH["slow"],
              "flowcache_magi": MAGI_THRESH["slow"], "motioncache": MOTIONCACHE_THRESH}
    out = {}
    for name, method in CACHES.items():
        def fraction(thresh, method=method):
            f0 = work(method, thresh) / v0
            if method == "teacache":                            # one decision per row: the same share of rows
                return f0
            q = f0 * g["window0_vanilla_units"] / g["window0_chunk_units"]   # share of denoising chunk calls
            return (q * g["denoise_units"] + g["prefix_units"]) / g["vanilla_units"]
        out[name] = {}
        for tag, target in MATCHED:
            log(f"  [{name}] searching the threshold for {target:.0%} of vanilla's work")
            th, reached = choose_mc_threshold(fraction, target, starts[method], log, iters=4, tol=0.03,
                                              label=name, unit="vanilla's token-layers (estimated)")
            out[name][tag] = {"threshold": th, "estimated_fraction": reached}
    return {"vanilla_token_layers_window0": v0, "per_unit": per_unit, "thresholds": out}


# ----------------------------------------------------------------------------------------------- report
COLUMNS = {"method": "method", "setting": "setting", "threshold": lambda r: fmt(r["threshold"], ".4g"),
           "block passes / video": lambda r: f"{r['block_passes_per_video']:.0f}",
           "FLOPs vs vanilla": lambda r: f"{100 * r['flops_fraction']:.0f}%",
           "speed-up": lambda r: fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
           "PSNR (dB)": lambda r: fmt(r["psnr"], ".2f"), "SSIM": lambda r: fmt(r["ssim"], ".3f"),
           "adherence (video)": lambda r: f"{r['adherence']:.3f}",
           "adherence (segments: mean / mid-video)": lambda r: f"{r['segment_mean']:.3f} / {r['mid_video_mean']:.3f}",
           "KV MiB / video": lambda r: f"{r['kv_bytes_per_video'] / MIB:.2f}"}


def claims(rows: list[dict]) -> list[str]:
    """The papers' claims checked on the rows present, with the numbers."""
    by = {r["method"]: r for r in rows}
    out = []

    def line(a, b, claim):
        if a in by and b in by and by[a]["psnr"] is not None and by[b]["psnr"] is not None:
            x, y = by[a], by[b]
            out.append(f"- {claim}: **{verdict(x, y)}** ({a} {x['psnr']:.2f} dB / SSIM {x['ssim']:.3f} at "
                       f"{100 * x['flops_fraction']:.0f}% FLOPs vs {b} {y['psnr']:.2f} dB / SSIM {y['ssim']:.3f} "
                       f"at {100 * y['flops_fraction']:.0f}%).")
        else:
            out.append(f"- {claim}: not measured ({a} or {b} missing).")
    for tag, _ in MATCHED:
        line(f"flowcache-{tag}", f"teacache-{tag}", f"FlowCache > TeaCache at {tag}% compute")
        line(f"flowcache-magi-{tag}", f"teacache-{tag}", f"FlowCache (MAGI variant) > TeaCache at {tag}% compute")
        line(f"motioncache-{tag}", f"flowcache-{tag}", f"MotionCache > FlowCache at {tag}% compute")
    for speed in ("slow", "fast"):
        line(f"flowcache-paper-{speed}", f"teacache-paper-{speed}",
             f"FlowCache > TeaCache at the papers' {speed} thresholds")
    line("motioncache-paper", "flowcache-paper-slow", "MotionCache > FlowCache-slow at the papers' thresholds")
    k, f = by.get("flowcache-paper-slow+kvc"), by.get("flowcache-paper-slow")
    if k and f and k["psnr"] is not None and f["psnr"] is not None:
        identical = k["counters"] == f["counters"] and k["psnr"] == f["psnr"] and k["ssim"] == f["ssim"]
        same = "counters, PSNR and SSIM identical: the trigger never fired" if identical else "the runs differ"
        out.append(f"- KV compression ({k['kv_chunks']} chunks) vs the same FlowCache without it: {k['psnr']:.2f} vs "
                   f"{f['psnr']:.2f} dB, {k['kv_bytes_per_video'] / MIB:.2f} vs {f['kv_bytes_per_video'] / MIB:.2f} "
                   f"MiB; {same}.")
    return out


def markdown(report: dict) -> str:
    s, g = report["setup"], report["geometry"]
    lines = [f"AR shapes model, asynchronous diffusion forcing (the papers' setting): {s['n']} held-out prompt(s), "
             f"{g['frames']} latent frames ({g['windows']} windows of {g['window_frames']} frames = "
             f"{s['window_chunks']} chunks, overlap {g['overlap_frames']}), causal block "
             f"{report['causal_block']}, ar_step {s['ar_step']}, UniPC {s['steps']}, CFG {s['guidance']}, "
             f"addnoise {s['addnoise']}. Thresholds: the papers' own, and matched to 50% / 30% of vanilla's "
             f"block-stack work on {s['calib_n']} calibration prompt(s). Fidelity against async vanilla; "
             f"wall clock on {report['machine']}.", "",
             markdown_table(report["rows"], COLUMNS, "ll" + "r" * (len(COLUMNS) - 2)), "",
             *claims(report["rows"]), "", "LPIPS: not measured (see docs/caching.md)."]
    if not report.get("complete"):
        lines += ["", f"**Partial**: {len(report['rows'])} of {len(report['planned'])} rows."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- the run
def run_table(setup: Setup, out_dir: Path, log=print) -> dict:
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_shapes_model("ar")
    cbs = model.cfg.num_frame_per_block
    geom = geometry(setup, cbs)
    specs = method_specs(setup.kv_chunks)
    planned = [m for m in specs if not setup.methods or m in setup.methods]
    prompts = sample_prompts(setup.n, setup.seed, "heldout")
    ctx = jnp.asarray(encode_prompts(prompts))
    runner = Runner(model, setup, ctx, latent_noise(setup.n, setup.seed, geom["frames"]), geom)
    path = out_dir / f"{NAME}.json"
    report = None
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("setup") == json.loads(json.dumps(dataclasses.asdict(setup))) and (out_dir / f"{NAME}.npz").exists():
            report = old
            log(f"resuming: {[r['method'] for r in report['rows']]} already done")
    if report is None:
        report = {"setup": dataclasses.asdict(setup), "model": training_info("ar"), "causal_block": cbs,
                  "geometry": geom, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                  "prompts": prompts, "planned": planned, "matched": None, "rows": [], "complete": False}
    if report["matched"] is None and any(specs[m][2] is None for m in planned):
        _, cctx, cnoise = calibration_inputs(setup, geom["window_frames"])
        calib = Runner(model, setup, cctx, cnoise, geom)
        log(f"threshold search on {setup.calib_n} calibration prompt(s), first window ...")
        report["matched"] = matched_thresholds(runner, calib, setup, log)
        write_results(out_dir, NAME, report, markdown(report))
    done = {r["method"] for r in report["rows"]}
    chunk_tokens = tokens(model.cfg, (cbs, *runner.noise.shape[2:4]))
    ref = np.load(out_dir / f"{NAME}.npz")["vanilla"] if "vanilla" in done else None
    ref_videos = None if ref is None else decode_latents(ref, uint8=True)
    seg = LATENT_FRAMES * TEMPORAL_GROUP
    for name in planned:
        if name in done:
            continue
        method, setting, thresh, kvc = specs[name]
        if thresh is None:
            thresh = report["matched"]["thresholds"][name.rsplit("-", 1)[0]][setting.split("%")[0]]["threshold"]
        log(f"[{name}] {method} thresh {thresh:.4g}" + (f", KV compression to {kvc} chunks" if kvc else ""))
        latents, work, secs = [], None, []
        for i in range(setup.n):
            out = {}

            def call(i=i, out=out, args=(method, thresh), kv=kvc):
                out["run"] = runner.one(*args, i, kv)
                return out["run"].latents
            secs.append(interleaved_times({name: call}, 1)[name][0])
            latents.append(np.asarray(out["run"].latents))
            w = df_work(out["run"].state)
            work = w if work is None else {k: work[k] + w[k] for k in w}
        lat = np.concatenate(latents)
        videos = decode_latents(lat, uint8=True)
        tpc = tokens(model.cfg, (geom["window_frames"] if method in ("vanilla", "teacache") else cbs,
                                 *runner.noise.shape[2:4]))
        segs = np.asarray(segment_adherence(videos, prompts, seg))
        row = {"method": name, "cache": method, "setting": setting, "threshold": None if name == "vanilla" else thresh,
               "kv_chunks": kvc, "counters": work, "block_passes_per_video": work["block_passes"] / setup.n,
               "flops_per_video": flops(model.cfg, work, work["attn_pairs"], tpc, ctx.shape[1]) / setup.n,
               "kv_bytes_per_video": kv_bytes(model.cfg, geom, method, kvc, chunk_tokens),
               "seconds_per_prompt": secs,
               "seconds_per_video": float(np.median(secs[1:] if len(secs) > 1 else secs)),
               "adherence": float(adherence(videos, prompts)["score"]), "segment_adherence": segs.tolist(),
               "segment_mean": float(segs.mean()),
               "mid_video_mean": float(segs[1:].mean() if len(segs) > 1 else segs[0])}
        if name == "vanilla":
            np.savez(out_dir / f"{NAME}.npz", vanilla=lat)
            ref, ref_videos = lat, videos
            row.update(psnr=None, ssim=None)
        else:
            if ref_videos is None:
                raise ValueError("rows other than vanilla need the vanilla row first (add 'vanilla' to --methods)")
            fid = video_fidelity(videos, ref_videos)
            row.update(psnr=fid["psnr"], ssim=fid["ssim"], relative_l2=fid["relative_l2"])
        report["rows"].append(row)
        van = report["rows"][0]
        for r in report["rows"]:
            r["flops_fraction"] = r["flops_per_video"] / van["flops_per_video"]
            r["speedup"] = van["seconds_per_video"] / r["seconds_per_video"]
        report["complete"] = all(m in {r["method"] for r in report["rows"]} for m in planned)
        write_results(out_dir, NAME, report, markdown(report))
        log("  " + markdown_table([row], COLUMNS).splitlines()[-1])
    report["last_run_seconds"] = time.perf_counter() - t_start
    md = markdown(report)
    write_results(out_dir, NAME, report, md)
    log(md)
    return report


def main(argv: list[str] | None = None) -> None:
    d = Setup()
    p = argparse.ArgumentParser(prog="python -m experiments.async_cache_table", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=d.n, help="held-out evaluation prompts (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--ar-step", type=int, default=d.ar_step)
    p.add_argument("--length", type=int, default=d.length, help="video length / training length")
    p.add_argument("--calib-n", type=int, default=d.calib_n, help="calibration prompts (training split)")
    p.add_argument("--methods", default="", help="comma-separated rows (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    try:
        setup = dataclasses.replace(d, n=a.n, steps=a.steps, guidance=a.guidance, seed=a.seed, ar_step=a.ar_step,
                                    length=a.length, calib_n=a.calib_n,
                                    methods=tuple(m for m in a.methods.split(",") if m))
    except (ValueError, TypeError) as e:
        p.error(str(e))
    run_table(setup, a.out)


if __name__ == "__main__":
    main()
