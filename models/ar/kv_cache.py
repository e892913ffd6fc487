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


def cached_attention(cache: KVCache, *, write_at: int | jax.Array | None = None):
    """Self-attention over [cached keys ; the chunk's keys]; with `write_at`, the chunk's K/V are stored too.

    Returns `attention(q, k, v, info, (k_l, v_l)) -> (out, (k_l, v_l))` for `WanTransformer.blocks`, whose
    `layer_state` must be `(cache.k, cache.v)`. Empty slots are masked out. `write_at` (a slot index, may be
    traced) stores the chunk's keys/values at slots `write_at .. write_at + N - 1` of each layer, replacing
    whatever was there (a rolling window evicts that way); finish with `store` to record frames and validity.
    """
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


def store(cache: KVCache, k: jax.Array, v: jax.Array, frames: jax.Array, at: int | jax.Array) -> KVCache:
    """The cache after `cached_attention(write_at=at)` returned per-layer (k, v) for tokens of `frames` (B, N)."""
    n = frames.shape[1]
    if not isinstance(at, jax.core.Tracer) and not 0 <= int(at) <= cache.capacity - n:
        raise ValueError(f"KV cache write of {n} tokens at slot {int(at)} overflows its {cache.capacity} slots; "
                         "raise the capacity or use a rolling window")
    new_frames = jax.lax.dynamic_update_slice_in_dim(cache.frames, frames.astype(jnp.int32), at, axis=1)
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, jnp.ones((n,), bool), at, axis=0)
    return KVCache(k, v, new_frames, valid)
