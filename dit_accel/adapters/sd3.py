"""SD3Transformer2DModel (SD3 and SD3.5): joint attention with image tokens first; SD3.5's
dual-attention layers add an image-only self-attention (`attn2`). Mirrors diffusers 0.42
`JointAttnProcessor2_0`, which calls SDPA directly (so `set_attention_backend` never reaches
it)."""

from __future__ import annotations

import torch

from ..layout import ModuleInfo
from .base import Adapter, block_index, project_heads


class SD3Adapter(Adapter):
    family = "sd3"
    model_class = "SD3Transformer2DModel"
    text_position = "last"
    batched_cfg = True

    def layout_fields(self, transformer, arguments):
        hidden_states = arguments["hidden_states"]
        batch_size, _, height, width = hidden_states.shape
        p = transformer.config.patch_size
        grid = (1, height // p, width // p)
        return dict(
            batch_size=batch_size, grid=grid, patch_size=(1, p, p), video_tokens=grid[1] * grid[2],
            text_tokens=arguments["encoder_hidden_states"].shape[1], timestep=arguments["timestep"],
        )

    def describe(self, name, module, transformer):
        if (i := block_index(name, "transformer_blocks")) is None:
            return None
        return ModuleInfo(name, i, "self" if name.endswith(".attn2") else "joint")

    def run(self, attend, attn, info, hidden_states, encoder_hidden_states, attention_mask, rotary,
            text_tokens):
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query, key, value, head_dim = project_heads(attn, hidden_states, hidden_states)

        text_span = None
        if encoder_hidden_states is not None:
            encoder_query, encoder_key, encoder_value, _ = project_heads(
                attn, encoder_hidden_states, encoder_hidden_states, added=True
            )
            image_tokens = query.shape[2]
            query = torch.cat([query, encoder_query], dim=2)
            key = torch.cat([key, encoder_key], dim=2)
            value = torch.cat([value, encoder_value], dim=2)
            text_span = (image_tokens, query.shape[2])

        hidden_states = attend(query, key, value, None, text_span)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1]:],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
