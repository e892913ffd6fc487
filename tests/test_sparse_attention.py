"""The attention-policy hook: dense warm-up / dense layers really skip the policy, counters, state, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.teacache import teacache, teacache_config
from experiments.xattention import XAttentionConfig, xattention
from models.wan import init_transformer, wan_tiny
from models.wan.denoiser import wan_denoiser
from vidaccel.sampling import sample
from vidaccel.solvers import euler, unipc
from vidaccel.sparse_attention import (
    AttnSpec,
    Policy,
    SparseCounters,
    SparseState,
    find_sparse_state,
    sparse_attention,
    sparse_summary,
    threshold_table,
    with_thresholds,
)
from vidaccel.transforms import CFGBranches, DenoiseSpec, total_work


@functools.cache
def _model(num_frame_per_block: int = 1):
    """The tiny Wan (2 layers, 2 heads x 16) with a non-zero output head; cached (tests only read it)."""
    m = init_transformer(wan_tiny(num_layers=2, num_frame_per_block=num_frame_per_block), seed=1)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(7), m.proj_out.kernel.shape) * 0.3)
    return m


def _inputs():
    k = jax.random.split(jax.random.key(3), 2)
    return jax.random.normal(k[0], (1, 4, 8, 8, 4)), jax.random.normal(k[1], (1, 3, 16))


def _spec(steps):
    noise, ctx = _inputs()
    return DenoiseSpec(jax.ShapeDtypeStruct(noise.shape, noise.dtype), jax.ShapeDtypeStruct(ctx.shape, ctx.dtype),
                       steps)


def _sample(den, steps=3, guidance=None):
    noise, ctx = _inputs()
    return sample(den, None, noise, ctx, solver=unipc(steps), guidance=guidance,
                  negative_context=None if guidance is None else jnp.zeros_like(ctx))


def _loop(den, steps=5, guidance=3.0):
    """Euler + CFG in a Python loop over one jitted `apply` (compiled once): the final latents and the state of
    each branch. Cheaper to compile than `sample()`; the same per-branch calls."""
    noise, ctx = _inputs()
    solver = euler(steps)
    apply = jax.jit(den.apply)
    cond, uncond = den.init(_spec(steps)), den.init(_spec(steps))
    x, ss = noise, solver.init(noise)
    for i in range(steps):
        t = jnp.full((1,), solver.timesteps[i], jnp.float32)
        vc, cond = apply(den.params, cond, x, t, ctx)
        vu, uncond = apply(den.params, uncond, x, t, jnp.zeros_like(ctx))
        x, ss = solver.step(ss, i, x, vu + guidance * (vc - vu))
    return x, CFGBranches(cond, uncond)


def _forward(den, step, thresholds=None):
    """One jitted model call at sparse-state step `step` (past the warm-up when step >= its length)."""
    noise, ctx = _inputs()
    state = den.init(_spec(10))
    if hasattr(state, "step"):
        state = state.replace(step=jnp.int32(step))
        if thresholds is not None:
            state = with_thresholds(state, thresholds)
    return jax.jit(den.apply)(den.params, state, noise, jnp.full((1,), 500.0), ctx)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _counting(policy: Policy, calls: list) -> Policy:
    """`policy` whose mask prediction reports each real execution to a Python list (a host callback)."""
    def predict(q, k, state, ctx):
        jax.debug.callback(lambda layer, step: calls.append((int(step), int(layer))), ctx.layer, ctx.step)
        return policy.predict(q, k, state, ctx)
    return Policy(policy.name, policy.init, predict, policy.attend, policy.thresholds, policy.dense_steps,
                  policy.dense_layers, policy.tiles_dense)


def test_warmup_and_dense_layers_skip_the_policy_and_are_counted():
    """5 steps, 2 warm-up steps, layer 1 dense: the prediction runs only for layer 0 at steps 2..4, per CFG
    branch (checked by a host callback inside the compiled scan), and the counters say the same."""
    calls = []
    pol = _counting(xattention(XAttentionConfig(block_size=16, stride=4, warmup_steps=2, dense_layers=(1,),
                                                threshold=0.5, backend="reference")), calls)
    _, states = _loop(sparse_attention(wan_denoiser(_model()), pol), steps=5)
    jax.effects_barrier()
    assert sorted(calls) == sorted([(s, 0) for s in (2, 3, 4)] * 2)
    for branch in ("cond", "uncond"):
        c = getattr(states, branch).counters
        np.testing.assert_array_equal(c.calls, [5, 5])
        np.testing.assert_array_equal(c.dense_calls, [2, 5])
        np.testing.assert_array_equal(c.predictions, [3, 0])
        assert float(c.pairs[1].sum()) == 0.0 and float(c.pairs[0].sum()) > 0
    s = sparse_summary(states)
    assert (s["attention_calls"], s["dense_calls"], s["sparse_calls"], s["predictions"]) == (20, 14, 6, 6)
    assert 0 < s["density_sparse"] < 1 and s["density_sparse"] < s["density_overall"] < 1
    assert total_work(states) == {"calls": 10, "block_passes": 10, "token_layers": 10 * 64 * 2}


def test_summary_by_hand():
    """One layer, 2 heads, batch 1, 4 tokens: 3 calls, 1 dense; pairs 8 + 4 over 2 sparse calls of 16 per head."""
    spec = AttnSpec(batch=1, tokens=4, heads=2, head_dim=8, layers=1, steps=3)
    c = SparseCounters.zero(1, 2).replace(calls=jnp.array([3]), dense_calls=jnp.array([1]),
                                          predictions=jnp.array([1]), reused=jnp.array([1]),
                                          pairs=jnp.array([[8.0, 4.0]]), tiles=jnp.array([[2.0, 1.0]]),
                                          tiles_dense=jnp.array([4.0]), estimate_flops=jnp.array([64.0]))
    st = SparseState(None, jnp.int32(3), (), c, jnp.ones((1, 2)), spec)
    s = sparse_summary(CFGBranches(st, st))
    assert s["density_sparse"] == pytest.approx(12 / 64)
    assert s["density_overall"] == pytest.approx((12 + 32) / 96)
    assert s["tile_density"] == pytest.approx(3 / 8)
    assert s["reuse_fraction"] == pytest.approx(0.5)
    assert s["density_per_layer_head"] == [[0.25, 0.125]]
    dense_flops = 4 * 8 * 16 * 2 * 6
    assert s["attention_flops_ratio"] == pytest.approx((4 * 8 * (24 + 64) + 128) / dense_flops)


def test_thresholds_are_state_and_compose_with_teacache():
    model = _model()
    den = sparse_attention(wan_denoiser(model), xattention(XAttentionConfig(block_size=16, stride=4, warmup_steps=1,
                                                                            backend="reference")))
    st = den.init(_spec(5))
    np.testing.assert_array_equal(st.thresholds, np.full((2, 2), 0.9, np.float32))
    st2 = with_thresholds(st, [[0.5, 0.6], [0.7, 1.0]])
    np.testing.assert_allclose(st2.thresholds, [[0.5, 0.6], [0.7, 1.0]])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        with_thresholds(st, [0.5, 0.6, 0.7])
    # the result is still staged: TeaCache at threshold 0 wraps it without changing anything
    a = _sample(den)
    b = _sample(teacache(den, teacache_config(0.0, (1.0, 0.0))))
    np.testing.assert_allclose(b.latents, a.latents, rtol=0, atol=1e-6)
    assert sparse_summary(b.state)["predictions"] == sparse_summary(a.state)["predictions"] == 2 * 2
    assert isinstance(find_sparse_state(b.state), SparseState)


def test_threshold_table():
    np.testing.assert_array_equal(threshold_table(0.5, 2, 3), np.full((2, 3), 0.5, np.float32))
    np.testing.assert_array_equal(threshold_table([0.1, 0.2, 0.3], 2, 3)[1], np.float32([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        threshold_table([[0.1, 0.2], [0.3, 0.4]], 2, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        threshold_table(1.5, 2, 3)


def test_errors():
    model = _model()
    pol = xattention(XAttentionConfig(block_size=16, stride=4))
    with pytest.raises(TypeError, match="needs a Policy"):
        sparse_attention(wan_denoiser(model), XAttentionConfig())
    with pytest.raises(ValueError, match="no stages"):
        sparse_attention(teacache(wan_denoiser(model), teacache_config(0.1, None)), pol)
    with pytest.raises(ValueError, match="block-causal"):
        sparse_attention(wan_denoiser(_model(num_frame_per_block=2)), pol)
    with pytest.raises(ValueError, match=r"dense_layers=\(5,\) holds \[5\]"):
        sparse_attention(wan_denoiser(model), xattention(XAttentionConfig(block_size=16, stride=4, dense_layers=(5,))))
    with pytest.raises(ValueError, match="thresholds has shape"):
        sparse_attention(wan_denoiser(model), xattention(XAttentionConfig(threshold=(0.5, 0.5, 0.5))))
    with pytest.raises(ValueError, match="no SparseState"):
        find_sparse_state(wan_denoiser(model).init(None))
