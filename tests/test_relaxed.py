"""Relaxed caching decisions: hard equivalence at temperature -> 0 / straight-through against the hard rules,
gradients against finite differences, expected compute, and clear errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from policy_gradients import check_policy_gradients

from experiments.teacache import calibrate_teacache, teacache
from models.wan import init_transformer, wan_tiny
from models.wan.denoiser import wan_denoiser
from vidaccel import relaxed as R
from vidaccel.residual_cache import ResidualCacheConfig, schedule
from vidaccel.sampling import sample
from vidaccel.solvers import unipc
from vidaccel.transforms import branch_states, total_work

STEPS = 8
SOLVER = unipc(STEPS)
# e0 changes of the tiny model are ~1 per call: threshold 2 skips about every other call (checked below).
RULE = ResidualCacheConfig(2.0, None, indicator="e0", warmup=1, cutoff=-1)


@pytest.fixture(scope="module")
def tiny():
    m = init_transformer(wan_tiny(num_layers=2), seed=5)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(7), m.proj_out.kernel.shape) * 0.3)
    k = jax.random.split(jax.random.key(3), 2)
    x, ctx = jax.random.normal(k[0], (1, 4, 4, 4, 4)), jax.random.normal(k[1], (1, 3, 16))
    return wan_denoiser(m), x, ctx


@partial(jax.jit, static_argnums=0)
def _run(den, params, x, ctx):
    return R.relaxed_sample(den, params, x, ctx, solver=SOLVER, guidance=5.0, negative_context=jnp.zeros_like(ctx),
                            remat=False)


def test_gate_by_hand():
    m = jnp.array([-2.0, -0.1, 0.0, 0.3])
    assert R.gate(m, 1.0, "hard").tolist() == [0.0, 0.0, 1.0, 1.0]
    assert np.allclose(R.gate(m, 1.0, "soft"), jax.nn.sigmoid(m))
    assert np.allclose(R.gate(m, 1e-6, "soft"), [0.0, 0.0, 0.5, 1.0], atol=1e-6)
    assert R.gate(m, 1.0, "straight_through").tolist() == [0.0, 0.0, 1.0, 1.0]    # exactly the hard value
    st = jax.grad(lambda v: jnp.sum(R.gate(v, 0.5, "straight_through") * jnp.arange(4.0)))(m)
    soft = jax.grad(lambda v: jnp.sum(R.gate(v, 0.5, "soft") * jnp.arange(4.0)))(m)
    assert np.allclose(st, soft) and np.all(np.abs(st[1:]) > 0)


def test_threshold_rule_equals_teacache(tiny):
    """Hard, straight-through and soft at temperature 1e-6: the same decisions as TeaCache's rule replayed on
    the recorded indicator changes, the same final latents as the `teacache` transform within 1e-5, and in
    hard mode the same counters (real skipping)."""
    base, x, ctx = tiny
    neg = jnp.zeros_like(ctx)
    ref = sample(teacache(base, RULE), None, x, ctx, solver=SOLVER, guidance=5.0, negative_context=neg)
    cal = calibrate_teacache(base, x, ctx, solver=SOLVER, guidance=5.0, negative_context=neg)
    want = schedule(RULE, cal.input_change, STEPS)                  # (branches, calls) bool
    assert 0 < want.mean() < 1, "the test rule must both skip and compute"
    assert total_work(ref.state)["block_passes"] == want.sum()
    for mode, temp in (("hard", 1.0), ("straight_through", 1.0), ("soft", 1e-6)):
        den = R.relaxed_cache(base, R.ThresholdRule(RULE), mode=mode)
        out = _run(den, R.relaxed_params(den, temperature=temp), x, ctx)
        gates = np.asarray(R.gates_of(out.state))
        assert np.array_equal(gates > 0.5, want), mode
        assert np.allclose(gates, want, atol=1e-6), mode
        assert float(jnp.max(jnp.abs(out.latents - ref.latents))) < 1e-5, mode
        assert float(R.compute_fraction(out.state)) == pytest.approx(want.mean(), abs=1e-6)
        assert float(R.compute_fraction(out.state, hard=True)) == want.mean()
        if mode == "hard":
            assert total_work(out.state) == total_work(ref.state)


def test_schedule_and_layer_rules_limit_to_hard(tiny):
    """A free schedule and per-layer attention reuse: soft at temperature 1e-6 equals the hard (`lax.cond`)
    version within 1e-5 (straight-through's forward is the hard gate by construction, tested above); hard mode
    skips real block passes; an all-compute layer policy equals the dense sampler."""
    base, x, ctx = tiny
    logits = np.where(np.arange(STEPS) % 3 == 1, -1.0, 1.0).astype(np.float32)
    runs = {}
    for mode, temp in (("hard", 1.0), ("soft", 1e-6)):
        rule = R.ScheduleRule(STEPS)
        den = R.relaxed_cache(base, rule, mode=mode)
        runs[mode] = _run(den, R.relaxed_params(den, {"logits": jnp.asarray(logits)}, temp), x, ctx)
    assert total_work(runs["hard"].state)["block_passes"] == 2 * int((logits > 0).sum())
    assert float(jnp.max(jnp.abs(runs["soft"].latents - runs["hard"].latents))) < 1e-5

    dense = sample(base, None, x, ctx, solver=SOLVER, guidance=5.0, negative_context=jnp.zeros_like(ctx))
    lrule = R.LayerRule(STEPS, 2)
    lg = np.where((np.arange(STEPS)[:, None] + np.arange(2)) % 2 == 1, -2.0, 2.0).astype(np.float32)
    layer_runs = {}
    for mode, temp in (("hard", 1.0), ("soft", 1e-6)):
        den = R.relaxed_layer_reuse(base, lrule, mode=mode)
        layer_runs[mode] = _run(den, R.relaxed_params(den, {"logits": jnp.asarray(lg)}, temp), x, ctx)
        if mode == "hard":
            allc = _run(den, R.relaxed_params(den), x, ctx)
            assert float(jnp.max(jnp.abs(allc.latents - dense.latents))) < 1e-5
    assert float(jnp.max(jnp.abs(layer_runs["soft"].latents - layer_runs["hard"].latents))) < 1e-5
    share = R.attention_share(base.config, 16, 3)
    want = 1 - share + share * np.mean(np.where(np.arange(STEPS)[:, None] == 0, 1.0, lg > 0), axis=1).mean()
    assert float(R.compute_fraction(layer_runs["hard"].state, hard=True)) == pytest.approx(want, rel=1e-5)


def test_gradients_match_finite_differences(tiny):
    """jax.test_util.check_grads (reverse mode, central differences of step 0.05 in float32, 3% tolerance)
    through the whole 8-step sampler: the threshold with the default nested rematerialisation, the per-layer
    logits without remat (a schedule's logits enter as the layer logits do, one gate per call)."""
    base, x, ctx = tiny
    neg = jnp.zeros_like(ctx)
    cases = [(R.relaxed_cache(base, R.ThresholdRule(RULE), mode="soft"), None, "nested"),
             (R.relaxed_layer_reuse(base, R.LayerRule(STEPS, 2), mode="soft"),
              {"logits": jnp.asarray(np.random.default_rng(0).normal(size=(STEPS, 2)), jnp.float32)}, False)]
    for den, policy, remat in cases:
        p0 = R.relaxed_params(den, policy, temperature=0.5)
        check_policy_gradients(lambda p, den=den, remat=remat: R.relaxed_sample(
            den, p, x, ctx, solver=SOLVER, guidance=5.0, negative_context=neg, remat=remat), p0)


def test_clear_errors(tiny):
    base, x, ctx = tiny
    with pytest.raises(ValueError, match="temperature must be > 0.0"):
        R.relaxed_params(R.relaxed_cache(base, R.ScheduleRule(STEPS)), temperature=0.0)
    with pytest.raises(ValueError, match="budget must be > 0.0"):
        R.check_budget(0.0)
    with pytest.raises(ValueError, match="budget must be <= 1.0"):
        R.check_budget(1.2)
    den = R.relaxed_cache(base, R.ScheduleRule(STEPS + 1))
    with pytest.raises(ValueError, match="9 gates but this sampler makes 8 calls"):
        _run(den, R.relaxed_params(den), x, ctx)
    den = R.relaxed_cache(base, R.ScheduleRule(STEPS))
    with pytest.raises(ValueError, match="does not match"):
        R.relaxed_params(den, {"logits": jnp.zeros((STEPS + 1,))})
    with pytest.raises(ValueError, match="does not match"):
        R.relaxed_params(den, {"log_thresh": jnp.float32(0)})
    other = R.relaxed_params(R.relaxed_cache(base, R.ThresholdRule(RULE)))
    with pytest.raises(ValueError, match="does not match"):
        _run(den, other, x, ctx)
    with pytest.raises(ValueError, match="policy does not match the denoiser"):
        R.relaxed_layer_reuse(base, R.LayerRule(STEPS, 3))
    with pytest.raises(ValueError, match="not a relaxed denoiser"):
        R.relaxed_sample(base, None, x, ctx, solver=SOLVER)
    with pytest.raises(ValueError, match="thresh > 0"):
        R.ThresholdRule(ResidualCacheConfig(0.0))


# ------------------------------------------------------------------------------------------------ policy network
def _net_policy(rule, seed=11):
    """A policy network with every weight non-zero (the output layer too), from the rule's initial one."""
    p = rule.init_policy()
    rng = np.random.default_rng(seed)
    p["w_out"] = jnp.asarray(rng.normal(size=p["w_out"].shape) * 0.7, jnp.float32)
    p["linear"] = jnp.asarray([1.0, 0.4, -0.6, 0.3], jnp.float32)
    return p


def _features(state):
    return np.stack([np.asarray(s.rule.features) for s in branch_states(state)])


def test_policy_net_starts_at_teacache_and_limits_to_hard(tiny):
    """The initial network is the calibrated threshold rule: hard decisions equal TeaCache's replayed schedule
    and the `teacache` transform's latents. A network with every weight non-zero: the hard (`lax.cond`) run's
    decisions equal the network replayed on the features it recorded (forced calls aside), its counters count
    them, and straight-through and soft at temperature 1e-6 make the same decisions on the same features with
    final latents within 1e-5."""
    base, x, ctx = tiny
    neg = jnp.zeros_like(ctx)
    rule = R.PolicyNetRule(RULE, hidden=4)
    hard = R.relaxed_cache(base, rule, mode="hard")
    ref = sample(teacache(base, RULE), None, x, ctx, solver=SOLVER, guidance=5.0, negative_context=neg)
    want = schedule(RULE, calibrate_teacache(base, x, ctx, solver=SOLVER, guidance=5.0,
                                             negative_context=neg).input_change, STEPS)
    init = _run(hard, R.relaxed_params(hard), x, ctx)
    assert np.array_equal(np.asarray(R.gates_of(init.state)) > 0.5, want)
    assert float(jnp.max(jnp.abs(init.latents - ref.latents))) < 1e-5
    assert total_work(init.state) == total_work(ref.state)

    policy = _net_policy(rule)
    runs = {}
    for mode, temp in (("hard", 1.0), ("straight_through", 1.0), ("soft", 1e-6)):
        den = R.relaxed_cache(base, rule, mode=mode)
        runs[mode] = _run(den, R.relaxed_params(den, policy, temperature=temp), x, ctx)
    gates, feats = np.asarray(R.gates_of(runs["hard"].state)), _features(runs["hard"].state)
    forced = np.zeros(STEPS, bool)
    forced[[0, STEPS - 1]] = True                                   # first call (warm-up 1) and cut-off -1
    replay = np.where(forced, True, np.asarray(R.policy_net_logits(policy, feats)) >= 0)
    assert 0 < gates.mean() < 1 and not np.array_equal(gates > 0.5, want), "the test network must differ"
    assert np.array_equal(gates, replay.astype(np.float32))
    assert total_work(runs["hard"].state)["block_passes"] == gates.sum()
    for mode in ("straight_through", "soft"):
        assert np.allclose(np.asarray(R.gates_of(runs[mode].state)), gates, atol=1e-6), mode
        assert np.allclose(_features(runs[mode].state), feats, atol=1e-5), mode
        assert float(jnp.max(jnp.abs(runs[mode].latents - runs["hard"].latents))) < 1e-5, mode


def test_policy_net_gradients_match_finite_differences(tiny):
    """check_grads (reverse mode, central differences of step 0.05, 3% tolerance) of a loss of the final
    latents and the expected compute with respect to every weight of the network, through the 8-step
    sampler rematerialised per step."""
    base, x, ctx = tiny
    rule = R.PolicyNetRule(RULE, hidden=4)
    den = R.relaxed_cache(base, rule, mode="soft")
    p0 = R.relaxed_params(den, _net_policy(rule), temperature=0.5)

    @jax.jit
    def loss(pol):
        out = R.relaxed_sample(den, p0.replace(policy=pol), x, ctx, solver=SOLVER, guidance=5.0,
                               negative_context=jnp.zeros_like(ctx), remat="step")
        return jnp.mean(jnp.square(out.latents)) + R.compute_fraction(out.state)

    check_grads(loss, (p0.policy,), order=1, modes=("rev",), eps=0.05, atol=2e-3, rtol=3e-2)
    grads = jax.grad(loss)(p0.policy)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads)), "every weight must matter"


def test_policy_net_errors(tiny):
    base, x, ctx = tiny
    rule = R.PolicyNetRule(RULE, hidden=4)
    den = R.relaxed_cache(base, rule)
    with pytest.raises(ValueError, match="PolicyNetRule.hidden"):
        R.PolicyNetRule(RULE, hidden=0)
    with pytest.raises(ValueError, match="thresh > 0"):
        R.PolicyNetRule(ResidualCacheConfig(0.0))
    with pytest.raises(ValueError, match="temperature must be > 0.0"):
        R.relaxed_params(den, temperature=-1.0)
    with pytest.raises(ValueError, match=r"policy\['w_in'\] has shape \(4, 8\), this denoiser needs \(4, 4\)"):
        R.relaxed_params(den, R.PolicyNetRule(RULE).init_policy())
    with pytest.raises(ValueError, match="does not match"):
        R.relaxed_params(den, {"log_thresh": jnp.float32(0)})
    with pytest.raises(ValueError, match="does not match"):
        _run(den, R.relaxed_params(R.relaxed_cache(base, R.ThresholdRule(RULE))), x, ctx)


def test_resample_schedule():
    rule = R.ScheduleRule(3)
    new_rule, pol = R.resample_schedule(rule, {"logits": jnp.array([1.0, -1.0, 3.0])}, 5)
    assert new_rule == R.ScheduleRule(5)
    assert np.allclose(pol["logits"], [1.0, 0.0, -1.0, 1.0, 3.0])                 # fractions 0, 1/4, .., 1
    same = R.resample_schedule(rule, {"logits": jnp.array([1.0, -1.0, 3.0])}, 3)[1]
    assert np.array_equal(same["logits"], [1.0, -1.0, 3.0])
    with pytest.raises(ValueError, match="logits ScheduleRule"):
        R.resample_schedule(R.ScheduleRule(3, parametrization="gates"), {"gates": jnp.ones(3)}, 5)
    with pytest.raises(ValueError, match="does not match"):
        R.resample_schedule(rule, {"logits": jnp.ones(4)}, 5)
