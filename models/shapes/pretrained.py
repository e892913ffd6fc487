"""The trained shapes models, loaded by name, and text-to-video generation with them.

    model = load_shapes_model("t2v")            # or "ar" (block-causal diffusion-forcing chunk model)
    out = generate_t2v(model, prompts, seed=0)   # UniPC 50 steps, CFG 5: latents, uint8 videos, seconds

The checkpoints under `models/shapes/checkpoints/<name>/` are written by `python -m models.shapes.train`
(EMA weights in the `save_converted` layout, plus `training.json` recording how they were trained).
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.shapes.latents import LATENT_CHANNELS, LATENT_FRAMES, LATENT_SIZE, decode_latents, encode_prompts
from models.shapes.prompts import check_prompts
from models.wan.denoiser import wan_denoiser
from models.wan.loader import restore_converted
from models.wan.transformer import WanTransformer
from vidaccel.sampling import sample
from vidaccel.solvers import unipc
from vidaccel.transforms import Denoiser

CHECKPOINT_ROOT = Path(__file__).parent / "checkpoints"
SHAPES_MODELS = ("t2v", "ar")
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0


def checkpoint_dir(name: str) -> Path:
    if name not in SHAPES_MODELS:
        raise ValueError(f"unknown shapes model {name!r}; known: {SHAPES_MODELS}")
    return CHECKPOINT_ROOT / name


def load_shapes_model(name: str, dtype: str | None = None, path: str | Path | None = None) -> WanTransformer:
    """The trained shapes model `name` ("t2v" or "ar") as a `WanTransformer` (EMA weights, float32 by default).

    `path` reads another export of the training script instead of the committed checkpoint (e.g. a run in
    progress).
    """
    path = checkpoint_dir(name) if path is None else Path(path)
    if not (path / "wan_config.json").exists():
        raise FileNotFoundError(f"no trained shapes model {name!r} at {path}; train it with "
                                f"`python -m models.shapes.train {name}`")
    return restore_converted(path, dtype)


def training_info(name: str, path: str | Path | None = None) -> dict:
    """What `training.json` records for model `name`: steps, train seconds, machine, hyperparameters."""
    path = (checkpoint_dir(name) if path is None else Path(path)) / "training.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; it is written by `python -m models.shapes.train {name}`")
    return json.loads(path.read_text())


def latent_noise(batch: int, seed: int, frames: int = LATENT_FRAMES) -> jax.Array:
    """Initial noise (B, frames, 16, 16, 24) for `seed`: prompt i of a batch gets the same noise at any batch size."""
    keys = jax.random.split(jax.random.key(seed), batch)
    shape = (frames, LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS)
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


@dataclass
class Generation:
    latents: np.ndarray      # (B, F, 16, 16, 24)
    videos: np.ndarray       # (B, 2F, 32, 32, 3) uint8
    seconds: float           # wall time of sampling (compile included on a first call)
    state: object            # the denoiser's final state (work counters, method state)


_DENSE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> its dense Denoiser


def dense_denoiser(model: WanTransformer) -> Denoiser:
    """The dense `Denoiser` of `model`, made once per model (and again only if its graph changes).

    `sample` jits with the Denoiser as a static argument hashed by identity, so a new one per call would
    compile the whole sampler again on every call.
    """
    if not isinstance(model, WanTransformer):
        raise TypeError(f"expected a WanTransformer or a Denoiser, got {type(model).__name__}")
    den = _DENSE.get(model)
    if den is None or den.graphdef != nnx.graphdef(model):
        den = _DENSE[model] = wan_denoiser(model)
    return den


def generate_t2v(model_or_denoiser, prompts: str | list[str], *, seed: int = 0, steps: int = DEFAULT_STEPS,
                 guidance: float | None = DEFAULT_GUIDANCE, solver=None, progress: bool | str = False,
                 params=None) -> Generation:
    """Sample videos for `prompts` with a text-to-video model or any `Denoiser` (UniPC `steps`, CFG `guidance`).

    `prompts`: one prompt str or a non-empty list, each in the shapes grammar (else a ValueError saying
    which and why). A model gets its cached `dense_denoiser`, run on the model's current parameters.
    """
    prompts = check_prompts(prompts)
    if isinstance(model_or_denoiser, Denoiser):
        den = model_or_denoiser
    else:
        den = dense_denoiser(model_or_denoiser)
        params = nnx.state(model_or_denoiser) if params is None else params
    ctx = jnp.asarray(encode_prompts(prompts))
    guided = guidance is not None and float(guidance) != 1.0
    t0 = time.perf_counter()
    out = sample(den, params, latent_noise(len(prompts), seed), ctx, solver=solver or unipc(steps),
                 guidance=guidance if guided else None, negative_context=jnp.zeros_like(ctx) if guided else None,
                 progress=progress)
    seconds = time.perf_counter() - t0
    latents = np.asarray(out.latents)
    return Generation(latents, decode_latents(latents, uint8=True), seconds, out.state)
