"""Per-frame feature extractors for the consistency dimensions (pluggable).

VBench's subject consistency uses DINO ViT-B/16 features and background consistency CLIP
ViT-B/32 image features. Neither can be downloaded here, so :func:`feature_extractor` takes

- ``"classical"`` (the default): no weights; a 16x16 zero-mean luminance thumbnail (layout) and a
  4x4x4 color histogram (palette), each L2-normalised and weighted equally. It follows the same
  recipe but its scores are not on VBench's scale;
- ``"dino:PATH"`` / ``"clip:PATH"``: a local ``transformers`` checkpoint directory (a DINO
  ``AutoModel`` or a CLIP vision model), loaded offline; the CLS / pooled embedding per frame;
- any callable ``frames [F, H, W, 3] in [0, 1] -> [F, D]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .flow import LUMA

Extractor = Callable[[np.ndarray], np.ndarray]


def classical_features(frames: np.ndarray) -> np.ndarray:
    """[F, 16*16 + 64] features of frames [F, H, W, 3] in [0, 1] (see the module docstring)."""
    x = torch.as_tensor(np.asarray(frames), dtype=torch.float64).permute(0, 3, 1, 2)  # [F, 3, H, W]
    gray = (x * torch.tensor(LUMA, dtype=torch.float64).view(1, 3, 1, 1)).sum(1, keepdim=True)
    thumb = F.adaptive_avg_pool2d(gray, 16).flatten(1)
    thumb = thumb - thumb.mean(1, keepdim=True)
    q = (x.clamp(0, 1) * 3.999).long()  # 4 levels per channel
    bins = (q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]).flatten(1)
    hist = torch.zeros(x.shape[0], 64, dtype=torch.float64)
    hist = hist.scatter_add_(1, bins, torch.ones_like(bins, dtype=torch.float64))
    hist = hist.sqrt()
    parts = [t / t.norm(dim=1, keepdim=True).clamp_min(1e-12) for t in (thumb, hist)]
    return (torch.cat(parts, dim=1) / np.sqrt(2)).numpy()


def _transformers_extractor(kind: str, path: str) -> Extractor:
    """A DINO / CLIP extractor from a checkpoint directory :func:`check_spec` has accepted."""
    from transformers import AutoImageProcessor, AutoModel, CLIPVisionModelWithProjection

    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    if kind == "clip":
        model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).eval()
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    @torch.no_grad()
    def extract(frames: np.ndarray) -> np.ndarray:
        images = list(np.round(np.asarray(frames) * 255).astype(np.uint8))
        inputs = processor(images=images, return_tensors="pt")
        out = model(**inputs)
        feats = out.image_embeds if kind == "clip" else out.last_hidden_state[:, 0]
        return feats.float().numpy()

    return extract


def check_spec(spec: str) -> None:
    """Raise ``ValueError`` naming what is wrong with an extractor spec, without loading anything."""
    if spec in (None, "classical"):
        return
    kind, _, path = str(spec).partition(":")
    if kind not in ("dino", "clip") or not path:
        raise ValueError(f"feature extractor {spec!r}: expected 'classical', 'dino:PATH' or 'clip:PATH' "
                         "(PATH a local transformers checkpoint directory)")
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"feature extractor {spec!r}: {path} is not a local transformers checkpoint directory "
                         "(no config.json); nothing is downloaded here")


def feature_extractor(spec: str | Extractor | None = "classical") -> Extractor:
    """An extractor from a spec (``"classical"``, ``"dino:PATH"``, ``"clip:PATH"``) or a callable."""
    if spec is None or spec == "classical":
        return classical_features
    if callable(spec):
        return spec
    check_spec(spec)
    kind, _, path = str(spec).partition(":")
    return _transformers_extractor(kind, path)


__all__ = ["Extractor", "check_spec", "classical_features", "feature_extractor"]
