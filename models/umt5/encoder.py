"""The umT5 encoder in Flax NNX, numerically equal to transformers' `UMT5EncoderModel` (Wan2.1's text encoder).

Pre-norm blocks (T5 RMS norm -> self-attention with a per-layer bucketed relative position bias -> residual;
RMS norm -> gated tanh-GELU FFN -> residual), a final RMS norm. The layers are stacked on a leading axis and
run by one `lax.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.umt5.config import UMT5Config

F32 = jnp.float32


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) int32 bucket of key position minus query position, bidirectional as in the encoder.

    Half the buckets are for keys after the query; within each half, distances below a quarter of the
    buckets get one bucket each and longer ones share logarithmically wider buckets up to `max_distance`.
    Computed in float32 like transformers so that boundary distances land in the same bucket.
    """
    pos = np.arange(length, dtype=np.int64)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    exact = half // 2
    offset = np.where(rel > 0, half, 0)
    dist = np.abs(rel)
    with np.errstate(divide="ignore"):
        ratio = np.log(dist.astype(np.float32) / np.float32(exact)) / np.float32(math.log(max_distance / exact))
    ratio = (ratio * np.float32(half - exact)).astype(np.float32)
    large = exact + np.trunc(np.where(dist < exact, 0, ratio)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (offset + np.where(dist < exact, dist, large)).astype(np.int32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """T5 norm: scale by the fp32 root mean square (no mean subtraction, no bias), then by `weight`.

    The normalised value is cast to the weight's dtype before the product, as transformers does.
    """
    x32 = x.astype(F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return weight * y.astype(weight.dtype)


def _precision(cfg: UMT5Config):
    """fp32 models ask for true fp32 matmuls (GPUs would otherwise use TF32); bf16 ones take the default."""
    return jax.lax.Precision.HIGHEST if cfg.dtype == "float32" else None


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> nnx.Param:
    return nnx.Param((jax.random.normal(rngs.params(), shape, F32) * std).astype(dtype))


class UMT5Layer(nnx.Module):
    """One encoder block's parameters and forward; kernels are (in, out), i.e. torch's weight transposed."""

    def __init__(self, cfg: UMT5Config, rngs: nnx.Rngs):
        d, inner, dt = cfg.d_model, cfg.inner_dim, cfg.jnp_dtype
        self.attn_norm = nnx.Param(jnp.ones((d,), dt))
        self.q = _normal(rngs, (d, inner), (d * cfg.d_kv) ** -0.5, dt)
        self.k = _normal(rngs, (d, inner), d ** -0.5, dt)
        self.v = _normal(rngs, (d, inner), d ** -0.5, dt)
        self.o = _normal(rngs, (inner, d), inner ** -0.5, dt)
        self.relative_bias = _normal(rngs, (cfg.relative_attention_num_buckets, cfg.num_heads), d ** -0.5, dt)
        self.ffn_norm = nnx.Param(jnp.ones((d,), dt))
        self.wi_0 = _normal(rngs, (d, cfg.d_ff), d ** -0.5, dt)
        self.wi_1 = _normal(rngs, (d, cfg.d_ff), d ** -0.5, dt)
        self.wo = _normal(rngs, (cfg.d_ff, d), cfg.d_ff ** -0.5, dt)

    def __call__(self, x: jax.Array, buckets: jax.Array, key_mask: jax.Array, cfg: UMT5Config) -> jax.Array:
        """x: (B, L, D) fp32 residual stream; buckets: (L, L) int32; key_mask: (B, L) bool -> (B, L, D) fp32."""
        b, length, _ = x.shape
        heads, dkv, eps = cfg.num_heads, cfg.d_kv, cfg.layer_norm_epsilon
        h = rms_norm(x, self.attn_norm[...], eps)
        prec = _precision(cfg)
        q, k, v = (jnp.dot(h, w[...], precision=prec).reshape(b, length, heads, dkv) for w in (self.q, self.k, self.v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=F32, precision=prec)  # unscaled in umT5
        bias = self.relative_bias[...].astype(F32)[buckets]                          # (L, L, H)
        logits = logits + bias.transpose(2, 0, 1)[None]
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(F32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        att = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=prec).reshape(b, length, heads * dkv)
        x = x + jnp.dot(att, self.o[...], precision=prec).astype(F32)
        h = rms_norm(x, self.ffn_norm[...], eps)
        gated = (jax.nn.gelu(jnp.dot(h, self.wi_0[...], precision=prec), approximate=True)
                 * jnp.dot(h, self.wi_1[...], precision=prec))
        return x + jnp.dot(gated, self.wo[...], precision=prec, preferred_element_type=F32)


class UMT5Encoder(nnx.Module):
    """umT5 encoder: `encoder(input_ids (B, L) int, attention_mask (B, L)) -> (B, L, d_model)` in `cfg.dtype`.

    `attention_mask` is 1 (or True) for real tokens and 0 for padding; padded keys get no attention weight.
    Padded query positions still produce (meaningless) outputs, as in transformers; `encode_prompts` zeroes
    them the way the Wan pipeline does.
    """

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param((jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), F32))
                               .astype(cfg.jnp_dtype))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(r):
            return UMT5Layer(cfg, r)

        self.layers = make_layers(rngs)
        self.final_norm = nnx.Param(jnp.ones((cfg.d_model,), cfg.jnp_dtype))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        input_ids, key_mask = check_inputs(cfg, input_ids, attention_mask)
        length = input_ids.shape[1]
        buckets = jnp.asarray(relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                                        cfg.relative_attention_max_distance))
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(F32)
        graphdef, params = nnx.split(self.layers)

        def body(x, p):
            return nnx.merge(graphdef, p)(x, buckets, key_mask, cfg), None

        x, _ = jax.lax.scan(body, x, params)
        return rms_norm(x, self.final_norm[...], cfg.layer_norm_epsilon).astype(cfg.jnp_dtype)


def check_inputs(cfg: UMT5Config, input_ids, attention_mask) -> tuple[jax.Array, jax.Array]:
    """Validate shapes and dtypes (static, so also under jit); return int32 ids and a bool key mask."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (B, L) token ids with L >= 1; got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer token ids; got dtype {input_ids.dtype}")
    if attention_mask is None:
        return input_ids.astype(jnp.int32), jnp.ones(input_ids.shape, bool)
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {input_ids.shape}; got {attention_mask.shape}")
    if not (jnp.issubdtype(attention_mask.dtype, jnp.integer) or attention_mask.dtype == bool):
        raise ValueError(f"attention_mask must be 0/1 integers or booleans; got dtype {attention_mask.dtype}")
    return input_ids.astype(jnp.int32), attention_mask != 0


def init_umt5(cfg: UMT5Config, seed: int = 0) -> UMT5Encoder:
    """A randomly initialised encoder (transformers' init scales; norms at one)."""
    return UMT5Encoder(cfg, rngs=nnx.Rngs(seed))


def abstract_umt5(cfg: UMT5Config) -> UMT5Encoder:
    """The encoder with ShapeDtypeStruct leaves: no memory allocated (for parameter counts and the loader)."""
    return nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))


def count_params(model: UMT5Encoder) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
