"""The FlowCache / MotionCache main table, reproduced in kind on the embedded AR shapes model: one command.

    python -m experiments.cache_table                                  # the full table (see --help)
    python -m experiments.cache_table --n 2 --steps 12 --calib-n 1 --t2v-n 1 --out results/tmp/caching

Rows: vanilla, TeaCache slow/fast, FlowCache slow/fast (SkyReels-code variant, and the MAGI-code variant),
FlowCache + KV compression (and, as a control, FlowCache with a plain rolling window of the same size),
MotionCache slow/fast; plus TeaCache on the bidirectional text-to-video model. Columns: block-stack passes
and FLOPs from the transforms' own counters, wall-clock speed-up measured in this process after
compilation, PSNR / SSIM of the decoded videos against vanilla (same prompts and noise), prompt adherence,
and K/V-cache bytes per video.

Thresholds are not picked by hand (`experiments.cache_thresholds`). The calibration tool
(`experiments.teacache.calibrate_teacache`) records dense rollouts of `--calib-n` training-split prompts
(never the evaluation prompts), fits the tiny model's TeaCache polynomial (e0 indicator), and every method's
threshold is then chosen so that it computes a target fraction of the vanilla denoising compute
(`--slow` 0.5 / `--fast` 0.3 by default, in the spirit of the papers' slow/fast settings; every method gets
the same targets, so rows compare at equal compute): by replaying the rule on the recorded changes for the
step-level methods (`vidaccel.residual_cache.choose_threshold`; exact for the e0 indicator, an estimate for
the MAGI patch indicator), and by bisection over real MotionCache rollouts of the calibration prompts (its
per-token decisions depend on the motion maps).

Writes `<out>/cache_table.json` (setup, calibration, thresholds, per-method figures), `<out>/cache_table.md`
(the table and the paper-claim checks, made by `experiments.cache_report`) and `<out>/teacache_t2v.json`
(the t2v coefficients and thresholds; copy it over `experiments/calibrations/teacache_t2v.json` for
`vidaccel demo` and `experiments.shapes_presets.shapes_teacache` to use it).
Timings come from this machine: on a CPU they show what skipped work saves here, not GPU latencies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from experiments.cache_report import markdown, row_markdown
from experiments.cache_thresholds import calibrate_ar, choose_thresholds, tokens
from experiments.flowcache import flowcache, flowcache_config, flowcache_magi_config, kv_compression
from experiments.harness import interleaved_times, machine, median_times, video_fidelity, write_results
from experiments.motioncache import MotionCacheConfig, motioncache
from experiments.shapes_presets import calibrate_shapes_teacache, shapes_teacache
from experiments.teacache import teacache, teacache_config
from models.ar.rollout import RolloutConfig, chunk_denoiser, chunk_state_of, kv_cache_bytes, rollout
from models.shapes import adherence, decode_latents, encode_prompts, sample_prompts
from models.shapes.latents import LATENT_FRAMES
from models.shapes.pretrained import generate_t2v, latent_noise, load_shapes_model, training_info
from models.wan.denoiser import wan_denoiser
from vidaccel.checks import float_arg, int_arg
from vidaccel.solvers import unipc
from vidaccel.transforms import branch_states, total_work

RESULTS = Path("results/caching")
METHOD_ORDER = ("vanilla", "teacache-slow", "teacache-fast", "flowcache-slow", "flowcache-fast",
                "flowcache-magi-slow", "flowcache-magi-fast", "flowcache-slow+kvc", "flowcache-slow+window",
                "motioncache-slow", "motioncache-fast")


@dataclasses.dataclass(frozen=True)
class Setup:
    n: int = 16                   # held-out evaluation prompts
    steps: int = 50               # UniPC steps
    guidance: float = 5.0
    seed: int = 0
    length: int = 2               # video length in multiples of the 8 training latent frames (2 -> 8 chunks)
    window: int = 3               # vanilla rolling window in chunks (the training context)
    compress_chunks: int = 2      # KV-compression budget in chunks (and the control window)
    calib_n: int = 4              # training-split prompts for calibration and threshold choice
    batch: int = 1                # prompts per rollout (1 = per-video decisions, as the papers run)
    targets: tuple[tuple[str, float], ...] = (("slow", 0.5), ("fast", 0.3))
    t2v_n: int = 8                # held-out prompts for the text-to-video TeaCache rows (0 = skip)
    timing_rounds: int = 3        # round-robin timings of every compiled method (median reported)

    def __post_init__(self):
        for f in ("n", "steps", "length", "window", "calib_n", "batch", "timing_rounds"):
            int_arg(f"Setup.{f}", getattr(self, f), minimum=1)
        int_arg("Setup.t2v_n", self.t2v_n, minimum=0)
        int_arg("Setup.compress_chunks", self.compress_chunks, minimum=2)
        float_arg("Setup.guidance", self.guidance)
        if self.n % self.batch:
            raise ValueError(f"Setup.n={self.n} must be a multiple of Setup.batch={self.batch}")
        if [k for k, _ in self.targets] != ["slow", "fast"] or not all(0 < v <= 1 for _, v in self.targets):
            raise ValueError(f"Setup.targets={self.targets!r} is invalid: slow and fast fractions in (0, 1]")


# ----------------------------------------------------------------------------------------------- accounting
def flops(model_cfg, work: dict, attn_pairs: float, tokens_per_call: int, text_len: int) -> float:
    """FLOPs (2 per multiply-add) from the counters: per token-layer the projections, cross-attention and
    FFN; per block pass and layer the text K/V projections; per scored query-key pair of self-attention
    4 x dim; per call the patch embedding, text embedding and head on every token."""
    d, f = model_cfg.dim, model_cfg.ffn_dim
    patch = math.prod(model_cfg.patch_size)
    per_token_layer = 8 * d * d + 4 * d * d + 4 * d * f + 4 * text_len * d
    per_pass_layer = 4 * text_len * d * d
    per_call = tokens_per_call * 2 * d * patch * (model_cfg.in_channels + model_cfg.out_channels) \
        + 2 * text_len * (model_cfg.text_dim * d + d * d)
    return float(work["token_layers"] * per_token_layer + work["block_passes"] * model_cfg.num_layers * per_pass_layer
                 + attn_pairs * 4 * d + work["calls"] * per_call)


def counters(state) -> dict:
    """Counters of one rollout, summed over CFG branches: work, attention pairs, KV bytes, and what the
    method keeps (frames held by a compressed cache, MotionCache's forwards and selected tokens)."""
    out = dict(total_work(state))
    out["attn_pairs"] = float(sum(float(chunk_state_of(s).attn_pairs) for s in branch_states(state)))
    out["kv_bytes"] = kv_cache_bytes(state)
    for s in branch_states(state):
        cache = chunk_state_of(s).cache
        if getattr(cache, "head_frames", None) is not None:     # per-head KV compression: frames kept at the end
            hf = np.asarray(cache.head_frames)[:, :, np.asarray(cache.valid)]
            kept = np.bincount(hf.ravel(), minlength=int(hf.max()) + 1).tolist()
            prev = out.get("kept_frame_counts", [0] * len(kept))
            out["kept_frame_counts"] = [a + b for a, b in zip(prev, kept, strict=False)]
        if hasattr(s, "computed"):
            out["computed_calls"] = out.get("computed_calls", 0) + int(s.computed)
        if hasattr(s, "forwards"):
            out["selected_tokens"] = out.get("selected_tokens", 0) + int(s.selected)
            fw = out.setdefault("forwards_none_full_partial", [0, 0, 0])
            out["forwards_none_full_partial"] = [a + int(b) for a, b in zip(fw, np.asarray(s.forwards), strict=True)]
    return out


def _add(a: dict, b: dict) -> dict:
    return {k: ([x + y for x, y in zip(a[k], b[k], strict=True)] if isinstance(a[k], list) else a[k] + b[k])
            for k in a}


# ----------------------------------------------------------------------------------------------- running
class Rollouts:
    """Rolls out denoisers over fixed prompts and noise, `setup.batch` prompts per rollout."""

    def __init__(self, prompts: list, setup: Setup, frames: int):
        self.setup = setup
        self.solver = unipc(setup.steps)
        self.ctx = jnp.asarray(encode_prompts(list(prompts)))
        self.noise = latent_noise(len(prompts), setup.seed, frames)

    def batch(self, den, i: int = 0):
        """The rollout of prompts i .. i + `setup.batch`."""
        ctx = self.ctx[i:i + self.setup.batch]
        return rollout(den, self.noise[i:i + len(ctx)], ctx, solver=self.solver, guidance=self.setup.guidance,
                       negative_context=jnp.zeros_like(ctx))

    def run(self, den) -> dict:
        """Latents and counters (summed over batches; KV bytes per video) of every prompt."""
        b = self.setup.batch
        latents, total = [], None
        t0 = time.perf_counter()
        for i in range(0, len(self.ctx), b):
            out = self.batch(den, i)
            latents.append(np.asarray(out.latents))
            c = counters(out.state)
            c["kv_bytes"] = c["kv_bytes"] // b
            total = c if total is None else _add(total, {**c, "kv_bytes": 0})
        return {"latents": np.concatenate(latents), "counters": total,
                "all_batches_seconds": time.perf_counter() - t0}


def video_rows(videos, ref, prompts) -> dict:
    """PSNR / SSIM against the reference videos (`harness.video_fidelity`) and prompt adherence."""
    fid = video_fidelity(videos, ref)
    return {"psnr": fid["psnr"], "ssim": fid["ssim"], "adherence": float(adherence(videos, prompts)["score"])}


# ----------------------------------------------------------------------------------------------- the table
def ar_methods(model, setup: Setup, solver, poly: dict, th: dict):
    """name -> (denoiser, description) for every AR row; `poly` = fitted coefficients and max_change."""
    base = chunk_denoiser(model, RolloutConfig(window_chunks=setup.window))
    rows = {"vanilla": (base, f"dense rollout, rolling window of {setup.window} chunks")}
    for speed in ("slow", "fast"):
        rows[f"teacache-{speed}"] = (teacache(base, teacache_config(th["teacache"][speed], **poly)),
                                     "one accumulator per video, e0 + fitted polynomial, 5 warm-up calls")
        rows[f"flowcache-{speed}"] = (flowcache(base, flowcache_config(th["flowcache"][speed], **poly)),
                                      "SkyReels code: per-chunk e0 + polynomial, warm-up 5, last call forced")
        rows[f"flowcache-magi-{speed}"] = (
            flowcache(base, flowcache_magi_config(th["flowcache-magi"][speed]), solver=solver),
            "MAGI code: per-chunk raw patch-embedding change, latent-displacement reuse")
    c = setup.compress_chunks
    kvc = chunk_denoiser(model, RolloutConfig(kv_compression=kv_compression(c)))
    win = chunk_denoiser(model, RolloutConfig(window_chunks=c))
    fc_slow = flowcache_config(th["flowcache"]["slow"], **poly)
    rows["flowcache-slow+kvc"] = (flowcache(kvc, fc_slow), f"FlowCache-slow + KV compression to {c} chunks")
    rows["flowcache-slow+window"] = (flowcache(win, fc_slow), f"control: FlowCache-slow + rolling window of {c}")
    for speed in ("slow", "fast"):
        rows[f"motioncache-{speed}"] = (
            motioncache(base, MotionCacheConfig(thresh=th["motioncache"][speed], **poly)),
            "SkyReels code: motion-weighted per-token accumulators, partial forwards")
    return rows


def _threshold_of(name: str, th: dict):
    if name == "vanilla":
        return None
    speed = "slow" if "slow" in name else "fast"
    return th[name.split("-slow")[0].split("-fast")[0]][speed]


def _cal_summary(cal: dict) -> dict:
    return {"prompts": cal["prompts"],
            **{ind: {"coefficients": f.coefficients, "fit_relative_error": f.fit_relative_error,
                     "input_max": f.input_max,
                     "mean_input_change": float(np.mean(f.input_change.reshape(-1, f.steps)[:, 1:])),
                     "mean_output_change": float(np.mean(f.output_change.reshape(-1, f.steps)[:, 1:]))}
               for ind, f in cal["fits"].items()}}


def run_table(setup: Setup, out_dir: Path, log=print) -> dict:
    """Calibrate, run every AR row (and the t2v rows), time them round-robin; write and return the report."""
    t_start = time.perf_counter()
    model = load_shapes_model("ar")
    frames = LATENT_FRAMES * setup.length
    chunks = frames // model.cfg.num_frame_per_block
    log(f"calibrating on {setup.calib_n} training prompts ({chunks} chunks, UniPC {setup.steps}) ...")
    cal = calibrate_ar(model, setup, RolloutConfig(window_chunks=setup.window), frames, log)
    th, achieved = choose_thresholds(model, setup, cal, chunks, frames, log)
    log(f"thresholds: {json.dumps(th)}")

    prompts = sample_prompts(setup.n, setup.seed, "heldout")
    runner = Rollouts(prompts, setup, frames)
    fit = cal["fits"]["e0"]
    methods = ar_methods(model, setup, runner.solver, {"coefficients": fit.coefficients, "max_change": fit.input_max},
                         th)
    tokens_per_call = tokens(model.cfg, (frames // chunks, *runner.noise.shape[2:4]))
    rows, ref_videos = [], None
    for name in METHOD_ORDER:
        den, desc = methods[name]
        log(f"[{name}] {desc}")
        res = runner.run(den)           # compiles on its first batch
        videos = decode_latents(res["latents"], uint8=True)
        c = res["counters"]
        row = {"method": name, "description": desc, "threshold": _threshold_of(name, th), "counters": c,
               "all_batches_seconds": res["all_batches_seconds"],
               "flops_per_video": flops(model.cfg, c, c["attn_pairs"], tokens_per_call, runner.ctx.shape[1]) / setup.n,
               "kv_bytes_per_video": c["kv_bytes"], "block_passes_per_video": c["block_passes"] / setup.n,
               "target_fraction": achieved.get(name.replace("+kvc", "").replace("+window", ""))}
        if name == "vanilla":
            ref_videos, ref = videos, row
            row.update(adherence=float(adherence(videos, prompts)["score"]), psnr=None, ssim=None)
        else:
            row.update(video_rows(videos, ref_videos, prompts))
        row["flops_fraction"] = row["flops_per_video"] / ref["flops_per_video"]
        rows.append(row)
    # wall clock per video: every compiled method's first batch timed round-robin, the median per method
    times = interleaved_times({name: (lambda den=methods[name][0]: runner.batch(den)) for name in METHOD_ORDER},
                              setup.timing_rounds, after_round=lambda r, t: log(
                                  f"  timing round {r + 1}/{setup.timing_rounds}: "
                                  + ", ".join(f"{k} {v[-1] / setup.batch:.2f}s" for k, v in t.items())))
    for row in rows:
        row["seconds_all_rounds"] = [t / setup.batch for t in times[row["method"]]]
        row["seconds_per_video"] = float(np.median(row["seconds_all_rounds"]))
        row["speedup"] = rows[0]["seconds_per_video"] / row["seconds_per_video"]
        log(f"  {row_markdown(row)}")

    t2v = run_t2v(setup, out_dir, log) if setup.t2v_n else None
    report = {"setup": dataclasses.asdict(setup), "model": training_info("ar"), "chunks": chunks,
              "frames": frames, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "calibration": _cal_summary(cal), "thresholds": th, "replayed_fractions": achieved, "rows": rows,
              "t2v": t2v, "total_seconds": time.perf_counter() - t_start}
    md = markdown(report)
    write_results(out_dir, "cache_table", report, md)
    log(md)
    log(f"wrote {out_dir}/cache_table.json and cache_table.md")
    return report


def run_t2v(setup: Setup, out_dir: Path, log) -> dict:
    """TeaCache on the bidirectional t2v model: calibrate, choose slow/fast thresholds, compare with dense."""
    model = load_shapes_model("t2v")
    log(f"[t2v] calibrating TeaCache on {setup.calib_n} training prompts ...")
    calib = calibrate_shapes_teacache(model, num_prompts=setup.calib_n, steps=setup.steps, guidance=setup.guidance,
                                      seed=setup.seed, targets=setup.targets, log=log)
    write_results(out_dir, "teacache_t2v", calib)
    prompts = sample_prompts(setup.t2v_n, setup.seed, "heldout")
    methods = {"dense": wan_denoiser(model)}
    methods.update({f"teacache-{s}": shapes_teacache(model, s, steps=setup.steps, calibration=calib, log=log)
                    for s in calib["thresholds"]})

    def generate(den):
        return generate_t2v(den, prompts, seed=setup.seed, steps=setup.steps, guidance=setup.guidance)

    rows, ref = [], None
    for name, den in methods.items():
        gen = generate(den)             # compiles
        work = total_work(gen.state)
        row = {"method": name, "block_passes": work["block_passes"], "calls": work["calls"]}
        if ref is None:
            ref = (gen.videos, row)
            row.update(adherence=float(adherence(gen.videos, prompts)["score"]), psnr=None, ssim=None)
        else:
            row.update(video_rows(gen.videos, ref[0], prompts))
        row["compute_fraction"] = row["block_passes"] / ref[1]["block_passes"]
        rows.append(row)
    seconds = median_times(interleaved_times({name: (lambda den=den: generate(den)) for name, den in methods.items()},
                                             setup.timing_rounds))       # round-robin, as for the AR rows
    for row in rows:
        row["seconds_per_video"] = seconds[row["method"]] / len(prompts)
        row["speedup"] = rows[0]["seconds_per_video"] / row["seconds_per_video"]
        log(f"  [t2v {row['method']}] {row}")
    return {"calibration": calib, "rows": rows, "n": setup.t2v_n}


def main(argv: list[str] | None = None) -> None:
    d = Setup()
    p = argparse.ArgumentParser(prog="python -m experiments.cache_table", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=d.n, help="held-out evaluation prompts (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--length", type=int, default=d.length, help="video length / training length (default %(default)s)")
    p.add_argument("--window", type=int, default=d.window, help="vanilla rolling window in chunks")
    p.add_argument("--compress-chunks", type=int, default=d.compress_chunks, help="KV-compression budget in chunks")
    p.add_argument("--calib-n", type=int, default=d.calib_n, help="calibration prompts (training split)")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--slow", type=float, default=dict(d.targets)["slow"], help="slow target compute fraction")
    p.add_argument("--fast", type=float, default=dict(d.targets)["fast"], help="fast target compute fraction")
    p.add_argument("--t2v-n", type=int, default=d.t2v_n, help="t2v TeaCache prompts (0 = skip)")
    p.add_argument("--timing-rounds", type=int, default=d.timing_rounds, help="round-robin timing rounds")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    try:
        setup = Setup(a.n, a.steps, a.guidance, a.seed, a.length, a.window, a.compress_chunks, a.calib_n, a.batch,
                      (("slow", a.slow), ("fast", a.fast)), a.t2v_n, a.timing_rounds)
    except (ValueError, TypeError) as e:
        p.error(str(e))
    run_table(setup, a.out)


if __name__ == "__main__":
    main()
