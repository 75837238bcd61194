"""Prompt suites for the evals: ShapesBench's held-out suite, VBench prompt lists, text files.

- ``shapes-heldout`` or ``shapes-heldout:N``: the reference model's held-out suite (first N of
  64 prompts, each with its fixed seed); the checker scores these;
- ``shapes-search`` or ``shapes-search:N``: ShapesBench prompts for tuning (HeadHunter searches),
  disjoint from the held-out suite in prompts and seeds (first N of 64); checker-scored too;
- ``PATH.txt``: one prompt per line (blank lines and lines starting with ``#`` skipped);
- ``PATH.json``: VBench's prompt lists (a list of strings, or of objects with ``prompt_en`` or
  ``prompt``, as in VBench's ``VBench_full_info.json``).

Prompts from files get seed 0 unless the run's configs set ``seeds`` (every prompt x every seed).
"""

from __future__ import annotations

import json
from pathlib import Path

SHAPES_SUITE = "shapes-heldout"
SEARCH_SUITE = "shapes-search"


def load_suite(spec: str, seeds: tuple[int, ...] | None = None) -> list[dict]:
    """``[{"prompt", "seed", "index"}]`` for a suite spec (see the module docstring)."""
    items: list[dict]
    if is_shapes_suite(spec):
        from ..pipelines.shapes.suite import held_out_suite, search_suite

        name, _, count = spec.partition(":")
        n = 64
        if count:
            if not count.isdigit() or int(count) < 1:
                raise ValueError(f"--suite {spec}: expected {name}:N with N a positive integer")
            n = int(count)
        build = held_out_suite if name == SHAPES_SUITE else search_suite
        items = [{"prompt": r["prompt"], "seed": r["seed"]} for r in build(n)]
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--suite {spec}: neither {SHAPES_SUITE}[:N], {SEARCH_SUITE}[:N] nor an existing .txt / "
                             ".json prompt file")
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
    """A ShapesBench suite (the checker can score it)."""
    return spec.partition(":")[0] in (SHAPES_SUITE, SEARCH_SUITE)


__all__ = ["SEARCH_SUITE", "SHAPES_SUITE", "is_shapes_suite", "load_suite"]
