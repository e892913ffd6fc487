"""Per-layer attention reuse learned under a budget (experiments.cache_policy.layers): the budget-exact hard
version (`top_k_layers`), and the learning loop on a tiny t2v setup keeping a hard schedule that spends its
budget by the relaxed denoiser's counter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.cache_policy import Setup, Split
from experiments.cache_policy.layers import learn_layers, setup_share, uniform_layers
from experiments.cache_policy.study import BUDGET_TOLERANCE, dense_run
from models.wan import init_transformer, wan_tiny
from models.wan.denoiser import wan_denoiser
from vidaccel.relaxed import LayerRule, top_k_layers
from vidaccel.solvers import unipc


def test_top_k_layers_spends_the_budget_and_forces_the_first_call():
    rule, share = LayerRule(4, 2), 0.4
    logits = {"logits": jnp.array([[-9.0, -9.0], [2.0, -1.0], [0.5, 3.0], [-2.0, 0.1]])}
    got = np.asarray(top_k_layers(rule, logits, 0.8, share)["logits"]) > 0
    # k = round((0.8 - 0.6) / 0.4 x 8) = 4 gates: the first call's 2, then the two highest logits
    assert got.tolist() == [[True, True], [True, False], [False, True], [False, False]]
    assert (1 - share) + share * got.mean() == pytest.approx(0.8)
    assert np.asarray(top_k_layers(rule, logits, 1.0, share)["logits"]).min() == 1.0
    with pytest.raises(ValueError, match=r"a budget lies in \[0\.7000, 1\]"):
        top_k_layers(rule, logits, 0.5, share)
    with pytest.raises(ValueError, match="budget must be > 0.0"):
        top_k_layers(rule, logits, 0.0, share)
    uni = np.asarray(uniform_layers(rule, 0.8, share)["logits"]) > 0
    assert uni[:, 0].tolist() == uni[:, 1].tolist() and uni[0].all()          # all layers at the same calls


def test_learned_layer_schedule_holds_its_budget():
    m = init_transformer(wan_tiny(num_layers=2), seed=5)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(7), m.proj_out.kernel.shape) * 0.3)
    k = jax.random.split(jax.random.key(3), 2)
    base, solver = wan_denoiser(m), unipc(5)
    x, ctx = jax.random.normal(k[0], (1, 2, 4, 4, 4)), jax.random.normal(k[1], (1, 3, 16))
    setup = Setup(m, base, solver, 5.0, Split(["tiny"], x, ctx, dense_run(base, solver, 5.0, x, ctx).latents), None)
    share = setup_share(setup)
    budget = 1.0 - share / 2                                   # half of the (call, layer) attentions
    res = learn_layers(setup, budget, iters=2, log=lambda *a: None)
    hist = res["history"]
    assert len(hist) == 3 and all(abs(h["hard_compute"] - budget) <= BUDGET_TOLERANCE for h in hist)
    assert res["best_iter"] == int(np.argmin([h["hard_rel_mse"] for h in hist]))
    kept = np.asarray(res["policy"]["logits"]) > 0
    assert kept[0].all() and kept.shape == (5, 2)
