"""Estimating the key tiles a sparse pass skips: merging attention parts through their
log-sum-exps, forecasting a part from earlier passes, and summary tokens of the skipped tiles.

Attention over two disjoint key sets is exactly the merge of each set's output weighted by its
log-sum-exp (LSE), so a sparse pass can add an estimate of the tiles it skips as one more part:
`Neighborhood(estimate=True)` and `TemporalSparse(estimate=True)` forecast that part from the full
passes and correct the forecast by what summary tokens of the skipped tiles (one mean key and value
per run of keys) do now.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..kernels.block_sparse import TILE, _tile_len_mask, blocks_to_mask
from ..kernels.tile_order import TileOrder

_CHUNK = 2**26  # elements per temporary of the summary computations (256 MB in float32)


def merge(out_a, lse_a, out_b, lse_b) -> torch.Tensor:
    """Attention over two disjoint key sets from each set's output and log-sum-exp (same token order),
    in ``out_a``'s dtype."""
    m = torch.maximum(lse_a, lse_b)
    a, b = torch.exp(lse_a - m).nan_to_num(0.0), torch.exp(lse_b - m).nan_to_num(0.0)
    return ((a[..., None] * out_a.float() + b[..., None] * out_b.float()) / (a + b)[..., None]).to(out_a.dtype)


def merge_into(out_a, lse_a, out_b, lse_b) -> torch.Tensor:
    """`merge` as one interpolation in ``out_a``'s dtype (its weight ``sigmoid(lse_b - lse_a)`` rounded
    to that dtype too); ``lse_a`` must be finite."""
    weight = torch.sigmoid(lse_b - lse_a).to(out_a.dtype)[..., None]
    return torch.lerp(out_a, out_b.to(out_a.dtype), weight)


def forecast(history, at: float, damp: float = 1.0):
    """The (output, log-sum-exp) at ``at`` of the polynomial through the ``(output, lse, clock)``
    passes of ``history`` (Newton's form; one pass: that pass), its change from the newest pass
    scaled by ``damp``; rows where any pass skipped nothing (lse -inf) keep the newest pass's values."""
    if len(history) == 1:
        return history[-1][:2]
    xs = [h[2] for h in history]
    finite = torch.stack([torch.isfinite(h[1]) for h in history]).all(0)
    outs = [h[0].float() for h in history]
    lses = [torch.where(finite, h[1], 0.0) for h in history]
    out, lse = _newton(outs, xs, at), _newton(lses, xs, at)
    if damp != 1.0:
        out, lse = outs[-1] + damp * (out - outs[-1]), lses[-1] + damp * (lse - lses[-1])
    lse = torch.where(finite, lse, history[-1][1])
    out = torch.where(finite[..., None], out, outs[-1])
    return out.to(history[-1][0].dtype), lse


def _newton(values, xs, at: float):
    """The interpolating polynomial through ``(xs[i], values[i])`` evaluated at ``at``."""
    coef = list(values)
    for j in range(1, len(xs)):
        for i in range(len(xs) - 1, j - 1, -1):
            coef[i] = (coef[i] - coef[i - 1]) / (xs[i] - xs[i - j])
    result = coef[-1]
    for i in range(len(xs) - 2, -1, -1):
        result = result * (at - xs[i]) + coef[i]
    return result


def slots(order: TileOrder) -> tuple[torch.Tensor, torch.Tensor]:
    """(model position of every tiled slot, which slots hold a token) of ``order``."""
    idx = order.index.long()
    return idx, _tile_len_mask(order.tile_len, idx.numel(), TILE)


def _padded(idx, valid, n: int):
    """Slot positions and validity padded with empty slots to ``n`` whole tiles (a short last tile:
    text)."""
    pad = n * TILE - idx.numel()
    return (idx, valid) if not pad else tuple(torch.cat([x, x.new_zeros(pad)]) for x in (idx, valid))


def run_means(x, idx, valid, pool: int):
    """Mean of ``x [B, H, S, D]`` over each run of ``pool`` consecutive slots (model positions ``idx``,
    only the ``valid`` ones): ``([B, H, runs, D] float32, run lengths [runs])``, in chunks of runs."""
    B, H, _, D = x.shape
    runs = idx.numel() // pool
    w = valid.view(runs, pool, 1)
    length = w.sum((1, 2)).float()
    w = w.to(x.dtype)
    out = x.new_empty((B, H, runs, D), dtype=torch.float32)
    step = max(1, _CHUNK // (B * H * pool * D))
    for a in range(0, runs, step):
        m = min(runs - a, step)
        run = x.index_select(2, idx[a * pool:(a + m) * pool]).view(B, H, m, pool, D).mul_(w[a:a + m])
        out[:, :, a:a + m] = run.sum(-2, dtype=torch.float32) / length[a:a + m, None].clamp(1)
    return out, length


class SummaryMask(NamedTuple):
    """Which summary tokens each query sees (`summary_mask`), for `summary_part`."""

    visited: torch.Tensor  # bool [B|1, H|1, n, n]: query tile visits key tile (its summary hidden)
    log_len: torch.Tensor  # float32 [n]: log(tile length), -inf for empty tiles
    tile_of: torch.Tensor  # long [tokens]: each model-order token's query tile


def summary_mask(order: TileOrder, visited) -> SummaryMask:
    """The summary tokens of ``order``'s key tiles that each query sees: one per key tile its query
    tile skips (``visited``: bool ``[B|1, H|1, n, n]``, a layout shared by every batch and head row
    or one per row), scored with log(tile length)."""
    device = order.inverse.device
    return SummaryMask(visited.to(device), order.tile_len.to(device).float().log(), order.inverse // TILE)


def _bias(mask: SummaryMask, start: int, stop: int) -> torch.Tensor:
    """Score bias ``[B|1, H|1, stop - start, n]`` of the summary tokens for model rows start:stop."""
    return mask.log_len.masked_fill(mask.visited[:, :, mask.tile_of[start:stop]], float("-inf"))


def summary_part(q, k, v, order: TileOrder, mask: SummaryMask):
    """Attention of every query to one summary token per key tile (the tile's mean key and mean value)
    that ``mask`` (`summary_mask`) shows it, scored as if every key of the tile scored like the mean
    (log of its length added), in model order: ``(out in q's dtype, lse float32)``; rows that see no
    summary get output 0 and lse -inf. Scores and the value product run as matmuls in q's dtype, the
    softmax in float32, in chunks of rows."""
    idx, valid = slots(order)
    n = order.tile_len.numel()
    idx, valid = _padded(idx, valid, n)
    B, H, S, D = q.shape
    kbar = (run_means(k, idx, valid, TILE)[0] * D**-0.5).to(q.dtype).transpose(-1, -2)  # scale folded in
    vbar = run_means(v, idx, valid, TILE)[0].to(q.dtype)  # [B, H, n, D]
    out = torch.empty_like(q)
    lse = q.new_empty((B, H, S), dtype=torch.float32)
    rows = max(1, _CHUNK // (B * H * n))
    for a in range(0, S, rows):
        s = torch.matmul(q[:, :, a:a + rows], kbar).float().add_(_bias(mask, a, a + rows))
        part = torch.logsumexp(s, -1)
        p = s.sub_(part[..., None]).exp_().nan_to_num_(0.0)
        out[:, :, a:a + rows] = torch.matmul(p.to(q.dtype), vbar)
        lse[:, :, a:a + rows] = part
    return out, lse


def summary_attention(q, k, v, blocks, counts, tile_len, seq_index, pool: int = TILE):
    """Attention of every query to summary tokens of the key tiles its layout skips, in tile-slot order:
    ``(out [B, H, slots, D] float32, lse [B, H, slots])``, plus the slots' model positions and validity.

    Each skipped key tile gives ``TILE // pool`` summary tokens, one per run of ``pool`` slots: the
    run's mean key and mean value, its score raised by log(run length), as if every key of the run
    scored like the mean key (exact when they are equal). Rows that skip nothing get lse -inf and
    output 0. Computed in float32 PyTorch, in chunks of tiles."""
    if pool < 1 or TILE % pool:
        raise ValueError(f"pool={pool}: keys per summary token must divide the tile ({TILE})")
    idx = seq_index.long()
    n, g = -(-idx.numel() // TILE), TILE // pool
    B, H, _, D = q.shape
    valid = (_tile_len_mask(tile_len, idx.numel(), TILE) if tile_len is not None
             else torch.ones_like(idx, dtype=torch.bool))
    idx, valid = _padded(idx, valid, n)
    kbar, length = run_means(k, idx, valid, pool)
    vbar, _ = run_means(v, idx, valid, pool)
    bias = length.log()  # empty runs: -inf
    hidden = blocks_to_mask(blocks, counts, n, n, 1, 1).repeat_interleave(g, dim=-1)  # [B|1, H|1, n, n * g]
    out = q.new_empty((B, H, n * TILE, D), dtype=torch.float32)
    lse = q.new_empty((B, H, n * TILE), dtype=torch.float32)
    step = max(1, _CHUNK // (B * H * TILE * n * g))
    for a in range(0, n, step):
        m = min(n - a, step)
        qt = q.index_select(2, idx[a * TILE:(a + m) * TILE]).view(B, H, m, TILE, D).float()
        s = torch.einsum("bhmtd,bhkd->bhmtk", qt, kbar) * D**-0.5 + bias
        s = s.masked_fill(hidden[:, :, a:a + m, None, :], float("-inf"))
        part = torch.logsumexp(s, -1)
        p = torch.exp(s - part[..., None]).nan_to_num(0.0)
        out[:, :, a * TILE:(a + m) * TILE] = torch.einsum("bhmtk,bhkd->bhmtd", p, vbar).reshape(B, H, m * TILE, D)
        lse[:, :, a * TILE:(a + m) * TILE] = part.reshape(B, H, m * TILE)
    return out, lse, idx, valid
