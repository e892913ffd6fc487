"""Shared pieces of the attention kernels: argument checks, backend selection, the online-softmax step.

The checks mirror `vidaccel.checks` (which this lower layer cannot import): a wrong type is a TypeError, a
bad value a ValueError, and the message names the argument, the value and what is allowed.

Every kernel here is a FlashAttention-2 style forward: one program per (query tile, batch, head), an fp32
running max `m`, running denominator `l` and accumulator `acc`, and a loop over the kv tiles that the
program actually needs. Only `pl.pallas_call`, `pl.BlockSpec`, a grid and ref slicing are used, so the
same kernel body runs in interpret mode on CPU and (untested here, no GPU this session) through the
Triton lowering on GPU.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import triton as pl_triton

# Block sizes the kernels accept: powers of two (the Triton lowering needs power-of-two tiles, and tl.dot
# needs at least 16 rows), 16 to 128.
ALLOWED_BLOCKS = (16, 32, 64, 128)
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """`value` as an int >= `minimum` (bools and non-integers are a TypeError)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """`value` if it is a bool (numbers and strings are a TypeError)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` -> interpret on every backend except GPU (compiled there)."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be True, False or None, got {interpret!r}")
    return interpret


def compiler_params(interpret: bool, head_dim: int) -> Any:
    """Triton compiler parameters for a compiled (GPU) run; None in interpret mode.

    Compiled means GPU: JAX's default GPU lowering (Mosaic GPU) does not take generic kernels with
    data-dependent loops over dynamically sliced refs, so the compiled path asks for the (deprecated but
    still shipped) Triton lowering explicitly. Warps as JAX's FA2 kernel: 4 up to head_dim 64, else 8.
    """
    return None if interpret else triton_params(head_dim)


def triton_params(head_dim: int) -> Any:
    """Triton compiler parameters for a head_dim."""
    return pl_triton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def is_concrete(*xs: Any) -> bool:
    """True when every array is a concrete value (data checks are possible), False under a trace."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_block(name: str, value: Any) -> int:
    """A tile size: an int in ALLOWED_BLOCKS."""
    value = check_int(name, value)
    if value not in ALLOWED_BLOCKS:
        raise ValueError(f"{name}={value} is not supported; allowed block sizes are {ALLOWED_BLOCKS}")
    return value


def check_scale(scale: Any, head_dim: int) -> float:
    """Softmax scale; default 1/sqrt(head_dim) (the unpadded head_dim), as jax.nn.dot_product_attention."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, jax.Array) or isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)):
        raise TypeError(f"scale must be a Python float or None, got {scale!r}")
    if not math.isfinite(float(scale)) or float(scale) <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return float(scale)


def check_float_dtype(name: str, x: jax.Array) -> None:
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; allowed dtypes are float32 and bfloat16")


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[int, int, int, int, int]:
    """Validate (B, T, heads, head_dim) q, k, v; returns (B, Tq, Tk, heads, head_dim)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape (batch, tokens, heads, head_dim), got shape {x.shape}")
        check_float_dtype(name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    b, tq, h, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, h, d):
        raise ValueError(f"q {q.shape} and k {k.shape} must agree in batch, heads and head_dim")
    if min(b, tq, h, d, k.shape[1]) < 1:
        raise ValueError(f"empty attention input: q {q.shape}, k {k.shape}")
    return b, tq, k.shape[1], h, d


def check_sparse_args(q, k, v, block_q: Any, block_k: Any, scale: Any) -> tuple:
    """The checks every block-sparse attention (kernel, gather path, reference) starts with: q, k, v, the
    two tile sizes and the scale. Returns (B, Tq, Tk, heads, head_dim, block_q, block_k, scale)."""
    b, tq, tk, h, d = check_qkv(q, k, v)
    return b, tq, tk, h, d, check_block("block_q", block_q), check_block("block_k", block_k), check_scale(scale, d)


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad `axis` of x up to `size` (no copy when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def padded_head_dim(d: int) -> int:
    """Triton tiles need a power-of-two head_dim; pad with zero channels (they change no logit)."""
    return 1 << (d - 1).bit_length()


def init_carry(block_q: int, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(acc, m, l) for a fresh online softmax: acc zeros, m = -inf, l = 0 (all fp32)."""
    return (
        jnp.zeros((block_q, width), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )


def softmax_step(m: jax.Array, l: jax.Array, s: jax.Array, valid: jax.Array):
    """One online-softmax update with logits `s` (bq, bk), `valid` columns only.

    Returns (p, alpha, m_new, l_new): `p` the unnormalised probabilities of this tile (0 where invalid),
    `alpha` the factor that rescales the previous accumulator. Every tile a kernel visits has at least one
    valid column per row, so m_new is finite and no NaN arises; masked logits are -inf (exactly 0 weight).
    """
    s = jnp.where(valid, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l_new = alpha * l + jnp.sum(p, axis=-1)
    return p, alpha, m_new, l_new


def finish(acc: jax.Array, l: jax.Array) -> jax.Array:
    """acc / l, and exact zeros for rows that saw no key (l == 0)."""
    safe = jnp.where(l > 0, l, 1.0)
    return jnp.where((l > 0)[:, None], acc / safe[:, None], 0.0)


def col_iota(rows: int, cols: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (rows, cols), 1)


def row_iota(rows: int, cols: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
