"""Sparse VideoGen 2 (SVG2, arXiv 2505.18875): semantic-aware permutation as a sparse-attention policy.

    den = sparse_attention(wan_denoiser(model), svg2(SVG2Config()))

Per (layer, head, CFG branch) and sparse step: k-means on Q and on K separately (Euclidean; many
iterations the first time, a few warm-started from this layer's previous centroids afterwards, early stop
when no centroid moves more than `kmeans_tol`); centroid attention S = C_q C_k^T / sqrt(d) with a
size-weighted softmax over key clusters, P_ij ~ |K_j| exp(S_ij); per query cluster keep the sorted prefix
up to and including the cluster whose cumulative probability crosses top_p, and at least
floor(min_kc_ratio * k_c) clusters; permute Q by its labels and K, V by theirs so clusters are contiguous;
run the variable-range Pallas kernel (`backend="kernel"`) and inverse-permute the output. The gather path
(`"gather"`) runs the same permuted ranges through plain jnp, each query tile over its selected key tokens
only. The jnp reference path (`"reference"`) applies the same cluster mask to unpermuted tokens with masked
dense attention. `"auto"` is the kernel on GPU/TPU and the gather path on CPU. The embedded model's setting
is `experiments.shapes_presets.svg2_shapes()`.

Choices and deviations (docs/sparse_attention.md): k-means is initialised from distinct random tokens
(the reference draws with replacement, which can start two centroids on one token); the returned
centroids are the means of the final labels' clusters (empty clusters keep their previous centroid, as in
the reference); top_p >= 1 keeps every cluster; `zero_step_kmeans_init` (k-means during dense steps) is not
implemented (the Wan T2V 720p script does not use it).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pallas_kernels import ALLOWED_BLOCKS, cluster_sparse_attention, cluster_sparse_attention_gather, clusters_to_ranges
from pallas_kernels.reference import masked_attention
from vidaccel.attention import BACKENDS, resolve_backend
from vidaccel.checks import bool_arg, choice_arg, float_arg, int_arg
from vidaccel.sparse_attention import AttnContext, AttnSpec, Policy, PredictStats, all_heads_max, head_offset


def _floor(x: float) -> int:
    """floor, tolerant of float noise (0.2 * 50 -> 10)."""
    return int(math.floor(x + 1e-9))


@dataclasses.dataclass(frozen=True)
class SVG2Config:
    """SVG2 settings; defaults are the Wan2.1 T2V 720p script's (`scripts/wan/wan_t2v_720p_sap.sh`).

    num_q_clusters / num_k_clusters (300 / 1000); top_p (0.9; a float, (heads,) or (layers, heads));
    min_kc_ratio: fraction of key clusters always kept (0.10); kmeans_iter_init / kmeans_iter_step (50 / 2);
    kmeans_tol: early-stop centroid shift (1e-4); dense_step_fraction: first floor(f * steps) steps dense
    (0.2); dense_layer_fraction: first floor(f * layers) layers dense (0.03); block_q / block_k: the
    kernel's query tile and key chunk (128 / 64, the SVG Triton fallback's BLOCK_M / BLOCK_N);
    backend: "kernel", "reference" (masked dense), "gather" (plain jnp, selected keys only) or "auto" (kernel
    on GPU/TPU, gather on CPU; resolved when the policy is built); seed: k-means initialisation; interpret:
    kernel mode (None = automatic).
    """

    num_q_clusters: int = 300
    num_k_clusters: int = 1000
    top_p: float | tuple = 0.9
    min_kc_ratio: float = 0.10
    kmeans_iter_init: int = 50
    kmeans_iter_step: int = 2
    kmeans_tol: float = 1e-4
    dense_step_fraction: float = 0.2
    dense_layer_fraction: float = 0.03
    block_q: int = 128
    block_k: int = 64
    backend: str = "auto"
    seed: int = 0
    interpret: bool | None = None

    def __post_init__(self):
        for name in ("num_q_clusters", "num_k_clusters", "kmeans_iter_init", "kmeans_iter_step"):
            int_arg(f"SVG2Config.{name}", getattr(self, name), minimum=1)
        int_arg("SVG2Config.seed", self.seed, minimum=0)
        t = np.asarray(self.top_p, np.float64)
        if t.ndim > 2 or not np.all(np.isfinite(t)) or np.any(t < 0) or np.any(t > 1):
            raise ValueError(f"SVG2Config.top_p={self.top_p!r} is invalid: a number in [0, 1], or a (heads,) / "
                             "(layers, heads) sequence of them")
        if t.ndim:
            object.__setattr__(self, "top_p", tuple(t.tolist()) if t.ndim == 1 else tuple(tuple(r) for r in t.tolist()))
        for name in ("min_kc_ratio", "dense_step_fraction", "dense_layer_fraction"):
            float_arg(f"SVG2Config.{name}", getattr(self, name), low=0, high=1)
        float_arg("SVG2Config.kmeans_tol", self.kmeans_tol, low=0)
        for name in ("block_q", "block_k"):
            choice_arg(f"SVG2Config.{name}", getattr(self, name), ALLOWED_BLOCKS)
        choice_arg("SVG2Config.backend", self.backend, BACKENDS)
        if self.interpret is not None:
            bool_arg("SVG2Config.interpret", self.interpret)


@struct.dataclass
class SVG2State:
    """Per-layer k-means state (leading layer axis once stacked)."""

    q_centroids: jax.Array   # (B, H, qc, D) float32
    k_centroids: jax.Array   # (B, H, kc, D) float32
    initialized: jax.Array   # () bool: centroids exist (warm start)


@struct.dataclass
class SVG2Plan:
    """Labels, permutations, cluster selection and kernel ranges of one prediction."""

    q_labels: jax.Array      # (B, H, N) int32
    k_labels: jax.Array
    q_perm: jax.Array        # (B, H, N) int32: permuted position -> token
    k_perm: jax.Array
    q_inv: jax.Array         # (B, H, N) int32: token -> permuted position
    cluster_mask: jax.Array  # (B, H, qc, kc) bool
    q_ranges: jax.Array      # (B, H, n_tiles, 2)
    kv_ranges: jax.Array     # (B, H, n_tiles, max_runs, 2)
    pairs: jax.Array         # (H,)
    tiles: jax.Array         # (H,)


def cluster_sizes(labels: jax.Array, n: int) -> jax.Array:
    """(B, H, N) labels -> (B, H, n) int32 counts."""
    return jnp.sum(jax.nn.one_hot(labels, n, dtype=jnp.int32), axis=-2)


def kmeans(x: jax.Array, centroids: jax.Array, iters, tol: float, ctx: AttnContext | None = None):
    """Batched Euclidean k-means: x (B, H, N, D), initial centroids (B, H, K, D), at most `iters` (traced ok).

    Each iteration assigns every point to its nearest centroid and moves every non-empty centroid to its
    cluster's mean; it stops once no centroid moved more than `tol` (max over the whole batch, as SVG2).
    Returns (labels (B, H, N) int32, centroids, sizes (B, H, K) int32, iterations run). ctx: under head
    parallelism the shift is maxed over the other devices' heads too (the same stop as one device).
    """
    x = x.astype(jnp.float32)
    b, h, n, d = x.shape
    kk = centroids.shape[2]
    base = (jnp.arange(b * h, dtype=jnp.int32) * kk).reshape(b, h, 1)

    def body(carry):
        i, c, _, _, _ = carry
        dist = jnp.sum(c * c, -1)[:, :, None, :] - 2.0 * jnp.einsum("bhnd,bhkd->bhnk", x, c, precision="highest")
        labels = jnp.argmin(dist, axis=-1).astype(jnp.int32)
        ids = (labels + base).reshape(-1)
        sums = jax.ops.segment_sum(x.reshape(-1, d), ids, num_segments=b * h * kk).reshape(b, h, kk, d)
        sizes = jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments=b * h * kk).reshape(b, h, kk)
        new = jnp.where(sizes[..., None] > 0, sums / jnp.maximum(sizes, 1)[..., None], c)
        shift = jnp.max(jnp.linalg.norm(new - c, axis=-1))
        if ctx is not None:
            shift = all_heads_max(shift, ctx)
        return i + 1, new, labels, sizes, shift < tol

    def cond(carry):
        i, _, _, _, done = carry
        return (i < iters) & ~done

    init = (jnp.int32(0), centroids.astype(jnp.float32), jnp.zeros((b, h, n), jnp.int32),
            jnp.zeros((b, h, kk), jnp.int32), jnp.bool_(False))
    i, c, labels, sizes, _ = jax.lax.while_loop(cond, body, init)
    return labels, c, sizes, i


def random_centroids(key: jax.Array, x: jax.Array, k: int, *, heads: int | None = None, offset=0) -> jax.Array:
    """k distinct random tokens of x (B, H, N, D) per (batch, head) as initial centroids (B, H, k, D).
    heads / offset: x holds heads offset..offset+H of `heads` (head parallelism): the draw is the one of all
    `heads`, sliced, so each head starts where it would on one device."""
    b, h, n = x.shape[:3]
    u = jax.random.uniform(key, (b, h if heads is None else heads, n))
    if heads is not None:
        u = jax.lax.dynamic_slice_in_dim(u, offset, h, axis=1)
    idx = jnp.argsort(u, axis=-1)[..., :k]
    return jnp.take_along_axis(x.astype(jnp.float32), idx[..., None], axis=2)


def select_clusters(q_centroids, k_centroids, k_sizes, top_p, min_kc_ratio: float) -> jax.Array:
    """SVG2's cluster selection -> bool (B, H, qc, kc).

    P = size-weighted softmax of C_q C_k^T / sqrt(d) over key clusters; sort each row descending (ties by
    index) and keep a cluster while the probability sorted before it is <= top_p (so the crossing cluster is
    kept), plus the first floor(min_kc_ratio * kc) sorted clusters; top_p >= 1 keeps all. top_p: (H,).
    """
    d = q_centroids.shape[-1]
    kc = k_centroids.shape[2]
    s = jnp.einsum("bhqd,bhkd->bhqk", q_centroids, k_centroids, precision="highest") / math.sqrt(d)
    w = k_sizes.astype(jnp.float32)[:, :, None, :] * jnp.exp(s - s.max(-1, keepdims=True))
    prob = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-12)
    order = jnp.argsort(-prob, axis=-1, stable=True)
    sp = jnp.take_along_axis(prob, order, axis=-1)
    before = jnp.cumsum(sp, axis=-1) - sp
    p = jnp.asarray(top_p, jnp.float32).reshape(1, -1, 1, 1)
    keep = (before <= p) | (jnp.arange(kc) < int(min_kc_ratio * kc)) | (p >= 1.0)
    return jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)


def label_token_mask(cluster_mask, q_labels, k_labels) -> jax.Array:
    """Token mask (B, H, N, N): query i attends key j iff cluster_mask[label(i), label(j)]."""
    rows = jnp.take_along_axis(cluster_mask, q_labels[..., None], axis=2)              # (B, H, N, kc)
    n = k_labels.shape[-1]
    cols = jnp.broadcast_to(k_labels[:, :, None, :], rows.shape[:3] + (n,))
    return jnp.take_along_axis(rows, cols, axis=3)


def _per_head(x, perm):
    """x (B, N, H, D) gathered per head along tokens by perm (B, H, N)."""
    xh = jnp.swapaxes(x, 1, 2)
    return jnp.swapaxes(jnp.take_along_axis(xh, perm[..., None], axis=2), 1, 2)


def range_tiles(q_ranges, kv_ranges, block_k: int) -> jax.Array:
    """Kernel work per head (H,): sum over live query tiles of the key chunks of block_k walked."""
    chunks = (kv_ranges[..., 1] + block_k - 1) // block_k                               # (B, H, T, R)
    live = (q_ranges[..., 1] > 0)[..., None]
    return jnp.sum(jnp.where(live, chunks, 0), axis=(0, 2, 3)).astype(jnp.float32)


def svg2(cfg: SVG2Config = SVG2Config()) -> Policy:
    """SVG2 as a `Policy` for `sparse_attention` (per-layer k-means centroids carried between calls)."""
    if not isinstance(cfg, SVG2Config):
        raise TypeError(f"svg2 needs an SVG2Config, got {type(cfg).__name__}")
    qc, kc = cfg.num_q_clusters, cfg.num_k_clusters
    backend = resolve_backend(cfg.backend, name="SVG2Config.backend")

    def init(spec: AttnSpec) -> SVG2State:
        for name, c in (("num_q_clusters", qc), ("num_k_clusters", kc)):
            if c > spec.tokens:
                raise ValueError(f"SVG2Config.{name}={c} exceeds the {spec.tokens} tokens of this input")
        lead = (spec.layers, spec.batch, spec.heads)
        return SVG2State(jnp.zeros(lead + (qc, spec.head_dim), jnp.float32),
                         jnp.zeros(lead + (kc, spec.head_dim), jnp.float32), jnp.zeros((spec.layers,), bool))

    def predict(q, k, state: SVG2State, ctx: AttnContext):
        b, n, h, d = q.shape
        qh, kh = (jnp.swapaxes(x, 1, 2).astype(jnp.float32) for x in (q, k))         # (B, H, N, D)
        key = jax.random.fold_in(jax.random.key(cfg.seed), ctx.layer)
        first = ~state.initialized
        draw = {} if ctx.head_axis is None else dict(heads=ctx.spec.heads, offset=head_offset(ctx, h))
        cq0 = jnp.where(first, random_centroids(jax.random.fold_in(key, 0), qh, qc, **draw), state.q_centroids)
        ck0 = jnp.where(first, random_centroids(jax.random.fold_in(key, 1), kh, kc, **draw), state.k_centroids)
        iters = jnp.where(first, cfg.kmeans_iter_init, cfg.kmeans_iter_step)
        q_labels, cq, q_sizes, q_it = kmeans(qh, cq0, iters, cfg.kmeans_tol, ctx)
        k_labels, ck, k_sizes, k_it = kmeans(kh, ck0, iters, cfg.kmeans_tol, ctx)
        mask = select_clusters(cq, ck, k_sizes, ctx.threshold, cfg.min_kc_ratio)
        q_perm = jnp.argsort(q_labels, axis=-1, stable=True).astype(jnp.int32)
        k_perm = jnp.argsort(k_labels, axis=-1, stable=True).astype(jnp.int32)
        q_inv = jnp.argsort(q_perm, axis=-1).astype(jnp.int32)
        q_ranges, kv_ranges = clusters_to_ranges(mask, q_sizes, k_sizes, block_q=cfg.block_q, num_q_tokens=n)
        sz = q_sizes.astype(jnp.float32)[..., :, None] * k_sizes.astype(jnp.float32)[..., None, :]
        pairs = jnp.sum(jnp.where(mask, sz, 0.0), axis=(0, 2, 3))
        flops = (2.0 * n * d * (q_it * qc + k_it * kc) + 2.0 * qc * kc * d) * b * h
        plan = SVG2Plan(q_labels, k_labels, q_perm, k_perm, q_inv, mask, q_ranges, kv_ranges, pairs,
                        range_tiles(q_ranges, kv_ranges, cfg.block_k))
        return plan, SVG2State(cq, ck, jnp.bool_(True)), PredictStats.ran(flops)

    def attend(q, k, v, plan: SVG2Plan, ctx: AttnContext):
        if backend == "reference":
            mask = label_token_mask(plan.cluster_mask, plan.q_labels, plan.k_labels)
            return masked_attention(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]))
        qp, kp, vp = _per_head(q, plan.q_perm), _per_head(k, plan.k_perm), _per_head(v, plan.k_perm)
        if backend == "gather":
            out = cluster_sparse_attention_gather(qp, kp, vp, plan.kv_ranges, q_ranges=plan.q_ranges,
                                                  block_q=cfg.block_q, block_k=cfg.block_k)
        else:
            out = cluster_sparse_attention(qp, kp, vp, plan.kv_ranges, q_ranges=plan.q_ranges, block_q=cfg.block_q,
                                           block_k=cfg.block_k, interpret=cfg.interpret)
        return _per_head(out, plan.q_inv)

    def tiles_dense(spec: AttnSpec) -> float:
        return float(spec.batch * -(-spec.tokens // cfg.block_q) * -(-spec.tokens // cfg.block_k))

    return Policy(name="svg2", init=init, predict=predict, attend=attend, thresholds=cfg.top_p,
                  dense_steps=lambda steps: _floor(cfg.dense_step_fraction * steps),
                  dense_layers=lambda layers: tuple(range(_floor(cfg.dense_layer_fraction * layers))),
                  tiles_dense=tiles_dense,
                  state_head_axes=lambda spec: SVG2State(1, 1, None))  # centroids per (batch, head)


__all__ = ["SVG2Config", "SVG2State", "SVG2Plan", "cluster_sizes", "kmeans", "random_centroids",
           "select_clusters", "label_token_mask", "range_tiles", "svg2"]
