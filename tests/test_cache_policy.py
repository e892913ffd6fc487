"""experiments.cache_policy: budget-exact hardening of learned schedules, the learning loop (annealed soft
gates, iterate kept by its hard training error within the budget) on tiny t2v and AR setups, and clear
errors before any work (the studies themselves run in the notebook test and in
`python -m experiments.cache_policy`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.cache_policy import (
    BUDGET_TOLERANCE,
    ARSetup,
    Setup,
    Split,
    calibrate,
    learn_policy,
    rel_mse,
    teacache_rule,
    uniform_schedule,
)
from experiments.cache_policy.study import counted_compute, dense_run, relaxed_run
from models.ar.rollout import chunk_denoiser
from models.wan import init_transformer, wan_tiny
from models.wan.denoiser import wan_denoiser
from vidaccel.relaxed import ScheduleRule, hard_schedule, top_k_schedule
from vidaccel.solvers import unipc

STEPS = 5


def test_top_k_schedule_spends_the_budget():
    rule = ScheduleRule(6)
    logits = {"logits": jnp.array([-5.0, 0.3, -0.2, 2.0, 0.1, -1.0])}
    assert hard_schedule(rule, logits).tolist() == [True, True, False, True, True, False]   # first call forced
    for budget, want in ((0.5, [0, 1, 3]), (1 / 6, [0]), (1.0, [0, 1, 2, 3, 4, 5])):
        got = hard_schedule(rule, top_k_schedule(rule, logits, budget))
        assert np.flatnonzero(got).tolist() == want, budget
    with pytest.raises(ValueError, match="budget must be > 0.0"):
        top_k_schedule(rule, logits, 0.0)


def test_uniform_schedule():
    assert np.flatnonzero(uniform_schedule(10, 0.4) > 0).tolist() == [0, 3, 6, 9]
    assert (uniform_schedule(20, 0.5) > 0).sum() == 10
    assert np.flatnonzero(uniform_schedule(4, 0.5, chunks=2) > 0).tolist() == [0, 3, 4, 7]    # per chunk


def _split(den, x, ctx, chunks=0):
    return Split(["tiny"] * x.shape[0], x, ctx, dense_run(den, unipc(STEPS), 5.0, x, ctx, chunks=chunks).latents)


@pytest.fixture(scope="module")
def t2v():
    m = init_transformer(wan_tiny(num_layers=2), seed=5)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(7), m.proj_out.kernel.shape) * 0.3)
    k = jax.random.split(jax.random.key(3), 2)
    base = wan_denoiser(m)
    return Setup(m, base, unipc(STEPS), 5.0, _split(base, jax.random.normal(k[0], (1, 2, 4, 4, 4)),
                                                    jax.random.normal(k[1], (1, 3, 16))), None)


@pytest.fixture(scope="module")
def ar():
    m = init_transformer(wan_tiny(num_frame_per_block=2, num_layers=2), seed=5)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(7), m.proj_out.kernel.shape) * 0.3)
    k = jax.random.split(jax.random.key(4), 2)
    base = chunk_denoiser(m)
    tr = _split(base, jax.random.normal(k[0], (1, 4, 4, 4, 4)), jax.random.normal(k[1], (1, 3, 16)), chunks=2)
    return ARSetup(base, unipc(STEPS), 5.0, 2, tr.prompts, tr.noise, tr.context, tr.dense)


def _check_learned(setup, res, budget, iters):
    hist = res.history
    assert len(hist) == iters + 1 and all("loss" in h for h in hist[:-1])
    temps = [h["temperature"] for h in hist[:-1]]
    assert temps[0] == pytest.approx(1.0) and temps[-1] == pytest.approx(0.05) and np.all(np.diff(temps) < 0)
    ok = [h for h in hist if h["admissible"]]
    assert ok, "no iterate within the budget"
    kept = hist[res.best_iter]
    assert kept["admissible"] and kept["hard_rel_mse"] == min(h["hard_rel_mse"] for h in ok)
    # the kept hard policy, run again with hard decisions, reproduces the record the choice was made on
    out = jax.jit(lambda p: relaxed_run(setup, res.den_hard, p))(res.params_hard)
    counted = counted_compute(setup, out.state)
    assert counted["compute"] == pytest.approx(kept["hard_compute"])
    assert abs(kept["hard_compute"] - budget) <= BUDGET_TOLERANCE
    assert float(rel_mse(out.latents, setup.train.dense)) == pytest.approx(kept["hard_rel_mse"], rel=1e-4)
    return counted


def test_learned_threshold_starts_at_teacache_and_keeps_the_best_hard_iterate(t2v):
    cal = calibrate(t2v, log=lambda *_: None)
    _, frac = teacache_rule(cal, 0.5)
    res = learn_policy(t2v, "threshold", frac, calibration=cal, iters=2, log=lambda *_: None)
    assert res.history[0]["hard_compute"] == pytest.approx(frac)        # iterate 0 = calibrated TeaCache
    _check_learned(t2v, res, frac, 2)


def test_learned_chunk_schedule_on_ar_rollout_spends_the_budget(ar):
    cal = calibrate(ar, log=lambda *_: None)
    assert cal["config"].scope == "chunk" and cal["scope_calls"] == STEPS
    res = learn_policy(ar, "schedule", 0.5, calibration=cal, iters=2, log=lambda *_: None)
    assert res.params_hard.rule.scope == "chunk"
    sched = hard_schedule(res.params_hard.rule, res.params_hard.policy, STEPS)
    assert sched.sum() == round(0.5 * 2 * STEPS) and sched[::STEPS].all()    # each chunk's first call computed
    counted = _check_learned(ar, res, 0.5, 2)
    # 2 CFG branches; each chunk's commit (one pass per chunk and branch) is counted, and left out of "compute"
    assert counted["block_passes"] == 2 * (sched.sum() + 2) and counted["calls"] == 2 * (2 * STEPS + 2)


@pytest.mark.parametrize(("kind", "budget", "kw", "match"), [
    ("schedule", 0.0, {}, "budget must be > 0.0"),
    ("schedule", 1.5, {}, "budget must be <= 1.0"),
    ("threshold", 0.5, {"temperature": 0.0}, "temperature must be > 0.0"),
    ("net", 1.5, {}, "budget must be <= 1.0"),
    ("net", 0.5, {"temperature": -0.1}, "temperature must be > 0.0"),
    ("net", 0.5, {"final_temperature": 0.0}, "final_temperature must be > 0.0"),
    ("schedule", 0.5, {"mode": "hard"}, "mode='hard' is not allowed"),
    ("schedule", 0.5, {"iters": -1}, "iters"),
    ("layers", 0.5, {}, "kind='layers' is not allowed"),
])
def test_learn_policy_errors(kind, budget, kw, match):
    with pytest.raises(ValueError, match=match):
        learn_policy(None, kind, budget, calibration={}, **kw)
