"""Every preset of the embedded shapes-world models in one place: the sparse-attention settings for their
512-token sequence, HASTE and TeaCache as ready Denoisers with their calibrations, and the functions that
make those calibrations.

    den = shapes_haste(load_shapes_model("t2v"), "xattention")       # TMR + the packaged EBC table
    den = shapes_teacache(load_shapes_model("t2v"), "slow", steps=50)

Calibrations are package data in `CALIBRATION_DIR` (experiments/calibrations/), read from there only. They
are byte-identical copies of the files the result commands write under results/:
`python -m experiments.cache_table` -> results/caching/teacache_t2v.json and
`python -m experiments.haste calibrate --base B` -> results/sparse/ebc_B.json. After rerunning one, copy
the new file over the package copy (`--install` does it for the EBC command); tests/test_shapes_presets.py
fails while the two differ.

TeaCache thresholds only mean "compute this fraction of the calls" at the step count they were chosen for,
so `shapes_teacache` at another step count calibrates on the spot for that count (and says so).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp

from experiments.haste import EBCConfig, EBCTable, HasteConfig, TMRConfig, calibrate_ebc, haste, load_ebc_table
from experiments.svg2 import SVG2Config, svg2
from experiments.teacache import calibrate_teacache, teacache, teacache_config
from experiments.xattention import XAttentionConfig, xattention
from models.shapes import encode_prompts, sample_prompts
from models.shapes.pretrained import latent_noise, load_shapes_model, training_info
from models.wan.denoiser import wan_denoiser
from vidaccel.checks import choice_arg, int_arg
from vidaccel.residual_cache import choose_threshold
from vidaccel.solvers import unipc
from vidaccel.sparse_attention import Policy, sparse_attention
from vidaccel.transforms import Denoiser

CALIBRATION_DIR = Path(__file__).resolve().parent / "calibrations"
TEACACHE_FILE = "teacache_t2v.json"
TEACACHE_TARGETS = (("slow", 0.5), ("fast", 0.3))   # speed -> fraction of the calls computed
ON_THE_SPOT_PROMPTS = 2                              # prompts of a calibration made when none fits
SHAPES_BASES = ("xattention", "svg2")
CALIBRATED_METHODS = ("teacache", "haste-xattention", "haste-svg2")
SHAPES_TMR = TMRConfig(pool_block=32)        # 512 tokens -> 16 pooled blocks (Wan 720p: 591 blocks of 128)


# ------------------------------------------------------------------------------------------ sparse attention
def xattention_shapes(**overrides) -> XAttentionConfig:
    """XAttention on the shapes model (512 tokens = 8 frames x 64): block 16, stride 4; `overrides` win.

    Block 16 gives 32 blocks per row (4 per latent frame) so top-tau selection has room to act on a short
    sequence; stride 4 keeps 4 antidiagonal groups per block edge (the paper has 16 at 128 / 8).
    """
    return XAttentionConfig(**{"block_size": 16, "stride": 4, **overrides})


def svg2_shapes(**overrides) -> SVG2Config:
    """SVG2 on the shapes model (512 tokens): 16 query / 32 key clusters, tiles 32 / 16; `overrides` win.

    Average cluster sizes 32 (Q) and 16 (K) tokens, the same order of ratio as Wan 720p's 300 / 1000
    clusters (252 / 76 tokens); the kernel tiles follow the cluster sizes.
    """
    return SVG2Config(**{"num_q_clusters": 16, "num_k_clusters": 32, "block_q": 32, "block_k": 16, **overrides})


def shapes_base_policy(name: str, threshold: float | None = None, backend: str = "reference") -> Policy:
    """The shapes setting of a base method ("xattention" or "svg2") as a Policy, optionally at a shared
    threshold (XAttention's tau, SVG2's top_p). `backend` defaults to the jnp reference (masked dense), which
    EBC calibration uses."""
    choice_arg("base", name, SHAPES_BASES)
    if name == "xattention":
        kw = {} if threshold is None else {"threshold": threshold}
        return xattention(xattention_shapes(backend=backend, **kw))
    kw = {} if threshold is None else {"top_p": threshold}
    return svg2(svg2_shapes(backend=backend, **kw))


def ebc_file(base: str) -> Path:
    """The packaged EBC table of `base` on the shapes model."""
    return CALIBRATION_DIR / f"ebc_{choice_arg('base', base, SHAPES_BASES)}.json"


def shapes_haste(model, base: str = "xattention", *, ebc="default", tmr: TMRConfig | None = SHAPES_TMR,
                 backend: str = "auto") -> Denoiser:
    """HASTE on the shapes model as a Denoiser: the base's shapes setting, TMR (`tmr`, None = off) and EBC
    thresholds `ebc`: "default" = the packaged table `ebc_file(base)` (the shared threshold if it is missing),
    None = off, or an `EBCTable`, its path or a (layers, heads) table. `backend` "auto" is the Pallas kernel
    on GPU/TPU and the gather path on CPU."""
    if isinstance(ebc, str) and ebc == "default":
        ebc = ebc_file(base) if ebc_file(base).exists() else None
    policy = haste(shapes_base_policy(base, backend=backend), HasteConfig(tmr=tmr, thresholds=ebc))
    return sparse_attention(wan_denoiser(model), policy)


def calibrate_shapes_ebc(base: str, *, prompts: int = 4, steps: int = 50, cfg: EBCConfig | None = None,
                         seed: int = 1, model=None, log=print) -> EBCTable:
    """EBC on the shapes text-to-video model (`model`, default the committed one): `prompts` training-split
    prompts (disjoint from the held-out evaluation prompts), UniPC `steps`, CFG `cfg.guidance`, jnp
    reference attention; `cfg` None = `EBCConfig()`."""
    int_arg("prompts", prompts, minimum=1)
    cfg = EBCConfig() if cfg is None else cfg
    model = load_shapes_model("t2v") if model is None else model
    texts = sample_prompts(prompts, seed, "train")
    ctx = jnp.asarray(encode_prompts(texts))
    table = calibrate_ebc(model, shapes_base_policy(base), latent_noise(prompts, seed), ctx, jnp.zeros_like(ctx),
                          cfg, solver=unipc(steps), log=log)
    table.meta.update(base=base, prompts=texts, seed=seed, model_steps=training_info("t2v").get("steps"),
                      config=dataclasses.asdict(cfg))
    return table


# ------------------------------------------------------------------------------------------ TeaCache
def calibrate_shapes_teacache(model, *, num_prompts: int = 4, steps: int = 50, guidance: float = 5.0, seed: int = 0,
                              targets=TEACACHE_TARGETS, log=print) -> dict:
    """TeaCache for the shapes t2v model: fit the polynomial on `num_prompts` training-split prompts and choose
    each (speed, fraction) target's threshold (replayed on the recorded changes of the `steps`-step runs).

    Returns a JSON-ready dict: coefficients, max_change, thresholds, replayed fractions, fit error, and the
    `steps` and `guidance` the thresholds hold for.
    """
    int_arg("num_prompts", num_prompts, minimum=1)
    if int_arg("steps", steps, minimum=1) < 4:
        raise ValueError(f"steps={steps}: TeaCache calibration needs at least 4 sampler steps (its degree-4 "
                         "polynomial is fitted to the (steps - 1) changes of each CFG branch)")
    log(f"TeaCache: calibrating on {num_prompts} training prompts at {steps} steps, guidance {guidance}")
    prompts = sample_prompts(num_prompts, 1, "train")
    ctx = jnp.asarray(encode_prompts(prompts))
    cal = calibrate_teacache(wan_denoiser(model), latent_noise(num_prompts, seed + 1000), ctx, solver=unipc(steps),
                             indicator="e0", guidance=guidance, negative_context=jnp.zeros_like(ctx))
    th, frac = {}, {}
    for speed, target in targets:
        th[speed], frac[speed] = choose_threshold(teacache_config(1.0, cal.coefficients, max_change=cal.input_max),
                                                  cal.input_change, steps, target)
    return {"coefficients": list(cal.coefficients), "max_change": cal.input_max, "thresholds": th,
            "replayed_fractions": frac, "targets": dict(targets), "fit_relative_error": cal.fit_relative_error,
            "steps": steps, "guidance": guidance, "prompts": prompts}


def packaged_teacache() -> dict | None:
    """The packaged TeaCache calibration of the shapes t2v model (None when the file is missing)."""
    path = CALIBRATION_DIR / TEACACHE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def shapes_teacache(model, speed: str = "slow", *, steps: int = 50, calibration: dict | None = None,
                    log=print) -> Denoiser:
    """TeaCache on the shapes t2v model, for sampling with `steps` steps, at the `speed` threshold.

    `calibration` (a `calibrate_shapes_teacache` dict) must be for `steps` steps (ValueError otherwise). By
    default the packaged calibration is used when it is for `steps` steps; otherwise a new one is made on the
    spot on `ON_THE_SPOT_PROMPTS` prompts for `steps` steps, and a log line says so.
    """
    int_arg("steps", steps, minimum=2)
    if calibration is not None:
        if calibration.get("steps") != steps:
            raise ValueError(f"the TeaCache calibration was made for {calibration.get('steps')} steps, not "
                             f"steps={steps}: its thresholds hold only at its own step count; pass "
                             f"calibrate_shapes_teacache(model, steps={steps})")
    else:
        calibration = packaged_teacache()
        if calibration is None or calibration.get("steps") != steps:
            why = (f"no packaged {TEACACHE_FILE}" if calibration is None else
                   f"the packaged {TEACACHE_FILE} is for {calibration.get('steps')} steps")
            log(f"TeaCache: {why}; recalibrating on the spot for {steps} steps")
            calibration = calibrate_shapes_teacache(model, num_prompts=ON_THE_SPOT_PROMPTS, steps=steps, log=log)
    choice_arg("speed", speed, tuple(calibration["thresholds"]))
    cfg = teacache_config(calibration["thresholds"][speed], calibration["coefficients"],
                          max_change=calibration["max_change"])
    return teacache(wan_denoiser(model), cfg)


# ------------------------------------------------------------------------------------------ reports
def calibration_note(method: str, *, steps: int = 50, speed: str = "slow") -> str:
    """One line for reports saying which calibration a preset uses at `steps` sampler steps.

    method: "teacache" (`shapes_teacache(model, speed, steps=steps)`: the packaged file, or a calibration
    made on the spot for another step count), "haste-xattention" or "haste-svg2" (`shapes_haste`).
    """
    choice_arg("method", method, CALIBRATED_METHODS)
    if method == "teacache":
        cal = packaged_teacache()
        if cal is not None and cal.get("steps") == steps:
            return (f"TeaCache {speed}: coefficients and threshold from {TEACACHE_FILE} "
                    f"({cal['steps']}-step calibration, experiments.cache_table)")
        have = "none is packaged" if cal is None else f"{TEACACHE_FILE} is for {cal.get('steps')} steps"
        return (f"TeaCache {speed}: calibrated on the spot on {ON_THE_SPOT_PROMPTS} prompts for {steps} steps "
                f"({have})")
    base = method.split("-", 1)[1]
    name = {"xattention": "XAttention", "svg2": "SVG2"}[base]
    path = ebc_file(base)
    if not path.exists():
        return f"HASTE on {name}: temporal mask reuse, shared threshold (no packaged EBC table)"
    made_at = load_ebc_table(path).meta.get("num_steps")
    return (f"HASTE on {name}: temporal mask reuse + per-head thresholds from {path.name} "
            f"(EBC at {made_at} steps, python -m experiments.haste calibrate)")


__all__ = ["CALIBRATION_DIR", "TEACACHE_FILE", "TEACACHE_TARGETS", "ON_THE_SPOT_PROMPTS", "SHAPES_BASES",
           "CALIBRATED_METHODS", "SHAPES_TMR", "xattention_shapes", "svg2_shapes", "shapes_base_policy", "ebc_file",
           "shapes_haste", "calibrate_shapes_ebc", "calibrate_shapes_teacache", "packaged_teacache",
           "shapes_teacache", "calibration_note"]
