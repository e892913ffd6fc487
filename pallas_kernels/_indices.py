"""Block-mask representations for block-sparse attention and the conversions between them.

Three ways to say which kv blocks each query block attends to (B = batch, H = heads, nq = ceil(Tq/block_q),
nk = ceil(Tk/block_k)); B and H may also be 1 (one mask shared by every batch element / head):

* a boolean block mask, `(B, H, nq, nk)`: True = attend to that block;
* an int32 index list, `(B, H, nq, max_k)`: the selected kv-block numbers first, then -1 padding;
* a `BlockIndices(indices, counts)`: `indices (B, H, nq, max_k)` int32 and `counts (B, H, nq)` int32; only
  `indices[..., :count]` are read. This is what the kernel consumes; the other two are converted to it.

Selected blocks of a row must be distinct (a repeated block would be counted twice). When the arrays are
concrete (not traced) this is checked, with the ranges; under `jit` it is the caller's contract, and
`block_mask_to_indices` always produces valid lists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pallas_kernels._common import is_concrete


@struct.dataclass
class BlockIndices:
    """Per (batch, head, query block): kv-block numbers `indices[..., :counts]` to attend to."""

    indices: jax.Array  # (B, H, nq, max_k) int32
    counts: jax.Array  # (B, H, nq) int32


def block_mask_to_indices(block_mask: jax.Array) -> BlockIndices:
    """Boolean block mask (B, H, nq, nk) -> BlockIndices with max_k = nk (jittable, no data loss).

    Selected blocks come first in increasing order; the rest of each row is -1.
    """
    block_mask = jnp.asarray(block_mask)
    if block_mask.dtype != jnp.bool_:
        raise TypeError(f"block_mask must be boolean, got dtype {block_mask.dtype}")
    if block_mask.ndim != 4:
        raise ValueError(f"block_mask must have shape (batch, heads, q_blocks, kv_blocks), got {block_mask.shape}")
    order = jnp.argsort(~block_mask, axis=-1, stable=True).astype(jnp.int32)
    counts = jnp.sum(block_mask, axis=-1, dtype=jnp.int32)
    keep = jnp.arange(block_mask.shape[-1], dtype=jnp.int32) < counts[..., None]
    return BlockIndices(jnp.where(keep, order, -1), counts)


def indices_to_block_mask(indices: BlockIndices, num_kv_blocks: int) -> jax.Array:
    """BlockIndices -> boolean block mask (B, H, nq, num_kv_blocks) (jittable)."""
    idx, cnt = indices.indices, indices.counts
    live = jnp.arange(idx.shape[-1]) < cnt[..., None]
    target = jnp.where(live, idx, num_kv_blocks)
    onehot = jax.nn.one_hot(target, num_kv_blocks + 1, dtype=jnp.bool_)
    return jnp.any(onehot, axis=-2)[..., :num_kv_blocks]


def token_mask_to_block_mask(token_mask: jax.Array, block_q: int, block_k: int) -> jax.Array:
    """Token mask (B, H, Tq, Tk) -> block mask (B, H, ceil(Tq/bq), ceil(Tk/bk)): a block is kept when any of
    its token pairs is True.

    The kernels run whole blocks, so this is exact only for block-aligned masks; a partially True block is
    attended in full (a superset of the token mask).
    """
    token_mask = jnp.asarray(token_mask)
    if token_mask.dtype != jnp.bool_ or token_mask.ndim != 4:
        raise ValueError(f"token_mask must be a boolean (B, H, Tq, Tk) array, got {token_mask.dtype} "
                         f"{token_mask.shape}")
    b, h, tq, tk = token_mask.shape
    nq, nk = -(-tq // block_q), -(-tk // block_k)
    padded = jnp.pad(token_mask, ((0, 0), (0, 0), (0, nq * block_q - tq), (0, nk * block_k - tk)))
    return padded.reshape(b, h, nq, block_q, nk, block_k).any(axis=(3, 5))


def index_list_to_indices(index_list: jax.Array) -> BlockIndices:
    """int (B, H, nq, max_k) list with trailing -1 padding -> BlockIndices (counts = entries >= 0)."""
    index_list = jnp.asarray(index_list, jnp.int32)
    return BlockIndices(index_list, jnp.sum(index_list >= 0, axis=-1, dtype=jnp.int32))


def shrink_indices(indices: BlockIndices) -> BlockIndices:
    """Trim max_k to the largest count actually present (eager only: needs concrete counts; loses nothing)."""
    if not is_concrete(indices.counts):
        raise ValueError("shrink_indices needs concrete counts; call it outside jit")
    width = max(int(jnp.max(indices.counts)), 1)
    return BlockIndices(indices.indices[..., :width], indices.counts)


def _check_leading(name: str, shape: tuple[int, ...], batch: int, heads: int, rest: tuple[int, ...]) -> None:
    ok = (len(shape) == 2 + len(rest) and shape[0] in (1, batch) and shape[1] in (1, heads)
          and tuple(shape[2:]) == rest)
    if not ok:
        want = f"({batch} or 1, {heads} or 1, " + ", ".join(map(str, rest)) + ")"
        raise ValueError(f"{name} has shape {shape}; expected {want}")


def _check_rows(idx: np.ndarray, cnt: np.ndarray, num_kv_blocks: int, what: str) -> None:
    """Live entries in [0, nk) and distinct per row (numpy, concrete inputs only)."""
    width = idx.shape[-1]
    live = np.arange(width) < cnt[..., None]
    bad = live & ((idx < 0) | (idx >= num_kv_blocks))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what}: kv-block index {int(idx[where])} at {where} is outside [0, {num_kv_blocks})")
    # distinctness: replace dead entries by distinct negatives, sort, compare neighbours
    filler = -2 - np.arange(width)
    vals = np.sort(np.where(live, idx, np.broadcast_to(filler, idx.shape)), axis=-1)
    dup = (vals[..., 1:] == vals[..., :-1]) & (vals[..., 1:] >= 0)
    if dup.any():
        row = tuple(int(i) for i in np.argwhere(dup)[0][:-1])
        raise ValueError(f"{what}: query-block row {row} selects a kv block more than once")


def as_block_indices(block_mask, batch: int, heads: int, nq: int, nk: int) -> BlockIndices:
    """Normalise any accepted representation to BlockIndices and validate it (data checks when concrete)."""
    if isinstance(block_mask, BlockIndices):
        idx, cnt = block_mask.indices, block_mask.counts
        if not jnp.issubdtype(idx.dtype, jnp.integer) or not jnp.issubdtype(cnt.dtype, jnp.integer):
            raise TypeError(f"BlockIndices must hold integer arrays, got {idx.dtype} and {cnt.dtype}")
        if idx.ndim != 4:
            raise ValueError(f"BlockIndices.indices must be (batch, heads, q_blocks, max_k), got {idx.shape}")
        _check_leading("BlockIndices.indices", idx.shape, batch, heads, (nq, idx.shape[-1]))
        if cnt.shape != idx.shape[:3]:
            raise ValueError(f"BlockIndices.counts has shape {cnt.shape}; expected {idx.shape[:3]}")
        out = BlockIndices(jnp.asarray(idx, jnp.int32), jnp.asarray(cnt, jnp.int32))
        if is_concrete(idx, cnt):
            c = np.asarray(cnt)
            if (c < 0).any() or (c > idx.shape[-1]).any():
                raise ValueError(f"BlockIndices.counts must lie in [0, {idx.shape[-1]}], got values in "
                                 f"[{c.min()}, {c.max()}]")
            _check_rows(np.asarray(idx), c, nk, "BlockIndices")
        return out
    if not hasattr(block_mask, "dtype") or not hasattr(block_mask, "shape"):
        raise TypeError(f"block_mask must be a bool array, an int32 index list or BlockIndices, got "
                        f"{type(block_mask).__name__}")
    if block_mask.dtype == jnp.bool_:
        _check_leading("block_mask", block_mask.shape, batch, heads, (nq, nk))
        return block_mask_to_indices(block_mask)
    if jnp.issubdtype(block_mask.dtype, jnp.integer):
        if block_mask.ndim != 4:
            raise ValueError(f"index-list block_mask must be (batch, heads, q_blocks, max_k), got {block_mask.shape}")
        _check_leading("index-list block_mask", block_mask.shape, batch, heads, (nq, block_mask.shape[-1]))
        out = index_list_to_indices(block_mask)
        if is_concrete(block_mask):
            idx = np.asarray(block_mask)
            if (idx < -1).any():
                raise ValueError(f"index-list block_mask: entries must be >= -1 (-1 = padding), got {idx.min()}")
            neg = idx < 0
            if (neg[..., :-1] & ~neg[..., 1:]).any():
                raise ValueError("index-list block_mask: -1 padding must come after every selected block of a row")
            _check_rows(idx, neg.shape[-1] - neg.sum(-1), nk, "index-list block_mask")
        return out
    raise TypeError(f"block_mask must be bool (block mask) or integer (index list), got dtype {block_mask.dtype}")
