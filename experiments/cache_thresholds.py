"""Thresholds for the caching table: every method's slow / fast threshold chosen for a target compute fraction.

Used by `experiments.cache_table`. Dense rollouts of training-split prompts (never the evaluation prompts)
record the e0 and patch-embedding changes per call (`calibrate_ar`); the step-level methods' thresholds
come from replaying their rule on those changes (`vidaccel.residual_cache.choose_threshold`), MotionCache's
from a bisection over real rollouts (`choose_mc_threshold`), since its per-token decisions depend on the
motion maps. `setup` is an `experiments.cache_table.Setup`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from experiments.flowcache import flowcache_config, flowcache_magi_config
from experiments.motioncache import MotionCacheConfig, motioncache
from experiments.teacache import calibrate_teacache, fit_coefficients, teacache_config
from models.ar.rollout import RolloutConfig, chunk_denoiser, rollout
from models.shapes import encode_prompts, sample_prompts
from models.shapes.pretrained import latent_noise
from vidaccel.residual_cache import choose_threshold
from vidaccel.solvers import unipc
from vidaccel.transforms import branch_states


def tokens(model_cfg, fhw) -> int:
    """Tokens of latents with (frames, height, width) `fhw`."""
    return math.prod(s // p for s, p in zip(fhw, model_cfg.patch_size, strict=True))


def calibration_inputs(setup, frames: int):
    """The calibration prompts (training split), their text contexts and their noise (seed + 1000)."""
    prompts = sample_prompts(setup.calib_n, 1, "train")
    return prompts, jnp.asarray(encode_prompts(prompts)), latent_noise(setup.calib_n, setup.seed + 1000, frames)


def calibrate_ar(model, setup, rollout_config, frames: int, log) -> dict:
    """Dense rollouts of the calibration prompts recording the e0 and patch-embedding changes per call."""
    prompts, ctx, noise = calibration_inputs(setup, frames)
    solver, den = unipc(setup.steps), chunk_denoiser(model, rollout_config)
    runs = {"e0": ([], []), "patch": ([], [])}
    for i in range(setup.calib_n):          # one video per run: the patch indicator is per video
        for ind in runs:
            cal = calibrate_teacache(den, noise[i:i + 1], ctx[i:i + 1], solver=solver, indicator=ind,
                                     guidance=setup.guidance, negative_context=jnp.zeros_like(ctx[i:i + 1]))
            runs[ind][0].append(cal.input_change)
            runs[ind][1].append(cal.output_change)
        log(f"  calibration rollout {i + 1}/{setup.calib_n}")
    fits = {ind: fit_coefficients(np.concatenate(a), np.concatenate(b), steps=setup.steps)
            for ind, (a, b) in runs.items()}
    return {"prompts": prompts, "fits": fits}


def mc_fraction(model, setup, rollout_config, frames: int, thresh: float, poly: dict) -> float:
    """Fraction of the dense denoising tokens a MotionCache rollout of the calibration prompts selects."""
    _, ctx, noise = calibration_inputs(setup, frames)
    # buckets do not change decisions, only padding: two keep this search's compilations cheap
    cfg = MotionCacheConfig(thresh=thresh, buckets=(0.5, 1.0), **poly)
    out = rollout(motioncache(chunk_denoiser(model, rollout_config), cfg), noise, ctx, solver=unipc(setup.steps),
                  guidance=setup.guidance, negative_context=jnp.zeros_like(ctx))
    dense = 2 * setup.calib_n * setup.steps * tokens(model.cfg, noise.shape[1:4])
    return sum(int(s.selected) for s in branch_states(out.state)) / dense


def choose_mc_threshold(fraction_of, target: float, start: float, log, *, iters: int = 6,
                        tol: float = 0.02, label: str = "MotionCache",
                        unit: str = "the dense tokens", seen: dict[float, float] | None = None,
                        interpolate: bool = False) -> tuple[float, float]:
    """The threshold whose selected fraction is closest to `target` (the fraction falls as the threshold
    grows): from `start`, step by 4x until the target is bracketed or the fraction stops moving (a warm-up
    floor or a full-compute ceiling), then bisect in log-threshold until within `tol`. `fraction_of(thresh)`
    runs the method (MotionCache here; any cache in `experiments.async_cache_table`, whose log lines `label`
    and `unit` name); each threshold is evaluated once.

    seen: threshold -> fraction already measured (updated in place), so searches for several targets share
    their runs; a pair in it that brackets the target starts the bisection. interpolate: split the bracket
    where the log-threshold line through its ends meets the target (kept inside its middle 80%) instead of
    at its geometric middle; fewer runs when the fraction is smooth in the threshold."""
    seen = {} if seen is None else seen

    def f(t):
        if t not in seen:
            seen[t] = fraction_of(t)
            log(f"    {label} thresh {t:.4g}: {seen[t]:.3f} of {unit}")
        return seen[t]

    def done():
        return bool(seen) and min(abs(v - target) for v in seen.values()) <= tol

    above = [t for t, v in seen.items() if v > target]
    below = [t for t, v in seen.items() if v <= target]
    if above and below and max(above) < min(below):
        lo, hi = max(above), min(below)
    else:
        lo = hi = start
        step = 0.25 if f(start) < target else 4.0
        while not done():
            prev = lo if step < 1 else hi
            lo, hi = (prev * step, prev) if step < 1 else (prev, prev * step)
            nxt = lo if step < 1 else hi
            if (f(nxt) - target) * (f(prev) - target) <= 0 or f(nxt) == f(prev):
                break
    for _ in range(iters):
        if done() or f(lo) == f(hi):
            break
        a, b = math.log(lo), math.log(hi)
        w = 0.5
        if interpolate and f(lo) != f(hi):
            w = min(max((f(lo) - target) / (f(lo) - f(hi)), 0.1), 0.9)
        mid = math.exp(a + w * (b - a))
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    best = min(seen, key=lambda t: (abs(seen[t] - target), t))
    return best, seen[best]


def choose_thresholds(model, setup, cal: dict, chunks: int, frames: int, log) -> tuple[dict, dict]:
    """Every method's slow / fast threshold for the target compute fractions, and the fractions reached."""
    fit = cal["fits"]["e0"]
    poly = {"coefficients": fit.coefficients, "max_change": fit.input_max}
    e0, patch = cal["fits"]["e0"].input_change, cal["fits"]["patch"].input_change
    th, achieved = {m: {} for m in ("teacache", "flowcache", "flowcache-magi", "motioncache")}, {}
    rules = {"teacache": (teacache_config(1.0, **poly), e0, setup.steps * chunks),
             "flowcache": (flowcache_config(1.0, **poly), e0, setup.steps),
             "flowcache-magi": (flowcache_magi_config(1.0), patch, setup.steps)}
    for name, (rule, changes, scope) in rules.items():
        for speed, target in setup.targets:
            th[name][speed], achieved[f"{name}-{speed}"] = choose_threshold(rule, changes, scope, target)
    vanilla = RolloutConfig(window_chunks=setup.window)
    for speed, target in setup.targets:
        th["motioncache"][speed], achieved[f"motioncache-{speed}"] = choose_mc_threshold(
            lambda t: mc_fraction(model, setup, vanilla, frames, t, poly), target, th["flowcache"][speed], log)
    return th, achieved
