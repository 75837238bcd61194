"""Reports of an eval run: a markdown and a CSV table in the layout acceleration papers use, and a
speed-quality Pareto plot.

    dit-accel report runs/NAME          # writes runs/NAME/report.md, report.csv, pareto.png

One row per configuration, the baseline first: median latency per generation and per step, speedup
(baseline median latency / the config's), measured attention density, fidelity against the
baseline video of the same prompt and seed (PSNR, SSIM, LPIPS when computed), the VBench-style
dimensions, the ShapesBench checker's accuracy, and the real VBench's scores when
``dit-accel vbench`` has merged them (``vbench.jsonl``). Means are over the prompts and seeds the
config has rows for; a config with fewer rows than the baseline is flagged as partial. Medians of
timings keep one-time kernel compilation out of the figures.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from ..files import atomic_write
from .runner import RESULTS, read_rows

VBENCH = "vbench.jsonl"
DIMENSIONS = ("temporal_flickering", "motion_smoothness", "dynamic_degree", "subject_consistency",
              "background_consistency")
# (column key, header, decimals, direction for the reader)
COLUMNS = [
    ("config", "Method", None, ""),
    ("latency_s", "Latency (s)", 3, "↓"),
    ("step_s", "Step (s)", 4, "↓"),
    ("speedup", "Speedup", 2, "↑"),
    ("density", "Density", 3, ""),
    ("psnr", "PSNR", 2, "↑"),
    ("ssim", "SSIM", 4, "↑"),
    ("lpips", "LPIPS", 4, "↓"),
    ("temporal_flickering", "Flicker", 4, "↑"),
    ("motion_smoothness", "Smooth", 4, "↑"),
    ("dynamic_degree", "Dynamic", 3, ""),
    ("subject_consistency", "Subject", 4, "↑"),
    ("background_consistency", "Background", 4, "↑"),
    ("checker_color", "Color", 3, "↑"),
    ("checker_shape", "Shape", 3, "↑"),
    ("checker_motion", "Motion", 3, "↑"),
]


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def _median(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def summarize(run_dir: str | Path) -> tuple[list[dict], list[str]]:
    """Per-config aggregates of a run (baseline first, then the configs' order) and the VBench
    dimension columns present. Raises ``FileNotFoundError`` naming what is missing."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file() or not (run_dir / RESULTS).is_file():
        raise FileNotFoundError(f"{run_dir}: not an eval run folder (needs run.json and {RESULTS}; "
                                "create one with `dit-accel eval ... --out` first)")
    header = json.loads((run_dir / "run.json").read_text())
    order = [c["name"] for c in header["spec"]["configs"]]
    baseline = order[0]
    rows = read_rows(run_dir / RESULTS)
    vbench = read_rows(run_dir / VBENCH)
    vb_dims = sorted({k for r in vbench for k in r if k not in ("config", "index", "seed")})
    vb_by = {}
    for r in vbench:
        vb_by.setdefault(r["config"], []).append(r)
    by = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    base_latency = _median(r["latency_s"] for r in by.get(baseline, []))
    n_base = len(by.get(baseline, []))
    out = []
    for name in order:
        rs = by.get(name, [])
        if not rs:
            continue
        latency = _median(r["latency_s"] for r in rs)
        row = {"config": name, "rows": len(rs), "partial": len(rs) < n_base,
               "latency_s": latency, "step_s": _median(r.get("step_s") for r in rs),
               "speedup": base_latency / latency if base_latency and latency else None,
               "density": _mean(r.get("density") for r in rs),
               "peak_memory_mb": _median(r.get("peak_memory_mb") for r in rs)}
        if name == baseline:
            if row["density"] is None:  # the stock pipeline computes every pair
                row["density"] = 1.0
        else:
            row.update(psnr=_mean(r.get("psnr") for r in rs), ssim=_mean(r.get("ssim") for r in rs),
                       lpips=_mean(r.get("lpips") for r in rs))
        for dim in DIMENSIONS:
            row[dim] = _mean(r.get(dim) for r in rs)
        for k in ("color", "shape", "motion"):
            row[f"checker_{k}"] = _mean(r["checker"][k] for r in rs if r.get("checker"))
        for dim in vb_dims:
            row[f"vbench_{dim}"] = _mean(r.get(dim) for r in vb_by.get(name, []))
        out.append(row)
    return out, vb_dims


def _columns(summary: list[dict], vb_dims: list[str]) -> list[tuple]:
    cols = [c for c in COLUMNS if c[0] in ("config", "speedup", "latency_s")
            or any(r.get(c[0]) is not None for r in summary)]
    return cols + [(f"vbench_{d}", f"VBench {d.replace('_', ' ')}", 4, "↑") for d in vb_dims]


def _fmt(value, decimals) -> str:
    if value is None:
        return "–"
    if decimals is None:
        return str(value)
    return f"{value:.{decimals}f}"


def markdown(summary: list[dict], vb_dims: list[str], title: str = "") -> str:
    cols = _columns(summary, vb_dims)
    head = "| " + " | ".join(f"{h} {d}".strip() for _, h, _, d in cols) + " |"
    lines = [f"## {title}", ""] if title else []
    lines += [head, "|" + "---|" * len(cols)]
    for r in summary:
        cells = [_fmt(r.get(k), dec) for k, _, dec, _ in cols]
        if r["partial"]:
            cells[0] += f" (partial: {r['rows']} rows)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(summary: list[dict], vb_dims: list[str]) -> str:
    cols = _columns(summary, vb_dims)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([k for k, *_ in cols] + ["rows", "peak_memory_mb"])
    for r in summary:
        w.writerow([("" if r.get(k) is None else r.get(k)) for k, *_ in cols] + [r["rows"], r.get("peak_memory_mb")])
    return buf.getvalue()


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better on both), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto_png(summary: list[dict], quality: str = "psnr") -> bytes:
    """Speedup (x) against fidelity to the baseline (y) for every non-baseline config; the Pareto
    front is drawn as a line. PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["speedup"], r[quality], r["config"]) for r in summary[1:]
           if r.get("speedup") is not None and r.get(quality) is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    if pts:
        xs, ys, names = zip(*pts)
        front = pareto_front(list(zip(xs, ys)))
        ax.scatter(xs, ys, s=28, color="#4c72b0", zorder=3)
        ax.plot([xs[i] for i in front], [ys[i] for i in front], color="#dd8452", lw=1.5, zorder=2,
                label="Pareto front")
        for x, y, n in pts:
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.legend(loc="lower left", fontsize=8)
    ax.axvline(1.0, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel(f"speedup over {summary[0]['config']} (median latency)")
    ax.set_ylabel({"psnr": "PSNR vs baseline (dB)", "ssim": "SSIM vs baseline"}.get(quality, quality))
    ax.set_title("speed vs fidelity", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(run_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and (``plot``) ``pareto.png`` into the run folder (atomic
    writes); returns their paths."""
    run_dir = Path(run_dir)
    summary, vb_dims = summarize(run_dir)
    header = json.loads((run_dir / "run.json").read_text())
    title = f"{run_dir.name}: {header['pipeline']} on {header['suite']}"
    md = markdown(summary, vb_dims, title)
    notes = ["", f"Rows: {sum(r['rows'] for r in summary)} (config x prompt x seed) from `{RESULTS}`. Latency and "
             "step time are medians; speedup = baseline median latency / the config's. PSNR / SSIM / LPIPS "
             "compare each video with the baseline video of the same prompt and seed."]
    env = header.get("environment", {})
    if env:
        notes.append(f"Environment: {env.get('device')}, torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
                     f"commit {str(env.get('commit'))[:12]}.")
    if "lpips" in header and isinstance(header["lpips"], str):
        notes.append(f"LPIPS: {header['lpips']}.")
    paths = {"markdown": run_dir / "report.md", "csv": run_dir / "report.csv"}
    atomic_write(paths["markdown"], md + "\n".join(notes) + "\n")
    atomic_write(paths["csv"], to_csv(summary, vb_dims))
    if plot:
        paths["pareto"] = run_dir / "pareto.png"
        atomic_write(paths["pareto"], pareto_png(summary))
    return paths


__all__ = ["markdown", "pareto_front", "pareto_png", "summarize", "to_csv", "write_report"]
