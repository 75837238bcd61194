"""What every benchmark records beside its numbers, and how it writes them."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
from pathlib import Path

import torch
from dit_accel.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def command_line(module: str, argv) -> str:
    """The shell command that reruns ``python -m module`` with ``argv``, quoted where needed (a
    ``--configs "a;b"`` list stays one argument)."""
    return f"python -m {module} {shlex.join(argv or [])}".rstrip()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """DIT_ACCEL_COMMIT when set (the GPU machine's copy of the tree carries a stale .git), else git HEAD."""
    if os.environ.get("DIT_ACCEL_COMMIT"):
        return os.environ["DIT_ACCEL_COMMIT"]
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict:
    """Device, library versions and commit, for a result file."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor()})"
    return {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "sageattention": _version("sageattention"),
        "xformers": _version("xformers"),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def cuda_time_ms(fn, warmup: int = 3, iters: int = 10) -> list[float]:
    """Per-iteration CUDA-event times of `fn()` in milliseconds, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def device_tag(device: str) -> str:
    """A file-name-safe form of a device name: "NVIDIA H100 80GB HBM3" -> "NVIDIA-H100-80GB-HBM3"."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", device).strip("-")


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write `payload` (plus the environment) as JSON atomically; returns the path."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    path = out_dir / f"{name}-{device_tag(env['device'])}-{env['date'][:10]}.json"
    return atomic_write(path, json.dumps({"benchmark": name, "environment": env, **payload}, indent=2))


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print rows as an aligned text table."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
