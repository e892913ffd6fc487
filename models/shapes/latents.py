"""The shapes world's stand-ins for Wan's VAE and umT5: an exactly invertible video<->latent map, and a
fixed prompt encoder.

Latent map (replaces the VAE): 2x temporal and 2x2 spatial space-to-depth, then a fixed per-channel affine
normalisation. A video (..., 16, 32, 32, 3) becomes latents (..., 8, 16, 16, 24) in the channels-last
layout `(B, F, H, W, C)`; a DiT with patch (1, 2, 2) sees 8 x 8 tokens per latent frame. Latent channel
``c = ((dt * 2 + dy) * 2 + dx) * 3 + rgb`` holds colour `rgb` of pixel (2f + dt, 2i + dy, 2j + dx), as
``(value / 255 - MEAN[rgb]) / STD[rgb]``. Unlike Wan's VAE (4x temporal, 8x8 spatial, the first frame
alone) it groups every 2 frames and is exactly invertible. The functions accept numpy arrays (and return
numpy) or JAX arrays (and return JAX arrays, usable under `jit`).

Prompt encoder (replaces umT5): each content word has a fixed random vector (seeded by a hash of the
word), plus a sinusoidal position signal; function words ("a", "moving", "and", "on", "background") are
skipped, and the sequence is zero-padded to `text_len` like umT5 outputs.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from models.shapes.prompts import FUNCTION_WORDS, VOCABULARY, sample_prompts
from models.shapes.render import VIDEO_FRAMES, VIDEO_SIZE, render

TEMPORAL_GROUP = 2
SPATIAL_GROUP = 2
LATENT_FRAMES = VIDEO_FRAMES // TEMPORAL_GROUP  # 8
LATENT_SIZE = VIDEO_SIZE // SPATIAL_GROUP  # 16
LATENT_CHANNELS = 3 * TEMPORAL_GROUP * SPATIAL_GROUP**2  # 24
# Per-RGB mean and std of pixel values in [0, 1] over training renders, rounded from
# `measure_pixel_stats(4096, seed=7)` (tests check they give latents of ~zero mean / unit std).
PIXEL_MEAN = np.array([0.399, 0.406, 0.463], np.float32)
PIXEL_STD = np.array([0.383, 0.369, 0.345], np.float32)
TEXT_LEN = 16
TEXT_DIM = 32
# Position signal amplitude relative to word vectors (whose entries are standard normal).
POSITION_SCALE = 1.0


def _xp(x):
    if isinstance(x, np.ndarray):
        return np
    if isinstance(x, jax.Array):
        return jnp
    raise TypeError(f"expected a numpy or JAX array, got {type(x).__name__}")


def _channel_stats(xp):
    reps = TEMPORAL_GROUP * SPATIAL_GROUP**2
    return xp.asarray(np.tile(PIXEL_MEAN, reps)), xp.asarray(np.tile(PIXEL_STD, reps))


def encode_video(video) -> np.ndarray:
    """Videos (..., T, H, W, 3) -> latents (..., T/2, H/2, W/2, 24) float32.

    uint8 videos are read as value / 255; float videos are taken as already in [0, 1] (not clipped).
    """
    xp = _xp(video)
    if video.ndim < 4 or video.shape[-1] != 3:
        raise ValueError(f"encode_video: video shape {tuple(video.shape)} is invalid; expected (..., T, H, W, 3)")
    *lead, t, h, w, _ = video.shape
    if t % TEMPORAL_GROUP or h % SPATIAL_GROUP or w % SPATIAL_GROUP or t == 0 or h == 0 or w == 0:
        raise ValueError(f"encode_video: video shape {tuple(video.shape)} is invalid; T must be a positive multiple "
                         f"of {TEMPORAL_GROUP} and H, W positive multiples of {SPATIAL_GROUP}")
    if video.dtype == np.uint8:
        x = video.astype(xp.float32) / 255.0
    elif xp.issubdtype(video.dtype, xp.floating):
        x = video.astype(xp.float32)
    else:
        raise TypeError(f"encode_video: dtype {video.dtype} is invalid; expected uint8 or a float dtype in [0, 1]")
    g, s = TEMPORAL_GROUP, SPATIAL_GROUP
    n = len(lead)
    x = x.reshape(*lead, t // g, g, h // s, s, w // s, s, 3)
    # (..., F, dt, I, dy, J, dx, rgb) -> (..., F, I, J, dt, dy, dx, rgb)
    x = x.transpose(*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5, n + 6)
    x = x.reshape(*lead, t // g, h // s, w // s, LATENT_CHANNELS)
    mean, std = _channel_stats(xp)
    return (x - mean) / std


def decode_latents(latents, *, uint8: bool = False):
    """Latents (..., F, H, W, 24) -> videos (..., 2F, 2H, 2W, 3).

    Returns float32 pixels on the [0, 1] scale, NOT clipped (a model may leave the range); with
    `uint8=True` they are clipped to [0, 1] and rounded to uint8 (`to_uint8`), the only place values are
    clipped. ``decode_latents(encode_video(v), uint8=True) == v`` exactly for uint8 videos.
    """
    xp = _xp(latents)
    if latents.ndim < 4 or latents.shape[-1] != LATENT_CHANNELS:
        raise ValueError(f"decode_latents: latents shape {tuple(latents.shape)} is invalid; expected "
                         f"(..., F, H, W, {LATENT_CHANNELS})")
    if not xp.issubdtype(latents.dtype, xp.floating):
        raise TypeError(f"decode_latents: dtype {latents.dtype} is invalid; expected a float dtype")
    *lead, f, h, w, _ = latents.shape
    mean, std = _channel_stats(xp)
    x = latents.astype(xp.float32) * std + mean
    g, s = TEMPORAL_GROUP, SPATIAL_GROUP
    n = len(lead)
    x = x.reshape(*lead, f, h, w, g, s, s, 3)
    # (..., F, I, J, dt, dy, dx, rgb) -> (..., F, dt, I, dy, J, dx, rgb)
    x = x.transpose(*range(n), n, n + 3, n + 1, n + 4, n + 2, n + 5, n + 6)
    x = x.reshape(*lead, f * g, h * s, w * s, 3)
    return to_uint8(x) if uint8 else x


def to_uint8(video):
    """Float pixels in [0, 1] -> uint8: clipped to [0, 1], scaled by 255 and rounded (half to even)."""
    xp = _xp(video)
    return xp.round(xp.clip(video, 0.0, 1.0) * 255.0).astype(xp.uint8)


def measure_pixel_stats(num_videos: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-RGB mean and std of pixels in [0, 1] over `num_videos` training renders (what PIXEL_MEAN/STD hold)."""
    prompts = sample_prompts(num_videos, seed, "train")
    x = np.stack([render(p, seed=seed * 100_003 + i) for i, p in enumerate(prompts)]).astype(np.float64) / 255.0
    x = x.reshape(-1, 3)
    return x.mean(0), x.std(0)


def _word_vector(word: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(f"vidaccel.shapes.word:{word}".encode()).digest()[:8], "big")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def _position_signal(length: int, dim: int) -> np.ndarray:
    """Transformer sinusoids: entry (i, 2k) = sin(i / 10000^(2k/dim)), (i, 2k+1) = cos(...)."""
    half = (dim + 1) // 2
    freq = 1.0 / 10000.0 ** (2.0 * np.arange(half) / dim)
    ang = np.arange(length)[:, None] * freq[None, :]
    pe = np.stack([np.sin(ang), np.cos(ang)], axis=-1).reshape(length, 2 * half)[:, :dim]
    return (POSITION_SCALE * pe).astype(np.float32)


def prompt_tokens(prompt: str) -> list[str]:
    """The content words of a prompt, in order (lower-cased; function words dropped)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt_tokens expects a str, got {type(prompt).__name__}: {prompt!r}")
    words = prompt.lower().split()
    unknown = sorted({w for w in words if w not in VOCABULARY and w not in FUNCTION_WORDS})
    if unknown:
        raise ValueError(f"prompt {prompt!r} has words outside the shapes vocabulary: {unknown}; allowed: "
                         f"{list(VOCABULARY)} and function words {list(FUNCTION_WORDS)}")
    return [w for w in words if w not in FUNCTION_WORDS]


def encode_prompts(prompts: list[str], *, text_len: int = TEXT_LEN, text_dim: int = TEXT_DIM) -> np.ndarray:
    """Prompts -> text embeddings (B, text_len, text_dim) float32, zero-padded after the last word.

    Token i is ``word_vector(word_i) + POSITION_SCALE * sinusoid(i)``. The empty prompt (the CFG
    unconditional branch) is all zeros. A prompt with more than `text_len` content words is an error (never
    truncated); the longest grammar prompt (3 objects) has exactly 16.
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"encode_prompts expects a list of str, got {type(prompts).__name__}: {prompts!r}")
    for name, v in (("text_len", text_len), ("text_dim", text_dim)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"encode_prompts: {name}={v!r} is invalid; allowed: an int >= 1")
    out = np.zeros((len(prompts), text_len, text_dim), np.float32)
    pe = _position_signal(text_len, text_dim)
    for b, prompt in enumerate(prompts):
        tokens = prompt_tokens(prompt)
        if len(tokens) > text_len:
            raise ValueError(f"encode_prompts: prompt {prompt!r} has {len(tokens)} content words, more than "
                             f"text_len={text_len}; raise text_len")
        for i, w in enumerate(tokens):
            out[b, i] = _word_vector(w, text_dim) + pe[i]
    return out
