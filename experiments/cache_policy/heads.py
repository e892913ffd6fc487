"""Per-(layer, head) XAttention thresholds as a relaxed, learnable policy (issue 18; HASTE's per-head top-p).
`python -m experiments.cache_policy.heads` runs the study (`heads_study`: learned vs uniform vs EBC).

    den = relaxed_xattention(wan_denoiser(model), xattention_shapes(warmup_steps=2), mode="soft")
    params = relaxed_params(den, {"tau": table}, temperature=0.05)     # table (layers, heads)
    out = relaxed_sample(den, params, noise, ctx, solver=unipc(16), guidance=5.0, negative_context=neg)
    compute_fraction(out.state)                                        # attention density, differentiable

Every self-attention call past XAttention's dense warm-up scores blocks as XAttention does
(`antidiagonal_scores`), turns each head's threshold tau into block weights with
`vidaccel.relaxed.soft_block_mask` and attends with `block_weighted_attention`; the layer's row of the policy's
(layers, heads) table is the hook's per-head threshold row (`vidaccel.sparse_attention`), so warm-up, dense
layers and the work counters are the sparse-attention hook's own. "hard" mode is
`sparse_attention(den, xattention(cfg))` itself (the selected blocks only, real savings) with the policy's
table; "straight_through" has the same forward values (weights exactly 0 or 1, the dense-computed
block-sparse attention) and the soft weights' gradient.

Compute counted: the attention core only (the QK^T and PV FLOPs, proportional to the query-key pairs
attended), as a fraction of dense attention over every attention call of the run, the dense warm-up included:
`compute_fraction` is `sparse_summary`'s `density_overall` (mask prediction, projections and the FFN are not
counted; they do not depend on the thresholds). Its differentiable form (`expected`) counts each block by its
weight; `computed` counts the hard masks (`select_blocks`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from experiments.xattention import XAttentionConfig, antidiagonal_scores, block_work, select_blocks, xattention
from vidaccel.checks import choice_arg, int_arg
from vidaccel.relaxed import (
    MODES,
    RelaxedParams,
    RelaxedState,
    block_weighted_attention,
    check_policy_shapes,
    check_relaxed_params,
    soft_block_mask,
)
from vidaccel.sparse_attention import AttnContext, AttnSpec, PredictStats, sparse_attention, threshold_table
from vidaccel.transforms import Denoiser, DenoiseSpec, wrap_denoiser


@dataclasses.dataclass(frozen=True)
class HeadThresholdRule:
    """Learnable per-(layer, head) top-p thresholds: policy {"tau": (layers, heads)}, initialised at `init` (a
    scalar, (heads,) or (layers, heads) table in [0, 1], as `threshold_table` reads it). A tau >= 1 keeps
    every block of its head; the learner keeps tau in [0, 1]."""

    layers: int
    heads: int
    init: float | tuple = 0.9

    def __post_init__(self):
        int_arg("HeadThresholdRule.layers", self.layers, minimum=1)
        int_arg("HeadThresholdRule.heads", self.heads, minimum=1)
        t = threshold_table(self.init, self.layers, self.heads, name="HeadThresholdRule.init")
        object.__setattr__(self, "init", tuple(tuple(float(v) for v in row) for row in t))

    def init_policy(self) -> dict:
        return {"tau": jnp.asarray(self.init, jnp.float32)}

    def check_policy(self, policy) -> None:
        check_policy_shapes(policy, {"tau": (self.layers, self.heads)}, "HeadThresholdRule")


@struct.dataclass
class SoftPlan:
    """One layer's relaxed selection: block weights (B, H, nq, nk) and the work they weigh per head (H,)."""

    weights: jax.Array
    pairs: jax.Array       # expected query-key pairs (weights x block sizes); the hard count in straight-through
    tiles: jax.Array       # expected kernel tiles (sum of weights)


def soft_xattention(cfg: XAttentionConfig, temperature, mode: str):
    """XAttention's `Policy` with the relaxed selection: predict gives block weights (`soft_block_mask` at the
    hook's per-head thresholds), attend is `block_weighted_attention`. Its per-layer state accumulates the hard
    masks' query-key pairs per head ("hard_pairs", (H,)), so that a soft run also counts what the hard rule
    would do. `temperature` may be traced (it is closed over: build the policy inside the traced call)."""
    choice_arg("mode", mode, MODES)
    base = xattention(cfg)
    bs = cfg.block_size

    def init(spec: AttnSpec):
        return {"hard_pairs": jnp.zeros((spec.layers, spec.heads), jnp.float32)}

    def predict(q, k, state, ctx: AttnContext):
        a = antidiagonal_scores(q, k, cfg.stride, bs)
        w = soft_block_mask(a, ctx.threshold, temperature, mode, keep_first_block=cfg.keep_first_block)
        pairs, tiles = block_work(w, q.shape[1], bs)
        hard, _ = block_work(select_blocks(a, ctx.threshold, cfg.keep_first_block), q.shape[1], bs)
        b, _, h, d = q.shape
        npad = w.shape[-1] * bs
        flops = 2.0 * npad * npad * d / cfg.stride * b * h      # as XAttention's prediction counts it
        state = {"hard_pairs": state["hard_pairs"] + jax.lax.stop_gradient(hard)}
        return SoftPlan(w, pairs, tiles), state, PredictStats.ran(flops)

    def attend(q, k, v, plan: SoftPlan, ctx: AttnContext):
        return block_weighted_attention(q, k, v, plan.weights, bs)

    return dataclasses.replace(base, name=f"xattention[{mode}]", init=init, predict=predict, attend=attend,
                               state_head_axes=lambda spec: {"hard_pairs": 0})


def relaxed_xattention(den: Denoiser, cfg: XAttentionConfig, rule: HeadThresholdRule | None = None, *,
                       mode: str = "straight_through") -> Denoiser:
    """The dense staged Wan denoiser `den` with XAttention's per-head thresholds taken from a learnable
    `HeadThresholdRule` policy (default: `cfg.threshold` as the initial table); params are `RelaxedParams`.
    The state is a `RelaxedState` around the sparse-attention hook's `SparseState`: `expected` / `computed`
    sum each call's attention density (see the module docstring), `gates` holds each call's (expected)
    density; `sparse_summary` reads the hook's counters (expected work in soft mode)."""
    choice_arg("mode", mode, MODES)
    if not isinstance(cfg, XAttentionConfig):
        raise TypeError(f"relaxed_xattention needs an XAttentionConfig, got {type(cfg).__name__}")
    mc = den.config
    layers, heads = mc.num_layers, mc.num_attention_heads
    rule = HeadThresholdRule(layers, heads, cfg.threshold) if rule is None else rule
    if not isinstance(rule, HeadThresholdRule):
        raise TypeError(f"relaxed_xattention needs a HeadThresholdRule, got {type(rule).__name__}")
    if (rule.layers, rule.heads) != (layers, heads):
        raise ValueError(f"HeadThresholdRule is ({rule.layers}, {rule.heads}) (layers, heads) but the model has "
                         f"({layers}, {heads}): the threshold table does not match the denoiser")
    hard_den = sparse_attention(den, xattention(cfg))
    template = hard_den if mode == "hard" else sparse_attention(den, soft_xattention(cfg, 1.0, mode))

    def init(spec: DenoiseSpec) -> RelaxedState:
        calls = spec.num_steps * spec.num_chunks
        z = jnp.zeros((), jnp.float32)
        return RelaxedState(template.init(spec), None, None, jnp.zeros((), jnp.int32), z, z,
                            jnp.zeros((calls,), jnp.float32), calls, calls)

    def apply(params, state: RelaxedState, x, t, context):
        params = check_relaxed_params(params, rule)
        temp = jax.lax.stop_gradient(params.temperature)
        sden = hard_den if mode == "hard" else sparse_attention(den, soft_xattention(cfg, temp, mode))
        sp = state.inner.replace(thresholds=jnp.asarray(params.policy["tau"], jnp.float32))
        v, sp2 = sden.apply(params.model, sp, x, t, context)
        dense_pairs = float(sp.spec.batch) * sp.spec.tokens ** 2 * layers * heads      # one dense call
        dense = (sp2.counters.dense_calls - sp.counters.dense_calls).sum() * (dense_pairs / layers)
        expected = (dense + (sp2.counters.pairs - sp.counters.pairs).sum()) / dense_pairs
        if mode == "hard":
            computed = expected
        else:
            computed = (dense + (sp2.policy["hard_pairs"] - sp.policy["hard_pairs"]).sum()) / dense_pairs
        i = jnp.minimum(state.count, state.calls - 1)
        state = state.replace(inner=sp2, count=state.count + 1, expected=state.expected + expected,
                              computed=state.computed + jax.lax.stop_gradient(computed),
                              gates=state.gates.at[i].set(expected))
        return v, state

    out = wrap_denoiser(template, init=init, apply=apply, name=f"relaxed[HeadThresholdRule/{mode}]")
    return dataclasses.replace(out, params=RelaxedParams(den.params, rule.init_policy(), jnp.float32(1.0), rule))


__all__ = ["HeadThresholdRule", "SoftPlan", "soft_xattention", "relaxed_xattention"]


if __name__ == "__main__":          # python -m experiments.cache_policy.heads: the study (heads_study.py)
    from experiments.cache_policy.heads_study import main

    main()
