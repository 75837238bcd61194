"""Fidelity metrics against scikit-image (an independent implementation)."""

import numpy as np
import pytest
import torch
from dit_accel.evals.metrics import psnr, ssim
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _pair(seed, shape=(3, 40, 37, 3), noise=0.1):
    rng = np.random.default_rng(seed)
    a = rng.random(shape).astype(np.float32)
    b = np.clip(a + noise * rng.standard_normal(shape), 0, 1).astype(np.float32)
    return a, b


@pytest.mark.parametrize("seed,noise", [(0, 0.02), (1, 0.1), (2, 0.3)])
def test_psnr_and_ssim_match_scikit_image(seed, noise):
    a, b = _pair(seed, noise=noise)
    want_ssim = np.mean([
        structural_similarity(a[i], b[i], channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False)
        for i in range(a.shape[0])
    ])
    assert ssim(b, a) == pytest.approx(want_ssim, abs=1e-5)
    assert psnr(b, a) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-4)


def test_identical_videos_and_layouts():
    a, _ = _pair(3)
    assert psnr(a, a) == float("inf")
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-9)
    # a [3, F, H, W] tensor in [-1, 1] is the same video
    t = torch.from_numpy(a).permute(3, 0, 1, 2) * 2 - 1
    b = np.clip(a + 0.05, 0, 1)
    assert psnr(t, b) == pytest.approx(psnr(a, b), abs=1e-3)


def test_mismatched_or_too_small_inputs_are_named():
    a, _ = _pair(4)
    with pytest.raises(ValueError, match="same frames and size"):
        psnr(a, a[:2])
    with pytest.raises(ValueError, match="smaller than SSIM"):
        ssim(a[:, :8, :8], a[:, :8, :8])
