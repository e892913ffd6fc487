"""PSNR / SSIM against two independent implementations: scikit-image and dm-pix (Wang et al. settings)."""

import numpy as np
import pytest

from vidaccel import metrics as M

# neither library is in the GPU machine's image: skip there rather than fail collection
dm_pix = pytest.importorskip("dm_pix")
skm = pytest.importorskip("skimage.metrics")


@pytest.fixture(scope="module")
def videos():
    """Two correlated (B, T, H, W, C) videos in [0, 1], like a run and its reference, plus an unrelated one."""
    rng = np.random.default_rng(11)
    ref = rng.uniform(size=(2, 3, 32, 27, 3)).astype(np.float32)
    near = np.clip(ref + rng.normal(0, 0.08, ref.shape), 0, 1).astype(np.float32)
    far = rng.uniform(size=ref.shape).astype(np.float32)
    return ref, near, far


def _skimage_ssim_frames(x, ref, data_range=1.0):
    """Per-frame SSIM from scikit-image with the Gaussian-weighted, population-covariance (Wang et al.) setup."""
    out = np.zeros(x.shape[:2])
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            out[b, t] = skm.structural_similarity(x[b, t].astype(np.float64), ref[b, t].astype(np.float64),
                                              data_range=data_range, channel_axis=-1, gaussian_weights=True,
                                              sigma=1.5, use_sample_covariance=False)
    return out


@pytest.mark.parametrize("which", ["near", "far"])
def test_ssim_equals_scikit_image(videos, which):
    ref, near, far = videos
    x = near if which == "near" else far
    expected = _skimage_ssim_frames(x, ref)
    got = np.asarray(M.ssim_per_frame(x, ref))
    np.testing.assert_allclose(got, expected, atol=2e-5)
    np.testing.assert_allclose(np.asarray(M.ssim(x, ref)), expected.mean(-1), atol=2e-5)


def test_ssim_equals_dm_pix(videos):
    ref, near, _ = videos
    flat = lambda a: a.reshape(-1, *a.shape[-3:])            # (B*T, H, W, C) images
    expected = np.asarray(dm_pix.ssim(flat(near), flat(ref), max_val=1.0)).reshape(near.shape[:2])
    np.testing.assert_allclose(np.asarray(M.ssim_per_frame(near, ref)), expected, atol=2e-5)


def test_psnr_equals_scikit_image_and_dm_pix(videos):
    ref, near, far = videos
    for x in (near, far):
        per_video = [skm.peak_signal_noise_ratio(ref[b].astype(np.float64), x[b].astype(np.float64), data_range=1.0)
                     for b in range(x.shape[0])]
        np.testing.assert_allclose(np.asarray(M.psnr(x, ref)), per_video, atol=1e-3)
        per_frame = np.asarray(dm_pix.psnr(x.reshape(-1, *x.shape[-3:]), ref.reshape(-1, *x.shape[-3:])))
        np.testing.assert_allclose(np.asarray(M.psnr_per_frame(x, ref)).ravel(), per_frame, atol=1e-3)
    scaled = [skm.peak_signal_noise_ratio(255 * ref[b].astype(np.float64), 255 * near[b].astype(np.float64),
                                      data_range=255.0) for b in range(ref.shape[0])]
    np.testing.assert_allclose(np.asarray(M.psnr(255 * near, 255 * ref, data_range=255.0)), scaled, atol=1e-3)
