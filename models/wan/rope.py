"""Wan's interleaved 3D rotary position embedding.

head_dim d is split into t/h/w parts of d - 4*(d//6), 2*(d//6), 2*(d//6) real dims (44/42/42 for d = 128).
Each axis has its own frequencies theta^(-2j/dim_axis); rotation pairs are interleaved (x[2i], x[2i+1]).
Tables are built in float64 on the host, as diffusers and official Wan do, then stored as fp32, and looked
up by integer position, so any token subset (partial forwards) or frame offset (AR chunks) gets exactly the
angles of its position.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def axis_frequencies(head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotation frequencies (rad per position, float64) of the t, h and w rotary pairs, in head-dim order."""
    return tuple(1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim) for dim in axis_dims(head_dim))


@functools.lru_cache(maxsize=16)
def _tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[np.ndarray, ...]:
    out = []
    pos = np.arange(max_seq_len, dtype=np.float64)
    for freqs in axis_frequencies(head_dim, theta):
        ang = np.outer(pos, freqs)
        out += [np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)]
    return tuple(out)


def rope_cos_sin(positions: jax.Array, head_dim: int, max_seq_len: int = 1024,
                 theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """Per-token (cos, sin) of shape (..., head_dim // 2) for integer (f, h, w) positions (..., 3)."""
    ct, st, ch, sh, cw, sw = (jnp.asarray(a) for a in _tables(head_dim, max_seq_len, theta))
    f, h, w = positions[..., 0], positions[..., 1], positions[..., 2]
    cos = jnp.concatenate([ct[f], ch[h], cw[w]], axis=-1)
    sin = jnp.concatenate([st[f], sh[h], sw[w]], axis=-1)
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of x (B, N, heads, head_dim) by per-token angles (B, N, head_dim // 2)."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
