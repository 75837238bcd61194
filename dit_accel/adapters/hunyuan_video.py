"""HunyuanVideoTransformer3DModel: joint attention with video tokens first and a text padding
mask; single-stream blocks concatenate text inside the processor; the token refiner runs plain
self-attention over text. Mirrors diffusers 0.42 `HunyuanVideoAttnProcessor2_0` and, for the
refiner, `AttnProcessor2_0`."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..layout import ModuleInfo
from .base import Adapter, block_index, standard_attention, to_heads


class HunyuanVideoAdapter(Adapter):
    family = "hunyuan-video"
    model_class = "HunyuanVideoTransformer3DModel"
    text_position = "last"

    def layout_fields(self, transformer, arguments):
        batch_size, _, frames, height, width = arguments["hidden_states"].shape
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        grid = (frames // p_t, height // p, width // p)
        return dict(
            batch_size=batch_size, grid=grid, patch_size=(p_t, p, p), video_tokens=grid[0] * grid[1] * grid[2],
            text_tokens=arguments["encoder_hidden_states"].shape[1], timestep=arguments["timestep"],
            text_mask=arguments["encoder_attention_mask"].bool(),
        )

    def describe(self, name, module, transformer):
        double = len(transformer.transformer_blocks)
        if (i := block_index(name, "transformer_blocks")) is not None:
            return ModuleInfo(name, i, "joint")
        if (i := block_index(name, "single_transformer_blocks")) is not None:
            return ModuleInfo(name, double + i, "joint")
        if (i := block_index(name, "context_embedder.token_refiner.refiner_blocks")) is not None:
            return ModuleInfo(name, i, "text")
        return None

    def run(self, attend, attn, info, hidden_states, encoder_hidden_states, attention_mask, rotary,
            text_tokens):
        if info.kind == "text":
            return standard_attention(attend, attn, hidden_states, encoder_hidden_states, attention_mask)

        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if rotary is not None:
            if attn.add_q_proj is None and encoder_hidden_states is not None:
                n = encoder_hidden_states.shape[1]
                query = torch.cat([apply_rotary_emb(query[:, :-n], rotary, sequence_dim=1), query[:, -n:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-n], rotary, sequence_dim=1), key[:, -n:]], dim=1)
            else:
                query = apply_rotary_emb(query, rotary, sequence_dim=1)
                key = apply_rotary_emb(key, rotary, sequence_dim=1)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states)
            encoder_key = attn.add_k_proj(encoder_hidden_states)
            encoder_value = attn.add_v_proj(encoder_hidden_states)
            encoder_query = encoder_query.unflatten(2, (attn.heads, -1))
            encoder_key = encoder_key.unflatten(2, (attn.heads, -1))
            encoder_value = encoder_value.unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        text_span = None
        if encoder_hidden_states is not None:
            text_span = (query.shape[1] - encoder_hidden_states.shape[1], query.shape[1])
        hidden_states = to_heads(attend(to_heads(query), to_heads(key), to_heads(value), attention_mask, text_span))
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            n = encoder_hidden_states.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :-n], hidden_states[:, -n:]
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
