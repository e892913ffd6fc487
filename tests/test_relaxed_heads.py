"""Per-(layer, head) XAttention thresholds as a relaxed policy: hard and straight-through runs equal
`sparse_attention(wan_denoiser(model), xattention(cfg))` with the same table (trajectory, outputs, counters),
soft at a small temperature approaches it, gradients in the thresholds pass check_grads, clear errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from policy_gradients import check_policy_gradients

from experiments.cache_policy.heads import HeadThresholdRule, relaxed_xattention, soft_xattention
from experiments.cache_policy.heads_study import learn_heads
from experiments.xattention import XAttentionConfig, antidiagonal_scores, select_blocks, xattention
from models.wan import init_transformer, wan_tiny
from models.wan.denoiser import wan_denoiser
from vidaccel import relaxed as R
from vidaccel.sampling import sample
from vidaccel.solvers import unipc
from vidaccel.sparse_attention import AttnContext, AttnSpec, sparse_attention, sparse_summary

STEPS = 3
SOLVER = unipc(STEPS)
# per-(layer, head) thresholds of the tiny model (2 layers x 2 heads), spread so that heads differ
TABLE = ((0.35, 0.8), (0.6, 0.95))


def _cfg(**kw):
    return XAttentionConfig(**{"block_size": 16, "stride": 4, "warmup_steps": 1, "backend": "gather", **kw})


@pytest.fixture(scope="module")
def tiny():
    m = init_transformer(wan_tiny(num_layers=2), seed=1)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(7), m.proj_out.kernel.shape) * 0.3)
    k = jax.random.split(jax.random.key(21), 2)
    x, ctx = jax.random.normal(k[0], (1, 4, 8, 8, 4)), jax.random.normal(k[1], (1, 3, 16))   # 64 tokens
    return wan_denoiser(m), x, ctx


@partial(jax.jit, static_argnums=0)
def _run(den, params, x, ctx):
    return R.relaxed_sample(den, params, x, ctx, solver=SOLVER, remat=False, trajectory=True)


def test_policy_masks_equal_xattention_on_fresh_inputs():
    """One layer's selection: hard and straight-through weights are XAttention's per-head masks exactly, soft at
    temperature 1e-7 within 1e-6; the attention equals the XAttention policy's (gather path) within 1e-5."""
    ks = jax.random.split(jax.random.key(4), 3)
    q, k, v = (jax.random.normal(kk, (2, 80, 3, 8)) * s for kk, s in zip(ks, (1.5, 1.5, 1.0), strict=True))
    tau = jnp.array([0.3, 0.75, 0.9])
    ctx = AttnContext(jnp.int32(3), jnp.int32(0), tau, AttnSpec(2, 80, 3, 8, 1, 4))
    cfg = _cfg()
    ref_pol = xattention(cfg)
    plan, _, _ = ref_pol.predict(q, k, (), ctx)
    want_out = ref_pol.attend(q, k, v, plan, ctx)
    mask = select_blocks(antidiagonal_scores(q, k, 4, 16), tau)
    assert 0 < float(mask.mean()) < 1
    for mode, temp in (("hard", 1.0), ("straight_through", 1.0), ("soft", 1e-7)):
        pol = soft_xattention(cfg, temp, mode)
        soft, st, _ = pol.predict(q, k, {"hard_pairs": jnp.zeros((3,))}, ctx)
        assert np.allclose(soft.weights, mask, atol=1e-6), mode
        assert np.array_equal(np.asarray(st["hard_pairs"]), np.asarray(plan.pairs)), mode
        assert float(jnp.max(jnp.abs(pol.attend(q, k, v, soft, ctx) - want_out))) < 1e-5, mode


def test_sampler_equals_sparse_attention(tiny):
    """Over 3 UniPC steps (1 dense warm-up step): hard, straight-through and soft at temperature 1e-6
    give the final latents of `sample(sparse_attention(den, xattention(cfg with TABLE)))` within 1e-5, the
    hard run's recorded trajectory within 1e-5, and its per-(layer, head) counted work; the counted density is
    `sparse_summary`'s density_overall."""
    base, x, ctx = tiny
    cfg = _cfg(threshold=TABLE)
    ref = sample(sparse_attention(base, xattention(cfg)), None, x, ctx, solver=SOLVER)
    want = sparse_summary(ref.state)
    assert 0.2 < want["density_sparse"] < 0.95, "the table must drop blocks"
    hard_traj = None
    for mode, temp in (("hard", 1.0), ("straight_through", 1.0), ("soft", 1e-6)):
        den = relaxed_xattention(base, cfg, mode=mode)
        out = _run(den, R.relaxed_params(den, {"tau": jnp.asarray(TABLE)}, temperature=temp), x, ctx)
        assert float(jnp.max(jnp.abs(out.latents - ref.latents))) < 1e-5, mode
        hard_traj = out.trajectory if hard_traj is None else hard_traj
        assert float(jnp.max(jnp.abs(out.trajectory - hard_traj))) < 1e-5, mode
        got = sparse_summary(out.state)
        assert np.allclose(got["density_per_layer_head"], want["density_per_layer_head"], atol=1e-6), mode
        assert float(R.compute_fraction(out.state, hard=True)) == pytest.approx(want["density_overall"], abs=1e-6)
        assert float(R.compute_fraction(out.state)) == pytest.approx(want["density_overall"], abs=1e-5), mode


def test_threshold_gradients(tiny):
    """check_grads (policy_gradients: central differences of 0.05, 3%) of mean(latents^2) + density w.r.t. the
    (layers, heads) table in soft mode at temperature 0.3, 2 steps without warm-up or CFG; the table stays well below
    1, where the relaxation jumps to keep-all (`soft_block_mask`)."""
    base, x, ctx = tiny
    den = relaxed_xattention(base, _cfg(warmup_steps=0), mode="soft")
    p0 = R.relaxed_params(den, {"tau": jnp.asarray(TABLE) * 0.8}, temperature=0.3)
    solver = unipc(2)
    check_policy_gradients(lambda p: R.relaxed_sample(den, p, x, ctx, solver=solver, remat=False), p0)


def test_clear_errors(tiny):
    base, _, _ = tiny
    den = relaxed_xattention(base, _cfg())
    with pytest.raises(ValueError, match=r"policy\['tau'\] has shape \(3, 2\)"):
        R.relaxed_params(den, {"tau": jnp.zeros((3, 2))})
    with pytest.raises(ValueError, match="does not match the denoiser"):
        relaxed_xattention(base, _cfg(), HeadThresholdRule(3, 2))
    with pytest.raises(ValueError, match="HeadThresholdRule.init must lie in"):
        HeadThresholdRule(2, 2, init=1.5)
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            R.relaxed_params(den, temperature=t)
    for b in (0.0, 1.5):
        with pytest.raises(ValueError, match="budget"):
            learn_heads(None, None, b, 0.9)
