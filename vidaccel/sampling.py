"""`sample()`: the whole denoising loop as one jitted `lax.scan`, with classifier-free guidance.

The scan carries (latents, solver state, denoiser state per CFG branch). The conditional and the
unconditional branch are separate denoiser calls, each with its own state (`CFGBranches`), as the diffusers
Wan pipeline runs them (so a caching method's skip decisions stay per branch and real work is skipped). A
progress bar is driven from inside the scan by `jax.debug.callback`, without leaving the compiled loop.

The pieces are shared by every sampler (`sample`, the AR rollout, diffusion forcing): `check_sampler_args`
validates, `guided_velocity` / `denoise_loop` are the traced step, `tick` advances the bar from compiled
code, and `run_sampler` drives a jitted sampler (bar, wait for the result, flush the callbacks).

With `mesh=` (a `jax.sharding.Mesh` from `vidaccel.parallel.make_mesh`, or its spec string) the same scan is
compiled with in/out shardings (`vidaccel.parallel.compile_on_mesh`): params as placed by `shard_params`,
latents and contexts split by batch, and with CFG on `data=2` the branches run CFG-parallel.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from vidaccel.checks import assert_finite, float_arg
from vidaccel.parallel import (
    CFGContext,
    as_mesh,
    batch_sharding,
    cfg_parallel_denoiser,
    check_shardable,
    compile_on_mesh,
    placement,
    unstack_branches,
)
from vidaccel.solvers import Solver
from vidaccel.transforms import CFGBranches, Denoiser, DenoiseSpec

_BARS: dict[int, Any] = {}
_BAR_IDS = itertools.count(1)
_BAR_LOCK = threading.Lock()


@struct.dataclass
class SampleOutput:
    """Final latents and the denoiser state(s) after the last step (counters included).

    `state` is one denoiser state without guidance, else `CFGBranches(cond, uncond)`.
    """

    latents: jax.Array
    state: Any


def _tick(bar_id):
    bar = _BARS.get(int(bar_id))
    if bar is not None:
        bar.update(1)


def tick(bar_id: jax.Array) -> None:
    """Advance progress bar `bar_id` by one from inside compiled code (0 = no bar)."""
    jax.debug.callback(_tick, bar_id)


def init_branches(den: Denoiser, spec: DenoiseSpec, guided: bool):
    """Fresh denoiser state: one, or `CFGBranches` with one per CFG branch."""
    return CFGBranches(den.init(spec), den.init(spec)) if guided else den.init(spec)


def guided_velocity(den: Denoiser, guided: bool, params, dstate, x, t, context, negative, guidance):
    """The (guided) velocity at (x, t) and the updated per-branch denoiser state."""
    if not guided:
        return den.apply(params, dstate, x, t, context)
    vc, sc = den.apply(params, dstate.cond, x, t, context)
    vu, su = den.apply(params, dstate.uncond, x, t, negative)
    return vu + guidance * (vc - vu), CFGBranches(sc, su)


def denoise_loop(den: Denoiser, solver, guided: bool, params, noise, context, negative, guidance, den_state,
                 bar_id, *, trajectory: bool = False):
    """Traceable core of `sample()`: run every solver step from `noise`, threading `den_state`.

    Shared by `sample()`, the AR chunk rollout (once per chunk with a carried state) and the experiments that
    need a dense trajectory. Returns (latents, den_state), plus the latents before every step (steps, ...)
    when `trajectory`.
    """
    timesteps = jnp.asarray(solver.timesteps, jnp.float32)

    def step(carry, i):
        x, sstate, dstate = carry
        t = jnp.broadcast_to(timesteps[i], (x.shape[0],))
        v, dstate = guided_velocity(den, guided, params, dstate, x, t, context, negative, guidance)
        x_next, sstate = solver.step(sstate, i, x, v)
        tick(bar_id)
        return (x_next, sstate, dstate), (x if trajectory else None)

    steps = jnp.arange(solver.num_steps, dtype=jnp.int32)
    (x, _, den_state), xs = jax.lax.scan(step, (noise, solver.init(noise), den_state), steps)
    return (x, den_state, xs) if trajectory else (x, den_state)


def _sample_impl(den: Denoiser, solver, guided: bool, params, noise, context, negative, guidance, bar_id):
    spec = DenoiseSpec(jax.ShapeDtypeStruct(noise.shape, noise.dtype),
                       jax.ShapeDtypeStruct(context.shape, context.dtype), solver.num_steps)
    x, den_state = denoise_loop(den, solver, guided, params, noise, context, negative, guidance,
                                init_branches(den, spec, guided), bar_id)
    return SampleOutput(x, den_state)


_sample_jit = jax.jit(_sample_impl, static_argnums=(0, 1, 2))


def _sharded_impl(den: Denoiser, solver, guided: bool, cfg_parallel: bool, mesh, params, noise, context, negative,
                  guidance, bar_id):
    if not cfg_parallel:
        return _sample_impl(den, solver, guided, params, noise, context, negative, guidance, bar_id)
    spec = DenoiseSpec(jax.ShapeDtypeStruct(noise.shape, noise.dtype),
                       jax.ShapeDtypeStruct(context.shape, context.dtype), solver.num_steps)
    pden = cfg_parallel_denoiser(den, mesh)
    ctx = CFGContext(jnp.stack([context, negative]), guidance)
    x, state = denoise_loop(pden, solver, False, params, noise, ctx, None, None, pden.init(spec), bar_id)
    return SampleOutput(x, unstack_branches(state))


def sample(den: Denoiser, params, noise: jax.Array, context: jax.Array, *, solver, guidance: float | None = None,
           negative_context: jax.Array | None = None, progress: bool | str = False,
           check_finite: bool = True, mesh=None, cfg_parallel: bool | None = None) -> SampleOutput:
    """Denoise `noise` (B, F, H, W, C) to latents with `solver`, in one compiled scan.

    guidance: classifier-free guidance scale g (None or 1.0 = no guidance); v = v_u + g (v_c - v_u), with
    `negative_context` (same shape as `context`) for the unconditional branch. progress: show a tqdm bar
    (a string sets its description). check_finite: reject NaN/Inf in noise and contexts before compiling.
    mesh: a (data, fsdp, seq) `Mesh` or a spec string ("data=2,seq=4"): the same scan compiled with in/out
    shardings (params as placed, see `vidaccel.parallel.shard_params`; latents and contexts moved to a split by
    batch from wherever they are),
    the bar the only thing that leaves the devices; equal to one device up to float summation order.
    cfg_parallel (with a mesh): the two CFG branches on the halves of `data` (`cfg_parallel_denoiser`);
    None = when guided and data == 2. Under guidance the state is `CFGBranches` either way.
    Returns `SampleOutput(latents, state)`; `state` holds the denoiser's counters.
    """
    guided, negative = check_sampler_args(den, solver, noise, guidance, context, negative_context, check_finite)
    params = den.params if params is None else params
    g = jnp.float32(guidance if guided else 1.0)
    if mesh is None:
        if cfg_parallel:
            raise ValueError("cfg_parallel=True needs a mesh with data=2 (mesh='data=2,...')")
        return run_sampler(_sample_jit, den, solver, guided, params, noise, context, negative, g,
                           progress=progress, total=solver.num_steps, desc="sampling")
    mesh = as_mesh(mesh)
    if cfg_parallel is None:
        cfg_parallel = guided and mesh.shape["data"] == 2
    if cfg_parallel and not guided:
        raise ValueError("cfg_parallel=True needs guidance (and negative_context): without CFG there is one branch")
    check_shardable(den, DenoiseSpec(jax.ShapeDtypeStruct(noise.shape, noise.dtype),
                                     jax.ShapeDtypeStruct(context.shape, context.dtype), solver.num_steps))
    latent_sh = batch_sharding(mesh, noise.shape[0])
    if cfg_parallel:        # data holds the branches (latents replicated over it); the batch may split on fsdp
        b, f = noise.shape[0], mesh.shape["fsdp"]
        latent_sh = NamedSharding(mesh, P(("fsdp",) if f > 1 and b % f == 0 else None))
    repl = NamedSharding(mesh, P())
    noise, context, negative = jax.device_put((noise, context, negative), latent_sh)   # from any placement
    fn = compile_on_mesh(_sharded_impl, (den, solver, bool(guided), bool(cfg_parallel), mesh),
                         placement(params, mesh), (latent_sh, latent_sh, latent_sh, repl, repl),
                         SampleOutput(latent_sh, repl))
    with jax.set_mesh(mesh):
        return run_sampler(fn, params, noise, context, negative, g, progress=progress, total=solver.num_steps,
                           desc="sampling")


def run_sampler(fn: Callable[..., Any], *args, progress: bool | str, total: int, desc: str):
    """Drive a jitted sampler `fn(*args, bar_id)`: show a progress bar of `total` ticks (ticked from inside the
    scan with `tick(bar_id)`), wait for the result and flush the pending callbacks before the bar closes."""
    with progress_bar(progress, total, desc) as bar_id:
        out = fn(*args, jnp.int32(bar_id))
        jax.block_until_ready(out)
        jax.effects_barrier()
    return out


def check_sampler_args(den, solver, noise, guidance, context, negative_context, check_finite: bool):
    """Validate what every sampler takes; return (guided, the unconditional branch's context)."""
    if not isinstance(den, Denoiser):
        raise TypeError(f"expected a Denoiser (e.g. models.wan.wan_denoiser(model)), got {type(den).__name__}")
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a Solver (vidaccel.solvers.unipc(steps) or euler(steps)), got "
                        f"{solver!r} ({type(solver).__name__})")
    if getattr(noise, "ndim", None) != 5:
        raise ValueError(f"noise must be channels-last latents (B, F, H, W, C); got shape {jnp.shape(noise)}")
    return check_guidance(guidance, context, negative_context, noise, check_finite)


def check_guidance(guidance, context, negative_context, noise, check_finite: bool):
    """Validate CFG arguments (and finiteness); return (guided, the unconditional branch's context).

    guidance: None or a finite real number (NaN or inf would silently turn every latent into NaN)."""
    if guidance is not None:
        guidance = float_arg("guidance", guidance)
    guided = guidance is not None and guidance != 1.0
    if guided:
        if negative_context is None:
            raise ValueError(f"guidance={guidance} needs negative_context (the unconditional branch's text "
                             "embedding, shape like context); pass guidance=None to sample without CFG")
        if negative_context.shape != context.shape:
            raise ValueError(f"negative_context shape {negative_context.shape} != context shape {context.shape}")
    if check_finite:
        assert_finite("noise", noise)
        assert_finite("context", context)
        if guided:
            assert_finite("negative_context", negative_context)
    return guided, negative_context if guided else context


@contextlib.contextmanager
def progress_bar(progress: bool | str, total: int, default_desc: str):
    """A tqdm bar ticked from compiled code through `_tick`; yields its id (0 = no bar)."""
    bar_id = 0
    if progress:
        with _BAR_LOCK:
            bar_id = next(_BAR_IDS)
            _BARS[bar_id] = tqdm(total=total, desc=progress if isinstance(progress, str) else default_desc,
                                 leave=False)
    try:
        yield bar_id
    finally:
        bar = _BARS.pop(bar_id, None)
        if bar is not None:
            bar.close()
