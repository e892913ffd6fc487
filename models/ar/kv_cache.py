"""A fixed-capacity, per-layer KV cache for autoregressive chunk generation, as an attention function.

The cache is a pytree with static shapes: keys/values (L, B, capacity, heads, head_dim), the absolute latent
frame of every slot, and which slots are filled. `cached_attention(cache, write=...)` returns a
self-attention function for `WanTransformer.blocks`: each layer's queries attend to that layer's cached
keys plus the chunk's own keys (block-causal rule on frames), and, when writing, the chunk's fresh K/V are
stored at a given slot (the rollout places chunks in a ring to keep a rolling window). The layer state
threaded through the layer scan is `(k_l, v_l)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from vidaccel.attention import AttentionInfo, block_causal_mask
from vidaccel.kvcache import KVQuantConfig, QuantizedKV, bytes_held, init_quantized_kv, quantize_keys, quantize_values

STORAGES = ("float32", "bfloat16", "int8", "int4")


@struct.dataclass
class KVCache:
    k: jax.Array          # (L, B, C, H, Dh)
    v: jax.Array          # (L, B, C, H, Dh)
    frames: jax.Array     # (B, C) int32 absolute latent frame of each slot
    valid: jax.Array      # (C,) bool: the slot holds a token (empty slots are masked out)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        """Bytes held by the cache arrays (its whole capacity, filled or not)."""
        return int(sum(a.size * a.dtype.itemsize for a in (self.k, self.v, self.frames, self.valid)))


def init_kv_cache(num_layers: int, batch: int, capacity: int, heads: int, head_dim: int,
                  dtype=jnp.float32) -> KVCache:
    for name, v in (("num_layers", num_layers), ("batch", batch), ("capacity", capacity), ("heads", heads),
                    ("head_dim", head_dim)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"init_kv_cache: {name}={v!r} must be a positive int")
    shape = (num_layers, batch, capacity, heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, capacity), jnp.int32),
                   jnp.zeros((capacity,), bool))


def cached_attention(cache, *, write_at: int | jax.Array | None = None, implementation: str = "auto"):
    """Self-attention over [cached keys ; the chunk's keys]; with `write_at`, the chunk's K/V are stored too.

    Returns `attention(q, k, v, info, (k_l, v_l)) -> (out, (k_l, v_l))` for `WanTransformer.blocks`, whose
    `layer_state` must be `(cache.k, cache.v)`. Empty slots are masked out. `write_at` (a slot index, may be
    traced) stores the chunk's keys/values at slots `write_at .. write_at + N - 1` of each layer, replacing
    whatever was there (a rolling window evicts that way); finish with `store` to record frames and validity.
    A `QuantizedKVCache` is read by the quantized-KV attention kernel (`implementation="kernel"`) or its
    jnp reference (`"reference"`); "auto" takes the kernel on GPU and the reference elsewhere (the kernel's
    CPU interpret mode is for tests). Cached tokens are all earlier chunks, so no frame mask is needed there.
    """
    if isinstance(cache, QuantizedKVCache):
        if implementation == "auto":
            implementation = "kernel" if jax.default_backend() == "gpu" else "reference"
        if implementation not in ("kernel", "reference"):
            raise ValueError(f"implementation={implementation!r} is invalid; allowed: auto, kernel, reference")
        return _quantized_attention(cache, write_at, implementation)
    def attention(q, k, v, info: AttentionInfo, layer_state):
        k_l, v_l = layer_state
        keys = jnp.concatenate([k_l.astype(k.dtype), k], axis=1)
        vals = jnp.concatenate([v_l.astype(v.dtype), v], axis=1)
        kv_frames = jnp.concatenate([cache.frames, info.q_frames], axis=1)
        mask = jnp.concatenate([cache.valid, jnp.ones((k.shape[1],), bool)])[None, None, None, :]
        if info.frames_per_block > 1:
            mask = mask & block_causal_mask(info.q_frames, kv_frames, info.frames_per_block)
        out = jax.nn.dot_product_attention(q, keys, vals, mask=mask)
        if write_at is not None:
            k_l = jax.lax.dynamic_update_slice_in_dim(k_l, k.astype(k_l.dtype), write_at, axis=1)
            v_l = jax.lax.dynamic_update_slice_in_dim(v_l, v.astype(v_l.dtype), write_at, axis=1)
        return out, (k_l, v_l)

    return attention


def store(cache, layers, frames: jax.Array, at: int | jax.Array):
    """The cache after `cached_attention(write_at=at)` returned its per-layer state `layers` for tokens of
    `frames` (B, N): `(k, v)` for a float `KVCache`, the stacked `QuantizedKV` for a `QuantizedKVCache`."""
    n = frames.shape[1]
    if not isinstance(at, jax.core.Tracer) and not 0 <= int(at) <= cache.capacity - n:
        raise ValueError(f"KV cache write of {n} tokens at slot {int(at)} overflows its {cache.capacity} slots; "
                         "raise the capacity or use a rolling window")
    new_frames = jax.lax.dynamic_update_slice_in_dim(cache.frames, frames.astype(jnp.int32), at, axis=1)
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, jnp.ones((n,), bool), at, axis=0)
    if isinstance(cache, QuantizedKVCache):
        return QuantizedKVCache(layers, new_frames, valid)
    k, v = layers
    return KVCache(k, v, new_frames, valid)


def layer_state(cache):
    """What `WanTransformer.blocks` threads through its layers for this cache."""
    return cache.layers if isinstance(cache, QuantizedKVCache) else (cache.k, cache.v)


# ------------------------------------------------------------------------------------------ quantized storage
@struct.dataclass
class QuantizedKVCache:
    """The cache in int8 / int4 (`vidaccel.kvcache` layout: keys per channel in token groups, values per
    token), every `QuantizedKV` field stacked on a leading layer axis. The current chunk's own K/V are the
    full-precision recent window; slots fill as a prefix (then in a ring), so the filled count is the
    quantized-attention kernel's `length`."""

    layers: QuantizedKV
    frames: jax.Array     # (B, C) int32
    valid: jax.Array      # (C,) bool

    @property
    def capacity(self) -> int:
        return self.layers.k_codes.shape[2]

    def nbytes(self) -> int:
        return bytes_held(self.layers) + int(self.frames.size * 4 + self.valid.size)


def init_cache(storage: str, num_layers: int, batch: int, capacity: int, heads: int, head_dim: int, *,
               window: int, group_size: int = 32, scale_dtype: str = "bfloat16"):
    """An empty cache of `storage` ("float32", "bfloat16", "int8" or "int4"); `window` = tokens per chunk.

    Quantized storage keeps no full-precision window of its own: the recent window the kernel reads is the
    current chunk's fresh K/V, handed in at attention time. Scales and offsets are stored as `scale_dtype`
    (bfloat16 by default, as KIVI keeps them in half precision).
    """
    if storage not in STORAGES:
        raise ValueError(f"KV storage {storage!r} is unknown; allowed: {STORAGES}")
    if storage in ("float32", "bfloat16"):
        return init_kv_cache(num_layers, batch, capacity, heads, head_dim, jnp.dtype(storage))
    config = KVQuantConfig(bits=8 if storage == "int8" else 4, group_size=group_size, scale_dtype=scale_dtype)
    if window % group_size or capacity % group_size:
        raise ValueError(f"quantized KV storage needs chunk tokens ({window}) and capacity ({capacity}) to be "
                         f"multiples of the key group size {group_size}")
    one = init_quantized_kv(batch, capacity, heads, head_dim, window=window, config=config, dtype=jnp.float32)
    empty = jnp.zeros((batch, 0, heads, head_dim), jnp.float32)
    one = one.replace(k_recent=empty, v_recent=empty)
    layers = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_layers, *a.shape)), one)
    return QuantizedKVCache(layers, jnp.zeros((batch, capacity), jnp.int32), jnp.zeros((capacity,), bool))


def _quantized_attention(cache: QuantizedKVCache, write_at, implementation: str):
    from pallas_kernels import quantized_kv_attention
    from pallas_kernels.reference import quantized_kv_attention_reference

    attend = quantized_kv_attention if implementation == "kernel" else quantized_kv_attention_reference
    config = KVQuantConfig(bits=cache.layers.bits, group_size=cache.layers.group_size,
                           scale_dtype=str(cache.layers.k_scale.dtype))
    filled = jnp.sum(cache.valid).astype(jnp.int32)

    def attention(q, k, v, info: AttentionInfo, layer: QuantizedKV):
        b, n = k.shape[:2]
        view = layer.replace(k_recent=k, v_recent=v, recent_length=jnp.full((b,), n, jnp.int32),
                             length=jnp.full((b,), filled, jnp.int32))
        out = attend(q, view)
        if write_at is not None:
            kc, ks, ko = quantize_keys(k, config)
            vc, vs, vo = quantize_values(v, config)
            dus = jax.lax.dynamic_update_slice_in_dim
            g = config.group_size
            layer = layer.replace(
                k_codes=dus(layer.k_codes, kc, write_at, 1), k_scale=dus(layer.k_scale, ks.astype(layer.k_scale.dtype),
                                                                         write_at // g, 1),
                k_offset=dus(layer.k_offset, ko.astype(layer.k_offset.dtype), write_at // g, 1),
                v_codes=dus(layer.v_codes, vc, write_at, 1), v_scale=dus(layer.v_scale, vs.astype(layer.v_scale.dtype),
                                                                         write_at, 1),
                v_offset=dus(layer.v_offset, vo.astype(layer.v_offset.dtype), write_at, 1))
        return out.astype(q.dtype), layer

    return attention

