"""The blockwise (online-softmax) attention equals dense attention, bidirectional and block-causal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidaccel.attention import AttentionInfo, dense_attention
from vidaccel.blockwise_attention import blockwise, blockwise_attention


def _inputs(seed, b, tq, tk, h, d, frames_q, frames_k):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, tq, h, d)) * 2.0
    k = jax.random.normal(ks[1], (b, tk, h, d)) * 2.0
    v = jax.random.normal(ks[2], (b, tk, h, d))
    qf = jnp.broadcast_to(jnp.arange(tq) * frames_q // tq, (b, tq)).astype(jnp.int32)
    kf = jnp.broadcast_to(jnp.arange(tk) * frames_k // tk, (b, tk)).astype(jnp.int32)
    return q, k, v, qf, kf


@pytest.mark.parametrize(("n", "blocks"), [(1, (16, 16)), (2, (7, 5)), (3, (64, 128)), (2, (45, 9))])
def test_equals_dense(n, blocks):
    q, k, v, qf, kf = _inputs(n + blocks[0], 2, 45, 45, 3, 8, 9, 9)
    info = AttentionInfo(qf, kf, jnp.int32(0), frames_per_block=n)
    ref, _ = dense_attention(q, k, v, info)
    out, state = blockwise_attention(q, k, v, info, "state", q_block=blocks[0], k_block=blocks[1])
    assert state == "state"
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=1e-5)


def test_cross_lengths_and_jit():
    q, k, v, qf, kf = _inputs(5, 1, 20, 33, 2, 4, 4, 4)
    info = AttentionInfo(qf, kf, jnp.int32(0))
    ref, _ = dense_attention(q, k, v, info)
    out, _ = jax.jit(blockwise(8, 8))(q, k, v, info)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=1e-5)


def test_bad_block_size():
    with pytest.raises(ValueError, match="q_block must be >= 1"):
        blockwise(0, 8)
