import torch

from dit_accel import Dense
from dit_accel.methods.base import AttentionMethod


class Recorder(AttentionMethod):
    """Dense SDPA that records every call it serves: (ModuleInfo, TokenLayout, text_span, q shape,
    mask given)."""

    def __init__(self, scale: float = 1.0):
        self.inner = Dense(backend="sdpa")
        self.scale = scale
        self.calls = []

    def __call__(self, query, key, value, attn_mask, call):
        self.calls.append((call.module, call.layout, call.text_span, tuple(query.shape), tuple(key.shape),
                           attn_mask is not None))
        out = self.inner(query, key, value, attn_mask, call)
        return out * self.scale if self.scale != 1.0 else out

    def to_dict(self):
        return {"method": "Recorder"}


def pipeline_output(pipe, kwargs, output_type="latent"):
    """Run `pipe` on `kwargs` with a fresh copy of its generator, so repeated calls see the same noise."""
    generator = torch.Generator().set_state(kwargs["generator"].get_state())
    out = pipe(**{**kwargs, "output_type": output_type, "generator": generator})
    return out.frames if hasattr(out, "frames") else out.images

