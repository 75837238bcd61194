"""Classical dense optical flow (no learned weights) for the VBench-style motion dimensions.

VBench measures motion with RAFT (dynamic degree) and AMT frame interpolation (motion
smoothness); neither network can be downloaded here, so the offline harness uses a coarse-to-fine
Lucas-Kanade flow: a Gaussian image pyramid, and at each level a few warp-and-solve passes of the
2x2 Lucas-Kanade system over a Gaussian window, each step at most one pixel of its level. It is
accurate to a fraction of a pixel on textured content and reports ~0 on static frames; on flat
regions (no gradient) it reports 0. :func:`consistent` marks where forward and backward flow agree
(occlusions and content entering the frame do not).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import _gaussian_taps


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights of R, G, B


def _gray(frame) -> torch.Tensor:
    """[H, W] float64 luminance in [0, 1] of an [H, W, 3] (or [H, W]) frame in [0, 1]."""
    f = torch.as_tensor(np.asarray(frame), dtype=torch.float64)
    if f.ndim == 3:
        f = f @ torch.tensor(LUMA, dtype=torch.float64)
    if f.ndim != 2:
        raise ValueError(f"frame: expected [H, W, 3] or [H, W], got shape {tuple(f.shape)}")
    return f


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, 1, H, W] with replicate padding."""
    k = torch.from_numpy(_gaussian_taps(sigma, truncate=2.5))
    r = len(k) // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def _warp(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample [N, 1, H, W] at (x + u, y + v) (bilinear, border clamp); flow [N, 2, H, W] in pixels."""
    _, _, h, w = img.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype), indexing="ij")
    gx = (xs + flow[:, 0]) / max(w - 1, 1) * 2 - 1
    gy = (ys + flow[:, 1]) / max(h - 1, 1) * 2 - 1
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _gradients(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences (one-sided at the border) of [N, 1, H, W]."""
    p = F.pad(img, (1, 1, 1, 1), mode="replicate")
    gx = (p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2]) / 2
    gy = (p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1]) / 2
    return gx, gy


def optical_flow(frame0, frame1, levels: int | None = None, iters: int = 4, window_sigma: float = 2.0) -> np.ndarray:
    """Dense flow from ``frame0`` to ``frame1`` ([H, W, 3] in [0, 1]): ``[H, W, 2]`` (u right, v
    down, in pixels) such that ``frame1[y + v, x + u] ~ frame0[y, x]``.

    ``levels`` pyramid levels (default: halve until the short side is about 16 pixels), ``iters``
    Lucas-Kanade passes per level, ``window_sigma`` the Gaussian window of the local solve.
    """
    a, b = _gray(frame0), _gray(frame1)
    if a.shape != b.shape:
        raise ValueError(f"frames of different sizes: {tuple(a.shape)} vs {tuple(b.shape)}")
    h, w = a.shape
    if levels is None:
        levels = max(1, int(math.floor(math.log2(max(min(h, w), 16) / 16))) + 1)
    pyr = [(a[None, None], b[None, None])]
    for _ in range(levels - 1):
        a0, b0 = pyr[-1]
        if min(a0.shape[-2:]) < 8:
            break
        pyr.append((F.avg_pool2d(_blur(a0, 1.0), 2), F.avg_pool2d(_blur(b0, 1.0), 2)))
    flow = torch.zeros(1, 2, *pyr[-1][0].shape[-2:], dtype=torch.float64)
    for lvl in range(len(pyr) - 1, -1, -1):
        a0, b0 = pyr[lvl]
        if flow.shape[-2:] != a0.shape[-2:]:
            flow = 2 * F.interpolate(flow, size=a0.shape[-2:], mode="bilinear", align_corners=False)
        for _ in range(iters):
            bw = _warp(b0, flow)
            gx, gy = _gradients((a0 + bw) / 2)
            gt = bw - a0
            sxx, sxy, syy = (_blur(t, window_sigma) for t in (gx * gx, gx * gy, gy * gy))
            sxt, syt = _blur(gx * gt, window_sigma), _blur(gy * gt, window_sigma)
            det = sxx * syy - sxy * sxy
            # where the window has no gradient structure, leave the flow as it is
            ok = det > 1e-9 * (sxx + syy + 1e-12) ** 2 + 1e-14
            safe = torch.where(ok, det, torch.ones_like(det))
            du = torch.where(ok, -(syy * sxt - sxy * syt) / safe, torch.zeros_like(det))
            dv = torch.where(ok, -(sxx * syt - sxy * sxt) / safe, torch.zeros_like(det))
            # the linearisation holds for small steps: at most one pixel of this level per pass
            flow = flow + torch.cat([du, dv], dim=1).clamp(-1.0, 1.0)
    return flow[0].permute(1, 2, 0).numpy()


def consistent(forward, backward, tol: float = 0.5) -> np.ndarray:
    """[H, W] bool: where ``backward`` (frame1 -> frame0), read at ``x + forward(x)``, undoes
    ``forward`` to within ``tol + 5%`` of its length."""
    fw = torch.as_tensor(np.asarray(forward), dtype=torch.float64).permute(2, 0, 1)[None]
    bw = torch.as_tensor(np.asarray(backward), dtype=torch.float64).permute(2, 0, 1)
    back_at = _warp(bw[:, None], fw.expand(2, 2, *fw.shape[-2:]))[:, 0]  # [2, H, W]
    err = torch.linalg.vector_norm(fw[0] + back_at, dim=0)
    return (err <= tol + 0.05 * torch.linalg.vector_norm(fw[0], dim=0)).numpy()


def warp_frame(frame, flow) -> np.ndarray:
    """``frame`` ([H, W, 3]) sampled at ``(x + u, y + v)`` for each pixel (bilinear, border clamp)."""
    f = torch.as_tensor(np.asarray(frame), dtype=torch.float64).permute(2, 0, 1)[:, None]  # [3, 1, H, W]
    fl = torch.as_tensor(np.asarray(flow), dtype=torch.float64).permute(2, 0, 1)[None].expand(3, 2, *f.shape[-2:])
    return _warp(f, fl)[:, 0].permute(1, 2, 0).numpy()


__all__ = ["consistent", "optical_flow", "warp_frame"]
