"""Prompt suites for the evals: ShapesBench's held-out suite, VBench prompt lists, text files.

- ``shapes-heldout`` or ``shapes-heldout:N``: the reference model's held-out suite (first N of
  64 prompts, each with its fixed seed); the checker scores these;
- ``PATH.txt``: one prompt per line (blank lines and lines starting with ``#`` skipped);
- ``PATH.json``: VBench's prompt lists (a list of strings, or of objects with ``prompt_en`` or
  ``prompt``, as in VBench's ``VBench_full_info.json``).

Prompts from files get seed 0 unless the run's configs set ``seeds`` (every prompt x every seed).
"""

from __future__ import annotations

import json
from pathlib import Path

SHAPES_SUITE = "shapes-heldout"


def load_suite(spec: str, seeds: tuple[int, ...] | None = None) -> list[dict]:
    """``[{"prompt", "seed", "index"}]`` for a suite spec (see the module docstring)."""
    items: list[dict]
    if spec == SHAPES_SUITE or spec.startswith(SHAPES_SUITE + ":"):
        from ..pipelines.shapes.suite import held_out_suite

        n = 64
        if ":" in spec:
            count = spec.split(":", 1)[1]
            if not count.isdigit() or int(count) < 1:
                raise ValueError(f"--suite {spec}: expected {SHAPES_SUITE}:N with N a positive integer")
            n = int(count)
        items = [{"prompt": r["prompt"], "seed": r["seed"]} for r in held_out_suite(n)]
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--suite {spec}: neither {SHAPES_SUITE}[:N] nor an existing .txt / .json prompt file")
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, list):
                raise ValueError(f"--suite {spec}: a JSON suite must be a list of prompts or of objects with "
                                 "'prompt_en' / 'prompt'")
            prompts = []
            for i, entry in enumerate(data):
                text = entry if isinstance(entry, str) else (entry.get("prompt_en") or entry.get("prompt")
                                                             if isinstance(entry, dict) else None)
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"--suite {spec}: entry {i} has no prompt (expected a string or an object with "
                                     "'prompt_en' or 'prompt')")
                prompts.append(text.strip())
        else:
            prompts = [line.strip() for line in path.read_text().splitlines()
                       if line.strip() and not line.lstrip().startswith("#")]
        if not prompts:
            raise ValueError(f"--suite {spec}: no prompts in the file")
        items = [{"prompt": p, "seed": 0} for p in prompts]
    if seeds:
        items = [{"prompt": it["prompt"], "seed": s} for it in items for s in seeds]
    return [{**it, "index": i} for i, it in enumerate(items)]


def is_shapes_suite(spec: str) -> bool:
    return spec == SHAPES_SUITE or spec.startswith(SHAPES_SUITE + ":")


__all__ = ["SHAPES_SUITE", "is_shapes_suite", "load_suite"]
