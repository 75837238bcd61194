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
SEARCH_SEED_BASE = 2_000_000_000
SEARCH_GENERATION_SEED = 10_000  # the search suite's generation seeds start here (held-out: 0, 1, ...)


def held_out_suite(n: int = 64) -> list[dict]:
    """``n`` held-out prompts as ``{"prompt", "seed", "spec"}``; deterministic.

    Prompt ``2k`` puts the ``k``-th held-out (color, shape, background) combination alone with a
    random motion, prompt ``2k + 1`` adds a second object of another color.
    """
    return _suite(n, SUITE_SEED_BASE, 0)


def search_suite(n: int = 32) -> list[dict]:
    """``n`` prompts for tuning (e.g. a HeadHunter search) kept apart from the held-out suite: built
    the same way over the same held-out combinations, with other motions, second objects, layouts
    and generation seeds (from ``10000``), and no prompt text of the 64 held-out prompts, so the
    held-out suite stays unseen by the tuning."""
    held = {it["prompt"] for it in held_out_suite(64)}
    return [it for it in _suite(2 * n + 16, SEARCH_SEED_BASE, SEARCH_GENERATION_SEED) if it["prompt"] not in held][:n]


def _suite(n: int, base: int, first_seed: int) -> list[dict]:
    from .data import COLORS, MOTIONS, SHAPES

    triples = sorted(HELD_OUT)
    rng = np.random.default_rng(base)
    motions = list(MOTIONS)
    out = []
    for i in range(n):
        color, shape, background = triples[(i // 2) % len(triples)]
        objects = [(color, shape, motions[int(rng.integers(len(motions)))])]
        if i % 2:
            other = [c for c in COLORS if c != color][int(rng.integers(len(COLORS) - 1))]
            objects.append((other, SHAPES[int(rng.integers(len(SHAPES)))], motions[int(rng.integers(len(motions)))]))
        spec = sample_spec(base + i, objects=objects, background=background, exclude=frozenset())
        out.append({"prompt": spec.prompt, "seed": first_seed + i, "spec": spec})
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
    import io

    from PIL import Image

    from dit_accel.files import atomic_write

    buf = io.BytesIO()
    Image.fromarray(grid_image(videos, frames)).save(buf, format="PNG")
    atomic_write(path, buf.getvalue())


__all__ = ["grid_image", "held_out_suite", "save_grid", "search_suite"]
