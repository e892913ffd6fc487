"""Block-sparse attention forward kernels (Pallas): fixed blocks (XAttention) and variable clusters (SVG2).

Layout follows `jax.nn.dot_product_attention`: q (B, Tq, H, D), k and v (B, Tk, H, D), output like q.
Both kernels are FlashAttention-2 style: one program per (query tile, batch, head) keeps an fp32 online
softmax and loops over *only the kv tiles selected for that query tile* (a data-dependent trip count read
from the index arrays), so the work is proportional to the density. K and V stay in HBM as whole
per-(batch, head) refs and are sliced at the selected offsets inside the loop (the "gather inside the
kernel" design of JAX's GPU attention, rather than a grid over max_k steps, which would cost the same for
every density).

A query row that selects no block gets an output of exact zeros (dense softmax over an empty set is
undefined; zeros keep the residual stream unchanged and are what the reference computes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as C
from pallas_kernels._indices import BlockIndices, as_block_indices
from pallas_kernels._ranges import check_ranges, fixed_q_ranges


def _bcast_map(share_b: bool, share_h: bool):
    """Index-map helper: batch / head index, or 0 when the mask is shared along that axis."""
    return (lambda b: 0) if share_b else (lambda b: b), (lambda h: 0) if share_h else (lambda h: h)


# --------------------------------------------------------------------------- fixed-size blocks

def _block_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, *, block_k: int, num_k: int, scale: float):
    q = q_ref[...]
    bq = q.shape[0]

    def body(j, carry):
        acc, m, l = carry
        start = idx_ref[j] * block_k
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        valid = start + C.col_iota(bq, block_k) < num_k  # padded keys of the last block
        p, alpha, m, l = C.softmax_step(m, l, s, valid)
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m, l

    acc, _, l = lax.fori_loop(0, cnt_ref[0], body, C.init_carry(bq, q.shape[1]))
    o_ref[...] = C.finish(acc, l).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "scale", "interpret", "share_b", "share_h"))
def _block_call(q, k, v, indices, counts, *, block_q, block_k, scale, interpret, share_b, share_h):
    b, tq, h, d = q.shape
    tk = k.shape[1]
    nq, nk = pl.cdiv(tq, block_q), pl.cdiv(tk, block_k)
    dp = C.padded_head_dim(d)
    qp = C.pad_axis(C.pad_axis(q, 1, nq * block_q), 3, dp)
    kp = C.pad_axis(C.pad_axis(k, 1, nk * block_k), 3, dp)
    vp = C.pad_axis(C.pad_axis(v, 1, nk * block_k), 3, dp)
    mb, mh = _bcast_map(share_b, share_h)
    max_k = indices.shape[-1]
    out = pl.pallas_call(
        functools.partial(_block_kernel, block_k=block_k, num_k=tk, scale=scale),
        grid=(nq, b, h),
        in_specs=[
            pl.BlockSpec((None, None, None, max_k), lambda i, bi, hi: (mb(bi), mh(hi), i, 0)),
            pl.BlockSpec((None, None, 1), lambda i, bi, hi: (mb(bi), mh(hi), i)),
            pl.BlockSpec((None, block_q, None, dp), lambda i, bi, hi: (bi, i, hi, 0)),
            pl.BlockSpec((None, nk * block_k, None, dp), lambda i, bi, hi: (bi, 0, hi, 0)),
            pl.BlockSpec((None, nk * block_k, None, dp), lambda i, bi, hi: (bi, 0, hi, 0)),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, dp), lambda i, bi, hi: (bi, i, hi, 0)),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=C.compiler_params(interpret, dp),
        interpret=interpret,
        name="block_sparse_attention",
    )(indices, counts, qp, kp, vp)
    return out[:, :tq, :, :d]


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_mask, *, block_q: int,
                           block_k: int, scale: float | None = None, interpret: bool | None = None) -> jax.Array:
    """Softmax attention restricted to selected (query block, kv block) pairs, per batch element and head.

    q (B, Tq, H, D), k/v (B, Tk, H, D), float32 or bfloat16 (fp32 accumulation either way).
    block_mask: bool (B, H, nq, nk), an int32 index list (B, H, nq, max_k) with trailing -1 padding, or a
      `BlockIndices`; nq = ceil(Tq/block_q), nk = ceil(Tk/block_k); B and H may be 1 (shared).
    block_q, block_k: 16, 32, 64 or 128. Lengths need not be multiples: inputs are zero-padded inside and
      padded keys are masked out.
    scale: logit scale, default 1/sqrt(D).
    interpret: None = Pallas interpret mode everywhere except GPU.
    Rows whose query block selects nothing return zeros.
    """
    b, tq, tk, h, d, block_q, block_k, scale = C.check_sparse_args(q, k, v, block_q, block_k, scale)
    interpret = C.resolve_interpret(interpret)
    nq, nk = pl.cdiv(tq, block_q), pl.cdiv(tk, block_k)
    bi = as_block_indices(block_mask, b, h, nq, nk)
    return _block_call(q, k, v, bi.indices, bi.counts, block_q=block_q, block_k=block_k, scale=scale,
                       interpret=interpret, share_b=bi.indices.shape[0] == 1 and b > 1,
                       share_h=bi.indices.shape[1] == 1 and h > 1)


# --------------------------------------------------------------------------- variable-size clusters

def _cluster_kernel(qr_ref, nr_ref, kr_ref, q_ref, k_ref, v_ref, o_ref, *, block_q: int, block_k: int,
                    scale: float):
    q_start, q_len = qr_ref[0], qr_ref[1]
    q = q_ref[pl.ds(q_start, block_q), :]

    def range_body(r, carry):
        start, length = kr_ref[r, 0], kr_ref[r, 1]

        def chunk_body(c, carry):
            acc, m, l = carry
            off = c * block_k
            k = k_ref[pl.ds(start + off, block_k), :]
            v = v_ref[pl.ds(start + off, block_k), :]
            s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
            valid = C.col_iota(block_q, block_k) < length - off  # masked tail of the run
            p, alpha, m, l = C.softmax_step(m, l, s, valid)
            acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return acc, m, l

        return lax.fori_loop(0, (length + block_k - 1) // block_k, chunk_body, carry)

    acc, _, l = lax.fori_loop(0, nr_ref[0], range_body, C.init_carry(block_q, q.shape[1]))
    out = C.finish(acc, l)
    out = jnp.where(C.row_iota(block_q, out.shape[1]) < q_len, out, 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "scale", "interpret", "share"))
def _cluster_call(q, k, v, q_ranges, kv_ranges, *, block_q, block_k, scale, interpret, share):
    b, tq, h, d = q.shape
    tk = k.shape[1]
    dp = C.padded_head_dim(d)
    # one extra block of zero padding keeps every dynamic slice [start, start + block) in bounds
    qp = C.pad_axis(C.pad_axis(q, 1, tq + block_q), 3, dp)
    kp = C.pad_axis(C.pad_axis(k, 1, tk + block_k), 3, dp)
    vp = C.pad_axis(C.pad_axis(v, 1, tk + block_k), 3, dp)
    qs_b, qs_h, ks_b, ks_h = share
    n_tiles, max_r = kv_ranges.shape[2], kv_ranges.shape[3]
    # ranges to walk per tile: up to the last non-empty one
    nonempty = kv_ranges[..., 1] > 0
    n_ranges = jnp.max(jnp.where(nonempty, jnp.arange(1, max_r + 1), 0), axis=-1).astype(jnp.int32)
    qmb, qmh = _bcast_map(qs_b, qs_h)
    kmb, kmh = _bcast_map(ks_b, ks_h)
    tiles = pl.pallas_call(
        functools.partial(_cluster_kernel, block_q=block_q, block_k=block_k, scale=scale),
        grid=(n_tiles, b, h),
        in_specs=[
            pl.BlockSpec((None, None, None, 2), lambda t, bi, hi: (qmb(bi), qmh(hi), t, 0)),
            pl.BlockSpec((None, None, 1), lambda t, bi, hi: (kmb(bi), kmh(hi), t)),
            pl.BlockSpec((None, None, None, max_r, 2), lambda t, bi, hi: (kmb(bi), kmh(hi), t, 0, 0)),
            pl.BlockSpec((None, tq + block_q, None, dp), lambda t, bi, hi: (bi, 0, hi, 0)),
            pl.BlockSpec((None, tk + block_k, None, dp), lambda t, bi, hi: (bi, 0, hi, 0)),
            pl.BlockSpec((None, tk + block_k, None, dp), lambda t, bi, hi: (bi, 0, hi, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, None, block_q, dp), lambda t, bi, hi: (bi, hi, t, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, n_tiles, block_q, dp), q.dtype),
        compiler_params=C.compiler_params(interpret, dp),
        interpret=interpret,
        name="cluster_sparse_attention",
    )(q_ranges, n_ranges, kv_ranges, qp, kp, vp)
    # scatter tiles back to token rows; rows past a tile's length go out of bounds and are dropped
    qr = jnp.broadcast_to(q_ranges, (b, h) + q_ranges.shape[2:])
    r = jnp.arange(block_q, dtype=jnp.int32)
    rows = jnp.where(r < qr[..., 1:2], qr[..., 0:1] + r, tq)  # (B, H, n_tiles, bq)
    bidx = jnp.arange(b)[:, None, None, None]
    hidx = jnp.arange(h)[None, :, None, None]
    out = jnp.zeros((b, tq, h, dp), q.dtype).at[bidx, rows, hidx].set(tiles, mode="drop")
    return out[..., :d]


def cluster_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_ranges: jax.Array, *,
                             q_ranges: jax.Array | None = None, block_q: int, block_k: int,
                             scale: float | None = None, interpret: bool | None = None) -> jax.Array:
    """Block-sparse attention over variable-size token ranges (SVG2 after permutation).

    q (B, Tq, H, D), k/v (B, Tk, H, D) float32 / bfloat16, already permuted so clusters are contiguous.
    kv_ranges: (B, H, n_tiles, max_ranges, 2) int32 (start, length) key runs per query tile; zero-length
      entries are padding; each run is walked in `block_k` chunks with a masked tail.
    q_ranges: (B, H, n_tiles, 2) int32 (start, length <= block_q) query tiles, or None for the fixed tiling
      [i*block_q, (i+1)*block_q) (then n_tiles = ceil(Tq/block_q)).
    B and H of either array may be 1 (shared). Rows outside every tile, and tiles with no key, return zeros.
    See `pallas_kernels._ranges` for the contract and `clusters_to_ranges` to build the arrays.
    """
    b, tq, tk, h, d, block_q, block_k, scale = C.check_sparse_args(q, k, v, block_q, block_k, scale)
    interpret = C.resolve_interpret(interpret)
    if q_ranges is None:
        q_ranges = fixed_q_ranges(tq, block_q)
    check_ranges(q_ranges, kv_ranges, b, h, tq, tk, block_q)
    share = (q_ranges.shape[0] == 1 and b > 1, q_ranges.shape[1] == 1 and h > 1,
             kv_ranges.shape[0] == 1 and b > 1, kv_ranges.shape[1] == 1 and h > 1)
    return _cluster_call(q, k, v, jnp.asarray(q_ranges, jnp.int32), jnp.asarray(kv_ranges, jnp.int32),
                         block_q=block_q, block_k=block_k, scale=scale, interpret=interpret, share=share)


__all__ = ["BlockIndices", "block_sparse_attention", "cluster_sparse_attention"]
