"""Fidelity of a run against its reference (the unaccelerated run with the same seed and prompt), in JAX.

Every function takes videos `x`, `ref` of identical shape ``(..., T, H, W, C)`` (leading axes batch videos)
with floating dtype, and is jittable. Conventions (as in TeaCache's and FlowCache's evaluation scripts):

- `psnr`: ``10 log10(data_range^2 / MSE)`` with the MSE pooled over the whole video (all frames, pixels,
  channels), one value per video; `psnr_per_frame` gives one per frame (TeaCache averages those instead).
  Identical inputs give +inf.
- `ssim`: Wang et al. SSIM with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, computed per
  frame and channel over the "valid" window positions (no padding, as cv2-based scripts crop), averaged
  over positions and channels (`ssim_per_frame`) and then over frames (`ssim`). Population (biased)
  variances, as in Wang et al. and cv2 (not scikit-image's default sample covariance).
- `relative_l1` = sum|x - ref| / sum|ref|, `relative_l2` = ||x - ref||_2 / ||ref||_2 per video.
  A zero reference gives 0 when x equals it and +inf otherwise.
- `drift_over_frames`: the per-frame curve of one of these errors, for drift along a rollout.

`data_range` (and SSIM's `sigma`, `k1`, `k2`) are compile-time constants: Python, NumPy or concrete JAX
scalars, converted to float; a traced value is a TypeError. (`vidaccel.metrics.relative_l1` is this fidelity
error between videos, not the step-to-step change that residual caches threshold.)
"""

from __future__ import annotations

import numbers
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

DRIFT_METRICS = ("mse", "relative_l1", "relative_l2", "psnr", "ssim")


def _check(x, ref, name: str, min_ndim: int = 4) -> tuple[jax.Array, jax.Array]:
    x, ref = jnp.asarray(x), jnp.asarray(ref)
    if x.shape != ref.shape:
        raise ValueError(f"{name}: x shape {x.shape} != ref shape {ref.shape}; they must be identical")
    if x.ndim < min_ndim:
        raise ValueError(f"{name}: inputs have shape {x.shape}; expected (..., T, H, W, C) (at least 4 dims)")
    for arg, a in (("x", x), ("ref", ref)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name}: {arg} has dtype {a.dtype}; expected a float dtype (for uint8 video use "
                            "v.astype(float32) / 255 with data_range=1.0)")
    dtype = jnp.promote_types(jnp.promote_types(x.dtype, ref.dtype), jnp.float32)
    return x.astype(dtype), ref.astype(dtype)


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, with 0/0 = 0 and positive/0 = inf."""
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, num / safe, jnp.where(num > 0, jnp.inf, 0.0))


def _positive(value, name: str, fn: str, allowed: str = "a positive number") -> float:
    """`value` as a Python float, for a static (compile-time) argument of a jitted metric.

    Python, NumPy and concrete JAX scalars are accepted; a traced value cannot be (it would have to be known
    when compiling), nor can bools, arrays with more than one element or values that are not > 0 and finite.
    """
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{fn}: {name} is a traced JAX value ({value}); it must be concrete, as it is a constant of "
                        "the compiled metric: pass a Python number, or compute it outside jax.jit")
    arr = np.asarray(value)
    real = jnp.issubdtype(arr.dtype, jnp.integer) or jnp.issubdtype(arr.dtype, jnp.floating)  # not bool/complex
    if arr.ndim != 0 or not real or not (np.isfinite(arr) and arr > 0):
        raise ValueError(f"{fn}: {name}={value!r} is invalid; allowed: {allowed}, as a Python, NumPy or concrete "
                         "JAX scalar")
    return float(arr)


def _check_range(data_range, name: str) -> float:
    return _positive(data_range, "data_range", name,
                     "a positive number, the span of valid pixel values (1.0 for [0, 1])")


def _psnr_from_mse(mse: jax.Array, data_range: float) -> jax.Array:
    return 10.0 * jnp.log10(data_range**2 / mse)


@jax.jit
def mse_per_frame(x, ref) -> jax.Array:
    """Mean squared error per frame: (..., T)."""
    x, ref = _check(x, ref, "mse_per_frame")
    return jnp.mean((x - ref) ** 2, axis=(-3, -2, -1))


def psnr(x, ref, data_range: float = 1.0) -> jax.Array:
    """PSNR in dB per video (...,), from the MSE over all frames; +inf for identical videos."""
    return _psnr(x, ref, _check_range(data_range, "psnr"))


@partial(jax.jit, static_argnames=("data_range",))
def _psnr(x, ref, data_range: float) -> jax.Array:
    x, ref = _check(x, ref, "psnr")
    return _psnr_from_mse(jnp.mean((x - ref) ** 2, axis=(-4, -3, -2, -1)), data_range)


def psnr_per_frame(x, ref, data_range: float = 1.0) -> jax.Array:
    """PSNR in dB per frame (..., T)."""
    return _psnr_per_frame(x, ref, _check_range(data_range, "psnr_per_frame"))


@partial(jax.jit, static_argnames=("data_range",))
def _psnr_per_frame(x, ref, data_range: float) -> jax.Array:
    return _psnr_from_mse(mse_per_frame(x, ref), data_range)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian window (the 2-D window is its outer product)."""
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(r**2) / (2.0 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def _filter_valid(img: jax.Array, g: jax.Array) -> jax.Array:
    """Separable 'valid' filtering of (N, H, W) images with the 1-D window g."""
    k = g.shape[0]
    img = img[:, None]  # (N, 1, H, W)
    dn = ("NCHW", "OIHW", "NCHW")
    out = jax.lax.conv_general_dilated(img, g.reshape(1, 1, k, 1), (1, 1), "VALID", dimension_numbers=dn,
                                       precision=jax.lax.Precision.HIGHEST)
    out = jax.lax.conv_general_dilated(out, g.reshape(1, 1, 1, k), (1, 1), "VALID", dimension_numbers=dn,
                                       precision=jax.lax.Precision.HIGHEST)
    return out[:, 0]


def ssim_per_frame(x, ref, data_range: float = 1.0, *, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
                   k2: float = 0.03) -> jax.Array:
    """SSIM per frame (..., T): mean over valid window positions and channels."""
    return _ssim_per_frame(x, ref, *_ssim_args(data_range, win_size, sigma, k1, k2))


def _ssim_args(data_range, win_size, sigma, k1, k2) -> tuple:
    if isinstance(win_size, bool) or not isinstance(win_size, numbers.Integral) or win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"ssim: win_size={win_size!r} is invalid; allowed: an odd int >= 1")
    return (_check_range(data_range, "ssim"), int(win_size), _positive(sigma, "sigma", "ssim"),
            _positive(k1, "k1", "ssim"), _positive(k2, "k2", "ssim"))


@partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _ssim_per_frame(x, ref, data_range: float, win_size: int, sigma: float, k1: float, k2: float) -> jax.Array:
    x, ref = _check(x, ref, "ssim_per_frame")
    *lead, t, h, w, c = x.shape
    if h < win_size or w < win_size:
        raise ValueError(f"ssim: frames of {h}x{w} are smaller than the {win_size}x{win_size} window")
    g = jnp.asarray(gaussian_window(win_size, sigma), x.dtype)

    def planes(a):  # (..., T, H, W, C) -> (N, H, W) with N = prod(...) * T * C
        return jnp.moveaxis(a, -1, -3).reshape(-1, h, w)

    a, b = planes(x), planes(ref)
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    # (co)variances from plane-centred values: shift-invariant, and less float32 cancellation in E[a^2] - E[a]^2
    a = a - a.mean(axis=(-2, -1), keepdims=True)
    b = b - b.mean(axis=(-2, -1), keepdims=True)
    ma, mb = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - ma**2
    var_b = _filter_valid(b * b, g) - mb**2
    cov = _filter_valid(a * b, g) - ma * mb
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.reshape(*lead, t, c, -1).mean(axis=(-2, -1))


def ssim(x, ref, data_range: float = 1.0, *, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> jax.Array:
    """SSIM per video (...,): the mean of `ssim_per_frame` over frames."""
    return _ssim(x, ref, *_ssim_args(data_range, win_size, sigma, k1, k2))


@partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _ssim(x, ref, data_range: float, win_size: int, sigma: float, k1: float, k2: float) -> jax.Array:
    return _ssim_per_frame(x, ref, data_range, win_size, sigma, k1, k2).mean(-1)    # one program, as before


@jax.jit
def relative_l1(x, ref) -> jax.Array:
    """sum|x - ref| / sum|ref| per video (...,)."""
    x, ref = _check(x, ref, "relative_l1")
    ax = (-4, -3, -2, -1)
    return _ratio(jnp.sum(jnp.abs(x - ref), ax), jnp.sum(jnp.abs(ref), ax))


@jax.jit
def relative_l2(x, ref) -> jax.Array:
    """||x - ref||_2 / ||ref||_2 per video (...,)."""
    x, ref = _check(x, ref, "relative_l2")
    ax = (-4, -3, -2, -1)
    return _ratio(jnp.sqrt(jnp.sum((x - ref) ** 2, ax)), jnp.sqrt(jnp.sum(ref**2, ax)))


def drift_over_frames(x, ref, data_range: float = 1.0, *, metric: str = "relative_l2") -> jax.Array:
    """Per-frame error curve (..., T) of `metric`, one of DRIFT_METRICS (default relative L2)."""
    if metric not in DRIFT_METRICS:
        raise ValueError(f"drift_over_frames: metric={metric!r} is invalid; allowed: {DRIFT_METRICS}")
    return _drift(x, ref, _check_range(data_range, "drift_over_frames"), metric)


@partial(jax.jit, static_argnums=(2, 3))
def _drift(x, ref, data_range: float, metric: str) -> jax.Array:
    x, ref = _check(x, ref, "drift_over_frames")
    ax = (-3, -2, -1)
    if metric == "mse":
        return mse_per_frame(x, ref)
    if metric == "psnr":
        return psnr_per_frame(x, ref, data_range)
    if metric == "ssim":
        return ssim_per_frame(x, ref, data_range)
    if metric == "relative_l1":
        return _ratio(jnp.sum(jnp.abs(x - ref), ax), jnp.sum(jnp.abs(ref), ax))
    return _ratio(jnp.sqrt(jnp.sum((x - ref) ** 2, ax)), jnp.sqrt(jnp.sum(ref**2, ax)))


def fidelity(x, ref, data_range: float = 1.0) -> dict[str, jax.Array]:
    """All per-video fidelity numbers at once: psnr, ssim, relative_l1, relative_l2."""
    return {"psnr": psnr(x, ref, data_range), "ssim": ssim(x, ref, data_range),
            "relative_l1": relative_l1(x, ref), "relative_l2": relative_l2(x, ref)}
