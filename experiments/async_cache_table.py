"""The caching table in the papers' setting: asynchronous diffusion forcing on the embedded AR model.

    python -m experiments.async_cache_table                 # -> results/caching/async_table.{json,md,npz}
    python -m experiments.async_cache_table --n 1 --steps 8 --methods vanilla,flowcache-paper-slow --out /tmp/x

The setting of issue 14 (FlowCache / MotionCache on SkyReels-V2 scaled to the shapes `ar` model): causal
block 2 latent frames (the model's `num_frame_per_block`), windows of 4 chunks (8 latent frames, its training
context) overlapping by one chunk, `ar_step` 5 (a tenth of the steps), UniPC 50, CFG 5, prefix re-noising
`addnoise_condition` 20 (SkyReels-V2's), a video of 32 latent frames (4x the training length, 5 windows);
4 held-out prompts. Every method runs through `experiments.flowcache.df_run`:

- at the papers' own thresholds with the papers' code defaults (TeaCache 0.05 / 0.10 with TeaCache4Wan2.1's
  1.3B ret-steps polynomial; FlowCache SkyReels 0.1 / 0.15, MAGI 0.01 / 0.015; MotionCache 0.1, the only
  value its code ships), with whatever compute that gives;
- at thresholds matched to 50% and 30% of vanilla's FLOPs (from the counters) on whole videos of 2
  training-split calibration prompts (`cache_thresholds.calibration_inputs`, never the evaluation prompts):
  TeaCache (`teacache-cal-*`) with its polynomial fitted on vanilla runs of those prompts (TeaCache's recipe,
  `fit_window_polynomial`) and its threshold from replaying its rule on their recorded e0 changes (exact:
  `teacache_match`); the per-chunk caches by a bisection over real runs (`search_cache`). `papers_reach`
  says how much compute TeaCache with the papers' polynomial can reach at all (a window's first row sends
  its accumulator hugely negative);
- KV compression where it can fire (`seq-*` rows): ar_step = the steps (one chunk in flight), a budget of
  `kv_chunks` (3) chunks, against the same FlowCache with the full window buffer and against plain windows
  of `kv_chunks` chunks (the same bytes), all measured against the uncached per-chunk run (`seq-vanilla`).
  In the papers' setting every chunk of a window is in flight and MAGI's budget counts them, so the
  `flowcache-paper-slow+kvc` row (budget = the window) cannot fire.

Columns: FLOPs from the counters (`df_work` -> `experiments.cache_table.flops`), wall-clock speed-up
(median per-prompt time after the first prompt, which compiles; timed with `harness.interleaved_times` in
this process), PSNR / SSIM against the row's reference (`harness.video_fidelity`), adherence of the whole
video and per training-length segment (later ones scored mid-video), and the bytes of the K/V buffer.
LPIPS is left out: see docs/caching.md. Results are rewritten after every method, and a rerun with the same
setup resumes from the rows already in the JSON (the references' latents are kept in `async_table.npz`).
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
from experiments.flowcache import MAGI_THRESH, SKYREELS_THRESH, df_method, df_run
from experiments.harness import fmt, interleaved_times, machine, markdown_table, video_fidelity, write_results
from experiments.shapes_eval import segment_adherence
from experiments.teacache import WAN21_COEFFICIENTS, fit_coefficients, probe, teacache_config
from models.ar.compression import plan_window_compression
from models.ar.diffusion_forcing import df_sample, df_schedule, df_work
from models.shapes import TEMPORAL_GROUP, adherence, decode_latents, encode_prompts, sample_prompts
from models.shapes.latents import LATENT_FRAMES
from models.shapes.pretrained import latent_noise, load_shapes_model, training_info
from vidaccel.checks import float_arg, int_arg, optional_int_arg
from vidaccel.residual_cache import choose_threshold, schedule
from vidaccel.solvers import unipc
from vidaccel.transforms import branch_states

RESULTS = Path("results/caching")
NAME = "async_table"
TEACACHE_THRESH = {"slow": 0.05, "fast": 0.10}     # TeaCache4Wan2.1, T2V-1.3B
MOTIONCACHE_THRESH = 0.1                            # MotionCache's SkyReels run script (one value ships)
MATCHED = (("50", 0.5), ("30", 0.3))
CACHES = {"teacache-cal": "teacache", "flowcache": "flowcache", "flowcache-magi": "flowcache_magi",
          "motioncache": "motioncache"}
VARIANTS = ("main", "seq", "seq-window")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row: the df_run method, its setting's label, the papers' threshold (None = matched to a compute
    target), the KV-compression budget in chunks, the variant ("main": the papers' setting; "seq": ar_step =
    `Setup.kv_ar_step`, one chunk in flight; "seq-window": that, with windows of `Setup.kv_chunks` chunks) and
    whether the e0 polynomial is the one calibrated on this model (TeaCache's recipe) or the papers'."""

    cache: str
    setting: str
    thresh: float | None
    kv_chunks: int | None = None
    variant: str = "main"
    calibrated: bool = False


def method_specs(kv_chunks: int, window_chunks: int = 4) -> dict[str, Row]:
    """name -> Row, in run order (what the claims need first). `kv_chunks`: the budget of the sequential
    variant's KV compression; the main setting's "+kvc" row uses the whole window (it cannot fire there)."""
    paper = {"teacache": TEACACHE_THRESH, "flowcache": SKYREELS_THRESH, "flowcache-magi": MAGI_THRESH}
    out = {"vanilla": Row("vanilla", "paper", 0.0)}

    def matched(cache):
        for tag, _ in MATCHED:
            out[f"{cache}-{tag}"] = Row(CACHES[cache], f"{tag}% compute", None, calibrated=cache == "teacache-cal")
    matched("teacache-cal")
    matched("flowcache")
    slow = SKYREELS_THRESH["slow"]
    out["seq-vanilla"] = Row("vanilla_chunks", "KV reference", 0.0, variant="seq")
    out["seq-flowcache-paper-slow"] = Row("flowcache", "KV: full window", slow, variant="seq")
    out["seq-flowcache-paper-slow+kvc"] = Row("flowcache", f"KV: compressed to {kv_chunks}", slow, kv_chunks, "seq")
    out["seq-flowcache-paper-slow+window"] = Row("flowcache", f"KV: {kv_chunks}-chunk window", slow,
                                                 variant="seq-window")
    matched("flowcache-magi")
    matched("motioncache")
    for cache in ("flowcache", "teacache", "flowcache-magi"):
        for speed in ("slow", "fast"):
            out[f"{cache}-paper-{speed}"] = Row(CACHES.get(cache, cache), "paper", paper[cache][speed])
    out["motioncache-paper"] = Row("motioncache", "paper", MOTIONCACHE_THRESH)
    out["flowcache-paper-slow+kvc"] = Row("flowcache", "paper", slow, window_chunks)
    return out


@dataclasses.dataclass(frozen=True)
class Setup:
    n: int = 4                    # held-out evaluation prompts
    steps: int = 50               # UniPC steps
    guidance: float = 5.0
    seed: int = 0
    ar_step: int = 5
    window_chunks: int = 4        # the training context (8 latent frames)
    overlap_chunks: int = 1
    length: int = 4               # video length / training length
    addnoise: float = 20.0
    kv_chunks: int = 3            # KV budget of the sequential variant (MAGI's count: history + chunks in flight)
    kv_ar_step: int | None = None  # ar_step of the sequential variant (None = steps: one chunk in flight)
    calib_n: int = 2              # training-split prompts of the calibration and threshold search
    tol: float = 0.01             # threshold search: stop within this of the target FLOPs fraction
    methods: tuple[str, ...] = ()  # () = every row

    def __post_init__(self):
        for f in ("n", "steps", "window_chunks", "overlap_chunks", "length", "calib_n", "kv_chunks"):
            int_arg(f"Setup.{f}", getattr(self, f), minimum=1)
        int_arg("Setup.ar_step", self.ar_step, minimum=0)
        optional_int_arg("Setup.kv_ar_step", self.kv_ar_step, 0)
        float_arg("Setup.tol", self.tol, low=0.0, high=0.5, low_open=True)
        if self.overlap_chunks >= self.window_chunks:
            raise ValueError(f"Setup.overlap_chunks={self.overlap_chunks} must be below window_chunks")
        if not 2 <= self.kv_chunks < self.window_chunks:
            raise ValueError(f"Setup.kv_chunks={self.kv_chunks}: the KV budget must be at least 2 chunks and below "
                             f"the window ({self.window_chunks} chunks), or compression can never fire")
        unknown = set(self.methods) - set(method_specs(self.kv_chunks, self.window_chunks))
        if unknown:
            raise ValueError(f"Setup.methods has unknown rows {sorted(unknown)}; known: {list(method_specs(3))}")

    @property
    def seq_ar_step(self) -> int:
        return self.steps if self.kv_ar_step is None else self.kv_ar_step


def geometry(setup: Setup, cbs: int) -> dict:
    """Frames of the video and of a window, the overlap, the rows of each window, and the work units (chunk
    forwards per CFG branch) of the window execution (vanilla) and the per-chunk execution."""
    wf, of = setup.window_chunks * cbs, setup.overlap_chunks * cbs
    stride = wf - of
    frames = LATENT_FRAMES * setup.length
    frames = wf + -(-(frames - wf) // stride) * stride         # the first window + k strides covering the length
    windows = 1 + (frames - wf) // stride
    rows0 = setup.steps + (setup.window_chunks - 1) * setup.ar_step
    rows_k = setup.steps + (setup.window_chunks - setup.overlap_chunks - 1) * setup.ar_step
    vanilla = setup.window_chunks * (rows0 + (windows - 1) * rows_k)
    denoise = setup.steps * (setup.window_chunks + (windows - 1) * (setup.window_chunks - setup.overlap_chunks))
    return {"frames": frames, "window_frames": wf, "overlap_frames": of, "windows": windows,
            "rows_per_window": [rows0] + [rows_k] * (windows - 1), "vanilla_units": vanilla,
            "chunk_units": denoise + windows - 1}


class Runner:
    """Runs df_run methods on fixed prompts and noise, one prompt per call."""

    def __init__(self, model, setup: Setup, ctx, noise, geom: dict):
        self.model, self.setup, self.ctx, self.noise, self.geom = model, setup, ctx, noise, geom
        self.solver = unipc(setup.steps)

    def window_chunks(self, variant: str) -> int:
        return self.setup.kv_chunks if variant == "seq-window" else self.setup.window_chunks

    def kwargs(self, variant: str, i: int) -> dict:
        """df_sample's arguments for prompt i in `variant`'s setting."""
        s, cbs = self.setup, self.model.cfg.num_frame_per_block
        wc = self.window_chunks(variant)
        overlap = wc - 1 if variant == "seq-window" else s.overlap_chunks
        ctx = self.ctx[i:i + 1]
        return dict(solver=self.solver, ar_step=s.ar_step if variant == "main" else s.seq_ar_step,
                    causal_block_size=cbs, guidance=s.guidance, negative_context=jnp.zeros_like(ctx),
                    window_frames=wc * cbs, overlap_frames=overlap * cbs, addnoise_condition=s.addnoise,
                    noise_key=jax.random.key(s.seed + 7))

    def one(self, row: Row, thresh: float, i: int, poly: dict | None = None):
        kw = self.kwargs(row.variant, i)
        if poly is not None:
            kw.update(coefficients=tuple(poly["coefficients"]), max_change=poly["max_change"])
        return df_run(row.cache, self.model, self.noise[i:i + 1], self.ctx[i:i + 1], thresh=thresh,
                      kv_chunks=row.kv_chunks, **kw)

    def flops(self, row: Row, work: dict) -> float:
        """FLOPs of a run's counters (`experiments.cache_table.flops`)."""
        cbs = self.model.cfg.num_frame_per_block
        frames = self.window_chunks(row.variant) * cbs if row.cache in ("vanilla", "teacache") else cbs
        return flops(self.model.cfg, work, work["attn_pairs"], tokens(self.model.cfg, (frames, *self.noise.shape[2:4])),
                     self.ctx.shape[1])


def kv_bytes(model_cfg, row: Row, window_chunks: int, chunk_tokens: int) -> int:
    """Bytes of the per-window K/V buffer (K and V, every layer, both CFG branches, float32): none for the
    window execution (it recomputes the whole window every row), else `kv_chunks` or the window's chunks."""
    if row.cache in ("vanilla", "teacache"):
        return 0
    slots = (row.kv_chunks or window_chunks) * chunk_tokens
    return 2 * 2 * model_cfg.num_layers * slots * model_cfg.dim * 4


def window_starts(rows_per_window) -> np.ndarray:
    """Indices of each window's first row in a run's row sequence (its indicator change compares two windows)."""
    return np.concatenate([[0], np.cumsum(rows_per_window)[:-1]]).astype(int)


def fit_window_polynomial(input_change, output_change, rows_per_window) -> dict:
    """TeaCache's polynomial fitted on vanilla window-execution runs ((runs, rows) changes of e0 and of the
    block output per row), each window's first row left out (it compares against the previous window).
    Returns JSON-ready coefficients, max_change (the fitted range's top) and the fit's relative error."""
    keep = np.setdiff1d(np.arange(np.shape(input_change)[1]), window_starts(rows_per_window))
    cal = fit_coefficients(np.asarray(input_change)[:, keep], np.asarray(output_change)[:, keep], skip_first=0)
    return {"coefficients": list(cal.coefficients), "max_change": cal.input_max,
            "fit_relative_error": cal.fit_relative_error}


def teacache_match(changes, coefficients, max_change, call_share: float, target: float) -> dict:
    """TeaCache's threshold for a target FLOPs fraction, by replaying its rule on the recorded e0 changes of
    whole vanilla videos (exact: e0 depends on the timesteps only). A skipped row still pays embedding and
    head, `call_share` of vanilla's FLOPs, so the fraction of rows to compute is (target - share) / (1 - share)."""
    target = float_arg("teacache_match target", target, low=0.0, high=1.0, low_open=True)
    call_share = float_arg("teacache_match call_share", call_share, low=0.0, high=1.0, high_open=True)
    rows = np.shape(changes)[1]
    cfg = teacache_config(1.0, coefficients, use_ret_steps=True, max_change=max_change)
    want = min(max((target - call_share) / (1.0 - call_share), 1e-3), 1.0)
    th, frac = choose_threshold(cfg, changes, rows, want)
    return {"threshold": th, "replayed_fraction": call_share + (1.0 - call_share) * frac}


def calibrate(calib: Runner, log) -> dict:
    """What every matched row starts from, on whole vanilla videos of the calibration prompts: vanilla's FLOPs,
    and the e0 and block-output changes per row (`experiments.teacache.probe`). TeaCache's polynomial is
    fitted on them (its paper's recipe) and its thresholds come from replaying its rule on them, exactly
    (e0 depends on the timesteps only); the papers' polynomial is replayed too, to say what it can reach.
    The per-chunk caches' thresholds are added by `search_cache` when their rows come up."""
    s, g = calib.setup, calib.geom
    van = Row("vanilla", "paper", 0.0)
    inp, outp, vflops = [], [], []
    for i in range(s.calib_n):
        out = df_sample(probe(df_method("vanilla", calib.model, window_frames=g["window_frames"])[0], "e0"),
                        calib.noise[i:i + 1], calib.ctx[i:i + 1], **calib.kwargs("main", i))
        for b in branch_states(out.state):
            inp.append(np.asarray(b.input_change))
            outp.append(np.asarray(b.output_change))
        vflops.append(calib.flops(van, df_work(out.state)))
        log(f"  vanilla probe run {i + 1}/{s.calib_n}")
    inp, outp = np.stack(inp), np.stack(outp)
    work = df_work(out.state)
    share = calib.flops(van, {**work, "block_passes": 0, "token_layers": 0, "attn_pairs": 0.0}) / vflops[-1]
    poly = fit_window_polynomial(inp, outp, g["rows_per_window"])
    thresholds = {"teacache-cal": {tag: teacache_match(inp, poly["coefficients"], poly["max_change"], share, target)
                                   for tag, target in MATCHED}}
    return {"polynomial": poly, "call_share": share, "vanilla_flops": vflops, "thresholds": thresholds,
            "papers_polynomial_max_fraction": papers_reach(inp, share)}


def search_cache(calib: Runner, name: str, vflops: list[float], log) -> dict:
    """A per-chunk cache's thresholds for the MATCHED fractions of vanilla's FLOPs, bisected over real whole-video
    runs (FLOPs from their counters): on the first calibration prompt for FlowCache (its e0 decisions do not
    depend on the content, so the evaluation lands exactly there), on all of them for the content-dependent
    FlowCache-MAGI and MotionCache. The runs are shared between the targets."""
    method = CACHES[name]
    start = {"flowcache": SKYREELS_THRESH["slow"], "flowcache_magi": MAGI_THRESH["slow"],
             "motioncache": MOTIONCACHE_THRESH}[method]
    row, prompts = Row(method, "", None), (1 if method == "flowcache" else calib.setup.calib_n)

    def fraction(thresh):
        return sum(calib.flops(row, df_work(calib.one(row, thresh, i).state)) for i in range(prompts)) \
            / sum(vflops[:prompts])
    seen: dict[float, float] = {}
    out = {}
    for tag, target in MATCHED:
        log(f"  [{name}] searching the threshold for {target:.0%} of vanilla's FLOPs")
        th, reached = choose_mc_threshold(fraction, target, start, log, iters=6, tol=calib.setup.tol, label=name,
                                          unit="vanilla's FLOPs", seen=seen, interpolate=True)
        out[tag] = {"threshold": th, "calibration_fraction": reached}
    return out


def papers_reach(changes, share: float) -> float:
    """The largest FLOPs fraction TeaCache with the papers' polynomial computes at any positive threshold on
    the recorded changes (its replay over a log grid from 1e-6 to 10)."""
    cfg = teacache_config(1.0, WAN21_COEFFICIENTS[("1.3b", True)], use_ret_steps=True)
    rows = np.shape(changes)[1]
    fr = max(float(schedule(dataclasses.replace(cfg, thresh=float(t)), changes, rows).mean())
             for t in np.geomspace(1e-6, 10.0, 29))
    return share + (1.0 - share) * fr


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
                       f"{100 * x['flops_fraction']:.1f}% FLOPs vs {b} {y['psnr']:.2f} dB / SSIM {y['ssim']:.3f} "
                       f"at {100 * y['flops_fraction']:.1f}%).")
        else:
            out.append(f"- {claim}: not measured ({a} or {b} missing).")
    for tag, _ in MATCHED:
        line(f"flowcache-{tag}", f"teacache-cal-{tag}",
             f"FlowCache > TeaCache (polynomial calibrated) at {tag}% compute")
        line(f"flowcache-magi-{tag}", f"teacache-cal-{tag}",
             f"FlowCache (MAGI variant) > TeaCache (polynomial calibrated) at {tag}% compute")
        line(f"motioncache-{tag}", f"flowcache-{tag}", f"MotionCache > FlowCache at {tag}% compute")
    for speed in ("slow", "fast"):
        line(f"flowcache-paper-{speed}", f"teacache-paper-{speed}",
             f"FlowCache > TeaCache at the papers' {speed} thresholds")
    line("motioncache-paper", "flowcache-paper-fast", "MotionCache > FlowCache-fast at the papers' thresholds")
    seq = [by.get(f"seq-flowcache-paper-slow{x}") for x in ("+kvc", "", "+window")]
    if all(r is not None and r["psnr"] is not None for r in seq):
        k, f, w = seq
        vs_window = "holds" if k["psnr"] > w["psnr"] and k["kv_bytes_per_video"] <= w["kv_bytes_per_video"] \
            else "does not hold"
        vs_full = "keeps" if k["psnr"] >= f["psnr"] - 0.5 else "does not keep"
        out.append(f"- KV compression keeps quality at fixed memory (one chunk in flight, budget {k['kv_chunks']} "
                   f"chunks, {k['compressions_per_video']} compressions per video): against a plain window of the "
                   f"same bytes **{vs_window}** (compressed {k['psnr']:.2f} dB / SSIM {k['ssim']:.3f} in "
                   f"{k['kv_bytes_per_video'] / MIB:.2f} MiB vs {w['psnr']:.2f} dB / SSIM {w['ssim']:.3f} in "
                   f"{w['kv_bytes_per_video'] / MIB:.2f} MiB); it **{vs_full}** the uncompressed buffer's quality "
                   f"(same FlowCache with {f['kv_bytes_per_video'] / MIB:.2f} MiB: {f['psnr']:.2f} dB / SSIM "
                   f"{f['ssim']:.3f}, {k['psnr'] - f['psnr']:+.2f} dB; 'keeps' = within 0.5 dB).")
    else:
        out.append("- KV compression keeps quality at fixed memory: not measured (a seq-flowcache-paper-slow row is "
                   "missing).")
    k, f = by.get("flowcache-paper-slow+kvc"), by.get("flowcache-paper-slow")
    if k and f and k["psnr"] is not None and f["psnr"] is not None:
        identical = k["counters"] == f["counters"] and k["psnr"] == f["psnr"] and k["ssim"] == f["ssim"]
        same = "counters, PSNR and SSIM identical: the trigger never fired" if identical else "the runs differ"
        out.append(f"- In the papers' setting a KV budget of the whole window ({k['kv_chunks']} chunks) vs none: "
                   f"{k['psnr']:.2f} vs {f['psnr']:.2f} dB; {same} (every chunk of the window is in flight).")
    return out


def matching_lines(report: dict) -> list[str]:
    """How close every matched row came to its target, and what the papers' polynomial can reach."""
    m = report.get("matched")
    if not m:
        return []
    lines = [f"Matched thresholds (searched on whole videos of {report['setup']['calib_n']} training prompt(s); "
             f"TeaCache by replaying its rule on the recorded e0 changes, its polynomial fitted on the same vanilla "
             f"runs: coefficients {', '.join(f'{c:.4g}' for c in m['polynomial']['coefficients'])}, max change "
             f"{m['polynomial']['max_change']:.4g}, fit error {m['polynomial']['fit_relative_error']:.2f}). FLOPs on "
             f"the evaluation prompts against the target:"]
    by = {r["method"]: r for r in report["rows"]}
    cells = []
    for name in CACHES:
        for tag, target in MATCHED:
            r = by.get(f"{name}-{tag}")
            if r is not None:
                off = r["flops_fraction"] - target
                cells.append(f"{name}-{tag} {100 * r['flops_fraction']:.1f}% ({100 * off:+.1f}"
                             f"{'' if abs(off) <= 0.03 else ', OUTSIDE +-3'})")
    lines.append("; ".join(cells) + ".")
    reach = 100 * m["papers_polynomial_max_fraction"]
    lines.append(f"TeaCache with the papers' polynomial reaches at most {reach:.1f}% "
                 "of vanilla's FLOPs at any positive threshold (replayed on the same changes): each window's first "
                 "row compares e0 across two windows, the quartic turns that large change into a huge negative "
                 "value, and the accumulator never again reaches the threshold.")
    return lines


def markdown(report: dict) -> str:
    s, g = report["setup"], report["geometry"]
    lines = [f"AR shapes model, asynchronous diffusion forcing (the papers' setting): {s['n']} held-out prompt(s), "
             f"{g['frames']} latent frames ({g['windows']} windows of {g['window_frames']} frames = "
             f"{s['window_chunks']} chunks, overlap {g['overlap_frames']}), causal block "
             f"{report['causal_block']}, ar_step {s['ar_step']}, UniPC {s['steps']}, CFG {s['guidance']}, "
             f"addnoise {s['addnoise']}. Thresholds: the papers' own, and matched to 50% / 30% of vanilla's "
             f"FLOPs. Fidelity against async vanilla; the seq-* rows (KV compression) run ar_step "
             f"{s['kv_ar_step'] if s['kv_ar_step'] is not None else s['steps']} (one chunk in flight) and are "
             f"measured against seq-vanilla (the same per-chunk execution without caching). Wall clock on "
             f"{report['machine']}, the median over prompts after the first (which compiles).", "",
             markdown_table(report["rows"], COLUMNS, "ll" + "r" * (len(COLUMNS) - 2)), "",
             *claims(report["rows"]), "", *matching_lines(report), "", "LPIPS: not measured (see docs/caching.md)."]
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
    specs = method_specs(setup.kv_chunks, setup.window_chunks)
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
    cprompts, cctx, cnoise = calibration_inputs(setup, geom["frames"])
    calib = Runner(model, setup, cctx, cnoise, geom)
    if report["matched"] is None and any(specs[m].thresh is None for m in planned):
        log(f"calibration on {setup.calib_n} training prompt(s), whole videos ...")
        report["matched"] = {"prompts": cprompts, **calibrate(calib, log)}
        write_results(out_dir, NAME, report, markdown(report))
    done = {r["method"] for r in report["rows"]}
    chunk_tokens = tokens(model.cfg, (cbs, *runner.noise.shape[2:4]))
    refs = dict(np.load(out_dir / f"{NAME}.npz")) if done else {}
    ref_videos = {k: decode_latents(v, uint8=True) for k, v in refs.items()}
    seg = LATENT_FRAMES * TEMPORAL_GROUP
    for name in planned:
        if name in done:
            continue
        row = specs[name]
        ref = "seq-vanilla" if row.variant.startswith("seq") else "vanilla"
        if name != ref and ref not in ref_videos:
            raise ValueError(f"row {name!r} is measured against {ref!r}: add it to --methods (it runs first)")
        thresh, poly = row.thresh, None
        if thresh is None:
            cache, tag = name.rsplit("-", 1)
            found = report["matched"]["thresholds"]
            if cache not in found:
                found[cache] = search_cache(calib, cache, report["matched"]["vanilla_flops"], log)
                write_results(out_dir, NAME, report, markdown(report))
            thresh = found[cache][tag]["threshold"]
        if row.calibrated:
            poly = report["matched"]["polynomial"]
        log(f"[{name}] {row.cache} thresh {thresh:.4g}" + (f", KV compression to {row.kv_chunks} chunks"
                                                          if row.kv_chunks else ""))
        latents, work, secs, compressions = [], None, [], 0
        for i in range(setup.n):
            out = {}

            def call(i=i, out=out, row=row, thresh=thresh, poly=poly):
                out["run"] = runner.one(row, thresh, i, poly)
                return out["run"].latents
            secs.append(interleaved_times({name: call}, 1)[name][0])
            latents.append(np.asarray(out["run"].latents))
            w = df_work(out["run"].state)
            work = w if work is None else {k: work[k] + w[k] for k in w}
        if row.kv_chunks:
            compressions = kv_events(runner, row)
        lat = np.concatenate(latents)
        videos = decode_latents(lat, uint8=True)
        segs = np.asarray(segment_adherence(videos, prompts, seg))
        rec = {"method": name, "cache": row.cache, "setting": row.setting, "variant": row.variant,
               "reference": ref, "threshold": None if row.cache.startswith("vanilla") else thresh,
               "polynomial": "calibrated" if row.calibrated else "papers'", "kv_chunks": row.kv_chunks,
               "compressions_per_video": compressions, "counters": work,
               "block_passes_per_video": work["block_passes"] / setup.n,
               "flops_per_video": runner.flops(row, work) / setup.n,
               "kv_bytes_per_video": kv_bytes(model.cfg, row, runner.window_chunks(row.variant), chunk_tokens),
               "seconds_per_prompt": secs,
               "seconds_per_video": float(np.median(secs[1:] if len(secs) > 1 else secs)),
               "adherence": float(adherence(videos, prompts)["score"]), "segment_adherence": segs.tolist(),
               "segment_mean": float(segs.mean()),
               "mid_video_mean": float(segs[1:].mean() if len(segs) > 1 else segs[0])}
        if name == ref:
            refs[name], ref_videos[name] = lat, videos
            np.savez(out_dir / f"{NAME}.npz", **refs)
            rec.update(psnr=None, ssim=None)
        else:
            fid = video_fidelity(videos, ref_videos[ref])
            rec.update(psnr=fid["psnr"], ssim=fid["ssim"], relative_l2=fid["relative_l2"])
        report["rows"].append(rec)
        by = {r["method"]: r for r in report["rows"]}
        for r in report["rows"]:
            base = by.get(r["reference"])
            if base is not None:
                r["flops_fraction"] = r["flops_per_video"] / base["flops_per_video"]
                r["speedup"] = base["seconds_per_video"] / r["seconds_per_video"]
        report["complete"] = all(m in by for m in planned)
        write_results(out_dir, NAME, report, markdown(report))
        log("  " + markdown_table([rec], COLUMNS).splitlines()[-1])
    report["last_run_seconds"] = time.perf_counter() - t_start
    md = markdown(report)
    write_results(out_dir, NAME, report, md)
    log(md)
    return report


def kv_events(runner: Runner, row: Row) -> int:
    """Compression events per video of a KV-compressed row, from its static plan (MAGI's trigger)."""
    cbs = runner.model.cfg.num_frame_per_block
    kw = runner.kwargs(row.variant, 0)
    tok = tokens(runner.model.cfg, (cbs, *runner.noise.shape[2:4]))
    total = 0
    for pre in [0] + [kw["overlap_frames"]] * (runner.geom["windows"] - 1):
        (_, _, upd, _), _ = df_schedule(runner.solver, kw["window_frames"], ar_step=kw["ar_step"],
                                        causal_block_size=cbs, num_pre_ready=pre)
        total += int(plan_window_compression(np.asarray(upd), pre // cbs, cbs, tok, row.kv_chunks)["compress"].sum())
    return total


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
    p.add_argument("--kv-chunks", type=int, default=d.kv_chunks, help="KV budget of the seq-* rows (chunks)")
    p.add_argument("--kv-ar-step", type=int, default=d.kv_ar_step, help="ar_step of the seq-* rows (default: steps)")
    p.add_argument("--methods", default="", help="comma-separated rows (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    try:
        setup = dataclasses.replace(d, n=a.n, steps=a.steps, guidance=a.guidance, seed=a.seed, ar_step=a.ar_step,
                                    length=a.length, calib_n=a.calib_n, kv_chunks=a.kv_chunks, kv_ar_step=a.kv_ar_step,
                                    methods=tuple(m for m in a.methods.split(",") if m))
    except (ValueError, TypeError) as e:
        p.error(str(e))
    run_table(setup, a.out)


if __name__ == "__main__":
    main()
