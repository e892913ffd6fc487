"""Quantized-KV attention kernel (interpret mode on CPU) vs its reference, the reference vs dense attention,
and the quantized result vs full precision within a bound derived from the quantization step.

Poisoning: interpret mode NaN-fills output buffers (checked in test_block_sparse_attention), so every output
element the kernel does not write would be NaN; the tests assert finiteness.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import kv_quantization as kv
from pallas_kernels import quantized_kv_attention
from pallas_kernels.reference import quantized_kv_attention_reference
from tests.pallas_lowering import abstract_h100, lower_for_cuda  # noqa: F401 (fixture)

B, TQ, T, W, H, D, G = 3, 40, 150, 24, 2, 32, 32
LENGTH, RECENT, QLEN = [150, 97, 0], [24, 10, 7], [40, 33, 40]  # batch 2: window only
BQ, BK = 16, 16
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def data(seed):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, TQ, H, D))
    k = jax.random.normal(ks[1], (B, T, H, D)) * (1 + 3 * (jnp.arange(D) % 7 == 0))  # outlier channels
    v = jax.random.normal(ks[2], (B, T, H, D)) + 0.3
    kr = jax.random.normal(ks[3], (B, W, H, D))
    vr = jax.random.normal(ks[4], (B, W, H, D))
    return q, k, v, kr, vr


def make_cache(bits, symmetric, seed=0):
    q, k, v, kr, vr = data(seed)
    cfg = kv.KVQuantConfig(bits=bits, group_size=G, symmetric=symmetric)
    cache = kv.quantize_kv(k, v, cfg, k_recent=kr, v_recent=vr, recent_length=jnp.array(RECENT))
    return q, k, v, cache.replace(length=jnp.array(LENGTH))


def finite(x):
    return bool(np.isfinite(np.asarray(x, np.float32)).all())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_matches_reference_on_dequantized_cache(bits, dtype):
    """Tight: the kernel and the reference read the same codes; only the order of arithmetic differs."""
    for symmetric in (False, True):
        q, _, _, cache = make_cache(bits, symmetric, seed=bits)
        q = q.astype(dtype)
        out = quantized_kv_attention(q, cache, q_lengths=jnp.array(QLEN), block_q=BQ, block_k=BK)
        ref = quantized_kv_attention_reference(q, cache, q_lengths=jnp.array(QLEN))
        assert out.shape == q.shape and out.dtype == dtype and finite(out)
        assert rel_l2(out, ref) <= TOL[dtype], (symmetric, rel_l2(out, ref))
        assert (np.asarray(out[1, 33:], np.float32) == 0).all()  # query rows past q_lengths
        assert np.abs(np.asarray(out[2], np.float32)).min(axis=-1).max() > 0  # window-only batch is not empty


def test_reference_equals_dense_attention_on_dequantized_tokens():
    q, _, _, cache = make_cache(4, False, seed=5)
    kq, vq = kv.dequantize_kv(cache)
    k = jnp.concatenate([kq, cache.k_recent], 1)
    v = jnp.concatenate([vq, cache.v_recent], 1)
    cols = jnp.concatenate([jnp.arange(cache.capacity)[None] < cache.length[:, None],
                            jnp.arange(W)[None] < cache.recent_length[:, None]], 1)
    dense = jax.nn.dot_product_attention(q, k, v, mask=cols[:, None, None, :])
    ref = quantized_kv_attention_reference(q, cache)
    assert rel_l2(ref, dense) <= 1e-5


def _quantized_vs_exact(bits):
    q, k, v, cache = make_cache(bits, False, seed=6)
    cache = cache.replace(length=jnp.array([T, T, T]))
    quant = quantized_kv_attention_reference(q, cache)
    kf = jnp.concatenate([k, cache.k_recent], 1)
    vf = jnp.concatenate([v, cache.v_recent], 1)
    cols = (jnp.arange(T + W)[None] < T + cache.recent_length[:, None])[:, None, None, :]
    exact = jax.nn.dot_product_attention(q, kf, vf, mask=cols)
    scale = D ** -0.5
    k_half_step = jnp.max(cache.k_scale[:, :5], axis=1) / 2  # (B, H, D): groups 0..4 hold tokens 0..149
    eps = scale * jnp.einsum("bqhd,bhd->bqh", jnp.abs(q), k_half_step)[..., None]
    v_valid = jnp.where(cols[:, 0, 0, :, None, None], vf, jnp.nan)
    v_half_range = (jnp.nanmax(v_valid, 1) - jnp.nanmin(v_valid, 1))[:, None] / 2  # (B, 1, H, D)
    v_half_step = (jnp.max(cache.v_scale[:, :T], axis=1) / 2)[:, None, :, None]
    bound = jnp.expm1(2 * eps) * v_half_range + v_half_step
    return quant, exact, bound, 2 * v_half_range


def test_quantized_attention_within_quantization_bound():
    """Reference on the quantized cache vs exact attention on the original fp32 K/V, elementwise.

    Keys: |k_hat - k| <= s_k/2 per element (round to nearest, fp32 scales), so each logit moves by at most
    eps_i = scale * sum_d |q_id| * max_j s_k[g(j), d] / 2. Softmax weights then change by a factor within
    exp(+-2 eps_i), hence sum_j |p_hat_j - p_j| <= exp(2 eps_i) - 1, and since sum_j (p_hat_j - p_j) = 0 the
    value mix moves by at most (exp(2 eps_i) - 1) * (max_j v_jd - min_j v_jd) / 2. Values: |v_hat - v| <=
    s_v/2 per token, adding at most max_j s_v[j] / 2. The window is exact. Bound = the sum, per element.

    The bound is worst case (all D rounding errors of a logit aligned): informative for int8 (a few % of the
    value range, the trivial bound), vacuous for int4. So the int4 error is also checked against the int8
    error: to first order it scales with the quantization step, 255/15 = 17 times larger for int4."""
    errs = {}
    for bits in (8, 4):
        quant, exact, bound, _ = _quantized_vs_exact(bits)
        err = jnp.abs(quant - exact)
        assert bool(jnp.all(err <= bound * (1 + 1e-4) + 1e-6)), bits
        assert float(err.max()) > 0
        errs[bits] = rel_l2(quant, exact)
    _, _, bound8, v_range = _quantized_vs_exact(8)
    assert float(jnp.median(bound8 / v_range)) < 0.1
    assert errs[8] < 0.01 and 17 / 2 < errs[4] / errs[8] < 17 * 2, errs


def test_data_past_valid_lengths_is_never_used():
    """NaN in the key scales of groups past `length`, in the value scales of tokens past `length` and in the
    window past `recent_length`: the kernel output stays finite and equal to the clean reference."""
    q, _, _, cache = make_cache(8, False, seed=7)
    ref = quantized_kv_attention_reference(q, cache)
    tok = jnp.arange(cache.capacity)[None, :, None] >= cache.length[:, None, None]  # (B, C, 1)
    grp = jnp.arange(cache.capacity // G)[None, :, None, None] * G >= cache.length[:, None, None, None]
    win = (jnp.arange(W)[None, :, None, None] >= cache.recent_length[:, None, None, None])
    bad = cache.replace(
        k_scale=jnp.where(grp, jnp.nan, cache.k_scale), k_offset=jnp.where(grp, jnp.nan, cache.k_offset),
        v_scale=jnp.where(tok, jnp.nan, cache.v_scale), v_offset=jnp.where(tok, jnp.nan, cache.v_offset),
        k_recent=jnp.where(win, jnp.nan, cache.k_recent), v_recent=jnp.where(win, jnp.nan, cache.v_recent))
    out = quantized_kv_attention(q, bad, block_q=BQ, block_k=BK)
    assert finite(out) and rel_l2(out, ref) <= 1e-5


def test_empty_cache_and_window_give_zeros_and_jit_works():
    q, _, _, cache = make_cache(8, False, seed=8)
    empty = cache.replace(length=jnp.array([0, 150, 0]), recent_length=jnp.array([0, 0, 5]))
    f = jax.jit(lambda q, c: quantized_kv_attention(q, c, block_q=BQ, block_k=BK))
    out = f(q, empty)
    assert (np.asarray(out[0]) == 0).all() and finite(out)
    assert rel_l2(out, quantized_kv_attention_reference(q, empty)) <= 1e-5


def test_default_block_k_and_larger_groups():
    """group_size 64, default block_k (the largest tile dividing the group: 64), block_q 32."""
    q, k, v, kr, vr = data(9)
    cache = kv.quantize_kv(k, v, kv.KVQuantConfig(bits=4, group_size=64), k_recent=kr, v_recent=vr)
    out = quantized_kv_attention(q, cache, block_q=32)
    assert finite(out) and rel_l2(out, quantized_kv_attention_reference(q, cache)) <= 1e-5


# -------------------------------------------------------------------- errors

@pytest.mark.parametrize("mutate, kwargs, exc, match", [
    (lambda q, c: (q[0], c), {}, ValueError, "q must have shape"),
    (lambda q, c: (q.astype(jnp.float16), c), {}, TypeError, "float16"),
    (lambda q, c: (q[..., :16], c), {}, ValueError, "does not match the cache"),
    (lambda q, c: (q, (c.k_codes, c.v_codes)), {}, TypeError, "QuantizedKV"),
    (lambda q, c: (q, c.replace(k_codes=c.k_codes.astype(jnp.int8))), {}, TypeError, "uint8"),
    (lambda q, c: (q, c.replace(length=jnp.array([150, 161, 0]))), {}, ValueError, r"cache.length .* \[0, 160\]"),
    (lambda q, c: (q, c.replace(recent_length=jnp.array([-1, 0, 0]))), {}, ValueError, "cache.recent_length"),
    (lambda q, c: (q, c), dict(q_lengths=jnp.array([41, 0, 0])), ValueError, r"q_lengths .* \[0, 40\]"),
    (lambda q, c: (q, c), dict(q_lengths=jnp.array([4, 0])), ValueError, r"q_lengths must have shape \(3,\)"),
    (lambda q, c: (q, c), dict(q_lengths=jnp.array([4.0, 0, 0])), TypeError, "q_lengths must be integer"),
    (lambda q, c: (q, c), dict(block_k=64), ValueError, "block_k=64 must divide the cache's group_size=32"),
    (lambda q, c: (q, c), dict(block_q=12), ValueError, "block_q=12"),
    (lambda q, c: (q, c), dict(scale=0.0), ValueError, "scale"),
])
def test_bad_inputs_raise(mutate, kwargs, exc, match):
    q, _, _, cache = make_cache(4, False)
    q, cache = mutate(q, cache)
    with pytest.raises(exc, match=match):
        quantized_kv_attention(q, cache, **kwargs)
    with pytest.raises(exc, match=match):
        quantized_kv_attention_reference(q, cache, **kwargs)


def test_group_size_without_a_valid_tile_raises():
    q, k, v, _, _ = data(10)
    cache = kv.quantize_kv(k, v, kv.KVQuantConfig(bits=8, group_size=24))
    with pytest.raises(ValueError, match="group_size=24 is divisible by none"):
        quantized_kv_attention(q, cache)


# -------------------------------------------------------------------- GPU lowering (no GPU needed)

@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.usefixtures("abstract_h100")
def test_kernel_lowers_to_triton_for_gpu(bits):
    """Compiled path (interpret=False) at Wan's head_dim 128, bf16 queries, group 64 with block_k 64."""
    cache = jax.eval_shape(lambda: kv.init_quantized_kv(1, 256, 2, 128, window=48,
                                                        config=kv.KVQuantConfig(bits=bits, group_size=64)))
    q = jax.ShapeDtypeStruct((1, 100, 2, 128), jnp.bfloat16)
    mod = lower_for_cuda(lambda q, c: quantized_kv_attention(q, c, block_q=64, interpret=False), q, cache)
    assert "xla.gpu.triton" in mod


def test_compiled_path_refuses_non_power_of_two_tiles():
    cache = jax.eval_shape(lambda: kv.init_quantized_kv(1, 64, 2, 48, window=16,
                                                        config=kv.KVQuantConfig(bits=4, group_size=32)))
    q = jax.ShapeDtypeStruct((1, 16, 2, 48), jnp.bfloat16)
    with pytest.raises(ValueError, match="head_dim/2 = 24 to be a power of two"):
        jax.eval_shape(lambda q, c: quantized_kv_attention(q, c, interpret=False), q, cache)
