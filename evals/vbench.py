"""Bridge to the real VBench: score a run's saved videos with the ``vbench`` package and merge the
scores into the run's report.

    dit-accel vbench runs/NAME [--dimensions subject_consistency,motion_smoothness,...]

VBench brings its own pinned dependencies and downloads its scoring networks on first use, so it
lives in a separate environment where its weights are already in place (see the README, "Evals").
There, install this package without dependencies (``pip install --no-deps -e .``) and run the
command: it exports every saved video (``videos/<config>/<index>-seed<seed>.npy``) to
``vbench/videos/<config>/``, runs ``VBench.evaluate(..., mode="custom_input")`` once per config
(a config whose result file exists is not scored again), and writes ``vbench.jsonl``: one row per
(config, prompt, seed) with a score per dimension. ``dit-accel report`` then adds a "VBench <dim>"
column per dimension. Only VBench's custom-input dimensions apply to arbitrary prompts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..files import atomic_write
from .runner import RESULTS, load_video, read_rows

logger = logging.getLogger("dit_accel.evals")

# VBench's dimensions that accept custom prompts (mode="custom_input")
CUSTOM_DIMENSIONS = ("subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
                     "aesthetic_quality", "imaging_quality", "temporal_flickering")
DEFAULT_DIMENSIONS = ("subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
                      "temporal_flickering")


def _vbench():
    try:
        import vbench
    except ImportError as exc:
        raise RuntimeError(
            "dit-accel vbench: the vbench package is not importable here. VBench pins its own dependencies and "
            "needs its scoring networks on disk, so run this in a separate environment: `pip install vbench`, "
            "put its weights in place (~/.cache/vbench), `pip install --no-deps -e <dit-accel checkout>`, then "
            "rerun this command there") from exc
    return vbench


def export_video(frames, path: Path, fps: int = 8) -> None:
    """Write float ``[F, H, W, 3]`` frames in [0, 1] as a video file (format from the suffix:
    .mp4 needs imageio's ffmpeg or pyav plugin, .gif only Pillow); atomic."""
    import io

    import imageio.v3 as iio
    import numpy as np

    data = np.round(np.asarray(frames) * 255).astype(np.uint8)
    buf = io.BytesIO()
    try:
        if path.suffix == ".gif":
            iio.imwrite(buf, data, extension=".gif", duration=1000 / fps, loop=0)
        else:
            iio.imwrite(buf, data, extension=path.suffix, fps=fps)
    except Exception as exc:  # plugin missing: name what to install
        raise RuntimeError(f"{path}: cannot write {path.suffix} videos here ({type(exc).__name__}: {exc}); install "
                           "imageio-ffmpeg (or av) for .mp4, or pass --format gif") from exc
    atomic_write(path, buf.getvalue())


def run_vbench(run_dir: str | Path, dimensions=DEFAULT_DIMENSIONS, device: str | None = None,
               video_format: str = "mp4", full_info: str | None = None) -> Path:
    """Score the run's videos with VBench and write ``vbench.jsonl``; returns its path."""
    run_dir = Path(run_dir)
    rows = read_rows(run_dir / RESULTS)
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no {RESULTS} rows; run `dit-accel eval ... --out {run_dir}` first")
    bad = [d for d in dimensions if d not in CUSTOM_DIMENSIONS]
    if bad:
        raise ValueError(f"--dimensions: {bad} do not take custom prompts in VBench; choose from "
                         f"{', '.join(CUSTOM_DIMENSIONS)}")
    if video_format not in ("mp4", "gif"):
        raise ValueError(f"--format: expected mp4 or gif, got {video_format!r}")
    vbench = _vbench()
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full_info = full_info or str(Path(vbench.__file__).parent / "VBench_full_info.json")
    out_root = run_dir / "vbench"
    scores: dict[tuple, dict] = {}
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        video_dir = out_root / "videos" / config
        prompts = {}
        for r in mine:
            target = video_dir / f"{Path(r['video']).stem}.{video_format}"
            if not target.exists():
                export_video(load_video(run_dir / r["video"]), target)
            prompts[str(target)] = r["prompt"]
        result_file = out_root / "results" / f"{config}_eval_results.json"
        if not result_file.exists():
            logger.info("vbench: scoring %d videos of %s on %s", len(mine), config, ", ".join(dimensions))
            result_file.parent.mkdir(parents=True, exist_ok=True)
            bench = vbench.VBench(device, full_info, str(result_file.parent))
            bench.evaluate(videos_path=str(video_dir), name=config, prompt_list=prompts,
                           dimension_list=list(dimensions), local=True, read_frame=False, mode="custom_input")
        results = json.loads(result_file.read_text())
        by_stem = {Path(r["video"]).stem: r for r in mine}
        for dim in dimensions:
            for item in results.get(dim, [None, []])[1]:  # VBench: {dim: [mean, [{video_path, video_results}]]}
                r = by_stem.get(Path(item["video_path"]).stem)
                if r is not None:
                    scores.setdefault((config, r["index"], r["seed"]), {})[dim] = float(item["video_results"])
    out = run_dir / "vbench.jsonl"
    atomic_write(out, "".join(json.dumps({"config": c, "index": i, "seed": s, **v}) + "\n"
                               for (c, i, s), v in scores.items()))
    return out


__all__ = ["CUSTOM_DIMENSIONS", "DEFAULT_DIMENSIONS", "export_video", "run_vbench"]
