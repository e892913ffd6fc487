"""Diffusion-forcing sampling over the SkyReels-V2 timestep matrix, compiled as one scan over its rows.

    out = df_sample(model, noise, context, solver=unipc(50, shift=8.0), ar_step=5, causal_block_size=2,
                    guidance=6.0, negative_context=neg)

Row r of `generate_timestep_matrix` gives every latent frame its own model timestep; the model runs on the
row's window of frames (`valid_interval[r]`, window-local RoPE positions, as the SkyReels-V2 pipeline slices
the latents) with per-frame `t`, and every frame whose `update_mask` is set takes its own solver step
(`Solver.step` with one step index per frame: one scheduler per frame, as in the pipeline). With
`ar_step = 0` all blocks share each step (synchronous); with `ar_step > 0` block b trails block b-1 by
`ar_step` steps (asynchronous), so several chunks are in flight at staggered noise levels. Unlike the KV-cached
chunk rollout (`models.ar.rollout`), every row recomputes the whole window: this is SkyReels-V2's vanilla
execution. Prefix frames (`num_pre_ready`, video extension) are given clean latents and never updated; the
pipeline's prefix re-noising (`addnoise_condition`) is not reproduced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.ar.schedules import generate_timestep_matrix
from models.wan.denoiser import wan_denoiser
from models.wan.transformer import WanTransformer
from vidaccel.sampling import SampleOutput, check_sampler_args, guided_velocity, init_branches, run_sampler, tick
from vidaccel.transforms import Denoiser, DenoiseSpec


def df_schedule(solver, num_frames: int, *, ar_step: int, causal_block_size: int, window_frames: int | None = None,
                num_pre_ready: int = 0):
    """The timestep matrix for `solver`'s steps as device arrays: (t (R, F) float32, step index (R, F) int32
    per frame, update (R, F) bool, window start (R,) int32) and the static window length."""
    window = num_frames if window_frames is None else window_frames
    tmat, idx, upd, valid = generate_timestep_matrix(num_frames, solver.timesteps, window, ar_step, num_pre_ready,
                                                     causal_block_size)
    valid = np.asarray(valid, np.int64)
    lengths = valid[:, 1] - valid[:, 0]
    if len(set(lengths.tolist())) != 1:
        raise ValueError(f"the schedule's frame windows have different lengths {sorted(set(lengths.tolist()))}; "
                         "df_sample needs one static window length (choose window_frames as a multiple of "
                         "causal_block_size that the schedule keeps constant, or None for the whole video)")
    return (jnp.asarray(tmat, jnp.float32), jnp.asarray(idx - 1, jnp.int32), jnp.asarray(upd),
            jnp.asarray(valid[:, 0], jnp.int32)), int(lengths[0])


def _df_impl(den: Denoiser, solver, guided: bool, win: int, params, noise, context, negative, guidance, tmat, idx,
             upd, start, bar_id):
    b = noise.shape[0]
    spec = DenoiseSpec(jax.ShapeDtypeStruct((b, win, *noise.shape[2:]), noise.dtype),
                       jax.ShapeDtypeStruct(context.shape, context.dtype), tmat.shape[0])
    frames = jnp.arange(noise.shape[1])

    def row(carry, r):
        x, sstate, dstate = carry
        s0 = start[r]
        xw = jax.lax.dynamic_slice_in_dim(x, s0, win, axis=1)
        tw = jnp.broadcast_to(jax.lax.dynamic_slice_in_dim(tmat[r], s0, win), (b, win))
        vw, dstate = guided_velocity(den, guided, params, dstate, xw, tw, context, negative, guidance)
        v = jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(x), vw.astype(x.dtype), s0, axis=1)
        inside = (frames >= s0) & (frames < s0 + win)
        x, sstate = solver.step(sstate, idx[r], x, v, update=upd[r] & inside)
        tick(bar_id)
        return (x, sstate, dstate), None

    state0 = (noise, solver.init(noise), init_branches(den, spec, guided))
    (x, _, dstate), _ = jax.lax.scan(row, state0, jnp.arange(tmat.shape[0], dtype=jnp.int32))
    return SampleOutput(x, dstate)


_df_jit = jax.jit(_df_impl, static_argnums=(0, 1, 2, 3))


def df_sample(model_or_den, noise: jax.Array, context: jax.Array, *, solver, ar_step: int = 0,
              causal_block_size: int | None = None, window_frames: int | None = None, prefix: jax.Array | None = None,
              guidance: float | None = None, negative_context: jax.Array | None = None, progress: bool | str = False,
              check_finite: bool = True, params=None) -> SampleOutput:
    """Denoise `noise` (B, F, H, W, C) with the diffusion-forcing schedule, in one compiled scan over its rows.

    model_or_den: a `WanTransformer` or a Denoiser over it (methods wrap it as usual). ar_step: steps each
    causal block lags the previous one (0 = synchronous). causal_block_size: frames per block (default the
    model's `num_frame_per_block`). window_frames: frames the model sees per row (default all; fewer gives
    SkyReels-V2's sliding window). prefix: clean latents (B, P, H, W, C) for the first P frames (P a multiple
    of the block), kept fixed. Other arguments as in `sample()`. The denoiser state counts one call per row
    and CFG branch.
    """
    if isinstance(model_or_den, WanTransformer):
        den = wan_denoiser(model_or_den)
    elif isinstance(model_or_den, Denoiser):
        den = model_or_den
    else:
        raise TypeError(f"df_sample needs a WanTransformer or a Denoiser, got {type(model_or_den).__name__}")
    guided, negative = check_sampler_args(den, solver, noise, guidance, context, negative_context, check_finite)
    if causal_block_size is None:
        causal_block_size = den.config.num_frame_per_block
    num_pre = 0
    if prefix is not None:
        if prefix.ndim != 5 or prefix.shape[0] != noise.shape[0] or prefix.shape[2:] != noise.shape[2:] \
                or prefix.shape[1] > noise.shape[1]:
            raise ValueError(f"prefix must be (B, P, H, W, C) latents matching noise {noise.shape} with "
                             f"P <= {noise.shape[1]}; got {prefix.shape}")
        num_pre = prefix.shape[1]
        noise = noise.at[:, :num_pre].set(prefix.astype(noise.dtype))
    (tmat, idx, upd, start), win = df_schedule(solver, noise.shape[1], ar_step=ar_step,
                                               causal_block_size=causal_block_size, window_frames=window_frames,
                                               num_pre_ready=num_pre)
    return run_sampler(_df_jit, den, solver, guided, win, den.params if params is None else params, noise, context,
                       negative, jnp.float32(guidance if guided else 1.0), tmat, idx, upd, start,
                       progress=progress, total=int(tmat.shape[0]), desc="diffusion forcing")
