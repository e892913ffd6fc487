"""Sparse attention under Ulysses head parallelism (`sparse_attention(..., wrap=UlyssesHeads(mesh))`) on the
virtual CPU devices of tests/conftest.py: each device predicts and applies the masks of its own heads with its
slice of the per-head state (TMR anchors and plans, SVG2 centroids, the threshold table, per-head counters).
XAttention, HASTE on XAttention (TMR per layer and per head, per-(layer, head) thresholds) and SVG2 equal one
device: latents within 1e-5, sparse counters identical."""

import dataclasses

import jax
import numpy as np
import pytest

from experiments.haste import HasteConfig, TMRConfig, haste, head_reuse_counts
from experiments.svg2 import SVG2Config, SVG2State, svg2
from experiments.xattention import XAttentionConfig, xattention
from models.wan import init_transformer, wan_tiny
from models.wan.denoiser import wan_denoiser
from models.wan.sharding import WAN_RULES, parallel_sparse_denoiser, parallel_wan_denoiser
from vidaccel.parallel import UlyssesHeads, make_mesh, shard_params
from vidaccel.sampling import sample
from vidaccel.solvers import unipc
from vidaccel.sparse_attention import sparse_attention, sparse_summary

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices; see tests/conftest.py")

HEADS = 4
SOLVER = unipc(3, shift=3.0)


@pytest.fixture(scope="module")
def setup():
    model = init_transformer(wan_tiny(num_attention_heads=HEADS, attention_head_dim=8), seed=3)
    model.proj_out.kernel.set_value(jax.random.normal(jax.random.key(1), model.proj_out.kernel.shape) * 0.1)
    ks = jax.random.split(jax.random.key(0), 3)
    noise = jax.random.normal(ks[0], (1, 4, 8, 8, 4))                     # 64 tokens, 4 blocks of 16
    ctx = jax.random.normal(ks[1], (1, 3, 16))
    neg = jax.random.normal(ks[2], (1, 3, 16))
    return model, noise, ctx, neg


def _mesh(spec):
    n = int(np.prod([int(part.split("=")[1]) for part in spec.split(",")]))
    return make_mesh(spec, devices=jax.devices()[:n])


def _xatt(**kw):
    return xattention(XAttentionConfig(block_size=16, stride=4, warmup_steps=1, backend="reference", **kw))


def _haste(granularity="layer"):
    table = np.linspace(0.5, 0.8, 2 * HEADS).reshape(2, HEADS)            # per-(layer, head) thresholds
    return haste(_xatt(), HasteConfig(tmr=TMRConfig(epsilon=0.3, max_interval=3, pool_block=16,
                                                    granularity=granularity), thresholds=table))


def _svg2():
    return svg2(SVG2Config(num_q_clusters=6, num_k_clusters=8, kmeans_iter_init=10, kmeans_iter_step=3,
                           kmeans_tol=0.05,       # heads converge at different iterations: the stop is global
                           dense_step_fraction=0.25, dense_layer_fraction=0.0, block_q=16, block_k=16,
                           backend="gather", top_p=(0.5, 0.7, 0.8, 0.9)))


def _compare(setup, policy, specs, guided=False):
    """One-device run vs the head-parallel run on each mesh of `specs`; returns the one-device state."""
    model, noise, ctx, neg = setup
    kw = dict(guidance=4.0, negative_context=neg) if guided else {}
    ref = sample(sparse_attention(wan_denoiser(model), policy), None, noise, ctx, solver=SOLVER, **kw)
    want = sparse_summary(ref.state)
    assert want["predictions"] > 0 and 0 < want["density_sparse"] < 1
    for spec in specs:
        mesh = _mesh(spec)
        den = parallel_sparse_denoiser(model, mesh, policy)
        assert den.name.endswith("@heads/seq")
        out = sample(den, shard_params(den.params, mesh, WAN_RULES), noise, ctx, mesh=mesh, solver=SOLVER,
                             **kw)
        assert sparse_summary(out.state) == want, spec
        np.testing.assert_allclose(out.latents, ref.latents, atol=1e-5, rtol=1e-5, err_msg=spec)
    return ref.state, out.state


def test_xattention_ulysses_heads_matches_one_device(setup):
    """Per-head thresholds: each device must read its own heads' slice of the table. The policy runs inside
    the shard_map on HEADS / P heads with the matching threshold slice (recorded while tracing)."""
    seen = []
    base = _xatt(threshold=(0.5, 0.6, 0.7, 0.9))

    def predict(q, k, state, c):
        seen.append((q.shape[2], c.threshold.shape[0], c.head_axis))
        return base.predict(q, k, state, c)

    _compare(setup, dataclasses.replace(base, predict=predict), ["seq=2"])  # seq=4: the HASTE test below
    assert set(seen) == {(HEADS, HEADS, None), (HEADS // 2, HEADS // 2, "seq")}


def test_haste_xattention_ulysses_heads_matches_one_device(setup):
    """TMR's per-layer decision is a max over every head: across devices it is a pmax, so reuses match; with
    CFG-parallel (data=2) each branch keeps its own TMR state."""
    ref, out = _compare(setup, _haste(), ["seq=4", "data=2,seq=2"], guided=True)
    assert sparse_summary(ref)["reused"] > 0


def test_haste_per_head_tmr_ulysses_heads_matches_one_device(setup):
    """Per-head TMR: each head's reuse stays on its device; 'all heads reused' is an and over devices."""
    ref, out = _compare(setup, _haste("head"), ["seq=2"])
    want = head_reuse_counts(ref)
    assert 0 < want["head_masks_reused"] and want == head_reuse_counts(out)


def test_svg2_ulysses_heads_matches_one_device(setup):
    """SVG2's k-means centroids are per (batch, head): split over heads, the random initial tokens drawn as on
    one device and the early stop (max centroid shift over every head) maxed across devices."""
    _compare(setup, _svg2(), ["seq=2"])


def test_head_parallel_errors(setup):
    model, noise, ctx, _ = setup
    mesh = _mesh("seq=8")                                           # 4 heads cannot split 8 ways
    den = parallel_sparse_denoiser(model, mesh, _xatt())
    with pytest.raises(ValueError, match=r"splits the 4 heads over seq=8.*allowed seq sizes: \[1, 2, 4\]"):
        sample(den, None, noise, ctx, mesh=mesh, solver=unipc(2))
    mesh = _mesh("seq=2")
    unknown = dataclasses.replace(_svg2(), state_head_axes=None)     # a state without declared head axes
    with pytest.raises(ValueError, match="'svg2' cannot run head-parallel.*declares no state_head_axes"):
        sample(parallel_sparse_denoiser(model, mesh, unknown), None, noise, ctx, mesh=mesh, solver=unipc(2))
    wrong = dataclasses.replace(_svg2(), state_head_axes=lambda spec: SVG2State(2, 1, None))
    with pytest.raises(ValueError, match=r"head axis 2 for a state leaf of shape \(1, 4, 6, 8\).*the 4 heads"):
        sample(parallel_sparse_denoiser(model, mesh, wrong), None, noise, ctx, mesh=mesh, solver=unipc(2))
    with pytest.raises(TypeError, match="needs head parallelism with an `axis`"):
        sparse_attention(parallel_wan_denoiser(model, mesh), _xatt(), wrap=lambda inner, spec: inner)
    assert UlyssesHeads(mesh).axis == "seq"
