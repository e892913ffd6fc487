"""AR chunk runtimes on a mesh (`rollout(..., mesh=)`, `df_sample(..., mesh=)`) on the virtual CPU devices of
tests/conftest.py: KV-cached rollouts with the cache split by heads (dense; FlowCache; MotionCache over the int8
cache) and diffusion forcing (whole window and per chunk) equal one-device runs on two mesh shapes
("data=2,seq=4" and "fsdp=2,seq=2"): latents within 1e-5, identical decision counters; plus the errors for
meshes that cannot split the heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.flowcache import flowcache, flowcache_config
from experiments.motioncache import MotionCacheConfig, motioncache
from models.ar.diffusion_forcing import df_sample, df_work
from models.ar.rollout import RolloutConfig, chunk_denoiser, chunk_state_of, head_parallel_chunk_denoiser, rollout
from models.wan import init_transformer, wan_tiny
from models.wan.denoiser import wan_denoiser
from models.wan.sharding import WAN_RULES
from vidaccel.parallel import check_heads, make_mesh, shard_params
from vidaccel.sampling import sample
from vidaccel.solvers import euler
from vidaccel.transforms import total_work

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices; see tests/conftest.py")

HEADS = 4
INT8 = RolloutConfig(kv_storage="int8", kv_group_size=16, kv_attention="reference")
FC = flowcache_config(1.0, coefficients=None, warmup=1)
MC = MotionCacheConfig(thresh=0.5, coefficients=None, warmup=1, phase1_updates=1, temporal_vote=None,
                       min_update_ratio=0.0, buckets=(1.0,))     # partial forwards padded to the chunk
# name -> (config, method, solver) of a 2-chunk rollout; MotionCache runs over the int8 KV cache
ROLLOUTS = {"dense": (RolloutConfig(), None, euler(2)),
            "flowcache": (RolloutConfig(), lambda d: flowcache(d, FC), euler(4)),
            "motioncache_int8": (INT8, lambda d: motioncache(d, MC), euler(4))}
DF = dict(solver=euler(2), ar_step=1)
# each case on one mesh shape (two shapes in all, batch split over data or over fsdp): keeps the file's
# compilations to ten
CASES = [("dense", "data=2,seq=4"), ("flowcache", "fsdp=2,seq=2"), ("motioncache_int8", "fsdp=2,seq=2"),
         ("window", "data=2,seq=4"), ("chunks", "fsdp=2,seq=2")]


def _mesh(spec):
    n = int(np.prod([int(part.split("=")[1]) for part in spec.split(",")]))
    return make_mesh(spec, devices=jax.devices()[:n])


@pytest.fixture(scope="module")
def setup():
    """A tiny block-causal Wan (4 heads, 2-frame chunks of 16 tokens), batch 2, 2 chunks."""
    model = init_transformer(wan_tiny(num_attention_heads=HEADS, attention_head_dim=8, num_frame_per_block=2), seed=3)
    model.proj_out.kernel.set_value(jax.random.normal(jax.random.key(1), model.proj_out.kernel.shape) * 0.3)
    ks = jax.random.split(jax.random.key(0), 2)
    return model, jax.random.normal(ks[0], (2, 4, 8, 4, 4)), jax.random.normal(ks[1], (2, 3, 16))


def _same_counters(got, want):
    """Every integer leaf of the states (work counters, decisions, step counts) is identical."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if jnp.issubdtype(a.dtype, jnp.integer) and a.dtype != jnp.uint8:        # uint8: int8 codes
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name,spec", [c for c in CASES if c[0] in ROLLOUTS])
def test_rollout_under_the_mesh_matches_one_device(setup, name, spec):
    """Dense, FlowCache and MotionCache (int8 KV cache) rollouts with FSDP weights: latents within 1e-5,
    identical counters and skip / token decisions, the KV cache held split by heads (heads / seq per
    device), the int8 codes identical."""
    model, noise, ctx = setup
    cfg, method, solver = ROLLOUTS[name]
    ref = rollout(method(chunk_denoiser(model, cfg)) if method else chunk_denoiser(model, cfg), noise, ctx,
                  solver=solver)
    mesh = _mesh(spec)
    den = head_parallel_chunk_denoiser(model, mesh, cfg)
    params = shard_params(den.params, mesh, WAN_RULES)
    out = rollout(method(den) if method else den, noise, ctx, params=params, mesh=mesh, solver=solver)
    np.testing.assert_allclose(out.latents, ref.latents, atol=1e-5, rtol=1e-5)
    assert total_work(out.state) == total_work(ref.state)
    _same_counters(out.state, ref.state)
    cache, want = chunk_state_of(out.state).cache, chunk_state_of(ref.state).cache
    k = cache.layers.k_codes if cfg.kv_storage == "int8" else cache.k
    assert k.shape[3] == HEADS and k.addressable_shards[0].data.shape[3] == HEADS // mesh.shape["seq"]
    if cfg.kv_storage == "int8":
        np.testing.assert_array_equal(k, want.layers.k_codes)
    work = total_work(ref.state)
    if name == "flowcache":
        assert work["block_passes"] < work["calls"]                              # calls were skipped
    if name == "motioncache_int8":
        assert int(ref.state.forwards[2]) > 0                                    # partial forwards ran


@pytest.mark.parametrize("execution,spec", [c for c in CASES if c[0] not in ROLLOUTS])
def test_df_sample_under_the_mesh_matches_one_device(setup, execution, spec):
    """Diffusion forcing (async, ar_step 1), whole-window and per-chunk, heads split over seq: latents within
    1e-5, identical counters."""
    model, noise, ctx = setup
    ref = df_sample(model, noise, ctx, execution=execution, **DF)
    mesh = _mesh(spec)
    params = shard_params(wan_denoiser(model).params, mesh, WAN_RULES)
    out = df_sample(model, noise, ctx, params=params, mesh=mesh, execution=execution, **DF)
    np.testing.assert_allclose(out.latents, ref.latents, atol=1e-5, rtol=1e-5)
    assert df_work(out.state) == df_work(ref.state)
    _same_counters(out.state, ref.state)


def test_errors(setup):
    model, noise, ctx = setup
    mesh = make_mesh("seq=8")
    allowed = r"allowed mesh shapes over 8 devices: \['data=1,fsdp=2,seq=4', 'data=1,fsdp=4,seq=2'"
    with pytest.raises(ValueError, match=r"splits the 4 heads over seq=8, but 4 is not divisible by 8; " + allowed):
        head_parallel_chunk_denoiser(model, mesh)
    with pytest.raises(ValueError, match="4 heads over seq=8"):
        rollout(model, noise, ctx, mesh=mesh, solver=euler(2))
    with pytest.raises(ValueError, match="4 heads over seq=8"):
        df_sample(model, noise, ctx, mesh=mesh, solver=euler(2))
    with pytest.raises(ValueError, match=r"head parallelism splits the 4 heads over seq=8.*'data=2,fsdp=2,seq=2'"):
        check_heads(HEADS, mesh)
    mesh = _mesh("seq=2")
    with pytest.raises(ValueError, match="mesh must be a jax Mesh with axes"):
        rollout(model, noise, ctx, mesh=jax.make_mesh((2,), ("x",)), solver=euler(2))
    with pytest.raises(TypeError, match="chunk_denoiser"):
        rollout(wan_denoiser(model), noise, ctx, mesh=mesh, solver=euler(2))
    with pytest.raises(ValueError, match="multiple of the chunk length 2"):
        rollout(model, noise[:, :3], ctx, mesh=mesh, solver=euler(2))
    with pytest.raises(ValueError, match=r"cannot run on a mesh: .*use models.ar.rollout.rollout\(..., mesh=\)"):
        sample(motioncache(chunk_denoiser(model), MC), None, noise[:, :2], ctx, mesh="seq=8", solver=euler(2))
