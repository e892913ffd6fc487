"""The relaxed FlowCache of diffusion forcing's asynchronous chunk execution
(`experiments.cache_policy.async_relaxed`): hard, straight-through and soft at temperature 1e-6 equal
`df_method("flowcache")` through `df_sample` (per-call decisions of every chunk slot and CFG branch, latents,
counters; the K/V buffer write gated too), gradients of a loss of `df_sample` against finite differences, and
clear errors. Tiny random AR model, 3 chunks in flight (ar_step 2), 9 UniPC steps, FlowCache's warm-up 5 and
forced last call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from policy_gradients import recording, tiny_ar

from experiments.cache_policy.async_relaxed import df_compute_fraction, learn_async_threshold, relaxed_flowcache_df
from experiments.flowcache.async_df import df_method
from models.ar.diffusion_forcing import df_sample, df_work
from models.ar.window import df_chunk_denoiser
from vidaccel import relaxed as R
from vidaccel.solvers import unipc
from vidaccel.transforms import branch_states

FPB, CHUNKS, STEPS, AR_STEP = 2, 3, 9, 2
FRAMES = FPB * CHUNKS
THRESH = 1.5            # raw e0 change (no polynomial): 1 or 2 of each chunk's 3 free calls are skipped
SOLVER = unipc(STEPS)


@pytest.fixture(scope="module")
def tiny():
    return tiny_ar(CHUNKS, FPB)


def _kwargs(ctx, guidance=5.0):
    return dict(solver=SOLVER, ar_step=AR_STEP, execution="chunks", guidance=guidance,
                negative_context=jnp.zeros_like(ctx) if guidance else None)


def test_limits_equal_hard_flowcache(tiny):
    """Hard, straight-through and soft at T = 1e-6: df_method("flowcache")'s decisions per (chunk, branch, call),
    final latents within 1e-5, counted compute; hard also its work counters."""
    m, x, ctx = tiny
    den, execution = df_method("flowcache", m, window_frames=FRAMES, thresh=THRESH, coefficients=None)
    assert execution == "chunks"
    ref = df_sample(recording(den, stages=None, commit=den.commit), x, ctx, **_kwargs(ctx))
    want = np.stack([np.asarray(s.seen) > 0 for s in branch_states(ref.state)])     # (branches, 1, chunks, calls)
    free = want[..., 5:STEPS - 1]
    assert want[..., :5].all() and want[..., STEPS - 1].all() and not want[..., STEPS:].any()
    assert 0 < free.mean() < 1, "the test threshold must both skip and compute free calls"
    for mode, temp in (("hard", 1.0), ("straight_through", 1.0), ("soft", 1e-6)):
        rel = relaxed_flowcache_df(m, window_frames=FRAMES, thresh=THRESH, coefficients=None, mode=mode)
        out = df_sample(rel, x, ctx, params=R.relaxed_params(rel, temperature=temp), **_kwargs(ctx))
        gates = np.asarray(R.gates_of(out.state))
        assert np.array_equal(gates > 0.5, want), mode
        assert np.allclose(gates, want, atol=1e-6), mode
        assert float(jnp.max(jnp.abs(out.latents - ref.latents))) < 1e-5, mode
        frac = want.sum() / (want.shape[0] * CHUNKS * STEPS)
        assert float(df_compute_fraction(out.state, hard=True)) == pytest.approx(frac, abs=1e-6), mode
        assert float(df_compute_fraction(out.state)) == pytest.approx(frac, abs=1e-6), mode
        if mode == "hard":
            assert df_work(out.state) == df_work(ref.state)
    # the K/V write must be gated too: relaxed_cache alone refreshes every chunk's K/V at every call
    ungated = R.relaxed_cache(df_chunk_denoiser(m, FRAMES), rel.params.rule, mode="straight_through")
    out = df_sample(ungated, x, ctx, params=R.relaxed_params(ungated), **_kwargs(ctx))
    assert float(jnp.max(jnp.abs(out.latents - ref.latents))) > 1e-4


def test_gradients_match_finite_differences(tiny):
    """check_grads (reverse mode, central differences of step 0.05 in float32, 3% tolerance) of
    mean(latents^2) + expected compute through the whole asynchronous df_sample (soft mode, T = 0.5) w.r.t.
    log_thresh; and the loss must depend on it (else the check proves nothing)."""
    m, x, ctx = tiny
    rel = relaxed_flowcache_df(m, window_frames=FRAMES, thresh=THRESH, coefficients=None, mode="soft")
    p0 = R.relaxed_params(rel, temperature=0.5)

    @jax.jit
    def loss(policy):
        out = df_sample(rel, x, ctx, params=p0.replace(policy=policy), check_finite=False, **_kwargs(ctx, None))
        return jnp.mean(jnp.square(out.latents)) + df_compute_fraction(out.state)

    check_grads(loss, (p0.policy,), order=1, modes=("rev",), eps=0.05, atol=2e-3, rtol=3e-2)
    up = {"log_thresh": p0.policy["log_thresh"] + 0.05}
    assert abs(float(loss(up)) - float(loss(p0.policy))) > 1e-4, "the loss does not depend on the policy"


def test_clear_errors(tiny):
    m, x, ctx = tiny
    rel = relaxed_flowcache_df(m, window_frames=FRAMES, thresh=THRESH, coefficients=None)
    with pytest.raises(ValueError, match="temperature"):
        R.relaxed_params(rel, temperature=0.0)
    with pytest.raises(ValueError, match="policy does not match"):
        R.relaxed_params(rel, {"log_thresh": jnp.zeros(3)})
    with pytest.raises(ValueError, match="policy does not match"):
        R.relaxed_params(rel, {"logits": jnp.zeros(())})
    with pytest.raises(ValueError, match="thresh > 0"):
        relaxed_flowcache_df(m, window_frames=FRAMES, thresh=0.0)
    with pytest.raises(ValueError, match="mode"):
        relaxed_flowcache_df(m, window_frames=FRAMES, thresh=0.1, mode="gumbel")
    with pytest.raises(ValueError, match="budget"):
        learn_async_threshold(None, budgets=(1.5,))
