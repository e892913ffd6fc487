"""The plain-jnp gather path (`pallas_kernels.gather_jnp`) against the references and a kernel, its buckets
and schedule, its errors, and a counting check (XLA's cost analysis) that it really computes less."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_block_sparse_attention import TOL, finite, qkv, random_block_mask, rel_l2

import pallas_kernels as pk
from experiments.bench_kernels import varied_blocks
from experiments.sparse_table import TableConfig
from pallas_kernels import gather_jnp as G
from pallas_kernels import reference as R

B, TQ, TK, H, D, BQ, BK = 2, 150, 170, 3, 32, 32, 16   # odd lengths: neither is a block multiple
NQ, NK = -(-TQ // BQ), -(-TK // BK)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_block_gather_matches_reference(dtype):
    """Random per-(batch, head) masks with an empty and a full row (the model tests run it under jit)."""
    q, k, v = qkv(10, B, TQ, TK, H, D, dtype)
    mask = random_block_mask(11, B, H, NQ, NK, density=0.35)
    ref = R.block_sparse_attention_reference(q, k, v, mask, block_q=BQ, block_k=BK)
    out = pk.block_sparse_attention_gather(q, k, v, mask, block_q=BQ, block_k=BK)
    assert out.shape == q.shape and out.dtype == q.dtype and finite(out)
    assert rel_l2(out, ref) <= TOL[dtype]
    assert (np.asarray(out[0, BQ:2 * BQ, 0], np.float32) == 0).all()      # the empty row: exact zeros


def test_block_gather_matches_kernel_and_other_mask_forms():
    """Equal to the Pallas kernel (interpret mode); an index list with -1 padding and trimmed `BlockIndices`
    (max_k < nk) give the reference's result; an all-empty mask gives zeros."""
    q, k, v = qkv(12, B, TQ, TK, H, D)
    mask = random_block_mask(13, B, H, NQ, NK)
    ker = pk.block_sparse_attention(q, k, v, mask, block_q=BQ, block_k=BK, interpret=True)
    assert rel_l2(pk.block_sparse_attention_gather(q, k, v, mask, block_q=BQ, block_k=BK), ker) <= 1e-5
    ref = R.block_sparse_attention_reference(q, k, v, mask, block_q=BQ, block_k=BK)
    short = pk.shrink_indices(pk.block_mask_to_indices(mask))                   # max_k < nk
    listed = jnp.where(jnp.arange(short.indices.shape[-1]) < short.counts[..., None], short.indices, -1)
    for m in (listed, short):
        assert rel_l2(pk.block_sparse_attention_gather(q, k, v, m, block_q=BQ, block_k=BK), ref) <= 1e-5
    none = jnp.zeros((B, H, NQ, NK), bool)
    assert (np.asarray(pk.block_sparse_attention_gather(q, k, v, none, block_q=BQ, block_k=BK)) == 0).all()


def _clusters(seed, b, h, n, nqc, nkc, block_q, p=0.4):
    """Random cluster sizes (some empty) and selection (one query cluster selects nothing) -> ranges."""
    rng = np.random.default_rng(seed)

    def sizes(c):
        cuts = np.sort(rng.integers(0, n + 1, (b, h, c - 1)), axis=-1)
        return np.diff(np.concatenate([np.zeros((b, h, 1), int), cuts, np.full((b, h, 1), n)], -1), axis=-1)

    sel = rng.random((b, h, nqc, nkc)) < p
    sel[0, 0, 1] = False
    sel[-1, -1, 0] = True
    return pk.clusters_to_ranges(jnp.asarray(sel), jnp.asarray(sizes(nqc), jnp.int32),
                                 jnp.asarray(sizes(nkc), jnp.int32), block_q=block_q, num_q_tokens=n)


def test_cluster_gather_matches_reference():
    """fp32: random variable clusters (partial and dead query tiles, merged key runs, a query cluster that
    selects nothing), different per (batch, head). bf16: the fixed query tiling (q_ranges=None) with key ranges
    shared over batch and heads, one tile attending to nothing. Rows without keys are exact zeros."""
    n = 150
    q, k, v = qkv(20, B, n, n, H, D)
    qr, kr = _clusters(21, B, H, n, 5, 11, BQ)
    ref = R.cluster_sparse_attention_reference(q, k, v, kr, q_ranges=qr, block_q=BQ, block_k=BK)
    out = pk.cluster_sparse_attention_gather(q, k, v, kr, q_ranges=qr, block_q=BQ, block_k=BK)
    assert out.shape == q.shape and out.dtype == q.dtype and finite(out)
    assert rel_l2(out, ref) <= 1e-5
    assert float(jnp.abs(ref).max(axis=-1).min()) == 0.0                       # some rows really are zeros
    np.testing.assert_array_equal(np.asarray(out) == 0, np.asarray(ref) == 0)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    shared = jnp.broadcast_to(jnp.array([[0, 40], [90, 33]], jnp.int32), (1, 1, -(-n // BQ), 2, 2))
    shared = shared.at[0, 0, 2].set(0)                                          # tile 2 attends to nothing
    ref = R.cluster_sparse_attention_reference(q, k, v, shared, block_q=BQ, block_k=BK)
    out = pk.cluster_sparse_attention_gather(q, k, v, shared, block_q=BQ, block_k=BK)
    assert out.dtype == jnp.bfloat16 and finite(out) and rel_l2(out, ref) <= 1e-2
    assert (np.asarray(out[:, 2 * BQ:3 * BQ], np.float32) == 0).all()


def test_buckets_and_schedule():
    """Widths are multiples of ceil(n / WIDTH_STEPS); a group takes the smallest width >= its largest count
    (0 = the zeros branch); rows are grouped by sorted count, so `gather_work` follows the sorted staircase."""
    assert G.width_buckets(32, 16) == tuple(range(2, 33, 2))
    assert G.width_buckets(5, 16) == (1, 2, 3, 4, 5)
    assert G.width_buckets(100, 8) == (13, 25, 38, 50, 63, 75, 88, 100)
    widths = (4, 8, 12)
    got = [int(G.bucket_index(jnp.int32(c), widths)) for c in (0, 1, 4, 5, 8, 9, 12)]
    assert got == [0, 1, 1, 2, 2, 3, 3]
    # counts 0..31 shuffled: sorted descending and cut into groups, each paying its largest count rounded up
    counts = np.random.default_rng(0).permutation(32)
    widths, rpg = G.group_plan(32, 32, 16)
    assert rpg == -(-32 // G.ROW_GROUPS)
    expected = sum(rpg * min(w for w in widths if w >= max(grp)) if max(grp) else 0
                   for grp in np.sort(counts)[::-1].reshape(-1, rpg))
    assert int(G.gather_work(counts, 32, row_len=16)) == expected
    assert int(G.gather_work(np.zeros(7, int), 32, row_len=16)) == 0
    # a group's logits are capped: 1000 rows of 128 queries over 4096 keys -> fewer rows per group
    assert G.group_plan(1000, 4096, 128)[1] == G.MAX_GROUP_LOGITS // (128 * 4096)


def test_gather_work_stays_close_to_the_selection():
    """Varied per-row counts (XAttention-like): the gathered units exceed the selected ones by at most one group
    of dense rows plus the bucket rounding."""
    rng = np.random.default_rng(1)
    rows, n = 4 * 256, 256
    counts = np.minimum(n, rng.geometric(1 / 40, rows))
    work = int(G.gather_work(counts, n, row_len=16, unit=16))
    dense = rows * n
    assert counts.sum() <= work <= counts.sum() + dense * (1 / G.ROW_GROUPS + 1 / G.WIDTH_STEPS)


def test_compiled_flops_scale_with_density():
    """A counting measurement, not an assumption: XLA's cost analysis of the compiled call, with the mask a
    compile-time constant (so the chosen switch branch is known), at 1/4 of the blocks vs all of them. The
    jnp reference costs the same at both densities. The mask is shared over batch and heads (B = H = 1); the
    quarter-density result equals the reference's."""
    b, n, h, d, bs = 2, 128, 2, 32, 16
    q, k, v = qkv(30, b, n, n, h, d)
    nb = n // bs

    def compiled(fn, n_sel):
        bi = pk.BlockIndices(jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32)[::-1][:n_sel], (1, 1, nb, n_sel)),
                             jnp.full((1, 1, nb), n_sel, jnp.int32))
        c = jax.jit(lambda q, k, v: fn(q, k, v, bi, block_q=bs, block_k=bs)).lower(q, k, v).compile()
        cost = c.cost_analysis()
        return c, (cost[0] if isinstance(cost, list) else cost)["flops"]

    (g_quarter, quarter), (_, full) = compiled(pk.block_sparse_attention_gather, nb // 4), \
        compiled(pk.block_sparse_attention_gather, nb)
    assert 0.2 <= quarter / full <= 0.3
    (r_quarter, ref_q), (_, ref_f) = compiled(R.block_sparse_attention_reference, nb // 4), \
        compiled(R.block_sparse_attention_reference, nb)
    assert ref_q / ref_f > 0.95
    assert rel_l2(g_quarter(q, k, v), r_quarter(q, k, v)) <= 1e-5


def test_errors():
    q, k, v = qkv(40, 1, 40, 40, 2, 16)
    mask = jnp.ones((1, 2, 3, 3), bool)
    with pytest.raises(ValueError, match="block_q=48"):
        pk.block_sparse_attention_gather(q, k, v, mask, block_q=48, block_k=16)
    with pytest.raises(ValueError, match="block_mask has shape"):
        pk.block_sparse_attention_gather(q, k, v, jnp.ones((1, 2, 3, 4), bool), block_q=16, block_k=16)
    with pytest.raises(ValueError, match="outside"):
        pk.block_sparse_attention_gather(q, k, v, jnp.full((1, 2, 3, 1), 5, jnp.int32), block_q=16, block_k=16)
    with pytest.raises(TypeError, match="dtype"):
        pk.block_sparse_attention_gather(q.astype(jnp.int32), k, v, mask, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="overlap"):
        kr = jnp.array([[[[[0, 10], [5, 10]]]]], jnp.int32)
        pk.cluster_sparse_attention_gather(q, k, v, jnp.broadcast_to(kr, (1, 1, 3, 2, 2)), block_q=16, block_k=16)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        G.width_buckets(0)
    with pytest.raises(TypeError, match=r"steps must be an int, got True \(bool\)"):
        G.width_buckets(4, True)
    with pytest.raises(ValueError, match="TableConfig.backend='cuda' is not allowed"):
        TableConfig(backend="cuda")
    with pytest.raises(ValueError, match="density=1.0 cannot vary"):
        varied_blocks(jax.random.key(0), 1, 1, 4, 4, 1.0)
