"""Chunk-by-chunk autoregressive rollout with a KV cache, compiled once as a scan over chunks.

    out = rollout(model, noise, context, solver=unipc(50), guidance=5.0, negative_context=neg,
                  config=RolloutConfig(window_chunks=3, sink_chunks=1))

Each chunk (`num_frame_per_block` latent frames) is denoised with every solver step while attending to the
cached keys/values of earlier chunks; then its keys/values enter the cache:

- ``kv_mode="clean"`` (default, as CausVid / Self-Forcing do): one extra forward of the finished, clean
  chunk at t = 0 writes its K/V (the situation the diffusion-forcing model was trained on);
- ``kv_mode="last_step"``: the K/V computed during the chunk's last denoising step are kept, saving the
  extra forward at the price of K/V taken from a slightly noisy input.

The chunk's own K/V live in a buffer in the state, refreshed by every call at the tokens it computes; in
`last_step` mode the commit stores the buffer, i.e. each token's K/V from the chunk's last call that
computed it (a method that skips calls leaves them stale, as FlowCache's and MotionCache's code do).

The cache holds `sink_chunks` first chunks for good plus a rolling window of the last `window_chunks`
chunks, placed in a ring of slots (a new chunk overwrites the oldest non-sink one); `window_chunks=None`
keeps every chunk. RoPE is applied before caching, so attention sees true relative frame distances.

K/V storage (`kv_storage`): float32 or bfloat16 arrays, or int8 / int4 codes in the
`pallas_kernels.kv_quantization` layout (keys per channel in groups of `kv_group_size` tokens, values per
token, `kv_scale_dtype` scales), read by the quantized-KV attention kernel on GPU (`kv_attention="auto"`)
or its jnp reference elsewhere; the chunk being denoised is the full-precision recent window.
`kv_cache_bytes(out.state)` reports bytes held.

The per-chunk model is a `Denoiser` (`chunk_denoiser`) whose state holds the cache, so methods that wrap a
Denoiser apply to AR rollouts as they do to text-to-video sampling, and CFG branches keep separate caches.
Its stages add a partial forward (`ChunkStages.partial`): the blocks on a gathered subset of the chunk's
tokens, which refresh only their own entries of the buffer (MotionCache).

KV compression (`kv_compression`, any `models.ar.compression.CacheCompressor`, e.g. FlowCache's): instead
of a rolling window, the clean cache holds at most `cache_chunks` chunks; when a finished chunk does not
fit, the compressor first reduces each layer and head to one chunk fewer, scoring with the queries of the
finished chunk's clean pass (so it needs `kv_mode="clean"`); the cache is a prefix of filled slots rather
than a ring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.ar.compression import CacheCompressor, make_room
from models.ar.kv_cache import (
    FLOAT_STORAGES,
    KV_BACKENDS,
    STORAGES,
    cached_attention,
    capturing_queries,
    init_cache,
    layer_state,
    store,
    with_chunk_buffer,
    write_chunk,
)
from models.wan.transformer import WanTransformer
from pallas_kernels.kv_quantization import SCALE_DTYPES
from vidaccel.checks import choice_arg, int_arg, optional_int_arg
from vidaccel.parallel import as_mesh, batch_sharding, compile_on_mesh, constrain_heads, heads_wrap, placement
from vidaccel.sampling import check_sampler_args, denoise_loop, init_branches, run_sampler
from vidaccel.transforms import (
    CFGBranches,
    Denoiser,
    DenoiseSpec,
    Stages,
    Work,
    branch_states,
    find_state,
    staged_apply,
)

KV_MODES = ("clean", "last_step")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How the AR rollout keeps context: window and sink sizes in chunks, where cached K/V come from, how
    they are stored (`kv_storage`, and for int8 / int4 the key group size and scale dtype) and read
    (`kv_attention`: "auto", "kernel" or "reference", see `vidaccel.attention.resolve_backend`), and an
    optional compressor of the clean history (`kv_compression`, a `CacheCompressor`)."""

    window_chunks: int | None = None
    sink_chunks: int = 0
    kv_mode: str = "clean"
    kv_storage: str = "float32"
    kv_attention: str = "auto"
    kv_group_size: int = 32
    kv_scale_dtype: str = "bfloat16"
    kv_compression: CacheCompressor | None = None

    def __post_init__(self):
        optional_int_arg("RolloutConfig.window_chunks", self.window_chunks, 1)
        int_arg("RolloutConfig.sink_chunks", self.sink_chunks, 0)
        int_arg("RolloutConfig.kv_group_size", self.kv_group_size, 1)
        choice_arg("RolloutConfig.kv_mode", self.kv_mode, KV_MODES)
        choice_arg("RolloutConfig.kv_storage", self.kv_storage, STORAGES)
        choice_arg("RolloutConfig.kv_scale_dtype", self.kv_scale_dtype, SCALE_DTYPES)
        choice_arg("RolloutConfig.kv_attention", self.kv_attention, KV_BACKENDS)
        if self.window_chunks is None and self.sink_chunks:
            raise ValueError("RolloutConfig.sink_chunks needs a window_chunks (without a window every chunk is kept)")
        if self.kv_compression is not None:
            if not isinstance(self.kv_compression, CacheCompressor):
                raise ValueError(f"RolloutConfig.kv_compression={self.kv_compression!r} is invalid; allowed: None "
                                 "or a models.ar.compression.CacheCompressor (e.g. experiments.flowcache."
                                 "kv_compression())")
            int_arg("RolloutConfig.kv_compression.cache_chunks", self.kv_compression.cache_chunks, 2)
            if self.window_chunks is not None:
                raise ValueError("RolloutConfig.kv_compression replaces the rolling window; set window_chunks=None")
            if self.kv_storage not in FLOAT_STORAGES:
                raise ValueError(f"RolloutConfig.kv_compression needs float K/V storage, not {self.kv_storage!r}")
            if self.kv_mode != "clean":
                raise ValueError("RolloutConfig.kv_compression scores with the clean pass's queries; it needs "
                                 f"kv_mode='clean', not {self.kv_mode!r}")

    def capacity_chunks(self, num_chunks: int) -> int:
        """Chunks of K/V the cache holds for a video of `num_chunks` chunks."""
        if self.kv_compression is not None:
            return min(num_chunks, self.kv_compression.cache_chunks)
        if self.window_chunks is None:
            return num_chunks
        return min(num_chunks, self.sink_chunks + self.window_chunks)

    def slot_chunk(self, chunk: jax.Array, capacity_chunks: int) -> jax.Array:
        """Ring position (in chunks) where chunk `chunk` is stored, in a cache of `capacity_chunks` chunks
        (not used with KV compression, whose cache is a prefix of filled slots)."""
        if self.window_chunks is None or capacity_chunks < self.sink_chunks + self.window_chunks:
            return chunk        # the cache holds every chunk of this video
        s = self.sink_chunks
        return jnp.where(chunk < s, chunk, s + (chunk - s) % self.window_chunks)


@struct.dataclass
class ChunkState:
    """A chunk denoiser's state: the KV cache, the chunk index being denoised, the solver step, counters."""

    cache: object         # KVCache (float storage) or QuantizedKVCache (int8 / int4)
    chunk: jax.Array      # () int32
    step: jax.Array       # () int32 denoising calls so far on this chunk (counted by `embed`)
    work: Work
    attn_pairs: jax.Array  # () float32 query-key pairs scored by self-attention, summed over layers and passes
    own: tuple             # (k, v) each (L, B, N, heads, head_dim): the chunk's own K/V from its latest calls
    num_steps: int = struct.field(pytree_node=False, default=0)


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkStages(Stages):
    """The chunk denoiser's stages plus a partial forward:

    partial(params, state, emb, indices, valid=None) -> (tokens (B, K, D), state)
        runs the blocks on the chunk tokens `indices` (B, K) of `emb` (the whole chunk's `Embedded`), each at
        its own RoPE position and time row. Their fresh K/V are scattered into the chunk's K/V buffer
        (`ChunkState.own`) where `valid` (B, K) holds (padding entries must be tokens no valid entry names),
        and the queries attend to [cached chunks ; buffer], so the other tokens contribute stale K/V.
        Counts one block pass and K tokens per layer. `blocks` is the same with every token, in order.
    """

    partial: Callable[..., Any] = None


def chunk_denoiser(model: WanTransformer, config: RolloutConfig = RolloutConfig(), *,
                   wrap_attention: Callable[[Any], Any] | None = None) -> Denoiser:
    """The Denoiser for one chunk of an AR rollout: reads (and in `last_step` mode writes) the KV cache.

    `den.commit(params, state, x0, context)` finishes a chunk: in `clean` mode it runs the clean chunk at
    t = 0 and stores its K/V; in both modes it moves on to the next chunk. `wrap_attention`: applied to the
    chunk's whole self-attention (cache read and write, chunk buffer) before the blocks run it, e.g.
    `vidaccel.parallel.head_parallel_attention` (see `head_parallel_chunk_denoiser`).
    """
    cfg = model.cfg
    if not cfg.block_causal:
        raise ValueError("chunk_denoiser needs a block-causal model (num_frame_per_block > 1); this one has "
                         f"num_frame_per_block={cfg.num_frame_per_block}")
    graphdef, params = nnx.split(model)
    fpb = cfg.num_frame_per_block

    def tokens_per_chunk(x) -> int:
        pt, ph, pw = cfg.patch_size
        return (x.shape[1] // pt) * (x.shape[2] // ph) * (x.shape[3] // pw)

    def init(spec: DenoiseSpec) -> ChunkState:
        b, f = spec.latents.shape[:2]
        if f != fpb * cfg.patch_size[0]:
            raise ValueError(f"a chunk has {fpb * cfg.patch_size[0]} latent frames (num_frame_per_block={fpb}); "
                             f"got latents of {f} frames")
        n = tokens_per_chunk(spec.latents)
        cache = init_cache(config.kv_storage, cfg.num_layers, b, n * config.capacity_chunks(spec.num_chunks),
                           cfg.num_attention_heads, cfg.attention_head_dim, window=n,
                           group_size=config.kv_group_size, scale_dtype=config.kv_scale_dtype,
                           head_frames=config.kv_compression is not None)
        z = jnp.zeros((), jnp.int32)
        buf = jnp.zeros((cfg.num_layers, b, n, cfg.num_attention_heads, cfg.attention_head_dim), jnp.float32)
        return ChunkState(cache, z, z, Work.zero(), jnp.zeros((), jnp.float32), (buf, buf), spec.num_steps)

    def embed(params, state: ChunkState, x, t, context):
        emb = nnx.merge(graphdef, params).embed(x, t, context, frame_offset=state.chunk * fpb)
        return emb, state.replace(step=state.step + 1, work=state.work.add(calls=1))

    def write_position(state: ChunkState, n: int):
        if config.kv_compression is not None:     # a prefix of filled slots (compression packs them in front)
            return jnp.sum(state.cache.valid).astype(jnp.int32)
        return config.slot_chunk(state.chunk, state.cache.capacity // n) * n

    def run_blocks(params, state: ChunkState, emb, *, indices=None, valid=None, write: bool = False,
                   capture: bool = False):
        """The block stack on the chunk tokens `indices` (all when None; see `ChunkStages.partial`), reading
        the cache and refreshing the chunk's K/V buffer; with `write` the buffer is stored at the chunk's
        slots too; with `capture` every layer's queries are returned. Returns (tokens, state, queries)."""
        n = emb.tokens.shape[1]
        at = write_position(state, n)
        attention = cached_attention(state.cache, write_at=at if write else None, implementation=config.kv_attention)
        attention, ls = with_chunk_buffer(attention, indices, valid), (layer_state(state.cache), state.own)
        if capture:
            attention, ls = capturing_queries(attention), (ls, jnp.zeros((cfg.num_layers,)))
        if wrap_attention is not None:
            attention = wrap_attention(attention)
        sub = emb if indices is None else emb.take(indices)
        tokens, layers = nnx.merge(graphdef, params).blocks(sub, attention=attention, layer_state=ls,
                                                            kv_frames=emb.positions[..., 0])
        queries = None
        if capture:
            layers, queries = layers
        layers, own = layers
        cache = store(state.cache, layers, emb.positions[..., 0], at) if write else state.cache
        k = sub.tokens.shape[1]
        keys = jnp.sum(state.cache.valid).astype(jnp.float32) + n
        state = state.replace(cache=cache, own=own, attn_pairs=state.attn_pairs + k * keys * cfg.num_layers,
                              work=state.work.add(block_passes=1, token_layers=k * cfg.num_layers))
        return tokens, state, queries

    def blocks(params, state: ChunkState, emb):
        tokens, state, _ = run_blocks(params, state, emb)
        return tokens, state

    def partial(params, state: ChunkState, emb, indices, valid=None):
        tokens, state, _ = run_blocks(params, state, emb, indices=indices, valid=valid)
        return tokens, state

    def head(params, tokens, emb):
        return nnx.merge(graphdef, params).head(tokens, emb)

    stages = ChunkStages(embed, blocks, head, partial)

    def commit(params, state: ChunkState, x0, context) -> ChunkState:
        if config.kv_mode == "last_step":       # the K/V of the chunk's last calls, from its buffer
            b, n = state.own[0].shape[1:3]
            frames = state.chunk * fpb + jnp.repeat(jnp.arange(fpb, dtype=jnp.int32), n // fpb)
            frames = jnp.broadcast_to(frames, (b, n))
            state = state.replace(cache=write_chunk(state.cache, *state.own, frames, write_position(state, n)))
        elif config.kv_compression is None:     # an extra pass of the clean chunk at t = 0 writes its K/V
            emb, state = embed(params, state, x0, jnp.zeros((x0.shape[0],), jnp.float32), context)
            _, state, _ = run_blocks(params, state, emb, write=True)
        else:       # the clean pass's K/V and queries; compress if they do not fit, then store them
            emb, state = embed(params, state, x0, jnp.zeros((x0.shape[0],), jnp.float32), context)
            _, state, queries = run_blocks(params, state, emb, capture=True)
            cache = make_room(state.cache, queries, config.kv_compression, emb.tokens.shape[1],
                              emb.grid[1] * emb.grid[2])
            state = state.replace(cache=write_chunk(cache, *state.own, emb.positions[..., 0],
                                                    jnp.sum(cache.valid).astype(jnp.int32)))
        return state.replace(chunk=state.chunk + 1, step=jnp.zeros((), jnp.int32))

    return Denoiser(init=init, apply=staged_apply(stages), graphdef=graphdef, params=params,
                    name=f"ar_{config.kv_mode}", stages=stages, commit=commit, config=model.cfg)


@struct.dataclass
class RolloutOutput:
    latents: jax.Array      # (B, F, H, W, C)
    state: object           # the chunk denoiser state(s) after the last chunk (cache, counters)


def _rollout_impl(den, solver, guided, num_chunks, params, noise, context, negative, guidance, bar_id):
    b, f = noise.shape[:2]
    fpb = f // num_chunks
    chunks = noise.reshape(b, num_chunks, fpb, *noise.shape[2:]).swapaxes(0, 1)
    spec = DenoiseSpec(jax.ShapeDtypeStruct(chunks.shape[1:], noise.dtype),
                       jax.ShapeDtypeStruct(context.shape, context.dtype), solver.num_steps, num_chunks)
    state0 = init_branches(den, spec, guided)

    def per_chunk(dstate, x_noise):
        x0, dstate = denoise_loop(den, solver, guided, params, x_noise, context, negative, guidance, dstate, bar_id)
        if guided:
            dstate = CFGBranches(den.commit(params, dstate.cond, x0, context),
                                 den.commit(params, dstate.uncond, x0, negative))
        else:
            dstate = den.commit(params, dstate, x0, context)
        return dstate, x0

    state, out = jax.lax.scan(per_chunk, state0, chunks)
    latents = out.swapaxes(0, 1).reshape(noise.shape)
    return RolloutOutput(latents, state)


_rollout_jit = jax.jit(_rollout_impl, static_argnums=(0, 1, 2, 3))


def head_parallel_chunk_denoiser(model: WanTransformer, mesh: Mesh, config: RolloutConfig | None = None, *,
                                 axis: str = "seq") -> Denoiser:
    """`chunk_denoiser(model, config)` for a mesh: its attention (cache read, chunk buffer, cache write, in any
    KV storage) runs by heads over `axis` (`vidaccel.parallel.heads_wrap`), and its KV cache and chunk buffer
    stay split by heads in the state (pinned at init and after every commit), so each device keeps and reads
    heads / P heads. Wrap it with FlowCache / MotionCache as on one device."""
    heads = model.cfg.num_attention_heads
    den = chunk_denoiser(model, config or RolloutConfig(), wrap_attention=heads_wrap(mesh, heads, axis=axis))

    def place(state):
        own = constrain_heads(state.own, mesh, heads, 3, axis)
        return state.replace(cache=constrain_heads(state.cache, mesh, heads, 3, axis), own=own)

    def init(spec):
        return place(den.init(spec))

    def commit(params, state, x0, context):
        return place(den.commit(params, state, x0, context))

    return dataclasses.replace(den, init=init, commit=commit, name=f"heads({den.name})")


def rollout(model_or_den, noise: jax.Array, context: jax.Array, *, solver, guidance: float | None = None,
            negative_context: jax.Array | None = None, config: RolloutConfig | None = None,
            progress: bool | str = False, check_finite: bool = True, params=None, mesh=None,
            axis: str = "seq") -> RolloutOutput:
    """Generate `noise.shape[1]` latent frames chunk by chunk (one compiled scan over chunks).

    model_or_den: a block-causal `WanTransformer` (then a `chunk_denoiser` with `config`, default
    `RolloutConfig()`, is built), or a chunk denoiser (possibly wrapped by a method; `config` unused).
    noise: (B, F, H, W, C) with F a multiple of the chunk length. Other arguments as in `sample()`.
    mesh: a (data, fsdp, seq) `Mesh` or spec string: the scan compiled with in/out shardings (params as placed
    by `shard_params`, latents and contexts split by batch where it divides). A model then gets
    `head_parallel_chunk_denoiser(model, mesh, config, axis=axis)`; a denoiser built that way keeps its KV
    cache split by heads (a plain `chunk_denoiser` also runs: XLA partitions its attention as it likes).
    Equal to one device up to float summation order, with the same decisions and counters.
    """
    mesh = None if mesh is None else as_mesh(mesh)
    if isinstance(model_or_den, WanTransformer):
        den = (chunk_denoiser(model_or_den, config or RolloutConfig()) if mesh is None
               else head_parallel_chunk_denoiser(model_or_den, mesh, config, axis=axis))
    else:
        den = model_or_den
        if getattr(den, "commit", None) is None:
            raise TypeError("rollout needs a block-causal WanTransformer or a chunk_denoiser (a Denoiser with "
                            "`commit`)")
    guided, negative = check_sampler_args(den, solver, noise, guidance, context, negative_context, check_finite)
    num_chunks = _num_chunks(den, noise)
    params = den.params if params is None else params
    args = (params, noise, context, negative, jnp.float32(guidance if guided else 1.0))
    total = num_chunks * solver.num_steps
    if mesh is None:
        return run_sampler(_rollout_jit, den, solver, guided, num_chunks, *args, progress=progress, total=total,
                           desc="rollout")
    batch, repl = batch_sharding(mesh, noise.shape[0]), NamedSharding(mesh, P())
    args = (params, *jax.device_put(args[1:4], batch), args[4])                # inputs from any placement
    fn = compile_on_mesh(_rollout_impl, (den, solver, bool(guided), num_chunks), placement(params, mesh),
                         (batch, batch, batch, repl, repl), RolloutOutput(batch, None))
    with jax.set_mesh(mesh):
        return run_sampler(fn, *args, progress=progress, total=total, desc="rollout")


def _num_chunks(den: Denoiser, noise) -> int:
    cfg = den.config
    fpb = cfg.num_frame_per_block * cfg.patch_size[0]
    if noise.shape[1] % fpb:
        raise ValueError(f"noise has {noise.shape[1]} latent frames; it must be a multiple of the chunk length "
                         f"{fpb} (num_frame_per_block x temporal patch)")
    return noise.shape[1] // fpb


def chunk_state_of(state) -> ChunkState:
    """The chunk denoiser's state inside a (possibly method-wrapped) state, following `inner`."""
    return find_state(state, ChunkState, "; was the denoiser built with chunk_denoiser?")


def kv_cache_bytes(state) -> int:
    """Bytes held by the rollout's KV cache(s) (both CFG branches when guided; method wrappers followed)."""
    return int(sum(chunk_state_of(s).cache.nbytes() for s in branch_states(state)))


