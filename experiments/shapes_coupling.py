"""How much a t2v shapes model couples tokens: does a token's predicted velocity depend on the rest of the video?

    python -m experiments.shapes_coupling                        # the committed t2v model
    python -m experiments.shapes_coupling --checkpoint overfit1=runs/ablate/overfit1_1000/export
    -> results/shapes/coupling.{json,md}

Ground-truth renders of prompts are noised to level s (the training convention x_s = (1 - s) x0 + s eps). A
centre box of latent pixels (all frames) is kept, and the noise outside it is drawn again: `far` is the
relative change of the model's velocity in the box's centre, `own` the same when only the noise inside the box
is drawn again. Only self-attention carries information between tokens, so a model whose attention is near
uniform (it averages 512 tokens' values) has `far` near 0 and decides every token alone. Coherent objects
need `far` well above 0 at high noise, where the layout is chosen.

`attention_profile` looks at the self-attention itself, per layer and head, on the same noised renders: the
entropy of each query's weights (uniform over 512 tokens: 6.24 nats), the spread (std over keys) of its
logits, and `local`, the weight on the query's 3 x 3 x 3 token neighbourhood divided by what uniform attention
puts there (1.0: no preference for neighbours; above 1: local).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.harness import markdown_table, publish
from models.shapes import encode_prompts, encode_video, sample_prompts
from models.shapes.pretrained import load_shapes_model
from models.shapes.render import render_batch
from models.wan.transformer import WanTransformer
from vidaccel.attention import dense_attention
from vidaccel.checks import int_arg

NOISE_LEVELS = (0.9, 0.7, 0.5, 0.2)
BOX = (4, 12)          # latent rows/cols kept (of 16): 4 x 4 tokens of the 8 x 8 grid
CENTRE = (6, 10)       # latent rows/cols whose velocity is compared: the 2 x 2 centre tokens


def coupling(model: WanTransformer, prompts: list[str], seed: int = 0, levels=NOISE_LEVELS) -> list[dict]:
    """Per noise level: the relative change of the centre's velocity when the noise outside (`far`) or inside
    (`own`) the box is redrawn, over `prompts` (conditional, no CFG)."""
    n = len(prompts)
    x0 = jnp.asarray(encode_video(render_batch(prompts, num_frames=16, seeds=np.arange(n) + seed)))
    ctx = jnp.asarray(encode_prompts(prompts))
    inside = np.zeros(x0.shape[1:4], bool)
    inside[:, BOX[0]:BOX[1], BOX[0]:BOX[1]] = True
    inside = jnp.asarray(inside)[None, ..., None]
    centre = (slice(None), slice(None), slice(*CENTRE), slice(*CENTRE))
    rng = np.random.default_rng(seed)
    rows = []
    for s in levels:
        eps, other = (jnp.asarray(rng.standard_normal(x0.shape), jnp.float32) for _ in range(2))
        t = jnp.full((n,), s * 1000.0)

        def centre_velocity(noise, s=s, t=t):
            return model((1 - s) * x0 + s * noise, t, ctx)[centre]

        v = centre_velocity(eps)
        scale = float(jnp.linalg.norm(v))
        far = float(jnp.linalg.norm(centre_velocity(jnp.where(inside, eps, other)) - v)) / scale
        own = float(jnp.linalg.norm(centre_velocity(jnp.where(inside, other, eps)) - v)) / scale
        rows.append({"noise": s, "far": round(far, 4), "own": round(own, 4)})
    return rows


def _noised_renders(prompts: list[str], seed: int, s: float):
    n = len(prompts)
    x0 = jnp.asarray(encode_video(render_batch(prompts, num_frames=16, seeds=np.arange(n) + seed)))
    eps = jnp.asarray(np.random.default_rng(seed).standard_normal(x0.shape), jnp.float32)
    return (1 - s) * x0 + s * eps, jnp.full((n,), s * 1000.0), jnp.asarray(encode_prompts(prompts))


def attention_profile(model: WanTransformer, prompts: list[str], seed: int = 0, levels=NOISE_LEVELS) -> list[dict]:
    """Per noise level and layer: each head's mean query entropy, logit spread and local weight ratio."""
    rows = []
    for s in levels:
        emb = model.embed(*_noised_renders(prompts, seed, s))
        pos = np.stack(np.meshgrid(*(np.arange(g) for g in emb.grid), indexing="ij"), -1).reshape(-1, 3)
        near = jnp.asarray((np.abs(pos[:, None] - pos[None]) <= 1).all(-1), jnp.float32)     # (N, N)
        uniform_share = near.sum(-1) / near.shape[0]                                          # (N,)

        def stats(q, k, v, info, _, near=near, uniform_share=uniform_share):
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
            w = jax.nn.softmax(logits, -1)
            entropy = -(w * jnp.log(jnp.maximum(w, 1e-30))).sum(-1).mean((0, 2))
            local = ((w * near).sum(-1) / uniform_share).mean((0, 2))
            return dense_attention(q, k, v, info, None)[0], jnp.stack([entropy, logits.std(-1).mean((0, 2)), local], -1)

        heads = model.cfg.num_attention_heads
        _, st = model.blocks(emb, attention=stats, layer_state=jnp.zeros((model.cfg.num_layers, heads, 3)))
        for layer, per_head in enumerate(np.asarray(st)):
            rows.append({"noise": s, "layer": layer, "entropy": [round(float(x), 3) for x in per_head[:, 0]],
                         "logit_std": [round(float(x), 3) for x in per_head[:, 1]],
                         "local": [round(float(x), 3) for x in per_head[:, 2]]})
    return rows


def report_markdown(res: dict) -> str:
    lines = [f"Token coupling of t2v shapes models (`python -m experiments.shapes_coupling`): {res['n']} "
             "training-split prompts, ground truth noised to level s; relative change of the 2 x 2 centre tokens' "
             "velocity when the noise outside (far) / inside (own) the centre 4 x 4-token box is redrawn, all "
             "frames.", ""]
    rows = [{"model": name, **r} for name, entry in res["models"].items() for r in entry]
    lines.append(markdown_table(rows, {c: c for c in ("model", "noise", "far", "own")}))
    lines += ["", "Self-attention per layer (one value per head): query entropy in nats (uniform: "
              f"{math.log(512):.2f}), logit std over keys, and weight on the 3 x 3 x 3 token neighbourhood relative "
              "to uniform attention (1.0 = no locality).", ""]
    rows = [{"model": name, **r} for name, entry in res.get("attention", {}).items() for r in entry]
    lines.append(markdown_table(rows, {"model": "model", "noise": "noise", "layer": "layer",
                                       **{c: (lambda r, c=c: " / ".join(f"{x:.2f}" for x in r[c]))
                                          for c in ("entropy", "logit_std", "local")}}))
    return "\n".join(lines) + "\n"


def checkpoint_spec(spec: str) -> tuple[str, Path | None]:
    """`--checkpoint NAME=PATH` -> (NAME, PATH) (argparse type of the shapes diagnostics)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--checkpoint {spec!r}: expected NAME=PATH (an exported t2v folder)")
    return name, Path(path)


def add_checkpoint_option(p: argparse.ArgumentParser) -> None:
    """`--checkpoint NAME=PATH`, repeatable: exported t2v models measured beside the committed one."""
    p.add_argument("--checkpoint", type=checkpoint_spec, action="append", default=[],
                   help="NAME=PATH of an exported t2v folder, repeatable (the committed model is always measured)")


def models_to_measure(args: argparse.Namespace) -> dict[str, Path | None]:
    """The committed t2v model (path None) and every `--checkpoint`, by name."""
    return {"committed t2v": None, **dict(args.checkpoint)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.shapes_coupling", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8, help="training-split prompts (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    add_checkpoint_option(p)
    p.add_argument("--out", type=Path, default=Path("results/shapes/coupling.json"))
    a = p.parse_args(argv)
    try:
        int_arg("--n", a.n, minimum=1)
    except ValueError as err:
        p.error(str(err))
    prompts = sample_prompts(a.n, a.seed, "train")
    models = models_to_measure(a)
    res = {"n": a.n, "seed": a.seed, "checkpoints": {k: None if v is None else str(v) for k, v in models.items()},
           "models": {}, "attention": {}}
    for name, path in models.items():
        model = load_shapes_model("t2v", path=path)
        res["models"][name] = coupling(model, prompts, a.seed)
        res["attention"][name] = attention_profile(model, prompts, a.seed, levels=(0.9, 0.5))
    publish(a.out, res, report_markdown(res))


if __name__ == "__main__":
    main()
