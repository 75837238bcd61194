"""Tile-aligned token order for video grids: 3D tiles as whole kernel tiles, and 3D windows over them.

A video of ``(T, H, W)`` tokens (after patching, row-major as DiTs flatten it) is cut into 3D
tiles of ``(t, h, w)`` tokens, ``t * h * w <= 128``. Each 3D tile fills one 128-slot kernel tile
(tiles at the grid's far edges hold fewer tokens; the remaining slots are padding the kernel
skips through ``tile_len``). In this order a local 3D window is a set of whole kernel tiles, as in
NATTEN's and Sliding Tile Attention's token layouts; text tokens of joint attention follow the
video tiles, dense both ways.

A *packed* order (``packed=True``) keeps the 3D-tile traversal but drops the padding: the video
tokens, tile after tile, fill kernel tiles of exactly 128 (the last one ragged), so a kernel tile is
a run of one or two neighboring 3D tiles. At grids the 3D tiles do not divide this saves the padded
slots' work (Wan 480p: 256 kernel tiles instead of 270, 11% fewer tile pairs at equal density);
windows then cover whole kernel tiles, so a packed window is a superset of the padded one.

The block-sparse kernel reads tensors in the model's order through ``TileOrder.index``
(``seq_index``), so the sparse methods copy nothing; ``TileOrder.gather`` / ``scatter`` move
``[B, heads, S, D]`` tensors between the two orders explicitly (one ``index_select`` each; exact),
for references and comparisons.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .block_sparse import TILE, add_dense_ranges

Triple = tuple[int, int, int]


def _as_triple(value, name: str) -> Triple:
    if isinstance(value, int):
        value = (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3 or any(v < 1 for v in value):
        raise ValueError(f"{name}: expected three positive ints (t, h, w), got {value}")
    return value


@functools.lru_cache(maxsize=256)
def choose_tile(grid: Triple, tile_tokens: int = TILE) -> Triple:
    """The 3D tile of at most ``tile_tokens`` tokens for ``grid``: few tiles (little padding) and a
    compact shape (local windows stay local). The cost is tiles x (1 + 0.02 x longest/shortest
    side), ties going to fewer frames per tile; e.g. Wan 480p (21, 30, 52) gets (7, 3, 6)."""
    T, H, W = grid
    best = None
    for t in range(1, min(T, tile_tokens) + 1):
        for h in range(1, min(H, tile_tokens // t) + 1):
            w = min(W, tile_tokens // (t * h))
            n = math.ceil(T / t) * math.ceil(H / h) * math.ceil(W / w)
            key = (n * (1 + 0.02 * max(t, h, w) / min(t, h, w)), t)
            if best is None or key < best[0]:
                best = (key, (t, h, w))
    return best[1]


@dataclass(frozen=True)
class TileOrder:
    """The tiled order of one (grid, text) geometry.

    Attributes:
        grid: ``(T, H, W)`` video tokens.
        tile: ``(t, h, w)`` tokens per 3D tile.
        text: text tokens, placed after the video tiles.
        tiles: ``(nT, nH, nW)`` 3D tiles per axis.
        packed: whether the video tokens fill kernel tiles without padding (see the module docstring).
        text_first: whether the text tokens come before the video in model order.
        index: long ``[S_tiled]``: model-order position of each tiled slot (padding slots repeat
            a valid position; ``tile_len`` keeps them out of attention).
        inverse: long ``[S_model]``: tiled slot of each model-order position.
        tile_len: int32 ``[n_kernel_tiles]``: valid tokens in each kernel tile (video tiles, then
            text tiles, the last one ragged); they sum to the model's sequence length.
    """

    grid: Triple
    tile: Triple
    text: int
    tiles: Triple
    index: torch.Tensor
    inverse: torch.Tensor
    tile_len: torch.Tensor
    packed: bool = False
    text_first: bool = False

    @property
    def video_tiles(self) -> int:
        """Kernel tiles holding video tokens (the text tiles follow them)."""
        return math.ceil(math.prod(self.grid) / TILE) if self.packed else math.prod(self.tiles)

    def kernel_tiles_of_boxes(self) -> torch.Tensor:
        """Bool ``[video_tiles, 3D tiles]``: which 3D tiles each video kernel tile holds tokens of
        (the identity unless packed)."""
        n3 = math.prod(self.tiles)
        if not self.packed:
            return torch.eye(n3, dtype=torch.bool)
        # the padded order of the same geometry gives each token's 3D tile: its slot // TILE
        padded = tile_order(self.grid, self.tile, self.text, self.text_first)
        n_video = math.prod(self.grid)
        box = padded.inverse[self.index[:n_video].cpu()] // TILE
        member = torch.zeros(self.video_tiles, n3, dtype=torch.bool)
        member[torch.arange(n_video) // TILE, box] = True
        return member

    @property
    def length(self) -> int:
        """Slots in the tiled sequence (padded video tiles, then the text tokens)."""
        return self.index.numel()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, heads, S_model, D]`` -> ``[B, heads, S_tiled, D]``."""
        return x.index_select(2, self.index.to(x.device))

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, heads, S_tiled, D]`` -> ``[B, heads, S_model, D]`` (padding slots dropped)."""
        return x.index_select(2, self.inverse.to(x.device))

    def tile_coords(self) -> torch.Tensor:
        """long ``[3D tiles, 3]``: coordinates of each 3D tile (one per video kernel tile unless packed)."""
        _, nH, nW = self.tiles
        i = torch.arange(math.prod(self.tiles))
        return torch.stack([i // (nH * nW), (i // nW) % nH, i % nW], dim=1)


def tile_order(grid, tile=None, text: int = 0, text_first: bool = False, device=None,
               packed: bool = False) -> TileOrder:
    """The :class:`TileOrder` of a video ``grid`` (``tile`` chosen by :func:`choose_tile` when
    ``None``) with ``text`` text tokens before (``text_first``) or after the video in model order;
    ``packed`` fills kernel tiles with video tokens without padding."""
    grid = _as_triple(grid, "grid")
    tile = choose_tile(grid) if tile is None else _as_triple(tile, "tile")
    if math.prod(tile) > TILE:
        raise ValueError(f"tile: {tile} holds {math.prod(tile)} tokens; at most {TILE} fit a kernel tile. "
                         "Use a smaller tile, or tile=None to choose one.")
    if any(t > g for t, g in zip(tile, grid)):
        raise ValueError(f"tile: {tile} is larger than the grid {grid} along an axis; use tile=None.")
    return _tile_order(grid, tile, int(text), bool(text_first), str(device) if device is not None else "cpu",
                       bool(packed))


@functools.lru_cache(maxsize=64)
def _tile_order(grid: Triple, tile: Triple, text: int, text_first: bool, device: str, packed: bool) -> TileOrder:
    T, H, W = grid
    t, h, w = tile
    nT, nH, nW = math.ceil(T / t), math.ceil(H / h), math.ceil(W / w)
    n = nT * nH * nW
    tiles = torch.arange(n)
    a, b, c = tiles // (nH * nW), (tiles // nW) % nH, tiles % nW
    et = torch.clamp(T - a * t, max=t)  # extent of each tile along each axis (smaller at far edges)
    eh = torch.clamp(H - b * h, max=h)
    ew = torch.clamp(W - c * w, max=w)
    length = et * eh * ew
    slot = torch.arange(TILE)
    within = slot[None, :] < length[:, None]  # [n, TILE]
    s = torch.where(within, slot[None, :], torch.zeros_like(slot)[None, :])  # padding -> the tile's first token
    lt = s // (eh * ew)[:, None]
    lh = (s // ew[:, None]) % eh[:, None]
    lw = s % ew[:, None]
    pos = ((a[:, None] * t + lt) * H + (b[:, None] * h + lh)) * W + (c[:, None] * w + lw)
    video_offset = text if text_first else 0
    index = (pos + video_offset).flatten()
    valid = within.flatten()
    if packed:  # the same traversal without padding slots, cut into full kernel tiles (the last ragged)
        n_video = T * H * W
        n = math.ceil(n_video / TILE)
        video = index[valid]
        index = torch.cat([video, video[:1].expand(n * TILE - n_video)])
        valid = torch.arange(n * TILE) < n_video
        length = torch.full((n,), TILE, dtype=torch.long)
        length[-1] = n_video - (n - 1) * TILE
    text_offset = 0 if text_first else T * H * W
    index = torch.cat([index, torch.arange(text) + text_offset])
    inverse = torch.empty(T * H * W + text, dtype=torch.long)
    slots = torch.arange(index.numel())
    keep = torch.cat([valid, torch.ones(text, dtype=torch.bool)])
    inverse[index[keep]] = slots[keep]
    text_len = torch.full((math.ceil(text / TILE),), TILE, dtype=torch.long)
    if text % TILE:
        text_len[-1] = text % TILE
    tile_len = torch.cat([length, text_len]).to(torch.int32)
    return TileOrder(grid, tile, text, (nT, nH, nW), index.to(device), inverse.to(device), tile_len.to(device),
                     packed, text_first)


def window_tiles(order: TileOrder, window, stride=1) -> torch.Tensor:
    """Bool ``[n_kernel_tiles, n_kernel_tiles]``: the 3D neighborhood layout over ``order``.

    ``window`` ``(t, h, w)`` in tokens is rounded up to whole tiles per axis; each query tile visits
    the window of tiles centered on it, shifted inward at the grid's edges (so every window holds
    the same number of tiles, as in NATTEN). ``stride`` ``(t, h, w)`` in tiles groups query tiles
    that share one window centered on their group (GNA's strided windows; 1 = per tile). Text
    tiles are dense as queries and keys. Over a packed order, a kernel tile visits every kernel tile
    holding part of a window of any 3D tile it holds part of (a superset of the padded layout).
    """
    window = _as_triple(window, "window")
    stride = _as_triple(stride, "stride")
    if any(wd > g for wd, g in zip(window, order.grid)):
        raise ValueError(f"window: {window} is larger than the video grid {order.grid} (frames, height, width "
                         "in tokens after patching); use at most the grid (which is dense attention).")
    span = [min(nt, math.ceil(wd / td)) for wd, td, nt in zip(window, order.tile, order.tiles)]
    if any(s > sp for s, sp in zip(stride, span)):
        raise ValueError(f"stride: {stride} tiles exceeds the window of {tuple(span)} tiles; a query tile must "
                         "lie in its own window. Use a stride of at most the window in tiles.")
    coords = order.tile_coords()
    keep = torch.ones(len(coords), len(coords), dtype=torch.bool)
    for axis in range(3):
        n, sp, st = order.tiles[axis], span[axis], stride[axis]
        x = coords[:, axis]
        first = (x // st) * st
        center = first + (torch.clamp(n - first, max=st) - 1) / 2  # center of the query's group
        start = torch.clamp(torch.floor(center - (sp - 1) / 2 + 0.5), 0, n - sp).long()
        keep &= (coords[None, :, axis] >= start[:, None]) & (coords[None, :, axis] < start[:, None] + sp)
    if order.packed:  # a kernel tile visits every kernel tile holding a key box of any of its query boxes
        member = order.kernel_tiles_of_boxes().float()
        keep = (member @ keep.float() @ member.T) > 0
    n_kernel = order.tile_len.numel()
    out = torch.zeros(n_kernel, n_kernel, dtype=torch.bool)
    out[: order.video_tiles, : order.video_tiles] = keep
    if order.text:
        start = order.video_tiles * TILE
        out = add_dense_ranges(out[None, None], [(start, start + order.text)], order.length)[0, 0]
    return out

