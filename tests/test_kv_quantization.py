"""pallas_kernels.kv_quantization: int4 packing, quantize/dequantize error bounds, scale granularity, layout,
memory accounting, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import kv_quantization as kv

CONFIGS = [kv.KVQuantConfig(bits=b, group_size=16, symmetric=s) for b in (8, 4) for s in (False, True)]


def kv_data(seed, b=2, t=70, h=3, d=16):
    """Random K with outlier channels (as real keys have) and V with per-token spread."""
    ks = jax.random.split(jax.random.key(seed), 2)
    k = jax.random.normal(ks[0], (b, t, h, d)) * (1 + 9 * (jnp.arange(d) % 5 == 0))
    v = jax.random.normal(ks[1], (b, t, h, d)) * jnp.linspace(0.2, 3, t)[None, :, None, None] + 0.7
    return k, v


def test_int4_pack_unpack_round_trip_exact():
    codes = jax.random.randint(jax.random.key(0), (3, 5, 2, 16), 0, 16).astype(jnp.uint8)
    packed = kv.pack_int4(codes)
    assert packed.shape == (3, 5, 2, 8) and packed.dtype == jnp.uint8
    assert (np.asarray(kv.unpack_int4(packed)) == np.asarray(codes)).all()
    every_byte = jnp.arange(256, dtype=jnp.uint8).reshape(8, 32)
    assert (np.asarray(kv.pack_int4(kv.unpack_int4(every_byte))) == np.asarray(every_byte)).all()
    # split-half layout: low nibble = channel j, high nibble = channel j + D/2
    c = jnp.array([1, 2, 3, 4, 11, 12, 13, 14], jnp.uint8)
    assert np.asarray(kv.pack_int4(c)).tolist() == [1 | 11 << 4, 2 | 12 << 4, 3 | 13 << 4, 4 | 14 << 4]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"int{c.bits}-{'sym' if c.symmetric else 'asym'}")
def test_round_trip_within_half_a_step(cfg):
    """Round-to-nearest: every dequantized element is within scale/2 of the original (fp32 scales; the
    1e-6 relative slack covers the fp32 arithmetic of code * scale + offset)."""
    k, v = kv_data(1)
    kc, ks, ko = kv.quantize_keys(k, cfg)
    vc, vs, vo = kv.quantize_values(v, cfg)
    kd = kv.dequantize_keys(kc, ks, ko, bits=cfg.bits, group_size=16)[:, :70]
    vd = kv.dequantize_values(vc, vs, vo, bits=cfg.bits)[:, :70]
    k_step = jnp.repeat(ks, 16, axis=1)[:, :70]
    for x, xd, step in ((k, kd, k_step), (v, vd, vs[:, :70, :, None])):
        err = jnp.abs(xd - x)
        assert bool(jnp.all(err <= 0.5 * step + 1e-6 * jnp.abs(x) + 1e-7))
        assert float(err.max()) > 0  # it really quantized
    codes = np.asarray(kv.unpack_int4(kc) if cfg.bits == 4 else kc)[:, :70]
    lo = 1 if cfg.symmetric else 0
    assert codes.min() == lo and codes.max() == 2 ** cfg.bits - 1  # the extremes use the full code range


def test_key_scales_are_per_channel_per_group_and_value_scales_per_token():
    cfg = kv.KVQuantConfig(bits=8, group_size=16)
    k, v = kv_data(2)
    k2 = k.at[0, 20, 1, 3].set(500.0)  # outlier: token 20 (group 1), head 1, channel 3
    _, ks, _ = kv.quantize_keys(k, cfg)
    _, ks2, _ = kv.quantize_keys(k2, cfg)
    changed = np.argwhere(np.asarray(ks2 != ks)).tolist()
    assert changed == [[0, 1, 1, 3]]
    v2 = v.at[1, 33, 2, 5].set(-400.0)
    _, vs, _ = kv.quantize_values(v, cfg)
    _, vs2, _ = kv.quantize_values(v2, cfg)
    assert np.argwhere(np.asarray(vs2 != vs)).tolist() == [[1, 33, 2]]


def test_partial_last_group_uses_only_valid_tokens():
    """T=70 with groups of 16: the last group (tokens 64..69) gets the scale of those 6 tokens alone, and codes
    past T are 0."""
    cfg = kv.KVQuantConfig(bits=4, group_size=16)
    k, _ = kv_data(3)
    kc, ks, ko = kv.quantize_keys(k, cfg)
    assert kc.shape == (2, 80, 3, 8) and ks.shape == (2, 5, 3, 16)
    _, ks_tail, ko_tail = kv.quantize_keys(k[:, 64:], cfg)
    assert (np.asarray(ks[:, 4]) == np.asarray(ks_tail[:, 0])).all()
    assert (np.asarray(ko[:, 4]) == np.asarray(ko_tail[:, 0])).all()
    assert (np.asarray(kc[:, 70:]) == 0).all()


def test_constant_and_zero_inputs():
    """A constant group (max == min) takes the fallback scale and is exact (asymmetric) or within fp32 rounding
    (symmetric: 15 * s - 8 * s); all-zero values are exactly zero in both schemes."""
    x = jnp.full((1, 16, 1, 8), 2.5)
    for sym in (False, True):
        c = kv.KVQuantConfig(bits=4, group_size=16, symmetric=sym)
        kd = kv.dequantize_keys(*kv.quantize_keys(x, c), bits=4, group_size=16)
        vd = kv.dequantize_values(*kv.quantize_values(jnp.zeros_like(x), c), bits=4)
        assert (np.asarray(vd) == 0).all()
        np.testing.assert_allclose(np.asarray(kd), 2.5, rtol=0 if not sym else 1e-6)


def test_quantize_kv_layout_and_bytes_held():
    cfg = kv.KVQuantConfig(bits=4, group_size=16)
    k, v = kv_data(4)
    kr = jnp.ones((2, 8, 3, 16), jnp.bfloat16)
    cache = kv.quantize_kv(k, v, cfg, capacity=96, k_recent=kr, v_recent=kr, recent_length=jnp.array([8, 3]))
    assert cache.k_codes.shape == (2, 96, 3, 8) and cache.k_scale.shape == (2, 6, 3, 16)
    assert cache.v_codes.shape == (2, 96, 3, 8) and cache.v_scale.shape == (2, 96, 3)
    assert cache.length.tolist() == [70, 70] and cache.recent_length.tolist() == [8, 3]
    assert (cache.capacity, cache.window, cache.heads, cache.head_dim) == (96, 8, 3, 16)
    expect = (2 * 96 * 3 * 8 * 2  # codes
              + 2 * 6 * 3 * 16 * 4 * 2  # key scale + offset
              + 2 * 96 * 3 * 4 * 2  # value scale + offset
              + 2 * 8 * 3 * 16 * 2 * 2  # bf16 window
              + 2 * 4 * 2)  # lengths
    assert kv.bytes_held(cache) == expect
    assert kv.bytes_held(jax.eval_shape(lambda: cache)) == expect  # abstract caches too
    c8 = kv.quantize_kv(k, v, kv.KVQuantConfig(bits=8, group_size=16), capacity=96, k_recent=kr, v_recent=kr)
    assert kv.bytes_held(c8) - kv.bytes_held(cache) == 2 * 96 * 3 * 8 * 2  # codes double
    assert kv.bytes_held(cache) < kv.dense_kv_bytes(2, 104, 3, 16, jnp.bfloat16) * 0.6
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == 10 and jax.tree_util.tree_unflatten(treedef, leaves).bits == 4


def test_init_quantized_kv_is_empty_with_static_shapes():
    cache = kv.init_quantized_kv(2, 64, 3, 16, window=8, config=kv.KVQuantConfig(bits=8, group_size=32))
    assert cache.k_codes.shape == (2, 64, 3, 16) and cache.k_scale.shape == (2, 2, 3, 16)
    assert cache.length.tolist() == [0, 0] and cache.recent_length.tolist() == [0, 0]
    assert cache.k_recent.dtype == jnp.bfloat16 and cache.group_size == 32


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(bits=3), ValueError, "bits=3"),
    (dict(group_size=0), ValueError, "KVQuantConfig.group_size must be >= 1, got 0"),
    (dict(group_size=16.0), TypeError, r"KVQuantConfig.group_size must be an int, got 16.0 \(float\)"),
    (dict(symmetric=1), TypeError, r"KVQuantConfig.symmetric must be True or False, got 1 \(int\)"),
    (dict(scale_dtype="int8"), ValueError, "scale_dtype='int8'"),
])
def test_bad_config_raises(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kv.KVQuantConfig(**kwargs)


def test_bad_inputs_raise():
    cfg = kv.KVQuantConfig(bits=4, group_size=16)
    k, v = kv_data(5)
    with pytest.raises(TypeError, match="uint8"):
        kv.pack_int4(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="even last axis"):
        kv.pack_int4(jnp.zeros((3,), jnp.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\], got max 16"):
        kv.pack_int4(jnp.full((4,), 16, jnp.uint8))
    with pytest.raises(TypeError, match="uint8"):
        kv.unpack_int4(jnp.zeros((4,), jnp.int8))
    with pytest.raises(ValueError, match="even head_dim"):
        kv.quantize_keys(k[..., :15], cfg)
    with pytest.raises(ValueError, match="4 dims"):
        kv.quantize_values(v[0], cfg)
    with pytest.raises(TypeError, match="floating"):
        kv.quantize_keys(k.astype(jnp.int32), cfg)
    with pytest.raises(TypeError, match=r"capacity must be an int, got 64.0"):
        kv.quantize_keys(k, cfg, capacity=64.0)
    with pytest.raises(ValueError, match="capacity=72"):
        kv.quantize_keys(k, cfg, capacity=72)
    with pytest.raises(ValueError, match="capacity=64"):
        kv.quantize_keys(k, cfg, capacity=64)
    with pytest.raises(ValueError, match="same shape"):
        kv.quantize_kv(k, v[:, :60], cfg)
    with pytest.raises(ValueError, match="both k_recent and v_recent"):
        kv.quantize_kv(k, v, cfg, k_recent=k[:, :8])
    with pytest.raises(ValueError, match="k_recent / v_recent"):
        kv.quantize_kv(k, v, cfg, k_recent=k[:, :8, :2], v_recent=v[:, :8, :2])
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        kv.init_quantized_kv(1, 32, 2, 16, window=0, config=cfg)
