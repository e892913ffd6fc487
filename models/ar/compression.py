"""The hook by which a method compresses the AR rollout's KV cache to a fixed memory budget.

`RolloutConfig(kv_compression=c)` takes any `CacheCompressor` (FlowCache's `KVCompressionConfig` in
`experiments.flowcache` is one). The clean cache then holds at most `c.cache_chunks` chunks, filled as a
prefix of slots instead of a ring. When a finished chunk is committed, the rollout runs its clean pass
capturing every layer's queries; if `c.due(...)` the cache is first reduced by `c.compress(...)` to `keep`
tokens per layer and head (room for one more chunk), packed at the front, and the chunk is stored after
them. A compressor may keep different tokens in each layer and head: the cache records each head's slot
frames (`KVCache.head_frames`), and RoPE is applied before caching, so a kept key keeps its position.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from models.ar.kv_cache import KVCache


@runtime_checkable
class CacheCompressor(Protocol):
    """What the rollout needs from a KV-cache compression method.

    cache_chunks: the budget, in chunks of clean K/V (>= 2: one compressed history plus the new chunk).
    due(filled, chunk_tokens, capacity) -> () bool: whether a finished chunk of `chunk_tokens` tokens must
        trigger compression before it is stored in a cache holding `filled` (traced) of `capacity` slots.
    compress(cache, queries, keep, tokens_per_frame) -> KVCache: the float cache (with `head_frames`) with
        each layer's and head's filled slots reduced to `keep`, packed at the front and the rest emptied;
        `queries` (layers, B, N, heads, head_dim) are the finished chunk's clean-pass queries, raster order.
    """

    cache_chunks: int

    def due(self, filled: jax.Array, chunk_tokens: int, capacity: int) -> jax.Array: ...

    def compress(self, cache: KVCache, queries: jax.Array, keep: int, tokens_per_frame: int) -> KVCache: ...


def make_room(cache: KVCache, queries: jax.Array, compressor: CacheCompressor, chunk_tokens: int,
              tokens_per_frame: int) -> KVCache:
    """The cache made ready to store a finished chunk of `chunk_tokens` tokens whose clean pass asked
    `queries`: compressed to max(capacity - chunk_tokens, chunk_tokens) tokens when `compressor.due`, else
    unchanged (a `lax.cond`: the compression only runs when due)."""
    cap = cache.capacity
    keep = max(cap - chunk_tokens, chunk_tokens)
    due = compressor.due(jnp.sum(cache.valid), chunk_tokens, cap)
    return jax.lax.cond(due, lambda c: compressor.compress(c, queries, keep, tokens_per_frame), lambda c: c, cache)


__all__ = ["CacheCompressor", "make_room"]
