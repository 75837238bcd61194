"""Base class of attention methods."""

from __future__ import annotations

import dataclasses

import torch

from ..layout import AttentionCall


class AttentionMethod:
    """An attention computation that knows nothing of model families.

    Subclasses are dataclasses (plain, printable, serialisable configuration) and implement
    `__call__(query, key, value, attn_mask, call) -> out`, with `query` `[batch, heads, q_len,
    head_dim]`, `key`/`value` `[batch, heads, kv_len, head_dim]`, `attn_mask` `None`, a bool mask
    (True = attend) or an additive float bias broadcastable to `[batch, heads, q_len, kv_len]`,
    and `out` `[batch, heads, q_len, head_dim]` in the dtype of `query`.
    """

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attn_mask: torch.Tensor | None, call: AttentionCall) -> torch.Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """The method's configuration as plain data: `{"method": name, **fields}`."""
        return {"method": type(self).__name__, **dataclasses.asdict(self)}
