"""Quantized KV-cache storage: int8 / int4 codes with KIVI-style scales and a full-precision recent window.

Scheme (KIVI, arXiv 2402.02750; cache_frameworks spec section 4):
* **Keys per channel**: one (scale, offset) per (group of `group_size` consecutive tokens, head, channel).
  Key outlier channels then only widen their own channel's step.
* **Values per token**: one (scale, offset) per (token, head), shared by the head's channels (finer than
  KIVI's per-token-over-all-heads, which the 33-method study found to lose badly).
* **Recent window**: the newest tokens in full precision (bf16/fp32), e.g. the current chunk; the runtime
  flushes them into the quantized part in whole key groups.

Every element is stored as an unsigned code `c` with `x ~= c * scale + offset` (computed in fp32):
* asymmetric (KIVI default): offset = min, scale = (max - min) / (2**bits - 1), codes 0 .. 2**bits - 1;
* symmetric (RTN): scale = absmax / (2**(bits-1) - 1), offset = -2**(bits-1) * scale, codes 1 .. 2**bits - 1.
Rounding is to nearest, so each dequantized element is within scale/2 of the original (plus the rounding
of scale / offset to `scale_dtype`).

**int4 packing** is two codes per uint8 along head_dim, split-half: byte j of a row holds channel j in its
low nibble and channel j + D/2 in its high nibble. A kernel unpacks with one mask and one shift and works
on the two halves of head_dim separately, with no interleave.

Layout (`QuantizedKV`, a pytree with static shapes; `C` = capacity in tokens, a multiple of group_size,
`W` = window capacity, `Dc` = D for int8 or D/2 for int4; all arrays batch-major like attention tensors):

| field | shape | dtype |
|---|---|---|
| k_codes, v_codes | (B, C, H, Dc) | uint8 |
| k_scale, k_offset | (B, C/group_size, H, D) | scale_dtype |
| v_scale, v_offset | (B, C, H) | scale_dtype |
| length | (B,) | int32: valid quantized tokens, the prefix [0, length) |
| k_recent, v_recent | (B, W, H, D) | full precision |
| recent_length | (B,) | int32: valid window tokens, the prefix [0, recent_length) |

Tokens past `length` / `recent_length` are ignored by readers (their contents are unspecified).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pallas_kernels._common import check_bool, check_int

SCALE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class KVQuantConfig:
    """How K and V are quantized. Defaults are KIVI's (asymmetric, group 32) at 4 bits.

    bits: 8 or 4. group_size: tokens per key-scale group (> 0). symmetric: RTN instead of min/max.
    scale_dtype: storage dtype of scales and offsets (float32 default: exact bounds; bf16 halves their
    memory at a small extra error).
    """

    bits: int = 4
    group_size: int = 32
    symmetric: bool = False
    scale_dtype: str = "float32"

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"KVQuantConfig.bits={self.bits!r}; allowed: 4, 8")
        check_int("KVQuantConfig.group_size", self.group_size, 1)
        check_bool("KVQuantConfig.symmetric", self.symmetric)
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"KVQuantConfig.scale_dtype={self.scale_dtype!r}; allowed: {SCALE_DTYPES}")


@struct.dataclass
class QuantizedKV:
    """Quantized KV cache storage; see the module docstring for the layout."""

    k_codes: jax.Array
    k_scale: jax.Array
    k_offset: jax.Array
    v_codes: jax.Array
    v_scale: jax.Array
    v_offset: jax.Array
    length: jax.Array
    k_recent: jax.Array
    v_recent: jax.Array
    recent_length: jax.Array
    bits: int = struct.field(pytree_node=False, default=4)
    group_size: int = struct.field(pytree_node=False, default=32)

    @property
    def batch(self) -> int:
        return self.k_codes.shape[0]

    @property
    def capacity(self) -> int:
        return self.k_codes.shape[1]

    @property
    def heads(self) -> int:
        return self.k_codes.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_scale.shape[-1]

    @property
    def window(self) -> int:
        return self.k_recent.shape[1]


# --------------------------------------------------------------------------- int4 packing

def pack_int4(codes: jax.Array) -> jax.Array:
    """uint8 codes in [0, 15], last axis D (even) -> uint8 (..., D/2), split-half packing."""
    codes = jnp.asarray(codes)
    if codes.dtype != jnp.uint8:
        raise TypeError(f"pack_int4 needs uint8 codes, got {codes.dtype}")
    if codes.ndim < 1 or codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last axis, got shape {codes.shape}")
    if not isinstance(codes, jax.core.Tracer) and codes.size and int(jnp.max(codes)) > 15:
        raise ValueError(f"pack_int4: codes must be in [0, 15], got max {int(jnp.max(codes))}")
    half = codes.shape[-1] // 2
    return (codes[..., :half] & 0xF) | (codes[..., half:] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """Inverse of `pack_int4`: uint8 (..., D/2) -> uint8 codes (..., D) in [0, 15]."""
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"unpack_int4 needs uint8, got {packed.dtype}")
    return jnp.concatenate([packed & 0xF, packed >> 4], axis=-1)


# --------------------------------------------------------------------------- quantize / dequantize

def _check_int4_head_dim(bits: int, head_dim: int) -> None:
    if bits == 4 and head_dim % 2:
        raise ValueError(f"int4 packing needs an even head_dim, got {head_dim}")


def _check_float(name: str, x: jax.Array, ndim: int) -> None:
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims (batch, tokens, heads, head_dim), got shape {x.shape}")


def _scale_offset(lo: jax.Array, hi: jax.Array, cfg: KVQuantConfig):
    """(scale, offset) in scale_dtype from per-group min / max (fp32)."""
    if cfg.symmetric:
        qmax = 2 ** (cfg.bits - 1) - 1
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        scale = jnp.where(amax > 0, amax / qmax, 1.0).astype(cfg.scale_dtype)
        offset = (-(2 ** (cfg.bits - 1)) * scale.astype(jnp.float32)).astype(cfg.scale_dtype)
    else:
        qmax = 2 ** cfg.bits - 1
        scale = jnp.where(hi > lo, (hi - lo) / qmax, 1.0).astype(cfg.scale_dtype)
        offset = lo.astype(cfg.scale_dtype)
    return scale, offset


def _encode(x: jax.Array, scale: jax.Array, offset: jax.Array, bits: int) -> jax.Array:
    """Round to nearest code with the *stored* scale/offset; clip only absorbs their storage rounding."""
    c = jnp.round((x - offset.astype(jnp.float32)) / scale.astype(jnp.float32))
    return jnp.clip(c, 0, 2 ** bits - 1).astype(jnp.uint8)


def _store(codes: jax.Array, bits: int) -> jax.Array:
    return pack_int4(codes) if bits == 4 else codes


def _load(codes: jax.Array, bits: int) -> jax.Array:
    return unpack_int4(codes) if bits == 4 else codes


def quantize_keys(k: jax.Array, config: KVQuantConfig, capacity: int | None = None):
    """Per-channel key quantization, grouped along tokens.

    k (B, T, H, D) -> codes (B, C, H, Dc) uint8, scale and offset (B, C/G, H, D), with C = capacity or T
    rounded up to a multiple of G. Min/max are taken over valid tokens only; codes past T are 0.
    """
    _check_float("k", k, 4)
    b, t, h, d = k.shape
    g = config.group_size
    _check_int4_head_dim(config.bits, d)
    cap = _capacity(t, g, capacity)
    x = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, cap - t), (0, 0), (0, 0)))
    valid = (jnp.arange(cap) < t)[None, :, None, None]
    grouped = lambda a: a.reshape(b, cap // g, g, h, d)
    lo = jnp.min(grouped(jnp.where(valid, x, jnp.inf)), axis=2)
    hi = jnp.max(grouped(jnp.where(valid, x, -jnp.inf)), axis=2)
    empty = ~jnp.isfinite(lo)  # groups entirely past T
    lo, hi = jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)
    scale, offset = _scale_offset(lo, hi, config)
    rep = lambda a: jnp.repeat(a, g, axis=1)
    codes = jnp.where(valid, _encode(x, rep(scale), rep(offset), config.bits), 0).astype(jnp.uint8)
    return _store(codes, config.bits), scale, offset


def quantize_values(v: jax.Array, config: KVQuantConfig, capacity: int | None = None):
    """Per-token value quantization (one scale/offset per token and head).

    v (B, T, H, D) -> codes (B, C, H, Dc) uint8, scale and offset (B, C, H); entries past T are
    placeholders (those of an all-zero token).
    """
    _check_float("v", v, 4)
    b, t, h, d = v.shape
    _check_int4_head_dim(config.bits, d)
    cap = _capacity(t, config.group_size, capacity)
    x = jnp.pad(v.astype(jnp.float32), ((0, 0), (0, cap - t), (0, 0), (0, 0)))
    scale, offset = _scale_offset(jnp.min(x, -1), jnp.max(x, -1), config)
    codes = _encode(x, scale[..., None], offset[..., None], config.bits)
    return _store(codes, config.bits), scale, offset


def dequantize_keys(codes: jax.Array, scale: jax.Array, offset: jax.Array, *, bits: int, group_size: int,
                    dtype=jnp.float32) -> jax.Array:
    """codes (B, C, H, Dc), scale/offset (B, C/G, H, D) -> keys (B, C, H, D) = code * scale + offset."""
    c = _load(codes, bits).astype(jnp.float32)
    rep = lambda a: jnp.repeat(a.astype(jnp.float32), group_size, axis=1)
    return (c * rep(scale) + rep(offset)).astype(dtype)


def dequantize_values(codes: jax.Array, scale: jax.Array, offset: jax.Array, *, bits: int,
                      dtype=jnp.float32) -> jax.Array:
    """codes (B, C, H, Dc), scale/offset (B, C, H) -> values (B, C, H, D) = code * scale + offset."""
    c = _load(codes, bits).astype(jnp.float32)
    return (c * scale.astype(jnp.float32)[..., None] + offset.astype(jnp.float32)[..., None]).astype(dtype)


def _capacity(t: int, group_size: int, capacity: int | None) -> int:
    need = -(-t // group_size) * group_size
    if capacity is None:
        return max(need, group_size)
    if check_int("capacity", capacity) < t or capacity % group_size:
        raise ValueError(f"capacity={capacity!r} must be an int >= tokens ({t}) and a multiple of "
                         f"group_size ({group_size})")
    return capacity


# --------------------------------------------------------------------------- the cache pytree

def quantize_kv(k: jax.Array, v: jax.Array, config: KVQuantConfig, *, capacity: int | None = None,
                k_recent: jax.Array | None = None, v_recent: jax.Array | None = None,
                recent_length: jax.Array | int | None = None) -> QuantizedKV:
    """Quantize full-precision k, v (B, T, H, D) into a cache holding T valid tokens.

    k_recent / v_recent (B, W, H, D): the full-precision window (default: an empty window of one group);
    recent_length: valid window tokens, an int or (B,) int array (default W when a window is given).
    """
    _check_float("k", k, 4)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    b, t, h, d = k.shape
    kc, ks, ko = quantize_keys(k, config, capacity)
    vc, vs, vo = quantize_values(v, config, kc.shape[1])
    if (k_recent is None) != (v_recent is None):
        raise ValueError("give both k_recent and v_recent, or neither")
    if k_recent is None:
        k_recent = v_recent = jnp.zeros((b, config.group_size, h, d), k.dtype)
        recent_length = 0 if recent_length is None else recent_length
    _check_float("k_recent", k_recent, 4)
    if k_recent.shape != v_recent.shape or k_recent.shape[0] != b or k_recent.shape[2:] != (h, d):
        raise ValueError(f"k_recent / v_recent must be (B={b}, W, H={h}, D={d}), got {k_recent.shape} and "
                         f"{v_recent.shape}")
    if recent_length is None:
        recent_length = k_recent.shape[1]
    recent_length = jnp.broadcast_to(jnp.asarray(recent_length, jnp.int32), (b,))
    return QuantizedKV(kc, ks, ko, vc, vs, vo, jnp.full((b,), t, jnp.int32), k_recent, v_recent, recent_length,
                       bits=config.bits, group_size=config.group_size)


def init_quantized_kv(batch: int, capacity: int, heads: int, head_dim: int, *, window: int,
                      config: KVQuantConfig, dtype=jnp.bfloat16) -> QuantizedKV:
    """An empty cache (lengths 0) of the given capacity and window, for a runtime to fill."""
    _check_int4_head_dim(config.bits, head_dim)
    cap = _capacity(0, config.group_size, capacity)
    check_int("window", window, 1)
    dc = head_dim // 2 if config.bits == 4 else head_dim
    sd = jnp.dtype(config.scale_dtype)
    zeros = jnp.zeros
    return QuantizedKV(
        zeros((batch, cap, heads, dc), jnp.uint8), jnp.ones((batch, cap // config.group_size, heads, head_dim), sd),
        zeros((batch, cap // config.group_size, heads, head_dim), sd), zeros((batch, cap, heads, dc), jnp.uint8),
        jnp.ones((batch, cap, heads), sd), zeros((batch, cap, heads), sd), zeros((batch,), jnp.int32),
        zeros((batch, window, heads, head_dim), dtype), zeros((batch, window, heads, head_dim), dtype),
        zeros((batch,), jnp.int32), bits=config.bits, group_size=config.group_size)


def dequantize_kv(cache: QuantizedKV, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The quantized part as full-precision (B, C, H, D) keys and values (for references and tests only:
    kernels never materialise this)."""
    k = dequantize_keys(cache.k_codes, cache.k_scale, cache.k_offset, bits=cache.bits,
                        group_size=cache.group_size, dtype=dtype)
    v = dequantize_values(cache.v_codes, cache.v_scale, cache.v_offset, bits=cache.bits, dtype=dtype)
    return k, v


def bytes_breakdown(cache: QuantizedKV) -> dict[str, int]:
    """Bytes held per field (capacity-based: static shapes hold their memory whether filled or not)."""
    out = {}
    for f in dataclasses.fields(cache):
        x = getattr(cache, f.name)
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            out[f.name] = int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
    return out


def bytes_held(cache: QuantizedKV) -> int:
    """Total bytes of the cache storage (codes + scales + offsets + window + lengths). Works on abstract
    caches too (`jax.eval_shape` output)."""
    return sum(bytes_breakdown(cache).values())


def dense_kv_bytes(batch: int, tokens: int, heads: int, head_dim: int, dtype=jnp.bfloat16) -> int:
    """Bytes of an unquantized K+V cache of the same size, for compression ratios."""
    return 2 * batch * tokens * heads * head_dim * jnp.dtype(dtype).itemsize


__all__ = ["KVQuantConfig", "QuantizedKV", "pack_int4", "unpack_int4", "quantize_keys", "quantize_values",
           "dequantize_keys", "dequantize_values", "quantize_kv", "init_quantized_kv", "dequantize_kv",
           "bytes_held", "bytes_breakdown", "dense_kv_bytes"]
