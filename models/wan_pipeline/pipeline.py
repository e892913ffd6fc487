"""From a prompt to video frames on a diffusers pipeline folder: umT5 -> Wan transformer -> Wan VAE, in JAX.

    pipe = load_pipeline("Wan2.1-T2V-1.3B-Diffusers")
    out = generate(pipe, "a cat walks on the grass", frames=81, height=480, width=832, steps=50, guidance=5.0)
    out.frames  # (1, 81, 480, 832, 3) uint8

The loop is the diffusers `WanPipeline`'s: prompts cleaned and encoded to 512 tokens (zeros past each prompt's
length), Gaussian latents (B, 1 + (F-1)/4, H/8, W/8, C), the folder's flow-matching scheduler with CFG (one
conditional and one unconditional call per step), then latents de-normalised with the VAE's statistics and
decoded. It runs through `vidaccel.sampling.sample`, so any method is one `denoiser` away (a `Denoiser` over the
transformer with the method applied, e.g. `teacache(wan_denoiser(pipe.transformer), cfg)`).

On a device mesh (`generate(..., mesh="fsdp=4,seq=2")`, `docs/parallel.md`) every part's weights are placed by
its rules (`UMT5_RULES`, `WAN_RULES`, `VAE_RULES`) and the denoising runs sequence-parallel
(`parallel_wan_denoiser`) through `sample(..., mesh=)` (T2V) or `df_sample(..., mesh=)` (DF, whole windows).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from models.ar.diffusion_forcing import df_sample, df_work
from models.ar.window import df_window_denoiser, has_df_state
from models.umt5 import UMT5Encoder, encode_prompts, load_tokenizer, load_umt5
from models.umt5.sharding import UMT5_RULES
from models.wan.denoiser import wan_denoiser
from models.wan.loader import load_transformer
from models.wan.sharding import WAN_RULES, parallel_wan_denoiser
from models.wan.transformer import WanTransformer, abstract_transformer
from models.wan_pipeline.folder import PipelineFolder, read_pipeline_folder
from models.wan_vae import WanVAE, denormalize_latents, load_wan_vae
from models.wan_vae.sharding import VAE_RULES
from vidaccel.checks import choice_arg, float_arg, int_arg
from vidaccel.parallel import SEQ_ATTENTION, as_mesh, check_shardable, shard_params
from vidaccel.sampling import sample
from vidaccel.solvers import euler, unipc
from vidaccel.transforms import Denoiser, DenoiseSpec, branch_states, total_work

log = logging.getLogger(__name__)
DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass
class Pipeline:
    """The loaded parts of a pipeline folder and its scheduler settings; `mesh`: the device mesh the parts'
    weights are placed on (set by `on_mesh`), None on one device."""

    folder: PipelineFolder
    tokenizer: Any
    text_encoder: UMT5Encoder
    transformer: WanTransformer
    vae: WanVAE
    dtype: str
    mesh: Mesh | None = None
    _built: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def kind(self) -> str:
        return self.folder.kind

    @functools.cached_property
    def dense_denoiser(self) -> Denoiser:
        """The dense (T2V) or vanilla (DF) denoiser, built once: the compiled sampler is keyed on the denoiser
        object, so repeated `generate` calls with the default reuse one compilation instead of recompiling.
        On a mesh `generate` runs `parallel_denoiser` instead."""
        return (df_window_denoiser if self.kind == "diffusion_forcing" else wan_denoiser)(self.transformer)

    def on_mesh(self, mesh: Mesh | str) -> Pipeline:
        """This pipeline with the text encoder's, transformer's and VAE's weights placed on `mesh` (a Mesh or a
        `make_mesh` spec over all devices) by `UMT5_RULES`, `WAN_RULES` and `VAE_RULES`. Made once per mesh and
        kept, so repeated `generate` calls reuse the placed weights and the compiled sampler."""
        mesh = as_mesh(mesh)
        if mesh == self.mesh:
            return self
        if ("mesh", mesh) not in self._built:
            self._built["mesh", mesh] = dataclasses.replace(
                self, text_encoder=_placed(self.text_encoder, mesh, UMT5_RULES),
                transformer=_placed(self.transformer, mesh, WAN_RULES), vae=_placed(self.vae, mesh, VAE_RULES),
                mesh=mesh)
        return self._built["mesh", mesh]

    def parallel_denoiser(self, attention: str = "ulysses") -> Denoiser:
        """The dense denoiser on this pipeline's mesh with "ulysses" or "ring" sequence-parallel self-attention
        (`parallel_wan_denoiser`; DF folders run it whole-window by `df_sample`), built once per attention."""
        if self.mesh is None:
            raise ValueError("parallel_denoiser needs the pipeline on a mesh: call pipe.on_mesh(mesh) first")
        choice_arg("attention", attention, tuple(SEQ_ATTENTION))
        if ("denoiser", attention) not in self._built:
            self._built["denoiser", attention] = parallel_wan_denoiser(self.transformer, self.mesh,
                                                                      attention=attention)
        return self._built["denoiser", attention]


def _placed(module: nnx.Module, mesh: Mesh, rules) -> nnx.Module:
    """A copy of `module` with its weights placed on `mesh` by `rules` (strict: every parameter named)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, shard_params(state, mesh, rules))


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
    transformer = load_transformer(folder.part("transformer"), dtype=dtype, cache_dir=cache_dir)
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
    frames = check_frames(pipe, frames)
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
    """The folder's scheduler as a vidaccel solver; `shift` overrides the folder's flow shift.

    For SkyReels-V2 DF folders UniPC reproduces the pipeline's in-place latent writes (`last_sample_aliasing`,
    see `vidaccel.solvers.unipc`), which change the corrector's input after uncorrected steps."""
    s = pipe.folder.scheduler
    shift = s.shift if shift is None else float_arg("shift", shift, low=0.0, low_open=True)
    if s.solver == "unipc":
        return unipc(steps, shift, solver_order=s.solver_order, num_train_timesteps=s.num_train_timesteps,
                     last_sample_aliasing=pipe.kind == "diffusion_forcing")
    return euler(steps, shift, num_train_timesteps=s.num_train_timesteps)


def with_causal_block_size(pipe: Pipeline, frames_per_block: int) -> Pipeline:
    """The pipeline with its transformer block-causal over `frames_per_block` latent frames (SkyReels-V2 DF's
    `causal_block_size`; 1 = bidirectional). The weights are shared, only the attention mask changes."""
    n = int_arg("causal_block_size", frames_per_block, 1)
    model = pipe.transformer
    if model.cfg.num_frame_per_block == n:
        return pipe
    graphdef, _ = nnx.split(abstract_transformer(dataclasses.replace(model.cfg, num_frame_per_block=n)))
    return dataclasses.replace(pipe, transformer=nnx.merge(graphdef, nnx.state(model)))


def latent_frames(pipe: Pipeline, frames: int) -> int:
    """Latent frames of a video of `frames` frames (the VAE's 4k+1 -> k+1)."""
    return 1 + (int(frames) - 1) // pipe.vae.cfg.temporal_ratio


def df_windows(pipe: Pipeline, frames: int, base_frames: int | None, overlap_history: int | None
               ) -> tuple[int | None, int | None]:
    """(window, overlap) in latent frames for a SkyReels-V2 DF video, as the pipeline derives them from its
    `base_num_frames` and `overlap_history` (video frames); (None, None) for one window over the whole video.

    The pipeline's last window may be shorter than the others; here every window has the same length, so the
    latent frame count must be window + k (window - overlap): a ValueError names the nearest such lengths."""
    total = latent_frames(pipe, frames)
    if base_frames is None or int_arg("base_frames", base_frames, 1) >= frames:
        if overlap_history is not None and base_frames is None:
            raise ValueError("overlap_history needs base_frames (the frames of one window)")
        return None, None
    if overlap_history is None:
        raise ValueError(f"frames={frames} exceeds base_frames={base_frames}: a long video needs overlap_history "
                         "(the frames each window takes over from the previous one; SkyReels-V2 uses 17 or 37)")
    window = latent_frames(pipe, check_frames(pipe, base_frames, "base_frames"))
    overlap = latent_frames(pipe, int_arg("overlap_history", overlap_history, 1))
    if overlap >= window:
        raise ValueError(f"overlap_history={overlap_history} ({overlap} latent frames) must be shorter than "
                         f"base_frames={base_frames} ({window} latent frames)")
    stride = window - overlap
    if (total - window) % stride:
        k = (total - window) // stride
        ok = [pipe.vae.cfg.video_frames(window + j * stride) for j in (k, k + 1)]
        raise ValueError(f"frames={frames} ({total} latent frames) does not split into windows of {window} latent "
                         f"frames overlapping by {overlap}; the nearest frame counts that do are {ok}")
    return window, overlap


def check_frames(pipe: Pipeline, frames: int, name: str = "frames") -> int:
    tr = pipe.vae.cfg.temporal_ratio
    frames = int_arg(name, frames, 1)
    if (frames - 1) % tr:
        lo = (frames - 1) // tr * tr + 1
        raise ValueError(f"{name}={frames}: the VAE takes {tr}k+1 frames (e.g. {lo} or {lo + tr})")
    return frames


def generate(pipe: Pipeline, prompt: str | list[str], negative_prompt: str | list[str] = "", *, frames: int = 81,
             height: int = 480, width: int = 832, steps: int = 50, guidance: float = 5.0,
             shift: float | None = None, seed: int = 0, latents: jax.Array | None = None,
             denoiser: Denoiser | None = None, execution: str = "window", ar_step: int = 0,
             base_frames: int | None = None, overlap_history: int | None = None, addnoise_condition: float = 0.0,
             output: str = "uint8", progress: bool = True, max_length: int = 512, mesh: Mesh | str | None = None,
             attention: str | None = None) -> GenerateOutput:
    """Generate videos for `prompt` (one or a list), as the diffusers Wan / SkyReels-V2 DF pipelines do.

    frames: 4k+1; height, width: multiples of 16. shift: the flow shift (default: the folder's scheduler).
    guidance: CFG scale (<= 1 turns CFG off). seed: for the initial latents (jax.random; `latents` gives them
    explicitly, (B, F', H/8, W/8, C) channels-last) and the DF prefix re-noising.
    denoiser: a Denoiser over `pipe.transformer` with a method applied (`experiments.generate.method_denoiser`
    builds one by name); None = dense (T2V) or vanilla (DF).
    SkyReels-V2 DF folders only (`pipe.kind == "diffusion_forcing"`), run by `models.ar.df_sample`: execution
    ('window': the whole window every row; 'chunks': per chunk against a K/V buffer, for FlowCache and
    MotionCache), ar_step (0 = synchronous), base_frames / overlap_history (video frames of a window and of
    the overlap of consecutive windows, for long videos), addnoise_condition (the prefix re-noising, 0 = off).
    The block size is the transformer's (`with_causal_block_size`).
    output: 'uint8' or 'float' ([0, 1]). progress: print each stage and a bar over the denoising steps.
    mesh: run on a device mesh (a Mesh or a spec like "fsdp=4,seq=2" over all devices): the parts' weights are
    placed by their rules (`Pipeline.on_mesh`), prompts encoded and latents decoded with them, the denoising
    run by `sample(..., mesh=)` (T2V; CFG-parallel when data=2) or `df_sample(..., mesh=)` (DF, whole-window
    execution only). attention: "ulysses" (default) or "ring", the sequence-parallel self-attention of the
    default denoiser; a given `denoiser` should be built over `pipe.on_mesh(mesh)` (e.g. by
    `experiments.generate.method_denoiser`), and one that cannot run sharded is refused by `check_shardable`.
    """
    choice_arg("output", output, ("uint8", "float"))
    choice_arg("execution", execution, ("window", "chunks"))
    ar_step = int_arg("ar_step", ar_step, 0)
    addnoise_condition = float_arg("addnoise_condition", addnoise_condition, low=0.0)
    df = pipe.kind == "diffusion_forcing"
    if not df and (ar_step or base_frames is not None or overlap_history is not None or addnoise_condition
                   or execution != "window"):
        raise ValueError("ar_step, base_frames, overlap_history, addnoise_condition and execution='chunks' are "
                         f"diffusion-forcing options; {pipe.folder.class_name} folders do not take them")
    if mesh is None and attention is not None:
        raise ValueError(f"attention={attention!r} chooses the sequence-parallel attention of a mesh run; pass "
                         "mesh= too (on one device the model's own attention runs)")
    if mesh is not None:
        pipe = pipe.on_mesh(mesh)
        attention = choice_arg("attention", "ulysses" if attention is None else attention, tuple(SEQ_ATTENTION))
        if execution == "chunks":
            raise ValueError("execution='chunks' (FlowCache, MotionCache) cannot run on a mesh through generate "
                             "yet (their denoisers are not built head-parallel here; models.ar.df_sample(..., "
                             "mesh=) runs them); on a mesh DF folders run whole windows (execution='window': "
                             "dense or teacache)")
    prompts = _prompt_list("prompt", prompt, None)
    negatives = _prompt_list("negative_prompt", negative_prompt, len(prompts))
    lat_shape = check_video_size(pipe, frames, height, width)
    window, overlap = df_windows(pipe, frames, base_frames, overlap_history) if df else (None, None)
    steps = int_arg("steps", steps, 1)
    guidance = float_arg("guidance", guidance)
    guided = guidance > 1.0
    solver = make_solver(pipe, steps, shift)
    shape = (len(prompts), *lat_shape, pipe.transformer.cfg.in_channels)
    key_latents, key_renoise = jax.random.split(jax.random.key(int_arg("seed", seed, 0)))
    if latents is None:
        latents = jax.random.normal(key_latents, shape, jnp.float32)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents have shape {tuple(latents.shape)}; {frames} frames at {height}x{width} for "
                         f"{len(prompts)} prompt(s) need {shape}")
    if denoiser is None:
        denoiser = pipe.dense_denoiser if pipe.mesh is None else pipe.parallel_denoiser(attention)
    elif not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be a Denoiser (or None for dense), got {type(denoiser).__name__}")
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
    bar = "denoising" if progress else False
    common = dict(solver=solver, guidance=guidance if guided else None, negative_context=neg, progress=bar)
    x0 = latents.astype(jnp.float32)
    params = None
    if pipe.mesh is not None:   # a no-op for a denoiser over pipe.on_mesh(mesh)'s transformer; places any other
        params = shard_params(denoiser.params, pipe.mesh, WAN_RULES)
    spec = DenoiseSpec(jax.ShapeDtypeStruct(x0.shape, x0.dtype), jax.ShapeDtypeStruct(cond.shape, cond.dtype), steps)
    if df:
        if pipe.mesh is not None:
            check_shardable(denoiser, spec)

        def run():
            return df_sample(denoiser, x0, cond, ar_step=ar_step, window_frames=window, overlap_frames=overlap,
                             addnoise_condition=addnoise_condition,
                             noise_key=key_renoise if addnoise_condition and overlap else None,
                             execution=execution, params=params, mesh=pipe.mesh, **common)
    else:
        def run():
            return sample(denoiser, params, x0, cond, mesh=pipe.mesh, **common)
    result = stage("denoise", run)
    video = stage("decode", lambda: decode(pipe, result.latents))
    frames_out = to_uint8(video) if output == "uint8" else np.asarray(video)
    # Counters summed over CFG branches (and a DF run's windows and chunks; attn_pairs: attended query-key pairs).
    work = {k: int(v) for k, v in df_work(result.state).items()} if df else total_work(result.state)
    if df and not any(has_df_state(s) for s in branch_states(result.state)):
        del work["attn_pairs"]      # a denoiser without DFState (the parallel one) does not count them
    return GenerateOutput(frames_out, result.latents, seconds, work)
