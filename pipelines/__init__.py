"""Pipeline helpers, installed as `dit_accel.pipelines`: the embedded ShapesBench reference model
(`load_reference`, `dit_accel.pipelines.shapes`) and tiny random pipelines of every supported
family (`dit_accel.pipelines.tiny`) for tests and demos that run offline."""

from __future__ import annotations

from pathlib import Path

import torch

REFERENCE_DIR = Path(__file__).resolve().parent / "shapes" / "reference"


def load_reference(device: str | torch.device | None = None, dtype: torch.dtype | None = None, path=None):
    """The embedded ShapesBench reference model as a ``ShapesPipeline``, loaded offline.

    Args:
        device: where to put it (default: CUDA when available, else CPU).
        dtype: weight dtype (default: bfloat16 on CUDA, float32 on CPU).
        path: another ShapesPipeline directory (default: the weights shipped with dit-accel).
    """
    from .shapes.pipeline import ShapesPipeline

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = Path(path) if path is not None else REFERENCE_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"path: {path} is not a ShapesPipeline directory (no model_index.json). The shipped model lives in "
            f"{REFERENCE_DIR}; reinstall dit-accel if it is missing, or train one with "
            "`python -m dit_accel.pipelines.shapes.train`."
        )
    pipe = ShapesPipeline.from_pretrained(path, dtype=dtype)
    return pipe.to(device)
