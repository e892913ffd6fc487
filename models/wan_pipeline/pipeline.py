"""From a prompt to video frames on a diffusers pipeline folder: umT5 -> Wan transformer -> Wan VAE, in JAX.

    pipe = load_pipeline("Wan2.1-T2V-1.3B-Diffusers")
    out = generate(pipe, "a cat walks on the grass", frames=81, height=480, width=832, steps=50, guidance=5.0)
    out.frames  # (1, 81, 480, 832, 3) uint8

The loop is the diffusers `WanPipeline`'s: prompts cleaned and encoded to 512 tokens (zeros past each prompt's
length), Gaussian latents (B, 1 + (F-1)/4, H/8, W/8, C), the folder's flow-matching scheduler with CFG (one
conditional and one unconditional call per step), then latents de-normalised with the VAE's statistics and
decoded. It runs through `vidaccel.sampling.sample`, so any method is one `transform` away: `transform` maps the
dense `Denoiser` to an accelerated one (e.g. `lambda den: teacache(den, cfg)`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.umt5 import UMT5Encoder, encode_prompts, load_tokenizer, load_umt5
from models.wan.denoiser import wan_denoiser
from models.wan.loader import load_transformer
from models.wan.transformer import WanTransformer
from models.wan_pipeline.folder import PipelineFolder, read_pipeline_folder
from models.wan_vae import WanVAE, denormalize_latents, load_wan_vae
from vidaccel.checks import choice_arg, float_arg, int_arg
from vidaccel.sampling import sample
from vidaccel.solvers import euler, unipc
from vidaccel.transforms import Denoiser, total_work

log = logging.getLogger(__name__)
DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass
class Pipeline:
    """The loaded parts of a pipeline folder and its scheduler settings."""

    folder: PipelineFolder
    tokenizer: Any
    text_encoder: UMT5Encoder
    transformer: WanTransformer
    vae: WanVAE
    dtype: str

    @property
    def kind(self) -> str:
        return self.folder.kind


@dataclasses.dataclass
class GenerateOutput:
    """frames: (B, F, H, W, 3) uint8, or float32 in [0, 1] with `output="float"`; latents: the final latents
    (B, F', H/8, W/8, C); seconds: wall time per stage; work: the denoiser's counters (per CFG branch summed)."""

    frames: np.ndarray
    latents: jax.Array
    seconds: dict[str, float]
    work: dict[str, int]


def load_pipeline(path: str | Path, dtype: str = "bfloat16", *, vae_dtype: str = "float32",
                  cache_dir: str | Path | None = None) -> Pipeline:
    """Load a Wan2.1 T2V or SkyReels-V2 DF pipeline folder made by diffusers' `save_pretrained`.

    dtype: text encoder and transformer weights ('bfloat16' default, or 'float32'). vae_dtype: the VAE's
    ('float32' default, as the diffusers examples keep it: bf16 decoding costs visible quality for little
    memory). cache_dir: an Orbax cache of the converted transformer (see `load_transformer`), so a second
    start skips the conversion. Mismatched parts (text width, latent channels) are one clear error.
    """
    choice_arg("dtype", dtype, DTYPES)
    choice_arg("vae_dtype", vae_dtype, DTYPES)
    folder = read_pipeline_folder(path)
    overrides = {}
    transformer = load_transformer(folder.part("transformer"), dtype=dtype, cache_dir=cache_dir, **overrides)
    text_encoder = load_umt5(folder.part("text_encoder"), dtype=dtype)
    vae = load_wan_vae(folder.part("vae"), dtype=vae_dtype)
    tokenizer = load_tokenizer(folder.part("tokenizer"))
    check_parts(folder.root, text_encoder, transformer, vae)
    return Pipeline(folder, tokenizer, text_encoder, transformer, vae, dtype)


def check_parts(root, text_encoder: UMT5Encoder, transformer: WanTransformer, vae: WanVAE) -> None:
    """One ValueError listing every dimension on which the loaded parts disagree."""
    t, v, e = transformer.cfg, vae.cfg, text_encoder.cfg
    problems = []
    if e.d_model != t.text_dim:
        problems.append(f"text_encoder d_model {e.d_model} != transformer text_dim {t.text_dim}")
    if v.z_dim != t.in_channels:
        problems.append(f"vae z_dim {v.z_dim} != transformer in_channels {t.in_channels}")
    if v.z_dim != t.out_channels:
        problems.append(f"vae z_dim {v.z_dim} != transformer out_channels {t.out_channels}")
    if problems:
        raise ValueError(f"{root}: the pipeline's parts do not fit together: " + "; ".join(problems))


def check_video_size(pipe: Pipeline, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent (frames, height, width) for a video size, or a ValueError saying what the VAE and patches allow."""
    tr = pipe.vae.cfg.temporal_ratio
    sr = pipe.vae.cfg.spatial_ratio
    frames = int_arg("frames", frames, 1)
    if (frames - 1) % tr:
        lo = (frames - 1) // tr * tr + 1
        raise ValueError(f"frames={frames}: the VAE takes {tr}k+1 frames (e.g. {lo} or {lo + tr})")
    multiple = sr * pipe.transformer.cfg.patch_size[1]
    for name, value in (("height", height), ("width", width)):
        value = int_arg(name, value, 1)
        if value % multiple:
            raise ValueError(f"{name}={value} must be a multiple of {multiple} (VAE {sr}x times the transformer's "
                             f"{pipe.transformer.cfg.patch_size[1]}x2 patches)")
    return 1 + (frames - 1) // tr, height // sr, width // sr


def encode_prompt(pipe: Pipeline, prompts: list[str], max_length: int = 512) -> jax.Array:
    """umT5 embeddings (B, max_length, D) in the transformer's dtype, zero past each prompt's length."""
    emb = encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, max_length=max_length)
    return emb.astype(pipe.transformer.cfg.dtype)


def decode(pipe: Pipeline, latents: jax.Array) -> jax.Array:
    """Sampled latents -> video in [0, 1], float32 (B, F, H, W, 3), as diffusers' `output_type="np"`."""
    video = pipe.vae.decode(denormalize_latents(latents.astype(jnp.float32), pipe.vae.cfg))
    return jnp.clip(video.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def to_uint8(frames) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded to the nearest level (diffusers' export truncates; rounding is unbiased)."""
    return np.asarray(jnp.round(jnp.clip(frames, 0.0, 1.0) * 255.0)).astype(np.uint8)


def _prompt_list(name: str, value, batch: int | None) -> list[str]:
    items = [value] if isinstance(value, str) else list(value) if value is not None else []
    if not items or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
    if batch is not None and len(items) != batch:
        if len(items) != 1:
            raise ValueError(f"{name} has {len(items)} entries; it needs 1 or one per prompt ({batch})")
        items = items * batch
    return items


def make_solver(pipe: Pipeline, steps: int, shift: float | None):
    """The folder's scheduler as a vidaccel solver; `shift` overrides the folder's flow shift."""
    s = pipe.folder.scheduler
    shift = s.shift if shift is None else float_arg("shift", shift, low=0.0, low_open=True)
    if s.solver == "unipc":
        return unipc(steps, shift, solver_order=s.solver_order, num_train_timesteps=s.num_train_timesteps)
    return euler(steps, shift, num_train_timesteps=s.num_train_timesteps)


def generate(pipe: Pipeline, prompt: str | list[str], negative_prompt: str | list[str] = "", *, frames: int = 81,
             height: int = 480, width: int = 832, steps: int = 50, guidance: float = 5.0,
             shift: float | None = None, seed: int = 0, latents: jax.Array | None = None,
             transform: Callable[[Denoiser], Denoiser] | None = None, output: str = "uint8",
             progress: bool = True, max_length: int = 512) -> GenerateOutput:
    """Generate videos for `prompt` (one or a list), as the diffusers Wan pipeline does.

    frames: 4k+1; height, width: multiples of 16. shift: the flow shift (default: the folder's scheduler).
    guidance: CFG scale (<= 1 turns CFG off). seed: for the initial latents (jax.random; `latents` gives them
    explicitly, (B, F', H/8, W/8, C) channels-last). transform: maps the dense Denoiser to a method's.
    output: 'uint8' or 'float' ([0, 1]). progress: print each stage and a bar over the denoising steps.
    """
    choice_arg("output", output, ("uint8", "float"))
    if pipe.kind != "t2v":
        raise ValueError(f"{pipe.folder.class_name} folders are not generated yet (diffusion forcing comes next); "
                         "this version generates with WanPipeline folders")
    prompts = _prompt_list("prompt", prompt, None)
    negatives = _prompt_list("negative_prompt", negative_prompt, len(prompts))
    lat_shape = check_video_size(pipe, frames, height, width)
    steps = int_arg("steps", steps, 1)
    guidance = float_arg("guidance", guidance)
    guided = guidance > 1.0
    solver = make_solver(pipe, steps, shift)
    shape = (len(prompts), *lat_shape, pipe.transformer.cfg.in_channels)
    if latents is None:
        latents = jax.random.normal(jax.random.key(int_arg("seed", seed, 0)), shape, jnp.float32)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents have shape {tuple(latents.shape)}; {frames} frames at {height}x{width} for "
                         f"{len(prompts)} prompt(s) need {shape}")
    seconds = {}

    def stage(name, fn):
        if progress:
            print(f"[vidaccel] {name} ...", flush=True)
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        seconds[name] = time.perf_counter() - t0
        if progress:
            print(f"[vidaccel] {name}: {seconds[name]:.2f} s", flush=True)
        return out

    context = stage("encode", lambda: encode_prompt(pipe, prompts + (negatives if guided else []), max_length))
    cond, neg = (context[:len(prompts)], context[len(prompts):]) if guided else (context, None)
    den = wan_denoiser(pipe.transformer)
    if transform is not None:
        den = transform(den)
        if not isinstance(den, Denoiser):
            raise TypeError(f"transform must return a Denoiser, got {type(den).__name__}")
    result = stage("denoise", lambda: sample(den, None, latents.astype(jnp.float32), cond, solver=solver,
                                             guidance=guidance if guided else None, negative_context=neg,
                                             progress="denoising" if progress else False))
    video = stage("decode", lambda: decode(pipe, result.latents))
    frames_out = to_uint8(video) if output == "uint8" else np.asarray(video)
    return GenerateOutput(frames_out, result.latents, seconds, total_work(result.state))
