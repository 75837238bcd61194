"""FluxTransformer2DModel: joint attention, text tokens first; single-stream blocks are not
told the text length, so it comes from the `TokenLayout`. Mirrors diffusers 0.42
`FluxAttnProcessor`."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from ..layout import ModuleInfo
from .base import Adapter, Attend, block_index, to_heads


class FluxAdapter(Adapter):
    family = "flux"
    model_class = "FluxTransformer2DModel"
    text_position = "first"

    def layout_fields(self, transformer, arguments):
        hidden_states = arguments["hidden_states"]
        batch_size, image_tokens = hidden_states.shape[:2]
        img_ids = arguments["img_ids"]
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        # Packed latents carry their grid only in the position ids (row, column in channels 1, 2).
        ids = img_ids[:image_tokens, 1:3].max(dim=0).values.tolist()
        rows, cols = int(ids[0]) + 1, int(ids[1]) + 1
        grid = (1, rows, cols) if rows * cols == image_tokens else None
        patch = 2 * transformer.config.patch_size
        return dict(
            batch_size=batch_size, grid=grid, patch_size=(1, patch, patch), video_tokens=image_tokens,
            text_tokens=arguments["encoder_hidden_states"].shape[1], timestep=arguments["timestep"],
        )

    def describe(self, name, module, transformer):
        double = len(transformer.transformer_blocks)
        if (i := block_index(name, "transformer_blocks")) is not None:
            return ModuleInfo(name, i, "joint")
        if (i := block_index(name, "single_transformer_blocks")) is not None:
            return ModuleInfo(name, double + i, "joint")
        return None

    def run(self, attend: Attend, attn, info, hidden_states, encoder_hidden_states, attention_mask,
            rotary: Any, text_tokens: int):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
            text_span = (0, encoder_hidden_states.shape[1])
        else:
            text_span = (0, text_tokens)

        if rotary is not None:
            query = apply_rotary_emb(query, rotary, sequence_dim=1)
            key = apply_rotary_emb(key, rotary, sequence_dim=1)

        hidden_states = attend(to_heads(query), to_heads(key), to_heads(value), attention_mask, text_span)
        hidden_states = to_heads(hidden_states).flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states
