"""Device memory of the prompt-to-video pipeline at real sizes, measured without weights.

    python -m experiments.memory_report            # writes results/memory/report.{json,md}

Each stage is lowered with abstract (ShapeDtypeStruct) parameters and inputs, compiled for the local backend,
and its `memory_analysis()` read: parameter (argument) bytes, output bytes and temporary bytes. Stages:
- umT5-xxl encoding 2 prompts (the conditional and the negative one) of 512 tokens, bf16;
- one transformer call (one CFG branch: diffusers and `sample()` run the branches one after the other) at
  Wan2.1-1.3B 480x832x81 and Wan2.1-14B 720x1280x81, bf16. Self-attention is `blockwise_attention` (exact,
  online softmax, 1024x1024 tiles): the CPU cannot compile cuDNN / Pallas flash kernels, and XLA's CPU
  attention would materialise the whole score matrix, which no GPU run does;
- the VAE decoding the 21 latent frames one at a time (fp32, as the pipeline runs it).
The peak of a run that keeps every part resident is the sum of all parameters plus the largest stage's
temporaries and inputs; a run that loads each part only for its stage needs the largest single stage.
CPU compilation gives XLA:CPU's buffer assignment; a GPU's differs in detail (fusion, workspace), so the
figures are estimates to within a few GB, not a promise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.harness import markdown_table
from models.umt5 import abstract_umt5, umt5_xxl
from models.wan import abstract_transformer, wan21_t2v_1_3b, wan21_t2v_14b
from models.wan_vae import decode_memory_report, wan21_vae
from vidaccel.blockwise_attention import blockwise

GB = 1024 ** 3
DEVICES_GB = (16, 24, 80, 141)
CASES = {  # name -> (transformer preset, frames, height, width)
    "wan2.1-1.3b 480p": (wan21_t2v_1_3b, 81, 480, 832),
    "wan2.1-14b 720p": (wan21_t2v_14b, 81, 720, 1280),
}
OUT = Path("results/memory")


def _analysis(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
            "temporaries": int(m.temp_size_in_bytes), "aliased": int(getattr(m, "alias_size_in_bytes", 0))}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def transformer_step(make, frames: int, height: int, width: int, dtype: str = "bfloat16") -> dict:
    """Compiled memory of one transformer call (batch 1) at this video size."""
    cfg = make(dtype=dtype, param_dtype=dtype)
    model = abstract_transformer(cfg)
    graphdef, params = nnx.split(model)
    lat = (1, 1 + (frames - 1) // 4, height // 8, width // 8, cfg.in_channels)
    attention = blockwise(1024, 1024)

    def step(params, x, t, context):
        return nnx.merge(graphdef, params)(x, t, context, attention=attention)

    args = (_abstract(params), jax.ShapeDtypeStruct(lat, jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1, 512, cfg.text_dim), cfg.jnp_dtype))
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    tokens = lat[1] * (lat[2] // 2) * (lat[3] // 2)
    return {"stage": "transformer call", "tokens": tokens, **_analysis(compiled),
            "compile_s": round(time.perf_counter() - t0, 1)}


def text_encoder_stage(dtype: str = "bfloat16") -> dict:
    cfg = umt5_xxl(dtype=dtype)
    graphdef, params = nnx.split(abstract_umt5(cfg))

    def encode(params, ids, mask):
        return nnx.merge(graphdef, params)(ids, mask)

    t0 = time.perf_counter()
    compiled = jax.jit(encode).lower(_abstract(params), jax.ShapeDtypeStruct((2, 512), jnp.int32),
                                     jax.ShapeDtypeStruct((2, 512), jnp.int32)).compile()
    return {"stage": "umT5-xxl encode (2 x 512 tokens)", **_analysis(compiled),
            "compile_s": round(time.perf_counter() - t0, 1)}


def vae_stage(frames: int, height: int, width: int) -> dict:
    t0 = time.perf_counter()
    m = decode_memory_report(wan21_vae(), latent_frames=1 + (frames - 1) // 4, height=height // 8, width=width // 8)
    return {"stage": f"VAE decode {frames}x{height}x{width} (fp32)", "arguments": m["argument"],
            "outputs": m["output"], "temporaries": m["temp"], "aliased": m["alias"],
            "compile_s": round(time.perf_counter() - t0, 1)}


def _total(row: dict) -> int:
    return row["arguments"] + row["outputs"] + row["temporaries"] - row.get("aliased", 0)


def run(cases=tuple(CASES)) -> dict:
    text = text_encoder_stage()
    rows, summary = [text], []
    for name in cases:
        make, frames, height, width = CASES[name]
        step = {**transformer_step(make, frames, height, width), "case": name}
        vae = {**vae_stage(frames, height, width), "case": name}
        rows += [step, vae]
        params = text["arguments"] + step["arguments"] + vae["arguments"]
        stages = [text, step, vae]
        resident = params + max(_total(s) - s["arguments"] for s in stages)
        sequential = max(_total(s) for s in stages)
        summary.append({"case": name, "tokens": step["tokens"], "all_resident_gb": resident / GB,
                        "one_stage_at_a_time_gb": sequential / GB,
                        **{f"fits_{d}gb": ("yes" if resident <= d * GB else "staged" if sequential <= d * GB
                                           else "no") for d in DEVICES_GB}})
    return {"backend": jax.default_backend(), "jax": jax.__version__, "stages": rows, "summary": summary}


def write(report: dict, out: Path = OUT) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    stage_cols = {"case": lambda r: r.get("case", "-"), "stage": "stage",
                  "parameters GB": lambda r: f"{r['arguments'] / GB:.2f}",
                  "temporaries GB": lambda r: f"{r['temporaries'] / GB:.2f}",
                  "outputs GB": lambda r: f"{r['outputs'] / GB:.3f}", "total GB": lambda r: f"{_total(r) / GB:.2f}"}
    sum_cols = {"case": "case", "tokens": lambda s: f"{s['tokens']:,}",
                "resident GB": lambda s: f"{s['all_resident_gb']:.1f}",
                "staged GB": lambda s: f"{s['one_stage_at_a_time_gb']:.1f}",
                **{f"{d} GB": f"fits_{d}gb" for d in DEVICES_GB}}
    text = ("Memory per stage, compiled with abstract inputs (`python -m experiments.memory_report`, backend "
            f"{report['backend']}, jax {report['jax']}); GB = 2^30 bytes.\n\n"
            + markdown_table(report["stages"], stage_cols)
            + "\n\nA whole run: every part resident, or each part loaded for its stage only "
              "(yes = fits resident, staged = fits one stage at a time).\n\n"
            + markdown_table(report["summary"], sum_cols) + "\n")
    (out / "report.md").write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.memory_report", description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    report = run(tuple(args.cases))
    write(report, Path(args.out))
    print((Path(args.out) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
