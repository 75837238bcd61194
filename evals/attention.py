"""How structured a model's self-attention is: per-layer entropy, local-window mass, tile concentration.

``AttentionProbe`` is an attention method (dense SDPA for the output) that, on chosen denoising
steps and CFG branch, also materializes each video self-attention map in query chunks and
accumulates, per layer:

* ``entropy``: mean row entropy divided by log(keys) (1.0 = uniform attention);
* ``window_mass``: attention mass inside a local 3D window around each query, with the mass a
  uniform map would put there (``window_uniform``) for comparison;
* ``top_tile_mass``: for tiles of ``tile`` consecutive tokens (the granularity of block-sparse
  kernels), the mass each query tile puts on its best ``top_fraction`` of key tiles, averaged
  over heads and query tiles; ``concentrated`` is whether that reaches ``mass_target``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from dit_accel.layout import AttentionCall
from dit_accel.methods.base import AttentionMethod
from dit_accel.methods.dense import Dense


def _window_mask(grid: tuple[int, int, int], window: tuple[int, int, int], device) -> torch.Tensor:
    """[S, S] bool: key within +-window (t, h, w) of the query, tokens in (t, h, w) raster order."""
    T, H, W = grid
    t, h, w = torch.meshgrid(
        torch.arange(T, device=device), torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij"
    )
    pos = torch.stack([t.flatten(), h.flatten(), w.flatten()], dim=1)
    diff = (pos[:, None, :] - pos[None, :, :]).abs()
    lim = torch.tensor(window, device=device)
    return (diff <= lim).all(-1)


class AttentionProbe(AttentionMethod):
    def __init__(self, steps: set[int] | None = None, branch: str | None = "cond", window=(1, 2, 2), tile: int = 128,
                 top_fraction: float = 0.25, mass_target: float = 0.5, chunk: int = 1024):
        self.inner = Dense(backend="sdpa")
        self.steps, self.branch, self.window = steps, branch, tuple(window)
        self.tile, self.top_fraction, self.mass_target, self.chunk = tile, top_fraction, mass_target, chunk
        self.sums: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._masks: dict = {}

    def to_dict(self) -> dict:
        return {"method": "AttentionProbe", "window": self.window, "tile": self.tile, "top_fraction": self.top_fraction}

    def __call__(self, query, key, value, attn_mask, call: AttentionCall):
        out = self.inner(query, key, value, attn_mask, call)
        lay = call.layout
        if (
            call.module.kind == "self"
            and lay.grid is not None
            and (self.steps is None or lay.step_index in self.steps)
            and (self.branch is None or lay.branch == self.branch)
            and query.shape[2] == math.prod(lay.grid)
        ):
            self._measure(query, key, lay.grid, call.module.layer)
        return out

    @torch.no_grad()
    def _measure(self, q, k, grid, layer) -> None:
        B, Hh, S, D = q.shape
        key = (tuple(grid), q.device)
        if key not in self._masks:
            self._masks[key] = _window_mask(grid, self.window, q.device)
        win = self._masks[key]
        n_tiles = math.ceil(S / self.tile)
        top = max(1, math.ceil(self.top_fraction * n_tiles))
        tile_of = torch.arange(S, device=q.device) // self.tile
        acc = self.sums[layer]
        qf, kf = q.float(), k.float()
        tile_mass = torch.zeros(B, Hh, n_tiles, n_tiles, device=q.device)
        for s0 in range(0, S, self.chunk):
            s1 = min(S, s0 + self.chunk)
            p = torch.softmax(qf[:, :, s0:s1] @ kf.transpose(-1, -2) / math.sqrt(D), dim=-1)  # [B, H, c, S]
            ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1) / math.log(S)
            w = win[s0:s1]
            acc["entropy"] += float(ent.sum())
            acc["window_mass"] += float((p * w).sum())
            acc["window_uniform"] += float(w.sum()) / S * B * Hh
            acc["rows"] += (s1 - s0) * B * Hh
            per_key_tile = torch.zeros(B, Hh, s1 - s0, n_tiles, device=q.device).index_add_(3, tile_of, p)
            tile_mass.index_add_(2, tile_of[s0:s1], per_key_tile)
        rows_per_tile = torch.bincount(tile_of, minlength=n_tiles).float()
        tile_mass = tile_mass / rows_per_tile[:, None]  # mean row mass per (query tile, key tile)
        best = tile_mass.sort(dim=-1, descending=True).values[..., :top].sum(-1)  # [B, H, q tiles]
        acc["top_tile_mass"] += float(best.sum())
        acc["tile_rows"] += best.numel()
        acc["calls"] += 1

    def summary(self) -> list[dict]:
        rows = []
        for layer in sorted(self.sums):
            a = self.sums[layer]
            top = a["top_tile_mass"] / a["tile_rows"]
            rows.append(
                {
                    "layer": layer,
                    "entropy": a["entropy"] / a["rows"],
                    "window_mass": a["window_mass"] / a["rows"],
                    "window_uniform": a["window_uniform"] / a["rows"],
                    "top_tile_mass": top,
                    "concentrated": top >= self.mass_target,
                    "calls": int(a["calls"]),
                }
            )
        return rows
