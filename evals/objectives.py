"""Objectives for the HeadHunter search: ``(videos, prompts) -> one score per video``, higher is better.

``videos`` is a sequence of ``[F, H, W, 3]`` float arrays in [0, 1] (images: ``F = 1``). Built-in,
weight-free:

- ``"checker"``: the ShapesBench checker (ShapesBench prompts only): the fraction of the prompt's
  checks that hold (each object's color, shape and motion), extra objects counting as failed checks;
- ``"sharpness"``: mean variance of the luminance Laplacian (per frame, x 100);
- ``"contrast"``: RMS contrast, the standard deviation of luminance;
- ``"colorfulness"``: Hasler and Suesstrunk's colorfulness (on [0, 1] values).

Learned scorers, only from weights already on this machine (nothing is downloaded):

- ``"clip:PATH"``: a ``transformers`` CLIP checkpoint (model and processor in PATH); the score is
  100 x cosine(image, text), averaged over (up to 8) frames;
- ``"pickscore:PATH"``: PickScore, a CLIP checkpoint scored with its learned ``logit_scale``;
- ``"imagereward:PATH"``: an ImageReward checkpoint file, through the ``image-reward`` package; its
  BLIP text config ``med_config.json`` must lie next to the checkpoint and BERT's
  ``bert-base-uncased`` tokenizer must be in the local Hugging Face cache (the package would
  otherwise download both). The score is ImageReward's reward, averaged over (up to 8) frames.

Any callable with the signature above works too; :func:`objective_name` names it in presets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .flow import LUMA

Objective = Callable[[Sequence[np.ndarray], Sequence[str]], Sequence[float]]

BUILTIN = ("checker", "sharpness", "contrast", "colorfulness")
LEARNED = ("clip", "pickscore", "imagereward")
MAX_FRAMES = 8  # learned scorers see at most this many frames of a video, evenly spaced
IMAGEREWARD_CONFIG = "med_config.json"  # ImageReward's BLIP text config, expected next to its checkpoint


def _frames(video) -> np.ndarray:
    from .metrics import to_frames

    return to_frames(np.asarray(video))


def checker_scores(videos: Sequence, prompts: Sequence[str]) -> list[float]:
    """Per video: passed checks / (checks + extra objects); each prompted object has a color, a shape
    and (in a video, when the prompt names one) a motion check."""
    from . import shapes

    out = []
    for video, prompt in zip(videos, prompts, strict=True):
        verdict = shapes.score_video(_frames(video), prompt)
        passed = total = 0
        for o in verdict["objects"]:
            checks = [o["color_ok"], o["shape_ok"]] + ([o["motion_ok"]] if o["motion_ok"] is not None else [])
            passed += sum(bool(c) for c in checks)
            total += len(checks)
        out.append(passed / (total + len(verdict["spurious"])))
    return out


def _luma(video) -> torch.Tensor:
    x = torch.as_tensor(_frames(video), dtype=torch.float64)
    return (x * torch.tensor(LUMA, dtype=torch.float64)).sum(-1)  # [F, H, W]


def sharpness_scores(videos: Sequence, prompts: Sequence[str]) -> list[float]:
    kernel = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float64).view(1, 1, 3, 3)
    out = []
    for video in videos:
        lap = F.conv2d(_luma(video)[:, None], kernel)  # valid region only
        out.append(100.0 * float(lap.flatten(1).var(dim=1, unbiased=False).mean()))
    return out


def contrast_scores(videos: Sequence, prompts: Sequence[str]) -> list[float]:
    return [float(_luma(v).flatten(1).std(dim=1, unbiased=False).mean()) for v in videos]


def colorfulness_scores(videos: Sequence, prompts: Sequence[str]) -> list[float]:
    out = []
    for video in videos:
        x = torch.as_tensor(_frames(video), dtype=torch.float64).flatten(1, 2)  # [F, HW, 3]
        rg = x[..., 0] - x[..., 1]
        yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
        std = (rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False)).sqrt()
        mean = (rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2).sqrt()
        out.append(float((std + 0.3 * mean).mean()))
    return out


def _pick_frames(video) -> list[np.ndarray]:
    frames = _frames(video)
    idx = np.unique(np.linspace(0, len(frames) - 1, min(MAX_FRAMES, len(frames))).round().astype(int))
    return [np.round(frames[i] * 255).astype(np.uint8) for i in idx]


def _embeds(out) -> torch.Tensor:
    """Projected CLIP embeddings: a tensor (transformers 4) or an output whose pooler_output holds them (5)."""
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()


def _clip_objective(path: str, learned_scale: bool) -> Objective:
    from transformers import AutoProcessor, CLIPModel

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()

    @torch.no_grad()
    def score(videos, prompts):
        out = []
        for video, prompt in zip(videos, prompts, strict=True):
            frames = _pick_frames(video)
            inputs = processor(text=[prompt], images=frames, return_tensors="pt", padding=True, truncation=True)
            image = F.normalize(_embeds(model.get_image_features(pixel_values=inputs["pixel_values"])), dim=-1)
            text = F.normalize(_embeds(model.get_text_features(input_ids=inputs["input_ids"],
                                                               attention_mask=inputs.get("attention_mask"))), dim=-1)
            scale = float(model.logit_scale.exp()) if learned_scale else 100.0
            out.append(float((scale * image @ text.T).mean()))
        return out

    return score


def _imagereward_objective(path: str) -> Objective:
    try:
        import ImageReward as reward_lib  # the `image-reward` package
    except ImportError:
        raise ValueError(f"objective 'imagereward:{path}': the image-reward package is not installed "
                         "(pip install image-reward; its BLIP config and the checkpoint must be local)") from None
    from PIL import Image

    try:
        model = reward_lib.load(path, device="cuda" if torch.cuda.is_available() else "cpu",
                                med_config=str(Path(path).with_name(IMAGEREWARD_CONFIG)))
    except OSError as exc:  # transformers could not find the tokenizer offline, or the file is unreadable
        raise ValueError(f"objective 'imagereward:{path}': the image-reward package could not load it offline "
                         f"({exc}); it needs the bert-base-uncased tokenizer in the local Hugging Face cache") from None

    @torch.no_grad()
    def score(videos, prompts):
        return [float(np.mean(model.score(prompt, [Image.fromarray(f) for f in _pick_frames(video)])))
                for video, prompt in zip(videos, prompts, strict=True)]

    return score


def check_objective(spec) -> None:
    """Raise ``ValueError`` naming what is wrong with an objective spec, without loading anything."""
    if callable(spec) or spec in BUILTIN:
        return
    kind, _, path = str(spec).partition(":")
    if kind not in LEARNED or not path:
        raise ValueError(f"objective {spec!r}: expected one of {', '.join(BUILTIN)}, or clip:PATH, pickscore:PATH, "
                         "imagereward:PATH (local weights), or a callable (videos, prompts) -> scores")
    target = Path(path)
    ok = target.is_file() if kind == "imagereward" else (target / "config.json").is_file()
    if not ok:
        what = "checkpoint file" if kind == "imagereward" else "transformers checkpoint directory (with config.json)"
        raise ValueError(f"objective {spec!r}: {path} is not a local {what}; nothing is downloaded here")
    if kind == "imagereward" and not target.with_name(IMAGEREWARD_CONFIG).is_file():
        raise ValueError(f"objective {spec!r}: ImageReward's {IMAGEREWARD_CONFIG} (its BLIP text config) must lie "
                         f"next to the checkpoint, at {target.with_name(IMAGEREWARD_CONFIG)}; nothing is "
                         "downloaded here")


def load_objective(spec) -> Objective:
    """The objective a spec names (see the module docstring); callables pass through."""
    check_objective(spec)
    if callable(spec):
        return spec
    builtin = {"checker": checker_scores, "sharpness": sharpness_scores, "contrast": contrast_scores,
               "colorfulness": colorfulness_scores}
    if spec in builtin:
        return builtin[spec]
    kind, _, path = spec.partition(":")
    if kind == "imagereward":
        return _imagereward_objective(path)
    return _clip_objective(path, learned_scale=kind == "pickscore")


def objective_name(spec) -> str:
    if callable(spec):
        return getattr(spec, "__qualname__", None) or type(spec).__name__
    return str(spec)


__all__ = ["BUILTIN", "Objective", "check_objective", "checker_scores", "colorfulness_scores", "contrast_scores",
           "load_objective", "objective_name", "sharpness_scores"]
