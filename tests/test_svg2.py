"""SVG2: top-p with a minimum kept ratio by hand, k-means, the label mask, permutation/ranges against the jnp
path on the model, equality with dense when every cluster is kept, per-layer / per-branch state, config errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_sparse_attention import _forward, _loop, _model, _rel

from experiments.svg2 import SVG2Config, kmeans, label_token_mask, select_clusters, svg2
from models.wan.denoiser import wan_denoiser
from vidaccel.sparse_attention import sparse_attention, sparse_summary

T, F = True, False


def _select(sizes, top_p, ratio):
    """One query cluster, key centroids all zero: every score is 0, so P is proportional to the sizes."""
    kc = len(sizes)
    cq, ck = jnp.ones((1, 1, 1, 2)), jnp.zeros((1, 1, kc, 2))
    return np.asarray(select_clusters(cq, ck, jnp.array([[sizes]]), jnp.array([top_p]), ratio))[0, 0, 0]


def test_top_p_with_minimum_ratio_by_hand():
    """sizes 5, 3, 1, 1 -> P = 0.5, 0.3, 0.1, 0.1. top_p 0.6: 0.5 (0 before) and 0.3 (0.5 before <= 0.6) kept,
    the 0.1s have 0.8 / 0.9 before -> dropped. top_p 0.5: the crossing cluster is kept (0.5 <= 0.5). top_p 0.4
    keeps only the first; min ratio 0.75 keeps floor(3) sorted clusters (ties by index: cluster 2 before 3);
    top_p 1 keeps all, including an empty cluster."""
    assert list(_select([5, 3, 1, 1], 0.6, 0.0)) == [T, T, F, F]
    assert list(_select([5, 3, 1, 1], 0.5, 0.0)) == [T, T, F, F]
    assert list(_select([5, 3, 1, 1], 0.4, 0.0)) == [T, F, F, F]
    assert list(_select([5, 3, 1, 1], 0.4, 0.1)) == [T, F, F, F]          # floor(0.4) = 0 extra
    assert list(_select([5, 3, 1, 1], 0.4, 0.75)) == [T, T, T, F]
    assert list(_select([1, 1, 3, 5], 0.6, 0.0)) == [F, F, T, T]
    assert list(_select([5, 3, 0, 2], 1.0, 0.0)) == [T, T, T, T]


def test_select_weights_by_cluster_size():
    """Key clusters of sizes 1 and 9 with scores log(3) and 0: P = 3/12, 9/12 (a plain softmax would favour
    cluster 0, 3:1); top_p 0.5 keeps cluster 1 only (0.75 before cluster 0 > 0.5)."""
    d = 4
    cq = jnp.zeros((1, 1, 1, d)).at[..., 0].set(1.0)
    ck = jnp.zeros((1, 1, 2, d)).at[0, 0, 0, 0].set(np.log(3.0) * np.sqrt(d))
    m = select_clusters(cq, ck, jnp.array([[[1, 9]]]), jnp.array([0.5]), 0.0)
    assert list(np.asarray(m)[0, 0, 0]) == [F, T]


def test_kmeans_recovers_separated_clusters_and_stops_early():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    lab = np.repeat(np.arange(3), [5, 7, 4])
    x = (centers[lab] + 0.1 * rng.normal(size=(16, 2))).astype(np.float32)[None, None]
    init = x[:, :, [0, 5, 12]]                                           # one token of each cluster
    labels, c, sizes, it = kmeans(jnp.asarray(x), jnp.asarray(init), 50, 1e-4)
    np.testing.assert_array_equal(np.asarray(labels)[0, 0], lab)
    np.testing.assert_array_equal(np.asarray(sizes)[0, 0], [5, 7, 4])
    np.testing.assert_allclose(np.asarray(c)[0, 0], [x[0, 0, lab == j].mean(0) for j in range(3)], rtol=1e-5)
    assert int(it) == 2                      # the second iteration moves nothing: early stop
    _, _, _, it = kmeans(jnp.asarray(x), c, 50, 1e-4)
    assert int(it) == 1                      # warm-started at the solution
    _, _, _, it = kmeans(jnp.asarray(x), jnp.asarray(init), 1, 1e-4)
    assert int(it) == 1                      # the iteration cap


def test_label_token_mask_by_hand():
    m = jnp.array([[[[T, F], [F, T]]]])
    ql, kl = jnp.array([[[0, 1, 1]]]), jnp.array([[[1, 0, 1]]])
    np.testing.assert_array_equal(np.asarray(label_token_mask(m, ql, kl))[0, 0],
                                  [[F, T, F], [T, F, T], [T, F, T]])


SMALL = dict(num_q_clusters=4, num_k_clusters=8, block_q=16, block_k=16, dense_step_fraction=0.2)


def test_keep_all_equals_dense_and_kernel_equals_jnp_path():
    """One model call past the warm-up: top_p = 1 equals dense (<= 1e-5); at top_p 0.5 the permuted
    variable-range Pallas kernel (interpret mode), the permuted plain-jnp gather path and the unpermuted jnp
    label-mask path agree, with identical counters."""
    model = _model()
    dense, _ = _forward(wan_denoiser(model), 0)
    den = lambda impl: sparse_attention(wan_denoiser(model), svg2(SVG2Config(backend=impl, **SMALL)))  # noqa
    ref = den("reference")
    v_all, _ = _forward(ref, 3, 1.0)
    assert _rel(v_all, dense) <= 1e-5
    v_ref, s_ref = _forward(ref, 3, 0.5)
    v_ker, s_ker = _forward(den("kernel"), 3, 0.5)
    v_gat, s_gat = _forward(den("gather"), 3, 0.5)
    assert _rel(v_ker, v_ref) <= 1e-5 and _rel(v_gat, v_ref) <= 1e-5
    assert _rel(v_ref, dense) > 1e-3
    sr, sk = sparse_summary(s_ref), sparse_summary(s_ker)
    assert sr == sk == sparse_summary(s_gat) and 0 < sr["density_sparse"] < 0.9 and sr["predictions"] == 2


def test_state_per_layer_and_branch():
    """With CFG each branch keeps its own centroids (they differ); every layer is initialised; the first sparse
    call runs the init iterations, later ones the warm-started few (estimate FLOPs say exactly how many)."""
    cfg = SVG2Config(top_p=0.7, backend="reference", kmeans_tol=0.0, **SMALL)
    _, states = _loop(sparse_attention(wan_denoiser(_model()), svg2(cfg)), steps=5)   # 1 dense + 4 sparse steps
    pc, pu = states.cond.policy, states.uncond.policy
    assert bool(jnp.all(pc.initialized)) and bool(jnp.all(pu.initialized))
    assert float(jnp.abs(pc.k_centroids - pu.k_centroids).max()) > 1e-3
    n, d, qc, kc, h = 64, 16, 4, 8, 2
    per_iter = 2.0 * n * d * (qc + kc) * h
    want = (50 + 3 * 2) * per_iter + 4 * 2.0 * qc * kc * d * h     # 50 iterations, then 2, 2, 2
    np.testing.assert_allclose(np.asarray(states.cond.counters.estimate_flops), [want] * 2, rtol=1e-6)
    np.testing.assert_array_equal(states.uncond.counters.dense_calls, [1, 1])


def test_config_defaults_and_errors():
    c = SVG2Config()
    assert (c.num_q_clusters, c.num_k_clusters, c.top_p, c.min_kc_ratio, c.kmeans_iter_init, c.kmeans_iter_step,
            c.dense_step_fraction, c.dense_layer_fraction, c.backend) == \
        (300, 1000, 0.9, 0.10, 50, 2, 0.2, 0.03, "auto")
    pol = svg2(c)
    assert pol.dense_steps(50) == 10 and pol.dense_layers(30) == () and pol.dense_layers(40) == (0,)
    for kw, msg in [({"num_q_clusters": 0}, "SVG2Config.num_q_clusters must be >= 1, got 0"),
                    ({"top_p": -0.1}, "top_p=-0.1"),
                    ({"min_kc_ratio": 2}, "SVG2Config.min_kc_ratio must be <= 1, got 2"),
                    ({"kmeans_iter_step": 0}, "SVG2Config.kmeans_iter_step must be >= 1, got 0"),
                    ({"kmeans_tol": -1}, "SVG2Config.kmeans_tol must be >= 0, got -1"),
                    ({"seed": -1}, "SVG2Config.seed must be >= 0, got -1"), ({"block_k": 8}, "block_k=8"),
                    ({"backend": "flashinfer"}, "SVG2Config.backend='flashinfer'"),
                    ({"dense_step_fraction": 1.5}, "SVG2Config.dense_step_fraction must be <= 1, got 1.5")]:
        with pytest.raises(ValueError, match=msg):
            SVG2Config(**kw)
    for kw, msg in [({"num_k_clusters": True}, "SVG2Config.num_k_clusters must be an int, got True"),
                    ({"min_kc_ratio": "0.1"}, "SVG2Config.min_kc_ratio must be a real number"),
                    ({"interpret": 1}, "SVG2Config.interpret must be True or False, got 1")]:
        with pytest.raises(TypeError, match=msg):
            SVG2Config(**kw)
    with pytest.raises(ValueError, match="num_k_clusters=100 exceeds the 64 tokens"):
        _forward(sparse_attention(wan_denoiser(_model()), svg2(SVG2Config(num_q_clusters=4, num_k_clusters=100))), 3)
