"""`vidaccel generate`: a prompt to an MP4 (or GIF) on a diffusers Wan pipeline folder, with any method one flag
away.

    vidaccel generate --model Wan2.1-T2V-1.3B-Diffusers --prompt "a cat walks on the grass" \
        --frames 81 --size 832x480 --steps 50 --guidance 5 --method teacache --out cat.mp4

The methods and their defaults (the papers' settings for Wan2.1 / SkyReels-V2):
- dense: the baseline (SkyReels-V2 DF: the vanilla whole-window execution).
- teacache: TeaCache with the published Wan2.1 T2V coefficients (`use_ret_steps`), threshold 0.10 for
  1.3B-sized and 0.20 for 14B-sized transformers (the TeaCache4Wan2.1 "fast" settings); other sizes have no
  published coefficients and get 1.3B's, with a warning (calibrate with `experiments.teacache`). On DF
  folders: one decision per row for the whole window, as the papers' baseline.
- haste-xattention / haste-svg2 (T2V folders): HASTE (temporal mask reuse) over XAttention / SVG2 with their
  default thresholds; without a calibration file no per-head table is applied (EBC needs
  `python -m experiments.haste`).
- flowcache / motioncache (SkyReels-V2 DF folders): per-chunk execution against the window's K/V buffer,
  FlowCache-SkyReels at its "slow" threshold 0.1, MotionCache at its code default 0.1.

On a device mesh (`--mesh fsdp=4,seq=2`, sizes multiplying to the device count; `--attention ulysses|ring`)
every part's weights are sharded by its rules and the methods wrap the sequence-parallel denoiser: dense and
teacache on every folder (DF: whole windows), haste-* head-parallel under Ulysses; flowcache and motioncache
(per-chunk K/V buffers) are refused.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from experiments.flowcache import SKYREELS_THRESH, df_method
from experiments.haste import haste
from experiments.motioncache import MotionCacheConfig
from experiments.svg2 import svg2
from experiments.teacache import WAN21_COEFFICIENTS, teacache, wan21_teacache
from experiments.video_files import FORMATS, write_video
from experiments.xattention import xattention
from models.wan.sharding import parallel_sparse_denoiser
from models.wan_pipeline import Pipeline, df_windows, generate, latent_frames, load_pipeline, with_causal_block_size
from vidaccel.checks import choice_arg, optional_float_arg
from vidaccel.sparse_attention import sparse_attention
from vidaccel.transforms import Denoiser

METHODS = ("dense", "teacache", "haste-xattention", "haste-svg2", "flowcache", "motioncache")
T2V_METHODS = ("dense", "teacache", "haste-xattention", "haste-svg2")
DIFFUSION_FORCING_METHODS = ("dense", "teacache", "flowcache", "motioncache")
TEACACHE_SIZES = {1536: ("1.3b", 0.10), 5120: ("14b", 0.20)}  # transformer dim -> coefficients, threshold
# Defaults of the per-chunk methods: FlowCache-SkyReels' "slow" threshold, MotionCache's code default.
DF_THRESHOLDS = {"flowcache": SKYREELS_THRESH["slow"], "motioncache": MotionCacheConfig().thresh}


def _teacache_size(pipe: Pipeline) -> tuple[str, float]:
    dim = pipe.transformer.cfg.dim
    if dim not in TEACACHE_SIZES:
        warnings.warn(f"no published TeaCache coefficients for a transformer of width {dim}; using the 1.3B ones "
                      "(calibrate with experiments.teacache.calibrate_teacache for a faithful rule)", stacklevel=3)
    return TEACACHE_SIZES.get(dim, ("1.3b", 0.10))


def method_denoiser(pipe: Pipeline, method: str, threshold: float | None = None, *,
                    window_frames: int | None = None, attention: str = "ulysses") -> tuple[Denoiser | None, str]:
    """(denoiser, execution) of `method` over the pipeline's transformer, for `generate(denoiser=...,
    execution=...)`; (None, "window") for dense. window_frames: latent frames of a DF window (per-chunk
    methods size their K/V buffer by it; default: the whole video, given by the caller). For a pipeline on a
    mesh (`pipe.on_mesh`) T2V methods wrap `pipe.parallel_denoiser(attention)`; HASTE runs head-parallel
    (`parallel_sparse_denoiser`), which needs Ulysses."""
    allowed = DIFFUSION_FORCING_METHODS if pipe.kind == "diffusion_forcing" else T2V_METHODS
    choice_arg("method", method, METHODS)
    if method not in allowed:
        raise ValueError(f"method {method!r} does not run on {pipe.folder.class_name} folders; they take "
                         f"{allowed} (FlowCache and MotionCache are per-chunk methods of the diffusion-forcing "
                         "runtime; the sparse policies do not apply SkyReels-V2's block-causal mask)")
    threshold = optional_float_arg("threshold", threshold, low=0.0)
    if threshold is not None and method not in ("teacache", "flowcache", "motioncache"):
        raise ValueError(f"--threshold applies to teacache, flowcache and motioncache, not to {method}")
    if method == "dense":
        return None, "window"
    if pipe.kind == "diffusion_forcing":
        if window_frames is None:
            raise ValueError("a diffusion-forcing method needs window_frames (latent frames of a window)")
        size, tea_default = _teacache_size(pipe) if method == "teacache" else ("1.3b", 0.0)
        default = tea_default if method == "teacache" else DF_THRESHOLDS[method]
        return df_method(method, pipe.transformer, window_frames=window_frames,
                         thresh=default if threshold is None else threshold,
                         coefficients=WAN21_COEFFICIENTS[(size, True)])
    if method == "teacache":
        size, default = _teacache_size(pipe)
        den = pipe.dense_denoiser if pipe.mesh is None else pipe.parallel_denoiser(attention)
        return teacache(den, wan21_teacache(size, default if threshold is None else threshold)), "window"
    policy = haste(xattention() if method == "haste-xattention" else svg2())
    if pipe.mesh is None:
        return sparse_attention(pipe.dense_denoiser, policy), "window"
    if attention != "ulysses":
        raise ValueError(f"{method} on a mesh runs head-parallel under Ulysses (each device predicts the masks of "
                         f"its heads); attention={attention!r} is not supported for it, use 'ulysses'")
    return parallel_sparse_denoiser(pipe.transformer, pipe.mesh, policy), "window"


DF_FLAGS = ("ar_step", "causal_block_size", "base_frames", "overlap_history", "addnoise_condition")


def parse_size(text: str) -> tuple[int, int]:
    """'832x480' -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be WIDTHxHEIGHT, e.g. 832x480; got {text!r}") from None
    return w, h


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers pipeline folder (Wan2.1 T2V or SkyReels-V2 DF)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--frames", type=int, default=81, help="4k+1 frames (default %(default)s)")
    p.add_argument("--size", default="832x480", help="WIDTHxHEIGHT, multiples of 16 (default %(default)s)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale; <= 1 turns CFG off (default 5)")
    p.add_argument("--shift", type=float, default=None, help="flow shift (default: the folder's scheduler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="dense", choices=METHODS)
    p.add_argument("--threshold", type=float, default=None,
                   help="threshold of teacache (default 0.10 for 1.3B-wide, 0.20 for 14B-wide transformers), "
                        "flowcache (0.1) or motioncache (0.1)")
    g = p.add_argument_group("SkyReels-V2 diffusion forcing (DF pipeline folders only)")
    g.add_argument("--ar-step", type=int, default=0, help="steps each causal block lags the previous (0 = sync)")
    g.add_argument("--causal-block-size", type=int, default=None,
                   help="latent frames per causal block (default: the transformer's num_frame_per_block)")
    g.add_argument("--base-frames", type=int, default=None, help="frames of one window (long videos)")
    g.add_argument("--overlap-history", type=int, default=None, help="frames consecutive windows share")
    g.add_argument("--addnoise-condition", type=float, default=0.0, help="prefix re-noising (SkyReels: 20)")
    g = p.add_argument_group("device mesh (docs/parallel.md)")
    g.add_argument("--mesh", default=None,
                   help="run on a mesh, e.g. 'fsdp=4,seq=2' (axes data, fsdp, seq; sizes multiply to the device "
                        "count): weights sharded by their rules, denoising sequence-parallel")
    g.add_argument("--attention", default=None, choices=["ulysses", "ring"],
                   help="sequence-parallel self-attention on the mesh (default ulysses; ring takes any head count)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="text encoder and transformer dtype (the VAE runs in float32)")
    p.add_argument("--cache-dir", default=None, help="Orbax cache of the converted transformer (fast second start)")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--out", default="video.mp4", help=f"output file, one of {FORMATS} (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"--out {out}: the file must end in one of {FORMATS}")
    width, height = parse_size(args.size)
    if args.attention is not None and args.mesh is None:
        raise ValueError("--attention chooses the sequence-parallel attention of a mesh run; give --mesh too")
    pipe = load_pipeline(args.model, dtype=args.dtype, cache_dir=args.cache_dir)
    if args.mesh is not None:
        pipe = pipe.on_mesh(args.mesh)
    attention = args.attention or "ulysses"
    df = {}
    if pipe.kind == "diffusion_forcing":
        if args.causal_block_size is not None:
            pipe = with_causal_block_size(pipe, args.causal_block_size)
        window, _ = df_windows(pipe, args.frames, args.base_frames, args.overlap_history)
        df = dict(ar_step=args.ar_step, base_frames=args.base_frames, overlap_history=args.overlap_history,
                  addnoise_condition=args.addnoise_condition)
    else:
        window = None
        given = [f"--{k.replace('_', '-')}" for k in DF_FLAGS if getattr(args, k) not in (None, 0, 0.0)]
        if given:
            raise ValueError(f"{', '.join(given)}: diffusion-forcing options; {pipe.folder.class_name} folders "
                             "do not take them")
    den, execution = method_denoiser(pipe, args.method, args.threshold,
                                     window_frames=window or latent_frames(pipe, args.frames), attention=attention)
    mesh = dict(mesh=pipe.mesh, attention=attention) if pipe.mesh is not None else {}
    result = generate(pipe, args.prompt, args.negative_prompt, frames=args.frames, height=height, width=width,
                      steps=args.steps, guidance=args.guidance, shift=args.shift, seed=args.seed,
                      denoiser=den, execution=execution, progress=not args.json, **df, **mesh)
    write_video(out, result.frames[0], fps=args.fps)
    return {"out": str(out), "method": args.method, "mesh": dict(pipe.mesh.shape) if pipe.mesh is not None else None,
            "attention": attention if pipe.mesh is not None else None, "frames": int(result.frames.shape[1]),
            "size": [int(result.frames.shape[3]), int(result.frames.shape[2])],
            "seconds": {k: round(v, 3) for k, v in result.seconds.items()}, "work": result.work}


def main(args: argparse.Namespace) -> int:
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        secs = ", ".join(f"{k} {v:.2f} s" for k, v in report["seconds"].items())
        work = ", ".join(f"{k} {v}" for k, v in report["work"].items())
        where = f", mesh {report['mesh']} ({report['attention']})" if report["mesh"] else ""
        print(f"wrote {report['out']}: {report['frames']} frames {report['size'][0]}x{report['size'][1]}, "
              f"method {report['method']}{where}\n  time: {secs}\n  work: {work}")
    return 0
