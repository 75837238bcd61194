"""Token geometry handed to attention methods.

`TokenLayout` describes one transformer call (recorded by the geometry hook before the call
runs); `AttentionCall` describes one attention computation inside it (which module, which
kind of attention, where the text tokens sit in the sequence).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

AttentionKind = Literal["self", "joint", "cross", "text"]
"""`self`: video/image tokens attend to themselves. `joint`: text and video tokens in one
sequence (MMDiT). `cross`: video queries, text (or image-context) keys. `text`: attention among
text tokens only (HunyuanVideo's token refiner)."""


@dataclass(frozen=True)
class TokenLayout:
    """Geometry of one transformer forward call.

    Attributes:
        family: model family (`flux`, `sd3`, `wan`, `hunyuan-video`, `cogvideox`, `ltx`).
        batch_size: rows in this call (both CFG branches when the pipeline batches them).
        grid: `(T, H, W)` of the video/image tokens after patching, or `None` when the call
            does not determine it (e.g. Flux with extra reference-image tokens).
        patch_size: `(t, h, w)` patch of the model.
        video_tokens: number of video/image tokens (`T*H*W` when `grid` is known).
        text_tokens: number of text tokens the transformer receives.
        text_position: where text sits in joint attention: `"first"` (Flux, CogVideoX),
            `"last"` (SD3, HunyuanVideo) or `"cross"` (Wan, LTX: only in cross-attention).
        timestep: the `timestep` tensor the transformer was called with.
        step_index: denoising step within the current generation (0-based).
        generation: counter of generations seen by this transformer; bumps on reset.
        branch: diffusers cache-context name of the call (`"cond"`, `"uncond"`,
            `"cond_uncond"`) or `None` when the pipeline set none.
        cond_rows / uncond_rows: batch rows of the conditional / unconditional CFG branch,
            or `None` when unknown.
        text_mask: `(batch, text_tokens)` bool mask of valid text tokens where the family
            takes one (HunyuanVideo, LTX), else `None`.
    """

    family: str
    batch_size: int
    grid: tuple[int, int, int] | None
    patch_size: tuple[int, int, int]
    video_tokens: int
    text_tokens: int
    text_position: Literal["first", "last", "cross"]
    timestep: torch.Tensor | None = None
    step_index: int = 0
    generation: int = 0
    branch: str | None = None
    cond_rows: tuple[int, ...] | None = None
    uncond_rows: tuple[int, ...] | None = None
    text_mask: torch.Tensor | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ModuleInfo:
    """Where an attention module sits in its transformer.

    `layer` counts transformer blocks in execution order (Flux and HunyuanVideo: double-stream
    blocks first, then single-stream blocks); `kind` is the attention it computes.
    """

    name: str
    layer: int
    kind: AttentionKind


@dataclass
class AttentionCall:
    """Everything a method knows about one attention computation besides q, k, v.

    Attributes:
        layout: the transformer call's `TokenLayout`.
        module: the attention module's `ModuleInfo`.
        text_span: `(start, stop)` of the text tokens in the query/key sequence of a joint
            attention, `None` for other kinds.
        state: per-method storage for this (module, CFG branch, sequence shape), owned by the
            geometry hook and cleared at each new generation. Never stored on the processor.
            Looked up on first access only, so methods without state pay nothing for it.
    """

    layout: TokenLayout
    module: ModuleInfo
    text_span: tuple[int, int] | None
    state_lookup: Callable[[], dict[str, Any]] = field(default=dict, repr=False)

    @functools.cached_property
    def state(self) -> dict[str, Any]:
        return self.state_lookup()
