import math

import torch

from dit_accel import Dense
from dit_accel.layout import AttentionCall, ModuleInfo, TokenLayout
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


class ExplicitMap(AttentionMethod):
    """Oracle: the attention map A = softmax(q k^T / sqrt(d) + mask) written out in float64, and for
    the chosen (layer, head) pairs A' = (1 - u) A + u I on the chosen rows; out = A' v."""

    def __init__(self, heads, u, rows):
        self.heads, self.u, self.rows = heads, u, rows

    def __call__(self, query, key, value, attn_mask, call):
        q, k, v = (x.double() for x in (query, key, value))
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.double()
        a = torch.softmax(s, dim=-1)
        chosen = self.heads.get(call.module.layer, []) if call.module.kind in ("self", "joint") else []
        if chosen:
            S = a.shape[-1]
            rows = torch.ones(S, dtype=torch.bool)
            if self.rows == "image" and call.module.kind == "joint" and call.text_span is not None:
                rows[call.text_span[0]:call.text_span[1]] = False
            eye = torch.diag(rows.double())  # identity on the chosen rows only
            keep = torch.diag((~rows).double()) + torch.diag(rows.double()) * (1 - self.u)
            for h in chosen:
                a[:, h] = keep @ a[:, h] + self.u * eye
        return (a @ v).to(query.dtype)


def attention_call(grid, text=0, text_first=False, step=0, kind=None, state=None, timestep=None):
    """An `AttentionCall` of layer 0 over a `grid` video (plus `text` tokens in joint attention) at
    denoising `step` (and `timestep`, a float, when given); `state`: the dict the call's per-method
    storage is (a fresh one when None)."""
    kind = kind or ("joint" if text else "self")
    S = math.prod(grid) + text
    span = None if not text else ((0, text) if text_first else (S - text, S))
    layout = TokenLayout(family="test", batch_size=2, grid=grid, patch_size=(1, 1, 1), video_tokens=math.prod(grid),
                         text_tokens=text, text_position="first" if text_first else "last", step_index=step,
                         timestep=None if timestep is None else torch.tensor([float(timestep)]))
    store = state if state is not None else {}
    return AttentionCall(layout, ModuleInfo("blocks.0.attn1", 0, kind), span, lambda: store)


def tile_of(order) -> torch.Tensor:
    """Each model-order token's tile under ``order`` (an order without padding slots)."""
    out = torch.empty(order.index.numel(), dtype=torch.long)
    out[order.index.long()] = torch.arange(order.index.numel()) // 128
    return out


def summary64(q, k, v, kept, order, pool):
    """float64 attention of every query to the mean key/value of each run of ``pool`` slots of the key
    tiles its query tile skips (``kept``: bool [query tile, key tile] in tiled order, or one such mask
    per batch and head row, [B, H, query tile, key tile]), scores raised by log(pool): (output,
    log-sum-exp) in model order. For orders without padding slots."""
    n, g = kept.shape[-1], 128 // pool
    pos = order.index.long().view(n, g, pool)
    kbar, vbar = (x.double()[:, :, pos].mean(-2).flatten(2, 3) for x in (k, v))  # [B, H, n * g, D]
    s = q.double() @ kbar.transpose(-1, -2) * q.shape[-1] ** -0.5 + math.log(pool)
    s = s.masked_fill(kept[..., tile_of(order), :][..., torch.arange(n).repeat_interleave(g)], float("-inf"))
    return torch.softmax(s, -1) @ vbar, torch.logsumexp(s, -1)


def merge64(o_a, l_a, o_b, l_b):
    """float64 attention over two disjoint key sets from each set's output and log-sum-exp."""
    m = torch.maximum(l_a, l_b)
    a, b = (l_a - m).exp()[..., None], (l_b - m).exp()[..., None]
    return (a * o_a + b * o_b) / (a + b)


def check_estimate64(method, inputs, grid, order, kept, correct):
    """Run ``method`` (an estimate with full passes at steps 0, 1, 3, 5, the forecast starting at step
    1) over the 7 steps of ``inputs`` and check every output against float64: full passes dense; a
    sparse step the exact attention to the ``kept`` tiles (bool [query tile, key tile], or one mask
    per batch and head row) merged with the linear forecast, from the last two full passes, of
    (skipped part - correct x summary part), plus correct x the summary part now. Returns the state
    the method kept."""
    state = {}
    tiles = tile_of(order)
    inside = kept[..., tiles, :][..., tiles]  # [(B, H,) query, key] in model order
    passes = {}
    for step, (q, k, v) in enumerate(inputs):
        out = method(q, k, v, None, attention_call(grid, step=step, state=state))
        s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        if step in (0, 1, 3, 5):
            assert (out.double() - torch.softmax(s, -1) @ v.double()).abs().max() < 1e-4, step
            if step >= 1:
                rest = s.masked_fill(inside, float("-inf"))
                o_sum, l_sum = summary64(q, k, v, kept, order, 128)
                passes[step] = (torch.softmax(rest, -1) @ v.double() - correct * o_sum,
                                torch.logsumexp(rest, -1) - correct * l_sum)
            continue
        newest = [x for x in (1, 3, 5) if x < step][-2:]
        if len(newest) == 1:
            o_f, l_f = passes[newest[0]]
        else:
            (o0, l0), (o1, l1) = (passes[x] for x in newest)
            w = (step - newest[1]) / (newest[1] - newest[0])
            o_f, l_f = o1 + w * (o1 - o0), l1 + w * (l1 - l0)
        o_sum, l_sum = summary64(q, k, v, kept, order, 128)
        live = s.masked_fill(~inside, float("-inf"))
        expect = merge64(torch.softmax(live, -1) @ v.double(), torch.logsumexp(live, -1),
                         o_f + correct * o_sum, l_f + correct * l_sum)
        assert (out.double() - expect).abs().max() < 1e-4, step
    return state
