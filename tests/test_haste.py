"""HASTE: Temporal Mask Reuse decisions on constant vs drifting inputs (and that a reuse skips the prediction),
the EBC solvers against brute force, the calibration measurements, table files, the dense trajectory, and
errors."""

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sparse_attention import _counting, _inputs, _loop, _model, _rel, _spec

from experiments.haste import (
    EBCConfig,
    EBCTable,
    HasteConfig,
    TMRConfig,
    calibrate_ebc,
    dense_trajectory,
    drift,
    haste,
    head_reuse_counts,
    load_ebc_table,
    measure_ebc,
    pool_blocks,
    solve_budget,
    solve_dp,
    solve_lagrangian,
    temporal_mask_reuse,
)
from experiments.svg2 import SVG2Config, svg2
from experiments.xattention import XAttentionConfig, xattention
from models.wan.denoiser import wan_denoiser
from vidaccel.sampling import sample
from vidaccel.solvers import euler, unipc
from vidaccel.sparse_attention import AttnContext, AttnSpec, sparse_attention, sparse_summary

SPEC = AttnSpec(batch=1, tokens=64, heads=2, head_dim=16, layers=1, steps=10)


def _qk(seed=0):
    k = jax.random.split(jax.random.key(seed), 2)
    return (jax.random.normal(k[0], (1, 64, 2, 16)), jax.random.normal(k[1], (1, 64, 2, 16)))


def _decisions(policy, qk_at_step, steps=7):
    """Run the TMR policy's predict for `steps` steps (one jitted function); 'P' = predicted, 'R' = reused."""
    state = jax.tree.map(lambda x: x[0], policy.init(SPEC))
    predict = jax.jit(policy.predict)
    out, plans = [], []
    for s in range(steps):
        q, k = qk_at_step(s)
        ctx = AttnContext(jnp.int32(s), jnp.int32(0), jnp.full((2,), 0.7), SPEC)
        plan, state, stats = predict(q, k, state, ctx)
        assert int(stats.predicted) + int(stats.reused) == 1
        out.append("R" if int(stats.reused) else "P")
        plans.append(plan)
    return "".join(out), plans


def test_tmr_constant_vs_drifting_inputs():
    """Constant q, k: zero drift, so reuse until R_max = 3 steps after the anchor: P R R P R R P. Head 1's q grows
    by 1.3x a step (pooled logits drift 0.3 after one step, 0.69 after two), head 0 stays: with trigger "max"
    and epsilon 0.2 every step predicts; with "mean" (0.15, then 0.345) every other step is reused."""
    q, k = _qk()
    base = xattention(XAttentionConfig(block_size=16, stride=4, backend="reference"))
    calls = []
    tmr = temporal_mask_reuse(_counting(base, calls), TMRConfig(epsilon=0.2, max_interval=3, pool_block=16))
    seq, plans = _decisions(tmr, lambda s: (q, k))
    jax.effects_barrier()
    assert seq == "PRRPRRP"
    assert len(calls) == 3                                         # a reused step ran no prediction at all
    np.testing.assert_array_equal(plans[1].indices, plans[0].indices)
    grow = lambda s: (q.at[:, :, 1].multiply(1.3 ** s), k)  # noqa: E731
    assert _decisions(temporal_mask_reuse(base, TMRConfig(epsilon=0.2, max_interval=9, pool_block=16)), grow)[0] \
        == "PPPPPPP"
    assert _decisions(temporal_mask_reuse(base, TMRConfig(epsilon=0.2, max_interval=9, pool_block=16,
                                                          trigger="mean")), grow)[0] == "PRPRPRP"


def test_tmr_reuses_svg2_labels_and_permutations():
    q, k = _qk(1)
    base = svg2(SVG2Config(num_q_clusters=4, num_k_clusters=8, block_q=16, block_k=16, backend="reference"))
    seq, plans = _decisions(temporal_mask_reuse(base, TMRConfig(epsilon=0.05, max_interval=2, pool_block=16)),
                            lambda s: (q * (1 + 1e-4 * s), k), steps=3)
    assert seq == "PRP"
    for f in ("q_labels", "k_labels", "q_perm", "k_perm", "cluster_mask", "kv_ranges"):
        np.testing.assert_array_equal(getattr(plans[1], f), getattr(plans[0], f))


def test_drift_and_pooling_by_hand():
    x = jnp.arange(10.0).reshape(1, 10, 1, 1)
    np.testing.assert_allclose(np.asarray(pool_blocks(x, 4))[0, 0, :, 0], [1.5, 5.5, 8.5])
    q, k = _qk()
    qp, kp = pool_blocks(q, 16), pool_blocks(k, 16)
    np.testing.assert_allclose(drift(qp, kp * 1.5, qp, kp, "logits"), 0.5, rtol=1e-5)
    np.testing.assert_allclose(drift(qp * 0.8, kp, qp, kp, "qk"), 0.2, rtol=1e-5)
    np.testing.assert_allclose(drift(qp, kp, qp, kp), 0.0, atol=1e-7)


def test_haste_keep_all_equals_dense_over_a_run():
    """TMR + a (layers, heads) table of ones over a 5-step CFG run equals dense (<= 1e-5), with masks reused."""
    model = _model()
    ref, _ = _loop(wan_denoiser(model))
    pol = haste(xattention(XAttentionConfig(block_size=16, stride=4, warmup_steps=1, backend="reference")),
                HasteConfig(tmr=TMRConfig(epsilon=1e9, max_interval=3, pool_block=16), thresholds=np.ones((2, 2))))
    x, states = _loop(sparse_attention(wan_denoiser(model), pol))
    assert _rel(x, ref) <= 1e-5
    s = sparse_summary(states)
    assert (s["sparse_calls"], s["predictions"], s["reused"]) == (16, 8, 8) and s["density_sparse"] == 1.0


def _brute(err, dens, budget):
    m, p = err.shape
    best, arg = np.inf, None
    for c in itertools.product(range(p), repeat=m):
        idx = np.arange(m), np.array(c)
        if dens[idx].mean() <= budget + 1e-12 and err[idx].sum() < best - 1e-15:
            best, arg = err[idx].sum(), np.array(c)
    return best, arg


def test_ebc_solvers_against_brute_force():
    """5 heads x 4 candidates, random densities and errors: DP equals brute force; the Lagrangian is feasible and
    never better than the optimum, and equals it on a convex instance."""
    rng = np.random.default_rng(0)
    for _ in range(6):
        dens = np.sort(rng.random((5, 4)), axis=1)
        err = np.sort(rng.random((5, 4)), axis=1)[:, ::-1].copy()
        budget = float(rng.uniform(dens.min(1).mean(), dens.max(1).mean()))
        best, _ = _brute(err, dens, budget)
        c = solve_dp(err, dens, budget)
        idx = np.arange(5), c
        assert dens[idx].mean() <= budget + 1e-12 and err[idx].sum() == pytest.approx(best, abs=1e-12)
        c = solve_lagrangian(err, dens, budget)
        assert dens[np.arange(5), c].mean() <= budget + 1e-12 and err[np.arange(5), c].sum() >= best - 1e-12
    # convex: e = (1 - rho)^2 scaled per head; densities 0.25 steps; budget reached exactly by the hull
    dens = np.tile([0.25, 0.5, 0.75, 1.0], (3, 1))
    err = np.array([[1.0], [2.0], [4.0]]) * (1 - dens) ** 2
    best, arg = _brute(err, dens, 0.5)
    np.testing.assert_array_equal(solve_lagrangian(err, dens, 0.5), arg)
    np.testing.assert_array_equal(solve_dp(err, dens, 0.5), arg)
    with pytest.raises(ValueError, match="max_states=1"):
        solve_dp(err, dens, 1.0, max_states=1)
    with pytest.raises(ValueError, match="below the least achievable"):
        solve_dp(err, dens, 0.1)
    with pytest.raises(ValueError, match="matching"):
        solve_lagrangian(err, dens[:, :2], 0.5)
    np.testing.assert_array_equal(solve_budget(err, dens, 0.5, "lagrangian"), arg)
    with pytest.raises(ValueError, match="solver='greedy'"):
        solve_budget(err, dens, 0.5, "greedy")


def test_dense_trajectory_is_the_guided_sampler_path():
    """EBC's inputs are the latents before every step of the dense guided run: the noise first, then each one
    solver step of the guided velocity at the previous one (a Python loop over one model call), and one more
    step from the last gives sample()'s output."""
    model = _model()
    noise, ctx = _inputs()
    neg = jnp.zeros_like(ctx)
    solver, g = euler(4), 3.0
    xs = dense_trajectory(model, noise, ctx, neg, solver, g)
    assert xs.shape == (4,) + noise.shape
    den = wan_denoiser(model)
    apply = jax.jit(lambda x, t, c: den.apply(den.params, den.init(_spec(4)), x, t, c)[0])
    x, ss = noise, solver.init(noise)
    for i in range(4):
        assert _rel(xs[i], x) <= 1e-5
        t = jnp.full((1,), solver.timesteps[i], jnp.float32)
        vc, vu = apply(x, t, ctx), apply(x, t, neg)
        x, ss = solver.step(ss, i, x, vu + g * (vc - vu))
    assert _rel(xs[3], xs[2]) > 1e-3
    out = sample(den, None, noise, ctx, solver=solver, guidance=g, negative_context=neg)
    assert _rel(out.latents, x) <= 1e-5


@pytest.mark.slow
def test_calibration_measures_per_head_error_and_density(tmp_path):
    """On the tiny model: p = 1 costs no error at density 1; p = 0.3 costs error at lower density, for every head;
    the budget defaults to the shared reference threshold's density; the table round-trips through JSON and
    drives HASTE."""
    model = _model()
    pol = xattention(XAttentionConfig(block_size=16, stride=4, warmup_steps=1, backend="reference"))
    k = jax.random.split(jax.random.key(3), 2)
    noise, ctx = jax.random.normal(k[0], (1, 4, 8, 8, 4)), jax.random.normal(k[1], (1, 3, 16))
    cfg = EBCConfig(candidates=(0.3, 1.0), reference_threshold=0.3, positions=(0.5,))
    err, dens, meta = measure_ebc(model, pol, noise, ctx, jnp.zeros_like(ctx), cfg, solver=unipc(4),
                                  log=lambda *_: None)
    assert err.shape == dens.shape == (2, 2, 2) and meta["steps"] == [2]
    assert np.all(err[..., 1] < 1e-10) and np.all(dens[..., 1] == 1.0)
    assert np.all(err[..., 0] > 1e-8) and np.all(dens[..., 0] < 1.0)
    table = calibrate_ebc(model, pol, noise, ctx, jnp.zeros_like(ctx), cfg, solver=unipc(4), log=lambda *_: None)
    assert table.budget == pytest.approx(dens[..., 0].mean())
    np.testing.assert_allclose(table.thresholds, 0.3)          # the only table meeting that budget
    table = table.resolve(float(dens[..., 0].mean() + 0.5 * (1 - dens[..., 0]).min()))
    np.testing.assert_allclose(np.unique(table.thresholds), [0.3, 1.0])
    path = tmp_path / "ebc.json"
    table.save(path)
    back = load_ebc_table(path)
    np.testing.assert_array_equal(back.thresholds, table.thresholds)
    st = sparse_attention(wan_denoiser(model), haste(pol, HasteConfig(thresholds=path))).init(_spec(4))
    np.testing.assert_allclose(st.thresholds, table.thresholds)


def test_table_files_and_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"thresholds": [[0.5]]}))
    with pytest.raises(ValueError, match="not an EBC table"):
        load_ebc_table(bad)
    with pytest.raises(FileNotFoundError, match="no EBC table"):
        HasteConfig(thresholds=tmp_path / "missing.json")
    t = EBCTable(np.full((1, 2), 0.5, np.float32), (0.5, 1.0), np.zeros((1, 2, 2)), np.ones((1, 2, 2)), 0.5, "dp")
    t.save(tmp_path / "t.json")
    assert HasteConfig(thresholds=tmp_path / "t.json").thresholds == ((0.5, 0.5),)
    pol = haste(xattention(XAttentionConfig(block_size=16, stride=4)), HasteConfig(thresholds=tmp_path / "t.json"))
    with pytest.raises(ValueError, match=r"thresholds has shape \(1, 2\)"):
        sparse_attention(wan_denoiser(_model()), pol)                    # the model has 2 layers
    for kw, msg in [({"epsilon": -1}, "TMRConfig.epsilon must be >= 0, got -1"),
                    ({"max_interval": 0}, "TMRConfig.max_interval must be >= 1, got 0"),
                    ({"drift": "l2"}, "drift='l2'"), ({"trigger": "any"}, "trigger='any'"),
                    ({"pool_block": 0}, "TMRConfig.pool_block must be >= 1, got 0")]:
        with pytest.raises(ValueError, match=msg):
            TMRConfig(**kw)
    for kw, msg in [({"candidates": (0.5, 1.5)}, "candidates"),
                    ({"budget": 0.0}, "EBCConfig.budget must be > 0, got 0.0"),
                    ({"reference_threshold": 0.33}, "reference_threshold=0.33"),
                    ({"solver": "greedy"}, "solver='greedy'"),
                    ({"positions": (1.0,)}, "positions")]:
        with pytest.raises(ValueError, match=msg):
            EBCConfig(**kw)
    with pytest.raises(ValueError, match="HasteConfig.tmr"):
        HasteConfig(tmr=0.1)
    with pytest.raises(ValueError, match="HasteConfig.thresholds"):
        HasteConfig(thresholds=[0.5, 0.6])
    with pytest.raises(TypeError, match="base Policy"):
        haste(XAttentionConfig())


# ------------------------------------------------------------------------------------------ per-head TMR
def _head_run(policy, qk_at_step, steps=7):
    """Per step: stats (predicted, reused, estimate FLOPs), the plan, and the final TMR state."""
    state = jax.tree.map(lambda x: x[0], policy.init(SPEC))
    predict = jax.jit(policy.predict)
    stats, plans = [], []
    for s in range(steps):
        q, k = qk_at_step(s)
        ctx = AttnContext(jnp.int32(s), jnp.int32(0), jnp.full((2,), 0.7), SPEC)
        plan, state, st = predict(q, k, state, ctx)
        stats.append((int(st.predicted), int(st.reused), float(st.estimate_flops)))
        plans.append(plan)
    return stats, plans, state


def _xbase():
    return xattention(XAttentionConfig(block_size=16, stride=4, backend="reference"))


def test_per_head_tmr_at_epsilon_zero_is_the_base_policy():
    """epsilon 0: no drift is below it, so every head predicts every step and each plan is the base's own."""
    q, k = _qk()
    base = _xbase()
    walk = lambda s: (q * (1 + 0.01 * s), k)  # noqa: E731
    stats, plans, state = _head_run(temporal_mask_reuse(base, TMRConfig(epsilon=0.0, pool_block=16,
                                                                        granularity="head")), walk)
    base_state = jax.tree.map(lambda x: x[0], base.init(SPEC))
    for s, plan in enumerate(plans):
        ctx = AttnContext(jnp.int32(s), jnp.int32(0), jnp.full((2,), 0.7), SPEC)
        ref, _, ref_stats = base.predict(*walk(s), base_state, ctx)
        for f in ("indices", "counts", "pairs", "tiles"):
            np.testing.assert_array_equal(getattr(plan, f), getattr(ref, f))
        assert stats[s] == (1, 0, pytest.approx(float(ref_stats.estimate_flops)))
    assert head_reuse_counts(state) == {"head_masks_predicted": 14, "head_masks_reused": 0,
                                        "head_reuse_fraction": 0.0}


def test_per_head_tmr_with_huge_epsilon_reuses_up_to_r_max():
    """epsilon 1e9: whatever the inputs do, every head reuses until R_max = 3 steps after its anchor:
    P R R P R R P for both heads; a reused call runs no prediction at all."""
    calls = []
    qs = [_qk(s) for s in range(7)]
    tmr = temporal_mask_reuse(_counting(_xbase(), calls), TMRConfig(epsilon=1e9, max_interval=3, pool_block=16,
                                                                      granularity="head"))
    stats, plans, state = _head_run(tmr, lambda s: qs[s])
    jax.effects_barrier()
    assert "".join("R" if r else "P" for _, r, _ in stats) == "PRRPRRP"
    assert len(calls) == 3
    np.testing.assert_array_equal(plans[2].indices, plans[0].indices)
    np.testing.assert_array_equal(state.anchor_step, [6, 6])
    assert head_reuse_counts(state)["head_masks_reused"] == 8
    assert head_reuse_counts(state)["head_masks_predicted"] == 6


def test_per_head_decisions_differ_from_per_layer_ones():
    """Head 0 constant, head 1's q grows 1.3x a step (pooled-logit drift 0.3 after one step), epsilon 0.2:
    per layer ("max") every step predicts; per head, head 0 reuses its step-0 mask for steps 1-6 while head 1
    predicts every step. Per-head counts: head 0 1 predicted / 6 reused, head 1 7 / 0; the counted prediction
    FLOPs are half the base's after step 0 (one head of two); plans mix the heads accordingly."""
    q, k = _qk()
    grow = lambda s: (q.at[:, :, 1].multiply(1.3 ** s), k)  # noqa: E731
    cfg = TMRConfig(epsilon=0.2, max_interval=9, pool_block=16)
    layer_stats, _, layer_state = _head_run(temporal_mask_reuse(_xbase(), cfg), grow)
    head_stats, plans, state = _head_run(
        temporal_mask_reuse(_xbase(), dataclasses.replace(cfg, granularity="head")), grow)
    assert [r for _, r, _ in layer_stats] == [0] * 7
    np.testing.assert_array_equal(layer_state.head_predicted, [7, 7])
    np.testing.assert_array_equal(state.head_predicted, [1, 7])
    np.testing.assert_array_equal(state.head_reused, [6, 0])
    np.testing.assert_array_equal(state.anchor_step, [0, 6])
    assert [(p, r) for p, r, _ in head_stats] == [(1, 0)] * 7      # any head predicting counts as predicted
    full = head_stats[0][2]
    assert all(f == pytest.approx(full / 2) for _, _, f in head_stats[1:])
    base = _xbase()
    base_state = jax.tree.map(lambda x: x[0], base.init(SPEC))
    ctx = AttnContext(jnp.int32(6), jnp.int32(0), jnp.full((2,), 0.7), SPEC)
    fresh = base.predict(*grow(6), base_state, ctx)[0]
    np.testing.assert_array_equal(plans[6].indices[:, 0], plans[0].indices[:, 0])
    np.testing.assert_array_equal(plans[6].indices[:, 1], fresh.indices[:, 1])
    np.testing.assert_array_equal(plans[6].pairs, [plans[0].pairs[0], fresh.pairs[1]])
    assert head_reuse_counts([state, layer_state]) == {"head_masks_predicted": 22, "head_masks_reused": 6,
                                                       "head_reuse_fraction": 6 / 28}


def test_per_head_tmr_runs_svg2_and_a_whole_model():
    """SVG2 plans (labels, permutations, ranges) select per head, and a per-head HASTE denoiser samples; at
    epsilon 0 it gives the base policy's latents exactly."""
    q, k = _qk(1)
    base = svg2(SVG2Config(num_q_clusters=4, num_k_clusters=8, block_q=16, block_k=16, backend="reference"))
    stats, plans, state = _head_run(temporal_mask_reuse(base, TMRConfig(epsilon=0.05, max_interval=2, pool_block=16,
                                                                        granularity="head")),
                                    lambda s: (q * (1 + 1e-4 * s), k), steps=3)
    assert [r for _, r, _ in stats] == [0, 1, 0]
    np.testing.assert_array_equal(plans[1].q_perm, plans[0].q_perm)
    model = _model()
    pol = xattention(XAttentionConfig(block_size=16, stride=4, threshold=0.5, backend="reference"))
    outs = []
    for tmr in (None, TMRConfig(epsilon=0.0, pool_block=16, granularity="head")):
        den = sparse_attention(wan_denoiser(model), haste(pol, HasteConfig(tmr=tmr)))
        outs.append(np.asarray(_loop(den, steps=4)[0]))
    np.testing.assert_array_equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="granularity"):
        TMRConfig(granularity="block")
