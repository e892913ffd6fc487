"""TeaCache (Liu et al., CVPR'25) for Wan: presets with the published coefficients, and a calibration tool.

    den = teacache(wan_denoiser(model), wan21_teacache("1.3b", thresh=0.08, use_ret_steps=False))
    cal = calibrate_teacache(wan_denoiser(model), noise, context, solver=unipc(50))   # fit for any model
    thresh, frac = choose_threshold(teacache_config(1.0, cal.coefficients), cal.input_change, 50, 0.5)

Rule (see `vidaccel.residual_cache`): accumulate the polynomial-rescaled relative L1 change of the timestep
modulation and reuse the whole block-stack residual while the sum stays below the threshold; one state per
CFG branch. With `use_ret_steps` the indicator is `e0` (the 6 x dim projection), the first 5 calls of each
branch are computed and there is no cut-off; without it the indicator is `e`, the first call and the last
call are computed (TeaCache4Wan2.1's ret_steps / cutoff_steps, counted per branch). On an AR rollout
TeaCache keeps one state for the whole video (scope "video").

Calibration (TeaCache issue #2's recipe): a dense run records, per call, the indicator's relative L1 change
and the block-stack output's; `np.polyfit(input, output, 4)`. `choose_threshold` then replays the rule on
the recorded changes to pick the threshold computing a target fraction of the calls. The embedded t2v model's
TeaCache (calibrated presets, the demo entry) is `experiments.shapes_presets.shapes_teacache`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from models.ar.rollout import RolloutConfig, rollout
from vidaccel.checks import choice_arg
from vidaccel.residual_cache import INDICATORS, ResidualCacheConfig, indicator_value, relative_change, residual_cache
from vidaccel.sampling import sample
from vidaccel.transforms import Denoiser, DenoiseSpec, abstract_embedding, branch_states, wrap_denoiser

# Published TeaCache4Wan2.1 coefficients (highest degree first), keyed by (model, use_ret_steps).
WAN21_COEFFICIENTS: dict[tuple[str, bool], tuple[float, ...]] = {
    ("1.3b", False): (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01),
    ("14b", False): (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    ("1.3b", True): (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
    ("14b", True): (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
}
RET_WARMUP = 5          # calls per branch computed first with use_ret_steps (the code's 5 x 2 calls)


def teacache_config(thresh: float, coefficients, *, use_ret_steps: bool = True,
                    max_change: float | None = None) -> ResidualCacheConfig:
    """TeaCache's rule for Wan with given coefficients (whole-run scope, one state per CFG branch).

    max_change: the top of the calibrated input range (`Calibration.input_max`); larger changes force a
    computation. Needed on AR rollouts, where a chunk's first call compares against the previous chunk
    and leaves the fitted range (the published presets leave it None)."""
    if use_ret_steps:
        return ResidualCacheConfig(thresh, coefficients, indicator="e0", warmup=RET_WARMUP, cutoff=None,
                                   max_change=max_change)
    return ResidualCacheConfig(thresh, coefficients, indicator="e", warmup=1, cutoff=-1, max_change=max_change)


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
    """`probe`'s state: the wrapped denoiser's, the previous call's indicator and block output, and the record."""

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
    st = den.stages
    choice_arg("indicator", indicator, tuple(INDICATORS))

    def ind_fn(emb):        # per-frame timesteps (diffusion forcing) sized as one timestep per sample
        return indicator_value(indicator, emb)

    def init(spec: DenoiseSpec) -> ProbeState:
        inner = den.init(spec)
        emb = abstract_embedding(den, inner, spec)
        calls = spec.num_steps * spec.num_chunks
        z = jnp.zeros((calls,), jnp.float32)
        return ProbeState(inner, jnp.zeros(jax.eval_shape(ind_fn, emb).shape, jnp.float32),
                          jnp.zeros(emb.tokens.shape, jnp.float32), jnp.zeros((), jnp.int32), z, z)

    def apply(params, state: ProbeState, x, t, context):
        emb, inner = st.embed(params, state.inner, x, t, context)
        tokens, inner = st.blocks(params, inner, emb)
        ind = ind_fn(emb).astype(jnp.float32)
        i = state.count
        state = ProbeState(inner, ind, tokens.astype(jnp.float32), i + 1,
                           state.input_change.at[i].set(relative_change(ind, state.prev_ind)),
                           state.output_change.at[i].set(relative_change(tokens, state.prev_out)))
        return st.head(params, tokens, emb), state

    return wrap_denoiser(den, init=init, apply=apply, name="probe")


@dataclasses.dataclass
class Calibration:
    """Fitted TeaCache coefficients (highest degree first) and the recorded changes they were fitted on."""

    coefficients: tuple[float, ...]
    input_change: np.ndarray      # (runs, calls) recorded changes, one run per CFG branch (all its calls)
    output_change: np.ndarray
    fit_relative_error: float     # mean |poly(in) - out| / mean out over the samples
    steps: int | None = None      # calls per chunk (AR) or per run; the fit drops each chunk's first call
    input_max: float = float("inf")   # the largest input change fitted (the polynomial's valid range)


def fit_coefficients(input_change: np.ndarray, output_change: np.ndarray, degree: int = 4,
                     skip_first: int = 1, steps: int | None = None) -> Calibration:
    """np.polyfit(input, output, degree) over every recorded call after the first `skip_first` of a run (of
    each chunk of `steps` calls when given: a chunk's first call compares against another chunk)."""
    inp, outp = np.asarray(input_change, np.float64), np.asarray(output_change, np.float64)
    if inp.shape != outp.shape:
        raise ValueError(f"input_change shape {inp.shape} != output_change shape {outp.shape}")
    rows_in, rows_out = (inp, outp) if steps is None else (inp.reshape(-1, steps), outp.reshape(-1, steps))
    x, y = rows_in[..., skip_first:].ravel(), rows_out[..., skip_first:].ravel()
    if x.size <= degree:
        raise ValueError(f"calibration needs more than {degree} samples to fit a degree-{degree} polynomial; "
                         f"got {x.size}")
    coeffs = np.polyfit(x, y, degree)
    err = float(np.mean(np.abs(np.polyval(coeffs, x) - y)) / max(np.mean(np.abs(y)), 1e-12))
    return Calibration(tuple(float(c) for c in coeffs), inp, outp, err, steps, float(x.max()))


def calibrate_teacache(den: Denoiser, noise: jax.Array, context: jax.Array, *, solver, indicator: str = "e0",
                       guidance: float | None = None, negative_context=None, degree: int = 4,
                       rollout_config=None) -> Calibration:
    """Fit TeaCache coefficients for any model: run dense sampling (or an AR rollout when `den` has `commit`)
    recording both changes per call, then fit output change as a polynomial of indicator change.

    Each CFG branch and each batch is one run of samples (the changes are taken over the whole batch).
    """
    pden = probe(den, indicator)
    if den.commit is not None:
        out = rollout(pden, noise, context, solver=solver, guidance=guidance, negative_context=negative_context,
                      config=rollout_config or RolloutConfig())
    else:
        out = sample(pden, None, noise, context, solver=solver, guidance=guidance, negative_context=negative_context)
    states = branch_states(out.state)
    # one run per branch; the fit drops the first call of every chunk (it compares against another chunk)
    inp = np.stack([np.asarray(s.input_change) for s in states])
    outp = np.stack([np.asarray(s.output_change) for s in states])
    return fit_coefficients(inp, outp, degree, steps=solver.num_steps)


__all__ = ["WAN21_COEFFICIENTS", "RET_WARMUP", "teacache_config", "wan21_teacache", "teacache", "ProbeState", "probe",
           "Calibration", "fit_coefficients", "calibrate_teacache"]
