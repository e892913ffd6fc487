"""Attention of a chunk of queries over an int8 / int4 KV cache plus a full-precision recent window (Pallas).

The cache layout is `pallas_kernels.kv_quantization.QuantizedKV` (keys per channel in token groups, values per token,
split-half int4 packing). The kernel never dequantizes the cache into memory. For a kv tile inside key
group g, with codes c, key scale s_g and offset o_g (per channel), and per-token value scale t / offset u:

    logits = (q * scale * s_g) @ c_k^T  +  (q * scale) @ o_g          key scale folded into q
    out   += (p * t) @ c_v               +  (p @ u)                     value scale folded into p

so the codes go straight into the matmuls (cast to q's dtype, exact for 0..255), and the scales cost one
(bq x D) multiply per tile for keys and one (bq x bk) multiply for values. int4 codes are unpacked with one
mask and one shift; q, the key scales and the output are handled as the two halves of head_dim that the
split-half packing gives, so no interleave is needed.

Masking is by valid lengths: cache tokens [0, length[b]), window tokens [0, recent_length[b]), query rows
[0, q_lengths[b]). Every valid query sees every valid cached and window token (chunk-causal: the current
chunk lives in the window and attends to itself bidirectionally). Query rows past q_lengths, and rows that
see no token at all, return zeros. The loops run only to the valid lengths, so work scales with them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as C
from pallas_kernels.kv_quantization import QuantizedKV


def _qkv_kernel(len_ref, q_ref, kc_ref, ks_ref, ko_ref, vc_ref, vs_ref, vo_ref, kr_ref, vr_ref, o_ref, *,
                bits: int, group_size: int, block_k: int, scale: float):
    n_cache, n_recent, n_q = len_ref[0], len_ref[1], len_ref[2]
    bq, d = q_ref.shape
    cd = q_ref.dtype
    halves = [slice(0, d)] if bits == 8 else [slice(0, d // 2), slice(d // 2, d)]
    q_parts = [q_ref[:, h] for h in halves]
    qs_parts = [qp.astype(jnp.float32) * scale for qp in q_parts]

    def unpack(packed):
        return [packed] if bits == 8 else [packed & 0xF, packed >> 4]

    def cache_body(j, carry):
        accs, m, l = carry
        start = j * block_k
        g = start // group_size
        s = jnp.zeros((bq, block_k), jnp.float32)
        for h, qs, ck in zip(halves, qs_parts, unpack(kc_ref[pl.ds(start, block_k), :])):
            k_scale = ks_ref[g, h].astype(jnp.float32)
            k_off = ko_ref[g, h].astype(jnp.float32)
            s += jnp.dot((qs * k_scale[None, :]).astype(cd), ck.astype(cd).T, preferred_element_type=jnp.float32)
            s += jnp.sum(qs * k_off[None, :], axis=-1)[:, None]
        valid = start + C.col_iota(bq, block_k) < n_cache
        p, alpha, m, l = C.softmax_step(m, l, s, valid)
        tok_valid = start + lax.iota(jnp.int32, block_k) < n_cache
        v_scale = jnp.where(tok_valid, vs_ref[pl.ds(start, block_k)].astype(jnp.float32), 0.0)
        v_off = jnp.where(tok_valid, vo_ref[pl.ds(start, block_k)].astype(jnp.float32), 0.0)
        pv = (p * v_scale[None, :]).astype(cd)
        bias = jnp.sum(p * v_off[None, :], axis=-1)[:, None]
        accs = tuple(alpha[:, None] * acc + jnp.dot(pv, cv.astype(cd), preferred_element_type=jnp.float32) + bias
                     for acc, cv in zip(accs, unpack(vc_ref[pl.ds(start, block_k), :])))
        return accs, m, l

    def window_body(j, carry):
        accs, m, l = carry
        start = j * block_k
        s = jnp.zeros((bq, block_k), jnp.float32)
        for h, qp in zip(halves, q_parts):
            k = kr_ref[pl.ds(start, block_k), h]
            s += jnp.dot(qp, k.T, preferred_element_type=jnp.float32)
        valid = start + C.col_iota(bq, block_k) < n_recent
        p, alpha, m, l = C.softmax_step(m, l, s * scale, valid)
        # window slots past recent_length hold stale data (maybe non-finite): zero them, p = 0 is not enough
        tok_valid = (start + lax.iota(jnp.int32, block_k) < n_recent)[:, None]
        accs = tuple(alpha[:, None] * acc
                     + jnp.dot(p.astype(cd), jnp.where(tok_valid, vr_ref[pl.ds(start, block_k), h], 0),
                               preferred_element_type=jnp.float32)
                     for acc, h in zip(accs, halves))
        return accs, m, l

    accs = tuple(jnp.zeros((bq, h.stop - h.start), jnp.float32) for h in halves)
    _, m, l = C.init_carry(bq, 1)
    carry = lax.fori_loop(0, (n_cache + block_k - 1) // block_k, cache_body, (accs, m, l))
    accs, _, l = lax.fori_loop(0, (n_recent + block_k - 1) // block_k, window_body, carry)
    row_ok = pl.program_id(0) * bq + C.row_iota(bq, 1) < n_q
    for h, acc in zip(halves, accs):
        o_ref[:, h] = jnp.where(row_ok, C.finish(acc, l), 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "scale", "interpret"))
def _qkv_call(q, cache: QuantizedKV, q_lengths, *, block_q, block_k, scale, interpret):
    b, tq, h, d = q.shape
    cap, win = cache.capacity, cache.window
    nq = pl.cdiv(tq, block_q)
    wp = pl.cdiv(win, block_k) * block_k
    qp = C.pad_axis(q, 1, nq * block_q)
    kr = C.pad_axis(cache.k_recent.astype(q.dtype), 1, wp)
    vr = C.pad_axis(cache.v_recent.astype(q.dtype), 1, wp)
    # lengths beyond capacity are refused eagerly; under jit they are clamped so no read leaves the buffers
    lens = jnp.stack([jnp.clip(cache.length, 0, cap), jnp.clip(cache.recent_length, 0, win),
                      jnp.clip(q_lengths, 0, tq), jnp.zeros_like(q_lengths)], axis=-1).astype(jnp.int32)
    dc = cache.k_codes.shape[-1]
    ng = cap // cache.group_size
    per_bh = lambda *blk: pl.BlockSpec((None, *blk[:1], None, *blk[1:]),
                                       lambda i, bi, hi: (bi, 0, hi) + (0,) * (len(blk) - 1))
    out = pl.pallas_call(
        functools.partial(_qkv_kernel, bits=cache.bits, group_size=cache.group_size, block_k=block_k, scale=scale),
        grid=(nq, b, h),
        in_specs=[
            pl.BlockSpec((None, 4), lambda i, bi, hi: (bi, 0)),
            pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
            per_bh(cap, dc), per_bh(ng, d), per_bh(ng, d),  # k codes, k scale, k offset
            per_bh(cap, dc), per_bh(cap), per_bh(cap),  # v codes, v scale, v offset
            per_bh(wp, d), per_bh(wp, d),  # window k, v
        ],
        out_specs=pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=C.compiler_params(interpret, d),
        interpret=interpret,
        name="quantized_kv_attention",
    )(lens, qp, cache.k_codes, cache.k_scale, cache.k_offset, cache.v_codes, cache.v_scale, cache.v_offset, kr, vr)
    return out[:, :tq]


def default_block_k(group_size: int) -> int:
    """Largest allowed kv tile that divides the key group (a tile must lie inside one group)."""
    for bk in reversed(C.ALLOWED_BLOCKS):
        if group_size % bk == 0:
            return bk
    raise ValueError(f"group_size={group_size} is divisible by none of the kv tile sizes {C.ALLOWED_BLOCKS}; "
                     "use a group_size that is a multiple of 16")


def check_cache(q: jax.Array, cache: QuantizedKV, q_lengths, block_k: int | None) -> tuple[int, jax.Array]:
    """Validate q against the cache; returns (block_k, q_lengths as (B,) int32)."""
    if not isinstance(cache, QuantizedKV):
        raise TypeError(f"cache must be a pallas_kernels.kv_quantization.QuantizedKV, got {type(cache).__name__}")
    if not hasattr(q, "ndim") or q.ndim != 4:
        raise ValueError(f"q must have shape (batch, tokens, heads, head_dim), got {getattr(q, 'shape', q)}")
    C.check_float_dtype("q", q)
    b, tq, h, d = q.shape
    if (cache.batch, cache.heads, cache.head_dim) != (b, h, d):
        raise ValueError(f"q {q.shape} does not match the cache (batch {cache.batch}, heads {cache.heads}, "
                         f"head_dim {cache.head_dim})")
    if cache.bits not in (4, 8):
        raise ValueError(f"cache.bits={cache.bits}; allowed 4, 8")
    if cache.k_codes.dtype != jnp.uint8 or cache.v_codes.dtype != jnp.uint8:
        raise TypeError(f"cache codes must be uint8, got {cache.k_codes.dtype} / {cache.v_codes.dtype}")
    dc = d // 2 if cache.bits == 4 else d
    if cache.k_codes.shape[-1] != dc or cache.v_codes.shape != cache.k_codes.shape:
        raise ValueError(f"cache codes {cache.k_codes.shape} / {cache.v_codes.shape} do not fit {cache.bits}-bit "
                         f"storage of head_dim {d} (last axis {dc})")
    if cache.capacity % cache.group_size:
        raise ValueError(f"cache capacity {cache.capacity} is not a multiple of group_size {cache.group_size}")
    if cache.k_recent.shape[1] < 1:
        raise ValueError("the cache's recent window must hold at least one slot")
    block_k = default_block_k(cache.group_size) if block_k is None else C.check_block("block_k", block_k)
    if cache.group_size % block_k:
        raise ValueError(f"block_k={block_k} must divide the cache's group_size={cache.group_size} "
                         "(each kv tile uses one row of key scales)")
    if q_lengths is None:
        q_lengths = jnp.full((b,), tq, jnp.int32)
    else:
        q_lengths = jnp.asarray(q_lengths)
        if not jnp.issubdtype(q_lengths.dtype, jnp.integer):
            raise TypeError(f"q_lengths must be integer, got {q_lengths.dtype}")
        q_lengths = jnp.broadcast_to(q_lengths, (b,)).astype(jnp.int32) if q_lengths.ndim == 0 else q_lengths
        if q_lengths.shape != (b,):
            raise ValueError(f"q_lengths must have shape ({b},), got {q_lengths.shape}")
    for name, val, hi in (("cache.length", cache.length, cache.capacity),
                          ("cache.recent_length", cache.recent_length, cache.window), ("q_lengths", q_lengths, tq)):
        if val.shape != (b,):
            raise ValueError(f"{name} must have shape ({b},), got {val.shape}")
        if C.is_concrete(val):
            lo_v, hi_v = int(jnp.min(val)), int(jnp.max(val))
            if lo_v < 0 or hi_v > hi:
                raise ValueError(f"{name} must lie in [0, {hi}], got values in [{lo_v}, {hi_v}]")
    return block_k, q_lengths.astype(jnp.int32)


def quantized_kv_attention(q: jax.Array, cache: QuantizedKV, *, q_lengths: jax.Array | None = None,
                           block_q: int = 64, block_k: int | None = None, scale: float | None = None,
                           interpret: bool | None = None) -> jax.Array:
    """Attention of q (B, Tq, H, D) over the valid quantized tokens and window of `cache`.

    q float32 or bfloat16 (matmuls in q's dtype, fp32 accumulation); output (B, Tq, H, D) in q's dtype.
    q_lengths: valid query rows per batch element, (B,) or scalar int (default Tq); rows past it are zeros.
    block_q: 16..128 (power of two). block_k: must divide cache.group_size; default the largest that does.
    scale: logit scale, default 1/sqrt(D). interpret: None = interpret mode everywhere except GPU.
    """
    block_q = C.check_block("block_q", block_q)
    block_k, q_lengths = check_cache(q, cache, q_lengths, block_k)
    scale = C.check_scale(scale, q.shape[-1])
    interpret = C.resolve_interpret(interpret)
    part = q.shape[-1] // (2 if cache.bits == 4 else 1)
    if not interpret and not (C.is_pow2(part) and part >= 16):
        raise ValueError(f"the compiled (Triton) path needs head_dim{'/2' if cache.bits == 4 else ''} = {part} "
                         "to be a power of two >= 16 (tile shapes); use interpret mode or pad head_dim")
    return _qkv_call(q, cache, q_lengths, block_q=block_q, block_k=block_k, scale=scale, interpret=interpret)


__all__ = ["quantized_kv_attention", "default_block_k"]
