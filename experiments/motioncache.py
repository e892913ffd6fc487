"""MotionCache (arXiv 2605.01725) for AR chunk rollouts: motion-weighted token-wise caching with a partial forward.

    den = motioncache(chunk_denoiser(model), MotionCacheConfig(thresh=0.1, coefficients=...))
    out = rollout(den, noise, context, solver=solver, ...)

Per chunk and CFG branch (../shared/specs/ar_caching.md section 2; SkyReels-V2 code as run by
`run_vbench.sh`), with s the chunk's call index:

- s < warmup (5): full forward, accumulators reset (the code's `warmup=4` steps plus its `step == 4` step);
- then every token p accumulates A[p] += W[p] * d, d = poly(relL1(e0, e0_prev)) (the code's "global"
  distance, one TeaCache-rescaled scalar per call), and is recomputed iff A[p] >= thresh (then A[p] = 0);
- phase 1: W = 1 (chunk-level, FlowCache's rule) until `phase1_updates` (6) calls have computed tokens;
- phase 2: W = alpha + (1 - alpha) * minmax_per_frame(M), alpha = 0.6, from a motion map M of frame
  differences, refreshed after every call and used at the next; the first frame of a chunk is compared
  with the last frame of the previous chunk (chunk 0 copies frame 1's map);
- no selected token: reuse the whole cached block-stack residual; every token: a full forward; otherwise a
  **partial forward**: only the selected tokens run through the blocks, at their own RoPE positions and
  time rows, in a static bucket of sizes (padded, masked; `lax.switch`), their fresh K/V scattered into the
  chunk denoiser's K/V buffer for the chunk while the others keep stale K/V (in `kv_mode="last_step"` the
  buffer is what the chunk commits, as the code's chunk slot); the selected tokens get the fresh output
  (and their residual is refreshed), the others the cached residual.

Paper vs code, and which we follow (config field):
- `motion`: "hidden" (default, SkyReels code: relative change mean|h_f - h_f-1| / mean|h_f-1| of the output
  hidden states per token) or "latent" (paper Eq 9 and the MAGI code: absolute L1 frame difference of the
  latent, averaged over the channels and the token's 2x2 patch). In "latent" mode the map is taken from
  the call's input latent, and the previous chunk's last frame is its clean latent.
- `warmup` 5 and `phase1_updates` 6: the code (the paper's K = 6 chunk-level steps).
- `temporal_vote` 0.5: code-only, on in `run_vbench.sh`: a spatial position updates in every frame of the
  chunk iff more than half of its frames selected it. None = off (the paper).
- `min_update_ratio` 0.4: code-only, the code's default: when 0 < selected fraction < 0.4 the call skips
  the forward entirely (accumulators not reset). 0 = off (the paper).
- No forced last step and no KV compression (neither code has them).
- The code decides once per chunk with batch 1 and averages the motion map over the batch; we keep one
  decision per video of the batch (accumulators, weights and phase counters per sample), and the batch's
  forward takes the bucket of its largest selection.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from experiments.teacache import WAN21_COEFFICIENTS
from models.ar.kv_cache import scatter_tokens
from vidaccel.checks import choice_arg, float_arg, floats_arg, int_arg
from vidaccel.residual_cache import check_change_rule, indicator_value, relative_change, rescale
from vidaccel.transforms import Denoiser, DenoiseSpec, abstract_embedding, wrap_denoiser

MOTIONS = ("hidden", "latent")
DEFAULT_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


@dataclasses.dataclass(frozen=True)
class MotionCacheConfig:
    """MotionCache's rule; defaults are the SkyReels-V2 code as `run_vbench.sh` runs it (see module docstring).

    thresh, coefficients, indicator, warmup (>= 1: a chunk's first call is a full forward) and max_change
    mean what they mean in `ResidualCacheConfig` and are checked by the same `check_change_rule`.
    buckets: static partial-forward sizes as fractions of the chunk's tokens (rounded up, deduplicated; the
    last must be 1.0); a partial forward runs the smallest bucket holding the selected tokens.
    """

    thresh: float = 0.1
    coefficients: tuple[float, ...] | None = WAN21_COEFFICIENTS[("1.3b", True)]
    indicator: str = "e0"
    warmup: int = 5
    phase1_updates: int = 6
    alpha: float = 0.6
    motion: str = "hidden"
    temporal_vote: float | None = 0.5
    min_update_ratio: float = 0.4
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    max_change: float | None = None

    def __post_init__(self):
        check_change_rule(self, min_warmup=1)
        int_arg("MotionCacheConfig.phase1_updates", self.phase1_updates, 0)
        choice_arg("MotionCacheConfig.motion", self.motion, MOTIONS)
        fraction = lambda field, **bounds: float_arg(f"MotionCacheConfig.{field}", getattr(self, field), **bounds)
        object.__setattr__(self, "alpha", fraction("alpha", low=0.0, high=1.0))
        object.__setattr__(self, "min_update_ratio", fraction("min_update_ratio", low=0.0, high=1.0))
        if self.temporal_vote is not None:
            object.__setattr__(self, "temporal_vote", fraction("temporal_vote", low=0.0, high=1.0, high_open=True))
        b = floats_arg("MotionCacheConfig.buckets", self.buckets, low=0.0, high=1.0, low_open=True)
        if list(b) != sorted(set(b)) or b[-1] != 1.0:
            raise ValueError(f"MotionCacheConfig.buckets={b} must be increasing fractions in (0, 1] ending with 1.0")
        object.__setattr__(self, "buckets", b)

    def bucket_sizes(self, n: int) -> tuple[int, ...]:
        """The static token counts of partial forwards for a chunk of `n` tokens."""
        return tuple(sorted({min(n, max(1, int(np.ceil(f * n)))) for f in self.buckets}))


@struct.dataclass
class MotionCacheState:
    inner: object              # the chunk denoiser's state
    acc: jax.Array             # (B, N) float32 per-token accumulators
    weights: jax.Array         # (B, N) float32 motion weights used in phase 2
    prev: jax.Array            # the indicator at the previous call
    residual: jax.Array        # (B, N, D) block-stack output - input, per token, at its last computation
    last_frame: jax.Array      # (B, HW, Cs) the motion source's last frame in this chunk (latest call)
    prev_last: jax.Array       # (B, HW, Cs) the previous chunk's last frame
    phase1: jax.Array          # (B,) int32 phase-1 calls that computed tokens
    count: jax.Array           # () int32 calls so far in this chunk
    chunk: jax.Array           # () int32 chunks committed
    selected: jax.Array        # () int32 tokens selected for computation (unpadded, summed over the batch)
    forwards: jax.Array        # (3,) int32 calls by kind: [no forward, full forward, partial forward]


def decide_tokens(cfg: MotionCacheConfig, acc, weights, delta, count, phase1, frames: int):
    """One call's per-token decision. acc, weights (B, N); delta () the call's rescaled change; count () the
    chunk's call index; phase1 (B,); frames: latent frames of the chunk (tokens are frame-major).

    Returns (update (B, N) bool, accumulators after the call, phase-1 counter after the call). Pure; tested
    on hand-made inputs."""
    b, n = acc.shape
    forced = (count < cfg.warmup) | (cfg.thresh == 0)
    w = jnp.where((phase1 >= cfg.phase1_updates)[:, None], weights, 1.0)
    acc_next = acc + delta * w
    upd = acc_next >= cfg.thresh
    if cfg.temporal_vote is not None:
        col = upd.reshape(b, frames, n // frames).mean(axis=1) > cfg.temporal_vote
        upd = jnp.broadcast_to(col[:, None, :], (b, frames, n // frames)).reshape(b, n)
    if cfg.min_update_ratio > 0:
        ratio = upd.mean(axis=1)
        upd = upd & ~((ratio > 0) & (ratio < cfg.min_update_ratio))[:, None]
    upd = upd | forced
    acc_next = jnp.where(upd | forced, 0.0, acc_next).astype(jnp.float32)
    counted = upd.any(axis=1) & ~forced & (phase1 < cfg.phase1_updates)
    return upd, acc_next, phase1 + counted.astype(jnp.int32)


def motion_weights(src: jax.Array, prev_last: jax.Array, has_prev, alpha: float, relative: bool) -> jax.Array:
    """Weights (B, F * HW) from a motion source src (B, F, HW, C): per-token frame differences (relative to
    the previous frame's magnitude when `relative`), frame 0 against `prev_last` (B, HW, C) when `has_prev`
    else a copy of frame 1's map, min-max normalised per frame, mapped to [alpha, 1]."""
    src = src.astype(jnp.float32)
    before = jnp.concatenate([prev_last.astype(jnp.float32)[:, None], src[:, :-1]], axis=1)
    m = jnp.abs(src - before).mean(-1)
    if relative:
        m = m / (jnp.abs(before).mean(-1) + 1e-8)
    if src.shape[1] > 1:
        m = m.at[:, 0].set(jnp.where(has_prev, m[:, 0], m[:, 1]))
    lo, hi = m.min(-1, keepdims=True), m.max(-1, keepdims=True)
    w = alpha + (1 - alpha) * (m - lo) / (hi - lo + 1e-8)
    return w.reshape(src.shape[0], -1)


def patchify(x: jax.Array, patch) -> jax.Array:
    """Latents (B, F, H, W, C) -> (B, N, pt*ph*pw*C): each token's raw latent patch, frame-major order."""
    b, f, h, w, c = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), -1)


def motioncache(den: Denoiser, cfg: MotionCacheConfig) -> Denoiser:
    """MotionCache as a transform of an AR chunk denoiser (`models.ar.rollout.chunk_denoiser`)."""
    st = den.stages
    if st is None or getattr(st, "partial", None) is None or den.commit is None:
        raise ValueError(f"motioncache needs an AR chunk denoiser with a partial forward "
                         f"(models.ar.rollout.chunk_denoiser); {den.name!r} has none")
    mcfg = den.config
    indicator = partial(indicator_value, cfg.indicator)     # per-frame t (diffusion forcing) sized as (B,) t
    relative = cfg.motion == "hidden"

    def source(tokens, x):
        """The motion source (B, N, Cs): output hidden states or the input latent's patches."""
        return tokens if cfg.motion == "hidden" else patchify(x, mcfg.patch_size)

    def init(spec: DenoiseSpec) -> MotionCacheState:
        inner = den.init(spec)
        x = jnp.zeros(spec.latents.shape, spec.latents.dtype)
        emb = abstract_embedding(den, inner, spec)
        b, n, d = emb.tokens.shape
        hw = emb.grid[1] * emb.grid[2]
        cs = jax.eval_shape(lambda: source(jnp.zeros(emb.tokens.shape, emb.tokens.dtype), x)).shape[-1]
        ind = jax.eval_shape(indicator, emb)
        z = jnp.zeros((), jnp.int32)
        return MotionCacheState(inner, jnp.zeros((b, n), jnp.float32), jnp.ones((b, n), jnp.float32),
                                jnp.zeros(ind.shape, ind.dtype), jnp.zeros((b, n, d), emb.tokens.dtype),
                                jnp.zeros((b, hw, cs), jnp.float32), jnp.zeros((b, hw, cs), jnp.float32),
                                jnp.zeros((b,), jnp.int32), z, z, z, jnp.zeros((3,), jnp.int32))

    def apply(params, state: MotionCacheState, x, t, context):
        emb, inner = st.embed(params, state.inner, x, t, context)
        b, n, _ = emb.tokens.shape
        ind = indicator(emb)
        delta = rescale(cfg.coefficients, relative_change(ind, state.prev), cfg.max_change)
        upd, acc, phase1 = decide_tokens(cfg, state.acc, state.weights, delta, state.count, state.phase1,
                                         emb.grid[0])
        n_sel = upd.sum(axis=1).astype(jnp.int32)
        kmax = n_sel.max()
        sizes = cfg.bucket_sizes(n)
        base, res = emb.tokens, state.residual

        def none(inner):
            return base + res, res, inner

        def full(inner):
            tokens, inner = st.blocks(params, inner, emb)
            return tokens, tokens - base, inner

        def bucket(k):
            def run(inner):
                idx = jnp.argsort(~upd, axis=1, stable=True)[:, :k].astype(jnp.int32)
                valid = jnp.arange(k)[None, :] < n_sel[:, None]
                fresh, inner = st.partial(params, inner, emb, idx, valid)
                x_in = jnp.take_along_axis(base, idx[..., None], axis=1)
                tokens = scatter_tokens(base + res, idx, fresh, valid)
                return tokens, scatter_tokens(res, idx, fresh - x_in, valid), inner
            return run

        which = jnp.where(kmax == 0, 0, jnp.where(jnp.all(n_sel == n), 1,
                                                  2 + jnp.searchsorted(jnp.asarray(sizes), kmax)))
        tokens, residual, inner = jax.lax.switch(which, [none, full] + [bucket(k) for k in sizes], inner)
        kind = jnp.minimum(which, 2)

        src = source(tokens, x).reshape(b, emb.grid[0], -1, state.last_frame.shape[-1])
        done = (phase1 >= cfg.phase1_updates) & (state.count >= cfg.warmup - 1)
        new_w = motion_weights(src, state.prev_last, state.chunk > 0, cfg.alpha, relative)
        weights = jnp.where(done[:, None], new_w, state.weights)
        state = state.replace(inner=inner, acc=acc, weights=weights, prev=ind, residual=residual,
                              last_frame=src[:, -1].astype(jnp.float32), phase1=phase1, count=state.count + 1,
                              selected=state.selected + n_sel.sum(), forwards=state.forwards.at[kind].add(1))
        return st.head(params, tokens, emb), state

    def commit(params, state: MotionCacheState, x0, context):
        inner = den.commit(params, state.inner, x0, context)
        if cfg.motion == "latent":
            hw = state.last_frame.shape[1]
            last = patchify(x0, mcfg.patch_size)[:, -hw:].astype(jnp.float32)
        else:
            last = state.last_frame
        return state.replace(inner=inner, acc=jnp.zeros_like(state.acc), weights=jnp.ones_like(state.weights),
                             prev_last=last, phase1=jnp.zeros_like(state.phase1), count=jnp.zeros_like(state.count),
                             chunk=state.chunk + 1)

    return wrap_denoiser(den, init=init, apply=apply, name="motioncache", commit=commit)
