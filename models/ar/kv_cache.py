"""A fixed-capacity, per-layer KV cache for autoregressive chunk generation, as an attention function.

The cache is a pytree with static shapes: keys/values (L, B, capacity, heads, head_dim), the absolute latent
frame of every slot, and which slots are filled. `cached_attention(cache, write=...)` returns a
self-attention function for `WanTransformer.blocks`: each layer's queries attend to that layer's cached
keys plus the chunk's own keys (block-causal rule on frames), and, when writing, the chunk's fresh K/V are
stored at a given slot (the rollout places chunks in a ring to keep a rolling window). The layer state
threaded through the layer scan is `(k_l, v_l)`.

Two wrappers extend any such attention function:
- `with_chunk_buffer`: the chunk's own K/V live in a per-layer buffer (B, N, heads, head_dim) that a partial
  forward updates only at the tokens it computes (MotionCache): the others keep stale K/V, and the queries
  attend to [cache ; buffer];
- `capturing_queries`: also returns every layer's queries (for KV-cache compression scores).
A cache may keep, per layer and head, the frame of every slot (`head_frames`): after a per-head compression
each head holds different tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels import quantized_kv_attention
from pallas_kernels.kv_quantization import (
    KVQuantConfig,
    QuantizedKV,
    bytes_held,
    init_quantized_kv,
    quantize_keys,
    quantize_values,
)
from pallas_kernels.reference import quantized_kv_attention_reference
from vidaccel.attention import AttentionInfo, block_causal_mask, resolve_backend
from vidaccel.checks import choice_arg, int_arg

STORAGES = ("float32", "bfloat16", "int8", "int4")
FLOAT_STORAGES = ("float32", "bfloat16")
KV_BACKENDS = ("auto", "kernel", "reference")      # how a quantized cache is read (there is no gather path)


@struct.dataclass
class KVCache:
    k: jax.Array          # (L, B, C, H, Dh)
    v: jax.Array          # (L, B, C, H, Dh)
    frames: jax.Array     # (B, C) int32 absolute latent frame of each slot
    valid: jax.Array      # (C,) bool: the slot holds a token (empty slots are masked out)
    # (L, B, C, H) int32 frame of the token each layer and head holds in each slot, or None. Kept when heads
    # may hold different tokens (per-head KV compression); `frames` is then layer 0 / head 0's view.
    head_frames: jax.Array | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        """Bytes held by the cache arrays (its whole capacity, filled or not)."""
        arrays = (self.k, self.v, self.frames, self.valid, self.head_frames)
        return int(sum(a.size * a.dtype.itemsize for a in arrays if a is not None))


def init_kv_cache(num_layers: int, batch: int, capacity: int, heads: int, head_dim: int,
                  dtype=jnp.float32, *, head_frames: bool = False) -> KVCache:
    """An empty float cache; `head_frames` also keeps each layer's and head's slot frames (for per-head
    compression)."""
    for name, v in (("num_layers", num_layers), ("batch", batch), ("capacity", capacity), ("heads", heads),
                    ("head_dim", head_dim)):
        int_arg(f"init_kv_cache {name}", v, 1)
    shape = (num_layers, batch, capacity, heads, head_dim)
    hf = jnp.zeros(shape[:4], jnp.int32) if head_frames else None
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, capacity), jnp.int32),
                   jnp.zeros((capacity,), bool), hf)


def cached_attention(cache, *, write_at: int | jax.Array | None = None, implementation: str = "auto"):
    """Self-attention over [cached keys ; the chunk's keys]; with `write_at`, the chunk's K/V are stored too.

    Returns `attention(q, k, v, info, (k_l, v_l)) -> (out, (k_l, v_l))` for `WanTransformer.blocks`, whose
    `layer_state` must be `(cache.k, cache.v)`. Empty slots are masked out. `write_at` (a slot index, may be
    traced) stores the chunk's keys/values at slots `write_at .. write_at + N - 1` of each layer, replacing
    whatever was there (a rolling window evicts that way); finish with `store` to record frames and validity.
    A `QuantizedKVCache` is read by the quantized-KV attention kernel (`implementation="kernel"`) or its
    jnp reference (`"reference"`); "auto" takes the kernel on GPU/TPU and the reference on CPU
    (`vidaccel.attention.resolve_backend`). Cached tokens are all earlier chunks, so no frame mask is needed there.
    The chunk's keys have the frames `info.kv_frames` (the queries' own frames unless the blocks were given
    `kv_frames`, as a partial forward over a chunk buffer is).
    """
    if isinstance(cache, QuantizedKVCache):
        implementation = resolve_backend(implementation, allowed=KV_BACKENDS, name="implementation")
        return _quantized_attention(cache, write_at, implementation)

    def attention(q, k, v, info: AttentionInfo, layer_state):
        k_l, v_l = layer_state
        keys = jnp.concatenate([k_l.astype(k.dtype), k], axis=1)
        vals = jnp.concatenate([v_l.astype(v.dtype), v], axis=1)
        kv_frames = jnp.concatenate([cache.frames, info.kv_frames], axis=1)
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
    hf = cache.head_frames
    if hf is not None:
        per_head = jnp.broadcast_to(frames.astype(jnp.int32)[None, :, :, None],
                                    (hf.shape[0], *frames.shape, hf.shape[3]))
        hf = jax.lax.dynamic_update_slice_in_dim(hf, per_head, at, axis=2)
    return KVCache(k, v, new_frames, valid, hf)


def write_chunk(cache, k: jax.Array, v: jax.Array, frames: jax.Array, at: int | jax.Array):
    """The cache with a chunk's per-layer K/V (L, B, N, heads, head_dim) of `frames` (B, N) stored at slots
    `at .. at + N - 1` (for K/V computed outside `cached_attention`, e.g. a chunk buffer); quantized storage
    quantizes them as a writing attention would."""
    if isinstance(cache, QuantizedKVCache):
        config = _quantized_config(cache)
        layers = jax.vmap(lambda layer, kl, vl: _quantized_write(layer, kl, vl, at, config))(cache.layers, k, v)
        return store(cache, layers, frames, at)

    def put(a, new):
        return jax.lax.dynamic_update_slice_in_dim(a, new.astype(a.dtype), at, axis=2)

    return store(cache, (put(cache.k, k), put(cache.v, v)), frames, at)


def with_chunk_buffer(attention, indices: jax.Array | None, valid: jax.Array | None = None):
    """`attention` over the chunk's own K/V held in a buffer that only the computed tokens refresh.

    The layer state becomes `(inner_state, (k_buf, v_buf))` with buffers (B, N, heads, head_dim) for the
    whole chunk. The fresh keys/values of the queries being computed are scattered into the buffers at
    `indices` (B, K) token positions (only where `valid` (B, K) is True; padding entries must point at
    positions no valid entry uses), and `attention` then sees the whole buffer as the chunk's keys (pass the
    chunk's frames as the blocks' `kv_frames`), so unselected tokens contribute their stale K/V; a writing
    cache attention stores the buffer. `indices=None` means every token is computed, in order: the buffer is
    replaced by the fresh K/V and the result equals a plain full forward.
    """
    def attend(q, k, v, info: AttentionInfo, layer_state):
        inner, (kb, vb) = layer_state
        if indices is None:
            kb, vb = k.astype(kb.dtype), v.astype(vb.dtype)
        else:
            kb, vb = scatter_tokens(kb, indices, k, valid), scatter_tokens(vb, indices, v, valid)
        out, inner = attention(q, kb.astype(k.dtype), vb.astype(v.dtype), info, inner)
        return out, (inner, (kb, vb))

    return attend


def scatter_tokens(buf: jax.Array, indices: jax.Array, new: jax.Array, valid: jax.Array | None) -> jax.Array:
    """buf (B, N, ...) with rows `indices` (B, K) replaced by `new` (B, K, ...) where `valid` (B, K)."""
    new = new.astype(buf.dtype)
    if valid is not None:
        old = jnp.take_along_axis(buf, indices.reshape(indices.shape + (1,) * (buf.ndim - 2)), axis=1)
        new = jnp.where(valid.reshape(valid.shape + (1,) * (buf.ndim - 2)), new, old)
    b = jnp.arange(buf.shape[0])[:, None]
    return buf.at[b, indices].set(new)


def capturing_queries(attention):
    """`attention` that also records its queries: layer state `(inner_state, q_l)` with q_l shaped like q
    (B, Tq, heads, head_dim); the blocks return every layer's RoPE'd queries stacked on the layer axis."""
    def attend(q, k, v, info: AttentionInfo, layer_state):
        inner, _ = layer_state
        out, inner = attention(q, k, v, info, inner)
        return out, (inner, q)

    return attend


def layer_state(cache):
    """What `WanTransformer.blocks` threads through its layers for this cache."""
    return cache.layers if isinstance(cache, QuantizedKVCache) else (cache.k, cache.v)


# ------------------------------------------------------------------------------------------ quantized storage
@struct.dataclass
class QuantizedKVCache:
    """The cache in int8 / int4 (`pallas_kernels.kv_quantization` layout: keys per channel in token groups, values per
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
               window: int, group_size: int = 32, scale_dtype: str = "bfloat16", head_frames: bool = False):
    """An empty cache of `storage` ("float32", "bfloat16", "int8" or "int4"); `window` = tokens per chunk.

    Quantized storage keeps no full-precision window of its own: the recent window the kernel reads is the
    current chunk's fresh K/V, handed in at attention time. Scales and offsets are stored as `scale_dtype`
    (bfloat16 by default, as KIVI keeps them in half precision). `head_frames` (float storage only) keeps
    each layer's and head's slot frames, for per-head compression.
    """
    choice_arg("KV storage", storage, STORAGES)
    if storage in FLOAT_STORAGES:
        return init_kv_cache(num_layers, batch, capacity, heads, head_dim, jnp.dtype(storage), head_frames=head_frames)
    if head_frames:
        raise ValueError(f"per-head slot frames (KV compression) need float storage, not {storage!r}")
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
    attend = quantized_kv_attention if implementation == "kernel" else quantized_kv_attention_reference
    config = _quantized_config(cache)
    filled = jnp.sum(cache.valid).astype(jnp.int32)

    def attention(q, k, v, info: AttentionInfo, layer: QuantizedKV):
        b, n = k.shape[:2]
        view = layer.replace(k_recent=k, v_recent=v, recent_length=jnp.full((b,), n, jnp.int32),
                             length=jnp.full((b,), filled, jnp.int32))
        out = attend(q, view)
        if write_at is not None:
            layer = _quantized_write(layer, k, v, write_at, config)
        return out.astype(q.dtype), layer

    return attention


def _quantized_config(cache: QuantizedKVCache) -> KVQuantConfig:
    return KVQuantConfig(bits=cache.layers.bits, group_size=cache.layers.group_size,
                         scale_dtype=str(cache.layers.k_scale.dtype))


def _quantized_write(layer: QuantizedKV, k, v, at, config: KVQuantConfig) -> QuantizedKV:
    """One layer's quantized storage with k, v (B, N, H, D) quantized into slots `at .. at + N - 1`."""
    kc, ks, ko = quantize_keys(k, config)
    vc, vs, vo = quantize_values(v, config)
    g = config.group_size

    def put(a, new, start):
        return jax.lax.dynamic_update_slice_in_dim(a, new.astype(a.dtype), start, 1)

    return layer.replace(k_codes=put(layer.k_codes, kc, at), k_scale=put(layer.k_scale, ks, at // g),
                         k_offset=put(layer.k_offset, ko, at // g), v_codes=put(layer.v_codes, vc, at),
                         v_scale=put(layer.v_scale, vs, at), v_offset=put(layer.v_offset, vo, at))

