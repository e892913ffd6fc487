"""Range representation for variable-size (SVG2 cluster) block-sparse attention.

After SVG2's semantic-aware permutation every query cluster and every key cluster is a contiguous run of
tokens. The cluster kernel takes

* `q_ranges (B, H, n_tiles, 2)` int32: `(start, length)` of each query tile, `0 <= length <= block_q`;
  a cluster longer than `block_q` is split into several tiles with the same kv ranges. Zero-length tiles
  are padding. Tiles must not overlap; query rows covered by no tile get zeros.
* `kv_ranges (B, H, n_tiles, max_ranges, 2)` int32: `(start, length)` key runs each tile attends to, any
  length >= 0 (the kernel walks each run in `block_k` chunks and masks the tail); zero-length entries are
  padding. Runs of one tile must not overlap (a key would be counted twice).

B and H may be 1 (shared across batch / heads). `clusters_to_ranges` builds both arrays from SVG2's
cluster sizes and cluster-level selection, merging adjacent selected key clusters into one run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import check_block, check_int, is_concrete


def fixed_q_ranges(num_q: int, block_q: int) -> jax.Array:
    """(1, 1, ceil(Tq/bq), 2) ranges of the plain fixed tiling [i*bq, min((i+1)*bq, Tq))."""
    n = -(-num_q // block_q)
    starts = np.arange(n, dtype=np.int32) * block_q
    lengths = np.minimum(block_q, num_q - starts).astype(np.int32)
    return jnp.asarray(np.stack([starts, lengths], -1)[None, None])


def _leading_ok(shape, batch, heads) -> bool:
    return shape[0] in (1, batch) and shape[1] in (1, heads)


def check_ranges(q_ranges, kv_ranges, batch: int, heads: int, tq: int, tk: int, block_q: int) -> None:
    """Shape / dtype checks always; value checks (bounds, overlaps) when the arrays are concrete."""
    for name, r, nd in (("q_ranges", q_ranges, 4), ("kv_ranges", kv_ranges, 5)):
        if not hasattr(r, "dtype") or not jnp.issubdtype(r.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array, got {getattr(r, 'dtype', type(r).__name__)}")
        if r.ndim != nd or r.shape[-1] != 2 or not _leading_ok(r.shape, batch, heads):
            want = "(B, H, n_tiles, 2)" if nd == 4 else "(B, H, n_tiles, max_ranges, 2)"
            raise ValueError(f"{name} has shape {r.shape}; expected {want} with B in (1, {batch}), "
                             f"H in (1, {heads})")
    if q_ranges.shape[2] != kv_ranges.shape[2]:
        raise ValueError(f"q_ranges has {q_ranges.shape[2]} tiles but kv_ranges has {kv_ranges.shape[2]}")
    if not is_concrete(q_ranges, kv_ranges):
        return
    qr, kr = np.asarray(q_ranges), np.asarray(kv_ranges)
    qs, ql = qr[..., 0], qr[..., 1]
    if (ql < 0).any() or (ql > block_q).any():
        raise ValueError(f"q_ranges lengths must lie in [0, block_q={block_q}], got [{ql.min()}, {ql.max()}]")
    live = ql > 0
    if ((qs < 0) | (qs + ql > tq))[live].any():
        raise ValueError(f"q_ranges must lie inside [0, Tq={tq}); got a tile "
                         f"{qr[live & ((qs < 0) | (qs + ql > tq))][0].tolist()}")
    ks, kl = kr[..., 0], kr[..., 1]
    if (kl < 0).any():
        raise ValueError(f"kv_ranges lengths must be >= 0, got {kl.min()}")
    klive = kl > 0
    if ((ks < 0) | (ks + kl > tk))[klive].any():
        raise ValueError(f"kv_ranges must lie inside [0, Tk={tk}); got a range "
                         f"{kr[klive & ((ks < 0) | (ks + kl > tk))][0].tolist()}")
    if _overlaps(qs, ql, axis_rows=2):
        raise ValueError("q_ranges: two query tiles of one (batch, head) overlap")
    if _overlaps(ks, kl, axis_rows=3):
        raise ValueError("kv_ranges: two key ranges of one query tile overlap")


def _overlaps(starts: np.ndarray, lengths: np.ndarray, axis_rows: int) -> bool:
    """Whether any two non-empty intervals along the last axis overlap (per leading index)."""
    starts = starts.reshape(-1, starts.shape[-1]).astype(np.int64)
    lengths = lengths.reshape(-1, lengths.shape[-1]).astype(np.int64)
    big = np.iinfo(np.int64).max // 4
    s = np.where(lengths > 0, starts, big)
    order = np.argsort(s, axis=-1, kind="stable")
    s_sorted = np.take_along_axis(s, order, -1)
    e_sorted = s_sorted + np.take_along_axis(lengths, order, -1)
    return bool(((s_sorted[:, 1:] < e_sorted[:, :-1]) & (s_sorted[:, 1:] < big)).any())


def _runs_one_row(sel: jax.Array, k_sizes: jax.Array, k_off: jax.Array, max_runs: int) -> jax.Array:
    """Merge adjacent selected key clusters of one query cluster into (start, length) runs, (max_runs, 2)."""
    prev = jnp.concatenate([jnp.zeros((1,), bool), sel[:-1]])
    first = sel & ~prev
    run_id = jnp.cumsum(first) - 1
    lengths = jnp.zeros((max_runs,), jnp.int32).at[jnp.where(sel, run_id, max_runs)].add(k_sizes, mode="drop")
    starts = jnp.zeros((max_runs,), jnp.int32).at[jnp.where(first, run_id, max_runs)].set(k_off, mode="drop")
    return jnp.stack([starts, lengths], -1)


def _tiles_one_head(q_sizes, k_sizes, sel, block_q: int, max_tiles: int):
    nkc = k_sizes.shape[0]
    max_runs = (nkc + 1) // 2
    k_off = jnp.cumsum(k_sizes) - k_sizes
    runs = jax.vmap(_runs_one_row, (0, None, None, None))(sel, k_sizes, k_off, max_runs)  # (nqc, R, 2)
    q_off = jnp.cumsum(q_sizes) - q_sizes
    n_tiles = -(-q_sizes // block_q)
    incl = jnp.cumsum(n_tiles)
    t = jnp.arange(max_tiles, dtype=jnp.int32)
    c = jnp.searchsorted(incl, t, side="right")
    live = c < q_sizes.shape[0]
    c = jnp.minimum(c, q_sizes.shape[0] - 1)
    local = t - (incl[c] - n_tiles[c])
    starts = jnp.where(live, q_off[c] + local * block_q, 0)
    lengths = jnp.where(live, jnp.minimum(block_q, q_sizes[c] - local * block_q), 0)
    kv = jnp.where(live[:, None, None], runs[c], 0)
    return jnp.stack([starts, lengths], -1).astype(jnp.int32), kv.astype(jnp.int32)


def clusters_to_ranges(cluster_mask: jax.Array, q_sizes: jax.Array, k_sizes: jax.Array, *, block_q: int,
                       num_q_tokens: int) -> tuple[jax.Array, jax.Array]:
    """SVG2 clusters -> (q_ranges, kv_ranges) for `cluster_sparse_attention` (jittable).

    cluster_mask: (B, H, nqc, nkc) bool, key clusters selected for each query cluster.
    q_sizes (B, H, nqc), k_sizes (B, H, nkc): cluster sizes in permuted order (cluster c occupies the tokens
    after clusters 0..c-1); q_sizes must sum to `num_q_tokens` per (batch, head).
    Returns q_ranges (B, H, n_tiles, 2) with n_tiles = (num_q_tokens + nqc*(block_q-1)) // block_q, the most
    tiles any size split can need, and kv_ranges (B, H, n_tiles, ceil(nkc/2), 2), ceil(nkc/2) being the most
    runs a selection can form. Nothing is truncated.
    """
    cluster_mask, q_sizes, k_sizes = (jnp.asarray(x) for x in (cluster_mask, q_sizes, k_sizes))
    if cluster_mask.dtype != jnp.bool_ or cluster_mask.ndim != 4:
        raise ValueError(f"cluster_mask must be a boolean (B, H, nqc, nkc) array, got {cluster_mask.dtype} "
                         f"{cluster_mask.shape}")
    b, h, nqc, nkc = cluster_mask.shape
    block_q = check_block("block_q", block_q)
    num_q_tokens = check_int("num_q_tokens", num_q_tokens, 1)
    for name, x, n in (("q_sizes", q_sizes, nqc), ("k_sizes", k_sizes, nkc)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must be integer, got {x.dtype}")
        if x.shape != (b, h, n):
            raise ValueError(f"{name} has shape {x.shape}; expected {(b, h, n)}")
    if is_concrete(q_sizes, k_sizes):
        if (np.asarray(q_sizes) < 0).any() or (np.asarray(k_sizes) < 0).any():
            raise ValueError("cluster sizes must be >= 0")
        totals = np.asarray(q_sizes).sum(-1)
        if (totals != num_q_tokens).any():
            raise ValueError(f"q_sizes must sum to num_q_tokens={num_q_tokens} per (batch, head); got sums "
                             f"{np.unique(totals).tolist()}")
    max_tiles = (num_q_tokens + nqc * (block_q - 1)) // block_q
    return _clusters_to_ranges(cluster_mask, q_sizes.astype(jnp.int32), k_sizes.astype(jnp.int32),
                               block_q=block_q, max_tiles=max_tiles)


@functools.partial(jax.jit, static_argnames=("block_q", "max_tiles"))
def _clusters_to_ranges(cluster_mask, q_sizes, k_sizes, *, block_q, max_tiles):
    fn = jax.vmap(jax.vmap(lambda a, c, s: _tiles_one_head(a, c, s, block_q, max_tiles)))
    return fn(q_sizes, k_sizes, cluster_mask)
