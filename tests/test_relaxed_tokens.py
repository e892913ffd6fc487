"""The relaxed MotionCache (experiments/cache_policy/token_rule.py): hard and straight-through equal the
MotionCache rollout (per-call token decisions, accumulators, latents, counters), soft tends to it as the
temperature -> 0, gradients in the threshold and alpha against finite differences, and clear errors. Tiny
random model, 2 chunks x 4 steps, 8 tokens per chunk, two videos with different decisions (no CFG: the
relaxed denoiser has nothing branch-specific, and a guided rollout doubles the compile time)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from policy_gradients import tiny_ar

from experiments.cache_policy.token_rule import MotionTokenRule, relaxed_motioncache, to_motioncache
from experiments.cache_policy.tokens import learn_tokens
from experiments.motioncache import MotionCacheConfig, MotionCacheState
from models.ar.rollout import chunk_denoiser, rollout
from models.wan.denoiser import wan_denoiser
from vidaccel import relaxed as R
from vidaccel.solvers import unipc
from vidaccel.transforms import branch_states, find_state, wrap_denoiser

FPB, CHUNKS, STEPS = 2, 2, 4
SOLVER = unipc(STEPS)
# warm-up 1 and one phase-1 update, so that phase 2 (motion weights) runs within 4 steps; the vote keeps a
# spatial position when 1 of its 2 frames selects it
CFG = MotionCacheConfig(thresh=1.0, coefficients=None, warmup=1, phase1_updates=1, temporal_vote=0.4,
                        min_update_ratio=0.0, buckets=(1.0,))      # one bucket: partial forwards padded to 8
# the relaxed rollouts compile with cheaper backend passes (half the compile time; they run in milliseconds)
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def tiny():
    m, x, ctx = tiny_ar(CHUNKS, FPB, batch=2)
    return chunk_denoiser(m), x, ctx, m


@struct.dataclass
class _Record:
    """Every call's accumulators and selected-token count, read from the MotionCacheState inside."""

    inner: object
    acc: jax.Array
    selected: jax.Array
    count: jax.Array


def _recording(den):
    def init(spec):
        calls = spec.num_steps * spec.num_chunks
        inner = den.init(spec)
        acc = find_state(inner, MotionCacheState).acc
        return _Record(inner, jnp.zeros((calls, *acc.shape)), jnp.zeros((calls,), jnp.int32), jnp.zeros((), jnp.int32))

    def apply(params, state, x, t, context):
        v, inner = den.apply(params, state.inner, x, t, context)
        now, before = find_state(inner, MotionCacheState), find_state(state.inner, MotionCacheState)
        return v, _Record(inner, state.acc.at[state.count].set(now.acc),
                          state.selected.at[state.count].set(now.selected - before.selected), state.count + 1)

    return wrap_denoiser(den, init=init, apply=apply, name="record")


@partial(jax.jit, static_argnums=(0,), compiler_options=FAST)
def _relaxed(den, params, x, ctx):
    return R.relaxed_rollout(den, params, x, ctx, solver=SOLVER, remat=False)


@pytest.fixture(scope="module")
def dens(tiny):
    """The recorded relaxed denoiser per (mode, learn_alpha), built once so that its compilation is shared."""
    return {(mode, a): _recording(relaxed_motioncache(tiny[0], MotionTokenRule(CFG, a), mode=mode))
            for mode, a in (("hard", True), ("soft", False))}


@pytest.fixture(scope="module")
def reference(tiny):
    """The MotionCache rollout (recorded) at CFG's threshold."""
    base, x, ctx, _ = tiny
    return rollout(_recording(motioncache_of(base)), x, ctx, solver=SOLVER)


def test_hard_and_limits_equal_motioncache(tiny, dens, reference):
    """Hard (with learnable alpha) and soft at temperature 1e-6: MotionCache's per-call selected counts and
    accumulators, its final latents within 1e-5, its decision counters; the counted token
    fraction is MotionCache's selected tokens over the dense run's. (Straight-through's forward value is the
    hard gate plus soft - stop_gradient(soft) = 0 exactly: `vidaccel.relaxed.gate`, tests/test_relaxed.py.)"""
    base, x, ctx, _ = tiny
    ref = reference
    want = [find_state(s, MotionCacheState) for s in branch_states(ref.state)]
    sel = np.stack([np.asarray(s.selected) for s in branch_states(ref.state)])
    assert all(0 < w.forwards[2] for w in want), "the test rule must run partial forwards"
    tokens = sel.sum() / (CHUNKS * STEPS * x.shape[0] * 8)
    assert 0.3 < tokens < 0.95
    for (mode, learn_alpha), temp in zip(dens, (1.0, 1e-6), strict=True):
        den = dens[mode, learn_alpha]
        out = _relaxed(den, R.relaxed_params(den, temperature=temp), x, ctx)
        got = [find_state(s, MotionCacheState) for s in branch_states(out.state)]
        assert np.array_equal(np.stack([np.asarray(s.selected) for s in branch_states(out.state)]), sel), mode
        for s, r, gs, ws in zip(branch_states(out.state), branch_states(ref.state), got, want, strict=True):
            np.testing.assert_allclose(s.acc, r.acc, atol=1e-5, err_msg=mode)
            assert gs.forwards.tolist() == ws.forwards.tolist() and int(gs.selected) == int(ws.selected), mode
        assert float(jnp.max(jnp.abs(out.latents - ref.latents))) < 1e-5, mode
        assert float(R.compute_fraction(out.state, hard=True)) == pytest.approx(tokens, abs=1e-6)
        assert float(R.compute_fraction(out.state)) == pytest.approx(tokens, abs=1e-5)


def motioncache_of(base, policy=None, learn_alpha=False):
    rule = MotionTokenRule(CFG, learn_alpha)
    return to_motioncache(base, rule, rule.init_policy() if policy is None else policy)


def test_soft_mode_moves_towards_hard(tiny, dens, reference):
    """At a moderate temperature the soft rollout differs from MotionCache; at a small one it is within 1e-4."""
    base, x, ctx, _ = tiny
    ref, den = reference, dens["soft", False]
    diff = [float(jnp.max(jnp.abs(_relaxed(den, R.relaxed_params(den, temperature=t), x, ctx).latents
                                  - ref.latents))) for t in (0.3, 1e-3)]
    assert diff[0] > 1e-3 and diff[1] < 1e-4, diff


def test_gradients_match_finite_differences(tiny):
    """Reverse-mode gradients through the whole rollout (K/V buffer mixing, commits, motion weights) of
    loss = mean(latents^2) + token fraction with respect to the log-threshold and the alpha logit, soft gates
    at temperature 0.5, against central differences of step 0.05 in float32: within 3% + 2e-3 (the tolerances
    of tests/policy_gradients.py), and both non-zero."""
    base, x, ctx, _ = tiny
    den = relaxed_motioncache(base, MotionTokenRule(CFG, learn_alpha=True), mode="soft")
    p0 = R.relaxed_params(den, temperature=0.5)

    def loss(pol):
        out = R.relaxed_rollout(den, p0.replace(policy=pol), x[:1], ctx[:1], solver=SOLVER, remat=False)
        return jnp.mean(jnp.square(out.latents)) + R.compute_fraction(out.state)

    f = jax.jit(jax.value_and_grad(loss), compiler_options=FAST)        # one compilation for values and gradient
    grad = f(p0.policy)[1]
    h = 0.05
    for k, v in p0.policy.items():
        fd = (float(f({**p0.policy, k: v + h})[0]) - float(f({**p0.policy, k: v - h})[0])) / (2 * h)
        assert abs(float(grad[k]) - fd) <= 2e-3 + 3e-2 * abs(fd), (k, float(grad[k]), fd)
        assert abs(fd) > 1e-3, k


def test_learned_policy_is_motioncache():
    """The hard version of a policy is MotionCache with its threshold and alpha."""
    rule = MotionTokenRule(CFG, learn_alpha=True)
    cfg = rule.hard_config({"log_thresh": jnp.log(jnp.float32(0.4)), "alpha_logit": jnp.float32(0.0)})
    assert cfg.thresh == pytest.approx(0.4, rel=1e-6) and cfg.alpha == 0.5 and cfg.warmup == CFG.warmup


def test_clear_errors(tiny):
    base, x, ctx, model = tiny
    rule = MotionTokenRule(CFG)
    den = relaxed_motioncache(base, rule)
    with pytest.raises(ValueError, match="motioncache needs an AR chunk denoiser"):
        relaxed_motioncache(wan_denoiser(model), rule)
    with pytest.raises(ValueError, match="temperature must be > 0.0"):
        R.relaxed_params(den, temperature=0.0)
    with pytest.raises(ValueError, match=r"keys \['alpha_logit', 'log_thresh'\], got \['log_thresh'\]"):
        R.relaxed_params(relaxed_motioncache(base, MotionTokenRule(CFG, learn_alpha=True)), {"log_thresh": 0.0})
    other = R.relaxed_cache(base, R.ScheduleRule(CHUNKS * STEPS, scope="chunk"))
    with pytest.raises(ValueError, match="the policy does not match the denoiser"):
        R.relaxed_rollout(den, R.relaxed_params(other), x, ctx, solver=SOLVER)
    with pytest.raises(ValueError, match="cfg.thresh > 0"):
        MotionTokenRule(MotionCacheConfig(thresh=0.0))
    with pytest.raises(ValueError, match=r"alpha in \(0, 1\)"):
        MotionTokenRule(MotionCacheConfig(alpha=1.0), learn_alpha=True)
    with pytest.raises(ValueError, match="mode"):
        relaxed_motioncache(base, rule, mode="sharp")
    for budget in (0.0, 1.5):
        with pytest.raises(ValueError, match="budget must be"):
            learn_tokens(None, budget, None)
