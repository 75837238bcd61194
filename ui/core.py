"""What the UI does, without Gradio: one loaded pipeline reused by every request, compare runs with
their metrics and a session history, head-guidance runs and presets, HeadHunter searches and evals.

Every entry point validates its input first and raises :class:`UIError` (a ``ValueError``) with a
message naming the field; the app shows it and the server keeps running.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ..evals import metrics
from ..evals.config import ConfigError, check_attention
from ..files import atomic_write

METHOD_NAMES = ("Dense", "Neighborhood", "TemporalSparse")
HISTORY_COLUMNS = ["run", "prompt", "seed", "method", "parameters", "guidance", "steps", "size", "baseline_s",
                   "accelerated_s", "speedup", "density", "computed_blocks", "psnr", "ssim", "checker_baseline",
                   "checker_accelerated"]
MAX_SIDE, MAX_FRAMES, MAX_STEPS = 256, 65, 100


class UIError(ValueError):
    """Bad input from the UI; the message names the field and what it must be."""


class Stopped(RuntimeError):
    """The run was stopped (:meth:`Studio.cancel`, the Stop buttons) at a denoiser call. Nothing of a
    stopped compare or guided run is kept; a head search keeps its score cache and an eval run its
    finished items, so running them again resumes."""


def method_defaults(name: str) -> str:
    """The parameters of an attention method with their defaults, as the JSON the form starts from."""
    import dataclasses

    from ..methods import METHODS

    if name not in METHODS:
        raise UIError(f"method: unknown method {name!r}; choose from {sorted(METHODS)}")
    out = {}
    for f in dataclasses.fields(METHODS[name]):
        if not f.init or f.name.startswith("_"):
            continue
        value = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return json.dumps(out)


def _int(value, name: str, lo: int, hi: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UIError(f"{name}: expected a whole number, got {value!r}") from None
    if not number.is_integer() or not lo <= number <= hi:
        raise UIError(f"{name}: must be a whole number from {lo} to {hi}, got {value!r}")
    return int(number)


def _float(value, name: str, lo: float, hi: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UIError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(number) or not lo <= number <= hi:
        raise UIError(f"{name}: must be a number from {lo} to {hi}, got {value!r}")
    return number


def parse_heads(heads) -> dict[int, list[int]]:
    """``["0.1", "5.3"]`` or ``"0.1, 5.3"`` -> ``{0: [1], 5: [3]}``."""
    items = [h.strip() for h in (heads.split(",") if isinstance(heads, str) else heads or []) if str(h).strip()]
    out: dict[int, list[int]] = {}
    for item in items:
        layer, dot, head = str(item).partition(".")
        if not dot or not layer.isdigit() or not head.isdigit():
            raise UIError(f"heads: {item!r} is not LAYER.HEAD (for example 0.1)")
        out.setdefault(int(layer), []).append(int(head))
    return out


def to_gif(frames: np.ndarray, path: Path, min_side: int = 192) -> Path:
    """Frames [F, H, W, 3] in [0, 1] as an animated GIF, enlarged (nearest) to at least ``min_side``."""
    from PIL import Image

    frames = np.asarray(frames)
    scale = max(1, math.ceil(min_side / min(frames.shape[1:3])))
    images = [Image.fromarray(np.round(np.clip(f, 0, 1) * 255).astype(np.uint8)).resize(
        (f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=120, loop=0)
    atomic_write(path, buf.getvalue())
    return path


class Studio:
    """The UI's state: the pipeline (loaded once, on first use), a lock so one generation runs at a
    time, the session's compare history, and a work folder for outputs."""

    def __init__(self, pipeline: str = "reference", device=None, pipe=None, workdir=None, runs_dir="runs") -> None:
        self.pipeline = pipeline
        self.device = device
        self._pipe = pipe
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._state = threading.Lock()  # guards _kind and _stop together
        self._kind: str | None = None  # the kind of run holding the lock
        self._watched: set[int] = set()
        self.history: list[dict] = []
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="dit-accel-ui-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.runs_dir = Path(runs_dir)
        self._count = 0

    @property
    def pipe(self):
        if self._pipe is None:
            from ..evals.runner import load_pipeline

            self._pipe = load_pipeline(self.pipeline, device=self.device)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def cancel(self, kind: str | None = None) -> bool:
        """Stop the running run (``kind`` given: only a run of that kind, "compare", "guided",
        "headhunt" or "eval") at its next denoiser call; that call raises :class:`Stopped`. What the
        Stop buttons do. False when no such run is running."""
        with self._state:
            if self._kind is None or kind not in (None, self._kind):
                return False
            self._stop.set()
            return True

    @contextlib.contextmanager
    def _running(self, kind: str):
        """Hold the lock for one run (one at a time), with the stop check on the pipeline's denoiser."""
        with self.lock:
            with self._state:
                self._kind = kind
                self._stop.clear()
            pipe = self.pipe
            denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
            if isinstance(denoiser, torch.nn.Module) and id(denoiser) not in self._watched:
                denoiser.register_forward_pre_hook(self._check_stop)
                self._watched.add(id(denoiser))
            try:
                yield
            finally:
                with self._state:
                    self._kind = None
                    self._stop.clear()

    def _check_stop(self, module, args) -> None:
        if self._stop.is_set():
            raise Stopped("stopped: the run was cancelled")

    def layers(self) -> dict[int, int]:
        from ..headhunt import perturbable_heads

        return perturbable_heads(self.pipe)

    def _next(self, kind: str) -> Path:
        self._count += 1
        folder = self.workdir / f"{self._count:04d}-{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # ----------------------------------------------------------------------------------------
    def _size(self, steps, num_frames, height, width, guidance_scale) -> dict:
        return {"num_inference_steps": _int(steps, "steps", 1, MAX_STEPS),
                "num_frames": _int(num_frames, "frames", 1, MAX_FRAMES),
                "height": _int(height, "height", 8, MAX_SIDE), "width": _int(width, "width", 8, MAX_SIDE),
                "guidance_scale": _float(guidance_scale, "CFG", 0.0, 30.0)}

    def _generate(self, prompt, negative, seed, kwargs, method=None, guidance=None):
        import dit_accel

        pipe = self.pipe
        handle = dit_accel.apply(pipe, attention=method, guidance=guidance) if (method or guidance) else None
        try:
            device = torch.device(getattr(pipe, "_execution_device", "cpu"))
            gen = torch.Generator(device=device).manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            try:
                out = pipe(prompt=prompt, negative_prompt=negative or None, generator=gen, output_type="np", **kwargs)
            except ValueError as exc:  # the pipeline's own input checks (sizes it cannot take, ...)
                raise UIError(str(exc)) from None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
        finally:
            if handle is not None:
                handle.remove()
        frames = out.frames[0] if hasattr(out, "frames") else np.asarray(out.images)[0]
        return np.round(metrics.to_frames(np.asarray(frames)) * 255) / 255, seconds

    def _checker(self, frames, prompt):
        """The ShapesBench checker's score: for the ShapesBench model and a prompt it parses, else None
        (it knows nothing of other models' videos)."""
        from ..pipelines.shapes.data import parse_prompt
        from ..pipelines.shapes.pipeline import ShapesPipeline

        if not isinstance(self.pipe, ShapesPipeline) or not parse_prompt(prompt):
            return None
        from ..evals.objectives import checker_scores

        return round(checker_scores([frames], [prompt])[0], 4)

    def compare(self, prompt, negative_prompt="", seed=0, steps=8, num_frames=9, height=32, width=32,
                guidance_scale=4.0, method="Neighborhood", parameters="{}", heads="", strength=1.0,
                scale=3.0) -> dict:
        """Baseline and accelerated generation on the same seed, with timings and metrics."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise UIError("prompt: must not be empty")
        seed = _int(seed, "seed", 0, 2**31 - 1)
        kwargs = self._size(steps, num_frames, height, width, guidance_scale)
        try:
            params = json.loads(parameters or "{}")
        except json.JSONDecodeError as exc:
            raise UIError(f"parameters: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(params, dict):
            raise UIError("parameters: expected a JSON object such as {\"window\": [0.5, 0.5, 0.5]}")
        try:
            attention = check_attention({"method": method, **params}, "parameters")
        except ConfigError as exc:
            raise UIError(str(exc)) from None
        from ..methods import METHODS

        guidance = None
        chosen = parse_heads(heads)
        if chosen:
            from ..guidance import SoftPAG

            guidance = SoftPAG(heads=chosen, strength=_float(strength, "u", 0.0, 1.0),
                               scale=_float(scale, "s", 0.0, 20.0))
        with self._running("compare"):
            base, t_base = self._generate(prompt, negative_prompt, seed, kwargs)
            impl = METHODS[attention["method"]](**{k: v for k, v in attention.items() if k != "method"})
            try:
                accel, t_accel = self._generate(prompt, negative_prompt, seed, kwargs, impl, guidance)
            except ValueError as exc:  # a guidance head the model does not have, ...
                raise UIError(str(exc)) from None
            density = impl.density() if hasattr(impl, "density") else None
            folder = self._next("compare")
            quality = self._quality(accel)
            row = {
                "run": len(self.history) + 1, "prompt": prompt, "seed": seed, "method": method,
                "parameters": json.dumps(params), "guidance": ", ".join(f"{k}.{h}" for k, v in chosen.items()
                                                                      for h in v) or "",
                "steps": kwargs["num_inference_steps"],
                "size": f"{kwargs['num_frames']}x{kwargs['height']}x{kwargs['width']}",
                "baseline_s": round(t_base, 3), "accelerated_s": round(t_accel, 3),
                "speedup": round(t_base / t_accel, 3), "density": None if density is None else round(density, 4),
                "computed_blocks": None,  # no caching schedule exists yet: every block is computed
                "psnr": round(min(metrics.psnr(accel, base), 99.0), 2),
                "ssim": round(metrics.ssim(accel, base), 4) if min(base.shape[1:3]) >= 11 else None,
                "checker_baseline": self._checker(base, prompt), "checker_accelerated": self._checker(accel, prompt),
                **{f"vbench_{k}": v for k, v in quality.items()},
            }
            self.history.append(row)
        diff = np.clip(np.abs(accel - base) * 4, 0, 1)
        return {"baseline": to_gif(base, folder / "baseline.gif"),
                "accelerated": to_gif(accel, folder / "accelerated.gif"),
                "difference": to_gif(diff, folder / "difference.gif"), "row": row}

    @staticmethod
    def _quality(frames) -> dict:
        """The eval runner's VBench-style dimensions (a video's; an image has none)."""
        from ..evals.runner import quality_dimensions

        return quality_dimensions(frames) if len(frames) > 1 else {}

    def export(self, kind: str) -> Path:
        """The history as CSV or JSON (atomically written); returns the path."""
        if kind not in ("csv", "json"):
            raise UIError(f"export: {kind!r} is not csv or json")
        path = self.workdir / f"history.{kind}"
        if kind == "json":
            atomic_write(path, json.dumps(self.history, indent=1) + "\n")
        else:
            buf = io.StringIO()
            columns = HISTORY_COLUMNS + sorted({k for r in self.history for k in r} - set(HISTORY_COLUMNS))
            writer = csv.DictWriter(buf, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
            atomic_write(path, buf.getvalue())
        return path

    # ----------------------------------------------------------------------------------------
    def guided(self, prompt, seed=0, steps=8, num_frames=9, height=32, width=32, guidance_scale=4.0, heads=(),
               strength=1.0, scale=3.0) -> dict:
        """The same seed without and with SoftPAG on the chosen heads."""
        from ..guidance import SoftPAG

        if not isinstance(prompt, str) or not prompt.strip():
            raise UIError("prompt: must not be empty")
        chosen = parse_heads(heads)
        if not chosen:
            raise UIError("heads: select at least one head in the grid")
        seed = _int(seed, "seed", 0, 2**31 - 1)
        kwargs = self._size(steps, num_frames, height, width, guidance_scale)
        pag = SoftPAG(heads=chosen, strength=_float(strength, "u", 0.0, 1.0), scale=_float(scale, "s", 0.0, 20.0))
        with self._running("guided"):
            plain, _ = self._generate(prompt, "", seed, kwargs)
            try:
                guided, _ = self._generate(prompt, "", seed, kwargs, guidance=pag)
            except ValueError as exc:
                raise UIError(str(exc)) from None
            folder = self._next("guided")
        return {"unguided": to_gif(plain, folder / "unguided.gif"), "guided": to_gif(guided, folder / "guided.gif"),
                "max_abs_diff": float(np.abs(guided - plain).max()), "psnr": round(min(metrics.psnr(guided, plain),
                                                                                      99.0), 2),
                "checker_unguided": self._checker(plain, prompt), "checker_guided": self._checker(guided, prompt)}

    @staticmethod
    def save_preset(path, heads, strength, scale, effect_map=None) -> Path:
        chosen = parse_heads(heads)
        if not chosen:
            raise UIError("heads: select at least one head before saving a preset")
        if not str(path).strip() or not str(path).endswith(".json"):
            raise UIError(f"preset path: expected a .json file, got {path!r}")
        data = {"guidance": "SoftPAG", "heads": {str(k): v for k, v in chosen.items()},
                "strength": _float(strength, "u", 0.0, 1.0), "scale": _float(scale, "s", 0.0, 20.0), "rows": "image"}
        if effect_map:
            data["effect_map"] = effect_map
        path = Path(path)
        atomic_write(path, json.dumps(data, indent=1) + "\n")
        return path

    @staticmethod
    def load_preset(path) -> dict:
        from ..guidance import read_preset

        try:
            data = read_preset(str(path).strip(), "preset path")
        except (FileNotFoundError, ValueError) as exc:
            raise UIError(str(exc)) from None
        heads = [f"{layer}.{h}" for layer, hs in data["heads"].items() for h in hs]
        return {"heads": heads, "strength": float(data.get("strength", 1.0)), "scale": float(data.get("scale", 3.0)),
                "effect_map": data.get("effect_map")}

    def headhunt(self, prompts: int = 4, rounds: int = 1, objective: str = "checker", steps=8, num_frames=9,
                 height=32, width=32, guidance_scale=1.0, strength=1.0, scale=3.0, progress=True) -> dict:
        """A HeadHunter search on the shapes-search prompts; its preset lands in the work folder."""
        from ..evals.objectives import check_objective
        from ..evals.suites import load_suite
        from ..headhunt import _heads_dict, headhunt

        n = _int(prompts, "search prompts", 1, 64)
        rounds = _int(rounds, "rounds", 1, 8)
        try:
            check_objective(objective)
        except ValueError as exc:
            raise UIError(str(exc)) from None
        kwargs = self._size(steps, num_frames, height, width, guidance_scale)
        strength, scale = _float(strength, "u", 0.01, 1.0), _float(scale, "s", 0.01, 20.0)
        items = load_suite(f"shapes-search:{n}")
        # one score cache per set of settings: a stopped search run again with them resumes
        settings = json.dumps([n, rounds, objective, kwargs, strength, scale], sort_keys=True)
        cache = self.workdir / "headhunt-cache" / hashlib.sha256(settings.encode()).hexdigest()[:16]
        with self._running("headhunt"):
            result = headhunt(self.pipe, [it["prompt"] for it in items], [it["seed"] for it in items],
                              objective=objective, rounds=rounds, strength=strength, scale=scale, cache_dir=cache,
                              progress=progress, **kwargs)
            folder = self._next("headhunt")
            result.save(folder / "preset.json")
        heads = _heads_dict(result.heads)
        return {"preset": folder / "preset.json", "heads": [f"{k}.{h}" for k, v in heads.items() for h in v],
                "score": result.score, "baseline": result.baseline, "effect_map": result.effect_map,
                "stopped": result.stopped}

    # ----------------------------------------------------------------------------------------
    def run_eval(self, name: str, suite: str, configs: str, progress=True) -> dict:
        """An eval run into ``runs_dir/name`` (resumable), then its report."""
        import re

        import yaml

        from ..evals.config import parse_spec
        from ..evals.report import write_report
        from ..evals.runner import run_eval
        from ..evals.suites import load_suite

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
            raise UIError(f"run name: letters, digits, '.', '_' or '-' only, got {name!r}")
        try:
            data = yaml.safe_load(configs or "")
            spec = parse_spec(data)
            load_suite(suite, spec.seeds)
        except yaml.YAMLError as exc:
            raise UIError(f"configs: not YAML ({exc})") from None
        except ValueError as exc:  # ConfigError names the field
            raise UIError(str(exc)) from None
        out = self.runs_dir / name
        with self._running("eval"):
            try:
                run_eval(self.pipeline, suite, spec, out, pipe=self.pipe, progress=progress)
            except ConfigError as exc:
                raise UIError(str(exc)) from None
            paths = write_report(out)
        return self.open_run(name) | {"paths": paths}

    def past_runs(self) -> list[str]:
        if not self.runs_dir.is_dir():
            return []
        return sorted(p.name for p in self.runs_dir.iterdir() if (p / "results.jsonl").is_file())

    def open_run(self, name: str) -> dict:
        from ..evals.report import write_report

        folder = self.runs_dir / str(name)
        if not (folder / "results.jsonl").is_file():
            raise UIError(f"run: {name!r} is not an eval run in {self.runs_dir}")
        if not (folder / "report.md").is_file():
            write_report(folder)
        pareto = folder / "pareto.png"
        return {"markdown": (folder / "report.md").read_text(), "pareto": pareto if pareto.is_file() else None}


def effect_map_image(effect_map: dict | None, layers: dict[int, int], selected=(), path: Path | None = None):
    """A layer x head heatmap (the effect map's values; grey where none) with selected heads boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_heads = max(layers.values()) if layers else 1
    grid = np.full((len(layers), n_heads), np.nan)
    rows = {layer: i for i, layer in enumerate(layers)}
    if effect_map:
        for layer, values in zip(effect_map.get("layers", []), effect_map.get("values", [])):
            if int(layer) in rows:
                for h, v in enumerate(values):
                    if v is not None and h < n_heads:
                        grid[rows[int(layer)], h] = v
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * n_heads, 0.8 + 0.35 * len(layers)), dpi=100)
    lim = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
    ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=-lim or -1, vmax=lim or 1, aspect="auto")
    ax.set_facecolor("#dddddd")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_xlabel("head")
    for item in selected:
        layer, _, head = str(item).partition(".")
        if layer.isdigit() and int(layer) in rows and head.isdigit():
            ax.add_patch(plt.Rectangle((int(head) - 0.5, rows[int(layer)] - 0.5), 1, 1, fill=False, lw=2.5, ec="black"))
    ax.set_title("effect map: score change per head" if effect_map else "no effect map loaded", fontsize=9)
    fig.tight_layout()
    path = path or Path(tempfile.mkdtemp(prefix="dit-accel-ui-")) / "heads.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


__all__ = ["HISTORY_COLUMNS", "METHOD_NAMES", "Studio", "UIError", "effect_map_image", "method_defaults",
           "parse_heads", "to_gif"]
