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
Under a device mesh, `sparse_attention(den, policy, wrap=UlyssesHeads(mesh))` (`vidaccel.parallel`) runs
this per-layer attention head-parallel: each device predicts and applies the masks of its own heads with
its heads' slice of the state (`Policy.state_head_axes`), reductions over heads going across devices
(`AttnContext.head_axis`), so decisions and counters equal one device's (docs/parallel.md).
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
from jax.sharding import PartitionSpec as P

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
    layer index (both traced), this layer's per-head thresholds (H,) and the static sizes.

    head_axis: None on one device; under head parallelism (`sparse_attention(..., wrap=)`, e.g. Ulysses) the
    mesh axis this call's heads are split over: q, k, v, the thresholds and the per-head state then hold
    only this device's heads (`spec` keeps the global sizes). A policy that reduces over heads to take a
    decision reduces across devices too (`all_heads_max`, `all_heads_sum`, `all_heads_all`), so every
    device decides as one device would."""

    step: jax.Array
    layer: jax.Array
    threshold: jax.Array
    spec: AttnSpec = struct.field(pytree_node=False)
    head_axis: str | None = struct.field(pytree_node=False, default=None)


def all_heads_max(x, ctx: AttnContext):
    """`x` (already reduced over this device's heads) maxed over the devices holding the other heads."""
    return x if ctx.head_axis is None else jax.lax.pmax(x, ctx.head_axis)


def all_heads_sum(x, ctx: AttnContext):
    """`x` (already summed over this device's heads) summed over the devices holding the other heads."""
    return x if ctx.head_axis is None else jax.lax.psum(x, ctx.head_axis)


def all_heads_all(x, ctx: AttnContext):
    """Boolean `x` (already all() over this device's heads) and-ed over the devices holding the others."""
    return x if ctx.head_axis is None else jax.lax.pmin(x.astype(jnp.int32), ctx.head_axis).astype(bool)


def head_offset(ctx: AttnContext, local_heads: int):
    """Global index of this device's first head (0 on one device): for per-head draws that must match."""
    return 0 if ctx.head_axis is None else jax.lax.axis_index(ctx.head_axis) * local_heads


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
    state_head_axes(spec) -> for one layer's state (no layer axis), a pytree of its structure (or a prefix of
    it) giving each leaf's head axis (int) or None (the same on every device); None (the field) = unknown:
    the policy then runs head-parallel only if its state has no leaves. Used by `sparse_attention(wrap=)`.
    """

    name: str
    init: Callable[[AttnSpec], Any]
    predict: Callable[..., tuple[Any, Any, PredictStats]]
    attend: Callable[..., jax.Array]
    thresholds: Any
    dense_steps: Callable[[int], int]
    dense_layers: Callable[[int], tuple[int, ...]]
    tiles_dense: Callable[[AttnSpec], float]
    state_head_axes: Callable[[AttnSpec], Any] | None = None


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


def head_state_specs(policy: Policy, spec: AttnSpec, layer_state, axis: str):
    """PartitionSpecs for one layer's policy state (no layer axis) with its head axes split over `axis`, from
    `policy.state_head_axes`; `layer_state` (shapes suffice) is checked against them."""
    leaves = jax.tree.leaves(layer_state)
    if policy.state_head_axes is None:
        if leaves:
            raise ValueError(f"{policy.name!r} cannot run head-parallel (sparse_attention(wrap=...)): its policy "
                             "declares no state_head_axes, so its per-layer state cannot be split over heads")
        return jax.tree.map(lambda _: P(), layer_state)
    axes = policy.state_head_axes(spec)

    def one(a, sub):
        if a is None:
            return P()
        for leaf in jax.tree.leaves(sub):
            shape = jnp.shape(leaf)
            if not (isinstance(a, int) and 0 <= a < len(shape) and shape[a] == spec.heads):
                raise ValueError(f"{policy.name!r}: state_head_axes gives head axis {a!r} for a state leaf of "
                                 f"shape {shape}, which does not hold the {spec.heads} heads there")
        return P(*([None] * a), axis)

    return jax.tree.map(one, axes, layer_state, is_leaf=lambda x: x is None)


def sparse_attention(den: Denoiser, policy: Policy, wrap=None) -> Denoiser:
    """`den` with every self-attention run by `policy` (dense during warm-up steps and in dense layers).

    `den` must be a staged bidirectional Wan denoiser (`wan_denoiser(model)`); the result is staged too, so
    step-level methods (TeaCache) can wrap it. AR chunk denoisers and block-causal models are refused.

    wrap: None (one device, or XLA partitions the attention globally under a mesh), or head parallelism such
    as `vidaccel.parallel.UlyssesHeads(mesh)`: an object with `axis` (the mesh axis heads are split over)
    that `wrap(inner, state_spec)` turns a per-device attention into a self-attention. Each device then
    predicts and applies the masks of its own heads: the policy state, thresholds and per-head counters
    are split over heads by `policy.state_head_axes`, reductions over heads in a policy's decisions go
    across devices (`AttnContext.head_axis`) and the prediction / check FLOPs are summed over devices, so
    decisions and counters equal one device's.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"sparse_attention needs a Policy (e.g. xattention(cfg)), got {type(policy).__name__}")
    if den.stages is None or den.graphdef is None:
        raise ValueError(f"sparse_attention needs a staged Wan denoiser (wan_denoiser(model)); {den.name!r} "
                         "has no stages (apply it before step-level methods such as teacache)")
    if den.commit is not None:
        raise ValueError("sparse_attention supports bidirectional text-to-video denoisers; AR chunk denoisers "
                         "(with a KV cache) are not supported")
    if wrap is not None and not (callable(wrap) and isinstance(getattr(wrap, "axis", None), str)):
        raise TypeError(f"sparse_attention(wrap=...) needs head parallelism with an `axis` (e.g. "
                        f"vidaccel.parallel.UlyssesHeads(mesh)), got {wrap!r}")
    head_axis = None if wrap is None else wrap.axis
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
        pstate = policy.init(aspec)
        if wrap is not None:            # fail at init, not deep in the trace
            head_state_specs(policy, aspec, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                                         pstate), head_axis)
        return SparseState(inner, jnp.zeros((), jnp.int32), pstate,
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
            pstate, counters, thr, step = layer_state   # the step rides along (no tracer closed over a shard_map)
            ctx = AttnContext(step=step, layer=info.layer, threshold=thr, spec=aspec, head_axis=head_axis)

            def run_dense(_):
                out, _ = dense_attention(q, k, v, info)
                return out.astype(q.dtype), pstate, counters.dense_call()

            def run_sparse(_):
                plan, ps, stats = policy.predict(q, k, pstate, ctx)
                out = policy.attend(q, k, v, plan, ctx).astype(q.dtype)
                if head_axis is not None:       # each device spent its heads' share
                    stats = stats.replace(estimate_flops=jax.lax.psum(stats.estimate_flops, head_axis),
                                          check_flops=jax.lax.psum(stats.check_flops, head_axis))
                return out, ps, counters.sparse_call(plan, stats, tiles_dense)

            is_dense = (step < n_dense) | dense_layers[info.layer]
            out, pstate, counters = jax.lax.cond(is_dense, run_dense, run_sparse, None)
            return out, (pstate, counters, thr, step)

        if wrap is not None:
            one_layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state.policy)
            h = P(head_axis)
            cspec = SparseCounters(P(), P(), P(), P(), h, h, P(), P(), P())
            attention = wrap(attention, (head_state_specs(policy, aspec, one_layer, head_axis), cspec, h, P()))
        model = nnx.merge(den.graphdef, params)
        steps = jnp.full((num_layers,), step, jnp.int32)
        tokens, (pstate, counters, _, _) = model.blocks(
            emb, attention=attention, layer_state=(state.policy, state.counters, state.thresholds, steps))
        inner = add_work(state.inner, block_passes=1, token_layers=emb.tokens.shape[1] * num_layers)
        return tokens, state.replace(inner=inner, policy=pstate, counters=counters)

    stages = Stages(embed, blocks, st.head)
    name = f"sparse[{policy.name}]" if wrap is None else f"sparse[{policy.name}]@heads/{head_axis}"
    return wrap_denoiser(den, init=init, apply=staged_apply(stages), name=name, stages=stages)


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
           "with_thresholds", "sparse_summary", "all_heads_max", "all_heads_sum", "all_heads_all", "head_offset",
           "head_state_specs"]
