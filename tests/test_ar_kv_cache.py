"""KV-cached chunk forwards equal the full block-causal forward (the AR runtime's exactness property)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.ar.kv_cache import cached_attention, init_kv_cache, store
from models.wan import init_transformer, wan_tiny

CHUNK = 2  # latent frames per chunk = num_frame_per_block


def _model():
    m = init_transformer(wan_tiny(num_frame_per_block=CHUNK, num_layers=3), seed=4)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(9), m.proj_out.kernel.shape) * 0.2)
    return m


def test_cached_chunks_equal_full_block_causal_forward():
    """Chunks 0, 1 written at t=0 into the cache, then chunk 2 at t=700 reading it, equals the full forward
    over all three chunks with per-frame t = (0, 0, 0, 0, 700, 700). fp32, <= 1e-5 relative."""
    model = _model()
    cfg = model.cfg
    k = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(k[0], (2, 3 * CHUNK, 4, 4, 4))
    ctx = jax.random.normal(k[1], (2, 3, 16))
    t_full = jnp.array([[0.0] * 4 + [700.0] * 2] * 2)
    full = model(x, t_full, ctx)

    tokens_per_chunk = CHUNK * 2 * 2
    cache = init_kv_cache(cfg.num_layers, 2, 2 * tokens_per_chunk, cfg.num_attention_heads, cfg.attention_head_dim)
    for c in range(2):
        # chunk 1 goes to the first slots, chunk 0 after it: slot order must not matter
        at = (1 - c) * tokens_per_chunk
        emb = model.embed(x[:, c * CHUNK:(c + 1) * CHUNK], 0.0, ctx, frame_offset=c * CHUNK)
        _, (kk, vv) = model.blocks(emb, attention=cached_attention(cache, write_at=at),
                                   layer_state=(cache.k, cache.v))
        cache = store(cache, (kk, vv), emb.positions[..., 0], at)
    assert bool(cache.valid.all())
    emb = model.embed(x[:, 2 * CHUNK:], 700.0, ctx, frame_offset=2 * CHUNK)
    tokens, _ = model.blocks(emb, attention=cached_attention(cache), layer_state=(cache.k, cache.v))
    last = model.head(tokens, emb)
    ref = full[:, 2 * CHUNK:]
    err = float(jnp.linalg.norm(last - ref) / jnp.linalg.norm(ref))
    assert err <= 1e-5, err


def test_empty_slots_are_masked():
    """Garbage in unfilled slots must not change the result."""
    model = _model()
    cfg = model.cfg
    x = jax.random.normal(jax.random.key(1), (1, CHUNK, 4, 4, 4))
    ctx = jnp.ones((1, 2, 16))
    cache = init_kv_cache(cfg.num_layers, 1, 16, cfg.num_attention_heads, cfg.attention_head_dim)
    noisy = cache.replace(k=jax.random.normal(jax.random.key(2), cache.k.shape) * 50,
                          v=jax.random.normal(jax.random.key(3), cache.v.shape) * 50)
    emb = model.embed(x, 300.0, ctx)
    a, _ = model.blocks(emb, attention=cached_attention(cache), layer_state=(cache.k, cache.v))
    b, _ = model.blocks(emb, attention=cached_attention(noisy), layer_state=(noisy.k, noisy.v))
    plain, _ = model.blocks(emb)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a, plain, rtol=1e-5, atol=1e-6)


def test_cache_errors():
    cache = init_kv_cache(1, 1, 8, 2, 4)
    kv = jnp.zeros((1, 1, 8, 2, 4))
    with pytest.raises(ValueError, match="overflows its 8 slots"):
        store(cache, (kv, kv), jnp.zeros((1, 4), jnp.int32), 5)
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        init_kv_cache(1, 1, 0, 2, 4)
    assert cache.nbytes() == 2 * 8 * 2 * 4 * 4 + 8 * 4 + 8
