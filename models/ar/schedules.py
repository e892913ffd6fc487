"""Diffusion-forcing timestep schedules (SkyReels-V2), built on the host in numpy.

`generate_timestep_matrix` equals `SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix` of
diffusers 0.42.1 (itself the SkyReels-V2 original): rows are denoising iterations, columns latent frames.
Frames are grouped into causal blocks of `causal_block_size`; block 0 (or a block whose predecessor is done)
advances one step per row, every other block trails its predecessor by `ar_step` steps, so with
ar_step > 0 the blocks are denoised in a staggered wave (asynchronous), with ar_step = 0 all at once.

Row r, frame f: `step_index[r, f]` is the position in the padded template [999, *step_template, 0]
(0 = not started, N+1 = done), `step_matrix[r, f]` the model timestep there, `update_mask[r, f]` whether the
frame takes a solver step in that row. When it does, the frame's solver step is `step_index[r, f] - 1`,
which is what `vidaccel.solvers.Solver.step(state, step_index[r] - 1, x, v, update=update_mask[r])`
expects for per-frame stepping. `valid_interval[r]` = [start, end) frames the model sees in that row.

Deviations from diffusers (each a clear ValueError where diffusers accepts the input silently or fails
with an unrelated error): frames or prefix not a multiple of the block size (diffusers drops the trailing
frames / treats a partial prefix block as noise), negative ar_step or num_pre_ready, and
`shrink_interval_with_mask=True` (broken in diffusers and the original: it replaces the list of per-row
masks by the first row, then fails or returns a 1-D mask).
"""

from __future__ import annotations

import math

import numpy as np

from vidaccel.checks import bool_arg, int_arg

__all__ = ["generate_timestep_matrix"]


def generate_timestep_matrix(
    num_latent_frames: int,
    step_template,
    base_num_latent_frames: int,
    ar_step: int = 5,
    num_pre_ready: int = 0,
    causal_block_size: int = 1,
    shrink_interval_with_mask: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """The diffusion-forcing schedule: (step_matrix, step_index, update_mask, valid_interval).

    num_latent_frames: frames to generate (a multiple of causal_block_size).
    step_template: (N,) the solver's model timesteps, e.g. `unipc(N, shift).timesteps`; cast to int64 by
        truncation as diffusers' `.long()` does.
    base_num_latent_frames: frames the model processes per forward; fewer than num_latent_frames gives a
        sliding window and then requires ar_step >= N / (base_num_latent_frames // causal_block_size).
    ar_step: steps each block lags its predecessor (0 = synchronous). num_pre_ready: leading frames that
        are already clean (a prefix; a multiple of causal_block_size); they are never updated.
    Returns step_matrix (R, F) int64 timesteps, step_index (R, F) int64, update_mask (R, F) bool, and
    valid_interval, a list of R (start, end) frame ranges.
    """
    F = int_arg("num_latent_frames", num_latent_frames, 1)
    base = int_arg("base_num_latent_frames", base_num_latent_frames, 1)
    ar_step = int_arg("ar_step", ar_step, 0)
    num_pre_ready = int_arg("num_pre_ready", num_pre_ready, 0)
    cbs = int_arg("causal_block_size", causal_block_size, 1)
    if bool_arg("shrink_interval_with_mask", shrink_interval_with_mask):
        raise ValueError("shrink_interval_with_mask=True is not supported: in diffusers 0.42.1 (and the SkyReels-V2 "
                         "original) it replaces the per-row update masks by the first row and then fails or "
                         "returns a malformed mask")
    template = np.asarray(step_template)
    if template.ndim != 1 or template.shape[0] == 0:
        raise ValueError(f"step_template must be a non-empty 1-D array of timesteps, got shape {template.shape}")
    if not (np.issubdtype(template.dtype, np.integer) or np.issubdtype(template.dtype, np.floating)):
        raise TypeError(f"step_template must hold real numbers, got dtype {template.dtype}")
    if not np.all(np.isfinite(template)):
        raise ValueError(f"step_template must be finite, got {template}")
    if F % cbs:
        raise ValueError(f"num_latent_frames={F} must be a multiple of causal_block_size={cbs} "
                         f"(diffusers would leave the last {F % cbs} frame(s) undenoised)")
    if num_pre_ready % cbs:
        raise ValueError(f"num_pre_ready={num_pre_ready} must be a multiple of causal_block_size={cbs}")
    if num_pre_ready >= F:
        raise ValueError(f"num_pre_ready={num_pre_ready} leaves no frame to denoise out of num_latent_frames={F}")

    n = template.shape[0]
    num_iterations = n + 1
    num_blocks, base_blocks = F // cbs, base // cbs
    if base_blocks < num_blocks:
        if base_blocks == 0:
            raise ValueError(f"base_num_latent_frames={base} is smaller than causal_block_size={cbs}: the model "
                             "window holds no block")
        min_ar_step = n / base_blocks
        if ar_step < min_ar_step:
            raise ValueError(f"ar_step={ar_step} is too small: a {base_blocks}-block window over {num_blocks} blocks "
                             f"with {n} steps needs ar_step >= {math.ceil(min_ar_step)}")

    padded = np.concatenate([[999], template.astype(np.int64), [0]]).astype(np.int64)
    pre_row = np.zeros(num_blocks, np.int64)
    pre_row[: num_pre_ready // cbs] = num_iterations
    step_index, update_mask = [], []
    while not np.all(pre_row >= num_iterations - 1):
        new_row = np.zeros(num_blocks, np.int64)
        for i in range(num_blocks):
            if i == 0 or pre_row[i - 1] >= num_iterations - 1:
                new_row[i] = pre_row[i] + 1
            else:
                new_row[i] = new_row[i - 1] - ar_step  # lag the (unclamped) predecessor
        new_row = np.clip(new_row, 0, num_iterations)
        update_mask.append((new_row != pre_row) & (new_row != num_iterations))
        step_index.append(new_row)
        pre_row = new_row

    valid_interval = []
    terminal = base_blocks
    for mask in update_mask:
        if terminal < num_blocks and mask[terminal]:
            terminal += 1
        valid_interval.append((max(terminal - base_blocks, 0) * cbs, terminal * cbs))

    step_index = np.repeat(np.stack(step_index), cbs, axis=1)
    update_mask = np.repeat(np.stack(update_mask), cbs, axis=1)
    return padded[step_index], step_index, update_mask, valid_interval
