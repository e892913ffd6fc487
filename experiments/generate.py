"""`vidaccel generate`: a prompt to an MP4 (or GIF) on a diffusers Wan pipeline folder, with any method one flag
away.

    vidaccel generate --model Wan2.1-T2V-1.3B-Diffusers --prompt "a cat walks on the grass" \
        --frames 81 --size 832x480 --steps 50 --guidance 5 --method teacache --out cat.mp4

The methods and their defaults (the papers' settings for Wan2.1):
- dense: the baseline.
- teacache: TeaCache with the published Wan2.1 T2V coefficients (`use_ret_steps`), threshold 0.10 for
  1.3B-sized and 0.20 for 14B-sized transformers (the TeaCache4Wan2.1 "fast" settings); other sizes have no
  published coefficients and get 1.3B's, with a warning (calibrate with `experiments.teacache`).
- haste-xattention / haste-svg2: HASTE (temporal mask reuse) over XAttention / SVG2 with their default
  thresholds; without a calibration file no per-head table is applied (EBC needs `python -m experiments.haste`).
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from pathlib import Path

from experiments.haste import haste
from experiments.svg2 import svg2
from experiments.teacache import teacache, wan21_teacache
from experiments.video_files import FORMATS, write_video
from experiments.xattention import xattention
from models.wan_pipeline import Pipeline, generate, load_pipeline
from vidaccel.checks import choice_arg, optional_float_arg
from vidaccel.sparse_attention import sparse_attention
from vidaccel.transforms import Denoiser

METHODS = ("dense", "teacache", "haste-xattention", "haste-svg2")
TEACACHE_SIZES = {1536: ("1.3b", 0.10), 5120: ("14b", 0.20)}  # transformer dim -> coefficients, threshold


def method_transform(pipe: Pipeline, method: str,
                     threshold: float | None = None) -> Callable[[Denoiser], Denoiser] | None:
    """The Denoiser -> Denoiser transform of `method` for this pipeline's transformer (None for dense)."""
    choice_arg("method", method, METHODS)
    threshold = optional_float_arg("threshold", threshold, low=0.0)
    if threshold is not None and method != "teacache":
        raise ValueError(f"--threshold applies to teacache only, not to {method}")
    if method == "dense":
        return None
    if method == "teacache":
        dim = pipe.transformer.cfg.dim
        size, default = TEACACHE_SIZES.get(dim, ("1.3b", 0.10))
        if dim not in TEACACHE_SIZES:
            warnings.warn(f"no published TeaCache coefficients for a transformer of width {dim}; using the 1.3B "
                          "ones (calibrate with experiments.teacache.calibrate_teacache for a faithful rule)",
                          stacklevel=2)
        cfg = wan21_teacache(size, default if threshold is None else threshold)
        return lambda den: teacache(den, cfg)
    base = xattention() if method == "haste-xattention" else svg2()
    policy = haste(base)
    return lambda den: sparse_attention(den, policy)


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
                   help="TeaCache threshold (default 0.10 for 1.3B-wide, 0.20 for 14B-wide transformers)")
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
    pipe = load_pipeline(args.model, dtype=args.dtype, cache_dir=args.cache_dir)
    transform = method_transform(pipe, args.method, args.threshold)
    result = generate(pipe, args.prompt, args.negative_prompt, frames=args.frames, height=height, width=width,
                      steps=args.steps, guidance=args.guidance, shift=args.shift, seed=args.seed,
                      transform=transform, progress=not args.json)
    write_video(out, result.frames[0], fps=args.fps)
    return {"out": str(out), "method": args.method, "frames": int(result.frames.shape[1]),
            "size": [int(result.frames.shape[3]), int(result.frames.shape[2])],
            "seconds": {k: round(v, 3) for k, v in result.seconds.items()}, "work": result.work}


def main(args: argparse.Namespace) -> int:
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        secs = ", ".join(f"{k} {v:.2f} s" for k, v in report["seconds"].items())
        work = ", ".join(f"{k} {v}" for k, v in report["work"].items())
        print(f"wrote {report['out']}: {report['frames']} frames {report['size'][0]}x{report['size'][1]}, "
              f"method {report['method']}\n  time: {secs}\n  work: {work}")
    return 0
