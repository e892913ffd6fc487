"""Diffusion-forcing sampling over the SkyReels-V2 timestep matrix, compiled as one scan (windows x rows).

    out = df_sample(model, noise, context, solver=unipc(50, shift=8.0), ar_step=5, causal_block_size=5,
                    guidance=6.0, negative_context=neg)                                  # one window, vanilla
    out = df_sample(model, noise, context, solver=..., ar_step=5, window_frames=25, overlap_frames=5,
                    addnoise_condition=20, noise_key=key, execution="chunks")            # long video, per chunk

Row r of `generate_timestep_matrix` gives every latent frame its own model timestep; the model runs on the
row's frames with per-frame `t`, and every frame whose `update_mask` is set takes its own solver step
(`Solver.step` with one step index per frame: one scheduler per frame, as in the pipeline). With
`ar_step = 0` all blocks share each step (synchronous); with `ar_step > 0` block b trails block b-1 by
`ar_step` steps (asynchronous): steps + (blocks - 1) * ar_step rows per window.

Execution (`execution`):
- "window" (SkyReels-V2's vanilla execution): every row runs the model once on the row's whole window of
  frames (`valid_interval[r]`, window-local RoPE positions), finished (t = 0) and waiting (t = 999) blocks
  included. A method wrapping the denoiser takes one decision per row (TeaCache).
- "chunks" (FlowCache-SkyReels' execution, `models.ar.window.df_chunk_denoiser`): every updating chunk of
  the row is forwarded on its own, in chunk order, block-causally against a per-window K/V buffer that
  skipped chunks leave stale; finished and waiting chunks are not forwarded; the prefix chunks are
  forwarded once per window (first row) to write their K/V. Each chunk slot of the window has its own
  denoiser state (per CFG branch), so a wrapping method keeps one accumulator, residual and step count
  per (chunk, branch), its count advancing only on the rows that update the chunk.
In both, the denoiser's `DFState` receives the row's update mask for the frames it sees before each call.

Long videos (`overlap_frames`): the video is generated as windows of `window_frames` latent frames, each
starting with the last `overlap_frames` latents of the previous one as a clean prefix (never updated), as
`SkyReelsV2DiffusionForcingPipeline` does with `overlap_history` (in latent frames here; the pipeline
passes its latents on directly instead of re-encoding decoded frames). `addnoise_condition` = a re-noises
the prefix in the model input only, x <- (1 - a/1000) x + (a/1000) eps with a fresh eps per row, and gives
its frames the timestep a (the pipeline's `addnoise_condition`); eps comes from `noise_key` or, to
replay a recorded run, `prefix_noise`. All windows run in one `lax.scan` (schedules padded to the longest
window's rows; padded rows call nothing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.ar.compression import WindowCompressor, compress_window, plan_window_compression
from models.ar.schedules import generate_timestep_matrix
from models.ar.window import DFState, df_chunk_denoiser, df_state_of, df_window_denoiser, has_df_state, init_window_kv
from models.wan.transformer import WanTransformer
from vidaccel.attention import dense_attention
from vidaccel.checks import choice_arg, float_arg, int_arg, optional_int_arg
from vidaccel.parallel import as_mesh, batch_sharding, compile_on_mesh, heads_wrap, placement
from vidaccel.sampling import SampleOutput, check_sampler_args, guided_velocity, init_branches, run_sampler, tick
from vidaccel.transforms import CFGBranches, Denoiser, DenoiseSpec, Work, branch_states, replace_state

EXECUTIONS = ("window", "chunks")


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


def _map_branches(fn, state, *others):
    if isinstance(state, CFGBranches):
        return CFGBranches(fn(state.cond, *(o.cond for o in others)), fn(state.uncond, *(o.uncond for o in others)))
    return fn(state, *others)


def _set_row(state, update, chunk, slot=None):
    """Tell the denoiser's DFState (each CFG branch) the row's update mask, the chunk it forwards and where
    that chunk's K/V live in the window buffer."""
    def one(s):
        if not has_df_state(s):
            return s
        return replace_state(s, DFState, lambda d: d.replace(update=update, chunk=jnp.asarray(chunk, jnp.int32),
                                                              slot=slot))
    return _map_branches(one, state)


def _df_impl(den: Denoiser, solver, guided: bool, execution: str, geom: tuple, addnoise: float, renoise_mode: str,
             compressor, params, x_full, context, negative, guidance, tmat, idx, upd, start, rows, pre, renoise, plan,
             bar_id):
    win, fw, stride, cbs, pmax, total_rows = geom
    b = x_full.shape[0]
    lat = x_full.shape[2:]
    num_windows = tmat.shape[0]
    frames = jnp.arange(fw)
    factor = 0.001 * addnoise
    chunked = execution == "chunks"

    def draw(k, r):
        """The row's re-noising draw for the prefix frames, (B, P, H, W, C) padded to `win` frames."""
        if renoise_mode == "table":
            eps = renoise[k, r]
        else:
            eps = jax.random.normal(jax.random.fold_in(jax.random.fold_in(renoise, k), r), (b, pmax, *lat),
                                    x_full.dtype)
        if pmax < win:
            eps = jnp.pad(eps, [(0, 0), (0, win - pmax)] + [(0, 0)] * len(lat))
        return eps[:, :win]

    def model_input(xw, k, r, s0):
        xin = jax.lax.dynamic_slice_in_dim(xw, s0, win, axis=1)
        tw = jnp.broadcast_to(jax.lax.dynamic_slice_in_dim(tmat[k, r], s0, win), (b, win))
        if addnoise > 0:
            pm = (s0 + jnp.arange(win)) < pre[k]
            noisy = xin * (1.0 - factor) + draw(k, r).astype(xin.dtype) * factor
            xin = jnp.where(pm[None, :, None, None, None], noisy, xin)
            tw = jnp.where(pm[None], jnp.float32(addnoise), tw)
        return xin, tw

    if chunked:
        g_count = fw // cbs
        spec = DenoiseSpec(jax.ShapeDtypeStruct((b, cbs, *lat), x_full.dtype),
                           jax.ShapeDtypeStruct(context.shape, context.dtype), solver.num_steps, g_count)
        one = init_branches(den, spec, guided)
        stacked0 = jax.tree.map(lambda a: jnp.broadcast_to(a, (g_count, *a.shape)), one)
        pt, ph, pw = den.config.patch_size
        tpf = (lat[0] // ph) * (lat[1] // pw)
        n_tok = (cbs // pt) * tpf
        if compressor is None:
            kv_one = init_window_kv(den, b, n_tok * g_count, tpf)
        else:
            kv_one = init_window_kv(den, b, n_tok * compressor.cache_chunks, tpf, chunk_tokens=n_tok, empty=True)
        kv0 = CFGBranches(kv_one, kv_one) if guided else kv_one
    else:       # one state for the whole run: its calls are every row of every window
        spec = DenoiseSpec(jax.ShapeDtypeStruct((b, win, *lat), x_full.dtype),
                           jax.ShapeDtypeStruct(context.shape, context.dtype), total_rows)

    def window_rows(xw, k, carry_den):
        sstate = solver.init(xw)

        def row(carry, r):
            xw, ss, ds = carry
            active = r < rows[k]
            s0 = start[k, r]
            xin, tw = model_input(xw, k, r, s0)
            updw = upd[k, r]
            if not chunked:
                ds = _set_row(ds, jax.lax.dynamic_slice_in_dim(updw, s0, win), 0)

                def call(ds):
                    v, ds = guided_velocity(den, guided, params, ds, xin, tw, context, negative, guidance)
                    tick(bar_id)
                    return v.astype(xw.dtype), ds

                vw, ds = jax.lax.cond(active, call, lambda ds: (jnp.zeros_like(xin), ds), ds)
                v = jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(xw), vw, s0, axis=1)
                inside = (frames >= s0) & (frames < s0 + win)
                mask = updw & inside & active
            else:
                stacked, kv = ds

                def per_chunk(c, g):
                    first = g * cbs
                    do = active & (updw[first] | ((first < pre[k]) & (r == 0)))

                    def forward(c):
                        stacked, kv, vw = c
                        st = jax.tree.map(lambda a: a[g], stacked)
                        slot = g * n_tok if compressor is None else plan["slot"][k, r, g]
                        st = _set_row(st, jax.lax.dynamic_slice_in_dim(updw, first, cbs), g, slot)
                        st = _map_branches(lambda s, kvb: replace_state(s, DFState, lambda d: d.replace(kv=kvb)),
                                           st, kv)
                        xg = jax.lax.dynamic_slice_in_dim(xin, first, cbs, axis=1)
                        tg = jax.lax.dynamic_slice_in_dim(tw, first, cbs, axis=1)
                        v, st = guided_velocity(den, guided, params, st, xg, tg, context, negative, guidance)
                        kv = _map_branches(lambda s: df_state_of(s).kv, st)
                        st = _map_branches(lambda s: replace_state(s, DFState, lambda d: d.replace(kv=None, slot=None)),
                                           st)
                        stacked = jax.tree.map(lambda a, s: a.at[g].set(s), stacked, st)
                        vw = jax.lax.dynamic_update_slice_in_dim(vw, v.astype(vw.dtype), first, axis=1)
                        return stacked, kv, vw

                    return jax.lax.cond(do, forward, lambda c: c, c), None

                (stacked, kv, v), _ = jax.lax.scan(per_chunk, (stacked, kv, jnp.zeros_like(xw)),
                                                   jnp.arange(g_count, dtype=jnp.int32))
                if compressor is not None:
                    def squeeze(kv):
                        return _map_branches(lambda w: w.replace(**dict(zip(("k", "v", "frames"), compress_window(
                            w.k, w.v, w.frames, w.queries, plan["keep"][k, r], plan["clean_end"][k, r],
                            plan["used"][k, r], compressor, tpf), strict=True))), kv)
                    kv = jax.lax.cond(active & plan["compress"][k, r], squeeze, lambda kv: kv, kv)
                ds = (stacked, kv)
                mask = updw & active
                jax.lax.cond(active, lambda: tick(bar_id), lambda: None)
            xw, ss = solver.step(ss, idx[k, r], xw, v, update=mask)
            return (xw, ss, ds), None

        (xw, _, carry_den), _ = jax.lax.scan(row, (xw, sstate, carry_den),
                                             jnp.arange(tmat.shape[1], dtype=jnp.int32))
        return xw, carry_den

    def window(carry, k):
        x_full, ds = carry
        xw = jax.lax.dynamic_slice_in_dim(x_full, k * stride, fw, axis=1)
        if chunked:
            xw, (stacked, _) = window_rows(xw, k, (stacked0, kv0))
            out = stacked
        else:
            xw, ds = window_rows(xw, k, ds)
            out = None
        x_full = jax.lax.dynamic_update_slice_in_dim(x_full, xw, k * stride, axis=1)
        return (x_full, ds), out

    ds0 = None if chunked else init_branches(den, spec, guided)
    (x_full, ds), per_window = jax.lax.scan(window, (x_full, ds0), jnp.arange(num_windows, dtype=jnp.int32))
    return SampleOutput(x_full, per_window if chunked else ds)


_df_jit = jax.jit(_df_impl, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7))


def _as_denoiser(model_or_den, execution: str, window_frames: int, wrap_attention=None) -> Denoiser:
    if isinstance(model_or_den, WanTransformer):
        if execution == "chunks":
            return df_chunk_denoiser(model_or_den, window_frames, wrap_attention=wrap_attention)
        attention = None if wrap_attention is None else wrap_attention(dense_attention)
        return df_window_denoiser(model_or_den, attention=attention)
    if not isinstance(model_or_den, Denoiser):
        raise TypeError(f"df_sample needs a WanTransformer or a Denoiser, got {type(model_or_den).__name__}")
    if execution == "chunks" and model_or_den.commit is None:
        raise ValueError("execution='chunks' needs a per-chunk denoiser (models.ar.window.df_chunk_denoiser, "
                         f"possibly wrapped by a per-chunk method); {model_or_den.name!r} is not one")
    return model_or_den


def df_sample(model_or_den, noise: jax.Array, context: jax.Array, *, solver, ar_step: int = 0,
              causal_block_size: int | None = None, window_frames: int | None = None, prefix: jax.Array | None = None,
              overlap_frames: int | None = None, addnoise_condition: float = 0.0, noise_key: jax.Array | None = None,
              prefix_noise: jax.Array | None = None, execution: str = "window",
              kv_compression: WindowCompressor | None = None, guidance: float | None = None,
              negative_context: jax.Array | None = None, progress: bool | str = False, check_finite: bool = True,
              params=None, mesh=None, axis: str = "seq") -> SampleOutput:
    """Denoise `noise` (B, F, H, W, C) with the diffusion-forcing schedule, in one compiled scan.

    model_or_den: a `WanTransformer`, or a Denoiser over one (methods wrap it as usual): for "window" any
    staged denoiser (`df_window_denoiser(model)` is what a model becomes; `wan_denoiser` works too but
    does not see the update mask), for "chunks" a `df_chunk_denoiser(model, window_frames)` (possibly
    wrapped by a per-chunk method: FlowCache, MotionCache).
    ar_step: steps each causal block lags the previous one (0 = synchronous). causal_block_size: frames per
    block (default the model's `num_frame_per_block`; "chunks" needs exactly that). window_frames: without
    `overlap_frames`, the frames the model sees per row (default all; fewer gives SkyReels-V2's sliding
    window inside one schedule); with `overlap_frames`, the length of each window of a long video.
    prefix: clean latents (B, P, H, W, C) for the first P frames (P a multiple of the block), kept fixed.
    overlap_frames: chain windows of `window_frames`, each window's first `overlap_frames` frames being the
    previous window's last ones (a multiple of the block, below window_frames); F must be
    window_frames + k (window_frames - overlap_frames). addnoise_condition: re-noise the prefix in the model
    input (0 = off; the pipeline recommends 20) with draws from `noise_key` (a PRNG key) or `prefix_noise`
    (W, rows, B, P, H, W, C): the draw of row r of window w, as the pipeline's `randn_like` calls).
    execution: "window" or "chunks" (see the module docstring). kv_compression ("chunks" only): a
    `models.ar.compression.WindowCompressor` (e.g. `experiments.flowcache.kv_compression(T)`): the window
    buffer then holds `T` chunks, clean history and chunks in flight together (MAGI-1's count), chunks are
    placed as they enter, and MAGI-1's trigger compresses the clean history by one chunk, scored with the
    last forwarded chunk's queries (`plan_window_compression`, `compress_window`). Other arguments as in
    `sample()`.
    mesh: a (data, fsdp, seq) `Mesh` or spec string: the scan compiled with in/out shardings (params as placed
    by `shard_params`, latents and contexts split by batch where it divides); a model given as such gets its
    self-attention split by heads over `axis` ("chunks": the window K/V buffer too). A denoiser is taken as
    it is, e.g. `df_chunk_denoiser(model, frames, wrap_attention=heads_wrap(mesh, heads))` wrapped by a
    method, or `parallel_wan_denoiser` for "window". Equal to one device up to float summation order.

    Returns `SampleOutput(latents (B, F, ...), state)`. "window": the denoiser state (per CFG branch), one
    call per active row and branch. "chunks": the per-chunk states of every window, stacked with leading
    axes (windows, chunks) (per CFG branch); `df_work(out.state)` sums their counters.
    """
    mesh = None if mesh is None else as_mesh(mesh)
    wrap = None
    if mesh is not None and isinstance(model_or_den, WanTransformer):
        wrap = heads_wrap(mesh, model_or_den.cfg.num_attention_heads, axis=axis)
    static, dynamic, total = _df_prepare(
        model_or_den, noise, context, solver=solver, ar_step=ar_step, causal_block_size=causal_block_size,
        window_frames=window_frames, prefix=prefix, overlap_frames=overlap_frames,
        addnoise_condition=addnoise_condition, noise_key=noise_key, prefix_noise=prefix_noise, execution=execution,
        kv_compression=kv_compression, guidance=guidance, negative_context=negative_context,
        check_finite=check_finite, params=params, wrap_attention=wrap)
    if mesh is None:
        return run_sampler(_df_jit, *static, *dynamic, progress=progress, total=total, desc="diffusion forcing")
    batch, repl = batch_sharding(mesh, noise.shape[0]), NamedSharding(mesh, P())
    rest = (batch, batch, batch, repl) + (None,) * (len(dynamic) - 5 + 1)       # schedules and the bar id
    dynamic = (dynamic[0], *jax.device_put(dynamic[1:4], batch), *dynamic[4:])  # inputs from any placement
    fn = compile_on_mesh(_df_impl, static, placement(dynamic[0], mesh), rest, SampleOutput(batch, None))
    with jax.set_mesh(mesh):
        return run_sampler(fn, *dynamic, progress=progress, total=total, desc="diffusion forcing")


def _df_prepare(model_or_den, noise: jax.Array, context: jax.Array, *, solver, ar_step: int = 0,
               causal_block_size: int | None = None, window_frames: int | None = None,
               prefix: jax.Array | None = None, overlap_frames: int | None = None, addnoise_condition: float = 0.0,
               noise_key: jax.Array | None = None, prefix_noise: jax.Array | None = None, execution: str = "window",
               kv_compression: WindowCompressor | None = None, guidance: float | None = None,
               negative_context: jax.Array | None = None, check_finite: bool = True, params=None,
               wrap_attention=None):
    """`df_sample`'s checks and schedules: (static args, dynamic args, rows) of the compiled `_df_impl`, on one
    device or on a mesh.
    wrap_attention: for a model given as such, applied to its self-attention (see `df_window_denoiser`,
    `df_chunk_denoiser`)."""
    execution = choice_arg("execution", execution, EXECUTIONS)
    if getattr(noise, "ndim", None) != 5:
        raise ValueError(f"noise must be channels-last latents (B, F, H, W, C); got shape {jnp.shape(noise)}")
    f_total = noise.shape[1]
    optional_int_arg("window_frames", window_frames, 1)
    optional_int_arg("overlap_frames", overlap_frames, 1)
    addnoise = float_arg("addnoise_condition", addnoise_condition, low=0.0, high=1000.0)
    fw = f_total if overlap_frames is None else window_frames
    if overlap_frames is not None and window_frames is None:
        raise ValueError("overlap_frames needs window_frames (the length of each window)")
    den = _as_denoiser(model_or_den, execution, fw, wrap_attention)
    guided, negative = check_sampler_args(den, solver, noise, guidance, context, negative_context, check_finite)
    cfg = den.config
    if causal_block_size is None:
        causal_block_size = cfg.num_frame_per_block
    cbs = int_arg("causal_block_size", causal_block_size, 1)
    if execution == "chunks":
        fpc = cfg.num_frame_per_block * cfg.patch_size[0]
        if cbs != fpc:
            raise ValueError(f"execution='chunks' forwards the model's blocks: causal_block_size must be {fpc} "
                             f"(num_frame_per_block x temporal patch), got {cbs}")
        if overlap_frames is None and window_frames not in (None, f_total):
            raise ValueError("execution='chunks' runs whole windows (one K/V buffer each); for a long video use "
                             "window_frames with overlap_frames instead of a sliding window")
    num_pre = 0
    if prefix is not None:
        if prefix.ndim != 5 or prefix.shape[0] != noise.shape[0] or prefix.shape[2:] != noise.shape[2:] \
                or prefix.shape[1] > fw:
            raise ValueError(f"prefix must be (B, P, H, W, C) latents matching noise {noise.shape} with "
                             f"P <= {fw} (the first window); got {prefix.shape}")
        num_pre = prefix.shape[1]
        noise = noise.at[:, :num_pre].set(prefix.astype(noise.dtype))
    if overlap_frames is None:
        windows, stride, base, pres = 1, 0, window_frames, [num_pre]
    else:
        if overlap_frames % cbs or overlap_frames >= fw:
            raise ValueError(f"overlap_frames={overlap_frames} must be a multiple of causal_block_size={cbs} and "
                             f"below window_frames={fw}")
        stride = fw - overlap_frames
        if f_total < fw or (f_total - fw) % stride:
            raise ValueError(f"noise has {f_total} latent frames; windows of {fw} overlapping by {overlap_frames} "
                             f"cover {fw} + k * {stride} frames (k = 0, 1, ...)")
        windows, base = 1 + (f_total - fw) // stride, fw
        pres = [num_pre] + [overlap_frames] * ((f_total - fw) // stride)
    scheds, win = {}, None
    for p in sorted(set(pres)):
        scheds[p], w = df_schedule(solver, fw, ar_step=ar_step, causal_block_size=cbs, window_frames=base,
                                   num_pre_ready=p)
        if win is not None and w != win:
            raise ValueError("the windows' schedules see different frame counts")
        win = w
    r_max = max(s[0].shape[0] for s in scheds.values())

    def padded(a, fill):
        return jnp.concatenate([a, jnp.full((r_max - a.shape[0], *a.shape[1:]), fill, a.dtype)])

    tmat, idx, upd, start = (jnp.stack([padded(scheds[p][i], 0) for p in pres]) for i in range(4))
    rows = jnp.asarray([scheds[p][0].shape[0] for p in pres], jnp.int32)
    total_rows = int(sum(scheds[p][0].shape[0] for p in pres))
    pmax = max(pres)
    renoise_mode, renoise = "none", jnp.zeros(())
    if addnoise > 0 and pmax > 0:
        if (noise_key is None) == (prefix_noise is None):
            raise ValueError("addnoise_condition > 0 re-noises the prefix: pass exactly one of noise_key (a PRNG "
                             "key) and prefix_noise (recorded draws)")
        if noise_key is not None:
            renoise_mode, renoise = "key", noise_key
        else:
            want = (windows, None, noise.shape[0], pmax, *noise.shape[2:])
            pn = jnp.asarray(prefix_noise)
            if pn.ndim != 7 or pn.shape[0] != windows or pn.shape[2:] != want[2:]:
                raise ValueError(f"prefix_noise must be (windows={windows}, rows, B, P={pmax}, H, W, C) = "
                                 f"{want}; got {pn.shape}")
            need = max(int(r) for r, p in zip(rows.tolist(), pres, strict=True) if p > 0)
            if pn.shape[1] < need:
                raise ValueError(f"prefix_noise has draws for {pn.shape[1]} rows; the windows run up to {need}")
            pn = pn[:, :r_max]
            pn = jnp.pad(pn, [(0, 0), (0, r_max - pn.shape[1])] + [(0, 0)] * 5)
            renoise_mode, renoise = "table", pn.astype(noise.dtype)
    elif addnoise > 0:
        addnoise = 0.0          # nothing to re-noise: no prefix in any window
    plan = None
    if kv_compression is not None:
        if execution != "chunks":
            raise ValueError("kv_compression compresses the per-chunk K/V buffer; it needs execution='chunks'")
        if not isinstance(kv_compression, WindowCompressor):
            raise ValueError(f"kv_compression={kv_compression!r} is not a models.ar.compression.WindowCompressor "
                             "(e.g. experiments.flowcache.kv_compression())")
        int_arg("kv_compression.cache_chunks", kv_compression.cache_chunks, 2)
        pt, ph, pw = cfg.patch_size
        n_tok = (cbs // pt) * (noise.shape[2] // ph) * (noise.shape[3] // pw)
        plans = {p: plan_window_compression(np.asarray(scheds[p][2]), p // cbs, cbs, n_tok,
                                            kv_compression.cache_chunks) for p in scheds}
        plan = {key: jnp.stack([padded(jnp.asarray(plans[p][key]), 0) for p in pres]) for key in plans[pres[0]]}
    geom = (win, fw, stride, cbs, pmax, total_rows)
    static = (den, solver, guided, execution, geom, addnoise, renoise_mode, kv_compression)
    dynamic = (den.params if params is None else params, noise, context, negative,
               jnp.float32(guidance if guided else 1.0), tmat, idx, upd, start, rows, jnp.asarray(pres, jnp.int32),
               renoise, plan)
    return static, dynamic, total_rows


def df_work(state) -> dict[str, int]:
    """Work counters of a `df_sample` output state summed over CFG branches, and for execution="chunks"
    over windows and chunk slots: calls, block passes, token-layers, and attention query-key pairs."""
    out = {"calls": 0, "block_passes": 0, "token_layers": 0, "attn_pairs": 0.0}
    for s in branch_states(state):
        d = df_state_of(s) if has_df_state(s) else None
        work = d.work if d is not None else _work(s)
        for f in ("calls", "block_passes", "token_layers"):
            out[f] += int(np.asarray(getattr(work, f)).sum())
        if d is not None:
            out["attn_pairs"] += float(np.asarray(d.attn_pairs).sum())
    return out


def _work(state) -> Work:
    while not hasattr(state, "work") and hasattr(state, "inner"):
        state = state.inner
    return state.work


__all__ = ["EXECUTIONS", "df_schedule", "df_sample", "df_work"]
