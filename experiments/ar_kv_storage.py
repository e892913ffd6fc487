"""KV-cache storage on the embedded AR model: fidelity, adherence, bytes and speed per storage option and length.

    python -m experiments.ar_kv_storage                     # 8 held-out prompts; 1x, 4x, 16x; all storages
    python -m experiments.ar_kv_storage --n 2 --steps 10 --lengths 1 4    # a quick look

For every rollout length (in multiples of the training length, 8 latent frames) and every KV storage
(float32, bfloat16, int8, int4), the AR shapes model rolls out the same prompts from the same noise
(UniPC, CFG 5, rolling window of `--window` chunks). Each storage is compared with the float32 rollout of the
same length: PSNR / SSIM over the whole video (`experiments.harness.video_fidelity`), PSNR per
training-length segment (drift along the video), and prompt adherence (whole video and per segment). KV
bytes are what the cache pytree holds (both CFG branches); wall-clock ratios come from compiled runs at
`--time-length`, timed round-robin, all in this process. Memory flatness is measured separately: one fresh
process per length runs a float32 rollout of one prompt and reports its peak resident memory.

Writes `results/ar_kv/storage.json`, `storage.md` (the table) and `drift.png` (needs matplotlib:
`vidaccel[plots]`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from experiments.harness import PSNR_CAP, interleaved_times, plot_or_skip, pyplot, video_fidelity, write_results
from experiments.shapes_eval import segment_adherence
from models.ar.rollout import RolloutConfig, kv_cache_bytes, rollout
from models.shapes import adherence, decode_latents, encode_prompts, sample_prompts
from models.shapes.latents import LATENT_FRAMES, TEMPORAL_GROUP
from models.shapes.pretrained import latent_noise, load_shapes_model, training_info
from vidaccel.checks import int_arg
from vidaccel.metrics import psnr_per_frame
from vidaccel.solvers import unipc

RESULTS = Path("results/ar_kv")
STORAGE_ORDER = ("float32", "bfloat16", "int8", "int4")


def _setup(n: int, seed: int):
    prompts = sample_prompts(n, seed, "heldout")
    return prompts, jnp.asarray(encode_prompts(prompts))


def _rollout(model, prompts_ctx, frames: int, storage: str, steps: int, guidance: float, window: int, sink: int,
             seed: int, progress=False):
    _, ctx = prompts_ctx
    config = RolloutConfig(window_chunks=window, sink_chunks=sink, kv_storage=storage)
    t0 = time.perf_counter()
    out = rollout(model, latent_noise(ctx.shape[0], seed, frames), ctx, solver=unipc(steps), guidance=guidance,
                  negative_context=jnp.zeros_like(ctx), config=config, progress=progress)
    return np.asarray(out.latents), kv_cache_bytes(out.state), time.perf_counter() - t0


def run(n: int = 8, steps: int = 50, guidance: float = 5.0, lengths=(1, 4, 16), storages=STORAGE_ORDER,
        window: int = 3, sink: int = 0, seed: int = 0, time_length: int = 4, log=print) -> dict:
    """The storage experiment; returns the results dict (also the content of storage.json)."""
    model = load_shapes_model("ar")
    pc = _setup(n, seed)
    prompts = pc[0]
    seg = LATENT_FRAMES * TEMPORAL_GROUP           # video frames per training-length segment
    rows, drift = [], {}
    for length in lengths:
        frames = LATENT_FRAMES * length
        ref_video = None
        for storage in storages:
            log(f"[{length}x] {storage}: rolling out {n} prompts, {frames} latent frames ...")
            latents, nbytes, seconds = _rollout(model, pc, frames, storage, steps, guidance, window, sink, seed,
                                                progress=f"{length}x {storage}")
            video = decode_latents(latents, uint8=True)
            adh = adherence(video, prompts)
            segs = segment_adherence(video, prompts, seg)
            row = {"length_x": length, "latent_frames": frames, "storage": storage, "kv_bytes": nbytes,
                   "adherence": round(adh["score"], 4), "adherence_per_segment": [round(s, 4) for s in segs],
                   "adherence_segment_mean": round(float(np.mean(segs)), 4),
                   "adherence_segment_min": round(float(np.min(segs)), 4), "first_call_seconds": round(seconds, 2)}
            if storage == storages[0]:
                ref_video = video
            else:
                fid = video_fidelity(video, ref_video)
                x, r = (v.astype(np.float32) / 255.0 for v in (video, ref_video))
                per_frame = np.asarray(psnr_per_frame(x, r)).mean(0)        # mean over prompts, (T,)
                row.update(psnr=round(fid["psnr"], 2), ssim=round(fid["ssim"], 4),
                           psnr_per_segment=[round(float(np.mean(np.minimum(per_frame[s:s + seg], PSNR_CAP))), 2)
                                             for s in range(0, len(per_frame), seg)])
                drift[f"{length}x/{storage}"] = row["psnr_per_segment"]
            rows.append(row)
    timing = _timing(model, pc, time_length, storages, steps, guidance, window, sink, seed, log)
    ref_bytes = {r["length_x"]: r["kv_bytes"] for r in rows if r["storage"] == "bfloat16"}
    for r in rows:
        if r["length_x"] in ref_bytes:
            r["bytes_vs_bfloat16"] = round(ref_bytes[r["length_x"]] / r["kv_bytes"], 3)
    return {"n": n, "prompts": prompts, "steps": steps, "guidance": guidance, "window_chunks": window,
            "sink_chunks": sink, "seed": seed, "rows": rows, "drift_psnr_per_segment": drift, "timing": timing,
            "model": training_info("ar")}


def _timing(model, pc, length, storages, steps, guidance, window, sink, seed, log) -> dict:
    """Wall-clock of a compiled run per storage at one length (round-robin after a warm-up round), and ratios
    to the first storage."""
    frames = LATENT_FRAMES * length
    fns = {s: (lambda s=s: _rollout(model, pc, frames, s, steps, guidance, window, sink, seed)[0]) for s in storages}
    times = interleaved_times(fns, 1, warmup=1)
    out = {"length_x": length, "seconds": {s: round(t[0], 3) for s, t in times.items()}}
    for storage, seconds in out["seconds"].items():
        log(f"[timing {length}x] {storage}: {seconds:.2f} s")
    base = out["seconds"][storages[0]]
    out["ratio_to_" + storages[0]] = {s: round(base / t, 3) for s, t in out["seconds"].items()}
    return out


# ------------------------------------------------------------------------------------------- memory probe
def memory_probe(length: int, steps: int, window: int, sink: int) -> dict:
    """Run one float32 rollout of one prompt at `length` x training length in this process; peak RSS."""
    model = load_shapes_model("ar")
    latents, nbytes, seconds = _rollout(model, _setup(1, 0), LATENT_FRAMES * length, "float32", steps, 5.0, window,
                                        sink, 0)
    return {"length_x": length, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "kv_bytes": nbytes, "video_latent_mb": round(latents.nbytes / 2**20, 2), "seconds": round(seconds, 1)}


def memory_curve(lengths, steps: int, window: int, sink: int, log=print) -> list[dict]:
    """`memory_probe` in a fresh process per length (peak RSS is per process)."""
    out = []
    for length in lengths:
        cmd = [sys.executable, "-m", "experiments.ar_kv_storage", "--memory-probe", str(length), "--steps",
               str(steps), "--window", str(window), "--sink", str(sink)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"memory probe at {length}x failed:\n{res.stderr[-2000:]}")
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
        log(f"[memory] {length}x: peak RSS {out[-1]['peak_rss_mb']} MB, KV {out[-1]['kv_bytes']} bytes")
    return out


# ------------------------------------------------------------------------------------------------ reports
def table(res: dict) -> str:
    """`storage.md`: one row per (length, storage), then the timing and memory lines."""
    lines = ["| length | storage | KV bytes | vs bf16 | PSNR vs fp32 | SSIM vs fp32 | adherence (video) | "
             "adherence (segments: mean / min) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['length_x']}x | {r['storage']} | {r['kv_bytes']:,} | {r.get('bytes_vs_bfloat16', '-')} | "
                     f"{r.get('psnr', '-')} | {r.get('ssim', '-')} | {r['adherence']:.3f} | "
                     f"{r['adherence_segment_mean']:.3f} / {r['adherence_segment_min']:.3f} |")
    t = res["timing"]
    ratios = ", ".join(f"{s} {v}x" for s, v in t[f"ratio_to_{STORAGE_ORDER[0]}"].items())
    lines += ["", f"Wall-clock at {t['length_x']}x (compiled second run, speed relative to float32): {ratios}."]
    if res.get("memory"):
        mem = ", ".join(f"{m['length_x']}x {m['peak_rss_mb']} MB" for m in res["memory"])
        lines.append(f"Peak resident memory of a one-prompt float32 rollout, one process per length: {mem}.")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """`drift.png`: PSNR against float32 and adherence per training-length segment along the longest rollout."""
    plt = pyplot()
    longest = max(r["length_x"] for r in res["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in res["rows"]:
        if r["length_x"] != longest:
            continue
        x = np.arange(1, len(r["adherence_per_segment"]) + 1)
        axes[1].plot(x, r["adherence_per_segment"], marker=".", label=r["storage"])
        if "psnr_per_segment" in r:
            axes[0].plot(x, r["psnr_per_segment"], marker=".", label=r["storage"])
    axes[0].set(title=f"PSNR vs float32 cache along a {longest}x rollout", xlabel="training-length segment",
                ylabel="PSNR (dB)")
    axes[1].set(title="prompt adherence per segment", xlabel="training-length segment", ylabel="adherence",
                ylim=(0, 1.02))
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.ar_kv_storage", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8, help="held-out prompts (default %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="UniPC steps per chunk (default %(default)s)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 4, 16], help="multiples of the training length")
    p.add_argument("--storages", nargs="+", default=list(STORAGE_ORDER), choices=STORAGE_ORDER)
    p.add_argument("--window", type=int, default=3, help="rolling window in chunks (default %(default)s)")
    p.add_argument("--sink", type=int, default=0, help="attention-sink chunks (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-length", type=int, default=4, help="length at which wall-clock is compared")
    p.add_argument("--no-memory", action="store_true", help="skip the per-length peak-memory processes")
    p.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    try:
        for flag, v in (("--n", a.n), ("--steps", a.steps), ("--window", a.window), ("--time-length", a.time_length),
                        *(("--lengths", x) for x in a.lengths)):
            int_arg(flag, v, minimum=1)
        int_arg("--sink", a.sink, minimum=0)
    except ValueError as err:
        p.error(str(err))
    if a.memory_probe is not None:
        print(json.dumps(memory_probe(a.memory_probe, a.steps, a.window, a.sink)))
        return
    storages = [s for s in STORAGE_ORDER if s in a.storages]
    if storages[0] != "float32":
        p.error("--storages must include float32 (the reference every other storage is compared with)")
    res = run(a.n, a.steps, a.guidance, tuple(a.lengths), tuple(storages), a.window, a.sink, a.seed, a.time_length)
    res["command"] = "python -m experiments.ar_kv_storage " + " ".join(argv if argv is not None else sys.argv[1:])
    if not a.no_memory:
        res["memory"] = memory_curve(a.lengths, a.steps, a.window, a.sink)
    md = table(res)
    write_results(a.out, "storage", res, md)
    plot_or_skip(plot, res, a.out / "drift.png")
    print(md)
    print(f"wrote {a.out}/storage.json, storage.md, drift.png")


if __name__ == "__main__":
    main()
