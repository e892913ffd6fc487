"""Exact softmax attention computed block by block with an online softmax (the flash-attention recurrence), in
plain jnp, so that memory grows with a (q_block x k_block) tile instead of the (Tq x Tk) score matrix.

Why our own: XLA's CPU attention (`jax.nn.dot_product_attention`, implementation "xla") materialises the whole
score matrix, 51 GB per layer at Wan2.1-1.3B's 32,760 tokens, and the memory-efficient kernels (cuDNN, Pallas
flash) do not compile for the CPU. This one lets the CPU compile a real-size step with a flash kernel's memory
profile (the memory report), and run long sequences at all. It is a `SelfAttention` for the attention hook.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vidaccel.attention import AttentionInfo, block_causal_mask
from vidaccel.checks import int_arg


def _pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad, constant_values=value)


def softmax_merge(stats, logits: jax.Array, v: jax.Array):
    """Fold one tile of keys into the running online-softmax statistics (the flash-attention recurrence).

    stats: (running max (B, H, q), running sum (B, H, q), output accumulator (B, H, q, Dv)), fp32, starting
    at (-inf, 0, 0). logits: (B, H, q, k) fp32 with masked entries at -inf; v: (B, k, H, Dv). A row whose
    every key so far is masked keeps max -inf and sum 0. Shared by `blockwise_attention` and ring attention
    (`vidaccel.parallel`), which folds the K/V blocks arriving from the other devices the same way.
    """
    m, s, acc = stats
    m_new = jnp.maximum(m, logits.max(-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(logits - m_safe[..., None])
    corr = jnp.exp(m - m_safe)  # 0 where the old max is -inf
    return m_new, s * corr + p.sum(-1), acc * corr[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p, v.astype(jnp.float32))


def blockwise_attention(q, k, v, info: AttentionInfo, layer_state=None, *, q_block: int = 1024,
                        k_block: int = 1024):
    """Softmax attention equal to `dense_attention` (block-causal when `info.frames_per_block > 1`).

    q (B, Tq, H, D), k and v (B, Tk, H, D). Queries are processed in `q_block` rows (`lax.map`), keys in
    `k_block` columns (`lax.scan`) with a running max and sum in fp32; padding keys are masked out.
    """
    q_block = int_arg("q_block", q_block, 1)
    k_block = int_arg("k_block", k_block, 1)
    b, tq, h, d = q.shape
    tk = k.shape[1]
    n = info.frames_per_block
    qf = _pad_to(info.q_frames, 1, q_block)
    kf = _pad_to(info.kv_frames, 1, k_block)
    valid_k = _pad_to(jnp.ones((b, tk), bool), 1, k_block, False)
    qs = _pad_to(q, 1, q_block)
    ks, vs = _pad_to(k, 1, k_block), _pad_to(v, 1, k_block)
    nq, nk = qs.shape[1] // q_block, ks.shape[1] // k_block
    scale = 1.0 / jnp.sqrt(jnp.float32(d))

    # (blocks, B, block, ...) so lax.map / lax.scan walk the leading axis.
    def blocks(x, size, count):
        return jnp.moveaxis(x.reshape(b, count, size, *x.shape[2:]), 1, 0)

    k_tiles = (blocks(ks, k_block, nk), blocks(vs, k_block, nk), blocks(kf, k_block, nk),
               blocks(valid_k, k_block, nk))

    def one_query_block(args):
        qb, qfb = args  # (B, qb, H, D), (B, qb)
        qb32 = qb.astype(jnp.float32) * scale

        def step(stats, tile):
            kb, vb, kfb, ok = tile
            logits = jnp.einsum("bqhd,bkhd->bhqk", qb32, kb.astype(jnp.float32))
            allowed = ok[:, None, None, :]
            if n > 1:
                allowed = allowed & block_causal_mask(qfb, kfb, n)
            return softmax_merge(stats, jnp.where(allowed, logits, -jnp.inf), vb), None

        init = (jnp.full((b, h, q_block), -jnp.inf, jnp.float32), jnp.zeros((b, h, q_block), jnp.float32),
                jnp.zeros((b, h, q_block, d), jnp.float32))
        (_, s, acc), _ = jax.lax.scan(step, init, k_tiles)
        out = acc / jnp.where(s > 0, s, 1.0)[..., None]
        return jnp.moveaxis(out, 1, 2).astype(q.dtype)  # (B, qb, H, D)

    out = jax.lax.map(one_query_block, (blocks(qs, q_block, nq), blocks(qf, q_block, nq)))
    out = jnp.moveaxis(out, 0, 1).reshape(b, nq * q_block, h, d)[:, :tq]
    return out, layer_state


def blockwise(q_block: int = 1024, k_block: int = 1024):
    """`blockwise_attention` with fixed tile sizes, as a `SelfAttention` for the attention hook."""
    return functools.partial(blockwise_attention, q_block=int_arg("q_block", q_block, 1),
                             k_block=int_arg("k_block", k_block, 1))
