"""The denoisers `df_sample` drives: the whole window per row (vanilla), or one chunk at a time (per chunk).

Both keep a `DFState` that `df_sample` fills before every call with what the row means for the call (the
row's update mask over the frames it sees, the chunk being forwarded), so a method wrapping them can read
it (`df_state_of(state).update`) and both count the work they do.

- `df_window_denoiser(model)`: every row runs the model on the row's whole window of frames with per-frame
  `t` (SkyReels-V2's vanilla asynchronous execution: finished chunks at t = 0 and waiting ones at t = 999
  are recomputed too); the model's own attention (block-causal when `num_frame_per_block > 1`).
- `df_chunk_denoiser(model, window_frames)`: a call runs ONE chunk (`causal_block_size` = the model's
  `num_frame_per_block` latent frames) of the window, at window-local RoPE frames `chunk * frames`, against
  a per-window K/V buffer (L, B, window tokens, heads, head_dim): its fresh K/V are written at its slot
  and its queries attend block-causally to the buffer, so they see the K/V that earlier chunks left at
  their last forward (stale for chunks not forwarded since: FlowCache-SkyReels' execution). `df_sample`
  forwards the updating chunks of a row in chunk order (plus, once per window, the prefix chunks to write
  their K/V); with every chunk forwarded in a row the result equals the whole-window block-causal forward.
  The buffer is shared by the chunks of a window and lives outside the per-chunk states: `df_sample`
  hands it in (`DFState.kv`) for the call and takes it back. Its stages add a partial forward (the blocks
  on a gathered subset of the chunk's tokens, `ChunkStages.partial`, for MotionCache); `commit` is a no-op
  (per-chunk methods check for it; a chunk's state is simply dropped when its window ends).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from models.ar.kv_cache import scatter_tokens
from models.ar.rollout import ChunkStages
from models.wan.transformer import WanTransformer
from vidaccel.attention import AttentionInfo
from vidaccel.checks import int_arg
from vidaccel.transforms import Denoiser, DenoiseSpec, Stages, Work, find_state, staged_apply


@struct.dataclass
class DFState:
    """A diffusion-forcing denoiser's state: counters and what `df_sample` says about the current call."""

    work: Work
    update: jax.Array          # (F,) bool: the frames of this call that take a solver step in this row
    chunk: jax.Array           # () int32: the chunk forwarded (per-chunk execution; 0 for the whole window)
    attn_pairs: jax.Array      # () float32 query-key pairs self-attention could attend (block-causal), summed
    slot: jax.Array = None     # () int32 per-chunk: first buffer slot of the chunk's K/V
    kv: Any = None             # per-chunk only, during a call: the window's `WindowKV`


@struct.dataclass
class WindowKV:
    """The per-window K/V buffer of per-chunk execution: k, v (L, B, C, heads, head_dim); frames (L, B, C,
    heads) int32, the window-local latent frame of the token each layer and head holds in each slot (-1 =
    empty; after a per-head compression heads hold different tokens); queries (L, B, N, heads, head_dim),
    the last full chunk forward's queries (kept only with KV compression, else None)."""

    k: jax.Array
    v: jax.Array
    frames: jax.Array
    queries: Any = None


def df_state_of(state) -> DFState:
    """The `DFState` inside a (possibly method-wrapped) state."""
    return find_state(state, DFState, "; was the denoiser built by df_window_denoiser or df_chunk_denoiser?")


def has_df_state(state) -> bool:
    while not isinstance(state, DFState):
        if not hasattr(state, "inner"):
            return False
        state = state.inner
    return True


def df_window_denoiser(model: WanTransformer, *, attention: Any = None) -> Denoiser:
    """The whole-window (vanilla) diffusion-forcing denoiser: `wan_denoiser` plus a `DFState`. `attention`:
    the blocks' self-attention (default the model's dense one), e.g. a head- or sequence-parallel one."""
    if not isinstance(model, WanTransformer):
        raise TypeError(f"df_window_denoiser needs a WanTransformer, got {type(model).__name__}")
    cfg = model.cfg
    graphdef, params = nnx.split(model)

    def init(spec: DenoiseSpec) -> DFState:
        f = spec.latents.shape[1]
        return DFState(Work.zero(), jnp.zeros((f,), bool), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

    def embed(params, state: DFState, x, t, context):
        emb = nnx.merge(graphdef, params).embed(x, t, context)
        return emb, state.replace(work=state.work.add(calls=1))

    def blocks(params, state: DFState, emb):
        tokens, _ = nnx.merge(graphdef, params).blocks(emb, attention=attention)
        n = emb.tokens.shape[1]
        fp = emb.grid[0]
        per_frame = n // fp
        if cfg.num_frame_per_block > 1:     # block-causal: frame block j sees blocks <= j
            blk = np.arange(fp) // cfg.num_frame_per_block
            keys = float(sum((np.sum(blk <= blk[f]) * per_frame) for f in range(fp)) * per_frame)
        else:
            keys = float(n * n)
        return tokens, state.replace(work=state.work.add(block_passes=1, token_layers=n * cfg.num_layers),
                                     attn_pairs=state.attn_pairs + keys * cfg.num_layers)

    def head(params, tokens, emb):
        return nnx.merge(graphdef, params).head(tokens, emb)

    stages = Stages(embed, blocks, head)
    return Denoiser(init=init, apply=staged_apply(stages), graphdef=graphdef, params=params, name="df_window",
                    stages=stages, config=cfg)


def init_window_kv(model_or_den, batch: int, capacity: int, tokens_per_frame: int, *, chunk_tokens: int = 0,
                   empty: bool = False, dtype=jnp.float32) -> WindowKV:
    """A per-window K/V buffer of `capacity` token slots. By default slot s holds frame s // tokens_per_frame
    (chunk g at slots g * chunk tokens on: the uncompressed layout); `empty` marks every slot empty (-1),
    for a buffer whose chunks are placed as they arrive (KV compression), which also keeps the last
    forward's queries (`chunk_tokens` of them)."""
    cfg = model_or_den.cfg if isinstance(model_or_den, WanTransformer) else model_or_den.config
    capacity = int_arg("capacity", capacity, 1)
    shape = (cfg.num_layers, batch, capacity, cfg.num_attention_heads, cfg.attention_head_dim)
    z = jnp.zeros(shape, dtype)
    if empty:
        frames = jnp.full(shape[:4], -1, jnp.int32)
        queries = jnp.zeros((cfg.num_layers, batch, int_arg("chunk_tokens", chunk_tokens, 1), *shape[3:]), dtype)
    else:
        frames = jnp.broadcast_to((jnp.arange(capacity, dtype=jnp.int32) // tokens_per_frame)[None, None, :, None],
                                  shape[:4])
        queries = None
    return WindowKV(z, z, frames, queries)


def df_chunk_denoiser(model: WanTransformer, window_frames: int, *, wrap_attention: Any = None) -> Denoiser:
    """The per-chunk diffusion-forcing denoiser over windows of `window_frames` latent frames (see module
    docstring). Its `init` spec is one chunk (B, frames per block, H, W, C); `spec.num_steps` the solver's
    steps (a chunk's calls when nothing is skipped). `wrap_attention`: applied to the chunk's self-attention
    over the window buffer, e.g. `vidaccel.parallel.head_parallel_attention` (see `df_sample(..., mesh=)`)."""
    if not isinstance(model, WanTransformer):
        raise TypeError(f"df_chunk_denoiser needs a WanTransformer, got {type(model).__name__}")
    cfg = model.cfg
    if not cfg.block_causal:
        raise ValueError("per-chunk forwarding needs a block-causal model (num_frame_per_block > 1); this one has "
                         f"num_frame_per_block={cfg.num_frame_per_block}")
    fpc = cfg.num_frame_per_block * cfg.patch_size[0]
    window_frames = int_arg("window_frames", window_frames, fpc)
    if window_frames % fpc:
        raise ValueError(f"window_frames={window_frames} must be a multiple of the chunk length {fpc}")
    graphdef, params = nnx.split(model)

    def init(spec: DenoiseSpec) -> DFState:
        if spec.latents.shape[1] != fpc:
            raise ValueError(f"a chunk has {fpc} latent frames (num_frame_per_block={cfg.num_frame_per_block}); "
                             f"got latents of {spec.latents.shape[1]} frames")
        return DFState(Work.zero(), jnp.zeros((fpc,), bool), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

    def embed(params, state: DFState, x, t, context):
        emb = nnx.merge(graphdef, params).embed(x, t, context, frame_offset=state.chunk * cfg.num_frame_per_block)
        return emb, state.replace(work=state.work.add(calls=1))

    def run_blocks(params, state: DFState, emb, indices=None, valid=None):
        if state.kv is None:
            raise ValueError("df_chunk_denoiser was called without its window K/V buffer; call it through "
                             "models.ar.df_sample (execution='chunks'), which hands the buffer in")
        b, n = emb.tokens.shape[:2]
        buf: WindowKV = state.kv
        at = state.chunk * n if state.slot is None else state.slot
        frames = emb.positions[..., 0]                                   # (B, n) the chunk's window frames
        fpb = cfg.num_frame_per_block
        capture = buf.queries is not None and indices is None

        def attend(q, k, v, info: AttentionInfo, layer_state):
            kl, vl, fl, ql = layer_state
            if indices is None:
                kl = jax.lax.dynamic_update_slice_in_dim(kl, k.astype(kl.dtype), at, axis=1)
                vl = jax.lax.dynamic_update_slice_in_dim(vl, v.astype(vl.dtype), at, axis=1)
            else:
                kl = scatter_tokens(kl, at + indices, k, valid)
                vl = scatter_tokens(vl, at + indices, v, valid)
            fl = jax.lax.dynamic_update_slice_in_dim(fl, jnp.broadcast_to(frames[..., None], (b, n, fl.shape[2])), at,
                                                     axis=1)
            kf = fl.swapaxes(1, 2)                                       # (B, heads, C)
            mask = (kf[:, :, None, :] >= 0) & (kf[:, :, None, :] // fpb <= info.q_frames[:, None, :, None] // fpb)
            out = jax.nn.dot_product_attention(q, kl.astype(q.dtype), vl.astype(q.dtype), mask=mask)
            if capture:
                ql = q.astype(ql.dtype)
            return out, (kl, vl, fl, ql)

        sub = emb if indices is None else emb.take(indices)
        ql0 = buf.queries if buf.queries is not None else jnp.zeros((cfg.num_layers,))
        attention = attend if wrap_attention is None else wrap_attention(attend)
        tokens, (k, v, f, ql) = nnx.merge(graphdef, params).blocks(sub, attention=attention,
                                                                   layer_state=(buf.k, buf.v, buf.frames, ql0))
        buf = WindowKV(k, v, f, ql if buf.queries is not None else None)
        k_tok = sub.tokens.shape[1]
        f0 = f[0, 0, :, 0]          # layer 0 / head 0's slots: the keys the chunk's queries could attend
        keys = jnp.sum((f0 >= 0) & (f0 // fpb <= frames[0, 0] // fpb)).astype(jnp.float32)
        state = state.replace(kv=buf, attn_pairs=state.attn_pairs + k_tok * keys * cfg.num_layers,
                              work=state.work.add(block_passes=1, token_layers=k_tok * cfg.num_layers))
        return tokens, state

    def blocks(params, state, emb):
        return run_blocks(params, state, emb)

    def partial(params, state, emb, indices, valid=None):
        return run_blocks(params, state, emb, indices, valid)

    def head(params, tokens, emb):
        return nnx.merge(graphdef, params).head(tokens, emb)

    def commit(params, state, x0, context):
        return state

    stages = ChunkStages(embed, blocks, head, partial)
    return Denoiser(init=init, apply=staged_apply(stages), graphdef=graphdef, params=params, name="df_chunks",
                    stages=stages, commit=commit, config=cfg)


__all__ = ["DFState", "WindowKV", "df_state_of", "has_df_state", "df_window_denoiser", "df_chunk_denoiser",
           "init_window_kv"]
