"""XAttention: antidiagonal scoring, the selection rule (incl. the block-0 quirk) by hand, equality with dense
attention when every block is kept, the Pallas-kernel path against the jnp path on the model, config errors."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from test_sparse_attention import _forward, _model, _rel

from experiments.xattention import XAttentionConfig, antidiagonal_scores, block_work, select_blocks, xattention
from models.wan.denoiser import wan_denoiser
from vidaccel.sparse_attention import sparse_attention, sparse_summary


def test_antidiagonal_scores_match_a_loop():
    """Reduced entry (i, g) = sum_t q[iS+S-1-t] . k[gS+t] / (sqrt(d) S); softmax over groups; block sums.
    Also a length (10) that is not a block multiple: padded key groups get no mass."""
    rng = np.random.default_rng(0)
    for n in (8, 10):
        q = rng.normal(size=(1, n, 1, 3)).astype(np.float32)
        k = rng.normal(size=(1, n, 1, 3)).astype(np.float32)
        S, B = 2, 4
        npad = -(-n // B) * B
        qp = np.zeros((npad, 3), np.float32)
        kp = np.zeros((npad, 3), np.float32)
        qp[:n], kp[:n] = q[0, :, 0], k[0, :, 0]
        g = npad // S
        s = np.array([[sum(qp[i * S + S - 1 - t] @ kp[j * S + t] for t in range(S)) for j in range(g)]
                      for i in range(g)]) / (math.sqrt(3) * S)
        valid = np.arange(g) * S < n
        s[:, ~valid] = -np.inf
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[~valid] = 0
        want = p.reshape(npad // B, B // S, npad // B, B // S).sum((1, 3))
        got = np.asarray(antidiagonal_scores(jnp.asarray(q), jnp.asarray(k), S, B))[0, 0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_selection_by_hand():
    """Row [0.1, 0.5, 0.3, 0.1], tau 0.7: sorted 0.5 (0 before), 0.3 (0.5 before < 0.7), 0.1 at block 0 (0.8
    before: dropped), 0.1 at block 3 (dropped) -> blocks 1, 2; the quirk adds block 0. tau 0.3 keeps only the
    top block (+ 0); tau 1 keeps all; tau 0 keeps nothing but the quirk's block 0. A second row with block 0
    on top: tau 0.5 -> {0}; tau 0.7 -> {0, 2} (0.6 before the 0.25 block is < 0.7)."""
    a = jnp.broadcast_to(jnp.array([[0.1, 0.5, 0.3, 0.1], [0.6, 0.1, 0.25, 0.05]]), (1, 4, 2, 4))  # 4 heads
    tau = jnp.array([0.7, 0.3, 1.0, 0.0])
    quirk = np.asarray(select_blocks(a, tau, keep_first_block=True))[0]
    plain = np.asarray(select_blocks(a, tau, keep_first_block=False))[0]
    T, F = True, False
    np.testing.assert_array_equal(plain[0], [[F, T, T, F], [T, F, T, F]])
    np.testing.assert_array_equal(quirk[0], [[T, T, T, F], [T, F, T, F]])
    np.testing.assert_array_equal(plain[1], [[F, T, F, F], [T, F, F, F]])
    np.testing.assert_array_equal(quirk[1], [[T, T, F, F], [T, F, F, F]])
    np.testing.assert_array_equal(quirk[2], np.ones((2, 4), bool))
    np.testing.assert_array_equal(plain[3], np.zeros((2, 4), bool))
    np.testing.assert_array_equal(quirk[3], [[T, F, F, F], [T, F, F, F]])
    a2 = jnp.array([[[[0.6, 0.1, 0.25, 0.05]]]])
    np.testing.assert_array_equal(np.asarray(select_blocks(a2, jnp.array([0.5]), False))[0, 0, 0], [T, F, F, F])


def test_block_work_counts_partial_blocks():
    """10 tokens in blocks of 4 (sizes 4, 4, 2): mask [[1,0,1],[0,0,0],[1,1,1]] -> pairs 16+8 + 8+8+4."""
    m = jnp.array([[[[1, 0, 1], [0, 0, 0], [1, 1, 1]]]], bool)
    pairs, tiles = block_work(m, 10, 4)
    assert float(pairs[0]) == 44.0 and float(tiles[0]) == 5.0


def test_keep_all_equals_dense_and_kernel_equals_jnp_path():
    """One model call past the warm-up: tau = 1 (every block) equals dense attention (<= 1e-5 relative); at
    tau 0.5 the Pallas kernel (interpret mode), the plain-jnp gather path and the jnp reference path agree,
    with identical counters."""
    model = _model()
    dense, _ = _forward(wan_denoiser(model), 0)
    den = lambda impl: sparse_attention(wan_denoiser(model), xattention(  # noqa: E731
        XAttentionConfig(block_size=16, stride=4, warmup_steps=1, backend=impl)))
    ref = den("reference")
    v_all, s_all = _forward(ref, 3, 1.0)
    assert _rel(v_all, dense) <= 1e-5 and sparse_summary(s_all)["density_sparse"] == 1.0
    v_ref, s_ref = _forward(ref, 3, 0.5)
    v_ker, s_ker = _forward(den("kernel"), 3, 0.5)
    v_gat, s_gat = _forward(den("gather"), 3, 0.5)
    assert _rel(v_ker, v_ref) <= 1e-5 and _rel(v_gat, v_ref) <= 1e-5
    assert _rel(v_ref, dense) > 1e-3                   # the mask really dropped something
    sr, sk = sparse_summary(s_ref), sparse_summary(s_ker)
    assert sr == sk == sparse_summary(s_gat)
    assert 0 < sr["density_sparse"] < 0.9 and sr["tile_density"] == sr["density_sparse"]
    assert sr["sparse_calls"] == sr["predictions"] == 2


def test_config_defaults_and_errors():
    c = XAttentionConfig()
    assert (c.threshold, c.stride, c.block_size, c.warmup_steps, c.dense_layers, c.keep_first_block, c.backend) == \
        (0.9, 8, 128, 5, (), True, "auto")
    assert XAttentionConfig(threshold=[0.5, 0.9]).threshold == (0.5, 0.9)
    for kw, msg in [({"threshold": 1.2}, "threshold=1.2"), ({"block_size": 48}, "block_size=48"),
                    ({"stride": 3}, "stride=3 is invalid: it must divide block_size=128"),
                    ({"stride": 0}, "XAttentionConfig.stride must be >= 1, got 0"),
                    ({"warmup_steps": -1}, "XAttentionConfig.warmup_steps must be >= 0, got -1"),
                    ({"dense_layers": (-1,)}, r"XAttentionConfig.dense_layers\[0\] must be >= 0"),
                    ({"backend": "cuda"}, "XAttentionConfig.backend='cuda'")]:
        with pytest.raises(ValueError, match=msg):
            XAttentionConfig(**kw)
    for kw, msg in [({"interpret": "yes"}, "XAttentionConfig.interpret must be True or False, got 'yes'"),
                    ({"stride": 2.0}, "XAttentionConfig.stride must be an int, got 2.0"),
                    ({"keep_first_block": 1}, "XAttentionConfig.keep_first_block must be True or False")]:
        with pytest.raises(TypeError, match=msg):
            XAttentionConfig(**kw)
    with pytest.raises(TypeError, match="XAttentionConfig"):
        xattention({"threshold": 0.9})
