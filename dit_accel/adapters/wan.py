"""WanTransformer3DModel (Wan2.1 / 2.2, T2V and I2V): video-only self-attention with RoPE, and
cross-attention to text (plus, for Wan2.1 I2V, a second cross-attention to the image context).
Mirrors diffusers 0.42 `WanAttnProcessor`."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

from ..layout import ModuleInfo
from .base import Adapter, block_index, to_heads

# Wan's processor hard-codes the text encoder's context length to split image context from text.
_TEXT_CONTEXT = 512


def _apply_rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE, written as the stock processor's inner function."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanAdapter(Adapter):
    family = "wan"
    model_class = "WanTransformer3DModel"
    text_position = "cross"

    def layout_fields(self, transformer, arguments):
        batch_size, _, frames, height, width = arguments["hidden_states"].shape
        p_t, p_h, p_w = transformer.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        return dict(
            batch_size=batch_size, grid=grid, patch_size=(p_t, p_h, p_w), video_tokens=grid[0] * grid[1] * grid[2],
            text_tokens=arguments["encoder_hidden_states"].shape[1], timestep=arguments["timestep"],
        )

    def describe(self, name, module, transformer):
        if (i := block_index(name, "blocks")) is None:
            return None
        return ModuleInfo(name, i, "cross" if name.endswith(".attn2") else "self")

    def run(self, attend, attn, info, hidden_states, encoder_hidden_states, attention_mask, rotary,
            text_tokens):
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - _TEXT_CONTEXT
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary is not None:
            query = _apply_rotary(query, *rotary)
            key = _apply_rotary(key, *rotary)

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = to_heads(attend(to_heads(query), to_heads(key_img), to_heads(value_img), None, None))
            hidden_states_img = hidden_states_img.flatten(2, 3)
            hidden_states_img = hidden_states_img.type_as(query)

        hidden_states = to_heads(attend(to_heads(query), to_heads(key), to_heads(value), attention_mask, None))
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states
