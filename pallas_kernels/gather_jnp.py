"""Sparse attention in plain jnp that skips the unselected work: gather the selected keys, attend over them.

The Pallas kernels run compiled only on GPU (interpret mode elsewhere is far too slow for whole runs), and
the references in `pallas_kernels.reference` are masked *dense* attention: the right result at dense cost.
The two functions here have the kernels' signatures and results, and compute (nearly) only the selected
work under plain XLA. Sparse methods can then be timed honestly on CPU, and they run under `jit` on any
backend.

How it works. Every (batch, head, query tile) is a *row* with a count of selected keys: kv blocks for
`block_sparse_attention_gather`, key tokens for `cluster_sparse_attention_gather`. Rows are sorted by count,
descending, and cut into `ROW_GROUPS` groups of equal size (`group_plan`). For each group:
- Pick a width `w`: the smallest of a few static widths (`width_buckets`, multiples of 1/`WIDTH_STEPS` of
  the most there can be) that holds the group's largest count. `lax.switch` picks it (`bucket_index`), so
  shapes stay static and nothing recompiles when the counts change.
- Gather, per row, the K/V of its first `w` selected units, mask the entries past its count, and run exact
  attention over them (`attend_rows`).
- A group with nothing selected takes a branch that returns zeros, as the kernels do for empty rows.

Why groups. One width for all rows (the largest count anywhere) would waste most of the saving: counts vary
widely across heads and query tiles (diffuse ones keep many blocks, focused ones few; an EBC table mixes
thresholds per head). Sorted groups give a staircase over the sorted counts. The work
done, `gather_work`, is the sum over groups of rows x width. It exceeds the selected work by at most one
group of dense work (1/ROW_GROUPS of dense) plus the bucket rounding (under 1/WIDTH_STEPS of dense).

Limits:
- Under `vmap` a `lax.switch` becomes a select that runs every branch (more than dense work). Use the
  reference or dense attention there.
- The groups run one after another (`lax.map`).
- Every query tile gathers its own copy of its keys. Per unit of work this costs about what dense XLA
  attention costs on CPU (see docs/sparse_attention.md for measurements). On GPU, use the Pallas kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common as C
from pallas_kernels._indices import as_block_indices
from pallas_kernels._ranges import check_ranges, fixed_q_ranges

WIDTH_STEPS = 8              # static gather widths: multiples of ceil(n / 8) up to n
ROW_GROUPS = 16              # rows are cut into this many count-sorted groups, or more when
MAX_GROUP_LOGITS = 1 << 24   # one group's logits (rows x query tile x widest width) would pass 64 MB of fp32


def width_buckets(n: int, steps: int = WIDTH_STEPS) -> tuple[int, ...]:
    """Static gather widths for up to `n` selected units: ceil(j * n / steps) for j = 1..steps, ascending,
    without repeats (so n < steps gives 1..n)."""
    n, steps = C.check_int("n", n, 1), C.check_int("steps", steps, 1)
    return tuple(sorted({-(-j * n // steps) for j in range(1, steps + 1)}))


def bucket_index(count: jax.Array, widths: tuple[int, ...]) -> jax.Array:
    """Switch branch for a group whose largest count is `count`: 0 = nothing selected (zeros), else 1 + the
    index of the smallest width >= count. A count above the widest width breaks the caller's contract and is
    clipped to the widest."""
    i = jnp.searchsorted(jnp.asarray(widths, jnp.int32), count, side="left")
    return jnp.where(count > 0, 1 + jnp.minimum(i, len(widths) - 1), 0).astype(jnp.int32)


def group_plan(num_rows: int, n: int, row_len: int, unit: int = 1) -> tuple[tuple[int, ...], int]:
    """Static plan for `num_rows` rows of `row_len` queries that select up to `n` units of `unit` keys each:
    the widths (`width_buckets(n)`) and the rows per group: ceil(num_rows / ROW_GROUPS), or fewer when one
    group's widest logits (rows x row_len x n x unit) would pass MAX_GROUP_LOGITS."""
    widths = width_buckets(n)
    per = -(-num_rows // ROW_GROUPS)
    return widths, max(1, min(per, MAX_GROUP_LOGITS // max(1, row_len * widths[-1] * unit)))


def _schedule(counts: jax.Array, widths: tuple[int, ...], rows_per_group: int):
    """Sort rows by count (descending) and cut them into groups.

    Returns row ids (G, R), counts (G, R), each group's switch branch (G,) and the sort order (r,). Padding
    rows (up to a multiple of R) get row id 0 and count 0; their outputs are dropped.
    """
    r = counts.shape[0]
    g = -(-r // rows_per_group)
    order = jnp.argsort(-counts, stable=True).astype(jnp.int32)
    pad = g * rows_per_group - r
    ids = jnp.pad(order, (0, pad)).reshape(g, rows_per_group)
    cnt = jnp.pad(counts[order], (0, pad)).reshape(g, rows_per_group)
    return ids, cnt, bucket_index(jnp.max(cnt, axis=1), widths), order


def gather_work(counts: jax.Array, n: int, *, row_len: int, unit: int = 1) -> jax.Array:
    """Units the gather path attends to, padding included, summed over rows (the sum over groups of rows x
    the width chosen), for per-row `counts` (any shape: one entry per (batch, head, query tile)) of at most
    `n` units. Compare with counts.sum(), the units selected. Blocks: n = nk, row_len = block_q,
    unit = block_k. Clusters: n = Tk, row_len = block_q, unit = 1 (key tokens; dead tiles count 0)."""
    counts = jnp.asarray(counts, jnp.int32).reshape(-1)
    widths, rpg = group_plan(counts.shape[0], n, row_len, unit)
    _, _, branch, _ = _schedule(counts, widths, rpg)
    return jnp.sum(jnp.asarray((0,) + widths, jnp.int32)[branch]) * rpg


def attend_rows(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, scale: float) -> jax.Array:
    """Exact softmax attention per row: q (R, Tq, D) over k, v (R, Tk, D) where `valid` (R, Tk) is True.

    Rows with no valid key give zeros. Matmuls take the input dtype and accumulate in fp32; the softmax is
    fp32. This is the math of `reference.masked_attention`, arranged for speed: one additive mask, and the
    normalisation applied to the (R, Tq, D) output rather than the (R, Tq, Tk) weights, as the kernels do.
    On CPU this runs about 2x faster.
    """
    # The barrier makes XLA build the (R, Tk) mask once. Otherwise it fuses the mask arithmetic into every
    # (R, Tq, Tk) consumer, which doubled the time of a call on CPU at 512 tokens.
    bias = lax.optimization_barrier(jnp.where(valid, 0.0, -jnp.inf).astype(jnp.float32))
    s = jnp.einsum("rqd,rkd->rqk", q, k, precision="highest", preferred_element_type=jnp.float32)
    s = s * scale + bias[:, None, :]
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(m > -jnp.inf, m, 0.0))           # all-masked row: exp(-inf) = 0 everywhere
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("rqk,rkd->rqd", p.astype(v.dtype), v, precision="highest", preferred_element_type=jnp.float32)
    return (o / jnp.where(l > 0, l, 1.0)).astype(q.dtype)


def _ragged_attention(q_rows, counts, k_units, v_units, select, n, scale):
    """Attention of every row over its gathered keys, grouped and bucketed as the module docstring says.

    q_rows (r, row_len, D); counts (r,) int32, at most n. k_units, v_units (U, unit, D): the keys in units (a
    kv block, or one token). select(ids (R,), cnt (R,)) -> the rows' selected unit numbers in order, (R, n)
    int32 (entries past a row's count may be anything in range), and valid (R, n * unit) bool. It runs once
    per group outside the switch; a branch of width w takes the first w units. Returns (r, row_len, D).
    """
    r, row_len, d = q_rows.shape
    unit = k_units.shape[1]
    widths, rows_per_group = group_plan(r, n, row_len, unit)
    ids, cnt, branch, order = _schedule(counts, widths, rows_per_group)

    def zeros(q, sel, valid):
        return jnp.zeros_like(q)

    def attend(width, q, sel, valid):
        sel = sel[:, :width]
        k = k_units[sel].reshape(rows_per_group, width * unit, d)
        v = v_units[sel].reshape(rows_per_group, width * unit, d)
        return attend_rows(q, k, v, valid[:, :width * unit], scale)

    def group(x):
        ids, cnt, branch = x
        sel, valid = select(ids, cnt)
        return lax.switch(branch, [zeros] + [functools.partial(attend, w) for w in widths], q_rows[ids], sel, valid)

    out = lax.map(group, (ids, cnt, branch))
    return out.reshape(-1, row_len, d)[:r][jnp.argsort(order)]


# --------------------------------------------------------------------------- fixed-size blocks

def block_sparse_attention_gather(q, k, v, block_mask, *, block_q: int, block_k: int, scale: float | None = None,
                                  interpret: bool | None = None) -> jax.Array:
    """`block_sparse_attention`, computed in plain jnp over the selected blocks only.

    Same arguments, checks and result as the kernel; `interpret` is accepted and ignored. Rows whose query
    block selects nothing return zeros.
    """
    b, tq, tk, h, d, block_q, block_k, scale = C.check_sparse_args(q, k, v, block_q, block_k, scale)
    nq, nk = -(-tq // block_q), -(-tk // block_k)
    bi = as_block_indices(block_mask, b, h, nq, nk)
    return _block_gather(q, k, v, bi.indices, bi.counts, block_q=block_q, block_k=block_k, scale=scale)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "scale"))
def _block_gather(q, k, v, indices, counts, *, block_q, block_k, scale):
    b, tq, h, d = q.shape
    tk = k.shape[1]
    nq, nk = -(-tq // block_q), -(-tk // block_k)
    n = min(indices.shape[-1], nk)                                          # most blocks a row can select

    def blocks(x, nb, size):          # (B, T, H, D) -> (B*H*nb, size, D), zero-padded to nb blocks
        x = C.pad_axis(x, 1, nb * size).reshape(b, nb, size, h, d)
        return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(b * h * nb, size, d)

    idx = jnp.broadcast_to(indices, (b, h, nq, indices.shape[-1])).reshape(b * h * nq, -1)[:, :n]
    cnt = jnp.broadcast_to(counts, (b, h, nq)).reshape(-1)
    token = jnp.arange(block_k, dtype=jnp.int32)

    def select(ids, cnt_g):
        live = jnp.arange(n) < cnt_g[:, None]                               # (R, n) selected entries
        sel = jnp.where(live, idx[ids], 0)
        valid = live[:, :, None] & (sel[:, :, None] * block_k + token < tk)   # and not a padded key
        return (ids // nq)[:, None] * nk + sel, valid.reshape(ids.shape[0], n * block_k)

    out = _ragged_attention(blocks(q, nq, block_q), cnt, blocks(k, nk, block_k), blocks(v, nk, block_k), select, n,
                            scale)                                          # (B*H*nq, bq, D)
    out = jnp.transpose(out.reshape(b, h, nq, block_q, d), (0, 2, 3, 1, 4)).reshape(b, nq * block_q, h, d)
    return out[:, :tq]


# --------------------------------------------------------------------------- variable-size clusters

def cluster_sparse_attention_gather(q, k, v, kv_ranges, *, q_ranges=None, block_q: int, block_k: int,
                                    scale: float | None = None, interpret: bool | None = None) -> jax.Array:
    """`cluster_sparse_attention`, computed in plain jnp over each query tile's selected key tokens only.

    Same arguments, checks and result as the kernel; `interpret` is accepted and ignored. `block_k` is
    checked but unused: keys are gathered token by token, so no partly filled key chunk is computed.
    """
    b, tq, tk, h, d, block_q, _, scale = C.check_sparse_args(q, k, v, block_q, block_k, scale)
    if q_ranges is None:
        q_ranges = fixed_q_ranges(tq, block_q)
    check_ranges(q_ranges, kv_ranges, b, h, tq, tk, block_q)
    return _cluster_gather(q, k, v, jnp.asarray(q_ranges, jnp.int32), jnp.asarray(kv_ranges, jnp.int32),
                           block_q=block_q, scale=scale)


@functools.partial(jax.jit, static_argnames=("block_q", "scale"))
def _cluster_gather(q, k, v, q_ranges, kv_ranges, *, block_q, scale):
    b, tq, h, d = q.shape
    tk = k.shape[1]
    n_tiles, max_r = kv_ranges.shape[2], kv_ranges.shape[3]
    qr = jnp.broadcast_to(q_ranges, (b, h, n_tiles, 2)).reshape(-1, 2)
    kr = jnp.broadcast_to(kv_ranges, (b, h, n_tiles, max_r, 2)).reshape(-1, max_r, 2)

    def per_head(x):                  # (B, T, H, D) -> (B*H*T, D)
        return jnp.transpose(x, (0, 2, 1, 3)).reshape(-1, d)

    head = jnp.arange(b * h * n_tiles, dtype=jnp.int32) // n_tiles             # (batch, head) of each tile
    ends = jnp.cumsum(kr[..., 1], axis=-1)                                     # (r, max_r) run ends
    cnt = jnp.where(qr[:, 1] > 0, ends[:, -1], 0)                              # key tokens per live tile
    qpos = jnp.arange(block_q, dtype=jnp.int32)
    q_live = qpos < qr[:, 1:2]
    q_tok = head[:, None] * tq + jnp.where(q_live, qr[:, 0:1] + qpos, 0)       # (r, bq) query token rows
    j = jnp.arange(tk, dtype=jnp.int32)

    def select(ids, cnt_g):                                                    # the j-th selected key of a tile
        e, runs = ends[ids], kr[ids]
        find = jax.vmap(lambda e: jnp.searchsorted(e, j, side="right", method="scan_unrolled"))   # no loop
        run = jnp.minimum(find(e), max_r - 1)
        start = jnp.take_along_axis(runs[..., 0], run, axis=1)
        before = jnp.take_along_axis(e - runs[..., 1], run, axis=1)             # tokens in earlier runs
        live = j < cnt_g[:, None]
        return head[ids][:, None] * tk + jnp.where(live, start + j - before, 0), live

    kf, vf = per_head(k)[:, None], per_head(v)[:, None]                        # units of one token
    tiles = _ragged_attention(per_head(q)[q_tok], cnt, kf, vf, select, tk, scale)   # (r, bq, D)
    dest = jnp.where(q_live, q_tok, b * h * tq)                                  # rows outside a tile: dropped
    out = jnp.zeros((b * h * tq, d), q.dtype).at[dest].set(tiles, mode="drop")
    return jnp.transpose(out.reshape(b, h, tq, d), (0, 2, 1, 3))


__all__ = ["WIDTH_STEPS", "ROW_GROUPS", "MAX_GROUP_LOGITS", "width_buckets", "bucket_index", "group_plan",
           "gather_work", "attend_rows", "block_sparse_attention_gather", "cluster_sparse_attention_gather"]
