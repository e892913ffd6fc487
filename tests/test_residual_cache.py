"""TeaCache / FlowCache: the decision rule on hand-made inputs, exactness at threshold 0, honest counters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.flowcache import flowcache, flowcache_config
from experiments.teacache import calibrate_teacache, fit_coefficients, teacache, teacache_config, wan21_teacache
from models.ar.rollout import RolloutConfig, chunk_denoiser, rollout
from models.wan import init_transformer, wan_tiny
from models.wan.denoiser import wan_denoiser
from vidaccel.residual_cache import ResidualCacheConfig, choose_threshold, decide, relative_change, rescale, schedule
from vidaccel.sampling import sample
from vidaccel.solvers import euler, unipc
from vidaccel.transforms import DenoiseSpec, Stages, total_work


def test_decide_by_hand():
    """thresh 0.3, warm-up 2, cutoff -1 over 6 calls, changes 0.1, 0.15, 0.1, 0.5 after the warm-up:
    forced, forced, skip (0.1), skip (0.25), compute (0.35 >= 0.3, reset), forced by the cut-off."""
    cfg = ResidualCacheConfig(0.3, warmup=2, cutoff=-1)
    acc, got = jnp.float32(0), []
    for i, d in enumerate([9.0, 9.0, 0.1, 0.15, 0.1, 0.5]):
        c, acc = decide(cfg, acc, jnp.float32(d), jnp.int32(i), 6)
        got.append((bool(c), round(float(acc), 6)))
    assert got == [(True, 0.0), (True, 0.0), (False, 0.1), (False, 0.25), (True, 0.0), (True, 0.0)]


def test_schedule_and_threshold_choice_by_hand():
    """Constant change 0.1, 10 calls per chunk scope, warm-up 1: thresh 0.25 computes calls 0, 3, 6, 9 of
    each chunk (0.4); asked for 0.4 the chooser lands in (0.2, 0.3]; the scope restarts every 10 calls."""
    cfg = ResidualCacheConfig(0.25, warmup=1, scope="chunk")
    plan = schedule(cfg, np.full((1, 20), 0.1), 10)
    assert np.flatnonzero(plan[0]).tolist() == [0, 3, 6, 9, 10, 13, 16, 19]
    thresh, frac = choose_threshold(cfg, np.full((1, 20), 0.1), 10, 0.4)
    assert 0.2 < thresh <= 0.3 and frac == 0.4
    with pytest.raises(ValueError, match="target must be > 0.0, got 0.0"):
        choose_threshold(cfg, np.full((1, 20), 0.1), 10, 0)


def test_rescale_and_relative_change():
    assert float(rescale((2.0, 0.0, 1.0), jnp.float32(3.0))) == 19.0
    assert float(rescale(None, jnp.float32(0.25))) == 0.25
    x, p = jnp.array([1.0, -2.0, 3.0]), jnp.array([1.0, -1.0, 1.0])
    assert np.isclose(float(relative_change(x, p)), (0 + 1 + 2) / 3 / 1.0)


def _model(fpb=1):
    m = init_transformer(wan_tiny(num_frame_per_block=fpb, num_layers=2), seed=5)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(7), m.proj_out.kernel.shape) * 0.3)
    return m


def _inputs(frames=4):
    k = jax.random.split(jax.random.key(3), 2)
    return jax.random.normal(k[0], (1, frames, 4, 4, 4)), jax.random.normal(k[1], (1, 3, 16))


def test_threshold_zero_is_dense_exactly():
    model = _model()
    noise, ctx = _inputs()
    dense = wan_denoiser(model)
    ref = sample(dense, None, noise, ctx, solver=unipc(6), guidance=3.0, negative_context=jnp.zeros_like(ctx))
    tc = teacache(dense, teacache_config(0.0, (-1.0, 0.0)))     # a polynomial < 0: thresh 0 still never skips
    out = sample(tc, None, noise, ctx, solver=unipc(6), guidance=3.0, negative_context=jnp.zeros_like(ctx))
    np.testing.assert_allclose(out.latents, ref.latents, rtol=0, atol=1e-6)
    assert total_work(out.state) == total_work(ref.state)


def _counting_dense(model, counter):
    """The dense denoiser with a Python counter in its block stage (counts real executions without jit)."""
    den = wan_denoiser(model)

    def blocks(params, state, emb):
        counter.append(1)
        return den.stages.blocks(params, state, emb)

    stages = Stages(den.stages.embed, blocks, den.stages.head)
    return dataclasses.replace(den, stages=stages)


def test_counters_match_an_unjitted_count():
    """Run TeaCache eagerly (jax.disable_jit: lax.cond runs one branch) and count block-stack executions."""
    model = _model()
    noise, ctx = _inputs()
    solver = euler(8)
    counter = []
    tc = teacache(_counting_dense(model, counter), teacache_config(1.5, None, use_ret_steps=False))
    spec = DenoiseSpec(jax.ShapeDtypeStruct(noise.shape, noise.dtype), jax.ShapeDtypeStruct(ctx.shape, ctx.dtype), 8)
    with jax.disable_jit():
        state, x, sst = tc.init(spec), noise, solver.init(noise)
        for i in range(solver.num_steps):
            v, state = tc.apply(tc.params, state, x, jnp.full((1,), solver.timesteps[i], jnp.float32), ctx)
            x, sst = solver.step(sst, i, x, v)
    assert len(counter) == int(state.computed) == total_work(state)["block_passes"]
    assert 2 <= int(state.computed) < 8      # the first and last calls are forced; something was skipped
    jitted = sample(tc, None, noise, ctx, solver=solver)
    assert int(jitted.state.computed) == int(state.computed)
    np.testing.assert_allclose(jitted.latents, x, rtol=1e-5, atol=1e-5)


def test_flowcache_resets_per_chunk():
    """Per chunk: warm-up 2 and the forced last call; a huge threshold skips everything else. 3 chunks x
    6 steps -> 3 x 3 computed calls; threshold 0 equals the plain rollout."""
    model = _model(fpb=2)
    noise, ctx = _inputs(frames=6)
    solver = euler(6)
    base = chunk_denoiser(model, RolloutConfig())
    fc = flowcache(base, flowcache_config(1e9, warmup=2))
    out = rollout(fc, noise, ctx, solver=solver)
    assert int(out.state.computed) == 3 * 3
    assert total_work(out.state)["block_passes"] == 3 * 3 + 3      # + one clean K/V pass per chunk
    zero = rollout(flowcache(base, flowcache_config(0.0)), noise, ctx, solver=solver)
    ref = rollout(base, noise, ctx, solver=solver)
    np.testing.assert_allclose(zero.latents, ref.latents, rtol=0, atol=1e-6)
    # TeaCache over the same rollout keeps one state for the video: the warm-up happens once
    tc = rollout(teacache(base, ResidualCacheConfig(1e9, warmup=2, cutoff=-1)), noise, ctx, solver=solver)
    assert int(tc.state.computed) == 2 + 1


def test_calibration_fits_the_recorded_changes():
    model = _model()
    noise, ctx = _inputs()
    cal = calibrate_teacache(wan_denoiser(model), noise, ctx, solver=unipc(10), indicator="e0")
    assert cal.input_change.shape == (1, 10) and len(cal.coefficients) == 5
    assert np.all(np.isfinite(cal.coefficients)) and cal.fit_relative_error < 0.5
    # a polynomial is recovered exactly from noiseless samples
    x = np.linspace(0.01, 0.3, 20)[None]
    exact = fit_coefficients(np.concatenate([[[0.0]], x], 1), np.concatenate([[[0.0]], 3 * x**2 + 0.5 * x], 1), 2)
    np.testing.assert_allclose(exact.coefficients, (3.0, 0.5, 0.0), atol=1e-8)


def test_config_errors():
    with pytest.raises(ValueError, match=r"ResidualCacheConfig.thresh must be >= 0.0, got -1.0"):
        ResidualCacheConfig(-1.0)
    with pytest.raises(ValueError, match="indicator='x'"):
        ResidualCacheConfig(0.1, indicator="x")
    with pytest.raises(ValueError, match="ResidualCacheConfig.thresh must be finite, got nan"):
        ResidualCacheConfig(float("nan"))
    with pytest.raises(ValueError, match="ResidualCacheConfig.max_change must be > 0.0, got 0.0"):
        ResidualCacheConfig(0.1, max_change=0)
    with pytest.raises(ValueError, match="ResidualCacheConfig.coefficients must hold at least one number"):
        ResidualCacheConfig(0.1, coefficients=())
    with pytest.raises(TypeError, match="ResidualCacheConfig.cutoff must be an int"):
        ResidualCacheConfig(0.1, cutoff=1.5)
    with pytest.raises(ValueError, match="scope='frame' is not allowed"):
        ResidualCacheConfig(0.1, scope="frame")
    assert ResidualCacheConfig(0.1, np.array([1, 2])).coefficients == (1.0, 2.0)
    with pytest.raises(ValueError, match="no published"):
        wan21_teacache("7b", 0.1)
    with pytest.raises(ValueError, match="scope='chunk' needs an AR chunk denoiser"):
        flowcache(wan_denoiser(_model()), flowcache_config(0.1))
    assert wan21_teacache("1.3b", 0.08, use_ret_steps=False).coefficients[0] == 2.39676752e+03


def test_skipped_last_call_still_commits_kv_in_last_step_mode():
    """kv_mode last_step with TeaCache skipping every call after the very first: every chunk still commits
    the K/V of the last computed call (the chunk buffer, stale as the code's), so later chunks have context."""
    model = _model(fpb=2)
    noise, ctx = _inputs(frames=6)
    base = chunk_denoiser(model, RolloutConfig(kv_mode="last_step"))
    out = rollout(teacache(base, ResidualCacheConfig(1e9, warmup=1)), noise, ctx, solver=euler(4))
    assert int(out.state.computed) == 1
    cache = out.state.inner.cache
    n = cache.capacity // 3
    assert bool(cache.valid.all())
    assert all(float(jnp.abs(cache.k[:, :, c * n:(c + 1) * n]).max()) > 0 for c in range(3))
