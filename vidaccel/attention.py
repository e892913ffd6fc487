"""Self-attention backends and the hook every transformer block calls.

A self-attention function has the signature

    attention(q, k, v, info, layer_state) -> (out, layer_state)

with q (B, Tq, heads, head_dim) and k, v (B, Tk, heads, head_dim) after RoPE, `info` an `AttentionInfo`
(frames of queries and keys, the layer index inside the layer scan, the block-causal setting), and
`layer_state` whatever per-layer state the policy threads through the layer scan (None for dense).
Sparse policies, KV caches and quantized-KV reads are all such functions.

Every attention that has more than one implementation chooses it with one vocabulary, resolved here
(`resolve_backend`): "kernel" (the Pallas kernel: compiled on GPU/TPU, interpret mode on CPU), "gather"
(plain jnp that computes only the selected keys; sparse attention only), "reference" (the pure-jnp masked
dense reference: same result, dense cost) and "auto" (the kernel on an accelerator; on CPU the gather path
where there is one, else the reference, since the Pallas interpreter is for tests, not speed).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import jax
from flax import struct

BACKENDS = ("auto", "kernel", "gather", "reference")


@struct.dataclass
class AttentionInfo:
    """What a self-attention function may need besides q, k, v.

    q_frames / kv_frames: absolute latent-frame index (RoPE time position) of each query / key, (B, T).
    layer: index of the current layer inside the layer scan (traced int32).
    frames_per_block: SkyReels-V2 block-causal size; > 1 means a query of frame f sees keys of frames g
    with g // n <= f // n, 1 means bidirectional (diffusers' convention).
    """

    q_frames: jax.Array
    kv_frames: jax.Array
    layer: jax.Array
    frames_per_block: int = struct.field(pytree_node=False, default=1)


SelfAttention = Callable[[jax.Array, jax.Array, jax.Array, AttentionInfo, Any], tuple[jax.Array, Any]]


def block_causal_mask(q_frames: jax.Array, kv_frames: jax.Array, frames_per_block: int) -> jax.Array:
    """Boolean (B, 1, Tq, Tk) mask: key frame's block <= query frame's block."""
    qb = q_frames // frames_per_block
    kb = kv_frames // frames_per_block
    return (kb[:, None, None, :] <= qb[:, None, :, None])


def dense_attention(q, k, v, info: AttentionInfo, layer_state=None, *, implementation: str | None = None):
    """Exact softmax attention (block-causal when `info.frames_per_block > 1`); the dense baseline."""
    mask = None
    if info.frames_per_block > 1:
        mask = block_causal_mask(info.q_frames, info.kv_frames, info.frames_per_block)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return out, layer_state


def resolve_backend(backend: str, *, allowed: Collection[str] = BACKENDS, name: str = "backend") -> str:
    """The concrete implementation for `backend` (one of `allowed`, which always includes "auto").

    "auto" becomes "kernel" on GPU/TPU, and "gather" (if allowed) or else "reference" on CPU.
    """
    allowed = tuple(allowed)
    if backend not in allowed or backend not in BACKENDS:
        raise ValueError(f"{name}={backend!r} is not allowed here; choose one of {allowed}")
    if backend != "auto":
        return backend
    if jax.default_backend() in ("gpu", "tpu"):
        return "kernel"
    return "gather" if "gather" in allowed else "reference"


def cross_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Unmasked attention over text tokens (Wan attends to the zero-padded rows as well)."""
    return jax.nn.dot_product_attention(q, k, v)


def attention_flops(num_q: int, num_k: int, heads: int, head_dim: int, density: float = 1.0) -> float:
    """FLOPs of one attention call: 4 * Tq * Tk * head_dim per head (QK^T and PV), scaled by density."""
    return 4.0 * num_q * num_k * heads * head_dim * density


__all__ = ["BACKENDS", "AttentionInfo", "SelfAttention", "block_causal_mask", "dense_attention", "resolve_backend",
           "cross_attention", "attention_flops"]
