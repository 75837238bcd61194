"""What every family adapter provides, and the mirror of diffusers' generic `AttnProcessor2_0`.

An adapter knows one transformer family: how to read a `TokenLayout` from the arguments of the
transformer's `forward`, what each of its attention modules computes (`ModuleInfo`), and how to
run one attention module exactly as the diffusers 0.42 stock processor does, handing the
attention itself to `attend(query, key, value, attn_mask, text_span)` in `[batch, heads, seq,
head_dim]` layout.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import torch

from ..layout import ModuleInfo

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", "tuple[int, int] | None"],
                  torch.Tensor]
"""`attend(query, key, value, attn_mask, text_span) -> out`, all `[batch, heads, seq, head_dim]`."""


class Adapter:
    """Base class of the per-family adapters.

    Subclasses set `family`, `model_class` (the diffusers transformer class name),
    `text_position`, `batched_cfg` (whether the family's stock pipeline concatenates the CFG
    branches into one batch, unconditional rows first) and implement `layout_fields`,
    `describe` and `run`.
    """

    family: str = ""
    model_class: str = ""
    text_position: str = "cross"
    batched_cfg: bool = False

    def __init__(self) -> None:
        self._signature: inspect.Signature | None = None

    def bind_arguments(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Map a forward call's positional and keyword arguments to parameter names."""
        if self._signature is None:
            self._signature = inspect.signature(type(transformer).forward)
        bound = self._signature.bind(transformer, *args, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    def layout_fields(self, transformer: torch.nn.Module, arguments: dict[str, Any]) -> dict[str, Any]:
        """`TokenLayout` fields read from the forward arguments: batch_size, grid, patch_size,
        video_tokens, text_tokens, timestep and (where the family has one) text_mask."""
        raise NotImplementedError

    def describe(self, name: str, module: torch.nn.Module, transformer: torch.nn.Module) -> ModuleInfo:
        """`ModuleInfo` of the attention module at `name` in `transformer`."""
        raise NotImplementedError

    def run(self, attend: Attend, attn: torch.nn.Module, info: ModuleInfo, hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None,
            rotary: Any, text_tokens: int) -> Any:
        """Compute the attention module's output as the stock processor does, calling `attend`
        where the stock processor calls SDPA. `text_tokens` is the layout's text length (needed
        where a module is not told, e.g. Flux single-stream blocks)."""
        raise NotImplementedError


def block_index(name: str, prefix: str) -> int | None:
    """Index `i` of a module named `<prefix>.<i>.<...>`, or `None` when `name` is elsewhere."""
    match = re.match(rf"^{re.escape(prefix)}\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def to_heads(x: torch.Tensor) -> torch.Tensor:
    """`[batch, seq, heads, head_dim]` -> `[batch, heads, seq, head_dim]` (a view, as diffusers'
    native dispatch permutes before SDPA)."""
    return x.permute(0, 2, 1, 3)


def project_heads(attn: torch.nn.Module, hidden_states: torch.Tensor, kv_states: torch.Tensor,
                  added: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """q from `hidden_states`, k and v from `kv_states`, split into heads as
    `[batch, heads, seq, head_dim]` and QK-normed: the opening lines that diffusers'
    `Attention`-module processors (`AttnProcessor2_0`, `JointAttnProcessor2_0`,
    `CogVideoXAttnProcessor2_0`) share. `added=True` uses the context stream's projections and
    norms (`add_q_proj`..., `norm_added_q/k`) of joint attention. Returns `(query, key, value, head_dim)`."""
    to_q, to_k, to_v = ((attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if added
                        else (attn.to_q, attn.to_k, attn.to_v))
    norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if added else (attn.norm_q, attn.norm_k)
    batch_size = hidden_states.shape[0]
    query = to_q(hidden_states)
    key = to_k(kv_states)
    value = to_v(kv_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value, head_dim


def standard_attention(attend: Attend, attn: torch.nn.Module, hidden_states: torch.Tensor,
                       encoder_hidden_states: torch.Tensor | None,
                       attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mirror of diffusers' `AttnProcessor2_0` for the 3-D inputs DiTs use (HunyuanVideo's token
    refiner goes through it)."""
    residual = hidden_states
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    query, key, value, head_dim = project_heads(attn, hidden_states, encoder_hidden_states)

    hidden_states = attend(query, key, value, attention_mask, None)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor
