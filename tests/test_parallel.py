"""vidaccel.parallel on 8 virtual CPU devices (tests/conftest.py): mesh specs, Wan sharding rules, Ulysses and
ring attention against dense (block-causal too), sharded sampling (dense, TeaCache, CFG-parallel) against one
device with equal decision counters, and the errors for shapes that cannot be split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import vidaccel.sampling
from experiments.haste import HasteConfig, TMRConfig, haste
from experiments.parallel_report import collective_bytes
from experiments.teacache import teacache
from experiments.xattention import XAttentionConfig, xattention
from models.ar.diffusion_forcing import df_sample
from models.ar.rollout import chunk_denoiser
from models.wan import abstract_transformer, init_transformer, wan21_t2v_14b, wan_tiny
from models.wan.denoiser import wan_denoiser
from models.wan.sharding import WAN_RULES, parallel_wan_denoiser
from vidaccel.attention import AttentionInfo, dense_attention
from vidaccel.blockwise_attention import blockwise
from vidaccel.parallel import (
    FSDP,
    make_mesh,
    param_specs,
    parse_mesh_spec,
    ring_attention,
    shard_params,
    ulysses_attention,
)
from vidaccel.residual_cache import ResidualCacheConfig
from vidaccel.sampling import sample
from vidaccel.solvers import unipc
from vidaccel.sparse_attention import sparse_attention, sparse_summary
from vidaccel.transforms import total_work

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices; see tests/conftest.py")


def _qkv(b=2, t=24, h=4, d=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (b, t, h, d)) for k in ks)


# ------------------------------------------------------------------------------------------------ meshes
def test_mesh_spec_and_errors():
    assert parse_mesh_spec("fsdp=4,seq=2") == {"data": 1, "fsdp": 4, "seq": 2}
    mesh = make_mesh("data=2, fsdp=2, seq=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "seq": 2}
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 1, "seq": 8}
    assert dict(make_mesh("seq=2", devices=jax.devices()[:2]).shape)["seq"] == 2
    with pytest.raises(ValueError, match=r"asks for 4 devices .* there are 8; allowed shapes multiply to 8.*seq=8"):
        make_mesh("fsdp=2,seq=2")
    with pytest.raises(ValueError, match="unknown axis 'tensor'"):
        make_mesh("tensor=8")
    with pytest.raises(ValueError, match="must be a positive int"):
        make_mesh("seq=0")
    with pytest.raises(ValueError, match="not axis=size"):
        make_mesh("seq8")


def test_wan_rules_cover_every_parameter():
    """Strict rules name every parameter of the tiny and the 14B model (2 of its 40 identical layers, for
    speed); big matrices are split, small ones not."""
    mesh = make_mesh("fsdp=4,seq=2")
    big14 = abstract_params(wan21_t2v_14b().replace(num_layers=2))
    big = jax.tree_util.tree_flatten_with_path(param_specs(big14, WAN_RULES, mesh),
                                               is_leaf=lambda x: isinstance(x, P))[0]
    specs = {jax.tree_util.keystr(p, simple=True, separator="/"): s for p, s in big}
    assert specs["layers/attn1/to_q/kernel/value"] == P(None, ("fsdp", "seq"), None)
    assert specs["layers/ffn/proj_out/kernel/value"] == P(None, ("fsdp", "seq"), None)
    assert specs["time_embedder/time_proj/kernel/value"] == P(("fsdp", "seq"), None)
    assert specs["layers/attn1/to_q/bias/value"] == P(None, None)
    assert specs["proj_out/kernel/value"] == P(None, None)
    # an axis that does not divide a dim is dropped (innermost first)
    odd = param_specs({"w": jnp.zeros((12, 3))}, [("w", (FSDP, None))], make_mesh("fsdp=4,seq=2"))
    assert odd["w"] == P(("fsdp",), None)
    assert param_specs({"w": jnp.zeros((12, 3))}, [("w", (FSDP, None))], mesh, fsdp_axes=())["w"] == P(None, None)
    with pytest.raises(ValueError, match="no sharding rule matches parameter extra"):
        param_specs({"extra": jnp.zeros((4,))}, WAN_RULES, mesh)
    model = init_transformer(wan_tiny(num_attention_heads=4, attention_head_dim=8))
    placed = shard_params(wan_denoiser(model).params, mesh, WAN_RULES)
    kernel = placed["layers"]["attn1"]["to_q"]["kernel"][...]
    assert kernel.addressable_shards[0].data.shape == (2, 4, 32)          # din 32 split 8 ways


def abstract_params(cfg):
    return nnx.state(abstract_transformer(cfg), nnx.Param)


# --------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("fpb", [1, 2])
@pytest.mark.parametrize("spec", ["data=2,seq=4", "data=2,fsdp=2,seq=2"])
def test_sequence_parallel_attention_matches_dense(spec, fpb):
    q, k, v = _qkv(t=24, h=8)
    frames = jnp.broadcast_to(jnp.arange(24) // 4, (2, 24)).astype(jnp.int32)
    info = AttentionInfo(frames, frames, jnp.int32(0), fpb)
    ref, _ = dense_attention(q, k, v, info)
    mesh = make_mesh(spec)
    attns = [ulysses_attention(mesh), ring_attention(mesh, q_chunk=3)]
    if spec == "data=2,seq=4":
        attns += [ulysses_attention(mesh, inner=blockwise(6, 8)), ring_attention(mesh)]
    for attn in attns:
        out, _ = jax.jit(lambda q, k, v, i, attn=attn: attn(q, k, v, i, None))(q, k, v, info)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_sequence_parallel_attention_errors():
    mesh = make_mesh("data=2,seq=4")
    q, k, v = _qkv(t=24, h=6)
    info = AttentionInfo(jnp.zeros((2, 24), jnp.int32), jnp.zeros((2, 24), jnp.int32), jnp.int32(0))
    with pytest.raises(ValueError, match=r"6 heads over seq=4.*allowed seq sizes: \[1, 2, 3, 6\]"):
        ulysses_attention(mesh)(q, k, v, info)
    q, k, v = _qkv(t=18, h=4)
    info = AttentionInfo(jnp.zeros((2, 18), jnp.int32), jnp.zeros((2, 18), jnp.int32), jnp.int32(0))
    with pytest.raises(ValueError, match=r"ring attention splits the 18 tokens into 4 .*allowed seq sizes.*\[1, 2, 3"):
        ring_attention(mesh)(q, k, v, info)


# ---------------------------------------------------------------------------------------------- sampling
# the "patch" indicator is a reduction over all tokens: under the mesh it is summed across `seq` devices
TC = ResidualCacheConfig(0.15, None, indicator="patch", warmup=1, cutoff=-1)
SOLVER = unipc(6, shift=3.0)
METHODS = {"dense": lambda d: d, "teacache": lambda d: teacache(d, TC)}


@pytest.fixture(scope="module")
def tiny():
    """A tiny Wan (4 heads, 8 tokens per sample), CFG inputs, and the one-device runs of every method."""
    model = init_transformer(wan_tiny(num_attention_heads=4, attention_head_dim=8), seed=3)
    model.proj_out.kernel.set_value(jax.random.normal(jax.random.key(1), model.proj_out.kernel.shape) * 0.1)
    ks = jax.random.split(jax.random.key(0), 3)
    noise = jax.random.normal(ks[0], (2, 2, 4, 4, 4))
    ctx, neg = (jax.random.normal(k, (2, 3, 16)) for k in ks[1:])
    den = wan_denoiser(model)
    refs = {name: sample(make(den), None, noise, ctx, solver=SOLVER, guidance=4.0, negative_context=neg)
            for name, make in METHODS.items()}
    assert total_work(refs["teacache"].state)["block_passes"] < total_work(refs["teacache"].state)["calls"]
    return model, noise, ctx, neg, refs


@pytest.mark.parametrize("spec,kind,cfg_parallel,methods", [("data=2,seq=4", "ulysses", True, ("dense", "teacache")),
                                                             ("fsdp=2,seq=4", "ring", False, ("teacache",))])
def test_sharded_sample_equals_one_device(tiny, spec, kind, cfg_parallel, methods, monkeypatch):
    """Dense and TeaCache under CFG: latents within 1e-5, the same skip decisions and counters, one progress
    tick per step (not one per device)."""
    model, noise, ctx, neg, refs = tiny
    mesh = make_mesh(spec)
    pden = parallel_wan_denoiser(model, mesh, attention=kind)
    params = shard_params(pden.params, mesh, WAN_RULES)
    ticks = []

    class Bar:
        def __init__(self, **kw):
            pass

        def update(self, n):
            ticks.append(n)

        def close(self):
            pass

    monkeypatch.setattr(vidaccel.sampling, "tqdm", Bar)
    for name in methods:
        make, ref = METHODS[name], refs[name]
        ticks.clear()
        out = sample(make(pden), params, noise, ctx, mesh=mesh, solver=SOLVER, guidance=4.0,
                             negative_context=neg, cfg_parallel=cfg_parallel, progress=True)
        assert len(ticks) == SOLVER.num_steps
        np.testing.assert_allclose(out.latents, ref.latents, atol=1e-5, rtol=1e-5)
        assert total_work(out.state) == total_work(ref.state)
        for branch in ("cond", "uncond"):
            got, want = getattr(out.state, branch), getattr(ref.state, branch)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                if jnp.issubdtype(a.dtype, jnp.integer):
                    np.testing.assert_array_equal(a, b)


def test_sharded_sample_errors(tiny):
    model, noise, ctx, neg, _ = tiny
    mesh = make_mesh("seq=8")
    pden = parallel_wan_denoiser(model, mesh, attention="ulysses")
    with pytest.raises(ValueError, match=r"4 heads over seq=8.*allowed seq sizes: \[1, 2, 4\]"):
        sample(pden, None, noise, ctx, mesh=mesh, solver=unipc(2))
    mesh = make_mesh("fsdp=4,seq=2")
    pden = parallel_wan_denoiser(model, mesh)
    with pytest.raises(ValueError, match="needs data=2; this mesh has data=1"):
        sample(pden, None, noise, ctx, mesh=mesh, solver=unipc(2), guidance=3.0, negative_context=neg,
               cfg_parallel=True)
    with pytest.raises(ValueError, match="axes"):
        sample(pden, None, noise, ctx, mesh=jax.make_mesh((8,), ("x",)), solver=unipc(2))
    with pytest.raises(ValueError, match="cannot run on a mesh: the AR chunk denoiser's KV-cached attention"):
        ar = init_transformer(wan_tiny(num_attention_heads=4, attention_head_dim=8, num_frame_per_block=2))
        sample(chunk_denoiser(ar), None, noise, ctx, mesh=mesh, solver=unipc(2))


def test_collective_bytes_reads_loops_and_async_ops():
    """The compile report's HLO reader: loop bodies count trip-count times, async starts count their output."""
    hlo = """HloModule m, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %a = f32[4]{0} all-to-all(%x), replica_groups={}
  %f = f32[4]{0} fusion(%a), kind=kLoop, calls=%inner
}

%inner (q: f32[4]) -> f32[4] {
  ROOT %cp = bf16[3]{0} collective-permute(%q), source_target_pairs={{0,1}}
}

%cond (p: (s32[], f32[4])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %g = bf16[8,2]{1,0} all-gather(%x), dimensions={0}
  %s = (bf16[2]{0}, bf16[4]{0}) all-gather-start(%x), dimensions={0}
  %d = bf16[4]{0} all-gather-done(%s)
  ROOT %r = f32[4]{0} all-reduce(%x), to_apply=%add
}
"""
    got = collective_bytes(hlo)
    assert got == {"all-to-all": 5 * 16, "collective-permute": 5 * 6, "all-gather": 32 + 8, "all-reduce": 16,
                   "reduce-scatter": 0}


def test_haste_xattention_under_the_mesh_matches_one_device():
    """HASTE (TMR + per-head thresholds) on XAttention on a data=2,seq=4 mesh: tokens are split
    over seq and XLA partitions the sparse attention globally (without `wrap=`; head-parallel Ulysses is
    tests/test_parallel_sparse.py); the mask predictions,
    reuses, densities and latents equal the one-device run."""
    model = init_transformer(wan_tiny(num_attention_heads=4, attention_head_dim=8), seed=3)
    model.proj_out.kernel.set_value(jax.random.normal(jax.random.key(1), model.proj_out.kernel.shape) * 0.1)
    ks = jax.random.split(jax.random.key(0), 3)
    noise = jax.random.normal(ks[0], (2, 4, 8, 8, 4))                     # 64 tokens, 4 blocks of 16
    ctx = jax.random.normal(ks[1], (2, 3, 16))
    pol = haste(xattention(XAttentionConfig(block_size=16, stride=4, warmup_steps=1, backend="reference")),
                HasteConfig(tmr=TMRConfig(epsilon=0.5, max_interval=3, pool_block=16),
                            thresholds=np.full((2, 4), 0.6)))
    solver = unipc(3, shift=3.0)
    ref = sample(sparse_attention(wan_denoiser(model), pol), None, noise, ctx, solver=solver)
    mesh = make_mesh("data=2,seq=4")
    pden = parallel_wan_denoiser(model, mesh)
    out = sample(sparse_attention(pden, pol), shard_params(pden.params, mesh, WAN_RULES), noise, ctx,
                         mesh=mesh, solver=solver)
    want, got = sparse_summary(ref.state), sparse_summary(out.state)
    assert want["reused"] > 0 and 0 < want["density_sparse"] < 1
    assert got == want
    np.testing.assert_allclose(out.latents, ref.latents, atol=1e-5, rtol=1e-5)


def test_df_sample_under_the_mesh_matches_one_device():
    """SkyReels-V2 diffusion forcing (block-causal, per-frame t, async ar_step=1) with ring attention on
    a data=2,seq=4 mesh: `df_sample(..., mesh=)` with the parallel denoiser and sharded weights
    equals the one-device run within 1e-5 with equal counters."""
    model = init_transformer(wan_tiny(num_attention_heads=4, attention_head_dim=8, num_frame_per_block=2), seed=3)
    model.proj_out.kernel.set_value(jax.random.normal(jax.random.key(1), model.proj_out.kernel.shape) * 0.1)
    ks = jax.random.split(jax.random.key(0), 3)
    noise = jax.random.normal(ks[0], (1, 4, 4, 4, 4))                     # 4 frames x 4 tokens
    ctx = jax.random.normal(ks[1], (1, 3, 16))
    kw = dict(solver=unipc(3, shift=3.0), ar_step=1, causal_block_size=2)
    ref = df_sample(wan_denoiser(model), noise, ctx, **kw)
    mesh = make_mesh("data=2,seq=4")
    for kind in ("ring",):            # block-causal Ulysses is tested against dense above
        pden = parallel_wan_denoiser(model, mesh, attention=kind)
        out = df_sample(pden, noise, ctx, params=shard_params(pden.params, mesh, WAN_RULES), mesh=mesh, **kw)
        np.testing.assert_allclose(out.latents, ref.latents, atol=1e-5, rtol=1e-5)
        assert total_work(out.state) == total_work(ref.state)
