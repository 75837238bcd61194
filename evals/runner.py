"""The eval runner: every configuration on the same prompts and seeds, resumable, shardable.

    dit-accel eval --pipeline reference --suite shapes-heldout:8 --configs configs.yaml --out runs/NAME

Layout of ``runs/NAME``:

- ``run.json``: the validated configs, pipeline, suite and environment (a rerun with other
  configs into the same folder is refused);
- ``videos/<config>/<index>-seed<seed>.npy``: every generation as uint8 ``[F, H, W, 3]``;
- ``results.jsonl``: one row per (config, prompt, seed): latency, per-step time, peak memory,
  attention density, PSNR / SSIM against the baseline video of the same prompt and seed, the
  VBench-style dimensions and, on the ShapesBench suite, the checker's verdicts.

Every file is written atomically (temporary file, then rename), and rows already in
``results.jsonl`` are skipped on a rerun, so a killed run resumes where it stopped. Under
``accelerate launch`` each process takes every N-th prompt (all configs of a prompt on one process,
baseline first), writes ``results.rank<R>.jsonl``, and the main process merges them in the
single-process order.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write
from . import metrics
from .config import ConfigError, RunSpec
from .lpips import load_lpips
from .suites import is_shapes_suite, load_suite

logger = logging.getLogger("dit_accel.evals")

RESULTS = "results.jsonl"


def _write_rows(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _save_video(path: Path, frames: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.round(frames * 255).astype(np.uint8))
    atomic_write(path, buf.getvalue())


def load_video(path: Path) -> np.ndarray:
    """A saved generation as float32 ``[F, H, W, 3]`` in [0, 1]."""
    return np.load(path).astype(np.float32) / 255.0


def load_pipeline(spec: str, device=None, dtype=None):
    """``reference`` (the embedded ShapesBench model) or a local diffusers pipeline directory."""
    from ..pipelines import load_reference

    if spec == "reference":
        return load_reference(device=device, dtype=dtype)
    path = Path(spec)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"--pipeline {spec}: expected 'reference' or a local diffusers pipeline directory "
                         "(with model_index.json); nothing is downloaded")
    if json.loads((path / "model_index.json").read_text()).get("_class_name") == "ShapesPipeline":
        return load_reference(device=device, dtype=dtype, path=path)
    from diffusers import DiffusionPipeline

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    return pipe.to(device)


def _environment() -> dict:
    from ..benchmarks.report import environment

    return environment()


def _shard() -> tuple[int, int]:
    """(rank, world size) under ``accelerate launch`` / torchrun, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    state = _state()
    return state.process_index, state.num_processes


def _state():
    """accelerate's process state; on a machine without CUDA it joins the processes over gloo
    (accelerate's default would leave each CPU process on its own)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def process_device(device=None):
    """``device``, or under ``accelerate launch`` with none given, this process's own device (every
    process on ``cuda`` would put all of them on the first GPU)."""
    if device is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _state().device
    return device


def _barrier(world: int) -> None:
    if world > 1:
        _state().wait_for_everyone()


def _generate(pipe, prompt: str, seed: int, spec: RunSpec, device) -> tuple[np.ndarray, dict]:
    """One generation: frames [F, H, W, 3] in [0, 1] and its timings."""
    stamps: list[float] = []

    def on_step(_pipe, _step, _t, kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
        return kwargs

    kwargs = dict(spec.size)
    if spec.steps is not None:
        kwargs["num_inference_steps"] = spec.steps
    if spec.guidance_scale is not None:
        kwargs["guidance_scale"] = spec.guidance_scale
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    t0 = time.perf_counter()
    out = pipe(prompt=prompt, generator=gen, output_type="np", callback_on_step_end=on_step, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    latency = time.perf_counter() - t0
    frames = out.frames[0] if hasattr(out, "frames") else np.asarray(out.images)
    steps = np.diff([t0, *stamps])
    timing = {
        "latency_s": round(latency, 4),
        "step_s": round(float(np.median(steps)), 4) if len(steps) else None,
        "steps": len(stamps),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
    }
    return metrics.to_frames(frames), timing


def quality_dimensions(frames: np.ndarray, prompt: str = "", shapes_suite: bool = False,
                       extractors: dict | None = None) -> dict:
    """The VBench-style dimensions of one video (``[F, H, W, 3]`` in [0, 1]) as an eval row holds
    them, plus the ShapesBench checker's verdict when ``shapes_suite``. ``extractors``: the subject
    and background feature extractors (default: the classical features for both)."""
    if extractors is None:
        from .features import classical_features

        extractors = {"subject": classical_features, "background": classical_features}
    dd = metrics.dynamic_degree(frames)
    # subject and background consistency differ only in their feature extractor; with the same one
    # (the classical default) they are one computation
    subject = round(metrics.feature_consistency(frames, extractors["subject"]), 5)
    background = (subject if extractors["background"] is extractors["subject"]
                  else round(metrics.feature_consistency(frames, extractors["background"]), 5))
    row = {
        "temporal_flickering": round(metrics.temporal_flickering(frames), 5),
        "motion_smoothness": round(metrics.motion_smoothness(frames), 5),
        "dynamic_degree": dd["dynamic"],
        "flow_magnitude": round(dd["magnitude"], 4),
        "subject_consistency": subject,
        "background_consistency": background,
    }
    if shapes_suite:
        from . import shapes as checker

        verdict = checker.score_video(frames, prompt)
        summary = checker.summarize([verdict])
        row["checker"] = {k: summary[k] for k in ("color", "shape", "motion")}
        row["checker"].update(objects=verdict["objects"], spurious=verdict["spurious"])
    return row


def run_eval(pipeline: str, suite: str, spec: RunSpec, out: str | Path, device=None, dtype=None,
             progress: bool = True, pipe=None, subject_features: str = "classical",
             background_features: str = "classical") -> Path:
    """Run (or resume) an eval into ``out``; returns the path of the merged ``results.jsonl``.

    ``pipe`` may be passed to reuse a loaded pipeline (it must be what ``pipeline`` names).
    ``subject_features`` / ``background_features``: the per-frame feature extractors of the two
    consistency dimensions (``classical``, ``dino:PATH``, ``clip:PATH``; see
    :mod:`dit_accel.evals.features`; VBench uses DINO and CLIP respectively).
    """
    import dit_accel

    from .features import check_spec, feature_extractor

    out = Path(out)
    items = load_suite(suite, spec.seeds)  # validates the suite before anything is loaded
    shapes_suite = is_shapes_suite(suite)
    rank, world = _shard()
    check_spec(subject_features)  # bad specs fail before anything is loaded; checkpoints load below, if needed
    check_spec(background_features)
    header = json.loads(json.dumps({"pipeline": pipeline, "suite": suite, "spec": spec.to_dict(),
                                    "features": {"subject": subject_features, "background": background_features}}))
    run_json = out / "run.json"
    if run_json.exists():
        old = json.loads(run_json.read_text())
        if {k: old.get(k) for k in header} != header:
            raise ConfigError(f"--out {out}: this folder holds a run with other settings (pipeline, suite or configs); "
                             "use a new --out folder to keep both")
    lpips_score, lpips_note = load_lpips()
    if not run_json.exists() and rank == 0:
        atomic_write(run_json, json.dumps({**header, "environment": _environment(), "lpips": lpips_note},
                                          indent=1))
    _barrier(world)

    mine = [it for it in items if it["index"] % world == rank]
    shard_path = out / (RESULTS if world == 1 else f"results.rank{rank}.jsonl")
    rows = read_rows(shard_path) if world > 1 else read_rows(out / RESULTS)
    if world > 1:  # rows of an earlier single-process run of the same items count as done too
        rows += [r for r in read_rows(out / RESULTS) if r["index"] % world == rank and r not in rows]
    done = {(r["config"], r["index"], r["seed"]) for r in rows}
    todo = [(cfg, it) for cfg in spec.configs for it in mine if (cfg.name, it["index"], it["seed"]) not in done]
    if done:
        logger.info("%s: %d rows done, %d to go", out, len(done), len(todo))
    if todo:
        subject = feature_extractor(subject_features)
        extractors = {"subject": subject, "background": subject if background_features == subject_features
                      else feature_extractor(background_features)}
        if pipe is None:
            pipe = load_pipeline(pipeline, device=process_device(device), dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        dev = torch.device(pipe._execution_device if hasattr(pipe, "_execution_device") else pipe.device)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"eval {out.name}" + (f" [{rank}/{world}]" if world > 1 else ""),
                   disable=not progress)
        for cfg, it in todo:
            method = cfg.method()
            handle = dit_accel.apply(pipe, attention=method) if method is not None else None
            try:
                if method is not None and hasattr(method, "reset_stats"):
                    method.reset_stats()
                frames, timing = _generate(pipe, it["prompt"], it["seed"], spec, dev)
                frames = np.round(frames * 255) / 255  # every metric sees what is saved
                density = method.density() if method is not None and hasattr(method, "density") else None
            finally:
                if handle is not None:
                    handle.remove()
            video = Path("videos") / cfg.name / f"{it['index']:04d}-seed{it['seed']}.npy"
            _save_video(out / video, frames)
            row = {"config": cfg.name, "index": it["index"], "seed": it["seed"], "prompt": it["prompt"],
                   "video": str(video), **timing, "density": None if density is None else round(density, 5)}
            base = out / "videos" / spec.baseline.name / video.name
            if cfg.name != spec.baseline.name:
                ref = load_video(base)
                row["psnr"] = round(min(metrics.psnr(frames, ref), 99.0), 3)
                row["ssim"] = round(metrics.ssim(frames, ref), 5) if min(frames.shape[1:3]) >= 11 else None
                if lpips_score is not None:
                    row["lpips"] = round(lpips_score(frames, ref), 5)
            row.update(quality_dimensions(frames, it["prompt"], shapes_suite, extractors))
            rows.append(row)
            _write_rows(shard_path, rows)
            bar.update(1)
        bar.close()
    _barrier(world)
    merged = out / RESULTS
    if world > 1 and rank == 0:
        order = {c.name: i for i, c in enumerate(spec.configs)}
        everything = {(r["config"], r["index"], r["seed"]): r for r in read_rows(merged)}
        for r_ in range(world):
            for r in read_rows(out / f"results.rank{r_}.jsonl"):
                everything[(r["config"], r["index"], r["seed"])] = r
        _write_rows(merged, sorted(everything.values(), key=lambda r: (order.get(r["config"], 1 << 30), r["index"],
                                                                      r["seed"])))
    _barrier(world)
    return merged


__all__ = ["RESULTS", "load_pipeline", "load_video", "read_rows", "run_eval"]
