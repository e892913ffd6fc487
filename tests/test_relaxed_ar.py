"""Relaxed cache policies on AR rollouts (`relaxed_rollout`, rules of scope "chunk"): hard mode equals the
FlowCache rollout (decisions, latents, counters), straight-through and soft at temperature -> 0 equal hard,
gradients against finite differences, and clear errors. Tiny model, 2 chunks x 3 steps."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from policy_gradients import check_policy_gradients, recording, tiny_ar

from experiments.flowcache import flowcache, flowcache_config
from models.ar.rollout import chunk_denoiser, rollout
from models.wan import init_transformer, wan_tiny
from models.wan.denoiser import wan_denoiser
from vidaccel import relaxed as R
from vidaccel.residual_cache import ResidualCacheConfig
from vidaccel.solvers import unipc
from vidaccel.transforms import branch_states, total_work

FPB, CHUNKS, STEPS = 2, 2, 3
SOLVER = unipc(STEPS)


@pytest.fixture(scope="module")
def tiny():
    m, x, ctx = tiny_ar(CHUNKS, FPB)
    return chunk_denoiser(m), x, ctx


@partial(jax.jit, static_argnums=(0, 4))
def _run(den, params, x, ctx, guidance):
    return R.relaxed_rollout(den, params, x, ctx, solver=SOLVER, guidance=guidance,
                             negative_context=jnp.zeros_like(ctx) if guidance else None, remat=False)


# e0 (timestep-only; FlowCache-SkyReels' preset with warm-up 1: the middle step of each chunk is free), with CFG;
# the content-dependent patch indicator without cut-off (two free steps per chunk; the dense rollout's changes
# are 0.26, 0.46 in chunk 0 and 0.23, 0.42 in chunk 1, so 0.68 computes the last step of chunk 0 only).
CONFIGS = {"skyreels": (flowcache_config(1.5, coefficients=None, warmup=1), 5.0),
           "patch": (ResidualCacheConfig(0.68, None, indicator="patch", warmup=1, scope="chunk"), None)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hard_equals_flowcache_rollout(tiny, name):
    """Hard (and, for FlowCache-SkyReels with CFG, straight-through and soft at temperature 1e-6): the FlowCache
    rollout's per-call decisions (every CFG branch, recorded from its own counter), its final latents within
    1e-5 and (hard) its work counters."""
    base, x, ctx = tiny
    cfg, guidance = CONFIGS[name]
    neg = jnp.zeros_like(ctx) if guidance else None
    ref = rollout(recording(flowcache(base, cfg)), x, ctx, solver=SOLVER, guidance=guidance, negative_context=neg)
    want = np.stack([np.asarray(s.seen) > 0 for s in branch_states(ref.state)])
    assert 0 < want.mean() < 1, "the test rule must both skip and compute"
    assert want[:, ::STEPS].all()
    if name == "patch":
        assert not np.array_equal(want[:, :STEPS], want[:, STEPS:]), "decisions should differ between chunks"
    modes = (("hard", 1.0), ("straight_through", 1.0), ("soft", 1e-6))
    for mode, temp in modes if guidance else modes[:1]:     # the limits once (compile time)
        den = R.relaxed_cache(base, R.ThresholdRule(cfg), mode=mode)
        out = _run(den, R.relaxed_params(den, temperature=temp), x, ctx, guidance)
        gates = np.asarray(R.gates_of(out.state))
        assert np.array_equal(gates > 0.5, want), mode
        assert np.allclose(gates, want, atol=1e-6), mode
        assert float(jnp.max(jnp.abs(out.latents - ref.latents))) < 1e-5, mode
        assert float(R.compute_fraction(out.state, hard=True)) == pytest.approx(want.mean(), abs=1e-6)
        if mode == "hard":
            assert total_work(out.state) == total_work(ref.state)


def test_chunk_scope_resets_at_commit(tiny):
    """A chunk-scope schedule computes every chunk's first call whatever its gate, a video-scope one only the
    run's first."""
    base, x, ctx = tiny
    logits = jnp.asarray([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])
    runs = {}
    for scope in ("chunk", "video"):
        den = R.relaxed_cache(base, R.ScheduleRule(CHUNKS * STEPS, scope=scope), mode="hard")
        runs[scope] = _run(den, R.relaxed_params(den, {"logits": logits}), x, ctx, None)
    chunk, video = runs["chunk"], runs["video"]
    assert np.asarray(R.gates_of(chunk.state))[0].tolist() == [1, 0, 1, 1, 0, 1]
    assert np.asarray(R.gates_of(video.state))[0].tolist() == [1, 0, 1, 0, 0, 1]
    assert R.hard_schedule(R.ScheduleRule(6, scope="chunk"), {"logits": logits}, STEPS).tolist() == [
        True, False, True, True, False, True]
    assert total_work(chunk.state)["block_passes"] == 4 + CHUNKS and total_work(video.state)["block_passes"] == 3 + 2
    assert float(jnp.max(jnp.abs(video.latents - chunk.latents))) > 1e-3


def test_gradients_match_finite_differences(tiny):
    """check_grads (reverse mode, central differences of step 0.05 in float32, 3% tolerance) through the whole
    rollout (commits, KV cache): FlowCache's threshold (patch indicator, per-step and per-chunk remat) and a
    chunk-scope schedule's logits (no remat)."""
    base, x, ctx = tiny
    cases = [(R.ThresholdRule(CONFIGS["patch"][0]), None, "step"),
             (R.ScheduleRule(CHUNKS * STEPS, scope="chunk"),
              {"logits": jnp.asarray(np.random.default_rng(0).normal(size=CHUNKS * STEPS), jnp.float32)}, False)]
    for rule, policy, remat in cases:
        den = R.relaxed_cache(base, rule, mode="soft")
        p0 = R.relaxed_params(den, policy, temperature=0.5)
        check_policy_gradients(lambda p, den=den, remat=remat: R.relaxed_rollout(
            den, p, x, ctx, solver=SOLVER, remat=remat), p0)


def test_clear_errors(tiny):
    base, x, ctx = tiny
    t2v = wan_denoiser(init_transformer(wan_tiny(num_layers=1), seed=0))
    with pytest.raises(ValueError, match="scope 'chunk' needs an AR chunk denoiser"):
        R.relaxed_cache(t2v, R.ScheduleRule(3, scope="chunk"))
    with pytest.raises(ValueError, match="ScheduleRule.scope"):
        R.ScheduleRule(3, scope="frame")
    with pytest.raises(ValueError, match="supports reuse='hidden'"):
        R.ThresholdRule(ResidualCacheConfig(0.1, reuse="latent", scope="chunk"))
    den = R.relaxed_cache(t2v, R.ScheduleRule(3))
    with pytest.raises(ValueError, match="needs a relaxed AR chunk denoiser"):
        R.relaxed_rollout(den, R.relaxed_params(den), x, ctx, solver=SOLVER)
    den = R.relaxed_cache(base, R.ScheduleRule(CHUNKS * STEPS, scope="chunk"))
    with pytest.raises(ValueError, match="multiple of the chunk length 2"):
        R.relaxed_rollout(den, R.relaxed_params(den), x[:, :3], ctx, solver=SOLVER)
    with pytest.raises(ValueError, match="remat="):
        R.relaxed_rollout(den, R.relaxed_params(den), x, ctx, solver=SOLVER, remat="chunk")
    short = R.relaxed_cache(base, R.ScheduleRule(STEPS, scope="chunk"))
    with pytest.raises(ValueError, match="3 gates but this sampler makes 6 calls"):
        R.relaxed_rollout(short, R.relaxed_params(short), x, ctx, solver=SOLVER)
    with pytest.raises(ValueError, match="needs steps="):
        R.hard_schedule(R.ScheduleRule(6, scope="chunk"), {"logits": jnp.zeros(6)})
    with pytest.raises(ValueError, match="not a whole number of chunks"):
        R.top_k_schedule(R.ScheduleRule(6, scope="chunk"), {"logits": jnp.zeros(6)}, 0.5, steps=4)
