"""The caches in diffusion forcing's own execution model (asynchronous df_sample): the row's update mask
reaches the denoiser; per-chunk forwarding equals the whole-window block-causal forward when every chunk is
forwarded; TeaCache (one decision per row over the window), FlowCache (both variants, one state per chunk)
and MotionCache at threshold 0 equal their vanilla execution exactly; decision counters equal a count
taken by a plain Python loop over the schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from experiments.flowcache import (
    DF_METHODS,
    df_method,
    df_run,
    flowcache,
    flowcache_config,
    flowcache_magi_config,
    kv_compression,
)
from experiments.motioncache import MotionCacheConfig, motioncache
from experiments.teacache import teacache, teacache_config
from models.ar.compression import compress_window, plan_window_compression
from models.ar.diffusion_forcing import df_sample, df_schedule, df_work
from models.ar.schedules import generate_timestep_matrix
from models.ar.window import df_chunk_denoiser, df_state_of, df_window_denoiser, init_window_kv
from models.wan import init_transformer, wan_tiny
from vidaccel.residual_cache import relative_change
from vidaccel.solvers import unipc
from vidaccel.transforms import Denoiser, DenoiseSpec, wrap_denoiser

FPB, FRAMES, STEPS, AR = 2, 6, 4, 2          # 3 chunks of 2 latents, 4 + 2 * 2 = 8 rows


@pytest.fixture(scope="module")
def setup():
    m = init_transformer(wan_tiny(num_frame_per_block=FPB, num_layers=1), seed=5)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(7), m.proj_out.kernel.shape) * 0.3)
    k = jax.random.split(jax.random.key(3), 2)
    return m, jax.random.normal(k[0], (1, FRAMES, 4, 4, 4)), jax.random.normal(k[1], (1, 3, 16)), unipc(STEPS, 3.0)


@pytest.fixture(scope="module")
def vanilla(setup):
    """The asynchronous vanilla runs every cache is compared with: whole window and per chunk."""
    m, noise, ctx, solver = setup
    chunks = df_chunk_denoiser(m, FRAMES)
    return (df_sample(m, noise, ctx, solver=solver, ar_step=AR),
            chunks, df_sample(chunks, noise, ctx, solver=solver, ar_step=AR, execution="chunks"))


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@struct.dataclass
class MaskProbe:
    inner: object
    seen: jax.Array          # (rows, F) the update mask the denoiser was given at each of its calls
    count: jax.Array


def mask_probe(den: Denoiser, rows: int) -> Denoiser:
    def init(spec):
        return MaskProbe(den.init(spec), jnp.zeros((rows, spec.latents.shape[1]), bool), jnp.zeros((), jnp.int32))

    def apply(params, state, x, t, context):
        v, inner = den.apply(params, state.inner, x, t, context)
        seen = state.seen.at[state.count].set(df_state_of(inner).update)
        return v, MaskProbe(inner, seen, state.count + 1)

    return wrap_denoiser(den, init=init, apply=apply, name="mask_probe", stages=den.stages)


def test_the_update_mask_reaches_the_denoiser(setup):
    m, noise, ctx, solver = setup
    (_, _, upd, _), _ = df_schedule(solver, FRAMES, ar_step=AR, causal_block_size=FPB)
    out = df_sample(mask_probe(df_window_denoiser(m), upd.shape[0]), noise, ctx, solver=solver, ar_step=AR)
    np.testing.assert_array_equal(np.asarray(out.state.seen), np.asarray(upd))


def test_per_chunk_forward_equals_the_whole_window_block_causal_forward(setup):
    """One row with three different per-chunk timesteps: forwarding the chunks in order against the window
    K/V buffer gives the whole-window block-causal forward (fp32)."""
    m, noise, ctx, _ = setup
    t = jnp.asarray([[900.0, 900.0, 500.0, 500.0, 40.0, 40.0]])
    ref = m(noise, t, ctx)
    den = df_chunk_denoiser(m, FRAMES)
    kv = init_window_kv(m, 1, 3 * 8, 4)
    apply = jax.jit(den.apply)
    spec = DenoiseSpec(jax.ShapeDtypeStruct((1, FPB, 4, 4, 4), jnp.float32), jax.ShapeDtypeStruct(ctx.shape, ctx.dtype),
                       STEPS)
    outs = []
    for g in range(3):
        st = den.init(spec).replace(kv=kv, chunk=jnp.int32(g))
        v, st = apply(den.params, st, noise[:, 2 * g:2 * g + 2], t[:, 2 * g:2 * g + 2], ctx)
        kv = st.kv
        outs.append(v)
    assert rel(jnp.concatenate(outs, axis=1), ref) <= 1e-5


def test_chunks_equal_window_when_every_chunk_updates(setup):
    """ar_step 0: every chunk updates in every row, nothing is skipped: per-chunk execution = vanilla."""
    m, noise, ctx, solver = setup
    a = df_sample(m, noise, ctx, solver=solver, ar_step=0)
    b = df_sample(m, noise, ctx, solver=solver, ar_step=0, execution="chunks")
    assert rel(b.latents, a.latents) <= 1e-5
    assert df_work(a.state)["calls"] == STEPS and df_work(b.state)["calls"] == 3 * STEPS
    assert df_work(a.state)["token_layers"] == df_work(b.state)["token_layers"]


def _py_rule(changes, thresh, coeffs, warmup, last):
    """The accumulated-change rule as a plain Python loop: which calls compute."""
    acc, out = 0.0, []
    for i, d in enumerate(changes):
        delta = float(np.polyval(coeffs, d)) if coeffs is not None else float(d)
        forced = i < warmup or thresh == 0 or (last is not None and i >= last)
        compute = forced or acc + delta >= thresh
        acc = 0.0 if compute else acc + delta
        out.append(compute)
    return out


def _e0(m, t):
    return np.asarray(jax.jit(lambda t: m.embed(jnp.zeros((1, t.shape[1], 4, 4, 4)), t, jnp.zeros((1, 3, 16))).e0)(t))


def test_teacache_one_decision_per_row(setup, vanilla):
    """TeaCache over the whole window: at 0 it is vanilla exactly; at a positive threshold the computed rows
    are the Python rule on the window's per-frame e0 changes (one decision per row)."""
    m, noise, ctx, solver = setup
    van = vanilla[0]
    zero = df_sample(teacache(df_window_denoiser(m), teacache_config(0.0, None, use_ret_steps=False)), noise, ctx,
                     solver=solver, ar_step=AR)
    np.testing.assert_array_equal(np.asarray(zero.latents), np.asarray(van.latents))
    rows = 8
    assert int(zero.state.computed) == rows
    tmat, *_ = generate_timestep_matrix(FRAMES, solver.timesteps, FRAMES, AR, 0, FPB)
    e0 = [_e0(m, jnp.asarray(r[None], jnp.float32)) for r in tmat]
    changes = [float(relative_change(jnp.asarray(e0[i]), jnp.asarray(e0[i - 1] if i else np.zeros_like(e0[0]))))
               for i in range(rows)]
    thresh = float(np.sort(changes[1:])[3]) * 1.5
    cfg = teacache_config(thresh, None, use_ret_steps=True)
    out = df_sample(teacache(df_window_denoiser(m), cfg), noise, ctx, solver=solver, ar_step=AR)
    want = _py_rule(changes, thresh, None, cfg.warmup, None)
    assert int(out.state.computed) == sum(want)
    assert df_work(out.state)["block_passes"] == sum(want) and df_work(out.state)["calls"] == rows


@pytest.mark.parametrize("variant", ["skyreels", "magi"])
def test_flowcache_threshold_zero_is_per_chunk_vanilla(setup, vanilla, variant):
    m, noise, ctx, solver = setup
    _, base, van = vanilla
    cfg = flowcache_config(0.0) if variant == "skyreels" else flowcache_magi_config(0.0)
    out = df_sample(flowcache(base, cfg, solver=solver), noise, ctx, solver=solver, ar_step=AR, execution="chunks")
    np.testing.assert_array_equal(np.asarray(out.latents), np.asarray(van.latents))
    assert np.asarray(out.state.computed).tolist() == [[STEPS] * 3]     # (windows, chunks): every update computed
    assert df_work(out.state) == df_work(van.state)


def test_flowcache_counters_equal_a_python_count(setup):
    """Per (chunk, branch) state: each chunk's calls are its own steps t_0..t_N-1, so its decisions are the
    Python rule over the e0 changes between consecutive solver timesteps; under CFG both branches agree."""
    m, noise, ctx, solver = setup
    ts = np.asarray(solver.timesteps, np.float32)
    e0 = [_e0(m, jnp.full((1, FPB), t, jnp.float32)) for t in ts]
    changes = [float(relative_change(jnp.asarray(e0[i]), jnp.asarray(e0[i - 1] if i else np.zeros_like(e0[0]))))
               for i in range(STEPS)]
    thresh = float(max(changes[1:])) * 1.5
    cfg = flowcache_config(thresh, coefficients=None, warmup=1)
    out = df_sample(flowcache(df_chunk_denoiser(m, FRAMES), cfg), noise, ctx, solver=solver, ar_step=AR,
                    execution="chunks", guidance=3.0, negative_context=jnp.zeros_like(ctx))
    want = sum(_py_rule(changes, thresh, None, 1, STEPS - 1))
    assert want < STEPS
    for branch in (out.state.cond, out.state.uncond):
        assert np.asarray(branch.computed).tolist() == [[want] * 3]
        assert np.asarray(branch.count).tolist() == [[STEPS] * 3]


def test_motioncache_threshold_zero_and_partial_forwards(setup, vanilla):
    """Threshold 0: every forward is full and the run is vanilla. A threshold between the smallest and the
    largest motion weight's share of the first change: partial forwards (stale K/V for the other tokens)."""
    m, noise, ctx, solver = setup
    _, base, van = vanilla
    buckets = (0.5, 1.0)
    zero = df_sample(motioncache(base, MotionCacheConfig(thresh=0.0, buckets=buckets)), noise, ctx, solver=solver,
                     ar_step=AR, execution="chunks")
    np.testing.assert_array_equal(np.asarray(zero.latents), np.asarray(van.latents))
    assert np.asarray(zero.state.forwards).sum(axis=(0, 1)).tolist() == [0, 3 * STEPS, 0]
    ts = np.asarray(solver.timesteps, np.float32)
    e0 = [_e0(m, jnp.full((1, FPB), t, jnp.float32)) for t in ts[:2]]
    d1 = float(relative_change(jnp.asarray(e0[1]), jnp.asarray(e0[0])))
    cfg = MotionCacheConfig(thresh=0.8 * d1, coefficients=None, warmup=1, phase1_updates=0, temporal_vote=None,
                            min_update_ratio=0.0, buckets=buckets)
    out = df_sample(motioncache(base, cfg), noise, ctx, solver=solver, ar_step=AR, execution="chunks")
    kinds = np.asarray(out.state.forwards).sum(axis=(0, 1))
    assert kinds.sum() == 3 * STEPS and kinds[0] + kinds[2] > 0
    assert bool(jnp.all(jnp.isfinite(out.latents)))
    assert df_work(out.state)["token_layers"] < df_work(van.state)["token_layers"]


def test_compression_plan_by_hand():
    """4 chunks, ar_step 2 (2 in flight), a budget of 3 chunks (clean + in flight, MAGI's count): after row 5
    the buffer is full, chunk 3 enters at row 6 and chunks 0-1 are clean, so the 16 clean tokens go down to 8
    (one chunk dropped) and chunk 2 moves from slot 16 to 8; chunk 3 is placed at 16. A budget of 2 cannot
    hold 2 chunks in flight while compressing: a ValueError names the budget needed."""
    solver = unipc(STEPS, 3.0)
    (_, _, upd, _), _ = df_schedule(solver, 8, ar_step=AR, causal_block_size=FPB)
    p = plan_window_compression(np.asarray(upd), 0, FPB, 8, 3)
    assert np.flatnonzero(p["compress"]).tolist() == [5]
    assert (p["keep"][5], p["clean_end"][5], p["used"][5]) == (8, 16, 24)
    assert p["slot"][5].tolist() == [0, 8, 16, -1] and p["slot"][6].tolist() == [-2, -2, 8, 16]
    with pytest.raises(ValueError, match="cache_chunks >= 4"):
        plan_window_compression(np.asarray(upd), 0, FPB, 8, 2)


class FixedScore:
    cache_chunks = 3

    def __init__(self, s):
        self.s = s

    def score(self, q, k, valid, tokens_per_frame):
        return jnp.broadcast_to(self.s, (k.shape[0], k.shape[2], k.shape[1]))


def test_compress_window_keeps_the_best_in_score_order_then_the_chunks_in_flight():
    """Slots 0-3 clean with scores (1, 4, 2, 3), slots 4-5 in flight, keep 2: [slot 1, slot 3, slot 4, slot 5,
    empty, empty] (MAGI's topk order: best first)."""
    k = jnp.arange(6, dtype=jnp.float32).reshape(1, 1, 6, 1, 1) * jnp.ones((1, 1, 6, 2, 3))
    frames = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32)[None, None, :, None], (1, 1, 6, 2))
    q = jnp.ones((1, 1, 2, 2, 3))
    comp = FixedScore(jnp.asarray([1.0, 4.0, 2.0, 3.0, 9.0, 9.0]))
    k2, v2, f2 = jax.jit(lambda k, f, q: compress_window(k, k, f, q, 2, 4, 6, comp, 1))(k, frames, q)
    assert np.asarray(k2[0, 0, :, 0, 0]).tolist() == [1, 3, 4, 5, 0, 0]
    assert np.asarray(f2[0, 0, :, 1]).tolist() == [1, 3, 4, 5, -1, -1]


def test_kv_compression_in_df_sample(setup, vanilla):
    """A budget holding every chunk never compresses: the placed-as-they-enter buffer equals vanilla exactly;
    a budget of 3 chunks over 4 compresses once (after row 5: chunks 0-1, done by then, are unchanged) and
    attends to fewer keys."""
    m, noise, ctx, solver = setup
    _, base, van = vanilla
    full = df_sample(base, noise, ctx, solver=solver, ar_step=AR, execution="chunks", kv_compression=kv_compression(3))
    np.testing.assert_array_equal(np.asarray(full.latents), np.asarray(van.latents))
    long = jnp.concatenate([noise, noise[:, :2] * -1.0], axis=1)
    den8 = df_chunk_denoiser(m, 8)
    ref = df_sample(den8, long, ctx, solver=solver, ar_step=AR, execution="chunks")
    out = df_sample(den8, long, ctx, solver=solver, ar_step=AR, execution="chunks", kv_compression=kv_compression(3))
    assert 0 < rel(out.latents, ref.latents) < 0.5
    np.testing.assert_array_equal(np.asarray(out.latents[:, :4]), np.asarray(ref.latents[:, :4]))
    assert df_work(out.state)["attn_pairs"] < df_work(ref.state)["attn_pairs"]


def test_methods_by_name_and_errors(setup):
    m, noise, ctx, solver = setup
    names = {k: (df_method(k, m, window_frames=FRAMES, solver=solver)) for k in DF_METHODS}
    assert {k: (d.name, e) for k, (d, e) in names.items()} == {
        "vanilla": ("df_window", "window"), "vanilla_chunks": ("df_chunks", "chunks"),
        "teacache": ("teacache", "window"), "flowcache": ("flowcache", "chunks"),
        "flowcache_magi": ("flowcache", "chunks"),
        "motioncache": ("motioncache", "chunks")}
    with pytest.raises(ValueError, match="method='dense' is not allowed"):
        df_method("dense", m, window_frames=FRAMES)
    with pytest.raises(ValueError, match="solver"):
        df_method("flowcache_magi", m, window_frames=FRAMES)
    with pytest.raises(ValueError, match="runs whole windows"):
        df_run("teacache", m, noise, ctx, solver=solver, kv_chunks=2)
    run = lambda **kw: df_sample(m, noise, ctx, solver=solver, **kw)       # noqa: E731
    with pytest.raises(ValueError, match="execution='fast' is not allowed"):
        run(execution="fast")
    with pytest.raises(ValueError, match="overlap_frames needs window_frames"):
        run(overlap_frames=2)
    with pytest.raises(ValueError, match="multiple of causal_block_size"):
        run(window_frames=4, overlap_frames=1)
    with pytest.raises(ValueError, match="cover 4 \\+ k \\* 2"):
        df_sample(m, noise[:, :5], ctx, solver=solver, causal_block_size=1, window_frames=4, overlap_frames=2)
    with pytest.raises(ValueError, match="exactly one of noise_key"):
        run(window_frames=4, overlap_frames=2, addnoise_condition=20.0)
    with pytest.raises(ValueError, match="prefix_noise must be"):
        run(window_frames=4, overlap_frames=2, addnoise_condition=20.0, prefix_noise=jnp.zeros((2, 4, 1, 2, 4, 4)))
    with pytest.raises(ValueError, match="causal_block_size must be 2"):
        run(execution="chunks", causal_block_size=1)
    with pytest.raises(ValueError, match="sliding window"):
        run(execution="chunks", window_frames=4)
    with pytest.raises(ValueError, match="needs execution='chunks'"):
        run(kv_compression=kv_compression(3))
    with pytest.raises(ValueError, match="not a models.ar.compression.WindowCompressor"):
        run(execution="chunks", kv_compression=object())
    with pytest.raises(ValueError, match="without its window K/V buffer"):
        den = df_chunk_denoiser(m, FRAMES)
        spec = DenoiseSpec(jax.ShapeDtypeStruct((1, FPB, 4, 4, 4), jnp.float32),
                           jax.ShapeDtypeStruct(ctx.shape, ctx.dtype), STEPS)
        den.apply(den.params, den.init(spec), noise[:, :2], jnp.zeros((1, 2)), ctx)
    with pytest.raises(ValueError, match="multiple of the chunk length"):
        df_chunk_denoiser(m, 5)
