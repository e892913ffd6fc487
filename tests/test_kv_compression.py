"""FlowCache KV compression: scores against explicit references, per-head selection and gathering by hand,
the trigger, and a compressed rollout holding a fixed budget."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.flowcache import (
    KVCompressionConfig,
    compress_cache,
    compression_due,
    flowcache,
    flowcache_config,
    importance,
    kv_compression,
    redundancy,
    scores,
    select,
)
from models.ar.compression import CacheCompressor
from models.ar.kv_cache import init_cache, init_kv_cache, write_chunk
from models.ar.rollout import RolloutConfig, chunk_denoiser, chunk_state_of, kv_cache_bytes, rollout
from models.wan import init_transformer, wan_tiny
from pallas_kernels.kv_quantization import dequantize_kv
from vidaccel.solvers import euler

FPB = 2


def _qk(c=12, nq=5, h=2, d=4, seed=0):
    k = jax.random.split(jax.random.key(seed), 2)
    return jax.random.normal(k[0], (1, nq, h, d)), jax.random.normal(k[1], (1, c, h, d))


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_importance_and_redundancy_match_explicit_references():
    q, k = _qk()
    qn, kn = np.asarray(q, np.float64)[0], np.asarray(k, np.float64)[0]
    valid = np.ones(12, bool)
    valid[10:] = False                                                   # two empty slots
    att = _softmax(np.einsum("qhd,khd->hqk", qn, kn[:10]) / 2.0).mean(1)      # (h, 10), sqrt(d) = 2
    pooled = np.stack([[att[h, max(0, j - 3):j + 4].max() for j in range(10)] for h in range(2)])
    imp = np.asarray(importance(q, k, jnp.asarray(valid), 7))[0]
    np.testing.assert_allclose(imp[:, :10], pooled, rtol=1e-5)
    assert np.isneginf(imp[:, 10:]).all()

    unit = kn[:10] / np.linalg.norm(kn[:10], axis=-1, keepdims=True)
    cos = np.einsum("ihd,jhd->hij", unit, unit)
    cos[:, np.arange(10), np.arange(10)] = 0.0                           # the diagonal-zeroed L x L matrix
    red = np.asarray(redundancy(k, jnp.asarray(valid)))[0]
    np.testing.assert_allclose(red[:, :10], _softmax(cos.sum(-1) / 10), rtol=1e-5)
    assert (red[:, 10:] == 0).all()

    s = np.asarray(scores(q, k, jnp.asarray(valid), KVCompressionConfig()))[0]
    np.testing.assert_allclose(s[:, :10], 0.07 * pooled - 0.93 * _softmax(cos.sum(-1) / 10), rtol=1e-5, atol=1e-7)


def test_select_and_compress_by_hand():
    """Head 0 prefers slots 3 and 0, head 1 slots 1 and 2: each head's kept K/V, values and frames are
    gathered in slot order, the rest of the cache is emptied."""
    score = jnp.asarray([[[5.0, 1.0, 2.0, 9.0], [0.0, 7.0, 8.0, 1.0]]])
    assert select(score, 2).tolist() == [[[0, 3], [1, 2]]]

    cache = init_kv_cache(1, 1, 4, 2, 1, head_frames=True)
    slot = jnp.arange(4, dtype=jnp.float32)[None, None, :, None, None]
    k = jnp.broadcast_to(slot, cache.k.shape) + jnp.asarray([0.0, 10.0])[:, None]     # k[slot, head] = slot + 10 head
    # keys chosen so that the queries' scores rank slots as `score` does: one-hot keys, heads read different ones
    kk = jnp.zeros((1, 1, 4, 2, 4)).at[0, 0, jnp.arange(4), 0, jnp.arange(4)].set(jnp.asarray([5.0, 1, 2, 9]))
    kk = kk.at[0, 0, jnp.arange(4), 1, jnp.arange(4)].set(jnp.asarray([0.0, 7, 8, 1]))
    cache = cache.replace(k=kk, v=k, frames=jnp.arange(4)[None] * 10, valid=jnp.ones(4, bool),
                          head_frames=jnp.broadcast_to((jnp.arange(4) * 10)[None, None, :, None], (1, 1, 4, 2)))
    q = jnp.ones((1, 1, 1, 2, 4)) * 100.0                                 # importance dominates at this scale
    cfg = KVCompressionConfig(mix_lambda=1.0, pool_kernel=1)
    new, idx = compress_cache(cache, q, 2, cfg, tokens_per_frame=1)
    assert idx.tolist() == [[[[0, 3], [1, 2]]]]
    assert new.v[0, 0, :, 0, 0].tolist() == [0.0, 3.0, 0.0, 0.0]          # head 0 kept slots 0, 3
    assert new.v[0, 0, :, 1, 0].tolist() == [11.0, 12.0, 0.0, 0.0]        # head 1 kept slots 1, 2
    assert new.head_frames[0, 0].tolist() == [[0, 10], [30, 20], [0, 0], [0, 0]]
    assert new.valid.tolist() == [True, True, False, False] and new.frames[0, :2].tolist() == [0, 30]


def test_trigger_by_hand():
    """Chunks of 8 tokens, 16 slots: the third chunk does not fit, so it triggers compression."""
    assert [bool(compression_due(jnp.int32(f), 8, 16)) for f in (0, 8, 16)] == [False, False, True]


def test_config_is_the_rollouts_compressor():
    """KVCompressionConfig is the rollout's generic CacheCompressor: `due` is the trigger and `compress` is
    `compress_cache` without the indices."""
    cfg = kv_compression(2, query_granularity="chunk")
    assert isinstance(cfg, CacheCompressor) and not isinstance(3, CacheCompressor)
    assert [bool(cfg.due(jnp.int32(f), 8, 16)) for f in (0, 8, 16)] == [False, False, True]
    cache = init_kv_cache(2, 1, 8, 2, 4, head_frames=True)
    k, v = jax.random.normal(jax.random.key(1), (2, 2, 1, 8, 2, 4))
    cache = write_chunk(cache, k, v, jnp.repeat(jnp.arange(4), 2)[None], 0)
    q = jax.random.normal(jax.random.key(2), (2, 1, 4, 2, 4))
    mine, want = cfg.compress(cache, q, 3, 2), compress_cache(cache, q, 3, cfg, 2)[0]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), mine, want))
    assert int(mine.valid.sum()) == 3


def _model():
    m = init_transformer(wan_tiny(num_frame_per_block=FPB, num_layers=2), seed=5)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(7), m.proj_out.kernel.shape) * 0.3)
    return m


def test_compressed_rollout_holds_its_budget():
    """4 chunks of 8 tokens, budget 2 chunks: chunks 2 and 3 do not fit, so each head first keeps 8 of its 16
    clean tokens; the cache stays 16 slots and ends with chunk 3 uncompressed; heads keep different frames. A
    budget covering the video never compresses and equals the full-history rollout exactly; FlowCache
    composes with it."""
    model = _model()
    k = jax.random.split(jax.random.key(3), 2)
    noise, ctx = jax.random.normal(k[0], (1, 4 * FPB, 4, 4, 4)), jax.random.normal(k[1], (1, 3, 16))
    solver = euler(3)
    comp = RolloutConfig(kv_compression=kv_compression(2, query_granularity="chunk"))
    out = rollout(flowcache(chunk_denoiser(model, comp), flowcache_config(0.0)), noise, ctx, solver=solver)
    cache = chunk_state_of(out.state).cache
    assert cache.capacity == 16 and int(cache.valid.sum()) == 16
    kept = np.asarray(cache.head_frames)[:, 0, :8]                       # (layers, 8 compressed slots, heads)
    newest = np.asarray(cache.head_frames)[:, 0, 8:]                     # chunk 3 (frames 6, 7), uncompressed
    assert (kept < 6).all() and (newest == np.repeat([6, 7], 4)[None, :, None]).all()
    assert len({tuple(kept[l, :, h]) for l in range(2) for h in range(2)}) > 1   # heads/layers keep different tokens
    full = rollout(model, noise, ctx, solver=solver)
    assert kv_cache_bytes(out.state) < kv_cache_bytes(full.state)
    assert float(jnp.abs(out.latents - full.latents).max()) > 1e-4        # compression changed the context
    wide = rollout(model, noise, ctx, solver=solver, config=RolloutConfig(kv_compression=kv_compression(4)))
    np.testing.assert_allclose(wide.latents, full.latents, rtol=0, atol=1e-6)


class _OneChunk:
    """A compressor with a budget too small for the rollout (one chunk leaves no room for the next)."""

    cache_chunks = 1

    def due(self, filled, chunk_tokens, capacity):
        return filled + chunk_tokens > capacity

    def compress(self, cache, queries, keep, tokens_per_frame):
        return cache


def test_config_errors():
    with pytest.raises(ValueError, match="cache_chunks must be >= 2"):
        KVCompressionConfig(cache_chunks=1)
    with pytest.raises(ValueError, match="pool_kernel must be odd"):
        KVCompressionConfig(pool_kernel=4)
    with pytest.raises(ValueError, match="mix_lambda must be <= 1.0, got 2.0"):
        KVCompressionConfig(mix_lambda=2.0)
    with pytest.raises(ValueError, match="mix_lambda must be finite"):
        KVCompressionConfig(mix_lambda=float("nan"))
    with pytest.raises(ValueError, match="query_granularity='head'"):
        KVCompressionConfig(query_granularity="head")
    with pytest.raises(ValueError, match="window_chunks=None"):
        RolloutConfig(kv_compression=KVCompressionConfig(), window_chunks=2)
    with pytest.raises(ValueError, match="kv_mode='clean'"):
        RolloutConfig(kv_compression=KVCompressionConfig(), kv_mode="last_step")
    with pytest.raises(ValueError, match="float K/V storage"):
        RolloutConfig(kv_compression=KVCompressionConfig(), kv_storage="int8")
    with pytest.raises(ValueError, match="kv_compression=3 is invalid"):
        RolloutConfig(kv_compression=3)
    with pytest.raises(ValueError, match="kv_compression.cache_chunks must be >= 2, got 1"):
        RolloutConfig(kv_compression=_OneChunk())
    cache = init_kv_cache(1, 1, 4, 2, 1)
    with pytest.raises(ValueError, match="per-head slot frames"):
        compress_cache(cache, jnp.zeros((1, 1, 1, 2, 1)), 2, KVCompressionConfig(), 1)


def test_write_chunk_float_and_quantized():
    """`write_chunk` (the commit of a chunk buffer) stores K/V, frames and validity; int8 storage holds them
    within its quantization step."""
    k, v = jax.random.normal(jax.random.key(5), (2, 2, 1, 32, 2, 8))
    frames = jnp.full((1, 32), 7, jnp.int32)
    f32 = write_chunk(init_cache("float32", 2, 1, 64, 2, 8, window=32, head_frames=True), k, v, frames, 32)
    np.testing.assert_array_equal(f32.k[:, :, 32:], k)
    assert f32.valid.tolist() == [False] * 32 + [True] * 32 and (f32.head_frames[:, :, 32:] == 7).all()
    q8 = write_chunk(init_cache("int8", 2, 1, 64, 2, 8, window=32), k, v, frames, 32)
    for layer in range(2):
        kd, vd = dequantize_kv(jax.tree.map(lambda a, i=layer: a[i], q8.layers))
        np.testing.assert_allclose(kd[:, 32:], k[layer], atol=0.05)
        np.testing.assert_allclose(vd[:, 32:], v[layer], atol=0.05)
    assert q8.valid.tolist() == f32.valid.tolist()
