"""The ShapesBench held-out prompt suite, and sample grids for looking at generations.

Every prompt of the suite puts an object in front of a background it never appears on in
training (a held-out (color, shape, background) combination, ``data.HELD_OUT``); each prompt
comes with the fixed generation seed the evals use. Half of the prompts have one object, half two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .data import HELD_OUT, sample_spec

SUITE_SEED_BASE = 1_000_000_000  # far from the trainer's sample seeds (0, 1, 2, ...)


def held_out_suite(n: int = 64) -> list[dict]:
    """``n`` held-out prompts as ``{"prompt", "seed", "spec"}``; deterministic.

    Prompt ``2k`` puts the ``k``-th held-out (color, shape, background) combination alone with a
    random motion, prompt ``2k + 1`` adds a second object of another color.
    """
    from .data import COLORS, MOTIONS, SHAPES

    triples = sorted(HELD_OUT)
    rng = np.random.default_rng(SUITE_SEED_BASE)
    motions = list(MOTIONS)
    out = []
    for i in range(n):
        color, shape, background = triples[(i // 2) % len(triples)]
        objects = [(color, shape, motions[int(rng.integers(len(motions)))])]
        if i % 2:
            other = [c for c in COLORS if c != color][int(rng.integers(len(COLORS) - 1))]
            objects.append((other, SHAPES[int(rng.integers(len(SHAPES)))], motions[int(rng.integers(len(motions)))]))
        spec = sample_spec(SUITE_SEED_BASE + i, objects=objects, background=background, exclude=frozenset())
        out.append({"prompt": spec.prompt, "seed": i, "spec": spec})
    return out


def grid_image(videos: Sequence, frames: Sequence[int] | None = None, scale: int = 2) -> np.ndarray:
    """Rows of videos ([F, H, W, 3] in [0, 1]), columns of chosen frames, as a uint8 image."""
    rows = []
    for v in videos:
        v = np.asarray(v)
        idx = frames if frames is not None else sorted({0, (len(v) - 1) // 2, len(v) - 1})
        idx = [min(i, len(v) - 1) for i in idx]
        pad = np.ones((v.shape[1], 2, 3), dtype=np.float32)
        cells = []
        for i in idx:
            cells += [v[i], pad]
        rows.append(np.concatenate(cells[:-1], axis=1))
    img = np.concatenate(rows, axis=0)
    img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def save_grid(path, videos, frames=None) -> None:
    import os

    from PIL import Image

    tmp = f"{path}.tmp.png"
    Image.fromarray(grid_image(videos, frames)).save(tmp)
    os.replace(tmp, path)


__all__ = ["grid_image", "held_out_suite", "save_grid"]
