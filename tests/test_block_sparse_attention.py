"""Block-sparse and cluster-sparse Pallas kernels (interpret mode on CPU) vs their references vs dense attention.

Poisoning: Pallas interpret mode allocates every output buffer filled with NaN (checked by the first test), so
an output element the kernel forgets to write shows up as NaN; every kernel test asserts finiteness.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import pallas_kernels as pk
from pallas_kernels import reference as R
from tests.pallas_lowering import abstract_h100, lower_for_cuda  # noqa: F401 (fixture)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def qkv(seed, b, tq, tk, h, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, tq, h, d)) * 1.5
    k = jax.random.normal(ks[1], (b, tk, h, d))
    v = jax.random.normal(ks[2], (b, tk, h, d)) + 0.5
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def random_block_mask(seed, b, h, nq, nk, density=0.4):
    """Random per-(batch, head) mask with an empty row and a full row in different heads."""
    m = np.array(jax.random.bernoulli(jax.random.key(seed), density, (b, h, nq, nk)))
    m[0, 0, 1, :] = False  # empty row
    m[0, 1 % h, 2, :] = True  # full row
    m[-1, -1, 0, :] = False
    assert not (m[:, 0] == m[:, 1 % h]).all(), "heads should differ"
    return jnp.asarray(m)


def finite(x):
    return bool(np.isfinite(np.asarray(x, np.float32)).all())


def test_interpret_mode_poisons_unwritten_outputs():
    """The premise of the finiteness checks: interpret mode NaN-fills outputs, so unwritten rows are NaN."""

    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((32, 8), jnp.float32)
    out = pl.pallas_call(kernel, grid=(2,), in_specs=[pl.BlockSpec((16, 8), lambda i: (i, 0))],
                         out_specs=pl.BlockSpec((16, 8), lambda i: (i, 0)),
                         out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)
    assert (np.asarray(out[:16]) == 1).all() and np.isnan(np.asarray(out[16:])).all()


# -------------------------------------------------------------------- fixed blocks

B, TQ, TK, H, D, BQ, BK = 2, 150, 170, 3, 32, 32, 16  # odd lengths: neither is a block multiple
NQ, NK = -(-TQ // BQ), -(-TK // BK)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_block_kernel_matches_reference(dtype):
    q, k, v = qkv(0, B, TQ, TK, H, D, dtype)
    mask = random_block_mask(1, B, H, NQ, NK)
    out = pk.block_sparse_attention(q, k, v, mask, block_q=BQ, block_k=BK)
    ref = R.block_sparse_attention_reference(q, k, v, mask, block_q=BQ, block_k=BK)
    assert out.shape == q.shape and out.dtype == q.dtype and finite(out)
    assert rel_l2(out, ref) <= TOL[dtype]
    # rows of a query block with nothing selected are exact zeros (also where the block is partly padding)
    assert (np.asarray(out[0, BQ:2 * BQ, 0], np.float32) == 0).all()
    assert (np.asarray(out[-1, :BQ, -1], np.float32) == 0).all()
    assert np.abs(np.asarray(out[0, :BQ, 0], np.float32)).max() > 0


def test_reference_equals_dense_attention_with_token_mask():
    q, k, v = qkv(2, B, TQ, TK, H, D)
    mask = random_block_mask(3, B, H, NQ, NK)
    token = jnp.repeat(jnp.repeat(mask, BQ, 2), BK, 3)[:, :, :TQ, :TK]
    ref = R.block_sparse_attention_reference(q, k, v, mask, block_q=BQ, block_k=BK)
    dense = jax.nn.dot_product_attention(q, k, v, mask=token)
    rows = np.asarray(token.any(-1)).transpose(0, 2, 1)  # (B, Tq, H)
    assert rel_l2(np.asarray(ref)[rows], np.asarray(dense)[rows]) <= 1e-5
    assert (np.asarray(ref)[~rows] == 0).all() and (~rows).any()
    full = jnp.ones((B, H, NQ, NK), bool)
    assert rel_l2(R.block_sparse_attention_reference(q, k, v, full, block_q=BQ, block_k=BK),
                  jax.nn.dot_product_attention(q, k, v)) <= 1e-5


def test_full_mask_kernel_equals_dense_attention():
    q, k, v = qkv(4, B, TQ, TK, H, D)
    out = pk.block_sparse_attention(q, k, v, jnp.ones((B, H, NQ, NK), bool), block_q=BQ, block_k=BK)
    assert rel_l2(out, jax.nn.dot_product_attention(q, k, v)) <= 1e-5


def test_mask_representations_agree():
    """Bool mask, -1 padded index list (rows in shuffled order), BlockIndices with junk past the counts, and a
    shrunk BlockIndices all give the same output."""
    q, k, v = qkv(5, B, TQ, TK, H, D)
    mask = random_block_mask(6, B, H, NQ, NK, density=0.3).at[0, 1, 2, 0].set(False)  # no full row left
    base = pk.block_sparse_attention(q, k, v, mask, block_q=BQ, block_k=BK)
    bi = pk.block_mask_to_indices(mask)
    assert (np.asarray(pk.indices_to_block_mask(bi, NK)) == np.asarray(mask)).all()
    rng = np.random.default_rng(0)
    idx = np.asarray(bi.indices).copy()
    cnt = np.asarray(bi.counts)
    for row in np.ndindex(cnt.shape):
        idx[row][: cnt[row]] = rng.permutation(idx[row][: cnt[row]])
    out_list = pk.block_sparse_attention(q, k, v, jnp.asarray(idx), block_q=BQ, block_k=BK)
    junk = np.where(np.arange(NK) < cnt[..., None], idx, 10_000)
    out_bi = pk.block_sparse_attention(q, k, v, pk.BlockIndices(jnp.asarray(junk), bi.counts), block_q=BQ, block_k=BK)
    small = pk.shrink_indices(bi)
    assert small.indices.shape[-1] == int(cnt.max()) < NK
    out_small = pk.block_sparse_attention(q, k, v, small, block_q=BQ, block_k=BK)
    for o in (out_list, out_bi, out_small):
        assert rel_l2(o, base) <= 1e-6


def test_unselected_and_padded_keys_are_never_used():
    """NaN in every kv block no query selects leaves the output finite and equal to the reference computed
    with those blocks zeroed: the kernel reads only selected blocks (its work follows the density)."""
    q, k, v = qkv(7, B, TQ, TK, H, D)
    mask = np.array(random_block_mask(8, B, H, NQ, NK, density=0.3))
    mask[..., 3] = False  # kv block 3 unused by every query block of every head
    blk = (np.arange(TK) // BK == 3)[None, :, None, None]
    k_nan, v_nan = jnp.where(blk, jnp.nan, k), jnp.where(blk, jnp.nan, v)
    out = pk.block_sparse_attention(q, k_nan, v_nan, jnp.asarray(mask), block_q=BQ, block_k=BK)
    ref = R.block_sparse_attention_reference(q, jnp.where(blk, 0, k), jnp.where(blk, 0, v), jnp.asarray(mask),
                                             block_q=BQ, block_k=BK)
    assert finite(out) and rel_l2(out, ref) <= 1e-5


@pytest.mark.parametrize("cfg", [
    dict(b=1, tq=45, tk=77, h=2, d=16, bq=16, bk=32, share=(1, 1)),  # one mask for all heads
    dict(b=2, tq=130, tk=129, h=2, d=24, bq=64, bk=64, share=(1, 2)),  # head_dim 24 padded to 32 inside
])
def test_block_sizes_lengths_and_shared_masks(cfg):
    q, k, v = qkv(9, cfg["b"], cfg["tq"], cfg["tk"], cfg["h"], cfg["d"])
    nq, nk = -(-cfg["tq"] // cfg["bq"]), -(-cfg["tk"] // cfg["bk"])
    mask = jax.random.bernoulli(jax.random.key(10), 0.6, (*cfg["share"], nq, nk)).at[..., 0, :].set(False)
    out = pk.block_sparse_attention(q, k, v, mask, block_q=cfg["bq"], block_k=cfg["bk"])
    ref = R.block_sparse_attention_reference(q, k, v, mask, block_q=cfg["bq"], block_k=cfg["bk"])
    assert finite(out) and rel_l2(out, ref) <= 1e-5


def test_token_mask_to_block_mask():
    tm = jnp.zeros((1, 2, 40, 50), bool).at[0, 0, 17, 33].set(True).at[0, 1, 39, 49].set(True)
    bm = pk.token_mask_to_block_mask(tm, 16, 32)
    assert bm.shape == (1, 2, 3, 2)
    assert np.argwhere(np.asarray(bm)).tolist() == [[0, 0, 1, 1], [0, 1, 2, 1]]


def test_works_under_jit_with_traced_mask():
    q, k, v = qkv(11, B, TQ, TK, H, D)
    mask = random_block_mask(12, B, H, NQ, NK)
    f = jax.jit(functools.partial(pk.block_sparse_attention, block_q=BQ, block_k=BK))
    assert rel_l2(f(q, k, v, mask), R.block_sparse_attention_reference(q, k, v, mask, block_q=BQ, block_k=BK)) <= 1e-5


# -------------------------------------------------------------------- variable-size clusters (SVG2)

CB, CT, CH, CD = 2, 120, 2, 32
Q_SIZES = np.array([[[40, 0, 37, 43], [5, 70, 45, 0]], [[1, 1, 60, 58], [30, 30, 30, 30]]])  # > and < block_q
K_SIZES = np.array([[[30, 0, 25, 45, 20], [60, 10, 10, 20, 20]], [[120, 0, 0, 0, 0], [24, 24, 24, 24, 24]]])


def cluster_case(seed):
    cm = np.array(jax.random.bernoulli(jax.random.key(seed), 0.5, (CB, CH, 4, 5)))
    cm[0, 0, 0] = False  # query cluster with no key cluster -> zeros
    cm[1, 1, 2] = True  # all key clusters selected
    qr, kr = pk.clusters_to_ranges(jnp.asarray(cm), jnp.asarray(Q_SIZES), jnp.asarray(K_SIZES), block_q=32,
                                   num_q_tokens=CT)
    return cm, qr, kr


def token_mask_from_clusters(cm):
    """Dense token mask straight from cluster labels: token i in q cluster a, token j in k cluster c."""
    out = np.zeros((CB, CH, CT, CT), bool)
    for b in range(CB):
        for h in range(CH):
            la = np.repeat(np.arange(4), Q_SIZES[b, h])
            lc = np.repeat(np.arange(5), K_SIZES[b, h])
            out[b, h] = cm[b, h][la][:, lc]
    return jnp.asarray(out)


def test_clusters_to_ranges_and_reference_equal_dense_attention():
    q, k, v = qkv(13, CB, CT, CT, CH, CD)
    cm, qr, kr = cluster_case(14)
    assert (np.asarray(qr[..., 1]) <= 32).all() and int(qr[..., 1].sum()) == CB * CH * CT
    token = token_mask_from_clusters(cm)
    assert (np.asarray(R.cluster_token_mask(qr, kr, CT, CT)) == np.asarray(token)).all()
    ref = R.cluster_sparse_attention_reference(q, k, v, kr, q_ranges=qr, block_q=32, block_k=16)
    dense = jax.nn.dot_product_attention(q, k, v, mask=token)
    rows = np.asarray(token.any(-1)).transpose(0, 2, 1)
    assert rel_l2(np.asarray(ref)[rows], np.asarray(dense)[rows]) <= 1e-5
    assert (np.asarray(ref)[~rows] == 0).all() and (~rows).any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cluster_kernel_matches_reference(dtype):
    q, k, v = qkv(15, CB, CT, CT, CH, CD, dtype)
    _, qr, kr = cluster_case(16)
    out = pk.cluster_sparse_attention(q, k, v, kr, q_ranges=qr, block_q=32, block_k=16)
    ref = R.cluster_sparse_attention_reference(q, k, v, kr, q_ranges=qr, block_q=32, block_k=16)
    assert out.shape == q.shape and out.dtype == q.dtype and finite(out)
    assert rel_l2(out, ref) <= TOL[dtype]
    assert (np.asarray(out[0, :40, 0], np.float32) == 0).all()  # cluster with nothing selected


def test_cluster_kernel_fixed_query_tiles_uncovered_rows_and_shared_ranges():
    """q_ranges=None (fixed tiles) with hand-made ranges shared by all heads; and explicit tiles that leave
    rows uncovered (those rows are zeros)."""
    q, k, v = qkv(17, CB, 100, 90, CH, CD)
    kr = np.zeros((1, 1, 4, 3, 2), np.int32)
    kr[0, 0, 0] = [[0, 1], [5, 40], [89, 1]]
    kr[0, 0, 1] = [[10, 80], [0, 0], [0, 0]]
    kr[0, 0, 3] = [[0, 0], [50, 7], [0, 0]]  # tile 2 attends nothing
    out = pk.cluster_sparse_attention(q, k, v, jnp.asarray(kr), block_q=32, block_k=32)
    ref = R.cluster_sparse_attention_reference(q, k, v, jnp.asarray(kr), block_q=32, block_k=32)
    assert finite(out) and rel_l2(out, ref) <= 1e-5 and (np.asarray(out[:, 64:96]) == 0).all()
    qr = jnp.asarray(np.array([[[[3, 20], [60, 32], [30, 5], [0, 0]]]], np.int32))
    out = pk.cluster_sparse_attention(q, k, v, jnp.asarray(kr), q_ranges=qr, block_q=32, block_k=32)
    ref = R.cluster_sparse_attention_reference(q, k, v, jnp.asarray(kr), q_ranges=qr, block_q=32, block_k=32)
    assert finite(out) and rel_l2(out, ref) <= 1e-5
    assert (np.asarray(out[:, :3]) == 0).all() and (np.asarray(out[:, 92:]) == 0).all()


# -------------------------------------------------------------------- errors

def _small():
    return qkv(18, 1, 40, 40, 2, 16)


@pytest.mark.parametrize("case, exc, match", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have shape"),
    (lambda q, k, v: (q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16)), TypeError, "float16"),
    (lambda q, k, v: (q.astype(jnp.int32), k, v), TypeError, "int32"),
    (lambda q, k, v: (q, k.astype(jnp.bfloat16), v), TypeError, "share one dtype"),
    (lambda q, k, v: (q, k, v[:, :30]), ValueError, "same shape"),
    (lambda q, k, v: (q[:, :, :1], k, v), ValueError, "agree in batch, heads and head_dim"),
])
def test_bad_tensors_raise(case, exc, match):
    q, k, v = case(*_small())
    with pytest.raises(exc, match=match):
        pk.block_sparse_attention(q, k, v, jnp.ones((1, 2, 3, 3), bool), block_q=16, block_k=16)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(block_q=8, block_k=16), ValueError, "block_q=8"),
    (dict(block_q=16, block_k=48), ValueError, "block_k=48"),
    (dict(block_q=16, block_k=256), ValueError, "allowed block sizes"),
    (dict(block_q=16.0, block_k=16), TypeError, "block_q must be an int"),
    (dict(block_q=16, block_k=16, scale=-1.0), ValueError, "scale"),
    (dict(block_q=16, block_k=16, interpret="yes"), TypeError, "interpret"),
])
def test_bad_options_raise(kw, exc, match):
    q, k, v = _small()
    with pytest.raises(exc, match=match):
        pk.block_sparse_attention(q, k, v, jnp.ones((1, 2, 3, 3), bool), **kw)


@pytest.mark.parametrize("mask, exc, match", [
    (jnp.ones((1, 2, 3, 4), bool), ValueError, r"expected \(1 or 1, 2 or 1, 3, 3\)"),
    (jnp.ones((3, 2, 3, 3), bool), ValueError, "block_mask has shape"),
    (jnp.ones((1, 2, 3, 3), jnp.float32), TypeError, "float32"),
    (jnp.full((1, 2, 3, 2), 3, jnp.int32), ValueError, r"outside \[0, 3\)"),
    (jnp.array([[[[0, -1, 1]] * 3] * 2], jnp.int32), ValueError, "padding must come after"),
    (jnp.array([[[[2, 2, -1]] * 3] * 2], jnp.int32), ValueError, "more than once"),
    (jnp.full((1, 2, 3, 2), -3, jnp.int32), ValueError, ">= -1"),
    (pk.BlockIndices(jnp.zeros((1, 2, 3, 2), jnp.int32), jnp.full((1, 2, 3), 3, jnp.int32)), ValueError,
     r"counts must lie in \[0, 2\]"),
    (pk.BlockIndices(jnp.zeros((1, 2, 3, 2), jnp.int32), jnp.ones((1, 2, 2), jnp.int32)), ValueError,
     "counts has shape"),
    ([[True]], TypeError, "list"),
])
def test_bad_masks_raise(mask, exc, match):
    q, k, v = _small()
    with pytest.raises(exc, match=match):
        pk.block_sparse_attention(q, k, v, mask, block_q=16, block_k=16)
    with pytest.raises(exc, match=match):
        R.block_sparse_attention_reference(q, k, v, mask, block_q=16, block_k=16)


def _kr(rows):
    return jnp.asarray(np.array(rows, np.int32)[None, None])


@pytest.mark.parametrize("q_ranges, kv_ranges, exc, match", [
    (_kr([[0, 16], [10, 16], [0, 0]]), _kr([[[0, 5]]] * 3), ValueError, "query tiles .* overlap"),
    (_kr([[0, 16], [20, 16], [0, 0]]), _kr([[[0, 5], [3, 5]]] * 3), ValueError, "key ranges .* overlap"),
    (_kr([[0, 17], [20, 20], [0, 0]]), _kr([[[0, 5]]] * 3), ValueError, r"\[0, block_q=16\]"),
    (_kr([[0, 16], [30, 16], [0, 0]]), _kr([[[0, 5]]] * 3), ValueError, r"inside \[0, Tq=40\)"),
    (_kr([[0, 16], [16, 16], [0, 0]]), _kr([[[35, 6]]] * 3), ValueError, r"inside \[0, Tk=40\)"),
    (_kr([[0, 16], [16, 16], [0, 0]]), _kr([[[5, -1]]] * 3), ValueError, ">= 0"),
    (_kr([[0, 16], [16, 16]]), _kr([[[0, 5]]] * 3), ValueError, "2 tiles but kv_ranges has 3"),
    (_kr([[0, 16], [16, 16], [0, 0]]), _kr([[0, 5]] * 3), ValueError, "kv_ranges has shape"),
    (_kr([[0, 16], [16, 16], [0, 0]]).astype(jnp.float32), _kr([[[0, 5]]] * 3), TypeError, "integer"),
])
def test_bad_ranges_raise(q_ranges, kv_ranges, exc, match):
    q, k, v = _small()
    with pytest.raises(exc, match=match):
        pk.cluster_sparse_attention(q, k, v, kv_ranges, q_ranges=q_ranges, block_q=16, block_k=16)


def test_bad_clusters_raise():
    cm = jnp.ones((1, 1, 2, 3), bool)
    with pytest.raises(ValueError, match="sum to num_q_tokens=40"):
        pk.clusters_to_ranges(cm, jnp.array([[[10, 20]]]), jnp.array([[[10, 10, 20]]]), block_q=16, num_q_tokens=40)
    with pytest.raises(ValueError, match="k_sizes has shape"):
        pk.clusters_to_ranges(cm, jnp.array([[[20, 20]]]), jnp.array([[[10, 10]]]), block_q=16, num_q_tokens=40)
    with pytest.raises(ValueError, match=">= 0"):
        pk.clusters_to_ranges(cm, jnp.array([[[50, -10]]]), jnp.array([[[10, 10, 20]]]), block_q=16,
                              num_q_tokens=40)
    with pytest.raises(ValueError, match="cluster_mask must be a boolean"):
        pk.clusters_to_ranges(cm.astype(jnp.int32), jnp.array([[[20, 20]]]), jnp.array([[[10, 10, 20]]]),
                              block_q=16, num_q_tokens=40)


# -------------------------------------------------------------------- GPU lowering (no GPU needed)

@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.usefixtures("abstract_h100")
def test_kernels_lower_to_triton_for_gpu():
    """Compiled path (interpret=False): bf16 Wan-like head_dim 128, blocks 64, odd length; fp32 head_dim 24
    (padded to 32 inside) with a mask shared by the batch; the cluster kernel."""
    s = jax.ShapeDtypeStruct
    q = s((1, 250, 2, 128), jnp.bfloat16)
    mod = lower_for_cuda(lambda q, k, v, m: pk.block_sparse_attention(q, k, v, m, block_q=64, block_k=64,
                                                                       interpret=False), q, q, q, s((1, 2, 4, 4), bool))
    assert "xla.gpu.triton" in mod
    q32 = s((2, 100, 2, 24), jnp.float32)
    idx = pk.BlockIndices(s((1, 2, 7, 3), jnp.int32), s((1, 2, 7), jnp.int32))
    mod = lower_for_cuda(lambda q, k, v, i: pk.block_sparse_attention(q, k, v, i, block_q=16, block_k=32,
                                                                       interpret=False), q32, q32, q32, idx)
    assert "xla.gpu.triton" in mod
    mod = lower_for_cuda(lambda q, k, v, qr, kr: pk.cluster_sparse_attention(
        q, k, v, kr, q_ranges=qr, block_q=64, block_k=64, interpret=False),
        q, q, q, s((1, 2, 7, 2), jnp.int32), s((1, 2, 7, 5, 2), jnp.int32))
    assert "xla.gpu.triton" in mod
