"""Whole-block-stack residual caching with an accumulated-change rule: the shared core of TeaCache and FlowCache.

At every call a cheap *indicator* (a function of the embedded input, e.g. the timestep modulation `e0`) is
compared with its value at the previous call by relative L1, optionally rescaled by a polynomial, and
accumulated. While the accumulator stays below the threshold the block stack is skipped (`lax.cond`, so
the work is really not done) and the tokens get the residual `blocks(x) - x` stored at the last computed
call; otherwise the blocks run, the residual is refreshed and the accumulator reset. Warm-up calls and
calls from the cut-off on are always computed.

`scope="video"` keeps one accumulator per CFG branch for the whole run (TeaCache); `scope="chunk"` resets
it, with the warm-up and the forced final step, at every chunk of an AR rollout (FlowCache's chunk-wise
rule). Skipped chunks keep their K/V from the last computed call (the wrapped denoiser's cache is simply
not touched).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vidaccel.transforms import Denoiser, DenoiseSpec

SCOPES = ("video", "chunk")


def relative_l1(x: jax.Array, prev: jax.Array) -> jax.Array:
    """mean|x - prev| / mean|prev| over the whole tensor, in float32 (one decision per call)."""
    x, prev = x.astype(jnp.float32), prev.astype(jnp.float32)
    return jnp.mean(jnp.abs(x - prev)) / jnp.maximum(jnp.mean(jnp.abs(prev)), 1e-12)


def rescale(coefficients: tuple[float, ...] | None, d: jax.Array) -> jax.Array:
    """TeaCache's polynomial rescaling (highest degree first, as np.poly1d); identity without coefficients."""
    if not coefficients:
        return d
    return jnp.polyval(jnp.asarray(coefficients, jnp.float32), d)


INDICATORS: dict[str, Callable] = {
    "e0": lambda emb: emb.e0,           # the 6 x dim timestep projection (TeaCache use_ret_steps, FlowCache-SkyReels)
    "e": lambda emb: emb.e,             # the timestep embedding (TeaCache without ret steps)
    "patch": lambda emb: emb.tokens,    # the patch-embedded noisy latent (FlowCache-MAGI's metric)
}


@dataclasses.dataclass(frozen=True)
class ResidualCacheConfig:
    """An accumulated-change caching rule.

    thresh: skip while the accumulator stays below it (0 = never skip). coefficients: rescaling polynomial
    (None = raw relative L1). indicator: a key of INDICATORS. warmup: calls computed at the start of each
    scope. cutoff: calls from this index on (counted from the scope's start; negative counts back from its
    last call, so -1 forces the last call) are computed; None = no cut-off. scope: "video" or "chunk".
    """

    thresh: float
    coefficients: tuple[float, ...] | None = None
    indicator: str = "e0"
    warmup: int = 1
    cutoff: int | None = None
    scope: str = "video"

    def __post_init__(self):
        if not np.isfinite(self.thresh) or self.thresh < 0:
            raise ValueError(f"ResidualCacheConfig.thresh={self.thresh!r} is invalid: a finite number >= 0")
        if self.coefficients is not None:
            object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))
            if not self.coefficients or not all(np.isfinite(self.coefficients)):
                raise ValueError("ResidualCacheConfig.coefficients must be a non-empty sequence of finite numbers "
                                 "(highest degree first) or None")
        if self.indicator not in INDICATORS:
            raise ValueError(f"ResidualCacheConfig.indicator={self.indicator!r} is invalid; allowed: "
                             f"{list(INDICATORS)}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"ResidualCacheConfig.warmup={self.warmup!r} is invalid: an int >= 0")
        if self.cutoff is not None and not isinstance(self.cutoff, int):
            raise ValueError(f"ResidualCacheConfig.cutoff={self.cutoff!r} is invalid: an int or None")
        if self.scope not in SCOPES:
            raise ValueError(f"ResidualCacheConfig.scope={self.scope!r} is invalid; allowed: {SCOPES}")


@struct.dataclass
class ResidualCacheState:
    inner: object              # the wrapped denoiser's state
    acc: jax.Array             # () float32 accumulated rescaled change since the last computed call
    prev: jax.Array            # the indicator at the previous call
    residual: jax.Array        # (B, N, D) blocks(x) - x at the last computed call
    count: jax.Array           # () int32 calls so far in this scope
    computed: jax.Array        # () int32 calls whose blocks ran (this method's own counter)
    scope_calls: int = struct.field(pytree_node=False, default=0)


def decide(cfg: ResidualCacheConfig, acc, delta, count, scope_calls: int):
    """One call's decision: (compute?, accumulator after the call). Pure; unit-tested on hand-made inputs."""
    forced = count < cfg.warmup
    if cfg.cutoff is not None:
        cut = cfg.cutoff if cfg.cutoff >= 0 else scope_calls + cfg.cutoff
        forced = forced | (count >= cut)
    acc_next = acc + delta
    compute = forced | (acc_next >= cfg.thresh)
    return compute, jnp.where(compute, 0.0, acc_next).astype(jnp.float32)


def residual_cache(den: Denoiser, cfg: ResidualCacheConfig, *, name: str = "residual_cache") -> Denoiser:
    """Wrap a staged denoiser (dense, or an AR chunk denoiser) with the accumulated-change residual cache."""
    if den.stages is None:
        raise ValueError(f"residual_cache needs a staged denoiser (wan_denoiser or chunk_denoiser); "
                         f"{den.name!r} has no stages")
    if cfg.scope == "chunk" and den.commit is None:
        raise ValueError("scope='chunk' needs an AR chunk denoiser (one with `commit`); use scope='video'")
    st = den.stages
    indicator = INDICATORS[cfg.indicator]

    def init(spec: DenoiseSpec) -> ResidualCacheState:
        inner = den.init(spec)
        x = jnp.zeros(spec.latents.shape, spec.latents.dtype)
        t = jnp.zeros((spec.latents.shape[0],), jnp.float32)
        ctx = jnp.zeros(spec.context.shape, spec.context.dtype)
        emb = jax.eval_shape(lambda: st.embed(den.params, inner, x, t, ctx)[0])
        ind = indicator(emb)
        scope_calls = spec.num_steps * (spec.num_chunks if cfg.scope == "video" else 1)
        z = jnp.zeros((), jnp.int32)
        return ResidualCacheState(inner, jnp.zeros((), jnp.float32), jnp.zeros(ind.shape, ind.dtype),
                                  jnp.zeros(emb.tokens.shape, emb.tokens.dtype), z, z, scope_calls)

    def apply(params, state: ResidualCacheState, x, t, context):
        emb, inner = st.embed(params, state.inner, x, t, context)
        ind = indicator(emb)
        delta = rescale(cfg.coefficients, relative_l1(ind, state.prev))
        compute, acc = decide(cfg, state.acc, delta, state.count, state.scope_calls)

        def run(inner):
            tokens, inner = st.blocks(params, inner, emb)
            return tokens, tokens - emb.tokens, inner

        def reuse(inner):
            return emb.tokens + state.residual, state.residual, inner

        tokens, residual, inner = jax.lax.cond(compute, run, reuse, inner)
        state = ResidualCacheState(inner, acc, ind, residual, state.count + 1,
                                   state.computed + compute.astype(jnp.int32), state.scope_calls)
        return st.head(params, tokens, emb), state

    commit = None
    if den.commit is not None:
        def commit(params, state: ResidualCacheState, x0, context):
            state = state.replace(inner=den.commit(params, state.inner, x0, context))
            if cfg.scope == "chunk":
                state = state.replace(acc=jnp.zeros_like(state.acc), count=jnp.zeros_like(state.count))
            return state

    return Denoiser(init=init, apply=apply, graphdef=den.graphdef, params=den.params, name=name, stages=None,
                    commit=commit)
