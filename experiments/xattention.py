"""XAttention (Xu et al., arXiv 2503.16428) as a sparse-attention policy for Wan-style video DiTs.

    den = sparse_attention(wan_denoiser(model), xattention(XAttentionConfig()))

Per head: group keys in runs of `stride` and queries in runs of `stride` taken in reverse order, so that one
reduced-matrix entry is the sum of the raw logits along an antidiagonal of a stride x stride tile of QK^T;
scale by 1/(sqrt(d) * stride), softmax over all key groups, and sum the probabilities over each
(block, block) sub-grid to get a block importance A[I, J]. Each query block keeps the smallest prefix of
its blocks, sorted by importance, whose mass reaches tau * (row total): block J is kept while the mass of
the blocks sorted before it is still below tau * total. The selected blocks run through the Pallas
block-sparse kernel (`backend="kernel"`), its jnp reference (`"reference"`, masked dense) or the
plain-jnp gather path (`"gather"`, selected blocks only); `"auto"` is the kernel on GPU/TPU and the gather
path on CPU (`vidaccel.attention.resolve_backend`). The embedded model's setting is
`experiments.shapes_presets.xattention_shapes()`.

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

from pallas_kernels import (
    ALLOWED_BLOCKS,
    BlockIndices,
    block_mask_to_indices,
    block_sparse_attention,
    block_sparse_attention_gather,
)
from pallas_kernels.reference import block_sparse_attention_reference
from vidaccel.attention import BACKENDS, resolve_backend
from vidaccel.checks import bool_arg, choice_arg, int_arg
from vidaccel.sparse_attention import AttnContext, AttnSpec, Policy, PredictStats


@dataclasses.dataclass(frozen=True)
class XAttentionConfig:
    """XAttention settings; defaults are the HunyuanVideo evaluation code's (`run_vbench.py`).

    threshold: tau, a float, a per-head (heads,) or per-(layer, head) (layers, heads) sequence (0.9).
    stride: antidiagonal stride S (8). block_size: block edge in tokens (128; the kernel takes 16..128).
    warmup_steps: first steps run dense (5 of 50). dense_layers: layers always dense (none).
    keep_first_block: reproduce the block-0 quirk (True). backend: "kernel" (Pallas), "reference" (jnp
    masked attention, same result, dense cost), "gather" (plain jnp over the selected blocks only, same
    result, real savings under plain XLA) or "auto" (kernel on GPU/TPU, gather on CPU; resolved when the
    policy is built). interpret: passed to the kernel (None = automatic).
    """

    threshold: float | tuple = 0.9
    stride: int = 8
    block_size: int = 128
    warmup_steps: int = 5
    dense_layers: tuple[int, ...] = ()
    keep_first_block: bool = True
    backend: str = "auto"
    interpret: bool | None = None

    def __post_init__(self):
        t = np.asarray(self.threshold, np.float64)
        if t.ndim > 2 or not np.all(np.isfinite(t)) or np.any(t < 0) or np.any(t > 1):
            raise ValueError(f"XAttentionConfig.threshold={self.threshold!r} is invalid: a number in [0, 1], or a "
                             "(heads,) / (layers, heads) sequence of them")
        if t.ndim:
            object.__setattr__(self, "threshold", tuple(np.asarray(t).tolist()) if t.ndim == 1 else
                               tuple(tuple(r) for r in t.tolist()))
        choice_arg("XAttentionConfig.block_size", self.block_size, ALLOWED_BLOCKS)
        int_arg("XAttentionConfig.stride", self.stride, minimum=1)
        if self.block_size % self.stride:
            raise ValueError(f"XAttentionConfig.stride={self.stride!r} is invalid: it must divide "
                             f"block_size={self.block_size}")
        int_arg("XAttentionConfig.warmup_steps", self.warmup_steps, minimum=0)
        layers = tuple(self.dense_layers)
        for i, layer in enumerate(layers):
            int_arg(f"XAttentionConfig.dense_layers[{i}]", layer, minimum=0)
        object.__setattr__(self, "dense_layers", layers)
        bool_arg("XAttentionConfig.keep_first_block", self.keep_first_block)
        choice_arg("XAttentionConfig.backend", self.backend, BACKENDS)
        if self.interpret is not None:
            bool_arg("XAttentionConfig.interpret", self.interpret)


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
    backend = resolve_backend(cfg.backend, name="XAttentionConfig.backend")

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
        if backend == "kernel":
            return block_sparse_attention(q, k, v, bi, block_q=bs, block_k=bs, interpret=cfg.interpret)
        if backend == "gather":
            return block_sparse_attention_gather(q, k, v, bi, block_q=bs, block_k=bs)
        return block_sparse_attention_reference(q, k, v, bi, block_q=bs, block_k=bs)

    def tiles_dense(spec: AttnSpec) -> float:
        nb = -(-spec.tokens // bs)
        return float(spec.batch * nb * nb)

    return Policy(name="xattention", init=init, predict=predict, attend=attend, thresholds=cfg.threshold,
                  dense_steps=lambda steps: min(cfg.warmup_steps, steps), dense_layers=lambda layers: cfg.dense_layers,
                  tiles_dense=tiles_dense, state_head_axes=lambda spec: ())


__all__ = ["XAttentionConfig", "XPlan", "antidiagonal_scores", "select_blocks", "block_work", "xattention"]
