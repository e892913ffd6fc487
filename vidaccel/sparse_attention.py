"""The attention-policy hook: run a staged denoiser's self-attention through a sparse-attention policy.

    den = sparse_attention(wan_denoiser(model), xattention(cfg))              # XAttention
    den = sparse_attention(wan_denoiser(model), haste(svg2(cfg), cfg_h))      # HASTE on SVG2

A `Policy` splits sparse attention into the two stages every method here shares:

* `predict(q, k, layer_state, ctx) -> (plan, layer_state, PredictStats)`: the mask prediction (XAttention's
  antidiagonal estimate, SVG2's k-means and centroid top-p). HASTE's Temporal Mask Reuse wraps it in a
  `lax.cond` that returns the stored plan instead.
* `attend(q, k, v, plan, ctx) -> out`: the sparse attention itself, run by the backend a policy was given
  (`vidaccel.attention.BACKENDS`, resolved by `resolve_backend`): "kernel" (the Pallas kernel), "gather"
  (plain jnp over the selected keys only, `pallas_kernels.gather_jnp`), "reference" (the kernel's masked
  dense jnp reference) or "auto".

The hook gives every layer its own policy state (stacked on a leading layer axis and threaded through the
layer scan), its own row of per-head thresholds (`SparseState.thresholds`, (layers, heads), traced, so a
calibrated table or a threshold sweep needs no recompilation) and its own work counters. Per-CFG-branch
state comes from `sample()`, which calls each branch as a separate denoiser call with its own state.
Dense warm-up steps and dense layers are policy options; a dense call runs exact attention and skips the
policy entirely (`lax.cond`).

Counters (`SparseCounters`, per layer) record the work actually scheduled: attention calls, dense calls,
mask predictions run and reused, query-key pairs and kernel tiles computed per head in sparse calls, and
the FLOPs of mask prediction and of TMR's drift check. `sparse_summary` turns them into densities and
ratios. The counters count what the sparse kernel computes. The other paths give the same result at
different cost: the jnp reference (backend "reference") computes a masked dense attention, and the
gather path ("gather") computes the selected work plus padding up to static bucket widths
(`gather_jnp.gather_work`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from vidaccel.attention import dense_attention
from vidaccel.transforms import (
    Denoiser,
    DenoiseSpec,
    Stages,
    abstract_embedding,
    add_work,
    branch_states,
    find_state,
    staged_apply,
    wrap_denoiser,
)


@dataclasses.dataclass(frozen=True)
class AttnSpec:
    """Static sizes one branch's self-attention runs at: what a policy sizes its state by."""

    batch: int
    tokens: int
    heads: int
    head_dim: int
    layers: int
    steps: int
    dtype: Any = jnp.float32


@struct.dataclass
class AttnContext:
    """What a policy may read besides q, k, v and its state: the call's step (0-based, per CFG branch), the
    layer index (both traced), this layer's per-head thresholds (H,) and the static sizes."""

    step: jax.Array
    layer: jax.Array
    threshold: jax.Array
    spec: AttnSpec = struct.field(pytree_node=False)


@struct.dataclass
class PredictStats:
    """One call's mask-prediction bookkeeping: predicted / reused (0 or 1) and FLOPs spent."""

    predicted: jax.Array
    reused: jax.Array
    estimate_flops: jax.Array
    check_flops: jax.Array

    @classmethod
    def ran(cls, estimate_flops) -> PredictStats:
        return cls(jnp.int32(1), jnp.int32(0), jnp.asarray(estimate_flops, jnp.float32), jnp.float32(0))


@struct.dataclass
class SparseCounters:
    """Work counters of one layer (leading layer axis once stacked).

    calls: attention calls; dense_calls: those run dense (warm-up step or dense layer); predictions / reused:
    sparse calls whose mask was predicted / reused; pairs (H,): query-key pairs computed per head in sparse
    calls (summed over the batch); tiles (H,) and tiles_dense: kernel tiles computed per head, and what the
    dense tiling would have taken, in sparse calls; estimate_flops / check_flops: mask prediction and TMR
    drift-check FLOPs.
    """

    calls: jax.Array
    dense_calls: jax.Array
    predictions: jax.Array
    reused: jax.Array
    pairs: jax.Array
    tiles: jax.Array
    tiles_dense: jax.Array
    estimate_flops: jax.Array
    check_flops: jax.Array

    @classmethod
    def zero(cls, layers: int, heads: int) -> SparseCounters:
        zi, zf = jnp.zeros((layers,), jnp.int32), jnp.zeros((layers,), jnp.float32)
        zh = jnp.zeros((layers, heads), jnp.float32)
        return cls(zi, zi, zi, zi, zh, zh, zf, zf, zf)

    def dense_call(self) -> SparseCounters:
        return self.replace(calls=self.calls + 1, dense_calls=self.dense_calls + 1)

    def sparse_call(self, plan, stats: PredictStats, tiles_dense: float) -> SparseCounters:
        return self.replace(calls=self.calls + 1, predictions=self.predictions + stats.predicted,
                            reused=self.reused + stats.reused, pairs=self.pairs + plan.pairs,
                            tiles=self.tiles + plan.tiles, tiles_dense=self.tiles_dense + tiles_dense,
                            estimate_flops=self.estimate_flops + stats.estimate_flops,
                            check_flops=self.check_flops + stats.check_flops)


@dataclasses.dataclass(frozen=True, eq=False)
class Policy:
    """A sparse-attention policy (see the module docstring).

    init(spec) -> per-layer state, every leaf with a leading `spec.layers` axis (may be `()`).
    predict(q, k, state_l, ctx) -> (plan, state_l, PredictStats); the plan has `pairs` and `tiles` (H,) fields.
    attend(q, k, v, plan, ctx) -> out, q's shape and dtype.
    thresholds: default per-head thresholds: a float, a (heads,) or a (layers, heads) sequence.
    dense_steps(num_steps) -> how many first steps run dense; dense_layers(num_layers) -> layer indices.
    tiles_dense(spec) -> kernel tiles a dense call would take per head (for the tile ratio).
    """

    name: str
    init: Callable[[AttnSpec], Any]
    predict: Callable[..., tuple[Any, Any, PredictStats]]
    attend: Callable[..., jax.Array]
    thresholds: Any
    dense_steps: Callable[[int], int]
    dense_layers: Callable[[int], tuple[int, ...]]
    tiles_dense: Callable[[AttnSpec], float]


@struct.dataclass
class SparseState:
    """State of a sparse-attention denoiser (one CFG branch)."""

    inner: Any                 # the wrapped denoiser's state (its Work counters)
    step: jax.Array            # () int32: calls so far in this branch
    policy: Any                # the policy's per-layer state, leading layer axis
    counters: SparseCounters   # per-layer counters, leading layer axis
    thresholds: jax.Array      # (layers, heads) float32 per-head thresholds (tau / top-p)
    spec: AttnSpec = struct.field(pytree_node=False)


def threshold_table(thresholds, layers: int, heads: int, *, name: str = "thresholds") -> np.ndarray:
    """A scalar, (heads,) or (layers, heads) threshold spec as a float32 (layers, heads) table in [0, 1]."""
    t = np.asarray(thresholds, np.float64)
    if t.ndim == 0:
        t = np.full((layers, heads), float(t))
    elif t.shape == (heads,):
        t = np.broadcast_to(t, (layers, heads))
    elif t.shape != (layers, heads):
        raise ValueError(f"{name} has shape {t.shape}; allowed: a scalar, ({heads},) per head or "
                         f"({layers}, {heads}) per (layer, head) for this model")
    if not np.all(np.isfinite(t)) or np.any(t < 0) or np.any(t > 1):
        raise ValueError(f"{name} must lie in [0, 1]; got values in [{t.min()}, {t.max()}]")
    return t.astype(np.float32)


def check_dense_layers(layers, num_layers: int, name: str = "dense_layers") -> tuple[int, ...]:
    """Validate a tuple of layer indices against the model's layer count."""
    out = tuple(int(i) for i in layers)
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{name}={tuple(layers)} holds {bad}, outside this model's layers 0..{num_layers - 1}")
    return out


def sparse_attention(den: Denoiser, policy: Policy) -> Denoiser:
    """`den` with every self-attention run by `policy` (dense during warm-up steps and in dense layers).

    `den` must be a staged bidirectional Wan denoiser (`wan_denoiser(model)`); the result is staged too, so
    step-level methods (TeaCache) can wrap it. AR chunk denoisers and block-causal models are refused.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"sparse_attention needs a Policy (e.g. xattention(cfg)), got {type(policy).__name__}")
    if den.stages is None or den.graphdef is None:
        raise ValueError(f"sparse_attention needs a staged Wan denoiser (wan_denoiser(model)); {den.name!r} "
                         "has no stages (apply it before step-level methods such as teacache)")
    if den.commit is not None:
        raise ValueError("sparse_attention supports bidirectional text-to-video denoisers; AR chunk denoisers "
                         "(with a KV cache) are not supported")
    cfg = den.config
    if cfg.num_frame_per_block > 1:
        raise ValueError(f"sparse_attention supports bidirectional attention only; this model has "
                         f"num_frame_per_block={cfg.num_frame_per_block} (block-causal)")
    num_layers, heads, head_dim = cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim
    table0 = threshold_table(policy.thresholds, num_layers, heads, name=f"{policy.name} thresholds")
    dense_layer_mask = np.zeros((num_layers,), bool)
    dense_layer_mask[list(check_dense_layers(policy.dense_layers(num_layers), num_layers))] = True
    st = den.stages

    def init(spec: DenoiseSpec) -> SparseState:
        inner = den.init(spec)
        emb = abstract_embedding(den, inner, spec)
        b, n, _ = emb.tokens.shape
        aspec = AttnSpec(b, n, heads, head_dim, num_layers, spec.num_steps, emb.tokens.dtype)
        dense_steps = int(policy.dense_steps(spec.num_steps))
        if dense_steps < 0:
            raise ValueError(f"{policy.name}: dense_steps({spec.num_steps}) = {dense_steps}; must be >= 0")
        return SparseState(inner, jnp.zeros((), jnp.int32), policy.init(aspec),
                           SparseCounters.zero(num_layers, heads), jnp.asarray(table0), aspec)

    def embed(params, state: SparseState, x, t, context):
        emb, inner = st.embed(params, state.inner, x, t, context)
        return emb, state.replace(inner=inner, step=state.step + 1)

    def blocks(params, state: SparseState, emb):
        aspec = state.spec
        step = state.step - 1                       # embed counted this call already
        n_dense = int(policy.dense_steps(aspec.steps))
        tiles_dense = float(policy.tiles_dense(aspec))
        dense_layers = jnp.asarray(dense_layer_mask)

        def attention(q, k, v, info, layer_state):
            pstate, counters, thr = layer_state
            ctx = AttnContext(step=step, layer=info.layer, threshold=thr, spec=aspec)

            def run_dense(_):
                out, _ = dense_attention(q, k, v, info)
                return out.astype(q.dtype), pstate, counters.dense_call()

            def run_sparse(_):
                plan, ps, stats = policy.predict(q, k, pstate, ctx)
                out = policy.attend(q, k, v, plan, ctx).astype(q.dtype)
                return out, ps, counters.sparse_call(plan, stats, tiles_dense)

            is_dense = (step < n_dense) | dense_layers[info.layer]
            out, pstate, counters = jax.lax.cond(is_dense, run_dense, run_sparse, None)
            return out, (pstate, counters, thr)

        model = nnx.merge(den.graphdef, params)
        tokens, (pstate, counters, _) = model.blocks(
            emb, attention=attention, layer_state=(state.policy, state.counters, state.thresholds))
        inner = add_work(state.inner, block_passes=1, token_layers=emb.tokens.shape[1] * num_layers)
        return tokens, state.replace(inner=inner, policy=pstate, counters=counters)

    stages = Stages(embed, blocks, st.head)
    return wrap_denoiser(den, init=init, apply=staged_apply(stages), name=f"sparse[{policy.name}]", stages=stages)


def find_sparse_state(state) -> SparseState:
    """The `SparseState` inside a denoiser state (following `inner` through step-level wrappers)."""
    return find_state(state, SparseState, "; was the denoiser built with sparse_attention?")


def with_thresholds(state: SparseState, table) -> SparseState:
    """`state` with its per-(layer, head) thresholds replaced (a traced input: no recompilation)."""
    layers, heads = state.thresholds.shape
    if isinstance(table, jax.core.Tracer):
        return state.replace(thresholds=jnp.broadcast_to(jnp.asarray(table, jnp.float32), (layers, heads)))
    return state.replace(thresholds=jnp.asarray(threshold_table(table, layers, heads)))


def sparse_summary(state) -> dict:
    """Densities, reuse and FLOP ratios from the counters, summed over CFG branches.

    density_sparse: query-key pairs computed / dense pairs, over sparse calls (the papers' density);
    density_overall: the same over every attention call (dense warm-up included); tile_density: kernel tiles
    over the dense tiling in sparse calls; reuse_fraction: reused masks / sparse calls; attention_flops_ratio:
    (attention + prediction + check FLOPs) / dense attention FLOPs over all calls; density_per_layer_head:
    (layers, heads) density over sparse calls.
    """
    sps = [find_sparse_state(s) for s in branch_states(state)]
    spec = sps[0].spec
    c = jax.tree.map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs), *[s.counters for s in sps])
    calls, dense_calls = c.calls.sum(), c.dense_calls.sum()
    sparse_calls_l = c.calls - c.dense_calls                       # (L,)
    pairs_call = float(spec.batch) * spec.tokens * spec.tokens      # per head
    dense_pairs_sparse = sparse_calls_l.sum() * pairs_call * spec.heads
    pairs = c.pairs.sum()
    dense_flops = 4.0 * spec.head_dim * pairs_call * spec.heads * calls
    done_flops = 4.0 * spec.head_dim * (pairs + dense_calls * pairs_call * spec.heads)
    extra = c.estimate_flops.sum() + c.check_flops.sum()

    def ratio(a, b):
        return float(a / b) if b > 0 else float("nan")

    with np.errstate(invalid="ignore", divide="ignore"):
        per_lh = c.pairs / (sparse_calls_l[:, None] * pairs_call)
    return {
        "attention_calls": int(calls), "dense_calls": int(dense_calls), "sparse_calls": int(calls - dense_calls),
        "predictions": int(c.predictions.sum()), "reused": int(c.reused.sum()),
        "reuse_fraction": ratio(c.reused.sum(), calls - dense_calls),
        "density_sparse": ratio(pairs, dense_pairs_sparse),
        "density_overall": ratio(pairs + dense_calls * pairs_call * spec.heads, calls * pairs_call * spec.heads),
        "tile_density": ratio(c.tiles.sum(), c.tiles_dense.sum() * spec.heads),
        "estimate_flops": float(c.estimate_flops.sum()), "check_flops": float(c.check_flops.sum()),
        "attention_flops": float(done_flops), "dense_attention_flops": float(dense_flops),
        "attention_flops_ratio": ratio(done_flops + extra, dense_flops),
        "prediction_flops_share": ratio(extra, done_flops + extra),
        "density_per_layer_head": np.round(per_lh, 5).tolist(),
    }


__all__ = ["AttnSpec", "AttnContext", "PredictStats", "SparseCounters", "Policy",
           "SparseState", "threshold_table", "check_dense_layers", "sparse_attention", "find_sparse_state",
           "with_thresholds", "sparse_summary"]
