"""A fixed-capacity, per-layer KV cache for autoregressive chunk generation, as an attention function.

The cache is a pytree with static shapes: keys/values (L, B, capacity, heads, head_dim), the absolute latent
frame of every slot, and how many slots are filled. `cached_attention(cache, write=...)` returns a
self-attention function for `WanTransformer.blocks`: each layer's queries attend to that layer's cached
keys plus the chunk's own keys (block-causal rule on frames), and, when writing, the chunk's fresh K/V are
stored at the end of the filled part. The layer state threaded through the layer scan is `(k_l, v_l)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from vidaccel.attention import AttentionInfo, block_causal_mask


@struct.dataclass
class KVCache:
    k: jax.Array          # (L, B, C, H, Dh)
    v: jax.Array          # (L, B, C, H, Dh)
    frames: jax.Array     # (B, C) int32 absolute frame of each slot (meaningful below `length`)
    length: jax.Array     # () int32 number of filled slots

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        """Bytes held by the cache arrays (its whole capacity, filled or not)."""
        return int(sum(a.size * a.dtype.itemsize for a in (self.k, self.v, self.frames, self.length)))


def init_kv_cache(num_layers: int, batch: int, capacity: int, heads: int, head_dim: int,
                  dtype=jnp.float32) -> KVCache:
    for name, v in (("num_layers", num_layers), ("batch", batch), ("capacity", capacity), ("heads", heads),
                    ("head_dim", head_dim)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"init_kv_cache: {name}={v!r} must be a positive int")
    shape = (num_layers, batch, capacity, heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, capacity), jnp.int32),
                   jnp.zeros((), jnp.int32))


def cached_attention(cache: KVCache, *, write: bool):
    """Self-attention over [cached keys ; the chunk's keys]; with `write`, the chunk's K/V are stored too.

    Returns `attention(q, k, v, info, (k_l, v_l)) -> (out, (k_l, v_l))` for `WanTransformer.blocks`, whose
    `layer_state` must be `(cache.k, cache.v)`. Slots at or beyond `cache.length` are masked out.
    """
    length = cache.length
    valid = jnp.arange(cache.capacity) < length                               # (C,)

    def attention(q, k, v, info: AttentionInfo, layer_state):
        k_l, v_l = layer_state
        keys = jnp.concatenate([k_l.astype(k.dtype), k], axis=1)
        vals = jnp.concatenate([v_l.astype(v.dtype), v], axis=1)
        kv_frames = jnp.concatenate([cache.frames, info.q_frames], axis=1)
        slot_ok = jnp.concatenate([valid, jnp.ones((k.shape[1],), bool)])[None, None, None, :]
        mask = slot_ok
        if info.frames_per_block > 1:
            mask = mask & block_causal_mask(info.q_frames, kv_frames, info.frames_per_block)
        out = jax.nn.dot_product_attention(q, keys, vals, mask=mask)
        if write:
            k_l = jax.lax.dynamic_update_slice_in_dim(k_l, k.astype(k_l.dtype), length, axis=1)
            v_l = jax.lax.dynamic_update_slice_in_dim(v_l, v.astype(v_l.dtype), length, axis=1)
        return out, (k_l, v_l)

    return attention


def append_frames(cache: KVCache, k: jax.Array, v: jax.Array, frames: jax.Array) -> KVCache:
    """The cache after `cached_attention(write=True)` returned per-layer (k, v) for tokens of `frames` (B, N)."""
    n = frames.shape[1]
    new_frames = jax.lax.dynamic_update_slice_in_dim(cache.frames, frames.astype(jnp.int32), cache.length, axis=1)
    return KVCache(k, v, new_frames, cache.length + n)


def check_capacity(cache: KVCache, new_tokens: int) -> None:
    """Raise when appending `new_tokens` could overflow (checked on concrete lengths, before jit)."""
    if isinstance(cache.length, jax.core.Tracer):
        return
    if int(cache.length) + new_tokens > cache.capacity:
        raise ValueError(f"KV cache holds {int(cache.length)} of {cache.capacity} slots; {new_tokens} more tokens "
                         "do not fit. Raise the capacity or use a rolling window.")
