"""Offline video metrics: fidelity against a baseline (PSNR, SSIM) and VBench-style dimensions.

Temporal flickering follows VBench's formula exactly. VBench computes dynamic degree with RAFT,
motion smoothness with AMT frame interpolation and the consistency dimensions with DINO / CLIP
features; here the flow is classical (:mod:`dit_accel.evals.flow`) and the features come from a
pluggable extractor (:mod:`dit_accel.evals.features`), so these figures follow VBench's recipe but
are not on VBench's scale. ``dit-accel vbench`` runs the real thing where its weights exist.
"""

from __future__ import annotations

import numpy as np


def to_frames(video) -> np.ndarray:
    """A video as float32 ``[F, H, W, 3]`` in [0, 1].

    Accepts numpy or torch, ``[F, H, W, 3]``, ``[3, F, H, W]`` or one ``[H, W, 3]`` image, as uint8
    or floats in [0, 1] or [-1, 1].
    """
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    v = np.asarray(video)
    if v.ndim == 3:  # a single image [H, W, 3]
        v = v[None]
    if v.ndim != 4:
        raise ValueError(f"video: expected [F, H, W, 3] or [3, F, H, W], got shape {v.shape}")
    if v.shape[-1] != 3 and v.shape[0] == 3:
        v = np.moveaxis(v, 0, -1)
    if v.shape[-1] != 3:
        raise ValueError(f"video: expected 3 color channels, got shape {v.shape}")
    if v.dtype == np.uint8:
        return v.astype(np.float32) / 255.0
    v = v.astype(np.float32)
    if v.min() < -0.05:  # [-1, 1]
        v = (v + 1) / 2
    return np.clip(v, 0, 1)


def temporal_flickering(video) -> float:
    """VBench's temporal flickering score of one video (any layout :func:`to_frames` accepts).

    VBench: the mean absolute difference between consecutive frames on the 0-255 scale,
    ``(255 - mean) / 255``; 1.0 means no change between frames. A single frame scores 1.0.
    """
    v = np.round(to_frames(video) * 255).astype(np.int16)
    if v.shape[0] < 2:
        return 1.0
    diffs = [np.abs(v[i + 1] - v[i]).mean() for i in range(v.shape[0] - 1)]
    return float((255.0 - np.mean(diffs)) / 255.0)


def _pair(video, reference) -> tuple[np.ndarray, np.ndarray]:
    a, b = to_frames(video).astype(np.float64), to_frames(reference).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"video {a.shape} and reference {b.shape}: fidelity metrics need the same frames and size "
                         "(generate both at one resolution and frame count)")
    return a, b


def psnr(video, reference) -> float:
    """Peak signal-to-noise ratio (dB, data range 1) of ``video`` against ``reference`` over all
    frames and channels; ``inf`` when they are equal."""
    a, b = _pair(video, reference)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


def _gaussian_taps(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering over axes 1 and 2 of ``[F, H, W, C]``."""
    n = len(taps)
    h = sum(taps[i] * x[:, i : x.shape[1] - n + 1 + i] for i in range(n))
    return sum(taps[i] * h[:, :, i : h.shape[2] - n + 1 + i] for i in range(n))


def ssim(video, reference) -> float:
    """Structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
    data range 1), the mean over frames, channels and every window that fits inside the frame."""
    a, b = _pair(video, reference)
    taps = _gaussian_taps()
    if min(a.shape[1:3]) < len(taps):
        raise ValueError(f"video: frames of {a.shape[1]}x{a.shape[2]} are smaller than SSIM's {len(taps)}x"
                         f"{len(taps)} window")
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = _filter_valid(a, taps), _filter_valid(b, taps)
    var_a = _filter_valid(a * a, taps) - mu_a**2
    var_b = _filter_valid(b * b, taps) - mu_b**2
    cov = _filter_valid(a * b, taps) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def dynamic_degree(video, fps: float = 8.0) -> dict:
    """VBench's dynamic degree with classical flow instead of RAFT.

    Per consecutive frame pair, the mean of the largest 5% flow magnitudes (pixels per frame; where
    forward and backward flow disagree the magnitude counts as 0);
    the video is dynamic when at least ``round(4 * frames / 16)`` pairs exceed
    ``max(1, 8 / fps) * 6 * min(H, W) / 256`` pixels (VBench's thresholds). Returns
    ``{"magnitude": mean over pairs, "dynamic": bool}``; a single frame is static with magnitude 0.
    """
    v = to_frames(video)
    if len(v) < 2:
        return {"magnitude": 0.0, "dynamic": False}
    from .flow import consistent, optical_flow

    scores = []
    for i in range(len(v) - 1):
        flow = optical_flow(v[i], v[i + 1])
        # pixels whose match is not confirmed by the backward flow (occlusions, content entering
        # the frame) count as still: a classical flow is unreliable exactly there
        ok = consistent(flow, optical_flow(v[i + 1], v[i]))
        rad = (np.sqrt((flow**2).sum(-1)) * ok).ravel()
        k = max(1, int(rad.size * 0.05))
        scores.append(float(np.sort(rad)[-k:].mean()))
    thres = max(1.0, 8.0 / fps) * 6.0 * min(v.shape[1:3]) / 256.0
    count = max(1, round(4 * len(v) / 16.0))
    return {"magnitude": float(np.mean(scores)), "dynamic": sum(s > thres for s in scores) >= count}


def motion_smoothness(video) -> float:
    """VBench's motion smoothness with flow-based interpolation instead of AMT.

    Every odd frame is dropped and re-made from its two neighbours (each warped half-way along the
    flow between them); the score is ``(255 - mean abs error on the 0-255 scale) / 255`` over the
    re-made frames, so 1.0 is perfectly predictable motion. Fewer than 3 frames score 1.0.
    """
    from .flow import optical_flow, warp_frame

    v = to_frames(video).astype(np.float64)
    if len(v) < 3:
        return 1.0
    errors = []
    for i in range(1, len(v) - 1, 2):
        prev, nxt = v[i - 1], v[i + 1]
        flow = optical_flow(prev, nxt)  # prev[y, x] ~ nxt[y + v, x + u]
        # the midpoint frame at x shows prev at x - flow/2 and next at x + flow/2 (flow taken at x)
        mid = 0.5 * (warp_frame(prev, -flow / 2) + warp_frame(nxt, flow / 2))
        errors.append(np.abs(np.round(mid * 255) - np.round(v[i] * 255)).mean())
    return float((255.0 - np.mean(errors)) / 255.0)


def feature_consistency(video, extractor=None) -> float:
    """VBench's consistency formula over per-frame features: for every frame after the first, the
    mean of its cosine similarity to the previous frame and to the first frame (each clipped at 0),
    averaged over those frames. ``extractor`` is anything :func:`dit_accel.evals.features.feature_extractor`
    accepts (default: the classical features). A single frame scores 1.0."""
    from .features import feature_extractor

    v = to_frames(video)
    if len(v) < 2:
        return 1.0
    f = np.asarray(feature_extractor(extractor)(v), dtype=np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    sims = [(max(0.0, float(f[i] @ f[i - 1])) + max(0.0, float(f[i] @ f[0]))) / 2 for i in range(1, len(f))]
    return float(np.mean(sims))


def subject_consistency(video, extractor=None) -> float:
    """VBench's subject consistency (DINO features there; ``extractor``, default classical, here)."""
    return feature_consistency(video, extractor)


def background_consistency(video, extractor=None) -> float:
    """VBench's background consistency (CLIP features there; ``extractor``, default classical, here)."""
    return feature_consistency(video, extractor)
