"""MotionCache: the per-token rule and motion weights by hand, the partial forward against the full forward,
exactness at threshold 0, and counters against a count taken while the compiled rollout runs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.motioncache import MotionCacheConfig, decide_tokens, motion_weights, motioncache, patchify
from models.ar.rollout import RolloutConfig, chunk_denoiser, rollout
from models.wan import init_transformer, wan_tiny
from models.wan.denoiser import wan_denoiser
from vidaccel.solvers import euler
from vidaccel.transforms import DenoiseSpec, total_work

FPB = 2


def _model(num_layers=2):
    m = init_transformer(wan_tiny(num_frame_per_block=FPB, num_layers=num_layers), seed=5)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(7), m.proj_out.kernel.shape) * 0.3)
    return m


def _inputs(chunks=2, batch=1):
    k = jax.random.split(jax.random.key(3), 2)
    return jax.random.normal(k[0], (batch, chunks * FPB, 4, 4, 4)), jax.random.normal(k[1], (batch, 3, 16))


def _plain(**kw):
    """The rule without the code-only heuristics and the warm-up/phase lengths the hand examples use."""
    base = dict(thresh=0.3, coefficients=None, warmup=1, phase1_updates=1, temporal_vote=None, min_update_ratio=0.0)
    return MotionCacheConfig(**{**base, **kw})


def _run(cfg, acc, weights, deltas, phase1=0, frames=2, start=0):
    acc, phase1, got = jnp.asarray([acc], jnp.float32), jnp.asarray([phase1]), []
    for i, d in enumerate(deltas):
        upd, acc, phase1 = decide_tokens(cfg, acc, jnp.asarray([weights], jnp.float32), jnp.float32(d),
                                         jnp.int32(start + i), phase1, frames)
        got.append((np.asarray(upd[0]).tolist(), np.round(np.asarray(acc[0], np.float64), 6).tolist(), int(phase1[0])))
    return got


def test_decide_tokens_by_hand():
    """Tokens of 2 frames x 2 positions, weights (1, .5, .8, .6), thresh .3, warm-up 1, phase 1 = 1 update:
    call 0 forced; call 1 phase 1 (w = 1): .2 everywhere, nothing; call 2: .35 everywhere, all update
    (phase 1 done); call 3 phase 2: .4 x w = (.4, .2, .32, .24) -> tokens 0 and 2 update."""
    got = _run(_plain(), [0, 0, 0, 0], [1, .5, .8, .6], [9.0, .2, .15, .4])
    assert got == [([True] * 4, [0.0] * 4, 0),
                   ([False] * 4, [0.2] * 4, 0),
                   ([True] * 4, [0.0] * 4, 1),
                   ([True, False, True, False], [0.0, 0.2, 0.0, 0.24], 1)]


def test_temporal_vote_and_min_update_ratio_by_hand():
    """Vote 0.5: position 1 is selected in 1 of 2 frames, so token 3 (>= thresh) is voted out and keeps its
    sum. Vote 0.4: 1 of 2 frames is enough, so token 2 (< thresh) is voted in and reset. Min ratio 0.4: one
    token of four (.25) skips the forward and nothing is reset; two of four (.5) run."""
    vote = _plain(temporal_vote=0.5, phase1_updates=0)
    assert _run(vote, [0.3, 0.0, 0.3, 0.3], [1, 1, 1, 1], [0.05], start=1) == \
        [([True, False, True, False], [0.0, 0.05, 0.0, 0.35], 0)]
    assert _run(_plain(temporal_vote=0.4, phase1_updates=0), [0.3, 0.0, 0.2, 0.3], [1] * 4, [0.05], start=1) == \
        [([True] * 4, [0.0] * 4, 0)]
    ratio = _plain(min_update_ratio=0.4, phase1_updates=0)
    assert _run(ratio, [0.3, 0.0, 0.0, 0.0], [1, 1, 1, 1], [0.05], start=1) == \
        [([False] * 4, [0.35, 0.05, 0.05, 0.05], 0)]
    assert _run(ratio, [0.3, 0.3, 0.0, 0.0], [1, 1, 1, 1], [0.05], start=1) == \
        [([True, True, False, False], [0.0, 0.0, 0.05, 0.05], 0)]
    # threshold 0: every token of every call
    assert _run(_plain(thresh=0.0), [0, 0, 0, 0], [1] * 4, [0.0, -1.0])[1][0] == [True] * 4


def test_motion_weights_by_hand():
    """Frames (1, 2) and (1, 4) at 2 positions, previous chunk's last frame (0, 2): absolute maps (1, 0) and
    (0, 2) -> min-max -> 0.6 + 0.4 x: (1, .6, .6, 1). Without a previous chunk frame 0 copies frame 1's map;
    relative maps divide by the previous frame's magnitude."""
    src = jnp.asarray([[[[1.0], [2.0]], [[1.0], [4.0]]]])
    prev = jnp.asarray([[[0.0], [2.0]]])
    np.testing.assert_allclose(motion_weights(src, prev, True, 0.6, False), [[1, .6, .6, 1]], atol=1e-6)
    np.testing.assert_allclose(motion_weights(src, prev, False, 0.6, False), [[.6, 1, .6, 1]], atol=1e-6)
    np.testing.assert_allclose(motion_weights(src, jnp.asarray([[[2.0], [1.0]]]), True, 0.5, True),
                               [[.5, 1, .5, 1]], atol=1e-6)      # relative maps: (.5, 1) and (0, 1)
    x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(1, 2, 4, 4, 1)
    assert patchify(x, (1, 2, 2))[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]      # token (f0, h0, w1)


def _chunk_setup(kv_mode="clean"):
    """A chunk denoiser with chunk 0 committed; the embedded chunk 1 at t = 600 and its plain forward."""
    model = _model()
    den = chunk_denoiser(model, RolloutConfig(kv_mode=kv_mode))
    noise, ctx = _inputs()
    spec = DenoiseSpec(jax.ShapeDtypeStruct(noise[:, :FPB].shape, noise.dtype),
                       jax.ShapeDtypeStruct(ctx.shape, ctx.dtype), 4, 2)
    state = den.commit(den.params, den.init(spec), noise[:, :FPB], ctx)
    emb, state = den.stages.embed(den.params, state, noise[:, FPB:], jnp.full((1,), 600.0), ctx)
    ref, full = den.stages.blocks(den.params, state, emb)
    return den, state, full, emb, ref


def test_partial_forward_equals_full_forward():
    """All tokens (permuted, through the gather/scatter path) = the full forward (<= 1e-5); a subset, with
    the buffer holding this input's K/V, gives its tokens exactly the full forward's outputs; padding
    entries write nothing; stale K/V stay where tokens are not computed."""
    den, state, full, emb, ref = _chunk_setup()
    partial = jax.jit(den.stages.partial)
    n = emb.tokens.shape[1]
    perm = jax.random.permutation(jax.random.key(0), n)[None].astype(jnp.int32)
    out, st_p = partial(den.params, state, emb, perm, jnp.ones((1, n), bool))
    assert float(jnp.abs(out - ref[:, perm[0]]).max()) <= 1e-5
    np.testing.assert_allclose(st_p.own[0], full.own[0], atol=1e-5)

    idx = jnp.asarray([[5, 1, 6, 3, 7, 0]], jnp.int32)                  # last two entries are padding
    valid = jnp.asarray([[True] * 4 + [False] * 2])
    out, st_sub = partial(den.params, full, emb, idx, valid)
    assert float(jnp.abs(out[:, :4] - ref[:, idx[0, :4]]).max()) <= 1e-5
    np.testing.assert_allclose(st_sub.own[0], full.own[0], atol=1e-5)
    assert int(st_sub.work.token_layers - full.work.token_layers) == 6 * 2      # padded bucket x layers

    # a new input: computed tokens get fresh K/V, the others (padding included) keep the stale buffer
    emb2 = emb.replace(tokens=emb.tokens + jax.random.normal(jax.random.key(1), emb.tokens.shape))
    _, st2 = partial(den.params, full, emb2, idx, valid)
    changed = np.abs(np.asarray(st2.own[0] - full.own[0])).max(axis=(0, 1, 3, 4)) > 1e-4      # per token
    assert changed.tolist() == [i in (5, 1, 6, 3) for i in range(n)]


def test_last_step_commit_stores_the_buffer():
    """kv_mode last_step: the commit stores the chunk's (partly stale) buffer as its cached K/V."""
    den, state, _, emb, _ = _chunk_setup("last_step")
    _, st = den.stages.partial(den.params, state, emb, jnp.asarray([[2, 7]], jnp.int32), jnp.ones((1, 2), bool))
    new = den.commit(den.params, st, None, None)
    n = emb.tokens.shape[1]
    np.testing.assert_allclose(new.cache.k[:, :, n:2 * n], st.own[0], atol=0)
    assert not np.allclose(st.own[0], 0) and np.allclose(new.cache.k[:, :, :n], 0)   # chunk 0 had no call
    assert new.cache.frames[0].tolist() == [0] * (n // 2) + [1] * (n // 2) + [2] * (n // 2) + [3] * (n // 2)


def test_threshold_zero_is_dense_exactly():
    model = _model()
    noise, ctx = _inputs()
    base = chunk_denoiser(model, RolloutConfig())
    ref = rollout(base, noise, ctx, solver=euler(4))
    out = rollout(motioncache(base, MotionCacheConfig(thresh=0.0, buckets=(0.5, 1.0))), noise, ctx, solver=euler(4))
    np.testing.assert_allclose(out.latents, ref.latents, rtol=0, atol=1e-6)
    assert total_work(out.state) == total_work(ref.state)
    assert out.state.forwards.tolist() == [0, 8, 0]


def _counting(den, log):
    """The chunk denoiser with host callbacks in its block stages: counts executions and their tokens at run
    time, inside the compiled rollout (only the branch lax.switch takes runs)."""
    st = den.stages

    def blocks(params, state, emb):
        jax.debug.callback(lambda: log.append(emb.tokens.shape[1]))
        return st.blocks(params, state, emb)

    def partial(params, state, emb, indices, valid=None):
        jax.debug.callback(lambda: log.append(indices.shape[1]))
        return st.partial(params, state, emb, indices, valid)

    stages = type(st)(st.embed, blocks, st.head, partial)
    return dataclasses.replace(den, stages=stages)


@pytest.mark.parametrize("motion", ["hidden", "latent"])
def test_counters_match_a_runtime_count(motion):
    model = _model()
    noise, ctx = _inputs(chunks=3)
    log = []
    cfg = MotionCacheConfig(thresh=0.6, coefficients=None, warmup=2, phase1_updates=1, min_update_ratio=0.0,
                            temporal_vote=None, buckets=(0.5, 1.0), motion=motion)
    out = rollout(motioncache(_counting(chunk_denoiser(model), log), cfg), noise, ctx, solver=euler(5))
    jax.effects_barrier()
    st = out.state
    none, full, part = st.forwards.tolist()
    assert none + full + part == 3 * 5 and part > 0                     # partial forwards happened
    assert len(log) == full + part
    work = total_work(st)
    n, layers = 8, 2
    assert work["block_passes"] == len(log) + 3                          # + the clean K/V pass per chunk
    assert work["token_layers"] == (sum(log) + 3 * n) * layers
    assert int(st.selected) <= sum(log) and log.count(n) >= full
    assert np.isfinite(np.asarray(out.latents)).all()


def test_config_errors():
    with pytest.raises(ValueError, match="MotionCacheConfig.thresh must be >= 0.0, got -1.0"):
        MotionCacheConfig(thresh=-1.0)
    with pytest.raises(ValueError, match="MotionCacheConfig.warmup must be >= 1, got 0"):
        MotionCacheConfig(warmup=0)
    with pytest.raises(ValueError, match="motion='flow'"):
        MotionCacheConfig(motion="flow")
    with pytest.raises(ValueError, match=r"buckets=\(0.5, 0.75\) must be increasing fractions"):
        MotionCacheConfig(buckets=(0.5, 0.75))
    with pytest.raises(ValueError, match=r"buckets\[0\] must be > 0.0, got 0.0"):
        MotionCacheConfig(buckets=(0.0, 1.0))
    with pytest.raises(ValueError, match="alpha must be <= 1.0, got 1.5"):
        MotionCacheConfig(alpha=1.5)
    with pytest.raises(ValueError, match="temporal_vote must be < 1.0, got 1.0"):
        MotionCacheConfig(temporal_vote=1.0)
    with pytest.raises(ValueError, match=r"MotionCacheConfig.coefficients\[1\] must be finite"):
        MotionCacheConfig(coefficients=(1.0, float("inf")))
    with pytest.raises(TypeError, match="MotionCacheConfig.phase1_updates must be an int"):
        MotionCacheConfig(phase1_updates=True)
    with pytest.raises(ValueError, match="partial forward"):
        motioncache(wan_denoiser(init_transformer(wan_tiny(), seed=0)), MotionCacheConfig())
    assert MotionCacheConfig(buckets=(0.3, 1.0)).bucket_sizes(16) == (5, 16)
