"""TeaCache (Liu et al., CVPR'25) for Wan: presets with the published coefficients, and a calibration tool.

    den = teacache(wan_denoiser(model), wan21_teacache("1.3b", thresh=0.08, use_ret_steps=False))
    coeffs = calibrate(model, prompts_context, ...)         # fit the rescaling polynomial for any model

Rule (see `vidaccel.residual_cache`): accumulate the polynomial-rescaled relative L1 change of the timestep
modulation and reuse the whole block-stack residual while the sum stays below the threshold; one state per
CFG branch. With `use_ret_steps` the indicator is `e0` (the 6 x dim projection), the first 5 calls of each
branch are computed and there is no cut-off; without it the indicator is `e`, the first call and the last
call are computed. On an AR rollout TeaCache keeps one state for the whole video (scope "video").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vidaccel.residual_cache import INDICATORS, ResidualCacheConfig, relative_l1, residual_cache
from vidaccel.transforms import Denoiser, DenoiseSpec

# Published TeaCache4Wan2.1 coefficients (highest degree first), keyed by (model, use_ret_steps).
WAN21_COEFFICIENTS: dict[tuple[str, bool], tuple[float, ...]] = {
    ("1.3b", False): (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01),
    ("14b", False): (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    ("1.3b", True): (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
    ("14b", True): (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
}
RET_WARMUP = 5          # calls per branch computed first with use_ret_steps (the code's 5 x 2 calls)


def teacache_config(thresh: float, coefficients, *, use_ret_steps: bool = True) -> ResidualCacheConfig:
    """TeaCache's rule for Wan with given coefficients (whole-run scope, one state per CFG branch)."""
    if use_ret_steps:
        return ResidualCacheConfig(thresh, coefficients, indicator="e0", warmup=RET_WARMUP, cutoff=None)
    return ResidualCacheConfig(thresh, coefficients, indicator="e", warmup=1, cutoff=-1)


def wan21_teacache(model: str, thresh: float, *, use_ret_steps: bool = True) -> ResidualCacheConfig:
    """TeaCache with the published Wan2.1 T2V coefficients; `model` is "1.3b" or "14b"."""
    key = (model, bool(use_ret_steps))
    if key not in WAN21_COEFFICIENTS:
        raise ValueError(f"no published Wan2.1 TeaCache coefficients for model={model!r}; known: 1.3b, 14b")
    return teacache_config(thresh, WAN21_COEFFICIENTS[key], use_ret_steps=use_ret_steps)


def teacache(den: Denoiser, cfg: ResidualCacheConfig) -> Denoiser:
    """TeaCache as a Denoiser -> Denoiser transform (scope "video": one accumulator per branch per run)."""
    if cfg.scope != "video":
        raise ValueError("TeaCache keeps one state for the whole run; scope must be 'video' (chunk-wise is FlowCache)")
    return residual_cache(den, cfg, name="teacache")


# ----------------------------------------------------------------------------------------------- calibration
@struct.dataclass
class ProbeState:
    inner: object
    prev_ind: jax.Array
    prev_out: jax.Array
    count: jax.Array
    input_change: jax.Array      # (calls,) relative L1 of the indicator against the previous call
    output_change: jax.Array     # (calls,) relative L1 of the block-stack output against the previous call


def probe(den: Denoiser, indicator: str) -> Denoiser:
    """A dense denoiser that records, per call, the indicator's and the block output's relative L1 change."""
    if den.stages is None:
        raise ValueError(f"probe needs a staged denoiser; {den.name!r} has none")
    st, ind_fn = den.stages, INDICATORS[indicator]

    def init(spec: DenoiseSpec) -> ProbeState:
        inner = den.init(spec)
        x = jnp.zeros(spec.latents.shape, spec.latents.dtype)
        ctx = jnp.zeros(spec.context.shape, spec.context.dtype)
        emb = jax.eval_shape(lambda: st.embed(den.params, inner, x, jnp.zeros((x.shape[0],)), ctx)[0])
        calls = spec.num_steps * spec.num_chunks
        z = jnp.zeros((calls,), jnp.float32)
        return ProbeState(inner, jnp.zeros(ind_fn(emb).shape, jnp.float32),
                          jnp.zeros(emb.tokens.shape, jnp.float32), jnp.zeros((), jnp.int32), z, z)

    def apply(params, state: ProbeState, x, t, context):
        emb, inner = st.embed(params, state.inner, x, t, context)
        tokens, inner = st.blocks(params, inner, emb)
        ind = ind_fn(emb).astype(jnp.float32)
        i = state.count
        state = ProbeState(inner, ind, tokens.astype(jnp.float32), i + 1,
                           state.input_change.at[i].set(relative_l1(ind, state.prev_ind)),
                           state.output_change.at[i].set(relative_l1(tokens, state.prev_out)))
        return st.head(params, tokens, emb), state

    commit = None
    if den.commit is not None:
        def commit(params, state, x0, context):
            return state.replace(inner=den.commit(params, state.inner, x0, context))

    return Denoiser(init=init, apply=apply, graphdef=den.graphdef, params=den.params, name="probe", commit=commit)


@dataclasses.dataclass
class Calibration:
    coefficients: tuple[float, ...]
    input_change: np.ndarray      # (runs, calls) recorded changes; the fit drops each run's first call
    output_change: np.ndarray
    fit_relative_error: float     # mean |poly(in) - out| / mean out over the samples


def fit_coefficients(input_change: np.ndarray, output_change: np.ndarray, degree: int = 4,
                     skip_first: int = 1) -> Calibration:
    """np.polyfit(input, output, degree) over every recorded call after the first `skip_first` of a run."""
    x = np.asarray(input_change, np.float64)[..., skip_first:].ravel()
    y = np.asarray(output_change, np.float64)[..., skip_first:].ravel()
    if x.size <= degree:
        raise ValueError(f"calibration needs more than {degree} samples to fit a degree-{degree} polynomial; "
                         f"got {x.size}")
    coeffs = np.polyfit(x, y, degree)
    err = float(np.mean(np.abs(np.polyval(coeffs, x) - y)) / max(np.mean(np.abs(y)), 1e-12))
    return Calibration(tuple(float(c) for c in coeffs), np.asarray(input_change), np.asarray(output_change), err)


def calibrate(den: Denoiser, noise: jax.Array, context: jax.Array, *, solver, indicator: str = "e0",
              guidance: float | None = None, negative_context=None, degree: int = 4, rollout_config=None) -> Calibration:
    """Fit TeaCache coefficients for any model: run dense sampling (or an AR rollout when `den` has `commit`)
    recording both changes per call, then fit output change as a polynomial of indicator change.

    Each CFG branch and each batch is one run of samples (the changes are taken over the whole batch).
    """
    from vidaccel.sampling import sample

    pden = probe(den, indicator)
    if den.commit is not None:
        from models.ar.rollout import RolloutConfig, rollout

        out = rollout(pden, noise, context, solver=solver, guidance=guidance, negative_context=negative_context,
                      config=rollout_config or RolloutConfig())
    else:
        out = sample(pden, None, noise, context, solver=solver, guidance=guidance, negative_context=negative_context)
    states = list(out.state.values()) if isinstance(out.state, dict) else [out.state]
    # one row per (branch, chunk): the first call of a chunk compares against another chunk, so it is dropped
    steps = solver.num_steps
    inp = np.concatenate([np.asarray(s.input_change).reshape(-1, steps) for s in states])
    outp = np.concatenate([np.asarray(s.output_change).reshape(-1, steps) for s in states])
    return fit_coefficients(inp, outp, degree)
