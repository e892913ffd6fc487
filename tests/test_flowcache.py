"""FlowCache: the MAGI variant's latent-displacement reuse, exactness at threshold 0, and the offline schedule
replay (used to choose thresholds) against the rollout's own counters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.flowcache import flowcache, flowcache_config, flowcache_magi_config
from experiments.teacache import calibrate_teacache, teacache
from models.ar.rollout import RolloutConfig, chunk_denoiser, rollout
from models.wan import init_transformer, wan_tiny
from vidaccel.residual_cache import ResidualCacheConfig, schedule
from vidaccel.solvers import euler, unipc
from vidaccel.transforms import DenoiseSpec, total_work

FPB = 2


def _model():
    m = init_transformer(wan_tiny(num_frame_per_block=FPB, num_layers=2), seed=5)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(7), m.proj_out.kernel.shape) * 0.3)
    return m


def _inputs(chunks):
    k = jax.random.split(jax.random.key(3), 2)
    return jax.random.normal(k[0], (1, chunks * FPB, 4, 4, 4)), jax.random.normal(k[1], (1, 3, 16))


def test_magi_reuse_repeats_the_latent_displacement():
    """Euler, warm-up 2, a threshold never reached: after the two computed steps every step adds exactly
    the displacement of the last computed step (not rescaled by its own step size)."""
    model = _model()
    noise, ctx = _inputs(1)
    solver = euler(6)
    den = flowcache(chunk_denoiser(model), flowcache_magi_config(1e9, warmup=2), solver=solver)
    spec = DenoiseSpec(jax.ShapeDtypeStruct(noise.shape, noise.dtype), jax.ShapeDtypeStruct(ctx.shape, ctx.dtype), 6)
    apply = jax.jit(den.apply)
    state, x, xs = den.init(spec), noise, [noise]
    for i in range(6):
        v, state = apply(den.params, state, x, jnp.full((1,), solver.timesteps[i], jnp.float32), ctx)
        x, _ = solver.step(None, i, x, v)
        xs.append(x)
    steps = [np.asarray(b - a) for a, b in zip(xs, xs[1:])]
    assert int(state.computed) == 2
    for d in steps[2:]:
        np.testing.assert_allclose(d, steps[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(solver.sigmas[2] - solver.sigmas[1], solver.sigmas[3] - solver.sigmas[2])


@pytest.mark.parametrize("variant", ["skyreels", "magi"])
def test_threshold_zero_is_dense_exactly(variant):
    model = _model()
    noise, ctx = _inputs(2)
    solver = unipc(4)
    base = chunk_denoiser(model)
    cfg = flowcache_config(0.0) if variant == "skyreels" else flowcache_magi_config(0.0)
    out = rollout(flowcache(base, cfg, solver=solver), noise, ctx, solver=solver)
    ref = rollout(base, noise, ctx, solver=solver)
    np.testing.assert_allclose(out.latents, ref.latents, rtol=0, atol=1e-6)
    assert total_work(out.state) == total_work(ref.state)


def test_schedule_replay_predicts_the_rollout_counters():
    """The e0 indicator depends on the timesteps only, so replaying the rule on a dense calibration run's
    recorded changes predicts exactly which calls a FlowCache (per chunk) or TeaCache (per video) rollout
    computes: the basis of the threshold rule."""
    model = _model()
    noise, ctx = _inputs(3)
    solver = unipc(8)
    base = chunk_denoiser(model)
    cal = calibrate_teacache(base, noise, ctx, solver=solver, indicator="e0")
    assert cal.input_change.shape == (1, 24) and cal.steps == 8
    fc = flowcache_config(2.5, coefficients=None, warmup=2)
    tc = ResidualCacheConfig(2.5, None, indicator="e0", warmup=2, cutoff=-1)
    fc_plan, tc_plan = schedule(fc, cal.input_change, 8), schedule(tc, cal.input_change, 24)
    assert 6 < fc_plan.sum() < 24 and tc_plan.sum() < fc_plan.sum()
    assert int(rollout(flowcache(base, fc), noise, ctx, solver=solver).state.computed) == fc_plan.sum()
    assert int(rollout(teacache(base, tc), noise, ctx, solver=solver).state.computed) == tc_plan.sum()


def test_errors():
    base = chunk_denoiser(_model())
    with pytest.raises(ValueError, match="needs the solver"):
        flowcache(base, flowcache_magi_config(0.01))
    with pytest.raises(ValueError, match="scope='chunk'"):
        flowcache(base, ResidualCacheConfig(0.1))
    noise, ctx = _inputs(1)
    with pytest.raises(ValueError, match="has 4 steps but sampling runs 3"):
        rollout(flowcache(base, flowcache_magi_config(0.01), solver=euler(4)), noise, ctx, solver=euler(3))
    with pytest.raises(ValueError, match="reuse='noise'"):
        ResidualCacheConfig(0.1, reuse="noise")
    assert flowcache_magi_config(0.01).indicator == "patch" and RolloutConfig().kv_compression is None
