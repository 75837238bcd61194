"""TemporalSparse's next-step tile mask from the kernel's gap output, in one kernel launch.

For every (batch, head, query tile) row: of the key tiles the row visited, keep those whose gap
(``block_sparse``'s ``return_gap``) is at least ``threshold``, at least the ``k_min`` largest
gaps and at most the ``k_max`` largest (equal gaps rank by visiting order, earlier first, so the
bounds are exact: gaps saturate at 0 for every tile that holds some row's maximum); text key tiles
and text query rows (tiles from ``text_tile`` on) keep everything they visited. The result is a bool
``[B, H, n_q, n_k]`` tile mask. :func:`next_blocks` returns the same selection directly as the next
layout (blocks and counts), so no mask has to be compacted. :func:`next_mask_reference` and
:func:`next_blocks_reference` are the PyTorch twins (same signatures).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .block_sparse import lead_strides, triton, triton_usable

if triton is not None:
    import triton.language as tl


def _check(gap, blocks, counts, n_k: int, k_min: int, k_max: int) -> None:
    if gap.dim() != 4 or blocks.shape[-1] != gap.shape[-1] or blocks.shape[2] != gap.shape[2]:
        raise ValueError(f"gap / blocks: expected [B, H, n_q, width] with matching n_q and width, got "
                         f"{tuple(gap.shape)} and {tuple(blocks.shape)}")
    if counts.shape[-1] != gap.shape[2]:
        raise ValueError(f"counts: expected [B|1, H|1, {gap.shape[2]}], got {tuple(counts.shape)}")
    if not 1 <= k_min or not 1 <= k_max or n_k < 1:
        raise ValueError(f"k_min / k_max / n_k: must be >= 1, got {k_min}, {k_max}, {n_k}")


def _rank_key(g: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering entries by gap (descending sort = largest first), equal gaps by position
    (earlier first): the float's bits made monotone in the high word, the reversed position low."""
    bits = g.contiguous().view(torch.int32)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    pos = torch.arange(g.shape[-1], device=g.device)
    return (mono.long() << 32) | (g.shape[-1] - pos)


def _keep(gap, blocks, counts, n_k, threshold, k_min, k_max, text_tile):
    """Which visited entries survive ([B, H, n_q, W] bool, False past the counts), with the blocks
    expanded to that shape (int64) and the live entries."""
    B, H, n_q, W = gap.shape
    text_tile = n_k if text_tile is None else text_tile
    blocks = blocks.long().expand(B, H, n_q, W)
    live = torch.arange(W, device=gap.device) < counts.expand(B, H, n_q)[..., None]
    g = gap.float().masked_fill(~live, float("-inf"))
    key = _rank_key(g)
    ranked = key.sort(-1, descending=True).values
    k_lo = ranked[..., min(k_min, W) - 1 : min(k_min, W)]
    k_hi = ranked[..., min(k_max, W) - 1 : min(k_max, W)]
    keep = ((g >= threshold) | (key >= k_lo)) & (key >= k_hi)
    text_row = (torch.arange(n_q, device=gap.device) >= text_tile)[:, None]
    keep = live & (keep | (blocks >= text_tile) | text_row)
    return keep, blocks, live


def next_mask_reference(gap, blocks, counts, *, n_k: int, threshold: float, k_min: int, k_max: int,
                        text_tile: int | None = None) -> torch.Tensor:
    """PyTorch twin of :func:`next_mask`."""
    _check(gap, blocks, counts, n_k, k_min, k_max)
    B, H, n_q, W = gap.shape
    keep, blocks, live = _keep(gap, blocks, counts, n_k, threshold, k_min, k_max, text_tile)
    target = torch.where(live, blocks, torch.full_like(blocks, n_k))  # entries past the count: spare column
    mask = torch.zeros(B, H, n_q, n_k + 1, dtype=torch.bool, device=gap.device)
    return mask.scatter_(-1, target, keep)[..., :n_k].contiguous()


if triton is not None:

    @triton.jit
    def _next_mask_kernel(Gap, Blocks, Counts, Mask, CountsOut, TileLen, RowPairs, Refresh, threshold, refresh_above,
                          pairs_scale, H, N_Q, W, N_K, TEXT_TILE, K_MIN, K_MAX, sbb, sbh, scb, sch,
                          W_PAD: tl.constexpr, COMPACT: tl.constexpr, PAIRS: tl.constexpr, PAIRS_SUM: tl.constexpr,
                          REFRESH: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs = tl.arange(0, W_PAD)
        count = tl.load(Counts + b * scb + h * sch + pid_m)
        live = offs < count
        row = pid_bh * N_Q + pid_m
        g = tl.load(Gap + row * W + offs, mask=offs < W, other=float("-inf"))
        g = tl.where(live, g, float("-inf"))
        blk = tl.load(Blocks + b * sbb + h * sbh + pid_m * W + offs, mask=live, other=0)
        bits = g.to(tl.int32, bitcast=True)
        mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        # as _rank_key; slots W..W_PAD (g = -inf, low word 0) rank below every real entry
        key = (mono.to(tl.int64) << 32) | tl.where(offs < W, W - offs, 0).to(tl.int64)
        ranked = tl.sort(key, descending=True)
        k_lo = tl.sum(tl.where(offs == tl.minimum(K_MIN, W) - 1, ranked, 0), 0)
        k_hi = tl.sum(tl.where(offs == tl.minimum(K_MAX, W) - 1, ranked, 0), 0)
        keep = ((g >= threshold) | (key >= k_lo)) & (key >= k_hi)
        keep = live & (keep | (blk >= TEXT_TILE) | (pid_m >= TEXT_TILE))
        if PAIRS:  # (query, key) token pairs this row computed in the layout just run
            lens = tl.load(TileLen + blk, mask=live, other=0).to(tl.float32)
            row_pairs = tl.sum(lens, 0) * tl.load(TileLen + pid_m).to(tl.float32)
            if PAIRS_SUM:  # straight into a running float64 total: no per-row output to reduce
                tl.atomic_add(RowPairs, row_pairs.to(tl.float64) * pairs_scale)
            else:
                tl.store(RowPairs + row, row_pairs)
        if COMPACT:  # the kept entries, in visiting order, as the next layout's blocks and counts
            kept = keep.to(tl.int32)
            pos = tl.cumsum(kept, 0) - 1
            total = tl.sum(kept, 0)
            if REFRESH:  # the refresh value above its bound: every key tile instead
                full = tl.load(Refresh) > refresh_above
                kept = tl.where(full, (offs < N_K).to(tl.int32), kept)
                pos = tl.where(full, offs, pos)
                blk = tl.where(full, offs, blk)
                total = tl.where(full, N_K, total)
            tl.store(Mask + row * W + pos, blk, mask=kept > 0)
            tl.store(Mask + row * W + offs, tl.zeros_like(blk), mask=(offs >= total) & (offs < W))  # zeros past it
            tl.store(CountsOut + row, total)
        else:
            tl.store(Mask + row * N_K + blk, keep.to(tl.int8), mask=live)


def next_mask(gap, blocks, counts, *, n_k: int, threshold: float, k_min: int, k_max: int,
              text_tile: int | None = None) -> torch.Tensor:
    """The next step's tile mask (see the module docstring): the Triton kernel where it can run,
    else the twin.

    Args:
        gap: float32 ``[B, H, n_q, width]``, the kernel's gap output for this layout.
        blocks, counts: the layout that produced it (``tiles_to_blocks``; leading dims may be 1).
        n_k: key tiles (columns of the mask).
        threshold: log2 gap at or above which a visited tile is kept.
        k_min, k_max: per row, keep at least / at most this many tiles (by largest gap).
        text_tile: first text tile (text key tiles and text query rows keep everything); None: no text.
    """
    if not triton_usable(gap):
        return next_mask_reference(gap, blocks, counts, n_k=n_k, threshold=threshold, k_min=k_min, k_max=k_max,
                                   text_tile=text_tile)
    B, H, n_q, W = gap.shape
    mask = torch.zeros(B, H, n_q, n_k, dtype=torch.int8, device=gap.device)
    _launch(gap, blocks, counts, mask, mask, n_k, threshold, k_min, k_max, text_tile, compact=False)
    return mask.view(torch.bool)


def _launch(gap, blocks, counts, out, counts_out, n_k, threshold, k_min, k_max, text_tile, compact: bool,
            tile_len=None, pairs=None, refresh=None, refresh_above=None, pairs_sum=None, pairs_scale=1.0) -> None:
    _check(gap, blocks, counts, n_k, k_min, k_max)
    B, H, n_q, W = gap.shape
    gap = gap.float().contiguous()
    blocks = blocks.to(torch.int32)
    if blocks.stride(-1) != 1 or blocks.stride(-2) != W:
        blocks = blocks.contiguous()
    counts = counts.to(torch.int32)
    lens = tile_len.to(device=gap.device, dtype=torch.int32).contiguous() if tile_len is not None else counts
    flag = counts
    if refresh is not None:  # a bool flag is compared as an int against 0
        flag = refresh.reshape(1) if refresh_above is not None else refresh.to(gap.device, torch.int32).reshape(1)
    pairs_out = pairs_sum if pairs_sum is not None else pairs
    _next_mask_kernel[(n_q, B * H)](
        gap, blocks, counts, out, counts_out, lens, pairs_out if pairs_out is not None else gap, flag,
        float(threshold), float(refresh_above or 0.0), float(pairs_scale), H, n_q, W, n_k,
        n_k if text_tile is None else text_tile, k_min, k_max, *lead_strides(blocks), *lead_strides(counts),
        W_PAD=max(16, triton.next_power_of_2(W)), COMPACT=compact, PAIRS=pairs_out is not None,
        PAIRS_SUM=pairs_sum is not None, REFRESH=refresh is not None, num_warps=4,
    )


class NextLayout(NamedTuple):
    blocks: torch.Tensor  # int32 [B, H, n_q, width], zeros past the count
    counts: torch.Tensor  # int32 [B, H, n_q]
    pairs: torch.Tensor | None  # float32 [B, H, n_q]: token pairs each row computed in the input layout
    # (None when they were added to ``pairs_sum`` instead)


def _check_next(gap, n_k, tile_len, refresh, refresh_above=None, pairs_sum=None) -> None:
    if refresh is not None and gap.shape[-1] < n_k:
        raise ValueError(f"refresh: the full layout needs width >= n_k={n_k}, got width {gap.shape[-1]}")
    if refresh is not None and refresh.numel() != 1:
        raise ValueError(f"refresh: expected a one-element tensor, got shape {tuple(refresh.shape)}")
    if refresh_above is not None and (refresh is None or not refresh.is_floating_point()):
        raise ValueError("refresh_above: needs refresh as a one-element float tensor (the value compared)")
    if pairs_sum is not None and (tile_len is None or pairs_sum.numel() != 1 or pairs_sum.dtype != torch.float64):
        raise ValueError(f"pairs_sum: needs tile_len and a one-element float64 tensor, got "
                         f"{getattr(pairs_sum, 'dtype', None)} {tuple(getattr(pairs_sum, 'shape', ()))}")
    if tile_len is not None and tile_len.numel() != max(n_k, gap.shape[2]):
        raise ValueError(f"tile_len: expected {max(n_k, gap.shape[2])} tile lengths, got {tile_len.numel()}")


def next_blocks_reference(gap, blocks, counts, *, n_k: int, threshold: float, k_min: int, k_max: int,
                          text_tile: int | None = None, tile_len=None, refresh=None, refresh_above=None,
                          pairs_sum=None, pairs_scale: float = 1.0) -> NextLayout:
    """PyTorch twin of :func:`next_blocks`."""
    _check(gap, blocks, counts, n_k, k_min, k_max)
    _check_next(gap, n_k, tile_len, refresh, refresh_above, pairs_sum)
    B, H, n_q, W = gap.shape
    keep, blocks, live = _keep(gap, blocks, counts, n_k, threshold, k_min, k_max, text_tile)
    pos = torch.arange(W, device=gap.device)
    order = torch.where(keep, pos, pos + W).argsort(-1)  # kept entries first, in visiting order
    kept = keep.sum(-1, dtype=torch.int32)
    out = torch.where(pos < kept[..., None], blocks.gather(-1, order), 0).to(torch.int32)
    pairs = None
    if tile_len is not None:
        lens = tile_len.to(gap.device).float()
        pairs = (lens[blocks] * live).sum(-1) * lens[:n_q]
        if pairs_sum is not None:
            pairs_sum.add_(pairs.double().sum() * pairs_scale)
            pairs = None
    if refresh is not None:
        flag = refresh.reshape(()).to(gap.device)
        flag = flag > refresh_above if refresh_above is not None else flag.bool()
        full = torch.where(pos < n_k, pos, 0).to(torch.int32).expand(B, H, n_q, W)
        out = torch.where(flag, full, out)
        kept = torch.where(flag, torch.full_like(kept, n_k), kept)
    return NextLayout(out.contiguous(), kept.contiguous(), pairs)


def next_blocks(gap, blocks, counts, *, n_k: int, threshold: float, k_min: int, k_max: int,
                text_tile: int | None = None, tile_len=None, refresh=None, refresh_above=None,
                pairs_sum=None, pairs_scale: float = 1.0) -> NextLayout:
    """The next step's layout directly as (blocks, counts), without the tile mask: the entries
    :func:`next_mask` keeps, in the order they were visited, int32 ``[B, H, n_q, width]`` (zeros past
    the count) and ``[B, H, n_q]``. Same arguments as :func:`next_mask`, plus, folded into the same
    kernel launch:

    - ``tile_len``: int ``[n_tiles]`` tokens per tile; then ``pairs`` holds, per row, the (query,
      key) token pairs the input layout computed (for density statistics without another pass);
    - ``refresh``: a one-element bool tensor (on the device: no host sync); where true, the next
      layout is every key tile (needs ``width >= n_k``). With ``refresh_above`` (a float), ``refresh``
      is a one-element float tensor instead and the layout refreshes where it exceeds that bound
      (TemporalSparse passes the kernel's summed LSE decrease, ``lse_drop``, with no reduction between);
    - ``pairs_sum``: a one-element float64 tensor (needs ``tile_len``); the launch adds
      ``pairs_scale`` times the pairs of all rows to it instead of returning them per row.
    """
    if not triton_usable(gap):
        return next_blocks_reference(gap, blocks, counts, n_k=n_k, threshold=threshold, k_min=k_min, k_max=k_max,
                                     text_tile=text_tile, tile_len=tile_len, refresh=refresh,
                                     refresh_above=refresh_above, pairs_sum=pairs_sum, pairs_scale=pairs_scale)
    _check_next(gap, n_k, tile_len, refresh, refresh_above, pairs_sum)
    B, H, n_q, W = gap.shape
    out = torch.empty(B, H, n_q, W, dtype=torch.int32, device=gap.device)  # the kernel writes every entry
    kept = torch.empty(B, H, n_q, dtype=torch.int32, device=gap.device)
    pairs = (torch.empty(B, H, n_q, dtype=torch.float32, device=gap.device)
             if tile_len is not None and pairs_sum is None else None)
    _launch(gap, blocks, counts, out, kept, n_k, threshold, k_min, k_max, text_tile, compact=True,
            tile_len=tile_len, pairs=pairs, refresh=refresh, refresh_above=refresh_above, pairs_sum=pairs_sum,
            pairs_scale=pairs_scale)
    return NextLayout(out, kept, pairs)
