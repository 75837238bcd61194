"""Probe: how close to dense can *any* choice of key tiles get on the ShapesBench reference model?

    python -m dit_accel.benchmarks.sparse_oracle                       # GPU, 64 held-out prompts
    python -m dit_accel.benchmarks.sparse_oracle --prompts 1 --steps 2 --recall-prompts 1 \
        --configs "keep 0.4, per call"                                 # smoke

`Neighborhood` and `TemporalSparse` guess which key tiles matter (a fixed window; last step's
weights). This probe removes the guess: an oracle computes the exact attention of each call, keeps
the key tiles that carry the most attention mass and runs the block-sparse kernel over them, so no
selection rule of the same density keeps more of the mass (with as many key tiles per query tile, or
per call). It bounds what tile selection can reach on this model; it is not a method (it does the
dense work to choose), and the mass it keeps is what it maximizes, not the video's PSNR.

Two parts:

- ``generate``: the held-out suite with the oracle at a share ``keep`` of the tile pairs, chosen per
  query tile (the same number of key tiles for each, over the methods' 3D tiles) or per call (the
  heaviest pairs across all heads and query tiles, which gives concentrated heads fewer tiles and
  diffuse heads more). PSNR / SSIM against the dense video of the same seed, the checker's change
  from dense, density as the methods count it (dense steps in full). Also at about 40% density with the
  first 3 or 6 steps dense and fewer tiles after them.
- ``recall``: at steps 5, 10 and 15 (the last step when there are fewer) of the first
  ``--recall-prompts`` prompts (conditional branch), per layer: the attention mass that the best
  ``keep`` share keeps per query and the relative error of the attention output
  (``|out - dense| / |dense|``, the kept weights renormalized), for three groupings: the 3D tiles,
  tiles of tokens grouped by k-means on the queries and on the keys of each head (Sparse VideoGen
  2's semantic permutation, oracle-selected), and single tokens (the best keys of each query: no
  tiling at all).

Writes ``benchmarks/results/sparse-oracle-<device>-<date>.json`` (or ``--out DIR``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from dit_accel.benchmarks.reference import _generate
from dit_accel.benchmarks.report import command_line, print_table
from dit_accel.benchmarks.sparse_pooled import probe_configs, probe_parser, run_probe
from dit_accel.kernels.block_sparse import TILE, tiles_to_blocks
from dit_accel.kernels.tile_order import TileOrder, tile_order
from dit_accel.methods.base import AttentionMethod
from dit_accel.methods.sparse import _TiledSparse, block_sparse_attention
from dit_accel.pipelines import load_reference
from dit_accel.pipelines.shapes.pipeline import DEFAULT_SIZE
from dit_accel.pipelines.shapes.suite import held_out_suite

import dit_accel

RECALL_STEPS = (5, 10, 15)


def token_tiles(order: TileOrder) -> torch.Tensor:
    """long ``[S_model]``: the kernel tile of each model-order token."""
    return order.inverse // TILE


def masses_of(p: torch.Tensor, tiles_q, tiles_k, n_q: int, n_k: int) -> torch.Tensor:
    """``[..., n_q, n_k]``: per query tile, the mean over its queries of the attention mass that the
    probabilities ``p`` ``[..., S_q, S_k]`` put on each key tile; ``tiles_q`` / ``tiles_k``: each token's tile."""
    one_q = torch.nn.functional.one_hot(tiles_q, n_q).float()  # [S, n_q]
    one_k = torch.nn.functional.one_hot(tiles_k, n_k).float()
    return (one_q.T / one_q.sum(0)[:, None]) @ (p @ one_k)


def tile_masses(q, k, tiles_q, tiles_k, n_q: int, n_k: int, chunk: int = 8) -> torch.Tensor:
    """float32 ``[B, H, n_q, n_k]``: :func:`masses_of` the exact attention (softmax of ``q k^T / sqrt(d)``),
    computed ``chunk`` (batch, head) pairs at a time."""
    B, H, S, D = q.shape
    qf, kf = q.reshape(B * H, S, D), k.reshape(B * H, k.shape[2], D)
    out = []
    for i in range(0, B * H, chunk):
        p = torch.softmax(qf[i:i + chunk].float() @ kf[i:i + chunk].float().transpose(1, 2) * D**-0.5, -1)
        out.append(masses_of(p, tiles_q, tiles_k, n_q, n_k))
    return torch.cat(out).view(B, H, n_q, n_k)


def best_tiles(mass: torch.Tensor, keep: float, allocation: str, lens: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, H, n, n]``: the tiles to visit for a share ``keep`` of the token pairs.

    ``"row"``: the ``round(keep * n)`` heaviest key tiles of each query tile. ``"call"``: the pairs of
    the whole call in decreasing mass per key token until ``keep`` of the pairs are taken (each query
    tile's heaviest key tile always)."""
    n = mass.shape[-1]
    if allocation == "row":
        top = mass.topk(max(1, round(keep * n)), dim=-1).indices
        return torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, top, True)
    if allocation != "call":
        raise ValueError(f"allocation: expected 'row' or 'call', got {allocation!r}")
    lens = lens.to(mass.device).float()
    cost = (lens[:, None] * lens[None, :]).expand_as(mass).flatten()
    order = (mass / lens).flatten().argsort(descending=True)
    taken = cost[order].cumsum(0) <= keep * cost.sum()
    sel = torch.zeros(mass.numel(), dtype=torch.bool, device=mass.device)
    sel[order[taken]] = True
    sel = sel.view_as(mass)
    return sel.scatter_(-1, mass.argmax(-1, keepdim=True), True)


@dataclass
class OracleTiles(_TiledSparse):
    """Visits the key tiles that carry the most exact attention mass in this very call (see the module
    docstring); ``keep``: share of the token pairs; ``allocation``: ``"row"`` or ``"call"``."""

    keep: float = 0.4
    allocation: str = "row"
    tile: tuple | None = None
    dense_steps: int = 0
    dense_layers: tuple = ()
    packed: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ValueError(f"OracleTiles(keep={self.keep}): must be in (0, 1]")
        self._check_common()

    def __call__(self, query, key, value, attn_mask, call=None):
        order = self._order(query, key, attn_mask, call)
        if order is None or self._dense_step(order, call, query):
            return self._dense(query, key, value, attn_mask, call)
        n = order.tile_len.numel()
        tiles = token_tiles(order)
        sel = best_tiles(tile_masses(query, key, tiles, tiles, n, n), self.keep, self.allocation, order.tile_len)
        lens = order.tile_len.double()
        rows = query.shape[0] * query.shape[1]
        self._count(float(torch.einsum("bhqk,q,k->", sel.double(), lens, lens)) / rows, order, rows)
        blocks, counts = tiles_to_blocks(sel, width=n)
        return block_sparse_attention(query, key, value, blocks, counts, tile_len=order.tile_len,
                                      seq_index=order.index)


def kmeans_tiles(x: torch.Tensor, n_tiles: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """long ``[S]``: tiles of ``TILE`` tokens of ``x`` ``[S, D]``, formed by sorting the tokens by their
    k-means cluster (``n_tiles`` clusters, Lloyd's iterations from a seeded random pick)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    centers = x[torch.randperm(x.shape[0], generator=g)[:n_tiles].to(x.device)].clone()
    for _ in range(iters):
        label = torch.cdist(x, centers).argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, label, x)
        count = torch.bincount(label, minlength=n_tiles)
        centers = torch.where(count[:, None] > 0, sums / count.clamp_min(1)[:, None], centers)
    rank = torch.empty_like(label)
    rank[torch.argsort(label, stable=True)] = torch.arange(x.shape[0], device=x.device)
    return rank // TILE


def kept(p: torch.Tensor, v: torch.Tensor, keep_mask: torch.Tensor) -> tuple[float, float]:
    """(mean mass the kept keys hold per query, relative error of the renormalized output)."""
    pk = p * keep_mask
    mass = pk.sum(-1)
    dense = p @ v
    out = (pk @ v) / mass[:, None]
    return float(mass.mean()), float((out - dense).norm() / dense.norm())


@dataclass
class RecallProbe(AttentionMethod):
    """Dense attention that, at ``steps``, measures per layer what the best ``keep`` share keeps."""

    keep: tuple = (0.4, 0.25)
    steps: tuple = RECALL_STEPS
    rows: int = 1
    found: list = field(default_factory=list, repr=False)

    def __call__(self, query, key, value, attn_mask, call=None):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
        if call is None or call.module.kind != "self" or call.layout.step_index not in self.steps:
            return out
        order = tile_order(call.layout.grid, device=query.device)
        n = order.tile_len.numel()
        tiles = token_tiles(order)
        rows = list(call.layout.cond_rows or range(query.shape[0]))[:self.rows]
        S, D = query.shape[2], query.shape[3]
        for b in rows:
            for h in range(query.shape[1]):
                q, k, v = (t[b, h].float() for t in (query, key, value))
                p = torch.softmax(q @ k.T * D**-0.5, -1)
                n_km = math.ceil(S / TILE)
                tq, tk = kmeans_tiles(q, n_km, seed=h), kmeans_tiles(k, n_km, seed=h)
                groupings = {"3d": (tiles, tiles, n, n), "kmeans": (tq, tk, n_km, n_km)}
                masses = {name: masses_of(p, *g) for name, g in groupings.items()}
                for keep in self.keep:
                    row = {"layer": call.module.layer, "step": call.layout.step_index, "head": h, "keep": keep}
                    for name, (a, c, na, _) in groupings.items():
                        lens = torch.bincount(a, minlength=na)
                        sel = best_tiles(masses[name][None, None], keep, "row", lens)[0, 0]
                        row[name] = kept(p, v, sel[a][:, c])
                    top = p.topk(max(1, round(keep * S)), dim=-1).indices
                    row["tokens"] = kept(p, v, torch.zeros_like(p, dtype=torch.bool).scatter_(-1, top, True))
                    self.found.append(row)
        return out


def recall(pipe, device, prompts: int, batch: int, steps: int, keep=(0.4, 0.25)) -> list[dict]:
    """Per layer and keep share: mean / min over heads, steps and prompts of the kept mass and the
    output error for each grouping (see the module docstring)."""
    at = tuple(s for s in RECALL_STEPS if s < steps) or (steps - 1,)
    probe = RecallProbe(keep=tuple(keep), steps=at, rows=batch)
    with dit_accel.apply(pipe, attention=probe):
        _generate(pipe, held_out_suite(prompts), device, batch, num_inference_steps=steps, **DEFAULT_SIZE)
    table = []
    for keep_share in keep:
        for layer in sorted({r["layer"] for r in probe.found}):
            rows = [r for r in probe.found if r["layer"] == layer and r["keep"] == keep_share]
            entry = {"keep": keep_share, "layer": layer, "samples": len(rows)}
            for name in ("3d", "kmeans", "tokens"):
                mass = np.array([r[name][0] for r in rows])
                err = np.array([r[name][1] for r in rows])
                entry |= {f"{name}_mass": round(float(mass.mean()), 3), f"{name}_mass_min": round(float(mass.min()), 3),
                          f"{name}_err": round(float(err.mean()), 3), f"{name}_err_max": round(float(err.max()), 3)}
            table.append(entry)
    return table


CONFIGS = {
    f"keep {keep}, per {where}": functools.partial(OracleTiles, keep=keep, allocation=alloc)
    for keep in (0.8, 0.6, 0.4, 0.25) for where, alloc in (("query tile", "row"), ("call", "call"))
} | {  # the first steps dense, the rest sparser: about 40% density in all
    f"keep {keep}, per query tile, {steps} dense steps": functools.partial(OracleTiles, keep=keep, dense_steps=steps)
    for keep, steps in ((0.28, 3), (0.14, 6))
}


def main(argv=None) -> None:
    ap = probe_parser(__doc__, CONFIGS, "sparse-oracle")
    ap.add_argument("--parts", default="recall,generate", help="comma-separated: recall, generate")
    ap.add_argument("--recall-prompts", type=int, default=4)
    args = ap.parse_args(argv)
    names = probe_configs(ap, args, CONFIGS)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"recall", "generate"}:
        ap.error(f"--parts: expected a comma-separated subset of recall, generate; got {args.parts!r}")
    device = torch.device(args.device)
    pipe = load_reference(device=device, dtype=None)
    pipe.set_progress_bar_config(disable=True)
    extra = {}
    if "recall" in parts:
        extra["recall"] = recall(pipe, device, args.recall_prompts, args.recall_prompts, args.steps)
        print_table(extra["recall"], list(extra["recall"][0]))
    variants = [({"config": name}, CONFIGS[name], contextlib.nullcontext) for name in names]
    command = command_line("dit_accel.benchmarks.sparse_oracle", argv)
    run_probe(args, variants if "generate" in parts else [], command, pipe, extra)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
