"""ShapesPipeline: the ShapesBench text-to-video DiT as a diffusers pipeline.

Components, all standard classes so ``ShapesPipeline.from_pretrained(local_dir)`` runs diffusers'
own loading path: a word-level ``PreTrainedTokenizerFast``, a tiny ``T5EncoderModel`` text
encoder, a ``WanTransformer3DModel`` denoiser working directly on pixels (patch 1x4x4, so the
default 17x64x64 video is 4352 tokens; its input carries a clip-time channel next to RGB) and a
``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    WanTransformer3DModel,
)
from diffusers.utils import BaseOutput

from ...files import atomic_write

from .data import MAX_TEXT_TOKENS, to_device, vocabulary

logger = logging.getLogger(__name__)

DEFAULT_SIZE = {"num_frames": 17, "height": 64, "width": 64}  # 17 x 16 x 16 = 4352 video tokens
SMALL_SIZE = {"num_frames": 9, "height": 48, "width": 48}  # CPU-friendly: 9 x 12 x 12 = 1296 tokens
IMAGE_SIZE = {"num_frames": 1, "height": 64, "width": 64}
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0
SCHEDULER_SHIFT = 3.0
PATCH = (1, 4, 4)
CHECKSUMS = "checksums.json"

TRANSFORMER_CONFIG = dict(
    patch_size=PATCH,
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=4,  # RGB + the clip-time channel (see with_time_channel)
    out_channels=3,
    text_dim=128,
    freq_dim=256,
    ffn_dim=1024,
    num_layers=8,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=256,
)
TEXT_ENCODER_CONFIG = dict(
    d_model=128,
    d_kv=32,
    d_ff=512,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


@dataclasses.dataclass
class ShapesPipelineOutput(BaseOutput):
    """``frames``: [B, F, H, W, 3] floats in [0, 1] ("np"), a tensor of that layout ("pt"),
    lists of PIL images ("pil"), or the raw [B, 3, F, H, W] sample in [-1, 1] ("latent")."""

    frames: Any


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in vocabulary():
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_max_length=MAX_TEXT_TOKENS
    )


def build_components(seed: int = 0) -> dict:
    """Fresh (untrained) components with the reference architecture."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **TEXT_ENCODER_CONFIG))
    transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "transformer": transformer, "scheduler": scheduler}


def encode_text(tokenizer, text_encoder, prompts: list[str], device, dtype) -> torch.Tensor:
    """[B, MAX_TEXT_TOKENS, d] embeddings, zero past each prompt's end (Wan's convention)."""
    batch = tokenizer(
        prompts, padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt"
    )
    ids = to_device(batch.input_ids, device)
    mask = to_device(batch.attention_mask, device)
    hidden = text_encoder(ids, attention_mask=mask).last_hidden_state
    return (hidden * mask[..., None].to(hidden.dtype)).to(dtype)


def with_time_channel(x: torch.Tensor) -> torch.Tensor:
    """Append a channel holding each frame's clip time, from -1 (first) to 1 (last); 0 for an image.

    Wan's RoPE encodes only relative positions, so without it the model cannot tell the start of a
    clip from its end and confuses a motion with its reverse ("moving left" drawn moving right).
    """
    B, _, F, H, W = x.shape
    tau = torch.linspace(-1.0, 1.0, F, device=x.device) if F > 1 else torch.zeros(1, device=x.device)
    return torch.cat([x, tau.to(x.dtype).view(1, 1, F, 1, 1).expand(B, 1, F, H, W)], dim=1)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksums(directory: str | os.PathLike) -> None:
    """Raise a clear error when a weight file listed in ``checksums.json`` is missing or altered."""
    directory = Path(directory)
    manifest = directory / CHECKSUMS
    if not manifest.is_file():
        return
    expected = json.loads(manifest.read_text())
    for rel, digest in expected.items():
        path = directory / rel
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: weight file missing from the ShapesBench model directory {directory} "
                f"(listed in {CHECKSUMS}). Reinstall dit-accel, or export the model again with "
                "ShapesPipeline.save_pretrained."
            )
        if _sha256(path) != digest:
            raise ValueError(
                f"{path}: weight file is corrupted (its sha256 differs from {CHECKSUMS}). Reinstall "
                "dit-accel, or export the model again with ShapesPipeline.save_pretrained."
            )


class ShapesPipeline(DiffusionPipeline):
    r"""Text-to-video generation with the ShapesBench reference DiT.

    Args:
        tokenizer: word-level tokenizer over the ShapesBench vocabulary.
        text_encoder: tiny T5 encoder producing ``prompt_embeds``.
        transformer: ``WanTransformer3DModel`` denoising RGB pixels in [-1, 1].
        scheduler: flow-matching Euler scheduler.
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, tokenizer, text_encoder, transformer: WanTransformer3DModel, scheduler):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                              scheduler=scheduler)

    # ---------------------------------------------------------------- save / load

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        if os.path.isdir(str(pretrained_model_name_or_path)):
            verify_checksums(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, max_shard_size="12MB", **kwargs):
        """Save as a diffusers directory plus ``checksums.json`` over its weight files."""
        super().save_pretrained(
            save_directory, safe_serialization=safe_serialization, max_shard_size=max_shard_size, **kwargs
        )
        root = Path(save_directory)
        sums = {
            str(p.relative_to(root)): _sha256(p)
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".safetensors", ".bin")
        }
        atomic_write(root / CHECKSUMS, json.dumps(sums, indent=1, sort_keys=True) + "\n")

    # ---------------------------------------------------------------- helpers

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def attention_kwargs(self):
        return self._attention_kwargs

    def _warn_unknown_words(self, prompts: list[str]) -> None:
        vocab = self.tokenizer.get_vocab()
        unknown = sorted({w for p in prompts for w in p.lower().replace(",", " ").split() if w not in vocab})
        if unknown:
            logger.warning(
                "prompt: the ShapesBench model does not know the words %s; they are read as [UNK]. "
                "Known words: %s",
                unknown,
                " ".join(sorted(w for w in vocab if not w.startswith("["))),
            )

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        device = device or self._execution_device
        dtype = dtype or self.transformer.dtype
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            self._warn_unknown_words(prompts)
            prompt_embeds = encode_text(self.tokenizer, self.text_encoder, prompts, device, dtype)
        batch = prompt_embeds.shape[0]
        prompt_embeds = prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != batch:
                raise ValueError(
                    f"negative_prompt: got {len(negatives)} negative prompts for {batch} prompts; pass one "
                    "string or a list as long as `prompt`"
                )
            negative_prompt_embeds = encode_text(self.tokenizer, self.text_encoder, negatives, device, dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    def check_inputs(self, prompt, prompt_embeds, height, width, num_frames, num_inference_steps, callback_inputs):
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt: pass `prompt` (a string or a list of strings) or `prompt_embeds`")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("prompt: pass either `prompt` or `prompt_embeds`, not both")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt: must be a string or a list of strings, got {type(prompt).__name__}")
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < 16 or value % PATCH[1]:
                raise ValueError(
                    f"{name}: must be an integer >= 16 and a multiple of {PATCH[1]} (the patch size), got {value!r}; "
                    f"the default is {DEFAULT_SIZE[name]}"
                )
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames: must be an integer >= 1 (1 gives an image), got {num_frames!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: must be an integer >= 1, got {num_inference_steps!r}")
        bad = [k for k in callback_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs: {bad} are not available; choose from "
                f"{self._callback_tensor_inputs}"
            )

    # ---------------------------------------------------------------- generation

    def _predict(self, x, timestep, embeds, branch: str, attention_kwargs):
        """One transformer pass under its CFG branch's cache context (as diffusers' Wan pipeline does)."""
        with self.transformer.cache_context(branch):
            out = self.transformer(
                hidden_states=x,
                timestep=timestep,
                encoder_hidden_states=embeds,
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]
        return out.float()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int = DEFAULT_SIZE["num_frames"],
        height: int = DEFAULT_SIZE["height"],
        width: int = DEFAULT_SIZE["width"],
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ):
        r"""Generate videos (``num_frames=1``: images).

        Args:
            prompt: e.g. ``"a red circle moving left on a dark blue background"``.
            negative_prompt: used for classifier-free guidance (default: the empty prompt).
            num_frames, height, width: output size; the default 17x64x64 is 4352 tokens,
                ``SMALL_SIZE`` (9x48x48) runs on a laptop CPU in seconds.
            num_inference_steps: flow-matching Euler steps.
            guidance_scale: classifier-free guidance; 1 or less turns it off.
            output_type: "np", "pt", "pil" or "latent".
        Returns:
            ``ShapesPipelineOutput`` with ``frames`` (or a tuple when ``return_dict=False``).
        """
        self.check_inputs(
            prompt, prompt_embeds, height, width, num_frames, num_inference_steps, callback_on_step_end_tensor_inputs
        )
        if output_type not in ("np", "pt", "pil", "latent"):
            raise ValueError(f"output_type: must be 'np', 'pt', 'pil' or 'latent', got {output_type!r}")
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        dtype = self.transformer.dtype

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            self.do_classifier_free_guidance,
            num_videos_per_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            device,
            dtype,
        )
        batch = prompt_embeds.shape[0]
        shape = (batch, self.transformer.config.out_channels, num_frames, height, width)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                x = with_time_channel(latents.to(dtype))
                timestep = t.expand(batch)
                noise_pred = self._predict(x, timestep, prompt_embeds, "cond", attention_kwargs)
                if self.do_classifier_free_guidance:
                    noise_uncond = self._predict(x, timestep, negative_prompt_embeds, "uncond", attention_kwargs)
                    noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds}
                    callback_kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        self._current_timestep = None
        self.maybe_free_model_hooks()

        if output_type == "latent":
            frames = latents
        else:
            video = ((latents.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)  # [B, F, H, W, 3]
            if output_type == "pt":
                frames = video
            else:
                frames = video.cpu().numpy()
                if output_type == "pil":
                    from PIL import Image

                    frames = [[Image.fromarray(np.round(f * 255).astype(np.uint8)) for f in v] for v in frames]
        if not return_dict:
            return (frames,)
        return ShapesPipelineOutput(frames=frames)
