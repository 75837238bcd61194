"""What sparse attention costs in quality on the ShapesBench reference model.

    python -m dit_accel.benchmarks.sparse_quality                  # defaults + the sweep, GPU
    python -m dit_accel.benchmarks.sparse_quality --configs defaults --prompts 8 --steps 4   # smoke

Every held-out prompt is generated with its fixed seed at the default size, steps and CFG, first
with dense attention, then with each sparse configuration. Per configuration: PSNR and SSIM of
every video against the dense video of the same prompt and seed (mean and worst), the checker's
color / shape / motion accuracy (and its change from dense, in points), the measured attention
density (token pairs computed in video self-attention / all, dense steps counted in full) and the
wall time of the suite.

Writes ``benchmarks/results/sparse-quality-<device>-<date>.json`` (or ``--out DIR``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from dit_accel.benchmarks.reference import _generate
from dit_accel.benchmarks.report import command_line, print_table, write_result
from dit_accel.evals import shapes as checker
from dit_accel.evals.metrics import psnr, ssim
from dit_accel.pipelines import load_reference
from dit_accel.pipelines.shapes.pipeline import DEFAULT_SIZE, DEFAULT_STEPS
from dit_accel.pipelines.shapes.suite import held_out_suite

import dit_accel


def configs(which: str) -> dict[str, dit_accel.AttentionMethod]:
    """Named method configurations: the defaults, and a sweep around them."""
    out = {"Neighborhood()": dit_accel.Neighborhood(), "TemporalSparse()": dit_accel.TemporalSparse()}
    if which == "defaults":
        return out
    # The sweep is of the window alone and of TemporalSparse's skip-and-drop (estimate=False for both, as
    # the methods ran before the estimate).
    # densities on the default 17x16x16 grid (2x8x8 tiles, 36 of them): window (0.5, 0.5, 0.5) 14%,
    # (0.75, 0.5, 0.5) 20%, (1.0, 0.5, 0.5) 25%, (0.5, 0.5, 1.0) 29%, (0.75, 0.5, 1.0) 40%; dense steps
    # and layers count as density 1. Layers 0, 5 and 7 of the shipped model are its least concentrated
    # (benchmarks/results/reference-*.json, "attention").
    N, T = dit_accel.Neighborhood, dit_accel.TemporalSparse
    fixed = dict(warmup_steps=2, refresh_every=0, refresh_tol=None, estimate=False)
    sweep = {
        "Neighborhood(dense_steps=2, estimate=False)": N(dense_steps=2, estimate=False),
        "Neighborhood(window=(1.0, 0.5, 0.5), estimate=False)": N(window=(1.0, 0.5, 0.5), estimate=False),
        "Neighborhood(window=(0.5, 0.5, 1.0), estimate=False)": N(window=(0.5, 0.5, 1.0), estimate=False),
        "Neighborhood(window=(0.5, 0.5, 1.0), dense_steps=3, estimate=False)":
            N(window=(0.5, 0.5, 1.0), dense_steps=3, estimate=False),
        "Neighborhood(window=(0.75, 0.5, 1.0), estimate=False)": N(window=(0.75, 0.5, 1.0), estimate=False),
        "Neighborhood(window=(1.0, 0.5, 0.5), dense_layers=(0,), estimate=False)":
            N(window=(1.0, 0.5, 0.5), dense_layers=(0,), estimate=False),
        "TemporalSparse(threshold=-6, estimate=False)": T(threshold=-6.0, estimate=False),
        "TemporalSparse(threshold=-4, estimate=False)": T(threshold=-4.0, estimate=False),
        "TemporalSparse(threshold=-2, estimate=False)": T(threshold=-2.0, estimate=False),
        "TemporalSparse(max_density=0.4, estimate=False)": T(max_density=0.4, estimate=False),
        "TemporalSparse(threshold=-4, max_density=0.4, refresh off, estimate=False)":
            T(threshold=-4.0, max_density=0.4, **fixed),
        "TemporalSparse(threshold=-6, max_density=0.3, refresh off, estimate=False)":
            T(threshold=-6.0, max_density=0.3, **fixed),
        "TemporalSparse(threshold=-3, max_density=0.4, warmup_steps=4, refresh off, estimate=False)":
            T(threshold=-3.0, max_density=0.4, warmup_steps=4, refresh_every=0, refresh_tol=None, estimate=False),
        "TemporalSparse(threshold=-4, max_density=0.35, refresh_every=4, refresh off by error, estimate=False)":
            T(threshold=-4.0, max_density=0.35, warmup_steps=2, refresh_every=4, refresh_tol=None, estimate=False),
    }
    if which == "sweep":
        return {**out, **sweep}
    raise ValueError(f"--configs: expected 'defaults' or 'sweep', got {which!r}")


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def fidelity(videos, dense, prompts, dense_scores, absolute: bool = False) -> dict:
    """PSNR / SSIM of each video against the dense video of its seed (mean and worst; 100 dB where they
    are equal) and the checker's change from dense in points; with ``absolute``, its accuracies too."""
    p = [min(psnr(a, b), 100.0) for a, b in zip(videos, dense)]
    s = [ssim(a, b) for a, b in zip(videos, dense)]
    scores = checker.score(videos, prompts)
    out = {"psnr": round(float(np.mean(p)), 2), "psnr_min": round(float(np.min(p)), 2),
           "ssim": round(float(np.mean(s)), 4), "ssim_min": round(float(np.min(s)), 4)}
    for k in ("color", "shape", "motion"):
        if absolute:
            out[k] = scores[k]
        out[f"{k}_change_pts"] = round(100 * (scores[k] - dense_scores[k]), 1)
    return out


def run(pipe, device, suite, batch, steps, methods) -> dict:
    prompts = [r["prompt"] for r in suite]
    size = dict(num_inference_steps=steps, **DEFAULT_SIZE)
    dense, dense_s = _timed(lambda: _generate(pipe, suite, device, batch, **size))
    dense_scores = checker.score(dense, prompts)
    rows = [{"config": "dense", "density": 1.0, "psnr": float("inf"), "psnr_min": float("inf"), "ssim": 1.0,
             "ssim_min": 1.0, "seconds": round(dense_s, 2),
             **{k: dense_scores[k] for k in ("color", "shape", "motion")}}]
    for name, method in methods.items():
        with dit_accel.apply(pipe, attention=method):
            _generate(pipe, suite[:batch], device, batch, **size)  # warm-up: kernel compilation
            method.reset_stats()
            videos, secs = _timed(lambda: _generate(pipe, suite, device, batch, **size))
        row = {"config": name, "method": method.to_dict(), "density": round(method.density(), 4),
               **fidelity(videos, dense, prompts, dense_scores, absolute=True), "seconds": round(secs, 2)}
        row["meets_bars"] = bool(row["psnr"] >= 28 and row["ssim"] >= 0.9 and row["density"] <= 0.40
                                 and all(abs(row[f"{k}_change_pts"]) <= 2 or row[f"{k}_change_pts"] > 0
                                         for k in ("color", "shape", "motion")))
        rows.append(row)
        print_table([row], ["config", "density", "psnr", "ssim", "color", "shape", "motion", "seconds"])
    return {"prompts": len(suite), "size": DEFAULT_SIZE, "steps": steps, "rows": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="ShapesPipeline directory (default: the shipped reference)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", default="sweep", help="'defaults' (the two default methods) or 'sweep'")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps (lower only for smoke tests)")
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    try:
        methods = configs(args.configs)
    except ValueError as e:
        ap.error(str(e))
    device = torch.device(args.device)
    pipe = load_reference(device=device, dtype=None, path=args.model)
    pipe.set_progress_bar_config(disable=True)
    result = run(pipe, device, held_out_suite(args.prompts), args.batch, args.steps, methods)
    print_table(result["rows"], ["config", "density", "psnr", "psnr_min", "ssim", "color", "shape", "motion",
                                 "seconds", "meets_bars"])
    payload = {"command": command_line("dit_accel.benchmarks.sparse_quality", argv),
               "model": args.model or "shipped reference", "dtype": str(pipe.transformer.dtype), **result}
    print(f"wrote {write_result('sparse-quality', payload, args.out)}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
