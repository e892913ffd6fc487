"""Pure-jnp references of the Pallas kernels, with the kernels' signatures.

Each builds the equivalent dense token mask and runs exact softmax attention in fp32 (`precision=highest`),
rows with no selected key giving zeros, and casts to q's dtype. They validate their inputs with the same
checks as the kernels. Memory is O(B * H * Tq * Tk): for tests and small shapes only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as C
from pallas_kernels._indices import as_block_indices, indices_to_block_mask
from pallas_kernels._ranges import check_ranges, fixed_q_ranges
from pallas_kernels.kv_quantization import QuantizedKV, dequantize_kv
from pallas_kernels.quantized_kv import check_cache


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, token_mask: jax.Array, scale: float) -> jax.Array:
    """Exact attention in fp32 under a (B or 1, H or 1, Tq, Tk) boolean mask; all-False rows give zeros."""
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision="highest") * scale
    s = jnp.where(token_mask, s, -jnp.inf)
    any_key = jnp.any(token_mask, axis=-1, keepdims=True)
    m = jnp.where(any_key, jnp.max(s, axis=-1, keepdims=True), 0.0)
    p = jnp.where(token_mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = jnp.where(any_key, p / jnp.where(denom > 0, denom, 1.0), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision="highest").astype(q.dtype)


def block_sparse_attention_reference(q, k, v, block_mask, *, block_q: int, block_k: int,
                                     scale: float | None = None, interpret: bool | None = None) -> jax.Array:
    """Reference of `block_sparse_attention` (`interpret` is accepted and ignored)."""
    b, tq, tk, h, d, block_q, block_k, scale = C.check_sparse_args(q, k, v, block_q, block_k, scale)
    nq, nk = pl.cdiv(tq, block_q), pl.cdiv(tk, block_k)
    blocks = indices_to_block_mask(as_block_indices(block_mask, b, h, nq, nk), nk)
    token = jnp.repeat(jnp.repeat(blocks, block_q, axis=2), block_k, axis=3)[:, :, :tq, :tk]
    return masked_attention(q, k, v, token, scale)


def _range_cover(ranges: jax.Array, length: int) -> jax.Array:
    """(..., R, 2) (start, len) ranges -> (..., length) bool: token inside any range."""
    pos = jnp.arange(length)
    inside = (pos >= ranges[..., 0:1]) & (pos < ranges[..., 0:1] + ranges[..., 1:2])
    return jnp.any(inside, axis=-2)


def cluster_token_mask(q_ranges: jax.Array, kv_ranges: jax.Array, tq: int, tk: int) -> jax.Array:
    """Token mask (B', H', Tq, Tk) equivalent to query tiles `q_ranges` attending to their `kv_ranges`."""
    pos = jnp.arange(tq)
    in_tile = (pos >= q_ranges[..., 0:1]) & (pos < q_ranges[..., 0:1] + q_ranges[..., 1:2])  # (B,H,T,tq)
    tile_keys = _range_cover(kv_ranges, tk)  # (B, H, T, tk)
    bq_, hq_ = in_tile.shape[:2]
    bk_, hk_ = tile_keys.shape[:2]
    bb, hh = max(bq_, bk_), max(hq_, hk_)
    in_tile = jnp.broadcast_to(in_tile, (bb, hh) + in_tile.shape[2:])
    tile_keys = jnp.broadcast_to(tile_keys, (bb, hh) + tile_keys.shape[2:])
    return jnp.einsum("bhtq,bhtk->bhqk", in_tile.astype(jnp.int32), tile_keys.astype(jnp.int32)) > 0


def cluster_sparse_attention_reference(q, k, v, kv_ranges, *, q_ranges=None, block_q: int, block_k: int,
                                       scale: float | None = None, interpret: bool | None = None) -> jax.Array:
    """Reference of `cluster_sparse_attention` (`interpret` is accepted and ignored)."""
    b, tq, tk, h, d, block_q, block_k, scale = C.check_sparse_args(q, k, v, block_q, block_k, scale)
    if q_ranges is None:
        q_ranges = fixed_q_ranges(tq, block_q)
    check_ranges(q_ranges, kv_ranges, b, h, tq, tk, block_q)
    return masked_attention(q, k, v, cluster_token_mask(q_ranges, kv_ranges, tq, tk), scale)


def quantized_kv_attention_reference(q, cache: QuantizedKV, *, q_lengths=None, block_q: int = 64,
                                     block_k: int | None = None, scale: float | None = None,
                                     interpret: bool | None = None) -> jax.Array:
    """Reference of `quantized_kv_attention`: dequantize the cache, concatenate the window, mask by length."""
    C.check_block("block_q", block_q)
    _, q_lengths = check_cache(q, cache, q_lengths, block_k)
    scale = C.check_scale(scale, q.shape[-1])
    kq, vq = dequantize_kv(cache, jnp.float32)
    k = jnp.concatenate([kq, cache.k_recent.astype(jnp.float32)], axis=1)
    v = jnp.concatenate([vq, cache.v_recent.astype(jnp.float32)], axis=1)
    cols = jnp.concatenate([jnp.arange(cache.capacity)[None] < cache.length[:, None],
                            jnp.arange(cache.window)[None] < cache.recent_length[:, None]], axis=1)  # (B, Tk)
    rows = jnp.arange(q.shape[1])[None] < q_lengths[:, None]  # (B, Tq)
    mask = rows[:, None, :, None] & cols[:, None, None, :]
    return masked_attention(q, k, v, mask, scale)


__all__ = ["masked_attention", "block_sparse_attention_reference", "cluster_sparse_attention_reference",
           "cluster_token_mask", "quantized_kv_attention_reference"]
