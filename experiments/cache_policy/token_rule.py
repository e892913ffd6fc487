"""MotionCache's token selection, relaxed: a differentiable MotionCache denoiser for AR chunk rollouts.

    rule = MotionTokenRule(MotionCacheConfig(thresh=0.1, coefficients=...), learn_alpha=True)
    den = relaxed_motioncache(chunk_denoiser(model), rule, mode="straight_through")
    out = relaxed_rollout(den, relaxed_params(den, temperature=0.5), noise, ctx, solver=unipc(20))
    hard = to_motioncache(chunk_denoiser(model), rule, policy)      # the real MotionCache it stands for

Per call and token p a gate g_p (`vidaccel.relaxed.soft_token_gates`: the accumulator margin, temporal vote
and minimum update ratio of `experiments.motioncache.decide_tokens`). Every token runs through the blocks,
and wherever the hard partial forward keeps a cached value the relaxed one mixes `g fresh + (1 - g) cached`:

- in every layer the chunk's K/V buffer becomes g k_fresh + (1 - g) k_stale (same for V) before the queries
  attend to [KV cache ; buffer]; the hard partial forward scatters the selected tokens' fresh K/V there;
- the block-stack output is g fresh + (1 - g) (input + cached residual), the residual g (fresh - input)
  + (1 - g) residual; the hard transform overwrites the selected tokens only.

So gates in {0, 1} give the selected tokens exactly the partial forward's inputs at every layer (per-token
operations do not mix tokens, and unselected tokens only enter attention through the buffer), the others the
cached value: the hard MotionCache rollout (tests/test_relaxed_tokens.py). Accumulators relax to
(1 - g)(acc + delta w); the bookkeeping that is a count (phase-1 updates, `selected`, `forwards`) follows
the hard decisions (g >= 0.5). Motion weights are recomputed from the mixed output (differentiable).

Policy {"log_thresh": ()} (MotionCache's threshold) and, with `learn_alpha`, {"alpha_logit": ()} (the motion
weight floor alpha = sigmoid(alpha_logit)). Expected compute per call: the mean gate, i.e. the fraction of
the chunk's tokens the hard rule would send through the blocks; a partial forward's block FLOPs are linear
in the tokens it computes (its queries attend to a fixed set of keys), so this is the block-stack FLOP
fraction up to the cross-attention's text K/V projections (per call, independent of the tokens) and the
bucket padding of the real partial forward. The chunk's clean K/V pass (kv_mode="clean") is not counted:
dense and cached rollouts both run it. Modes: "soft", "straight_through", "hard" (0/1 gates; every token is
still computed here: the real skipping is `to_motioncache`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.motioncache import MotionCacheConfig, MotionCacheState, motion_weights, motioncache, patchify
from models.ar.kv_cache import cached_attention, layer_state
from vidaccel.checks import choice_arg
from vidaccel.relaxed import (
    MODES,
    RelaxedParams,
    RelaxedState,
    check_policy_shapes,
    check_relaxed_params,
    soft_token_gates,
)
from vidaccel.residual_cache import indicator_value, relative_change, rescale
from vidaccel.transforms import Denoiser, DenoiseSpec, wrap_denoiser


@dataclasses.dataclass(frozen=True)
class MotionTokenRule:
    """MotionCache's rule `cfg` with a learnable threshold (initial value cfg.thresh > 0) and, with
    `learn_alpha`, a learnable motion-weight floor (initial cfg.alpha in (0, 1))."""

    cfg: MotionCacheConfig
    learn_alpha: bool = False

    def __post_init__(self):
        if not isinstance(self.cfg, MotionCacheConfig):
            raise TypeError(f"MotionTokenRule needs a MotionCacheConfig, got {type(self.cfg).__name__}")
        if self.cfg.thresh <= 0:
            raise ValueError(f"MotionTokenRule needs cfg.thresh > 0 (the initial learnable log-threshold), got "
                             f"{self.cfg.thresh}")
        if self.learn_alpha and not 0 < self.cfg.alpha < 1:
            raise ValueError(f"MotionTokenRule(learn_alpha=True) needs cfg.alpha in (0, 1) (alpha = sigmoid of a "
                             f"learned logit), got {self.cfg.alpha}")

    def init_policy(self) -> dict:
        p = {"log_thresh": jnp.float32(math.log(self.cfg.thresh))}
        if self.learn_alpha:
            p["alpha_logit"] = jnp.float32(math.log(self.cfg.alpha / (1 - self.cfg.alpha)))
        return p

    def check_policy(self, policy) -> None:
        check_policy_shapes(policy, {"log_thresh": (), **({"alpha_logit": ()} if self.learn_alpha else {})},
                            "MotionTokenRule")

    def alpha(self, policy):
        return jax.nn.sigmoid(policy["alpha_logit"]) if self.learn_alpha else self.cfg.alpha

    def hard_config(self, policy) -> MotionCacheConfig:
        """The MotionCache config that a policy's hard decisions are (concrete policy values)."""
        self.check_policy(policy)
        return dataclasses.replace(self.cfg, thresh=float(jnp.exp(policy["log_thresh"])),
                                   alpha=float(self.alpha(policy)))


def to_motioncache(den: Denoiser, rule: MotionTokenRule, policy) -> Denoiser:
    """The real MotionCache (partial forwards, `lax.switch` buckets, its own counters) with a policy's
    threshold and alpha, around the plain chunk denoiser `den`: how a learned policy is evaluated."""
    return motioncache(den, rule.hard_config(policy))


def _mixed_blocks(den: Denoiser, model_params, chunk, emb, g):
    """Every chunk token through the blocks with the K/V buffer mixed per token: buffer = g fresh + (1 - g)
    buffer at every layer, then attention over [KV cache ; buffer] (see the module docstring). `chunk` is the
    chunk denoiser's `ChunkState`; returns (tokens, chunk state with buffer and counters advanced)."""
    gk = g[:, :, None, None].astype(jnp.float32)
    read = cached_attention(chunk.cache)

    def attention(q, k, v, info, ls):
        inner, (kb, vb) = ls
        kb = gk * k.astype(kb.dtype) + (1 - gk) * kb
        vb = gk * v.astype(vb.dtype) + (1 - gk) * vb
        out, inner = read(q, kb.astype(k.dtype), vb.astype(v.dtype), info, inner)
        return out, (inner, (kb, vb))

    model = nnx.merge(den.graphdef, model_params)
    tokens, (_, own) = model.blocks(emb, attention=attention, layer_state=(layer_state(chunk.cache), chunk.own),
                                    kv_frames=emb.positions[..., 0])
    n, layers = emb.tokens.shape[1], den.config.num_layers
    keys = jnp.sum(chunk.cache.valid).astype(jnp.float32) + n
    return tokens, chunk.replace(own=own, attn_pairs=chunk.attn_pairs + n * keys * layers,
                                 work=chunk.work.add(block_passes=1, token_layers=n * layers))


def relaxed_motioncache(den: Denoiser, rule: MotionTokenRule, *, mode: str = "straight_through") -> Denoiser:
    """MotionCache relaxed per token around the plain AR chunk denoiser `den` (`chunk_denoiser(model)`, float
    or quantized K/V read with kv_attention "auto"); params `RelaxedParams` of `rule`; run with
    `vidaccel.relaxed.relaxed_rollout`. State: a `RelaxedState` (expected / counted token fraction per call,
    mean gate per call) around the `MotionCacheState` of `motioncache(den, rule.cfg)` (relaxed accumulators,
    mixed residual, hard-decision counters), around the chunk state."""
    choice_arg("mode", mode, MODES)
    if not isinstance(rule, MotionTokenRule):
        raise TypeError(f"relaxed_motioncache needs a MotionTokenRule, got {type(rule).__name__}")
    mc = motioncache(den, rule.cfg)          # checks `den` is a chunk denoiser; its init and commit are reused
    cfg, st = rule.cfg, den.stages
    patch = den.config.patch_size

    def init(spec: DenoiseSpec) -> RelaxedState:
        calls = spec.num_steps * spec.num_chunks
        z = jnp.zeros((), jnp.float32)
        return RelaxedState(mc.init(spec), None, jnp.zeros((0,), jnp.float32), jnp.zeros((), jnp.int32), z, z,
                            jnp.zeros((calls,), jnp.float32), calls, spec.num_steps)

    def apply(params, state: RelaxedState, x, t, context):
        params = check_relaxed_params(params, rule)
        temp = jax.lax.stop_gradient(params.temperature)
        ms: MotionCacheState = state.inner
        emb, chunk = st.embed(params.model, ms.inner, x, t, context)
        b, n, _ = emb.tokens.shape
        ind = indicator_value(cfg.indicator, emb)
        delta = rescale(cfg.coefficients, relative_change(ind, ms.prev), cfg.max_change)
        warm = ms.count < cfg.warmup
        forced = warm | ~jnp.isfinite(delta)         # a change out of the fitted range computes every token
        w = jnp.where((ms.phase1 >= cfg.phase1_updates)[:, None], ms.weights, 1.0)
        g, acc = soft_token_gates(ms.acc, w, jnp.where(forced, 0.0, delta), jnp.exp(params.policy["log_thresh"]),
                                  temp, mode, forced=forced, frames=emb.grid[0], temporal_vote=cfg.temporal_vote,
                                  min_update_ratio=cfg.min_update_ratio)
        upd = g >= 0.5
        counted = upd.any(axis=1) & ~warm & (ms.phase1 < cfg.phase1_updates)
        phase1 = ms.phase1 + counted.astype(jnp.int32)
        n_sel = upd.sum(axis=1).astype(jnp.int32)
        kind = jnp.where(n_sel.max() == 0, 0, jnp.where(jnp.all(n_sel == n), 1, 2))

        fresh, chunk = _mixed_blocks(den, params.model, chunk, emb, g)
        gt = g[..., None].astype(fresh.dtype)
        base, res = emb.tokens, ms.residual
        tokens = gt * fresh + (1 - gt) * (base + res)
        residual = gt * (fresh - base) + (1 - gt) * res

        src = tokens if cfg.motion == "hidden" else patchify(x, patch)
        src = src.reshape(b, emb.grid[0], -1, ms.last_frame.shape[-1])
        done = (phase1 >= cfg.phase1_updates) & (ms.count >= cfg.warmup - 1)
        new_w = motion_weights(src, ms.prev_last, ms.chunk > 0, rule.alpha(params.policy), cfg.motion == "hidden")
        ms = ms.replace(inner=chunk, acc=acc, weights=jnp.where(done[:, None], new_w, ms.weights), prev=ind,
                        residual=residual, last_frame=src[:, -1].astype(jnp.float32), phase1=phase1,
                        count=ms.count + 1, selected=ms.selected + n_sel.sum(), forwards=ms.forwards.at[kind].add(1))
        i = jnp.minimum(state.count, state.calls - 1)
        frac = jnp.mean(g)
        state = state.replace(inner=ms, count=state.count + 1, expected=state.expected + frac,
                              computed=state.computed + jax.lax.stop_gradient(jnp.mean(upd.astype(jnp.float32))),
                              gates=state.gates.at[i].set(frac))
        return st.head(params.model, tokens, emb), state

    def commit(params, state: RelaxedState, x0, context):
        params = check_relaxed_params(params, rule)
        return state.replace(inner=mc.commit(params.model, state.inner, x0, context))

    out = wrap_denoiser(den, init=init, apply=apply, name="relaxed[MotionTokenRule]", commit=commit)
    return dataclasses.replace(out, params=RelaxedParams(den.params, rule.init_policy(), jnp.float32(1.0), rule))


__all__ = ["MotionTokenRule", "relaxed_motioncache", "to_motioncache"]
