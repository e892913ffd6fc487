"""The Wan2.1 DiT in Flax NNX, numerically equal to diffusers' `WanTransformer3DModel` and, with per-frame
timesteps and `num_frame_per_block`, to `SkyReelsV2Transformer3DModel` in diffusion-forcing mode.

Layout: latents channels-last (B, F, H, W, C); tokens (B, N, D) frame-major (n = f*H'W' + h*W' + w).
Callable whole, `model(x, t, context)`, or as three stages that transforms recombine:

    emb = model.embed(x, t, context)                    # tokens + everything the blocks and head need
    tokens, layer_state = model.blocks(emb, attention=..., layer_state=...)   # one scan over stacked layers
    velocity = model.head(tokens, emb)                  # (B, F, H, W, C_out)

The blocks also run on a gathered subset of tokens: `emb.take(indices)` keeps each token's own RoPE
position and timestep modulation, so partial forwards see exactly what a full forward would.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from models.wan.config import WanConfig
from models.wan.rope import apply_rope, rope_cos_sin
from vidaccel.attention import AttentionInfo, SelfAttention, cross_attention, dense_attention

F32 = jnp.float32


@struct.dataclass
class Embedded:
    """Output of `embed`: tokens and the per-call quantities every block and the head read.

    tokens: (B, N, D). e: (B, Fe, D) and e0: (B, Fe, 6, D) fp32 time embeddings, Fe = 1 for one timestep
    per sample or F' for per-frame timesteps. context: (B, L, D) embedded text. positions: (B, N, 3) int32
    RoPE coordinates (f + frame_offset, h, w). frame_index: (B, N) int32 row of e/e0 for each token.
    grid: static (F', H', W') token grid of the full input.
    """

    tokens: jax.Array
    e: jax.Array
    e0: jax.Array
    context: jax.Array
    positions: jax.Array
    frame_index: jax.Array
    grid: tuple[int, int, int] = struct.field(pytree_node=False)

    def take(self, indices: jax.Array) -> Embedded:
        """The same call restricted to tokens `indices` (B, K): for partial forwards."""
        def g(a):
            idx = indices.reshape(indices.shape + (1,) * (a.ndim - 2))
            return jnp.take_along_axis(a, idx, axis=1)
        return self.replace(tokens=g(self.tokens), positions=g(self.positions), frame_index=g(self.frame_index))


def _linear(cfg: WanConfig, din: int, dout: int, rngs: nnx.Rngs, *, fp32: bool = False, init=None) -> nnx.Linear:
    dtype = F32 if fp32 else cfg.jnp_dtype
    pdtype = F32 if fp32 else cfg.jnp_param_dtype
    return nnx.Linear(din, dout, use_bias=True, dtype=dtype, param_dtype=pdtype, rngs=rngs,
                      kernel_init=init or nnx.initializers.xavier_uniform(),
                      bias_init=nnx.initializers.zeros_init())


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """fp32 LayerNorm without affine parameters (Wan's norm1/norm3/norm_out)."""
    x = x.astype(F32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class AffineLayerNorm(nnx.Module):
    """fp32 LayerNorm with weight and bias (the cross-attention input norm)."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), F32))
        self.bias = nnx.Param(jnp.zeros((dim,), F32))

    def __call__(self, x):
        return layer_norm(x, self.eps) * self.weight[...] + self.bias[...]


class RMSNorm(nnx.Module):
    """RMSNorm over the full width (across heads), computed in fp32, as Wan's q/k norm."""

    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):
        xf = x.astype(F32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(F32)).astype(x.dtype)


class Attention(nnx.Module):
    """q/k/v/o projections with q/k RMSNorm across heads (diffusers `attn1` / `attn2`)."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        d = cfg.dim
        self.heads = cfg.num_attention_heads
        self.to_q = _linear(cfg, d, d, rngs)
        self.to_k = _linear(cfg, d, d, rngs)
        self.to_v = _linear(cfg, d, d, rngs)
        self.to_out = _linear(cfg, d, d, rngs)
        if cfg.qk_norm is not None:
            self.norm_q = RMSNorm(d, cfg.eps, cfg.jnp_param_dtype)
            self.norm_k = RMSNorm(d, cfg.eps, cfg.jnp_param_dtype)
        else:
            self.norm_q = self.norm_k = None

    def _split(self, x):
        return x.reshape(*x.shape[:2], self.heads, -1)

    def project(self, x, kv):
        q, k, v = self.to_q(x), self.to_k(kv), self.to_v(kv)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        return self._split(q), self._split(k), self._split(v)

    def out(self, o):
        return self.to_out(o.reshape(*o.shape[:2], -1))


class FeedForward(nnx.Module):
    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        self.proj_in = _linear(cfg, cfg.dim, cfg.ffn_dim, rngs)
        self.proj_out = _linear(cfg, cfg.ffn_dim, cfg.dim, rngs)

    def __call__(self, x):
        return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=True))


def _per_token(mod: jax.Array, frame_index: jax.Array) -> jax.Array:
    """Pick each token's row of a per-frame table (B, Fe, D) -> (B, N, D); Fe == 1 broadcasts."""
    if mod.shape[1] == 1:
        return mod
    return jnp.take_along_axis(mod, frame_index[..., None], axis=1)


class WanBlock(nnx.Module):
    """One transformer block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        self.eps = cfg.eps
        self.attn1 = Attention(cfg, rngs)
        self.attn2 = Attention(cfg, rngs)
        self.norm2 = AffineLayerNorm(cfg.dim, cfg.eps) if cfg.cross_attn_norm else None
        self.ffn = FeedForward(cfg, rngs)
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (1, 6, cfg.dim), F32) / cfg.dim ** 0.5)

    def __call__(self, x, emb: Embedded, rope, attention: SelfAttention, info: AttentionInfo, layer_state):
        mod = self.scale_shift_table[...][None] + emb.e0            # (B, Fe, 6, D) fp32
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            _per_token(mod[:, :, i], emb.frame_index) for i in range(6))
        dt = x.dtype

        h = (layer_norm(x, self.eps) * (1 + scale1) + shift1).astype(dt)
        q, k, v = self.attn1.project(h, h)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o, layer_state = attention(q, k, v, info, layer_state)
        x = (x.astype(F32) + self.attn1.out(o.astype(dt)) * gate1).astype(dt)

        h = self.norm2(x).astype(dt) if self.norm2 is not None else x
        q, k, v = self.attn2.project(h, emb.context)
        x = x + self.attn2.out(cross_attention(q, k, v).astype(dt))

        h = (layer_norm(x, self.eps) * (1 + scale2) + shift2).astype(dt)
        x = (x.astype(F32) + self.ffn(h).astype(F32) * gate2).astype(dt)
        return x, layer_state


class PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = patch, done as a patchify + matmul; kernel (pt, ph, pw, C, D)."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        pt, ph, pw = cfg.patch_size
        fan_in = pt * ph * pw * cfg.in_channels
        init = nnx.initializers.xavier_uniform(in_axis=(0, 1, 2, 3), out_axis=4)
        self.kernel = nnx.Param(init(rngs.params(), (pt, ph, pw, cfg.in_channels, cfg.dim), cfg.jnp_param_dtype))
        self.bias = nnx.Param(jnp.zeros((cfg.dim,), cfg.jnp_param_dtype))
        self.patch = cfg.patch_size
        self.fan_in = fan_in
        self.dtype = cfg.jnp_dtype

    def __call__(self, x):
        b, f, h, w, c = x.shape
        pt, ph, pw = self.patch
        x = x.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        x = x.reshape(b, -1, self.fan_in).astype(self.dtype)
        k = self.kernel[...].reshape(self.fan_in, -1).astype(self.dtype)
        return x @ k + self.bias[...].astype(self.dtype)


class TextEmbedder(nnx.Module):
    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.linear_1 = _linear(cfg, cfg.text_dim, cfg.dim, rngs, init=init)
        self.linear_2 = _linear(cfg, cfg.dim, cfg.dim, rngs, init=init)

    def __call__(self, c):
        return self.linear_2(jax.nn.gelu(self.linear_1(c), approximate=True))


class TimeEmbedder(nnx.Module):
    """Sinusoid (cos half first) -> Linear -> SiLU -> Linear = e; SiLU -> Linear(D, 6D) = e0. All fp32."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.freq_dim = cfg.freq_dim
        self.linear_1 = _linear(cfg, cfg.freq_dim, cfg.dim, rngs, fp32=True, init=init)
        self.linear_2 = _linear(cfg, cfg.dim, cfg.dim, rngs, fp32=True, init=init)
        self.time_proj = _linear(cfg, cfg.dim, 6 * cfg.dim, rngs, fp32=True)

    def sinusoid(self, t: jax.Array) -> jax.Array:
        half = self.freq_dim // 2
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=F32) / half)
        ang = t.astype(F32)[..., None] * freqs
        return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)

    def __call__(self, t):
        e = self.linear_2(jax.nn.silu(self.linear_1(self.sinusoid(t))))
        e0 = self.time_proj(jax.nn.silu(e))
        return e, e0.reshape(*e0.shape[:-1], 6, -1)


class WanTransformer(nnx.Module):
    """Wan2.1 text-to-video DiT; blocks stacked on a leading layer axis and run by one `lax.scan`."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embedding = PatchEmbed(cfg, rngs)
        self.text_embedder = TextEmbedder(cfg, rngs)
        self.time_embedder = TimeEmbedder(cfg, rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(r):
            return WanBlock(cfg, r)

        self.layers = make_blocks(rngs)
        out = math.prod(cfg.patch_size) * cfg.out_channels
        self.proj_out = _linear(cfg, cfg.dim, out, rngs, init=nnx.initializers.zeros_init())
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (1, 2, cfg.dim), F32) / cfg.dim ** 0.5)

    # ------------------------------------------------------------------ stages
    def embed(self, x: jax.Array, t: jax.Array, context: jax.Array, *, frame_offset: int | jax.Array = 0) -> Embedded:
        """Patchify x, embed t (scalar, (B,) or per-frame (B, F')) and the text, and lay out positions."""
        cfg = self.cfg
        grid = check_inputs(cfg, x, t, context)
        b = x.shape[0]
        fp, hp, wp = grid
        tokens = self.patch_embedding(x)
        t = jnp.asarray(t)
        t = jnp.broadcast_to(t, (b,)) if t.ndim <= 1 else t
        e, e0 = self.time_embedder(t.reshape(b, -1))                # (B, Fe, D), (B, Fe, 6, D)
        ctx = self.text_embedder(context.astype(cfg.jnp_dtype))
        f, h, w = np.meshgrid(np.arange(fp), np.arange(hp), np.arange(wp), indexing="ij")
        pos = jnp.asarray(np.stack([f, h, w], -1).reshape(1, -1, 3).astype(np.int32))
        pos = jnp.broadcast_to(pos, (b, fp * hp * wp, 3))
        frame_index = pos[..., 0] if e.shape[1] > 1 else jnp.zeros_like(pos[..., 0])
        pos = pos.at[..., 0].add(jnp.asarray(frame_offset, jnp.int32))
        return Embedded(tokens, e, e0, ctx, pos, frame_index, grid)

    def blocks(self, emb: Embedded, *, attention: SelfAttention | None = None, layer_state: Any = None,
               kv_frames: jax.Array | None = None, remat: bool = False) -> tuple[jax.Array, Any]:
        """Run all layers on `emb.tokens` (all tokens, or a gathered subset) in one scan.

        `attention(q, k, v, info, layer_state_i)` is the self-attention of every layer; `layer_state` is a
        pytree whose leaves carry a leading layer axis, handed layer by layer to `attention` and returned
        updated. `kv_frames` overrides the key frames in `AttentionInfo` (for attention functions that add
        keys of their own, e.g. a KV cache); by default keys are the queries' own tokens.
        """
        cfg = self.cfg
        attention = attention or dense_attention
        rope = rope_cos_sin(emb.positions, cfg.attention_head_dim, cfg.rope_max_seq_len, float(cfg.rope_theta))
        q_frames = emb.positions[..., 0]
        info0 = AttentionInfo(q_frames=q_frames, kv_frames=q_frames if kv_frames is None else kv_frames,
                              layer=jnp.zeros((), jnp.int32), frames_per_block=cfg.num_frame_per_block)
        graphdef, params = nnx.split(self.layers)

        def body(x, xs):
            p, ls, i = xs
            block = nnx.merge(graphdef, p)
            return block(x, emb, rope, attention, info0.replace(layer=i), ls)

        if remat:
            body = jax.checkpoint(body)
        idx = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        return jax.lax.scan(body, emb.tokens, (params, layer_state, idx))

    def head(self, tokens: jax.Array, emb: Embedded) -> jax.Array:
        """Output norm with 2-way modulation from e, projection, unpatchify to (B, F, H, W, C_out)."""
        cfg = self.cfg
        fp, hp, wp = emb.grid
        if tokens.shape[1] != fp * hp * wp:
            raise ValueError(f"head needs the full token grid {emb.grid} = {fp * hp * wp} tokens in frame-major "
                             f"order, got {tokens.shape[1]}; scatter a partial forward back first")
        mod = self.scale_shift_table[...][None] + emb.e[:, :, None]       # (B, Fe, 2, D)
        shift, scale = (_per_token(mod[:, :, i], emb.frame_index) for i in range(2))
        h = (layer_norm(tokens, cfg.eps) * (1 + scale) + shift).astype(tokens.dtype)
        out = self.proj_out(h)
        pt, ph, pw = cfg.patch_size
        b = tokens.shape[0]
        out = out.reshape(b, fp, hp, wp, pt, ph, pw, cfg.out_channels).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return out.reshape(b, fp * pt, hp * ph, wp * pw, cfg.out_channels)

    def __call__(self, x, t, context, *, attention: SelfAttention | None = None, frame_offset=0) -> jax.Array:
        emb = self.embed(x, t, context, frame_offset=frame_offset)
        tokens, _ = self.blocks(emb, attention=attention)
        return self.head(tokens, emb)


def check_inputs(cfg: WanConfig, x, t, context) -> tuple[int, int, int]:
    """Validate shapes (static, so also under jit) and return the token grid (F', H', W')."""
    if x.ndim != 5:
        raise ValueError(f"x must be channels-last latents (B, F, H, W, C); got shape {x.shape}")
    b, f, h, w, c = x.shape
    if c != cfg.in_channels:
        raise ValueError(f"x has {c} channels on its last axis; this model takes in_channels={cfg.in_channels} "
                         f"(layout is (B, F, H, W, C))")
    pt, ph, pw = cfg.patch_size
    if f % pt or h % ph or w % pw:
        raise ValueError(f"latent (F, H, W)=({f}, {h}, {w}) must be divisible by patch_size {cfg.patch_size}")
    grid = (f // pt, h // ph, w // pw)
    if max(grid) > cfg.rope_max_seq_len:
        raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={cfg.rope_max_seq_len}")
    t_shape = tuple(jnp.shape(t))
    if t_shape not in ((), (b,), (b, grid[0])):
        raise ValueError(f"t must have shape (), (B,)=({b},) or per-frame (B, F')=({b}, {grid[0]}); got {t_shape}")
    if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
        raise ValueError(f"context must be (B={b}, L, text_dim={cfg.text_dim}); got {context.shape}")
    return grid


def init_transformer(cfg: WanConfig, seed: int = 0) -> WanTransformer:
    """A freshly initialised model (official Wan init: xavier Linear, zero head, N(0, 0.02) embeddings)."""
    return WanTransformer(cfg, rngs=nnx.Rngs(seed))


def abstract_transformer(cfg: WanConfig) -> WanTransformer:
    """The model with ShapeDtypeStruct leaves: no memory allocated (for parameter counts and loaders)."""
    return nnx.eval_shape(lambda: WanTransformer(cfg, rngs=nnx.Rngs(0)))


def count_params(model: WanTransformer) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
