"""ShapesBench reference model: quality on the held-out suite, generation speed, attention structure.

    python -m dit_accel.benchmarks.reference                       # GPU: all three parts
    python -m dit_accel.benchmarks.reference --device cpu --parts speed   # CPU small-size timing
    python -m dit_accel.benchmarks.reference --plot RESULT.json     # redraw the attention plot

Quality: every held-out prompt at the default size, steps and CFG with its fixed seed, scored by
the classical checker (color / shape / motion accuracy) and VBench's temporal flickering.
Speed: one video, median of repeated runs after a warm-up (GPU: default size; CPU: the small
size). Attention: per-layer entropy, local-window mass and tile concentration of the video
self-attention at three denoising steps (``dit_accel.evals.attention``).
Writes ``benchmarks/results/reference-<device>-<date>.json`` (+ a sample grid and a plot).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from dit_accel.benchmarks.report import (
    RESULTS,
    command_line,
    device_tag,
    environment,
    median,
    print_table,
    write_result,
)
from dit_accel.evals import shapes as checker
from dit_accel.files import atomic_write
from dit_accel.evals.attention import AttentionProbe
from dit_accel.evals.metrics import temporal_flickering
from dit_accel.pipelines import load_reference
from dit_accel.pipelines.shapes.pipeline import (
    DEFAULT_GUIDANCE,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    SMALL_SIZE,
)
from dit_accel.pipelines.shapes.suite import held_out_suite, save_grid


def _generate(pipe, items, device, batch, **size):
    videos = []
    for i in range(0, len(items), batch):
        part = items[i : i + batch]
        gens = [torch.Generator(device).manual_seed(r["seed"]) for r in part]
        videos += list(pipe([r["prompt"] for r in part], generator=gens, **size).frames)
    return videos


def quality(pipe, device, n, batch, tag, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, out_dir=None,
            name="reference") -> dict:
    suite = held_out_suite(n)
    t0 = time.time()
    videos = _generate(pipe, suite, device, batch, num_inference_steps=steps, guidance_scale=guidance, **DEFAULT_SIZE)
    scores = checker.score(videos, [r["prompt"] for r in suite])
    flicker = [temporal_flickering(v) for v in videos]
    subsets = {}
    for subset, n_objects in (("one object", 1), ("two objects", 2)):
        part = [v for v, r in zip(scores["per_video"], suite) if len(r["spec"].objects) == n_objects]
        s = checker.summarize(part)
        subsets[subset] = {k: s[k] for k in ("color", "shape", "motion", "videos")}
    grid = Path(out_dir or RESULTS) / f"{name}-samples-{tag}.png"
    save_grid(grid, videos[:16])
    return {
        "prompts": n,
        "size": DEFAULT_SIZE,
        "steps": steps,
        "guidance_scale": guidance,
        "seconds": round(time.time() - t0, 1),
        "color": scores["color"],
        "shape": scores["shape"],
        "motion": scores["motion"],
        "spurious_objects": scores["spurious"],
        "temporal_flickering": float(np.mean(flicker)),
        "subsets": subsets,
        "sample_grid": grid.name,
        "per_video": scores["per_video"],
    }


def speed(pipe, device, repeats) -> dict:
    size = DEFAULT_SIZE if device.type == "cuda" else SMALL_SIZE
    prompt = "a red circle moving left and a yellow square staying still on a dark blue background"

    def once():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        pipe(prompt, generator=torch.Generator(device).manual_seed(0), **size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    once()  # warm-up
    times = [once() for _ in range(repeats)]
    return {"size": size, "steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE,
            "threads": torch.get_num_threads(), "seconds": times, "median_s": median(times)}


def attention(pipe, device, n, steps=(5, 10, 15), num_inference_steps=DEFAULT_STEPS) -> dict:
    from dit_accel import apply

    probe = AttentionProbe(steps=set(steps))
    with apply(pipe, attention=probe):
        _generate(pipe, held_out_suite(n), device, n, num_inference_steps=num_inference_steps, **DEFAULT_SIZE)
    layers = probe.summary()
    return {
        "prompts": n,
        "steps": list(steps),
        "window": probe.window,
        "tile": probe.tile,
        "top_fraction": probe.top_fraction,
        "layers": layers,
        "concentrated_layers": sum(r["concentrated"] for r in layers),
        "num_layers": len(layers),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["attention"]["layers"]
    x = np.arange(len(layers))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].bar(x, [r["entropy"] for r in layers], color="tab:blue")
    axes[0].axhline(1.0, ls="--", c="gray", label="uniform")
    axes[0].set(title="attention entropy / log(keys)", xlabel="layer", ylim=(0, 1.05))
    axes[0].legend()
    w = 0.4
    axes[1].bar(x - w / 2, [r["window_mass"] for r in layers], w, label="model")
    axes[1].bar(x + w / 2, [r["window_uniform"] for r in layers], w, label="uniform", color="gray")
    win = result["attention"]["window"]
    axes[1].set(title=f"mass in local window (+-{win[0]}t, +-{win[1]}h, +-{win[2]}w)", xlabel="layer", ylim=(0, 1))
    axes[1].legend()
    frac = result["attention"]["top_fraction"]
    axes[2].bar(x, [r["top_tile_mass"] for r in layers], color="tab:green")
    axes[2].axhline(frac, ls="--", c="gray", label="uniform")
    axes[2].axhline(0.5, ls=":", c="red", label="50% target")
    axes[2].set(title=f"mass in top {int(frac * 100)}% of {result['attention']['tile']}-token tiles", xlabel="layer",
                ylim=(0, 1))
    axes[2].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="ShapesPipeline directory (default: the shipped reference)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parts", default="quality,speed,attention")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attention-prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps (lower only for smoke tests)")
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG scale of the quality part")
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    ap.add_argument("--plot", default=None, help="only redraw the attention plot of this result JSON")
    args = ap.parse_args(argv)
    if args.plot:
        res = json.loads(Path(args.plot).read_text())
        out = Path(args.plot).with_suffix(".attention.png")
        plot(res, out)
        print(f"wrote {out}")
        return
    device = torch.device(args.device)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"quality", "speed", "attention"}
    if unknown:
        ap.error(f"--parts: unknown {sorted(unknown)}; choose from quality, speed, attention")
    pipe = load_reference(device=device, dtype=None, path=args.model)
    pipe.set_progress_bar_config(disable=True)
    tag = device_tag(environment()["device"])
    name = "reference" if parts != ["speed"] else "reference-speed"
    if (args.guidance, args.steps) != (DEFAULT_GUIDANCE, DEFAULT_STEPS):
        name = f"reference-cfg{args.guidance:g}-steps{args.steps}"
    payload: dict = {"command": command_line("dit_accel.benchmarks.reference", argv),
                     "dtype": str(pipe.transformer.dtype)}
    if "quality" in parts:
        payload["quality"] = quality(pipe, device, args.prompts, args.batch, tag, args.steps, args.guidance, args.out,
                                     name)
        q = payload["quality"]
        print_table([{"part": "held-out", **{k: q[k] for k in ("color", "shape", "motion", "temporal_flickering")}}]
                    + [{"part": k, **v} for k, v in q["subsets"].items()],
                    ["part", "color", "shape", "motion", "temporal_flickering"])
    if "speed" in parts:
        payload["speed"] = speed(pipe, device, args.repeats)
        print(f"one video {payload['speed']['size']}: median {payload['speed']['median_s']:.3f} s")
    if "attention" in parts:
        probe_steps = tuple(sorted({args.steps // 4, args.steps // 2, 3 * args.steps // 4}))
        payload["attention"] = attention(pipe, device, args.attention_prompts, probe_steps, args.steps)
        a = payload["attention"]
        print_table(a["layers"], ["layer", "entropy", "window_mass", "window_uniform", "top_tile_mass", "concentrated"])
        print(f"{a['concentrated_layers']}/{a['num_layers']} layers put >= 50% of mass in <= 25% of tiles")
    path = write_result(name, payload, args.out)
    print(f"wrote {path}")
    if "attention" in parts:
        try:
            plot(payload, path.with_suffix(".attention.png"))
        except ImportError:
            print("matplotlib not installed: redraw the plot with --plot", path)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
