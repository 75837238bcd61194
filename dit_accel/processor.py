"""`AttnProcessor`: one diffusers attention processor for every supported DiT family."""

from __future__ import annotations

import torch

from .geometry import binding_for
from .layout import AttentionCall
from .methods.base import AttentionMethod


class AttnProcessor:
    """Attention processor that computes q, k, v exactly as the family's stock processor and hands
    the attention itself to `method`.

    Use it with `transformer.set_attn_processor(AttnProcessor(method))` or, equivalently and
    preferably (it attaches the geometry hook up front and can be undone),
    `dit_accel.apply(pipe, attention=method)`. One instance may serve every module of a model:
    all per-layer state lives with the transformer's geometry hook, never on the processor.

    Args:
        method: an `AttentionMethod`, e.g. `dit_accel.Dense()`.
    """

    def __init__(self, method: AttentionMethod) -> None:
        if not isinstance(method, AttentionMethod):
            raise TypeError(
                f"method={method!r} is not an attention method; pass one such as dit_accel.Dense()."
            )
        self.method = method

    def __repr__(self) -> str:
        return f"AttnProcessor({self.method!r})"

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        **kwargs,
    ):
        # Wan passes its RoPE positionally where the others pass `image_rotary_emb`.
        binding = binding_for(attn)
        hook, info, method = binding.hook, binding.info, self.method
        layout = hook.layout

        def attend(query, key, value, attn_mask, text_span):
            call = AttentionCall(layout, info, text_span, lambda: hook.state_for(method, info, query.shape))
            return method(query, key, value, attn_mask, call)

        return binding.adapter.run(attend, attn, info, hidden_states, encoder_hidden_states, attention_mask,
                                   image_rotary_emb, layout.text_tokens)
