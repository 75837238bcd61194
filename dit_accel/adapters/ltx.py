"""LTXVideoTransformer3DModel: video-only self-attention with RoPE applied before the head
split, and cross-attention to text with a padding mask. Mirrors diffusers 0.42
`LTXVideoAttnProcessor`."""

from __future__ import annotations

from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from ..layout import ModuleInfo
from .base import Adapter, block_index, to_heads


class LTXAdapter(Adapter):
    family = "ltx"
    model_class = "LTXVideoTransformer3DModel"
    text_position = "cross"
    batched_cfg = True

    def layout_fields(self, transformer, arguments):
        hidden_states = arguments["hidden_states"]
        batch_size, video_tokens = hidden_states.shape[:2]
        # LTX pipelines pack latents before the call and pass the packed grid explicitly.
        dims = (arguments["num_frames"], arguments["height"], arguments["width"])
        grid = tuple(int(x) for x in dims) if all(x is not None for x in dims) else None
        if grid is not None and grid[0] * grid[1] * grid[2] != video_tokens:
            grid = None
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        mask = arguments["encoder_attention_mask"]
        return dict(
            batch_size=batch_size, grid=grid, patch_size=(p_t, p, p), video_tokens=video_tokens,
            text_tokens=arguments["encoder_hidden_states"].shape[1], timestep=arguments["timestep"],
            text_mask=None if mask is None else mask.bool(),
        )

    def describe(self, name, module, transformer):
        if (i := block_index(name, "transformer_blocks")) is None:
            return None
        return ModuleInfo(name, i, "cross" if name.endswith(".attn2") else "self")

    def run(self, attend, attn, info, hidden_states, encoder_hidden_states, attention_mask, rotary,
            text_tokens):
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if rotary is not None:
            query = apply_rotary_emb(query, rotary)
            key = apply_rotary_emb(key, rotary)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        hidden_states = to_heads(attend(to_heads(query), to_heads(key), to_heads(value), attention_mask, None))
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states
