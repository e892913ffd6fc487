"""HASTE's Temporal Mask Reuse (TMR): skip a base policy's mask prediction while queries and keys drift little.

Per layer (heads and batch together, per CFG branch) the state keeps an anchor step, the block-mean pooled
Q and K of that step and the plan it predicted (mask; for SVG2 labels, permutations and ranges too). At each
sparse call the drift of the pooled logits against the anchor, ||S_t - S_a||_F / ||S_a||_F with
S = mean_block(Q) mean_block(K)^T / sqrt(d), is taken per (batch, head) and aggregated (max by default);
while it is below `epsilon` and fewer than `max_interval` steps passed since the anchor, the prediction is
skipped by `lax.cond` and the stored plan reused; otherwise it runs and becomes the anchor. The decision is
one per layer because a skip must be a scalar `cond` to skip work.
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
from vidaccel.sparse_attention import AttnContext, AttnSpec, Policy, PredictStats

DRIFTS = ("logits", "qk")
TRIGGERS = ("max", "mean")


@dataclasses.dataclass(frozen=True)
class TMRConfig:
    """Temporal Mask Reuse. Values are ours (HASTE publishes none); see docs/sparse_attention.md.

    epsilon: reuse while the drift is below it (0.1). max_interval: R_max, reuse only while
    step - anchor_step < R_max (4: at most 3 reused steps per anchor). drift: "logits" (pooled-logit
    relative change) or "qk" (max of the pooled Q and K relative changes). pool_block: tokens per pooled
    block (128, XAttention's block). trigger: aggregate of the per-(batch, head) drifts that decides:
    "max" (any head over epsilon recomputes) or "mean".
    """

    epsilon: float = 0.1
    max_interval: int = 4
    drift: str = "logits"
    pool_block: int = 128
    trigger: str = "max"

    def __post_init__(self):
        float_arg("TMRConfig.epsilon", self.epsilon, low=0)
        int_arg("TMRConfig.max_interval", self.max_interval, minimum=1)
        int_arg("TMRConfig.pool_block", self.pool_block, minimum=1)
        choice_arg("TMRConfig.drift", self.drift, DRIFTS)
        choice_arg("TMRConfig.trigger", self.trigger, TRIGGERS)


@struct.dataclass
class TMRState:
    """TMR's per-layer state around the base policy's (leading layer axis once stacked)."""

    base: Any                # the base policy's state
    plan: Any                # the anchor's plan
    q_anchor: jax.Array      # (B, H, nb, D) block-mean pooled Q at the anchor step
    k_anchor: jax.Array
    anchor_step: jax.Array   # () int32
    has_anchor: jax.Array    # () bool
    drift: jax.Array         # () float32, the last aggregated drift (diagnostic)


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


def reuse_decision(cfg: TMRConfig, drifts, has_anchor, step, anchor_step):
    """(reuse?, aggregated drift): reuse iff an anchor exists, agg(drifts) < epsilon and step - anchor < R_max."""
    agg = jnp.max(drifts) if cfg.trigger == "max" else jnp.mean(drifts)
    reuse = has_anchor & (agg < cfg.epsilon) & (step - anchor_step < cfg.max_interval)
    return reuse, jnp.where(has_anchor, agg, jnp.inf).astype(jnp.float32)


def temporal_mask_reuse(policy: Policy, cfg: TMRConfig = TMRConfig()) -> Policy:
    """Wrap a policy's mask prediction with TMR (`lax.cond`: a reused step runs no prediction at all)."""
    if not isinstance(cfg, TMRConfig):
        raise TypeError(f"temporal_mask_reuse needs a TMRConfig, got {type(cfg).__name__}")

    def init(spec: AttnSpec) -> TMRState:
        base = policy.init(spec)
        qk = jax.ShapeDtypeStruct((spec.batch, spec.tokens, spec.heads, spec.head_dim), spec.dtype)
        base0 = jax.tree.map(lambda x: x[0], base)
        ctx = AttnContext(jnp.int32(0), jnp.int32(0), jnp.ones((spec.heads,), jnp.float32), spec)
        plan = jax.eval_shape(lambda q, k: policy.predict(q, k, base0, ctx)[0], qk, qk)
        per_layer = lambda s: jnp.zeros((spec.layers,) + s.shape, s.dtype)
        nb = -(-spec.tokens // cfg.pool_block)
        anchor = jnp.zeros((spec.layers, spec.batch, spec.heads, nb, spec.head_dim), jnp.float32)
        return TMRState(base, jax.tree.map(per_layer, plan), anchor, anchor, jnp.zeros((spec.layers,), jnp.int32),
                        jnp.zeros((spec.layers,), bool), jnp.full((spec.layers,), jnp.inf, jnp.float32))

    def predict(q, k, st: TMRState, ctx: AttnContext):
        b, n, h, d = q.shape
        qp, kp = pool_blocks(q, cfg.pool_block), pool_blocks(k, cfg.pool_block)
        reuse, agg = reuse_decision(cfg, drift(qp, kp, st.q_anchor, st.k_anchor, cfg.drift), st.has_anchor,
                                    ctx.step, st.anchor_step)
        nb = qp.shape[2]
        check = (2.0 * n * d + (4.0 * nb * nb * d if cfg.drift == "logits" else 4.0 * nb * d)) * b * h

        def keep(_):
            return st.plan, st.base, PredictStats(jnp.int32(0), jnp.int32(1), jnp.float32(0), jnp.float32(0))

        def fresh(_):
            return policy.predict(q, k, st.base, ctx)

        plan, base, stats = jax.lax.cond(reuse, keep, fresh, None)
        new = TMRState(base, plan, jnp.where(reuse, st.q_anchor, qp), jnp.where(reuse, st.k_anchor, kp),
                       jnp.where(reuse, st.anchor_step, ctx.step).astype(jnp.int32), jnp.bool_(True), agg)
        return plan, new, stats.replace(check_flops=stats.check_flops + check)

    return dataclasses.replace(policy, name=f"{policy.name}+tmr", init=init, predict=predict)


__all__ = ["DRIFTS", "TRIGGERS", "TMRConfig", "TMRState", "pool_blocks", "drift", "reuse_decision",
           "temporal_mask_reuse"]
