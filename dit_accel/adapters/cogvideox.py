"""CogVideoXTransformer3DModel (CogVideoX 1.0 / 1.5): joint attention with text tokens first and
RoPE on the video tokens only. Mirrors diffusers 0.42 `CogVideoXAttnProcessor2_0`, which calls
SDPA directly."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..layout import ModuleInfo
from .base import Adapter, block_index, project_heads


class CogVideoXAdapter(Adapter):
    family = "cogvideox"
    model_class = "CogVideoXTransformer3DModel"
    text_position = "first"
    batched_cfg = True

    def layout_fields(self, transformer, arguments):
        # CogVideoX takes latents as [batch, frames, channels, height, width].
        batch_size, frames, _, height, width = arguments["hidden_states"].shape
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        grid = (frames // (p_t or 1), height // p, width // p)
        return dict(
            batch_size=batch_size, grid=grid, patch_size=(p_t or 1, p, p), video_tokens=grid[0] * grid[1] * grid[2],
            text_tokens=arguments["encoder_hidden_states"].shape[1], timestep=arguments["timestep"],
        )

    def describe(self, name, module, transformer):
        if (i := block_index(name, "transformer_blocks")) is None:
            return None
        return ModuleInfo(name, i, "joint")

    def run(self, attend, attn, info, hidden_states, encoder_hidden_states, attention_mask, rotary,
            text_tokens):
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query, key, value, head_dim = project_heads(attn, hidden_states, hidden_states)

        if rotary is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], rotary)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], rotary)

        hidden_states = attend(query, key, value, attention_mask, (0, text_seq_length))
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states
