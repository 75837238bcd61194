"""HeadHunter on the reference model: search heads on the search suite, then compare on the held-out
suite against no perturbation guidance and layer-level PAG (every head of one layer, u = 1).

    python -m dit_accel.benchmarks.headhunt [--search shapes-search:32] [--heldout shapes-heldout:64]

1. ``headhunt(objective="checker")`` on the search prompts (CFG ``--guidance-scale``, SoftPAG
   ``u = --strength``, ``s = --scale``); the preset is written to ``--preset``.
2. Layer-level PAG at the same ``s`` for each layer, on the search prompts: the best layer there is
   the fair "best single layer" (chosen on the same data as the heads).
3. On the held-out prompts (never seen by steps 1-2): no PAG, the HeadHunter heads, and every
   single layer, all at the same CFG and seeds. Checker score (the search objective: passed checks
   per video), the checker's color / shape / motion accuracy, and paired wins / losses against no PAG.

Every scored set is cached under ``--cache`` (rerun to resume). Prints a table and writes
benchmarks/results/headhunt-<device>-<date>.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from dit_accel.benchmarks.report import print_table, write_result
from dit_accel.evals import shapes
from dit_accel.evals.objectives import checker_scores
from dit_accel.evals.runner import _write_rows, read_rows
from dit_accel.evals.suites import load_suite
from dit_accel.headhunt import _generate, _heads_dict, headhunt, perturbable_heads
from dit_accel.pipelines import load_reference

from dit_accel import SoftPAG


def _score(pipe, heads, items, args, cache: Path, name: str) -> dict:
    """Checker scores of one head set (``{}``: no PAG) on ``items``; cached in ``cache``."""
    key = json.dumps([name, {str(k): list(v) for k, v in sorted(heads.items())}])
    done = {json.dumps([r["name"], r["heads"]]): r for r in read_rows(cache)}
    if key in done:
        return done[key]
    prompts, seeds = [it["prompt"] for it in items], [it["seed"] for it in items]
    pag = SoftPAG(heads=heads, strength=args.strength, scale=args.scale) if heads else None
    t0 = time.perf_counter()
    videos = _generate(pipe, prompts, seeds, _pipeline_kwargs(args), args.batch_size, guidance=pag)
    seconds = time.perf_counter() - t0
    summary = shapes.summarize([shapes.score_video(v, p) for v, p in zip(videos, prompts)])
    row = {"name": name, "heads": {str(k): list(v) for k, v in heads.items()},
           "scores": checker_scores(videos, prompts),
           "color": summary["color"], "shape": summary["shape"], "motion": summary["motion"],
           "generate_s": round(seconds, 2)}
    _write_rows(cache, [*done.values(), row])
    return row


def _pipeline_kwargs(args) -> dict:
    kwargs = {"guidance_scale": args.guidance_scale, "num_inference_steps": args.steps}
    if args.smoke:
        kwargs.update(num_frames=5, height=16, width=16)
    return kwargs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--search", default="shapes-search:32")
    ap.add_argument("--heldout", default="shapes-heldout:64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--guidance-scale", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check at a tiny size (not a result)")
    ap.add_argument("--cache", default="runs/headhunt-bench", help="folder of the cached scores (resumable)")
    ap.add_argument("--preset", default="benchmarks/results/headhunt-preset-checker.json")
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("benchmarks/headhunt.py runs the search on a CUDA GPU (the CPU would take hours)")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    pipe = load_reference(device="cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    search, heldout = load_suite(args.search), load_suite(args.heldout)

    t0 = time.perf_counter()
    result = headhunt(pipe, [it["prompt"] for it in search], [it["seed"] for it in search], objective="checker",
                      rounds=args.rounds, top_k=args.top_k, strength=args.strength, scale=args.scale,
                      cache_dir=cache / "search", output=args.preset, batch_size=args.batch_size,
                      **_pipeline_kwargs(args))
    search_s = time.perf_counter() - t0

    layers = perturbable_heads(pipe)
    t1 = time.perf_counter()
    layer_search = {layer: _score(pipe, {layer: list(range(n))}, search, args, cache / "search-layers.jsonl",
                                  f"layer {layer}") for layer, n in layers.items()}
    layer_search_s = time.perf_counter() - t1
    best_layer = max(layer_search, key=lambda layer: (np.mean(layer_search[layer]["scores"]), -layer))

    configs = [("no PAG", {}), (f"HeadHunter ({len(result.heads)} heads)", _heads_dict(result.heads))]
    configs += [(f"layer {layer}" + (" (best on search)" if layer == best_layer else ""), {layer: list(range(n))})
                for layer, n in layers.items()]
    held = {name: _score(pipe, {int(k): v for k, v in heads.items()}, heldout, args, cache / "heldout.jsonl", name)
            for name, heads in configs if name != "HeadHunter (0 heads)"}
    base = np.array(held["no PAG"]["scores"])
    rows = []
    for name, row in held.items():
        s = np.array(row["scores"])
        rows.append({"config": name, "heads": row["heads"], "checker": round(float(s.mean()), 4),
                     "delta": round(float(s.mean() - base.mean()), 4), "color": round(row["color"], 4),
                     "shape": round(row["shape"], 4), "motion": round(row["motion"], 4) if row["motion"] is not None
                     else None, "wins": int((s > base).sum()), "losses": int((s < base).sum()),
                     "search_checker": round(float(np.mean(layer_search[int(name.split()[1])]["scores"])), 4)
                     if name.startswith("layer") else (round(result.score, 4) if name.startswith("HeadHunter")
                                                        else round(result.baseline, 4))})
    print(f"search: {len(search)} prompts, {result.evaluations} head sets, {search_s / 60:.1f} min "
          f"({result.stopped}); chosen heads {_heads_dict(result.heads)}")
    print_table(rows, ["config", "search_checker", "checker", "delta", "color", "shape", "motion", "wins", "losses"])
    hh = next((r for r in rows if r["config"].startswith("HeadHunter")), None)
    layer_rows = [r for r in rows if r["config"].startswith("layer")]
    best_fair = next(r for r in layer_rows if "best on search" in r["config"])
    best_oracle = max(layer_rows, key=lambda r: r["checker"])
    verdict = None if hh is None else {
        "beats_no_pag": hh["checker"] > rows[0]["checker"],
        "beats_best_layer_chosen_on_search": hh["checker"] > best_fair["checker"],
        "beats_every_single_layer_on_heldout": hh["checker"] > best_oracle["checker"],
    }
    print(json.dumps(verdict))
    path = write_result("headhunt", {
        "settings": {"search": args.search, "heldout": args.heldout, "rounds": args.rounds, "top_k": args.top_k,
                     "strength": args.strength, "scale": args.scale, "guidance_scale": args.guidance_scale,
                     "steps": args.steps, "batch_size": args.batch_size, "smoke": args.smoke},
        "search": {"seconds": round(search_s, 1), "gpu_minutes": round(search_s / 60, 2), "stopped": result.stopped,
                   "evaluations": result.evaluations, "heads": _heads_dict(result.heads), "score": result.score,
                   "baseline": result.baseline, "rounds": result.rounds, "preset": args.preset},
        "layer_search_seconds": round(layer_search_s, 1), "best_layer_on_search": best_layer,
        "heldout": rows, "verdict": verdict,
        "heldout_scores": {name: row["scores"] for name, row in held.items()},
    }, Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
