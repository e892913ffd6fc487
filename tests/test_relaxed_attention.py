"""Relaxed token- and attention-level decisions: the soft block mask at temperature -> 0 / straight-through is
XAttention's per-head selection and its weighted attention the block-sparse reference, with gradients in the
thresholds agreeing with finite differences; soft token gates are MotionCache's token selection."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from experiments.motioncache import MotionCacheConfig, decide_tokens
from experiments.xattention import antidiagonal_scores, select_blocks
from pallas_kernels.reference import block_sparse_attention_reference
from vidaccel.relaxed import block_weighted_attention, soft_block_mask, soft_token_gates

BLOCK = 16


def _qkv(n=72, h=3, d=8):       # 72 tokens: 5 blocks of 16, the last one partial
    ks = jax.random.split(jax.random.key(11), 3)
    return [jax.random.normal(k, (1, n, h, d)) * s for k, s in zip(ks, (1.5, 1.5, 1.0), strict=True)]


def test_soft_block_mask_limits_to_xattention():
    q, k, v = _qkv()
    imp = antidiagonal_scores(q, k, 4, BLOCK)
    tau = jnp.array([0.3, 0.7, 1.0])
    want = select_blocks(imp, tau)
    assert 0 < float(want.mean()) < 1
    ref = block_sparse_attention_reference(q, k, v, want, block_q=BLOCK, block_k=BLOCK)
    for mode, temp in (("hard", 1.0), ("straight_through", 1.0), ("soft", 1e-7)):
        w = soft_block_mask(imp, tau, temp, mode)
        assert np.array_equal(np.asarray(w) > 0.5, np.asarray(want)), mode
        out = block_weighted_attention(q, k, v, w, BLOCK)
        assert float(jnp.max(jnp.abs(out - ref))) < 1e-5, mode


def test_threshold_gradients_match_finite_differences():
    q, k, v = _qkv()
    imp = antidiagonal_scores(q, k, 4, BLOCK)

    def loss(tau):
        w = soft_block_mask(imp, tau, 0.1, "soft")
        return jnp.mean(block_weighted_attention(q, k, v, w, BLOCK) ** 2) + jnp.mean(w)

    tau = jnp.array([0.4, 0.6, 0.8])
    check_grads(loss, (tau,), order=1, modes=("rev",), eps=1e-2, atol=1e-3, rtol=2e-2)
    assert float(jnp.min(jnp.abs(jax.grad(loss)(tau)))) > 1e-4


def test_soft_token_gates_limit_to_motioncache():
    """MotionCache's token selection (per-token accumulators, temporal vote, minimum update ratio): hard,
    straight-through and soft at temperature 1e-7 give `decide_tokens`' decisions and accumulators."""
    frames, hw = 4, 6
    ks = jax.random.split(jax.random.key(5), 3)
    acc = jax.random.uniform(ks[0], (3, frames * hw), maxval=0.4)
    weights = jax.random.uniform(ks[1], (3, frames * hw), minval=0.6)
    acc = acc.at[2].multiply(0.8)                           # row 2: fewer tokens reach the threshold
    delta = jnp.float32(0.12)
    for vote, ratio in ((0.25, 0.2), (None, 0.4)):   # the second drops row 2 (ratio 0.375)
        cfg = MotionCacheConfig(thresh=0.3, warmup=1, phase1_updates=0, temporal_vote=vote, min_update_ratio=ratio)
        upd, acc_next, _ = decide_tokens(cfg, acc, weights, delta, jnp.int32(3), jnp.zeros((3,), jnp.int32), frames)
        assert 0 < float(upd.mean()) < 1
        for mode, temp in (("hard", 1.0), ("straight_through", 1.0), ("soft", 1e-7)):
            g, a = soft_token_gates(acc, weights, delta, cfg.thresh, temp, mode, frames=frames,
                                    temporal_vote=vote, min_update_ratio=ratio)
            assert np.array_equal(np.asarray(g) > 0.5, np.asarray(upd)), (mode, vote)
            assert np.allclose(a, acc_next, atol=1e-6), (mode, vote)
    g = jax.grad(lambda d: soft_token_gates(acc, weights, d, 0.3, 0.2, "soft", frames=frames,
                                            temporal_vote=0.25, min_update_ratio=0.2)[0].sum())(delta)
    assert float(g) > 0
