"""vidaccel.metrics against independent numpy references written here (direct window loops, known MSE)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidaccel import metrics as M


def _ssim_plane_ref(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Wang et al. SSIM of two 2-D images: 11x11 Gaussian (sigma 1.5) weights, valid positions, loops."""
    r = np.arange(11) - 5.0
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for y in range(a.shape[0] - 10):
        for x in range(a.shape[1] - 10):
            pa, pb = a[y:y + 11, x:x + 11], b[y:y + 11, x:x + 11]
            ma, mb = np.sum(w * pa), np.sum(w * pb)
            va, vb = np.sum(w * (pa - ma) ** 2), np.sum(w * (pb - mb) ** 2)
            cov = np.sum(w * (pa - ma) * (pb - mb))
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def _ssim_frames_ref(x: np.ndarray, ref: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """(..., T, H, W, C) -> (..., T): mean over channels of the per-plane reference."""
    lead = x.shape[:-3]
    xf, rf = x.reshape(-1, *x.shape[-3:]), ref.reshape(-1, *x.shape[-3:])
    out = [np.mean([_ssim_plane_ref(a[..., c], b[..., c], data_range) for c in range(x.shape[-1])])
           for a, b in zip(xf.astype(np.float64), rf.astype(np.float64))]
    return np.array(out).reshape(lead)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    ref = rng.uniform(size=(2, 3, 16, 21, 3)).astype(np.float32)
    x = np.clip(ref + rng.normal(0, 0.1, ref.shape), 0, 1).astype(np.float32)  # correlated with ref
    return x, ref


def test_ssim_matches_loop_reference(pair):
    x, ref = pair
    got = np.asarray(M.ssim_per_frame(x, ref))
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, _ssim_frames_ref(x, ref), atol=2e-5)
    assert 0.3 < got.min() < got.max() < 0.99  # a non-trivial regime
    np.testing.assert_allclose(np.asarray(M.ssim(x, ref)), got.mean(-1), rtol=1e-6)
    # independent images: SSIM near 0, still equal to the reference
    rng = np.random.default_rng(1)
    y = rng.uniform(size=ref.shape).astype(np.float32)
    np.testing.assert_allclose(np.asarray(M.ssim_per_frame(y, ref)), _ssim_frames_ref(y, ref), atol=2e-5)
    np.testing.assert_allclose(np.asarray(M.ssim(x, ref)), np.asarray(M.ssim(ref, x)), atol=1e-6)  # symmetric


def test_ssim_data_range_and_constant_images(pair):
    x, ref = pair
    np.testing.assert_allclose(np.asarray(M.ssim(255 * x, 255 * ref, data_range=255.0)),
                               np.asarray(M.ssim(x, ref)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(M.ssim(x, ref, 255.0)),
                               _ssim_frames_ref(x, ref, 255.0).mean(-1), atol=2e-5)
    # constant frames a and b: only the luminance term remains, (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.3, 0.7
    xa = np.full((1, 2, 12, 12, 1), a, np.float32)
    xb = np.full((1, 2, 12, 12, 1), b, np.float32)
    c1 = 0.01**2
    np.testing.assert_allclose(np.asarray(M.ssim(xa, xb)), [(2 * a * b + c1) / (a * a + b * b + c1)], rtol=1e-5)


def test_identical_inputs(pair):
    _, ref = pair
    np.testing.assert_allclose(np.asarray(M.ssim(ref, ref)), 1.0, atol=1e-6)
    assert np.all(np.isposinf(np.asarray(M.psnr(ref, ref))))
    assert np.all(np.isposinf(np.asarray(M.psnr_per_frame(ref, ref))))
    assert np.all(np.asarray(M.relative_l1(ref, ref)) == 0) and np.all(np.asarray(M.relative_l2(ref, ref)) == 0)


def test_psnr_of_known_mse():
    rng = np.random.default_rng(2)
    ref = rng.uniform(size=(2, 4, 8, 9, 3))
    deltas = np.array([0.01, 0.02, 0.05, 0.1])  # per frame
    signs = rng.choice([-1.0, 1.0], size=ref.shape)
    x = ref + signs * deltas[None, :, None, None, None]  # MSE of frame t is exactly delta_t^2
    per_frame = np.asarray(M.psnr_per_frame(x.astype(np.float32), ref.astype(np.float32)))
    np.testing.assert_allclose(per_frame, np.broadcast_to(-20 * np.log10(deltas), (2, 4)), atol=1e-3)
    pooled = np.asarray(M.psnr(x.astype(np.float32), ref.astype(np.float32)))
    np.testing.assert_allclose(pooled, 10 * np.log10(1.0 / np.mean(deltas**2)), atol=1e-3)
    scaled = np.asarray(M.psnr((255 * x).astype(np.float32), (255 * ref).astype(np.float32), data_range=255.0))
    np.testing.assert_allclose(scaled, pooled, atol=1e-3)
    assert math.isclose(float(M.psnr(np.full((1, 1, 1, 1), 0.1, np.float32), np.zeros((1, 1, 1, 1), np.float32))),
                        20.0, rel_tol=1e-5)


def test_relative_errors_match_numpy(pair):
    x, ref = pair
    d = x.astype(np.float64) - ref
    ax = (-4, -3, -2, -1)
    np.testing.assert_allclose(np.asarray(M.relative_l1(x, ref)),
                               np.abs(d).sum(ax) / np.abs(ref.astype(np.float64)).sum(ax), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(M.relative_l2(x, ref)),
                               np.sqrt((d**2).sum(ax)) / np.sqrt((ref.astype(np.float64) ** 2).sum(ax)), rtol=1e-5)
    zero = np.zeros_like(ref)
    assert np.all(np.asarray(M.relative_l2(zero, zero)) == 0)
    assert np.all(np.isposinf(np.asarray(M.relative_l1(x, zero))))


def test_drift_over_frames(pair):
    rng = np.random.default_rng(3)
    ref = rng.uniform(size=(2, 6, 12, 12, 3))
    amp = np.linspace(0.01, 0.3, 6)  # error grows along the rollout
    x = ref + amp[None, :, None, None, None] * rng.normal(size=ref.shape)
    x32, r32 = x.astype(np.float32), ref.astype(np.float32)
    d = x - ref
    ax = (-3, -2, -1)
    want = {
        "mse": (d**2).mean(ax),
        "relative_l1": np.abs(d).sum(ax) / np.abs(ref).sum(ax),
        "relative_l2": np.sqrt((d**2).sum(ax)) / np.sqrt((ref**2).sum(ax)),
        "psnr": 10 * np.log10(1.0 / (d**2).mean(ax)),
        "ssim": _ssim_frames_ref(x, ref),
    }
    for metric, w in want.items():
        got = np.asarray(M.drift_over_frames(x32, r32, metric=metric))
        assert got.shape == (2, 6)
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=2e-5, err_msg=metric)
    assert np.all(np.diff(np.asarray(M.drift_over_frames(x32, r32)), axis=-1) > 0)  # default: relative L2


def test_batched_jit_and_dtypes(pair):
    x, ref = pair
    lead = np.stack([x, ref]), np.stack([ref, ref])  # leading axes (2, 2)
    got = np.asarray(M.ssim(*lead))
    assert got.shape == (2, 2)
    np.testing.assert_allclose(got[0], np.asarray(M.ssim(x, ref)), rtol=1e-6)
    np.testing.assert_allclose(got[1], 1.0, atol=1e-6)

    @jax.jit
    def combined(a, b):
        return M.psnr(a, b) + M.ssim(a, b) + M.relative_l2(a, b)

    want = np.asarray(M.psnr(x, ref)) + np.asarray(M.ssim(x, ref)) + np.asarray(M.relative_l2(x, ref))
    np.testing.assert_allclose(np.asarray(combined(jnp.asarray(x), jnp.asarray(ref))), want, rtol=1e-5)
    vm = jax.vmap(M.psnr)(x, ref)
    np.testing.assert_allclose(np.asarray(vm), np.asarray(M.psnr(x, ref)), rtol=1e-6)
    out = M.ssim(x.astype(jnp.bfloat16), ref.astype(jnp.bfloat16))
    assert out.dtype == jnp.float32
    f = M.fidelity(x, ref)
    assert set(f) == {"psnr", "ssim", "relative_l1", "relative_l2"}
    np.testing.assert_allclose(np.asarray(f["ssim"]), np.asarray(M.ssim(x, ref)))


def test_errors(pair):
    x, ref = pair
    with pytest.raises(ValueError, match=r"x shape \(2, 3, 16, 21, 3\) != ref shape \(2, 3, 16, 20, 3\)"):
        M.psnr(x, ref[..., :20, :])
    with pytest.raises(ValueError, match="at least 4 dims"):
        M.relative_l2(x[0, 0], ref[0, 0])
    with pytest.raises(TypeError, match="dtype uint8"):
        M.ssim((x * 255).astype(np.uint8), (ref * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        M.ssim(x[..., :10, :, :], ref[..., :10, :, :])
    with pytest.raises(ValueError, match="data_range=0"):
        M.psnr(x, ref, data_range=0)
    with pytest.raises(ValueError, match="data_range=-1.0"):
        M.ssim(x, ref, data_range=-1.0)
    with pytest.raises(ValueError, match="win_size=10"):
        M.ssim(x, ref, win_size=10)
    with pytest.raises(ValueError, match="sigma=0"):
        M.ssim(x, ref, sigma=0)
    with pytest.raises(ValueError, match="metric='lpips'"):
        M.drift_over_frames(x, ref, metric="lpips")


def test_data_range_takes_concrete_jax_and_numpy_scalars(pair):
    """A JAX/NumPy scalar data_range (e.g. jnp.float32(2)) works like the Python float; traced or <= 0 is an error."""
    x, ref = pair
    want = np.asarray(M.psnr(x, ref, 2.0))
    np.testing.assert_allclose(want, np.asarray(M.psnr(x, ref)) + 20 * np.log10(2.0), rtol=1e-5)
    for dr in (jnp.float32(2), jnp.asarray(2.0), jnp.bfloat16(2), np.float64(2), np.int32(2), 2):
        np.testing.assert_allclose(np.asarray(M.psnr(x, ref, data_range=dr)), want, rtol=1e-6)
    dr = jnp.float32(2)
    np.testing.assert_allclose(np.asarray(M.psnr_per_frame(x, ref, dr)), np.asarray(M.psnr_per_frame(x, ref, 2.0)))
    np.testing.assert_allclose(np.asarray(M.ssim(x, ref, dr, sigma=jnp.float32(1.5))), np.asarray(M.ssim(x, ref, 2.0)))
    np.testing.assert_allclose(np.asarray(M.drift_over_frames(x, ref, dr, metric="psnr")),
                               np.asarray(M.psnr_per_frame(x, ref, 2.0)))
    np.testing.assert_allclose(np.asarray(M.fidelity(x, ref, dr)["psnr"]), want)
    for bad, shown in ((jnp.float32(0), "Array(0., dtype=float32)"), (np.float64(-1), "np.float64(-1.0)"),
                       (jnp.ones(2), "Array([1., 1.], dtype=float32)"), (True, "True"), (float("nan"), "nan")):
        with pytest.raises(ValueError) as err:
            M.psnr(x, ref, data_range=bad)
        assert str(err.value) == (f"psnr: data_range={shown} is invalid; allowed: a positive number, the span of "
                                  "valid pixel values (1.0 for [0, 1]), as a Python, NumPy or concrete JAX scalar")
    with pytest.raises(TypeError, match=r"psnr: data_range is a traced JAX value .* must be concrete"):
        jax.jit(lambda a, b, d: M.psnr(a, b, d))(x, ref, 2.0)
    with pytest.raises(TypeError, match=r"ssim: data_range is a traced JAX value"):
        jax.jit(lambda a, b, d: M.ssim(a, b, d))(x, ref, 2.0)
