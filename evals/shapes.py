"""ShapesBench checker: classical computer vision only, no learned weights.

For every video (frames in [0, 1] or [-1, 1]) it finds each object by its palette color, names
its shape from scale- and position-free silhouette measurements, and its motion from the
trajectory of its centroid and the trend of its area; then scores that against what the prompt
asks for. Validated against the procedural ground truth in ``tests/test_shapes.py``.

Shape features (each a fraction of the object's bounding box, compared with the values of the
ideal shapes derived from their geometry):
  * ``fill``: area / bounding-box area (square 1, circle pi/4, triangle and diamond 1/2);
  * ``w25`` / ``w75``: mean width of the rows at a quarter and three quarters of the box height
    (square 1/1, circle 0.87/0.87, diamond 1/2 / 1/2, apex-up triangle 1/4 / 3/4).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from dit_accel.evals.metrics import to_frames
from dit_accel.pipelines.shapes.data import BACKGROUNDS, COLORS, parse_prompt

__all__ = ["SHAPE_PROTOTYPES", "Detection", "analyze_video", "score", "score_video"]

# (fill, w25, w75) of the ideal shapes
SHAPE_PROTOTYPES = {
    "square": (1.0, 1.0, 1.0),
    "circle": (math.pi / 4, math.sqrt(3) / 2, math.sqrt(3) / 2),
    "triangle": (0.5, 0.25, 0.75),
    "diamond": (0.5, 0.5, 0.5),
}
GROW_LOG_AREA = math.log(2.0)  # area doubling (or halving) over the clip reads as growing (shrinking)
STATIC_TRAVEL = 0.08  # centroid travel, in frame sides, below which an object is static
MIN_AREA_FRACTION = 0.002  # smallest blob, as a fraction of the frame, that counts as an object

_PALETTE_NAMES = list(COLORS) + [f"bg:{b}" for b in BACKGROUNDS]
_PALETTE = np.array(list(COLORS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)


@dataclasses.dataclass
class Detection:
    color: str
    shape: str
    motion: str | None  # None for a single frame
    features: tuple[float, float, float]
    displacement: tuple[float, float]  # centroid travel over the clip, frame sides (x right, y down)
    log_area_ratio: float
    frames_present: int


def _object_mask(mask: np.ndarray, min_area: int) -> np.ndarray | None:
    """The largest solid blob of a color mask, or None.

    Antialiased edges of one object over a dark background can take the palette color of
    another (white blended into dark purple reads as purple): such rings are one pixel thin,
    so a blob counts only if something of it survives a 2x2 opening.
    """
    from scipy import ndimage

    if mask.sum() < min_area:
        return None
    core = ndimage.binary_opening(mask, structure=np.ones((2, 2), dtype=bool))
    if not core.any():
        return None
    labels, n = ndimage.label(mask)
    best = np.bincount(labels[core], minlength=n + 1)
    best[0] = 0
    blob = labels == best.argmax()
    return blob if blob.sum() >= min_area else None


def _shape_features(mask: np.ndarray) -> tuple[float, float, float]:
    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    h, w = y1 - y0, x1 - x0
    box = mask[y0:y1, x0:x1].astype(np.float32)
    fill = float(box.mean())
    widths = box.sum(1) / w
    centers = (np.arange(h) + 0.5) / h

    def band(c):
        sel = np.abs(centers - c) <= max(0.06, 0.5 / h)
        return float(widths[sel].mean())

    return fill, band(0.25), band(0.75)


def classify_shape(features: tuple[float, float, float]) -> str:
    f = np.asarray(features)
    return min(SHAPE_PROTOTYPES, key=lambda s: float(np.sum((f - np.asarray(SHAPE_PROTOTYPES[s])) ** 2)))


def classify_motion(displacement: tuple[float, float], log_area_ratio: float) -> str:
    if log_area_ratio > GROW_LOG_AREA:
        return "growing"
    if log_area_ratio < -GROW_LOG_AREA:
        return "shrinking"
    dx, dy = displacement
    if math.hypot(dx, dy) < STATIC_TRAVEL:
        return "static"
    sector = round(math.degrees(math.atan2(-dy, dx)) / 45.0) % 8  # 0 = right, counter-clockwise
    return ["right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right"][sector]


def analyze_video(video) -> list[Detection]:
    """Every palette-colored object in the video with its shape and motion."""
    frames = to_frames(video)
    F, H, W, _ = frames.shape
    side = float(min(H, W))
    d = ((frames[..., None, :] - _PALETTE) ** 2).sum(-1)  # [F, H, W, P]
    nearest = d.argmin(-1)
    min_area = max(4, int(MIN_AREA_FRACTION * H * W))
    out = []
    for ci, color in enumerate(COLORS):
        masks, areas, cents = [], [], []
        for f in range(F):
            m = _object_mask(nearest[f] == ci, min_area)
            if m is None:
                masks.append(None)
                areas.append(0)
                cents.append(None)
                continue
            a = int(m.sum())
            ys, xs = np.nonzero(m)
            masks.append(m)
            areas.append(a)
            cents.append(((xs.mean() + 0.5) / side, (ys.mean() + 0.5) / side))
        present = [f for f in range(F) if masks[f] is not None]
        if len(present) * 2 < F or not present:
            continue
        big = max(areas)
        feats = np.median([_shape_features(masks[f]) for f in present if areas[f] * 2 >= big], axis=0)
        shape = classify_shape(tuple(feats))
        disp, lar, motion = (0.0, 0.0), 0.0, None
        if F > 1 and len(present) >= 2:
            tau = np.array(present, dtype=np.float64) / (F - 1)
            cx = np.array([cents[f][0] for f in present])
            cy = np.array([cents[f][1] for f in present])
            la = np.log(np.array([areas[f] for f in present], dtype=np.float64))
            slope = lambda y: float(np.polyfit(tau, y, 1)[0])
            disp, lar = (slope(cx), slope(cy)), slope(la)
            motion = classify_motion(disp, lar)
        out.append(Detection(color, shape, motion, tuple(float(x) for x in feats), disp, lar, len(present)))
    return out


def score_video(video, prompt: str) -> dict:
    """Per-object verdicts for one video against its prompt."""
    wanted = parse_prompt(prompt)
    if not wanted:
        raise ValueError(f"prompt: names no '<color> <shape>' object the checker knows: {prompt!r}")
    found = {d.color: d for d in analyze_video(video)}
    objects = []
    for color, shape, motion in wanted:
        det = found.get(color)
        objects.append(
            {
                "color": color,
                "shape": shape,
                "motion": motion,
                "found_shape": det.shape if det else None,
                "found_motion": det.motion if det else None,
                "color_ok": det is not None,
                "shape_ok": det is not None and det.shape == shape,
                # motion is scored only where the prompt names one and the video has frames to move in
                "motion_ok": None if motion is None or (det is not None and det.motion is None) else (
                    det is not None and det.motion == motion
                ),
            }
        )
    spurious = sorted(set(found) - {c for c, _, _ in wanted})
    return {"prompt": prompt, "objects": objects, "spurious": spurious}


def summarize(per_video: Sequence[dict]) -> dict:
    """Per-attribute accuracy over ``score_video`` verdicts.

    color: objects whose color was found, over prompted objects plus spurious extra objects;
    shape / motion: prompted objects whose color was found *and* whose shape / motion matches.
    """
    objs = [o for r in per_video for o in r["objects"]]
    n_spurious = sum(len(r["spurious"]) for r in per_video)
    motions = [o["motion_ok"] for o in objs if o["motion_ok"] is not None]
    return {
        "color": sum(o["color_ok"] for o in objs) / max(1, len(objs) + n_spurious),
        "shape": sum(o["shape_ok"] for o in objs) / max(1, len(objs)),
        "motion": (sum(motions) / len(motions)) if motions else None,
        "videos": len(per_video),
        "objects": len(objs),
        "spurious": n_spurious,
        "per_video": list(per_video),
    }


def score(videos: Sequence, prompts: Sequence[str]) -> dict:
    """Per-attribute accuracy over a set of videos (see :func:`summarize`)."""
    if len(videos) != len(prompts):
        raise ValueError(f"videos and prompts: got {len(videos)} videos for {len(prompts)} prompts")
    return summarize([score_video(v, p) for v, p in zip(videos, prompts)])
