"""Offline video metrics shared by the evals (more land with the evals issue)."""

from __future__ import annotations

import numpy as np


def _uint8_frames(video) -> np.ndarray:
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    v = np.asarray(video)
    if v.dtype != np.uint8:
        v = np.round(np.clip(v, 0, 1) * 255).astype(np.uint8)
    return v


def temporal_flickering(video) -> float:
    """VBench's temporal flickering score of one video ([F, H, W, 3], floats in [0, 1] or uint8).

    VBench: the mean absolute difference between consecutive frames on the 0-255 scale,
    ``(255 - mean) / 255``; 1.0 means no change between frames. A single frame scores 1.0.
    """
    v = _uint8_frames(video).astype(np.int16)
    if v.ndim != 4 or v.shape[0] < 2:
        return 1.0
    diffs = [np.abs(v[i + 1] - v[i]).mean() for i in range(v.shape[0] - 1)]
    return float((255.0 - np.mean(diffs)) / 255.0)
