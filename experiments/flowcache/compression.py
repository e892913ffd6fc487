"""FlowCache's KV-cache compression: importance-redundancy scores under a fixed memory budget (from R-KV).

When a finished chunk's K/V are to be stored and the cache of clean chunks has no room for them, every
layer and head first keeps only the `keep` clean tokens with the highest score

    score_j = lambda * Imp_j - (1 - lambda) * Red_j,        lambda = 0.07

- Imp_j: attention of the newest queries (the chunk being stored, from its clean pass; its last latent frame
  by default) over the cached clean keys: softmax over the keys of q.k / sqrt(d) per query, mean over the
  queries, then a 1-D max pool of width 7 along the raster (slot) order;
- Red_j: softmax over j of the key's mean cosine similarity to the other clean keys, computed in O(L d) as
  (k^_j . sum_i k^_i - 1) / L with unit keys k^ (the diagonal-zeroed mean, without the L x L matrix).

Top-`keep` per head, so heads keep different tokens: indices are (layers, batch, heads, keep), sorted to
keep raster order, and the cache records each head's slot frames (`KVCache.head_frames`). RoPE is applied
before caching, so a kept key keeps its true position. As in the MAGI code, each event drops one chunk's
worth: the rollout asks for keep = max(clean - chunk_tokens, chunk_tokens) (../shared/specs/ar_caching.md
section 1.4).

Trigger, adapted to a synchronous rollout: MAGI compresses the clean history when its memory (clean +
in-flight chunks) reaches the budget, at least two clean chunks exist, more chunks are to come and the next
chunk is about to enter, so that the entering chunk gets a slot. Here the chunk being denoised is not in the
cache (its K/V are the attention's own keys until it is committed), so the equivalent moment is its commit:
compress iff its K/V do not fit (`compression_due`). The cache then holds `cache_chunks` chunks of clean
history while every chunk is denoised, as a rolling window of that many chunks would.

`KVCompressionConfig` is a `models.ar.compression.CacheCompressor`: pass it as
`RolloutConfig(kv_compression=...)` and the rollout calls its `due` and `compress` at every commit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from models.ar.kv_cache import KVCache
from vidaccel.checks import choice_arg, float_arg, int_arg

QUERY_GRANULARITIES = ("chunk", "frame", "token")


@dataclasses.dataclass(frozen=True)
class KVCompressionConfig:
    """FlowCache's KV compression; defaults are the MAGI code's (`yaml_config`).

    cache_chunks: memory budget in chunks of clean K/V (`total_cache_chunk_nums`: 6 in the VBench yaml);
    compression fires when the clean cache reaches it, so it must be >= 2. mix_lambda: lambda of the score.
    pool_kernel: odd width of the importance max pool. query_granularity: which queries of the last forward
    score importance: "chunk" (all), "frame" (its last latent frame, the yaml default) or "token" (its last
    `query_tokens`). Only the yaml's per-token strategy is implemented (not the frame/chunk score averaging).
    """

    cache_chunks: int = 6
    mix_lambda: float = 0.07
    pool_kernel: int = 7
    query_granularity: str = "frame"
    query_tokens: int = 50

    def __post_init__(self):
        int_arg("KVCompressionConfig.cache_chunks", self.cache_chunks, 2)
        int_arg("KVCompressionConfig.pool_kernel", self.pool_kernel, 1)
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"KVCompressionConfig.pool_kernel must be odd (a centred window), got "
                             f"{self.pool_kernel}")
        int_arg("KVCompressionConfig.query_tokens", self.query_tokens, 1)
        object.__setattr__(self, "mix_lambda", float_arg("KVCompressionConfig.mix_lambda", self.mix_lambda,
                                                         low=0.0, high=1.0))
        choice_arg("KVCompressionConfig.query_granularity", self.query_granularity, QUERY_GRANULARITIES)

    def select_queries(self, q: jax.Array, tokens_per_frame: int) -> jax.Array:
        """The scoring queries among a forward's queries (..., N, H, D) (tokens in raster order)."""
        if self.query_granularity == "chunk":
            return q
        last = tokens_per_frame if self.query_granularity == "frame" else self.query_tokens
        return q[..., -min(last, q.shape[-3]):, :, :]

    # the CacheCompressor interface the rollout calls
    def due(self, filled: jax.Array, chunk_tokens: int, capacity: int) -> jax.Array:
        """`compression_due`: the finished chunk does not fit."""
        return compression_due(filled, chunk_tokens, capacity)

    def compress(self, cache: KVCache, queries: jax.Array, keep: int, tokens_per_frame: int) -> KVCache:
        """`compress_cache` with this config (the kept indices dropped)."""
        return compress_cache(cache, queries, keep, self, tokens_per_frame)[0]

    # the WindowCompressor interface asynchronous diffusion forcing calls (models.ar.df_sample)
    def score(self, q: jax.Array, k: jax.Array, valid: jax.Array, tokens_per_frame: int) -> jax.Array:
        """`scores` of one layer's slots k (B, C, H, D), with this config's share of the queries q (B, N, H, D)
        of the last forwarded chunk; -inf outside `valid` (C,)."""
        return scores(self.select_queries(q, tokens_per_frame), k, valid, self)


def kv_compression(cache_chunks: int = 6, **overrides) -> KVCompressionConfig:
    """FlowCache's KV compression config (MAGI code defaults); pass it as `RolloutConfig(kv_compression=...)`."""
    return KVCompressionConfig(cache_chunks=cache_chunks, **overrides)


def importance(q: jax.Array, k: jax.Array, valid: jax.Array, pool_kernel: int) -> jax.Array:
    """(B, H, C): mean over queries q (B, Nq, H, D) of their softmax attention over keys k (B, C, H, D)
    restricted to `valid` (C,) slots, max-pooled along the slot axis (invalid slots get -inf)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(q.shape[-1])
    logits = jnp.where(valid, logits, -jnp.inf)
    imp = jax.nn.softmax(logits, axis=-1).mean(axis=2)
    imp = jnp.where(valid, imp, -jnp.inf)
    pad = pool_kernel // 2
    imp = jax.lax.reduce_window(imp, -jnp.inf, jax.lax.max, (1, 1, pool_kernel), (1, 1, 1),
                                ((0, 0), (0, 0), (pad, pad)))
    return jnp.where(valid, imp, -jnp.inf)


def redundancy(k: jax.Array, valid: jax.Array) -> jax.Array:
    """(B, H, C): softmax over valid slots of each key's mean cosine similarity to the other valid keys,
    (k^_j . sum_i k^_i - 1) / L, in O(L d)."""
    kf = k.astype(jnp.float32)
    unit = kf / jnp.maximum(jnp.linalg.norm(kf, axis=-1, keepdims=True), 1e-12)
    unit = jnp.where(valid[None, :, None, None], unit, 0.0)
    total = unit.sum(axis=1)                                             # (B, H, D)
    count = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    mean_cos = (jnp.einsum("bchd,bhd->bhc", unit, total) - 1.0) / count
    return jax.nn.softmax(jnp.where(valid, mean_cos, -jnp.inf), axis=-1)


def scores(q: jax.Array, k: jax.Array, valid: jax.Array, cfg: KVCompressionConfig) -> jax.Array:
    """(B, H, C) lambda * Imp - (1 - lambda) * Red; -inf at invalid slots (never kept before a valid one)."""
    s = cfg.mix_lambda * importance(q, k, valid, cfg.pool_kernel) - (1 - cfg.mix_lambda) * redundancy(k, valid)
    return jnp.where(valid, s, -jnp.inf)


def select(score: jax.Array, keep: int) -> jax.Array:
    """(..., keep) indices of the `keep` highest scores along the last axis, in ascending (raster) order."""
    return jnp.sort(jax.lax.top_k(score, keep)[1], axis=-1)


def compress_cache(cache: KVCache, queries: jax.Array, keep: int, cfg: KVCompressionConfig,
                   tokens_per_frame: int) -> tuple[KVCache, jax.Array]:
    """The float `KVCache` with each layer's and head's clean slots reduced to its `keep` best, packed at the
    front (slots >= keep emptied). queries: (L, B, N, H, D) of the last forward; the cache needs
    `head_frames`. Returns (cache, indices (L, B, H, keep) of the kept slots)."""
    if cache.head_frames is None:
        raise ValueError("compress_cache needs a cache with per-head slot frames (init_cache(head_frames=True))")
    int_arg("keep", keep, 1)
    if keep > cache.capacity:
        raise ValueError(f"keep={keep} exceeds the cache capacity {cache.capacity}")
    q = cfg.select_queries(queries, tokens_per_frame)

    def per_layer(args):
        q_l, k_l, v_l, hf_l = args
        idx = select(scores(q_l, k_l, cache.valid, cfg), keep)            # (B, H, keep)
        tok = idx.swapaxes(1, 2)                                          # (B, keep, H)
        pad = cache.capacity - keep

        def gather(a):
            g = jnp.take_along_axis(a, tok.reshape(tok.shape + (1,) * (a.ndim - 3)), axis=1)
            return jnp.pad(g, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))

        return gather(k_l), gather(v_l), gather(hf_l), idx

    k, v, hf, idx = jax.lax.map(per_layer, (q, cache.k, cache.v, cache.head_frames))
    valid = jnp.arange(cache.capacity) < keep
    return cache.replace(k=k, v=v, head_frames=hf, frames=hf[0, :, :, 0], valid=valid), idx


def compression_due(filled: jax.Array, chunk_tokens: int, capacity: int) -> jax.Array:
    """Whether a finished chunk of `chunk_tokens` must trigger compression before it is stored: the clean
    cache (`filled` of `capacity` slots) has no room for it. A cache of >= 2 chunks then holds >= 2 clean
    chunks, MAGI's other condition."""
    return filled + chunk_tokens > capacity


__all__ = ["QUERY_GRANULARITIES", "KVCompressionConfig", "kv_compression", "importance", "redundancy", "scores",
           "select", "compress_cache", "compression_due"]
