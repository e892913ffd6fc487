"""AR chunk runtimes on a (data, fsdp, seq) mesh (`vidaccel.parallel`), with the K/V split by heads.

    mesh = make_mesh("fsdp=2,seq=4")
    den = head_parallel_chunk_denoiser(model, mesh, RolloutConfig(kv_storage="int8"))
    den = flowcache(den, flowcache_config(0.1))           # or motioncache(den, cfg): methods wrap it as usual
    params = shard_params(den.params, mesh, WAN_RULES)
    out = sharded_rollout(den, params, noise, ctx, mesh=mesh, solver=unipc(50), guidance=5.0, negative_context=neg)
    out = sharded_df_sample(model, params, noise, ctx, mesh=mesh, solver=unipc(50), ar_step=5, execution="chunks")

The chunk's whole self-attention (cache read, the chunk's K/V buffer, the cache write, in float or int8 / int4
storage) runs in a `shard_map` over `seq` by heads (`vidaccel.parallel.head_parallel_attention`): each device
keeps and reads the K/V of heads / P heads only, for every slot and layer. The chunk's tokens stay whole on
every device (no all-to-all). Everything else (projections, FFN, the methods' indicators, motion maps and
token selections) is partitioned by XLA from the parameter and batch shardings, so its reductions are global
and every device takes the same decision. The rollout's KV cache and chunk buffer are pinned to the head
split in the carried state (`constrain_heads`) when created and after every commit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.ar.diffusion_forcing import _df_impl, df_prepare
from models.ar.rollout import RolloutConfig, RolloutOutput, _num_chunks, _rollout_impl, chunk_denoiser
from models.wan.transformer import WanTransformer
from vidaccel.parallel import (
    batch_sharding,
    check_heads,
    check_mesh,
    compile_on_mesh,
    constrain_heads,
    head_parallel_attention,
    placement,
)
from vidaccel.sampling import SampleOutput, check_sampler_args, run_sampler
from vidaccel.transforms import Denoiser


def heads_wrap(mesh: Mesh, heads: int, *, axis: str = "seq"):
    """The `wrap_attention` of `chunk_denoiser` / `df_chunk_denoiser` that runs the chunk's attention by
    heads over `axis`; a ValueError naming the mesh shapes that work when `heads` does not divide."""
    check_mesh(mesh)
    check_heads(heads, mesh, axis, "the AR KV cache's head split")
    return lambda attention: head_parallel_attention(mesh, attention, axis=axis)


def head_parallel_chunk_denoiser(model: WanTransformer, mesh: Mesh, config: RolloutConfig | None = None, *,
                                 axis: str = "seq") -> Denoiser:
    """`chunk_denoiser(model, config)` with its attention split by heads over `axis` and its KV cache (and
    chunk buffer) kept split by heads in the state. Wrap it with FlowCache / MotionCache as on one device."""
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


def sharded_rollout(model_or_den, params, noise: jax.Array, context: jax.Array, *, mesh: Mesh, solver,
                    guidance: float | None = None, negative_context: jax.Array | None = None,
                    config: RolloutConfig | None = None, axis: str = "seq", progress: bool | str = False,
                    check_finite: bool = True) -> RolloutOutput:
    """`models.ar.rollout.rollout` on `mesh`: the same scan over chunks, compiled with in/out shardings
    (params as placed, see `vidaccel.parallel.shard_params`; latents and contexts split by batch where it
    divides; the state as XLA lays it out, the KV cache split by heads). Equal to `rollout` up to float
    summation order, with the same decisions and counters.

    model_or_den: a block-causal `WanTransformer` (then `head_parallel_chunk_denoiser(model, mesh, config)`
    is built; `config`, default `RolloutConfig()`, is used only then) or a chunk denoiser, possibly wrapped
    by a method. A plain `chunk_denoiser` also runs (XLA then partitions its attention as it likes); build it with
    `head_parallel_chunk_denoiser` to keep the cache split by heads.
    """
    check_mesh(mesh)
    if isinstance(model_or_den, WanTransformer):
        den = head_parallel_chunk_denoiser(model_or_den, mesh, config, axis=axis)
    else:
        den = model_or_den
        if getattr(den, "commit", None) is None:
            raise TypeError("sharded_rollout needs a block-causal WanTransformer or a chunk denoiser (a Denoiser "
                            "with `commit`, e.g. head_parallel_chunk_denoiser(model, mesh))")
    guided, negative = check_sampler_args(den, solver, noise, guidance, context, negative_context, check_finite)
    num_chunks = _num_chunks(den, noise)
    params = den.params if params is None else params
    batch, repl = batch_sharding(mesh, noise.shape[0]), NamedSharding(mesh, P())
    fn = compile_on_mesh(_rollout_impl, (den, solver, bool(guided), num_chunks), placement(params, mesh),
                         (batch, batch, batch, repl, repl), RolloutOutput(batch, None))
    with jax.set_mesh(mesh):
        return run_sampler(fn, params, noise, context, negative, jnp.float32(guidance if guided else 1.0),
                           progress=progress, total=num_chunks * solver.num_steps, desc="rollout")


def sharded_df_sample(model_or_den, params, noise: jax.Array, context: jax.Array, *, mesh: Mesh, solver,
                      axis: str = "seq", progress: bool | str = False, **kw) -> SampleOutput:
    """`models.ar.diffusion_forcing.df_sample` on `mesh`, compiled with in/out shardings (as
    `sharded_rollout`); the other keywords (`execution`, `ar_step`, `guidance`, ...) as `df_sample`.

    model_or_den: a `WanTransformer`, whose attention is then split by heads over `axis` (per chunk: the
    window K/V buffer too), or a denoiser as `df_sample` takes, e.g. `df_chunk_denoiser(model, frames,
    wrap_attention=heads_wrap(mesh, heads))` wrapped by a method, or `parallel_wan_denoiser` for "window".
    """
    check_mesh(mesh)
    wrap = None
    if isinstance(model_or_den, WanTransformer):
        wrap = heads_wrap(mesh, model_or_den.cfg.num_attention_heads, axis=axis)
    static, dynamic, total = df_prepare(model_or_den, noise, context, solver=solver, params=params,
                                        wrap_attention=wrap, **kw)
    batch, repl = batch_sharding(mesh, noise.shape[0]), NamedSharding(mesh, P())
    rest = (batch, batch, batch, repl) + (None,) * (len(dynamic) - 5 + 1)       # schedules and the bar id
    fn = compile_on_mesh(_df_impl, static, placement(dynamic[0], mesh), rest, SampleOutput(batch, None))
    with jax.set_mesh(mesh):
        return run_sampler(fn, *dynamic, progress=progress, total=total, desc="diffusion forcing")


__all__ = ["head_parallel_chunk_denoiser", "heads_wrap", "sharded_df_sample", "sharded_rollout"]
