"""Offline video metrics shared by the evals (more land with the evals issue)."""

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
