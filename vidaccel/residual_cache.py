"""Whole-block-stack caching with an accumulated-change rule: the shared core of TeaCache and FlowCache.

At every call a cheap *indicator* (a function of the embedded input: the timestep modulation `e0` or `e`,
or the patch-embedded noisy latent) is compared with its value at the previous call (`relative_change`:
mean|x - prev| / mean|prev|, the papers' "relative L1"; not the fidelity metric `vidaccel.metrics.relative_l1`),
optionally rescaled by a polynomial, and accumulated. While the accumulator stays below the threshold the
block stack is skipped (`lax.cond`, so the work is really not done) and the call reuses what the last
computed call produced; otherwise the blocks run, the cached quantity is refreshed and the accumulator
reset. Warm-up calls and calls from the cut-off on are always computed; a threshold of 0 computes every call.

What is reused (`reuse`):
- "hidden" (TeaCache, FlowCache-SkyReels): the block-stack residual `blocks(x) - x`, added to the current
  tokens; the head then runs with the current time embedding.
- "latent" (FlowCache-MAGI): the last computed step's latent displacement `x_{j+1} - x_j`, added again
  without rescaling by the current step size. A Denoiser returns a velocity, not a latent, so this is
  expressed through the solver's step sizes dt_i = sigma_{i+1} - sigma_i: a computed call stores
  `v_j * dt_j` and a reused call returns `delta / dt_i`, which a first-order (Euler) step turns into
  exactly `x_i + delta` (MAGI's solver is Euler). Under CFG each branch reuses its own displacement, so
  when both branches reuse, the guided step again adds exactly the guided displacement. With a multistep
  solver (UniPC) the solver receives the same Euler-equivalent velocity and mixes it with its history, so
  the latent moves by approximately, not exactly, the stored delta.

`scope="video"` keeps one accumulator per CFG branch for the whole run (TeaCache); `scope="chunk"` resets
it, with the warm-up and the cut-off, at every chunk of an AR rollout (FlowCache's chunk-wise rule).
Skipped calls leave the wrapped denoiser's K/V cache untouched (stale K/V, as the papers' code does).

`schedule` replays the rule on recorded indicator changes (from `experiments.teacache.calibrate`), and
`choose_threshold` picks the threshold that computes a target fraction of the calls: for the `e0`/`e`
indicators the changes depend on the timesteps only, so this is exact; for "patch" it is an estimate
from the dense trajectory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vidaccel.checks import choice_arg, float_arg, floats_arg, int_arg, optional_float_arg, optional_int_arg
from vidaccel.transforms import Denoiser, DenoiseSpec, abstract_embedding, wrap_denoiser

SCOPES = ("video", "chunk")
REUSES = ("hidden", "latent")


def relative_change(x: jax.Array, prev: jax.Array) -> jax.Array:
    """mean|x - prev| / mean|prev| over the whole tensor, in float32: the indicator's change since the previous
    call (one scalar, one decision per call)."""
    x, prev = x.astype(jnp.float32), prev.astype(jnp.float32)
    return jnp.mean(jnp.abs(x - prev)) / jnp.maximum(jnp.mean(jnp.abs(prev)), 1e-12)


def rescale(coefficients: tuple[float, ...] | None, d: jax.Array, max_change: float | None = None) -> jax.Array:
    """TeaCache's polynomial rescaling (highest degree first, as np.poly1d); identity without coefficients.

    With `max_change`, a change above it (outside the range the polynomial was fitted on, where a quartic
    can swing to huge negative values) counts as +inf, i.e. forces a computation."""
    out = d if not coefficients else jnp.polyval(jnp.asarray(coefficients, jnp.float32), d)
    return out if max_change is None else jnp.where(d > max_change, jnp.inf, out)


INDICATORS: dict[str, Callable] = {
    "e0": lambda emb: emb.e0,           # the 6 x dim timestep projection (TeaCache use_ret_steps, FlowCache-SkyReels)
    "e": lambda emb: emb.e,             # the timestep embedding (TeaCache without ret steps)
    "patch": lambda emb: emb.tokens,    # the patch-embedded noisy latent (FlowCache-MAGI's metric)
}


def indicator_value(name: str, emb) -> jax.Array:
    """The indicator `name` of an embedded call, in a shape that does not depend on how `t` was given.

    The time indicators ("e0", "e") come out of `embed` with one row per sample when t is (B,) and one row
    per latent frame when t is per frame (B, F'), as diffusion forcing gives it; they are broadcast to
    (B, F', ...) here, so one state sized at `init` serves both. The broadcast repeats rows, so
    `relative_change` is unchanged by it."""
    ind = INDICATORS[name](emb)
    if name in ("e0", "e") and ind.shape[1] == 1:
        ind = jnp.broadcast_to(ind, (ind.shape[0], emb.grid[0], *ind.shape[2:]))
    return ind


def check_change_rule(cfg, *, min_warmup: int = 0) -> None:
    """Check, from a config's `__post_init__`, the fields every accumulated-change rule has (this module's
    `ResidualCacheConfig`, MotionCache's config): thresh a finite number >= 0, coefficients None or finite
    numbers (stored as a tuple of floats), indicator a key of INDICATORS, warmup an int >= `min_warmup`,
    max_change None or a number > 0. Errors name `type(cfg).__name__` and the field."""
    name = type(cfg).__name__
    object.__setattr__(cfg, "thresh", float_arg(f"{name}.thresh", cfg.thresh, low=0.0))
    if cfg.coefficients is not None:
        object.__setattr__(cfg, "coefficients", floats_arg(f"{name}.coefficients", cfg.coefficients))
    choice_arg(f"{name}.indicator", cfg.indicator, tuple(INDICATORS))
    int_arg(f"{name}.warmup", cfg.warmup, min_warmup)
    object.__setattr__(cfg, "max_change", optional_float_arg(f"{name}.max_change", cfg.max_change, low=0.0,
                                                             low_open=True))


@dataclasses.dataclass(frozen=True)
class ResidualCacheConfig:
    """An accumulated-change caching rule.

    thresh: skip while the accumulator stays below it (0 = never skip, even where a fitted polynomial goes
    negative). coefficients: rescaling polynomial (None = the raw relative change). max_change: indicator changes
    above it force a computation (the top of the calibrated range; None = no limit, as the published
    presets, whose changes stay in range). indicator: a key of INDICATORS.
    warmup: calls computed at the start of each scope. cutoff: calls from this index on (counted from the
    scope's start; negative counts back from its last call, so -1 forces the last call) are computed;
    None = no cut-off. scope: "video" or "chunk". reuse: "hidden" or "latent" (see the module docstring).
    """

    thresh: float
    coefficients: tuple[float, ...] | None = None
    indicator: str = "e0"
    warmup: int = 1
    cutoff: int | None = None
    scope: str = "video"
    reuse: str = "hidden"
    max_change: float | None = None

    def __post_init__(self):
        check_change_rule(self)
        optional_int_arg("ResidualCacheConfig.cutoff", self.cutoff)
        choice_arg("ResidualCacheConfig.scope", self.scope, SCOPES)
        choice_arg("ResidualCacheConfig.reuse", self.reuse, REUSES)


@struct.dataclass
class ResidualCacheState:
    inner: object              # the wrapped denoiser's state
    acc: jax.Array             # () float32 accumulated rescaled change since the last computed call
    prev: jax.Array            # the indicator at the previous call
    residual: jax.Array        # "hidden": (B, N, D) blocks(x) - x; "latent": the latent displacement v_j dt_j
    count: jax.Array           # () int32 calls so far in this scope
    computed: jax.Array        # () int32 calls whose blocks ran (this method's own counter)
    scope_calls: int = struct.field(pytree_node=False, default=0)
    num_steps: int = struct.field(pytree_node=False, default=1)


def decide(cfg: ResidualCacheConfig, acc, delta, count, scope_calls: int, thresh=None):
    """One call's decision: (compute?, accumulator after the call). Pure; unit-tested on hand-made inputs.

    `thresh` (may be traced) overrides `cfg.thresh`, for replaying many thresholds at once."""
    thresh = cfg.thresh if thresh is None else thresh
    forced = (count < cfg.warmup) | (thresh == 0)
    if cfg.cutoff is not None:
        cut = cfg.cutoff if cfg.cutoff >= 0 else scope_calls + cfg.cutoff
        forced = forced | (count >= cut)
    acc_next = acc + delta
    compute = forced | (acc_next >= thresh)
    return compute, jnp.where(compute, 0.0, acc_next).astype(jnp.float32)


def step_sizes(solver) -> np.ndarray:
    """(N,) float32 dt_i = sigma_{i+1} - sigma_i of a solver (the Euler-equivalent step of each call)."""
    sig = np.asarray(solver.sigmas, np.float64)
    return (sig[1:] - sig[:-1]).astype(np.float32)


def residual_cache(den: Denoiser, cfg: ResidualCacheConfig, *, name: str = "residual_cache",
                   solver=None) -> Denoiser:
    """Wrap a staged denoiser (dense, or an AR chunk denoiser) with the accumulated-change cache.

    `solver` (the one sampling with it) is needed by `reuse="latent"`, for its step sizes.
    """
    if den.stages is None:
        raise ValueError(f"residual_cache needs a staged denoiser (wan_denoiser or chunk_denoiser); "
                         f"{den.name!r} has no stages")
    if cfg.scope == "chunk" and den.commit is None:
        raise ValueError("scope='chunk' needs an AR chunk denoiser (one with `commit`); use scope='video'")
    if cfg.reuse == "latent" and solver is None:
        raise ValueError("reuse='latent' needs the solver that samples with this denoiser (solver=...), whose "
                         "step sizes turn the stored latent displacement into a velocity")
    st = den.stages
    indicator = partial(indicator_value, cfg.indicator)
    dts = None if solver is None else step_sizes(solver)

    def init(spec: DenoiseSpec) -> ResidualCacheState:
        if dts is not None and len(dts) != spec.num_steps:
            raise ValueError(f"the solver given to {name} has {len(dts)} steps but sampling runs {spec.num_steps}")
        inner = den.init(spec)
        emb = abstract_embedding(den, inner, spec)
        ind = jax.eval_shape(indicator, emb)
        scope_calls = spec.num_steps * (spec.num_chunks if cfg.scope == "video" else 1)
        stored = emb.tokens if cfg.reuse == "hidden" else spec.latents
        z = jnp.zeros((), jnp.int32)
        return ResidualCacheState(inner, jnp.zeros((), jnp.float32), jnp.zeros(ind.shape, ind.dtype),
                                  jnp.zeros(stored.shape, stored.dtype), z, z, scope_calls, spec.num_steps)

    def apply(params, state: ResidualCacheState, x, t, context):
        emb, inner = st.embed(params, state.inner, x, t, context)
        ind = indicator(emb)
        delta = rescale(cfg.coefficients, relative_change(ind, state.prev), cfg.max_change)
        compute, acc = decide(cfg, state.acc, delta, state.count, state.scope_calls)

        if cfg.reuse == "hidden":
            def run(inner):
                tokens, inner = st.blocks(params, inner, emb)
                return tokens, tokens - emb.tokens, inner

            def reuse(inner):
                return emb.tokens + state.residual, state.residual, inner

            tokens, residual, inner = jax.lax.cond(compute, run, reuse, inner)
            out = st.head(params, tokens, emb)
        else:
            dt = jnp.asarray(dts)[state.count % state.num_steps]

            def run(inner):
                tokens, inner = st.blocks(params, inner, emb)
                v = st.head(params, tokens, emb)
                return v, (v.astype(jnp.float32) * dt).astype(state.residual.dtype), inner

            def reuse(inner):
                return (state.residual.astype(jnp.float32) / dt).astype(x.dtype), state.residual, inner

            out, residual, inner = jax.lax.cond(compute, run, reuse, inner)
        state = state.replace(inner=inner, acc=acc, prev=ind, residual=residual, count=state.count + 1,
                              computed=state.computed + compute.astype(jnp.int32))
        return out, state

    commit = None
    if den.commit is not None and cfg.scope == "chunk":
        def commit(params, state: ResidualCacheState, x0, context):
            state = state.replace(inner=den.commit(params, state.inner, x0, context))
            return state.replace(acc=jnp.zeros_like(state.acc), count=jnp.zeros_like(state.count))

    return wrap_denoiser(den, init=init, apply=apply, name=name, commit=commit)


# ------------------------------------------------------------------------------- offline schedule + threshold
@partial(jax.jit, static_argnums=(0, 2))
def _schedule(cfg: ResidualCacheConfig, changes: jax.Array, scope_calls: int, thresholds: jax.Array) -> jax.Array:
    """(thresholds, runs, calls) compute decisions; cfg.thresh is ignored in favour of `thresholds`."""
    def one_run(ch, thresh):
        def body(acc, xs):
            i, d = xs
            count = i % scope_calls
            acc = jnp.where(count == 0, 0.0, acc)
            compute, acc = decide(cfg, acc, rescale(cfg.coefficients, d, cfg.max_change), count, scope_calls,
                                  thresh)
            return acc, compute

        return jax.lax.scan(body, jnp.zeros((), jnp.float32), (jnp.arange(ch.shape[0]), ch))[1]

    runs = jax.vmap(one_run, in_axes=(0, None))
    return jax.vmap(runs, in_axes=(None, 0))(changes, thresholds)


def _rule(cfg: ResidualCacheConfig) -> ResidualCacheConfig:
    """The config with a placeholder threshold: one compiled replay serves every threshold."""
    return dataclasses.replace(cfg, thresh=1.0)


def schedule(cfg: ResidualCacheConfig, changes, scope_calls: int) -> np.ndarray:
    """Replay the rule on recorded indicator changes (`relative_change`, shaped (runs, calls)): which calls are
    computed.

    `scope_calls` = calls per scope (steps per chunk for "chunk", all calls for "video"); the counter and
    accumulator restart at every multiple of it, as `residual_cache` does at each chunk commit.
    """
    changes = np.atleast_2d(np.asarray(changes, np.float32))
    out = _schedule(_rule(cfg), jnp.asarray(changes), int(scope_calls), jnp.asarray([cfg.thresh], jnp.float32))
    return np.asarray(out[0])


def choose_threshold(cfg: ResidualCacheConfig, changes, scope_calls: int, target: float, *,
                     grid: int = 481) -> tuple[float, float]:
    """The threshold for `cfg`'s rule (its own thresh ignored) whose replayed schedule computes the fraction
    of calls closest to `target`, searched on a log grid spanning the scale of the rescaled changes. Among
    the grid points reaching the closest fraction the geometric middle is taken (robust to small changes of
    a content-dependent indicator). Returns (threshold, fraction of calls computed)."""
    target = float_arg("choose_threshold target", target, low=0.0, high=1.0, low_open=True)
    changes = np.atleast_2d(np.asarray(changes, np.float32))
    scale = np.abs(np.asarray(rescale(cfg.coefficients, jnp.asarray(changes), cfg.max_change)))
    scale[..., ::scope_calls] = 0.0            # each scope's first call is forced by any warm-up
    hi = max(float(np.sum(np.where(np.isfinite(scale), scale, 0.0), axis=-1).max()), 1e-6)
    cands = np.geomspace(hi * 1e-6, hi, grid).astype(np.float32)
    fracs = np.asarray(_schedule(_rule(cfg), jnp.asarray(changes), int(scope_calls), jnp.asarray(cands)))
    fracs = fracs.mean(axis=(1, 2))
    err = np.abs(fracs - target)
    best = np.flatnonzero(err <= err.min() + 1e-9)
    pick = float(np.exp(np.log(cands[best].astype(np.float64)).mean()))
    return pick, float(schedule(dataclasses.replace(cfg, thresh=pick), changes, scope_calls).mean())
