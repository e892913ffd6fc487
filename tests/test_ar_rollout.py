"""The compiled chunk rollout equals a plain loop of full block-causal forwards over the same context."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.ar.rollout import RolloutConfig, chunk_denoiser, kv_cache_bytes, rollout
from models.wan import init_transformer, wan_tiny
from models.wan.denoiser import DenseState
from vidaccel.solvers import euler, unipc
from vidaccel.transforms import CFGBranches, Work

FPB = 2
CHUNKS = 4


def _model(num_layers=2):
    m = init_transformer(wan_tiny(num_frame_per_block=FPB, num_layers=num_layers), seed=3)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(8), m.proj_out.kernel.shape) * 0.3)
    return m


def _inputs(batch=2):
    k = jax.random.split(jax.random.key(11), 2)
    noise = jax.random.normal(k[0], (batch, CHUNKS * FPB, 4, 4, 4))
    ctx = jax.random.normal(k[1], (batch, 3, 16))
    return noise, ctx


def _reference(model, noise, ctx, solver, *, window=None, kv_mode="clean"):
    """Chunk c denoised by full forwards over [context chunks ; chunk c] with per-frame t, sliced to chunk c."""
    done, ctx_inputs = [], []          # clean chunks; (latents, t) each context chunk is seen at
    for c in range(CHUNKS):
        first = 0 if window is None else max(0, c - window)
        x = noise[:, c * FPB:(c + 1) * FPB]
        state = solver.init(x)
        for i in range(solver.num_steps):
            t = float(solver.timesteps[i])
            parts = [p for p, _ in ctx_inputs[first:c]] + [x]
            ts = [tt for _, tt in ctx_inputs[first:c]] + [t]
            t_frames = jnp.asarray(np.repeat(ts, FPB)[None].repeat(x.shape[0], 0), jnp.float32)
            v = model(jnp.concatenate(parts, 1), t_frames, ctx, frame_offset=first * FPB)[:, -FPB:]
            if kv_mode == "last_step" and i == solver.num_steps - 1:
                ctx_inputs.append((x, t))
            x, state = solver.step(state, i, x, v)
        if kv_mode == "clean":
            ctx_inputs.append((x, 0.0))
        done.append(x)
    return jnp.concatenate(done, 1)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("kv_mode", ["clean", "last_step"])
def test_rollout_matches_full_forward_loop(kv_mode):
    model = _model()
    noise, ctx = _inputs()
    solver = euler(3)
    out = rollout(model, noise, ctx, solver=solver, config=RolloutConfig(kv_mode=kv_mode))
    ref = _reference(model, noise, ctx, solver, kv_mode=kv_mode)
    assert _rel(out.latents, ref) <= 1e-5
    extra = 1 if kv_mode == "clean" else 0
    assert int(out.state.work.calls) == CHUNKS * (solver.num_steps + extra)


def test_rolling_window_evicts_oldest_chunk():
    """window 1: chunk c sees only chunk c-1 (ring of one slot); a window covering all chunks = no window.

    One layer, so that a cached chunk's K/V depend on its own tokens only: with more layers they also carry
    what that chunk attended to when it was cached (evicted chunks included), which no full forward over the
    window reproduces.
    """
    model = _model(num_layers=1)
    noise, ctx = _inputs(batch=1)
    solver = euler(2)
    out = rollout(model, noise, ctx, solver=solver, config=RolloutConfig(window_chunks=1))
    assert _rel(out.latents, _reference(model, noise, ctx, solver, window=1)) <= 1e-5
    full = rollout(model, noise, ctx, solver=solver)
    wide = rollout(model, noise, ctx, solver=solver, config=RolloutConfig(window_chunks=CHUNKS + 2))
    assert _rel(wide.latents, full.latents) <= 1e-6
    assert _rel(out.latents, full.latents) > 1e-3       # the window really changes the context
    assert kv_cache_bytes(out.state) < kv_cache_bytes(full.state)


def test_sink_keeps_first_chunk():
    """sink 1 + window 1: chunk 3 attends to chunks 0 and 2; compare the last chunk with the explicit forward."""
    model = _model()
    noise, ctx = _inputs(batch=1)
    solver = euler(2)
    out = rollout(model, noise, ctx, solver=solver, config=RolloutConfig(window_chunks=1, sink_chunks=1))
    # chunks 0..2 see exactly what a window-2 rollout gives them (chunk 2 sees 0 and 1)
    ref3 = rollout(model, noise[:, :3 * FPB], ctx, solver=solver)
    np.testing.assert_allclose(out.latents[:, :2 * FPB], ref3.latents[:, :2 * FPB], rtol=1e-5, atol=1e-5)
    no_sink = rollout(model, noise, ctx, solver=solver, config=RolloutConfig(window_chunks=1))
    assert _rel(out.latents[:, 2 * FPB:], no_sink.latents[:, 2 * FPB:]) > 1e-3


def test_guided_rollout_keeps_a_cache_per_branch():
    model = _model()
    noise, ctx = _inputs()
    solver = unipc(3)
    out = rollout(model, noise, ctx, solver=solver, guidance=4.0, negative_context=jnp.zeros_like(ctx),
                  config=RolloutConfig(window_chunks=2))
    assert isinstance(out.state, CFGBranches)
    assert np.isfinite(np.asarray(out.latents)).all()
    assert int(out.state.cond.work.calls) == CHUNKS * (solver.num_steps + 1)
    assert not np.allclose(out.state.cond.cache.k, out.state.uncond.cache.k)


def test_rollout_errors():
    model = _model()
    noise, ctx = _inputs()
    with pytest.raises(ValueError, match="multiple of the chunk length 2"):
        rollout(model, noise[:, :5], ctx, solver=euler(2))
    with pytest.raises(ValueError, match="kv_mode='fresh' is not allowed"):
        RolloutConfig(kv_mode="fresh")
    with pytest.raises(ValueError, match="sink_chunks needs a window_chunks"):
        RolloutConfig(sink_chunks=1)
    with pytest.raises(ValueError, match=r"kv_attention='gather' is not allowed; choose one of \('auto', 'kernel'"):
        RolloutConfig(kv_attention="gather")          # the backend vocabulary, minus the path a KV cache lacks
    with pytest.raises(TypeError, match="RolloutConfig.window_chunks must be an int, got 2.0"):
        RolloutConfig(window_chunks=2.0)
    with pytest.raises(ValueError, match="block-causal"):
        chunk_denoiser(init_transformer(wan_tiny(), seed=0))


def _inputs_8x8(batch=1, chunks=3):
    k = jax.random.split(jax.random.key(21), 2)
    return (jax.random.normal(k[0], (batch, chunks * FPB, 8, 8, 4)), jax.random.normal(k[1], (batch, 3, 16)))


def test_quantized_storage_is_close_and_smaller():
    """int8 / int4 caches (32 tokens per chunk = one key group) track the float32 rollout; bytes shrink."""
    model = _model()
    noise, ctx = _inputs_8x8()
    solver = euler(3)
    runs = {s: rollout(model, noise, ctx, solver=solver, config=RolloutConfig(kv_storage=s))
            for s in ("float32", "bfloat16", "int8", "int4")}
    ref = runs["float32"].latents
    errs = {s: _rel(r.latents, ref) for s, r in runs.items()}
    assert errs["bfloat16"] < 1e-2 and errs["int8"] < 2e-2 and errs["int4"] < 0.2, errs
    assert 0 < errs["int8"] < errs["int4"], errs
    sizes = {s: kv_cache_bytes(r.state) for s, r in runs.items()}
    assert sizes["int4"] < sizes["int8"] < sizes["bfloat16"] < sizes["float32"], sizes


def test_quantized_kernel_path_equals_reference_path():
    """The Pallas quantized-KV kernel (interpret mode on CPU) inside the rollout = the jnp reference path."""
    model = _model(num_layers=1)
    noise, ctx = _inputs_8x8(chunks=2)
    solver = euler(2)
    a = rollout(model, noise, ctx, solver=solver, config=RolloutConfig(kv_storage="int8", kv_attention="kernel"))
    b = rollout(model, noise, ctx, solver=solver, config=RolloutConfig(kv_storage="int8", kv_attention="reference"))
    assert _rel(a.latents, b.latents) <= 1e-5


def test_storage_errors():
    model = _model()
    noise, ctx = _inputs()
    with pytest.raises(ValueError, match="kv_storage='fp8' is not allowed"):
        RolloutConfig(kv_storage="fp8")
    with pytest.raises(ValueError, match="multiples of the key group size 32"):
        rollout(model, noise, ctx, solver=euler(2), config=RolloutConfig(kv_storage="int8"))


def test_kv_cache_bytes_refuses_a_state_without_a_chunk_denoiser():
    with pytest.raises(ValueError, match="no ChunkState inside DenseState; was the denoiser built with chunk_denoiser"):
        kv_cache_bytes(CFGBranches(DenseState(Work.zero()), DenseState(Work.zero())))
