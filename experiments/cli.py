"""The `vidaccel` command. Each subcommand is one function registered in `COMMANDS`."""

from __future__ import annotations

import argparse
import json
import sys

from experiments import generate as generate_command
from experiments.demo import DEFAULT_OUT, DEMO_METHODS, MAX_PROMPTS, run_demo
from models.wan import abstract_transformer, count_params, load_transformer
from models.wan.config import PRESETS


def _presets(args: argparse.Namespace) -> int:
    rows = []
    for name, make in PRESETS.items():
        cfg = make()
        rows.append({"preset": name, "dim": cfg.dim, "layers": cfg.num_layers, "heads": cfg.num_attention_heads,
                     "ffn_dim": cfg.ffn_dim, "parameters": count_params(abstract_transformer(cfg))})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'preset':<16} {'dim':>6} {'layers':>6} {'heads':>5} {'ffn':>6} {'parameters':>15}")
        for r in rows:
            print(f"{r['preset']:<16} {r['dim']:>6} {r['layers']:>6} {r['heads']:>5} {r['ffn_dim']:>6} "
                  f"{r['parameters']:>15,}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    model = load_transformer(args.checkpoint, dtype=args.dtype, cache_dir=args.out)
    cfg = model.cfg
    print(f"converted {args.checkpoint} -> {args.out}: dim {cfg.dim}, {cfg.num_layers} layers, "
          f"{count_params(model):,} parameters, {args.dtype}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    run_demo(args.out, num_prompts=args.prompts, steps=args.steps, guidance=args.guidance, seed=args.seed,
             methods=args.methods)
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default %(default)s)")
    p.add_argument("--prompts", type=int, default=4,
                   help=f"number of held-out prompts, 1 to {MAX_PROMPTS} (default %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="UniPC steps (default %(default)s)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=None, choices=list(DEMO_METHODS),
                   help="methods to run beside dense (default: all)")


COMMANDS = {
    "generate": (generate_command.main, "generate a video from a prompt on a diffusers Wan pipeline folder (Wan2.1 "
                                        "T2V, SkyReels-V2 DF), with any method; writes MP4 or GIF",
                 generate_command.add_arguments),
    "demo": (_demo, "generate shapes-world videos with the tiny text-to-video model, dense and accelerated; "
                    "writes GIFs and a report", _demo_args),
    "presets": (_presets, "list the Wan config presets and their parameter counts",
                lambda p: p.add_argument("--json", action="store_true", help="print JSON")),
    "convert": (_convert, "convert a diffusers or official Wan2.1 checkpoint to an Orbax cache for fast reload",
                lambda p: (p.add_argument("checkpoint", help="diffusers folder, pipeline root, or official folder"),
                           p.add_argument("out", help="output folder for the converted parameters"),
                           p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"]))),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vidaccel",
        description="Training-free acceleration of video diffusion transformers (JAX / Flax / Pallas).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, help_text, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:    # bad arguments; unreadable or unwritable paths
        print(f"vidaccel {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
