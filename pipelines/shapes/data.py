"""ShapesBench procedural data: deterministic-from-seed text-to-video samples with known ground truth.

A sample is one or two objects (a shape in a color, moving in one way) over a dark background
(solid, gradient or textured), described by a plain-words prompt such as
``"a red circle moving left and a yellow square staying still on a dark blue background"``.
An image is a one-frame video: its prompt names no motion.

Geometry is resolution-free: positions and sizes are fractions of the frame side, and motion is
a function of normalized clip time ``tau`` in [0, 1], so the same spec renders at any size or
frame count. Rendering is vectorized torch (antialiased signed distances) and runs on the device
the training loop uses.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch

# Object colors are bright and saturated; backgrounds are dark. The checker relies on this split.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.12),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.40, 1.00),
    "purple": (0.65, 0.20, 0.85),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.02, 0.02, 0.02),
    "dark blue": (0.05, 0.08, 0.30),
    "dark green": (0.04, 0.20, 0.08),
    "dark red": (0.28, 0.04, 0.05),
    "dark purple": (0.18, 0.05, 0.25),
    "gray": (0.22, 0.22, 0.22),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Unit displacement (dx, dy) over the clip; image y grows downward, so "up" is -y.
MOTIONS: dict[str, tuple[float, float]] = {
    "static": (0.0, 0.0),
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-1.0, -1.0),
    "up-right": (1.0, -1.0),
    "down-left": (-1.0, 1.0),
    "down-right": (1.0, 1.0),
    "growing": (0.0, 0.0),
    "shrinking": (0.0, 0.0),
}
MOTION_WORDS: dict[str, str] = {
    "static": "staying still",
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "up-left": "moving up and left",
    "up-right": "moving up and right",
    "down-left": "moving down and left",
    "down-right": "moving down and right",
    "growing": "growing",
    "shrinking": "shrinking",
}
BACKGROUND_KINDS = ("solid", "gradient", "textured")

TRAVEL = 0.34  # fraction of the frame side an object travels along a straight move
DIAGONAL_TRAVEL = 0.26  # per axis, for diagonal moves
GROW_RANGE = (0.6, 1.45)  # radius multiplier at the start and end of a growing object
RADIUS_RANGE = (0.10, 0.15)  # object radius as a fraction of the frame side
MARGIN = 0.03
GAP = 0.05  # minimum empty space between two objects, fraction of the frame side

MAX_TEXT_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    color: str
    shape: str
    motion: str
    radius: float
    start: tuple[float, float]  # center (x, y) at tau = 0, fractions of the frame side

    def center(self, tau: float) -> tuple[float, float]:
        dx, dy = _displacement(self.motion)
        return (self.start[0] + dx * tau, self.start[1] + dy * tau)

    def radius_at(self, tau: float) -> float:
        lo, hi = GROW_RANGE
        if self.motion == "growing":
            return self.radius * (lo + (hi - lo) * tau)
        if self.motion == "shrinking":
            return self.radius * (hi - (hi - lo) * tau)
        return self.radius


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    objects: tuple[ObjectSpec, ...]
    background: str
    background_kind: str
    # gradient: second color and direction angle; textured: pattern frequency, angle, phase
    background2: str = "black"
    pattern: tuple[float, float, float] = (0.0, 0.0, 0.0)
    image: bool = False  # one frame, prompt without motion

    @property
    def prompt(self) -> str:
        return prompt_for(self)


def _displacement(motion: str) -> tuple[float, float]:
    ux, uy = MOTIONS[motion]
    step = DIAGONAL_TRAVEL if ux and uy else TRAVEL
    return (ux * step, uy * step)


def object_phrase(color: str, shape: str, motion: str | None) -> str:
    words = f"a {color} {shape}"
    return words if motion is None else f"{words} {MOTION_WORDS[motion]}"


def prompt_for(spec: SampleSpec) -> str:
    parts = [object_phrase(o.color, o.shape, None if spec.image else o.motion) for o in spec.objects]
    bg = spec.background
    if spec.background_kind == "gradient":
        bg = f"{bg} gradient"
    elif spec.background_kind == "textured":
        bg = f"textured {bg}"
    return f"{' and '.join(parts)} on a {bg} background"


def vocabulary() -> list[str]:
    """Every word the prompt grammar can produce (the tokenizer's vocabulary, after specials)."""
    words = {"a", "and", "on", "background", "gradient", "textured"}
    for name in (*COLORS, *BACKGROUNDS, *SHAPES, *MOTION_WORDS.values()):
        words.update(name.split())
    return sorted(words)


_MOTION_BY_WORDS = {v: k for k, v in MOTION_WORDS.items()}
_OBJECT_RE = re.compile(
    r"\b(?:a|an)\s+(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")"
    r"(?:\s+(" + "|".join(sorted(MOTION_WORDS.values(), key=len, reverse=True)) + r"))?"
)


def parse_prompt(prompt: str) -> list[tuple[str, str, str | None]]:
    """The (color, shape, motion or None) triples a prompt asks for, in order.

    Only the part before " on a " (the background clause) is read, so a background named
    "dark blue" is not taken for a blue object.
    """
    head = prompt.lower().split(" on a ")[0]
    out = []
    for m in _OBJECT_RE.finditer(head):
        motion = _MOTION_BY_WORDS[m.group(3)] if m.group(3) else None
        out.append((m.group(1), m.group(2), motion))
    return out


# --------------------------------------------------------------------------------------------
# Held-out attribute combinations: for every (color, shape) pair one background color never
# appears behind it in training. The evals' held-out suite uses exactly these combinations.


def held_out_triples() -> frozenset[tuple[str, str, str]]:
    """(object color, shape, background color) combinations the trainer never shows."""
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    out = set()
    for ci, c in enumerate(colors):
        for si, s in enumerate(SHAPES):
            out.add((c, s, backgrounds[(ci + 2 * si + 1) % len(backgrounds)]))
    return frozenset(out)


HELD_OUT = held_out_triples()


def is_held_out(spec: SampleSpec) -> bool:
    return any((o.color, o.shape, spec.background) in HELD_OUT for o in spec.objects)


# --------------------------------------------------------------------------------------------
# Sampling


def _path_bounds(motion: str, radius: float) -> tuple[float, float, float, float]:
    """Allowed start-center box (xmin, xmax, ymin, ymax) keeping the whole path inside the frame."""
    r = radius * (GROW_RANGE[1] if motion in ("growing", "shrinking") else 1.0) + MARGIN
    dx, dy = _displacement(motion)
    xmin, xmax = r - min(dx, 0.0), 1.0 - r - max(dx, 0.0)
    ymin, ymax = r - min(dy, 0.0), 1.0 - r - max(dy, 0.0)
    return xmin, xmax, ymin, ymax


def _extent(o: ObjectSpec) -> float:
    return o.radius * (GROW_RANGE[1] if o.motion in ("growing", "shrinking") else 1.0)


def _apart(a: ObjectSpec, b: ObjectSpec, steps: int = 17) -> bool:
    need = (_extent(a) + _extent(b)) * 1.15 + GAP  # 1.15: corners of squares reach past the radius
    for i in range(steps):
        tau = i / (steps - 1)
        (ax, ay), (bx, by) = a.center(tau), b.center(tau)
        if math.hypot(ax - bx, ay - by) < need:
            return False
    return True


def sample_spec(
    seed: int,
    *,
    image: bool = False,
    n_objects: int | None = None,
    objects: Sequence[tuple[str, str, str]] | None = None,
    background: str | None = None,
    exclude: frozenset[tuple[str, str, str]] = HELD_OUT,
) -> SampleSpec:
    """A sample drawn deterministically from ``seed``.

    ``objects`` fixes the (color, shape, motion) triples and ``background`` the background color
    (positions, sizes and the rest stay random); otherwise one or two objects are drawn. Samples
    with an object whose (color, shape, background) is in ``exclude`` (by default the held-out
    combinations, so the training distribution never contains them) are drawn again.
    """
    rng = np.random.default_rng(seed)
    # the object count is drawn once: redrawing it on every rejected placement would favour one
    # object (two objects are rejected far more often), leaving few two-object scenes
    n = len(objects) if objects is not None else n_objects or int(rng.integers(1, 3))
    for _ in range(1000):
        chosen: list[tuple[str, str, str]]
        if objects is not None:
            chosen = list(objects)
        else:
            chosen = []
            colors = list(rng.permutation(list(COLORS))[:n])
            for c in colors:
                s = SHAPES[int(rng.integers(len(SHAPES)))]
                m = list(MOTIONS)[int(rng.integers(len(MOTIONS)))]
                chosen.append((str(c), s, m))
        objs = []
        for c, s, m in chosen:
            radius = float(rng.uniform(*RADIUS_RANGE))
            xmin, xmax, ymin, ymax = _path_bounds(m, radius)
            start = (float(rng.uniform(xmin, xmax)), float(rng.uniform(ymin, ymax)))
            objs.append(ObjectSpec(c, s, m, radius, start))
        if len(objs) == 2 and not _apart(objs[0], objs[1]):
            continue
        bg_names = list(BACKGROUNDS)
        bg = bg_names[int(rng.integers(len(bg_names)))] if background is None else background
        if any((c, s, bg) in exclude for c, s, _ in chosen):
            continue
        kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
        bg2 = bg_names[int(rng.integers(len(bg_names)))]
        pattern = (float(rng.uniform(2.0, 6.0)), float(rng.uniform(0, math.pi)), float(rng.uniform(0, 2 * math.pi)))
        return SampleSpec(tuple(objs), bg, kind, bg2, pattern, image)
    raise RuntimeError(f"could not place objects {objects} without overlap (seed {seed})")


# --------------------------------------------------------------------------------------------
# Rendering


def _shape_sdf(shape_idx: torch.Tensor, px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (frame fractions, negative inside) of the four shapes; picks per object."""
    ax, ay = px.abs(), py.abs()
    circle = torch.sqrt(px * px + py * py) - r
    square = torch.maximum(ax, ay) - 0.86 * r
    diamond = (ax + ay - 1.2 * r) / math.sqrt(2.0)
    # apex-up triangle: apex (0, -r), base corners (+-0.95 r, 0.75 r); its sides lie on
    # 1.75 |x| - 0.95 (y + r) = 0, with outward normal (1.75, -0.95)
    base = py - 0.75 * r
    side = (1.75 * ax - 0.95 * (py + r)) / math.hypot(1.75, 0.95)
    triangle = torch.maximum(base, side)
    i = shape_idx
    return torch.where(i == 0, circle, torch.where(i == 1, square, torch.where(i == 2, triangle, diamond)))


def to_device(values, device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``; to a GPU through pinned memory without waiting for it.

    A copy from ordinary (pageable) host memory makes the host wait until the GPU has finished all
    queued work, so a training step that renders its batch would otherwise start on an idle GPU.
    """
    device = torch.device(device)
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def render(specs: Sequence[SampleSpec], num_frames: int, height: int, width: int, device=None) -> torch.Tensor:
    """Render specs to videos in [-1, 1], shape [B, 3, F, H, W] (float32)."""
    device = torch.device(device or "cpu")
    B, F = len(specs), num_frames
    side = float(min(height, width))
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / side
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / side
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # [H, W]
    aspect_x = width / side
    aspect_y = height / side

    # background
    base = to_device([BACKGROUNDS[s.background] for s in specs], device)  # [B, 3]
    base2 = to_device([BACKGROUNDS[s.background2] for s in specs], device)
    kinds = to_device([BACKGROUND_KINDS.index(s.background_kind) for s in specs], device)
    pat = to_device([s.pattern for s in specs], device)  # [B, 3]
    freq, ang, phase = pat[:, 0, None, None], pat[:, 1, None, None], pat[:, 2, None, None]
    u = gx / aspect_x * torch.cos(ang) + gy / aspect_y * torch.sin(ang)  # [B, H, W]
    grad_t = ((u - u.amin((1, 2), keepdim=True)) / (u.amax((1, 2), keepdim=True) - u.amin((1, 2), keepdim=True) + 1e-6))
    texture = 0.06 * torch.sin(2 * math.pi * freq * u + phase) * torch.sin(2 * math.pi * freq * (gx - gy) * 0.7)
    gradient_bg = base[:, :, None, None] * (1 - grad_t[:, None]) + base2[:, :, None, None] * grad_t[:, None]
    solid_bg = base[:, :, None, None].expand(B, 3, height, width)
    textured_bg = (base[:, :, None, None] + texture[:, None]).clamp(0, 1)
    k = kinds[:, None, None, None]
    bg = torch.where(k == 0, solid_bg, torch.where(k == 1, gradient_bg, textured_bg))  # [B, 3, H, W]
    video = bg[:, :, None].expand(B, 3, F, height, width).clone()

    taus = [0.5] if F == 1 else [f / (F - 1) for f in range(F)]
    aa = 1.0 / side  # antialiasing ramp: one pixel
    max_obj = max(len(s.objects) for s in specs)
    for j in range(max_obj):
        present = to_device([j < len(s.objects) for s in specs], device)
        objs = [s.objects[j] if j < len(s.objects) else s.objects[0] for s in specs]
        cx = to_device([[o.center(t)[0] for t in taus] for o in objs], device)  # [B, F]
        cy = to_device([[o.center(t)[1] for t in taus] for o in objs], device)
        rad = to_device([[o.radius_at(t) for t in taus] for o in objs], device)
        # map centers in [0,1] of the shorter side onto the frame
        px = gx[None, None] - (cx * aspect_x)[:, :, None, None]  # [B, F, H, W]
        py = gy[None, None] - (cy * aspect_y)[:, :, None, None]
        shape_idx = to_device([SHAPES.index(o.shape) for o in objs], device)
        sdf = _shape_sdf(shape_idx[:, None, None, None], px, py, rad[:, :, None, None])
        alpha = (0.5 - sdf / aa).clamp(0, 1) * present[:, None, None, None]  # [B, F, H, W]
        color = to_device([COLORS[o.color] for o in objs], device)  # [B, 3]
        video = video * (1 - alpha[:, None]) + color[:, :, None, None, None] * alpha[:, None]
    return video * 2 - 1


def specs_for_seeds(seeds: Iterable[int], **kw) -> list[SampleSpec]:
    return [sample_spec(int(s), **kw) for s in seeds]
