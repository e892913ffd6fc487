"""The Wan2.1 causal 3D VAE in Flax NNX, numerically equal to diffusers' `AutoencoderKLWan`.

Layout: video (B, F, H, W, 3) in [-1, 1], channels-last; latents (B, F', H/8, W/8, z_dim), F' = 1 + (F-1)/4.

Causality and chunking. Every 3x3x3 convolution pads time on the left only, so frame t sees frames <= t. As in
diffusers, encoding runs the first frame alone and then chunks of 4 frames, and decoding runs one latent frame at a
time; each causal convolution carries the last 2 frames of its input from chunk to chunk. Here that carry is an
explicit pytree, a dict from the convolution's diffusers module path to an array:

    moments, cache = vae.encode_chunk(video[:, :1], None)       # first chunk: starts the cache
    moments, cache = vae.encode_chunk(video[:, 1:5], cache)     # later chunks: same cache shapes every time

A missing cache (None) means "first chunk": causal convolutions see zeros before the clip, the temporal
downsampler passes its single frame through (and remembers it), the temporal upsampler passes its frame through
un-doubled. After the first chunk every cache has a fixed shape, so `encode` / `decode` run the first chunk and
then one `lax.scan` over the rest (two jits: the first chunk's compiles once per batch and frame size, whatever
the clip length): memory holds a chunk's activations and the output, not the clip's activations.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.wan_vae.config import FRAME_CHUNK, WanVAEConfig

F32 = jnp.float32
CACHE_T = 2  # frames of history a kernel-3 causal convolution needs
Cache = dict[str, jax.Array]


def _get(cache: Cache | None, key: str) -> jax.Array | None:
    return None if cache is None else cache[key]


def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, strides=(1, 1, 1), padding=((0, 0), (0, 0), (0, 0))):
    """3D convolution on channels-last (B, T, H, W, C) with a (kt, kh, kw, I, O) kernel."""
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), strides, padding,
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + bias.astype(x.dtype)


class Conv(nnx.Module):
    """Kernel (kt, kh, kw, I, O) or, for per-frame 2D convolutions, (kh, kw, I, O); and a bias (O,)."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, ...], dtype, rngs: nnx.Rngs):
        fan_in = cin * math.prod(kernel)  # LeCun normal (not truncated: XLA:CPU compiles that very slowly)
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (*kernel, cin, cout), dtype) / math.sqrt(fan_in))
        self.bias = nnx.Param(jnp.zeros((cout,), dtype))

    def kernel3d(self) -> jax.Array:
        k = self.kernel[...]
        return k if k.ndim == 5 else k[None]


class CausalConv3d(Conv):
    """A kernel-(kt, k, k) convolution, time padded on the left only (by the cache, or zeros on the first chunk),
    space padded by `pad` on both sides. kt is 3 or 1; kt == 1 needs no cache."""

    def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), pad: int = 1, *, path: str, dtype, rngs: nnx.Rngs):
        super().__init__(cin, cout, kernel, dtype, rngs)
        self.kt, self.pad, self.path = kernel[0], pad, path

    def __call__(self, x: jax.Array, cache: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """(output, the last kt - 1 input frames with history: the next chunk's cache; None when kt == 1)."""
        p = self.pad
        pad = ((0, 0), (p, p), (p, p))
        if self.kt == 1:
            return _conv(x, self.kernel3d(), self.bias[...], padding=pad), None
        hist = self.kt - 1
        if cache is None:
            cache = jnp.zeros((x.shape[0], hist, *x.shape[2:]), x.dtype)
        x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        return _conv(x, self.kernel3d(), self.bias[...], padding=pad), x[:, -hist:]


class RMSNorm(nnx.Module):
    """diffusers' WanRMS_norm: x / max(||x||_2 over channels, 1e-12) * sqrt(dim) * gamma (normalised in fp32;
    Wan2.1 uses no bias)."""

    def __init__(self, dim: int, dtype):
        self.gamma = nnx.Param(jnp.ones((dim,), dtype))
        self.scale = math.sqrt(dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(F32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        y = (xf / jnp.maximum(norm, 1e-12)).astype(x.dtype)
        return y * self.scale * self.gamma[...].astype(x.dtype)


class ResidualBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, path: str, dtype, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cin, dtype)
        self.conv1 = CausalConv3d(cin, cout, path=f"{path}.conv1", dtype=dtype, rngs=rngs)
        self.norm2 = RMSNorm(cout, dtype)
        self.conv2 = CausalConv3d(cout, cout, path=f"{path}.conv2", dtype=dtype, rngs=rngs)
        self.conv_shortcut = (CausalConv3d(cin, cout, (1, 1, 1), 0, path=f"{path}.conv_shortcut", dtype=dtype,
                                           rngs=rngs) if cin != cout else None)

    def __call__(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)[0]
        y, c1 = self.conv1(jax.nn.silu(self.norm1(x)), _get(cache, self.conv1.path))
        y, c2 = self.conv2(jax.nn.silu(self.norm2(y)), _get(cache, self.conv2.path))
        return y + h, {self.conv1.path: c1, self.conv2.path: c2}


class AttentionBlock(nnx.Module):
    """Single-head self-attention within each frame over its H*W positions, with a residual."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, dtype)
        self.to_qkv = Conv(dim, 3 * dim, (1, 1), dtype, rngs)
        self.proj = Conv(dim, dim, (1, 1), dtype, rngs)

    def __call__(self, x: jax.Array, cache: Cache | None = None) -> tuple[jax.Array, Cache]:
        b, t, h, w, c = x.shape
        y = self.norm(x).reshape(b * t, h * w, c)
        qkv = y @ self.to_qkv.kernel[0, 0].astype(x.dtype) + self.to_qkv.bias[...].astype(x.dtype)
        q, k, v = jnp.split(qkv[:, :, None, :], 3, axis=-1)
        y = jax.nn.dot_product_attention(q, k, v)[:, :, 0]
        y = y @ self.proj.kernel[0, 0].astype(x.dtype) + self.proj.bias[...].astype(x.dtype)
        return x + y.reshape(b, t, h, w, c), {}


class Resample(nnx.Module):
    """Spatial (and, in the '3d' modes, temporal) down- or upsampling by 2.

    downsample: pad right/bottom by 1, 3x3 stride-2 conv per frame; '3d' then a kernel-3 stride-2 time conv over
    [last frame of the previous chunk, this chunk] (the first chunk passes through). upsample: '3d' first doubles
    time with a causal kernel-3 conv to 2*dim channels, read as (frame 2t, frame 2t+1) (the first chunk passes
    through); then nearest 2x in space and a 3x3 conv to `out_dim` channels.
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str, out_dim: int | None = None, *, path: str, dtype, rngs: nnx.Rngs):
        if mode not in self.MODES:
            raise ValueError(f"Resample mode={mode!r}: allowed are {self.MODES}")
        self.mode, self.path = mode, path
        out_dim = dim if mode.startswith("down") else (out_dim or dim // 2)
        self.resample = Conv(dim, out_dim, (3, 3), dtype, rngs)
        if mode == "downsample3d":
            self.time_conv = Conv(dim, dim, (3, 1, 1), dtype, rngs)
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), 0, path=f"{path}.time_conv", dtype=dtype,
                                          rngs=rngs)
        else:
            self.time_conv = None

    def __call__(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
        new = {}
        key = f"{self.path}.time_conv"
        if self.mode == "upsample3d":
            if cache is None:
                new[key] = jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
            else:
                y, new[key] = self.time_conv(x, cache[key])
                b, t, h, w, c2 = y.shape
                x = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)
        if self.mode.startswith("up"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            x = _conv(x, self.resample.kernel3d(), self.resample.bias[...], padding=((0, 0), (1, 1), (1, 1)))
        else:
            x = _conv(x, self.resample.kernel3d(), self.resample.bias[...], strides=(1, 2, 2),
                      padding=((0, 0), (0, 1), (0, 1)))
        if self.mode == "downsample3d":
            last = x[:, -1:]
            if cache is not None:
                x = _conv(jnp.concatenate([cache[key].astype(x.dtype), x], axis=1), self.time_conv.kernel[...],
                          self.time_conv.bias[...], strides=(2, 1, 1))
            new[key] = last
        return x, new


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, path: str, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(dim, dim, path=f"{path}.resnets.{i}", dtype=dtype, rngs=rngs)
                                 for i in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
        x, new = self.resnets[0](x, cache)
        x = self.attentions[0](x)[0]
        x, c = self.resnets[1](x, cache)
        return x, {**new, **c}


class UpBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, n_res: int, mode: str | None, *, path: str, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(cin if i == 0 else cout, cout, path=f"{path}.resnets.{i}",
                                               dtype=dtype, rngs=rngs) for i in range(n_res)])
        self.upsamplers = nnx.List([] if mode is None else
                                   [Resample(cout, mode, path=f"{path}.upsamplers.0", dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
        new = {}
        for layer in [*self.resnets, *self.upsamplers]:
            x, c = layer(x, cache)
            new.update(c)
        return x, new


class Encoder(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, dtype, rngs: nnx.Rngs, path: str = "encoder"):
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], path=f"{path}.conv_in", dtype=dtype, rngs=rngs)
        blocks = []
        last = len(cfg.dim_mult) - 1
        for level, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, path=f"{path}.down_blocks.{len(blocks)}", dtype=dtype,
                                            rngs=rngs))
                cin = cout
            if level != last:
                mode = "downsample3d" if cfg.temperal_downsample[level] else "downsample2d"
                blocks.append(Resample(cout, mode, path=f"{path}.down_blocks.{len(blocks)}", dtype=dtype, rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], path=f"{path}.mid_block", dtype=dtype, rngs=rngs)
        self.norm_out = RMSNorm(dims[-1], dtype)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, path=f"{path}.conv_out", dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
        new = {}
        x, new[self.conv_in.path] = self.conv_in(x, _get(cache, self.conv_in.path))
        for layer in [*self.down_blocks, self.mid_block]:
            x, c = layer(x, cache)
            new.update(c)
        x, new[self.conv_out.path] = self.conv_out(jax.nn.silu(self.norm_out(x)), _get(cache, self.conv_out.path))
        return x, new


class Decoder(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, dtype, rngs: nnx.Rngs, path: str = "decoder"):
        mult = cfg.dim_mult
        dims = [cfg.decoder_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], path=f"{path}.conv_in", dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(dims[0], path=f"{path}.mid_block", dtype=dtype, rngs=rngs)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                cin //= 2  # the previous block's upsampler halved its channels
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if temporal_up[i] else "upsample2d"
            blocks.append(UpBlock(cin, cout, cfg.num_res_blocks + 1, mode, path=f"{path}.up_blocks.{i}", dtype=dtype,
                                  rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], dtype)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, path=f"{path}.conv_out", dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
        new = {}
        x, new[self.conv_in.path] = self.conv_in(x, _get(cache, self.conv_in.path))
        for layer in [self.mid_block, *self.up_blocks]:
            x, c = layer(x, cache)
            new.update(c)
        x, new[self.conv_out.path] = self.conv_out(jax.nn.silu(self.norm_out(x)), _get(cache, self.conv_out.path))
        return x, new


class WanVAE(nnx.Module):
    """diffusers' `AutoencoderKLWan` (Wan2.1): `encode(video) -> latent mean`, `decode(latents) -> video`.

    Parameter paths mirror diffusers' module names (`encoder.down_blocks.0.conv1.kernel` is
    `encoder.down_blocks.0.conv1.weight`), except that a Resample's spatial conv is `resample`, not `resample.1`.
    """

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = cfg.jnp_dtype
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), 0, path="quant_conv", dtype=dtype,
                                       rngs=rngs)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), 0, path="post_quant_conv", dtype=dtype,
                                            rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs)

    # --- one chunk, explicit cache -------------------------------------------------------------------------
    def encode_chunk(self, video: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
        """Frames of one chunk (the first frame alone, then 4 at a time) -> (moments (..., 2*z_dim), cache)."""
        x, cache = self.encoder(video.astype(self.cfg.jnp_dtype), cache)
        return self.quant_conv(x)[0], cache

    def decode_chunk(self, latents: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
        """One latent frame (B, 1, h, w, z_dim) -> (frames, unclipped; cache). The first call (cache None) gives
        1 frame, later ones `temporal_ratio` frames."""
        z = self.post_quant_conv(latents.astype(self.cfg.jnp_dtype))[0]
        return self.decoder(z, cache)

    # --- whole clips -----------------------------------------------------------------------------------------
    def encode_moments(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, logvar) of the latent posterior, each (B, F', H/r, W/r, z_dim); logvar clipped to [-30, 20]."""
        check_video(self.cfg, video)
        graphdef, state = nnx.split(self)
        return _encode_moments(graphdef, state, jnp.asarray(video))

    def encode(self, video: jax.Array) -> jax.Array:
        """Latent mean (B, 1 + (F-1)/4, H/8, W/8, z_dim) of a video (B, F, H, W, 3) in [-1, 1]."""
        return self.encode_moments(video)[0]

    def decode(self, latents: jax.Array) -> jax.Array:
        """Video (B, 1 + 4(F'-1), 8h, 8w, 3) clipped to [-1, 1], from (un-normalised) latents (B, F', h, w, z_dim)."""
        check_latents(self.cfg, latents)
        graphdef, state = nnx.split(self)
        return _decode(graphdef, state, jnp.asarray(latents))


def check_video(cfg: WanVAEConfig, video) -> None:
    shape = getattr(video, "shape", None)
    if shape is None or len(shape) != 5 or shape[-1] != cfg.in_channels:
        raise ValueError(f"video must be (batch, frames, height, width, {cfg.in_channels}) channels-last, "
                         f"got shape {shape}")
    b, f, h, w, _ = shape
    if not jnp.issubdtype(video.dtype, jnp.floating):
        raise ValueError(f"video must be a float array in [-1, 1], got dtype {video.dtype}")
    if b < 1:
        raise ValueError(f"video shape {shape} has an empty batch")
    if f < 1 or (f - 1) % FRAME_CHUNK:
        raise ValueError(f"video has {f} frames: the count must be 1 + {FRAME_CHUNK}k (1, 5, 9, ..., 81)")
    r = cfg.spatial_ratio
    if h < r or w < r or h % r or w % r:
        raise ValueError(f"video height x width = {h} x {w}: both must be positive multiples of {r} "
                         f"(the VAE's spatial downsampling)")


def check_latents(cfg: WanVAEConfig, latents) -> None:
    shape = getattr(latents, "shape", None)
    if shape is None or len(shape) != 5 or shape[-1] != cfg.z_dim:
        raise ValueError(f"latents must be (batch, latent_frames, h, w, {cfg.z_dim}) channels-last, got shape {shape}")
    if min(shape[:4]) < 1:
        raise ValueError(f"latents shape {shape} has an empty axis")
    if not jnp.issubdtype(latents.dtype, jnp.floating):
        raise ValueError(f"latents must be a float array, got dtype {latents.dtype}")


# Two jitted stages, so that the first chunk compiles once per (batch, height, width) whatever the clip length:
# `first` runs the first chunk and starts the cache; `rest` scans the remaining chunks and assembles the clip.
def _encode_first_fn(graphdef, state, frame):
    return nnx.merge(graphdef, state).encode_chunk(frame, None)


def _decode_first_fn(graphdef, state, latent):
    return nnx.merge(graphdef, state).decode_chunk(latent, None)


def _scan_rest(step, y0, cache, chunks):
    """lax.scan `step(chunk, cache) -> (y, cache)` over `chunks` (n, B, T, ...); [y0, ys...] joined on time."""
    def body(c, chunk):
        y, c = step(chunk, c)
        return c, y

    _, ys = jax.lax.scan(body, cache, chunks)
    n, b, t = ys.shape[:3]
    ys = jnp.moveaxis(ys, 0, 1).reshape(b, n * t, *ys.shape[3:])
    return jnp.concatenate([y0, ys], axis=1)


def _moments(moments):
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def _encode_rest_fn(graphdef, state, y0, cache, video_rest):
    """video_rest: (B, 4n, H, W, C) -> (mean, logvar) of the whole clip."""
    b, f = video_rest.shape[:2]
    chunks = jnp.moveaxis(video_rest.reshape(b, f // FRAME_CHUNK, FRAME_CHUNK, *video_rest.shape[2:]), 1, 0)
    return _moments(_scan_rest(nnx.merge(graphdef, state).encode_chunk, y0, cache, chunks))


def _decode_rest_fn(graphdef, state, y0, cache, latents_rest):
    """latents_rest: (B, n, h, w, z) -> the whole clip, clipped to [-1, 1]."""
    chunks = jnp.moveaxis(latents_rest, 1, 0)[:, :, None]  # (n, B, 1, h, w, z)
    return jnp.clip(_scan_rest(nnx.merge(graphdef, state).decode_chunk, y0, cache, chunks), -1.0, 1.0)


_encode_first = jax.jit(_encode_first_fn, static_argnums=0)
_encode_rest = jax.jit(_encode_rest_fn, static_argnums=0)
_decode_first = jax.jit(_decode_first_fn, static_argnums=0)
_decode_rest = jax.jit(_decode_rest_fn, static_argnums=0)


def _encode_moments(graphdef, state, video):
    y0, cache = _encode_first(graphdef, state, video[:, :1])
    if video.shape[1] == 1:
        return _moments(y0)
    return _encode_rest(graphdef, state, y0, cache, video[:, 1:])


def _decode(graphdef, state, latents):
    y0, cache = _decode_first(graphdef, state, latents[:, :1])
    if latents.shape[1] == 1:
        return jnp.clip(y0, -1.0, 1.0)
    return _decode_rest(graphdef, state, y0, cache, latents[:, 1:])


def decode_fn(graphdef, state, latents):
    """The whole decode as one pure function (graphdef, state, latents) -> video in [-1, 1]: the same two stages
    `WanVAE.decode` runs as two jits, here traced together (for `jax.jit(decode_fn, static_argnums=0).lower`)."""
    y0, cache = _decode_first_fn(graphdef, state, latents[:, :1])
    if latents.shape[1] == 1:
        return jnp.clip(y0, -1.0, 1.0)
    return _decode_rest_fn(graphdef, state, y0, cache, latents[:, 1:])


def sample_posterior(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * N(0, 1)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def _stats(cfg: WanVAEConfig, dtype):
    mean = jnp.asarray(cfg.latents_mean, F32).astype(dtype)
    inv_std = (1.0 / jnp.asarray(cfg.latents_std, F32)).astype(dtype)
    return mean, inv_std


def normalize_latents(latents: jax.Array, cfg: WanVAEConfig) -> jax.Array:
    """VAE latents -> the DiT's latent space: (latents - mean) * (1 / std), per channel (last axis)."""
    mean, inv_std = _stats(cfg, latents.dtype)
    return (latents - mean) * inv_std


def denormalize_latents(latents: jax.Array, cfg: WanVAEConfig) -> jax.Array:
    """The DiT's latents -> VAE latents, as diffusers' WanPipeline does before decoding:
    latents / (1 / std) + mean."""
    mean, inv_std = _stats(cfg, latents.dtype)
    return latents / inv_std + mean


def init_wan_vae(cfg: WanVAEConfig, seed: int = 0) -> WanVAE:
    """A randomly initialised VAE: normal(0, 1/fan_in) kernels, zero biases, unit gains.

    The noise comes from numpy in one draw: building the module eagerly, or under jit, makes XLA:CPU compile
    one random-number program per parameter shape (minutes on a small CPU)."""
    graphdef, state = nnx.split(abstract_wan_vae(cfg))
    flat = list(nnx.to_flat_state(state))
    rng = np.random.default_rng(seed)
    for path, var in flat:
        leaf = str(path[-1])
        if leaf == "kernel":
            fan_in = math.prod(var.shape[:-1])
            value = rng.standard_normal(var.shape, dtype=np.float32) / np.float32(math.sqrt(fan_in))
        else:
            value = np.full(var.shape, 1.0 if leaf == "gamma" else 0.0, np.float32)
        var.set_value(jnp.asarray(value, var.dtype))
    return nnx.merge(graphdef, state)


def abstract_wan_vae(cfg: WanVAEConfig) -> WanVAE:
    """The model with ShapeDtypeStruct leaves (no memory): for parameter counts, loaders, memory reports."""
    return nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))


def count_params(vae: WanVAE) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(vae, nnx.Param))))


def decode_memory_report(cfg: WanVAEConfig, *, batch: int = 1, latent_frames: int = 21, height: int = 60,
                         width: int = 104) -> dict:
    """Compile (without running) the jitted decode of `latent_frames` latent frames of `height` x `width` and
    return XLA's memory analysis in bytes: arguments, outputs, temporaries, generated code, and the sum."""
    graphdef, state = nnx.split(abstract_wan_vae(cfg))
    latents = jax.ShapeDtypeStruct((batch, latent_frames, height, width, cfg.z_dim), cfg.jnp_dtype)
    compiled = jax.jit(decode_fn, static_argnums=0).lower(graphdef, state, latents).compile()
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "generated_code",
                                                                 "alias")}
    out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out
