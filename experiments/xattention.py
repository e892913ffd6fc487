"""XAttention (Xu et al., arXiv 2503.16428) as a sparse-attention policy for Wan-style video DiTs.

    den = sparse_attention(wan_denoiser(model), xattention(XAttentionConfig()))

Per head: group keys in runs of `stride` and queries in runs of `stride` taken in reverse order, so that one
reduced-matrix entry is the sum of the raw logits along an antidiagonal of a stride x stride tile of QK^T;
scale by 1/(sqrt(d) * stride), softmax over all key groups, and sum the probabilities over each
(block, block) sub-grid to get a block importance A[I, J]. Each query block keeps the smallest prefix of
its blocks, sorted by importance, whose mass reaches tau * (row total): block J is kept while the mass of
the blocks sorted before it is still below tau * total. The selected blocks run through the Pallas
block-sparse kernel (`implementation="kernel"`), its jnp reference (`"reference"`, masked dense) or the
plain-jnp gather path (`"gather"`, selected blocks only).

Published quirks, reproduced and named (see docs/sparse_attention.md):
* `keep_first_block`: the reference selection redirects excluded positions to index 0, so key block 0 is
  selected in every row, in the non-causal (video) mode too.
* tau >= 1 keeps every block: the HunyuanVideo code sets tau = 1.0 during warm-up to dispatch dense
  attention; with float rounding a literal tau = 1 rule could drop blocks of ~zero mass.
Deviation: padded key groups (sequence not a multiple of the block) are masked out of the softmax, as in
the fused Triton path (`softmax_fuse_block_sum`); the torch fallback leaves them in.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pallas_kernels import (ALLOWED_BLOCKS, BlockIndices, block_mask_to_indices, block_sparse_attention,
                            block_sparse_attention_gather)
from pallas_kernels.reference import block_sparse_attention_reference
from vidaccel.sparse_attention import IMPLEMENTATIONS, AttnContext, AttnSpec, Policy, PredictStats


@dataclasses.dataclass(frozen=True)
class XAttentionConfig:
    """XAttention settings; defaults are the HunyuanVideo evaluation code's (`run_vbench.py`).

    threshold: tau, a float, a per-head (heads,) or per-(layer, head) (layers, heads) sequence (0.9).
    stride: antidiagonal stride S (8). block_size: block edge in tokens (128; the kernel takes 16..128).
    warmup_steps: first steps run dense (5 of 50). dense_layers: layers always dense (none).
    keep_first_block: reproduce the block-0 quirk (True). implementation: "kernel" (Pallas), "reference"
    (jnp masked attention, same result, dense cost) or "gather" (plain jnp over the selected blocks only,
    same result, real savings under plain XLA). interpret: passed to the kernel (None = automatic).
    """

    threshold: float | tuple = 0.9
    stride: int = 8
    block_size: int = 128
    warmup_steps: int = 5
    dense_layers: tuple[int, ...] = ()
    keep_first_block: bool = True
    implementation: str = "kernel"
    interpret: bool | None = None

    def __post_init__(self):
        t = np.asarray(self.threshold, np.float64)
        if t.ndim > 2 or not np.all(np.isfinite(t)) or np.any(t < 0) or np.any(t > 1):
            raise ValueError(f"XAttentionConfig.threshold={self.threshold!r} is invalid: a number in [0, 1], or a "
                             "(heads,) / (layers, heads) sequence of them")
        if t.ndim:
            object.__setattr__(self, "threshold", tuple(np.asarray(t).tolist()) if t.ndim == 1 else
                               tuple(tuple(r) for r in t.tolist()))
        if self.block_size not in ALLOWED_BLOCKS:
            raise ValueError(f"XAttentionConfig.block_size={self.block_size!r} is invalid; allowed: {ALLOWED_BLOCKS}")
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1 \
                or self.block_size % self.stride:
            raise ValueError(f"XAttentionConfig.stride={self.stride!r} is invalid: a positive int dividing "
                             f"block_size={self.block_size}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"XAttentionConfig.warmup_steps={self.warmup_steps!r} is invalid: an int >= 0")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.dense_layers):
            raise ValueError(f"XAttentionConfig.dense_layers={self.dense_layers!r} is invalid: a tuple of layer "
                             "indices >= 0")
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"XAttentionConfig.implementation={self.implementation!r} is invalid; allowed: "
                             f"{IMPLEMENTATIONS}")
        if self.interpret not in (None, True, False):
            raise ValueError(f"XAttentionConfig.interpret={self.interpret!r} is invalid; allowed: None, True, False")


def xattention_shapes(**overrides) -> XAttentionConfig:
    """The setting used on the embedded shapes model (512 tokens = 8 frames x 64): block 16, stride 4.

    Block 16 gives 32 blocks per row (4 per latent frame) so top-tau selection has room to act on a short
    sequence; stride 4 keeps 4 antidiagonal groups per block edge (the paper has 16 at 128 / 8).
    """
    kw = dict(block_size=16, stride=4)
    kw.update(overrides)
    return XAttentionConfig(**kw)


@struct.dataclass
class XPlan:
    """Selected blocks as kernel indices, and the work they schedule per head."""

    indices: jax.Array   # (B, H, nq, nk) int32
    counts: jax.Array    # (B, H, nq) int32
    pairs: jax.Array     # (H,) query-key pairs
    tiles: jax.Array     # (H,) block pairs


def antidiagonal_scores(q: jax.Array, k: jax.Array, stride: int, block_size: int) -> jax.Array:
    """Block importance A (B, H, nq, nk) from strided antidiagonal sums; q, k (B, N, H, D).

    Rows of A sum to the number of valid query groups in the block (each group's softmax sums to 1).
    """
    b, n, h, d = q.shape
    nb = -(-n // block_size)
    npad = nb * block_size
    g = npad // stride
    pad = ((0, 0), (0, npad - n), (0, 0), (0, 0))
    qf = jnp.pad(q.astype(jnp.float32), pad).reshape(b, g, stride, h, d)[:, :, ::-1]
    kf = jnp.pad(k.astype(jnp.float32), pad).reshape(b, g, stride, h, d)
    s = jnp.einsum("bithd,bjthd->bhij", qf, kf, precision="highest") / (math.sqrt(d) * stride)
    valid = jnp.arange(g) * stride < n
    s = jnp.where(valid[None, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(valid[None, None, :, None], p, 0.0)
    r = block_size // stride
    return p.reshape(b, h, nb, r, nb, r).sum(axis=(3, 5))


def select_blocks(importance: jax.Array, threshold: jax.Array, keep_first_block: bool = True) -> jax.Array:
    """XAttention's per-row cumulative-threshold rule: (B, H, nq, nk) importance, (H,) tau -> bool mask.

    Sort each row descending (ties by block index); keep a block when the mass sorted before it is below
    tau * row total; tau >= 1 keeps every block; `keep_first_block` adds key block 0 to every row.
    """
    a = importance.astype(jnp.float32)
    tau = jnp.asarray(threshold, jnp.float32).reshape(1, -1, 1, 1)
    required = a.sum(-1, keepdims=True) * tau
    order = jnp.argsort(-a, axis=-1, stable=True)
    sorted_a = jnp.take_along_axis(a, order, axis=-1)
    before = jnp.cumsum(sorted_a, axis=-1) - sorted_a
    keep_sorted = before < required
    mask = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)   # back to block order
    mask = mask | (tau >= 1.0)
    if keep_first_block:
        mask = mask.at[..., 0].set(True)
    return mask


def block_work(mask: jax.Array, num_tokens: int, block_size: int) -> tuple[jax.Array, jax.Array]:
    """(pairs, tiles) per head (H,) of a block mask (B, H, nq, nk) over `num_tokens` real tokens."""
    nb = mask.shape[-1]
    sizes = np.minimum(block_size, num_tokens - np.arange(nb) * block_size).astype(np.float32)
    m = mask.astype(jnp.float32)
    pairs = jnp.einsum("bhij,i,j->h", m, sizes, sizes)
    return pairs, m.sum(axis=(0, 2, 3))


def xattention(cfg: XAttentionConfig = XAttentionConfig()) -> Policy:
    """XAttention as a `Policy` for `sparse_attention` (stateless: nothing is carried between calls)."""
    if not isinstance(cfg, XAttentionConfig):
        raise TypeError(f"xattention needs an XAttentionConfig, got {type(cfg).__name__}")
    bs = cfg.block_size

    def init(spec: AttnSpec):
        return ()

    def predict(q, k, state, ctx: AttnContext):
        a = antidiagonal_scores(q, k, cfg.stride, bs)
        mask = select_blocks(a, ctx.threshold, cfg.keep_first_block)
        bi = block_mask_to_indices(mask)
        pairs, tiles = block_work(mask, q.shape[1], bs)
        b, n, h, d = q.shape
        npad = mask.shape[-1] * bs
        flops = 2.0 * npad * npad * d / cfg.stride * b * h      # the strided GEMM (softmax/sort not counted)
        return XPlan(bi.indices, bi.counts, pairs, tiles), state, PredictStats.ran(flops)

    def attend(q, k, v, plan: XPlan, ctx: AttnContext):
        bi = BlockIndices(plan.indices, plan.counts)
        if cfg.implementation == "kernel":
            return block_sparse_attention(q, k, v, bi, block_q=bs, block_k=bs, interpret=cfg.interpret)
        if cfg.implementation == "gather":
            return block_sparse_attention_gather(q, k, v, bi, block_q=bs, block_k=bs)
        return block_sparse_attention_reference(q, k, v, bi, block_q=bs, block_k=bs)

    def tiles_dense(spec: AttnSpec) -> float:
        nb = -(-spec.tokens // bs)
        return float(spec.batch * nb * nb)

    return Policy(name="xattention", init=init, predict=predict, attend=attend, thresholds=cfg.threshold,
                  dense_steps=lambda steps: min(cfg.warmup_steps, steps), dense_layers=lambda layers: cfg.dense_layers,
                  tiles_dense=tiles_dense)


__all__ = ["XAttentionConfig", "xattention_shapes", "XPlan", "antidiagonal_scores", "select_blocks", "block_work",
           "xattention"]
