"""HASTE's Temporal Mask Reuse (TMR): skip a base policy's mask prediction while queries and keys drift little.

Per layer (heads and batch together, per CFG branch) the state keeps an anchor step, the block-mean pooled
Q and K of that step and the plan it predicted (mask; for SVG2 labels, permutations and ranges too). At each
sparse call the drift of the pooled logits against the anchor, ||S_t - S_a||_F / ||S_a||_F with
S = mean_block(Q) mean_block(K)^T / sqrt(d), is taken per (batch, head) and aggregated (max by default);
while it is below `epsilon` and fewer than `max_interval` steps passed since the anchor, the prediction is
skipped by `lax.cond` and the stored plan reused; otherwise it runs and becomes the anchor. The decision is
one per layer because a skip must be a scalar `cond` to skip work.

`granularity="head"` decides per head instead: each head compares its own drift (aggregated over the batch
only) with epsilon and keeps its own anchor step and pooled Q, K. The prediction runs when any head needs
it, and only the heads that needed it take the fresh plan; the others keep theirs (the base policy's state,
e.g. SVG2's centroids, advances for all heads). A call with every head reusing skips the prediction as a
per-layer reuse does. The FLOPs counted are the heads' share, estimate x (heads predicted / heads): the
ideal of a kernel that predicts only the selected heads. On CPU
the jnp prediction computes all heads whenever one needs it, so wall-clock sees only the all-reuse calls.
In the sparse counters a per-head call counts as predicted when any head predicted and as reused when none
did; `head_reuse_counts` reads the per-head counts (masks reused / predicted, in head units).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vidaccel.checks import choice_arg, float_arg, int_arg
from vidaccel.sparse_attention import (
    AttnContext,
    AttnSpec,
    Policy,
    PredictStats,
    all_heads_all,
    all_heads_max,
    all_heads_sum,
)

DRIFTS = ("logits", "qk")
TRIGGERS = ("max", "mean")
GRANULARITIES = ("layer", "head")


@dataclasses.dataclass(frozen=True)
class TMRConfig:
    """Temporal Mask Reuse. Values are ours (HASTE publishes none); see docs/sparse_attention.md.

    epsilon: reuse while the drift is below it (0.1). max_interval: R_max, reuse only while
    step - anchor_step < R_max (4: at most 3 reused steps per anchor). drift: "logits" (pooled-logit
    relative change) or "qk" (max of the pooled Q and K relative changes). pool_block: tokens per pooled
    block (128, XAttention's block). trigger: aggregate of the per-(batch, head) drifts that decides:
    "max" (any head over epsilon recomputes) or "mean". granularity: "layer" (one decision per layer, the
    default) or "head" (each head decides from its own drift; `trigger` then aggregates over the batch only).
    """

    epsilon: float = 0.1
    max_interval: int = 4
    drift: str = "logits"
    pool_block: int = 128
    trigger: str = "max"
    granularity: str = "layer"

    def __post_init__(self):
        float_arg("TMRConfig.epsilon", self.epsilon, low=0)
        int_arg("TMRConfig.max_interval", self.max_interval, minimum=1)
        int_arg("TMRConfig.pool_block", self.pool_block, minimum=1)
        choice_arg("TMRConfig.drift", self.drift, DRIFTS)
        choice_arg("TMRConfig.trigger", self.trigger, TRIGGERS)
        choice_arg("TMRConfig.granularity", self.granularity, GRANULARITIES)


@struct.dataclass
class TMRState:
    """TMR's per-layer state around the base policy's (leading layer axis once stacked)."""

    base: Any                # the base policy's state
    plan: Any                # the anchor's plan
    q_anchor: jax.Array      # (B, H, nb, D) block-mean pooled Q at the anchor step
    k_anchor: jax.Array
    anchor_step: jax.Array   # () int32, or (H,) per head (granularity "head")
    has_anchor: jax.Array    # () bool
    drift: jax.Array         # () float32, the last aggregated drift (diagnostic)
    head_predicted: jax.Array  # (H,) int32: calls in which each head's mask was predicted
    head_reused: jax.Array     # (H,) int32: calls in which each head's mask was reused


def pool_blocks(x: jax.Array, block: int) -> jax.Array:
    """Mean over consecutive token blocks: (B, N, H, D) -> (B, H, ceil(N/block), D) (last block partial)."""
    b, n, h, d = x.shape
    nb = -(-n // block)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * block - n), (0, 0), (0, 0)))
    sums = xp.reshape(b, nb, block, h, d).sum(2)
    counts = np.minimum(block, n - np.arange(nb) * block).astype(np.float32)
    return jnp.swapaxes(sums / counts[None, :, None, None], 1, 2)


def _relative_frobenius(a, b):
    """||a - b||_F / ||b||_F over the last two axes."""
    num = jnp.sqrt(jnp.sum(jnp.square(a - b), axis=(-2, -1)))
    return num / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(b), axis=(-2, -1))), 1e-12)


def drift(q_pooled, k_pooled, q_anchor, k_anchor, kind: str = "logits") -> jax.Array:
    """Per-(batch, head) drift (B, H) of pooled Q, K (B, H, nb, D) against the anchor's."""
    if kind == "qk":
        return jnp.maximum(_relative_frobenius(q_pooled, q_anchor), _relative_frobenius(k_pooled, k_anchor))
    scale = 1.0 / math.sqrt(q_pooled.shape[-1])
    s_t = jnp.einsum("bhid,bhjd->bhij", q_pooled, k_pooled, precision="highest") * scale
    s_a = jnp.einsum("bhid,bhjd->bhij", q_anchor, k_anchor, precision="highest") * scale
    return _relative_frobenius(s_t, s_a)


def aggregate(cfg: TMRConfig, x, ctx: AttnContext | None = None):
    """`cfg.trigger` (max / mean) of drifts x (..., heads) over every head: under head parallelism
    (`ctx.head_axis`) over the other devices' heads too, so every device takes one device's decision."""
    if ctx is None or ctx.head_axis is None:
        return jnp.max(x) if cfg.trigger == "max" else jnp.mean(x)
    if cfg.trigger == "max":
        return all_heads_max(jnp.max(x), ctx)
    return all_heads_sum(jnp.sum(x), ctx) / (x.size // x.shape[-1] * ctx.spec.heads)


def reuse_decision(cfg: TMRConfig, drifts, has_anchor, step, anchor_step, ctx: AttnContext | None = None):
    """(reuse?, aggregated drift): reuse iff an anchor exists, agg(drifts) < epsilon and step - anchor < R_max.
    ctx: the call's context, for the aggregate over heads held by other devices (`aggregate`)."""
    agg = aggregate(cfg, drifts, ctx)
    reuse = has_anchor & (agg < cfg.epsilon) & (step - anchor_step < cfg.max_interval)
    return reuse, jnp.where(has_anchor, agg, jnp.inf).astype(jnp.float32)


def reuse_decision_per_head(cfg: TMRConfig, drifts, has_anchor, step, anchor_step):
    """Per head: (reuse? (H,), drift (H,)): head h reuses iff an anchor exists, its drift aggregated over the
    batch (`cfg.trigger`) is below epsilon and step - anchor_step[h] < R_max."""
    agg = jnp.max(drifts, axis=0) if cfg.trigger == "max" else jnp.mean(drifts, axis=0)
    reuse = has_anchor & (agg < cfg.epsilon) & (step - anchor_step < cfg.max_interval)
    return reuse, jnp.where(has_anchor, agg, jnp.inf).astype(jnp.float32)


def select_heads(reuse, old, new, heads: int):
    """A plan pytree taking head h from `old` where reuse[h] and from `new` elsewhere. Plan leaves are (H,)
    (per-head totals) or (B, H, ...) (batch first, heads second), as XAttention's and SVG2's plans are."""
    def pick(a, b):
        if a.ndim == 1 and a.shape[0] == heads:
            return jnp.where(reuse, a, b)
        if a.ndim >= 2 and a.shape[1] == heads:
            return jnp.where(reuse.reshape((1, heads) + (1,) * (a.ndim - 2)), a, b)
        raise ValueError(f"per-head TMR cannot find the head axis of a plan leaf of shape {a.shape} ({heads} "
                         "heads): leaves must be (H,) or (B, H, ...)")

    return jax.tree.map(pick, old, new)


def head_reuse_counts(states) -> dict:
    """Per-head reuse from TMR states (a `TMRState` or any pytree holding them, e.g. the denoiser state of
    every CFG branch), summed over layers and branches: masks predicted / reused in head units and the
    reused fraction. A per-layer decision counts every head alike."""
    found = [s for s in jax.tree.leaves(states, is_leaf=lambda x: isinstance(x, TMRState))
             if isinstance(s, TMRState)]
    if not found:
        raise ValueError("no TMRState found: was the policy wrapped with temporal_mask_reuse?")
    pred = sum(int(np.asarray(s.head_predicted).sum()) for s in found)
    reused = sum(int(np.asarray(s.head_reused).sum()) for s in found)
    return {"head_masks_predicted": pred, "head_masks_reused": reused,
            "head_reuse_fraction": reused / (pred + reused) if pred + reused else float("nan")}


def temporal_mask_reuse(policy: Policy, cfg: TMRConfig = TMRConfig()) -> Policy:
    """Wrap a policy's mask prediction with TMR (`lax.cond`: a reused step runs no prediction at all)."""
    if not isinstance(cfg, TMRConfig):
        raise TypeError(f"temporal_mask_reuse needs a TMRConfig, got {type(cfg).__name__}")
    per_head = cfg.granularity == "head"

    def plan_shape(spec: AttnSpec, base):
        qk = jax.ShapeDtypeStruct((spec.batch, spec.tokens, spec.heads, spec.head_dim), spec.dtype)
        base0 = jax.tree.map(lambda x: x[0], base)
        ctx = AttnContext(jnp.int32(0), jnp.int32(0), jnp.ones((spec.heads,), jnp.float32), spec)
        return jax.eval_shape(lambda q, k: policy.predict(q, k, base0, ctx)[0], qk, qk)

    def init(spec: AttnSpec) -> TMRState:
        base = policy.init(spec)
        plan = plan_shape(spec, base)
        per_layer = lambda s: jnp.zeros((spec.layers,) + s.shape, s.dtype)
        nb = -(-spec.tokens // cfg.pool_block)
        anchor = jnp.zeros((spec.layers, spec.batch, spec.heads, nb, spec.head_dim), jnp.float32)
        steps = (spec.layers, spec.heads) if per_head else (spec.layers,)
        counts = jnp.zeros((spec.layers, spec.heads), jnp.int32)
        return TMRState(base, jax.tree.map(per_layer, plan), anchor, anchor, jnp.zeros(steps, jnp.int32),
                        jnp.zeros((spec.layers,), bool), jnp.full((spec.layers,), jnp.inf, jnp.float32),
                        counts, counts)

    def state_head_axes(spec: AttnSpec) -> TMRState:
        """Head axes of one layer's state: plan leaves (H,) on 0 and (B, H, ...) on 1 (as `select_heads`)."""
        plan = plan_shape(spec, jax.eval_shape(lambda: policy.init(spec)))
        return TMRState(policy.state_head_axes(spec), jax.tree.map(lambda a: 0 if a.ndim == 1 else 1, plan), 1, 1,
                        0 if per_head else None, None, None, 0, 0)

    def predict(q, k, st: TMRState, ctx: AttnContext):
        if per_head:
            return predict_per_head(q, k, st, ctx)
        b, n, h, d = q.shape
        qp, kp = pool_blocks(q, cfg.pool_block), pool_blocks(k, cfg.pool_block)
        reuse, agg = reuse_decision(cfg, drift(qp, kp, st.q_anchor, st.k_anchor, cfg.drift), st.has_anchor,
                                    ctx.step, st.anchor_step, ctx)
        nb = qp.shape[2]
        check = (2.0 * n * d + (4.0 * nb * nb * d if cfg.drift == "logits" else 4.0 * nb * d)) * b * h

        def keep(_):
            return st.plan, st.base, PredictStats(jnp.int32(0), jnp.int32(1), jnp.float32(0), jnp.float32(0))

        def fresh(_):
            return policy.predict(q, k, st.base, ctx)

        plan, base, stats = jax.lax.cond(reuse, keep, fresh, None)
        new = TMRState(base, plan, jnp.where(reuse, st.q_anchor, qp), jnp.where(reuse, st.k_anchor, kp),
                       jnp.where(reuse, st.anchor_step, ctx.step).astype(jnp.int32), jnp.bool_(True), agg,
                       st.head_predicted + jnp.where(reuse, 0, 1), st.head_reused + jnp.where(reuse, 1, 0))
        return plan, new, stats.replace(check_flops=stats.check_flops + check)

    def predict_per_head(q, k, st: TMRState, ctx: AttnContext):
        b, n, h, d = q.shape
        qp, kp = pool_blocks(q, cfg.pool_block), pool_blocks(k, cfg.pool_block)
        reuse, head_drift = reuse_decision_per_head(cfg, drift(qp, kp, st.q_anchor, st.k_anchor, cfg.drift),
                                                    st.has_anchor, ctx.step, st.anchor_step)
        nb = qp.shape[2]
        check = (2.0 * n * d + (4.0 * nb * nb * d if cfg.drift == "logits" else 4.0 * nb * d)) * b * h
        all_reused = all_heads_all(jnp.all(reuse), ctx)          # over every device's heads
        n_pred = all_heads_sum(jnp.sum(jnp.where(reuse, 0, 1)).astype(jnp.int32), ctx)

        def keep(_):
            return st.plan, st.base, PredictStats(jnp.int32(0), jnp.int32(1), jnp.float32(0), jnp.float32(0))

        def fresh(_):
            plan, base, stats = policy.predict(q, k, st.base, ctx)
            share = n_pred.astype(jnp.float32) / ctx.spec.heads     # the predicted heads' share of the estimate
            return select_heads(reuse, st.plan, plan, h), base, stats.replace(
                estimate_flops=stats.estimate_flops * share)

        plan, base, stats = jax.lax.cond(all_reused, keep, fresh, None)
        sel = reuse[None, :, None, None]
        agg = aggregate(cfg, head_drift, ctx)
        new = TMRState(base, plan, jnp.where(sel, st.q_anchor, qp), jnp.where(sel, st.k_anchor, kp),
                       jnp.where(reuse, st.anchor_step, ctx.step).astype(jnp.int32), jnp.bool_(True),
                       agg.astype(jnp.float32), st.head_predicted + jnp.where(reuse, 0, 1),
                       st.head_reused + jnp.where(reuse, 1, 0))
        return plan, new, stats.replace(check_flops=stats.check_flops + check)

    return dataclasses.replace(policy, name=f"{policy.name}+tmr", init=init, predict=predict,
                               state_head_axes=None if policy.state_head_axes is None else state_head_axes)


__all__ = ["DRIFTS", "TRIGGERS", "GRANULARITIES", "TMRConfig", "TMRState", "pool_blocks", "drift", "aggregate",
           "reuse_decision", "reuse_decision_per_head", "select_heads", "head_reuse_counts", "temporal_mask_reuse"]
