"""The hooks by which a method compresses an AR K/V cache to a fixed memory budget.

Two runtimes use them: the synchronous chunk rollout (`CacheCompressor`, below) and asynchronous diffusion
forcing with per-chunk forwarding (`WindowCompressor`, `plan_window_compression`, `compress_window`, at
the end of this module).

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
import numpy as np

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


# ------------------------------------------------------------------ asynchronous diffusion forcing (MAGI-style)
@runtime_checkable
class WindowCompressor(Protocol):
    """What `df_sample(execution="chunks", kv_compression=...)` needs from a K/V compression method.

    cache_chunks: the memory budget in chunks, counted as MAGI-1 counts it: clean history AND the chunks in
        flight (being denoised) together.
    score(q, k, valid, tokens_per_frame) -> (B, H, C): per head, how much to keep each of the C slots of one
        layer, from that layer's queries q (B, N, H, D) of the last forwarded chunk (raster order) and keys k
        (B, C, H, D); only `valid` (C,) slots (the clean history) are candidates.
    """

    cache_chunks: int

    def score(self, q: jax.Array, k: jax.Array, valid: jax.Array, tokens_per_frame: int) -> jax.Array: ...


def plan_window_compression(update: np.ndarray, prefix_chunks: int, chunk_frames: int, chunk_tokens: int,
                            cache_chunks: int) -> dict[str, np.ndarray]:
    """Where every chunk's K/V sit in a buffer of `cache_chunks` chunks and when it is compressed: all of it
    follows from the (static) schedule, so it is computed here on the host.

    update: (R, F) the schedule's update mask (frames); prefix_chunks: clean chunks at the start (forwarded
    once, in row 0). A chunk is placed at the end of the used slots when it is first forwarded. After row r
    the buffer is compressed, as MAGI-1's trigger, iff: it is full (used tokens >= budget, in-flight chunks
    included), a chunk is still to come and enters at row r + 1, and the clean history holds >= 2 chunks'
    worth of tokens. The clean history [0, clean_end) is then reduced to keep = max(clean - chunk, chunk)
    tokens per layer and head (one chunk dropped per event) and the in-flight chunks move down behind it.

    Returns int32 arrays: slot (R, G) start of each chunk's slots during row r (-1 before it is placed);
    compress (R,) bool after row r; keep, clean_end, used (R,) at that compression. A ValueError says how
    large a budget the schedule needs when a chunk would not fit.
    """
    upd = np.asarray(update, bool)[:, ::chunk_frames]
    rows, g_count = upd.shape
    cap = cache_chunks * chunk_tokens
    first = np.array([0 if g < prefix_chunks else int(np.argmax(upd[:, g])) for g in range(g_count)])
    last = np.array([0 if g < prefix_chunks else rows - 1 - int(np.argmax(upd[::-1, g])) for g in range(g_count)])
    slot = np.full((rows, g_count), -1, np.int32)
    compress = np.zeros(rows, bool)
    keep, clean_end, used_at = (np.zeros(rows, np.int32) for _ in range(3))
    cur = np.full(g_count, -1, np.int64)
    used = 0
    for r in range(rows):
        for g in range(g_count):
            if first[g] == r and cur[g] < 0:
                if used + chunk_tokens > cap:
                    need = _needed_budget(first, last, prefix_chunks)
                    raise ValueError(f"kv_compression.cache_chunks={cache_chunks} is too small for this schedule: "
                                     f"chunk {g} does not fit at row {r} (chunks in flight plus 2 clean chunks "
                                     f"need cache_chunks >= {need})")
                cur[g], used = used, used + chunk_tokens
        slot[r] = cur
        placed = cur >= 0
        done = placed & (last <= r)
        more = bool(np.any(first > r)) and bool(np.any(first == r + 1))
        clean = int(min([cur[g] for g in range(g_count) if placed[g] and not done[g]], default=used))
        if used >= cap and more and clean >= 2 * chunk_tokens:
            k = max(clean - chunk_tokens, chunk_tokens)
            compress[r], keep[r], clean_end[r], used_at[r] = True, k, clean, used
            moved = placed & ~done
            cur[moved] -= clean - k
            cur[done] = -2          # merged into the compressed history
            used -= clean - k
    return dict(slot=slot, compress=compress, keep=keep, clean_end=clean_end, used=used_at)


def _needed_budget(first, last, prefix_chunks) -> int:
    in_flight = max(int(np.sum((first <= r) & (last >= r) & (np.arange(len(first)) >= prefix_chunks)))
                    for r in range(int(last.max()) + 1))
    return in_flight + 2


def compress_window(k: jax.Array, v: jax.Array, frames: jax.Array, queries: jax.Array, keep, clean_end, used,
                    compressor: WindowCompressor, tokens_per_frame: int):
    """One compression event on a window K/V buffer: k, v (L, B, C, H, D), slot frames (L, B, C, H) int32
    (-1 = empty), queries (L, B, N, H, D) of the last forwarded chunk; keep, clean_end, used: traced ints.

    Per layer and head the `keep` best clean slots (`compressor.score` over [0, clean_end)) come first, in
    descending score order (as MAGI-1's `topk` leaves them), then the in-flight slots [clean_end, used)
    moved down to start at `keep`; the rest is emptied (zeros, frame -1). Returns (k, v, frames)."""
    cap = k.shape[2]
    pos = jnp.arange(cap)
    clean = pos < clean_end

    def per_layer(args):
        q_l, k_l, v_l, f_l = args
        s = compressor.score(q_l, k_l, clean, tokens_per_frame)                  # (B, H, C)
        s = jnp.where(clean, s, -jnp.inf)
        order = jnp.argsort(-s, axis=-1, stable=True)                             # best first
        active = clean_end + (pos - keep)
        src = jnp.where(pos < keep, order, jnp.clip(active, 0, cap - 1))         # (B, H, C)
        live = (pos < keep) | ((pos >= keep) & (active < used))
        idx = src.swapaxes(1, 2)                                                  # (B, C, H)
        take = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 3)), axis=1)  # noqa: E731
        lv = live[None, :, None]
        zero = lambda a: jnp.where(lv[..., None], take(a), 0).astype(a.dtype)       # noqa: E731
        return zero(k_l), zero(v_l), jnp.where(lv, take(f_l), -1)

    return jax.lax.map(per_layer, (queries, k, v, frames))


__all__ = ["CacheCompressor", "make_room", "WindowCompressor", "plan_window_compression", "compress_window"]
