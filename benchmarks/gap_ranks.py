"""How the kernel's two gaps rank key tiles on the ShapesBench reference model.

    python -m dit_accel.benchmarks.gap_ranks                  # 4 held-out prompts, GPU or CPU
    python -m dit_accel.benchmarks.gap_ranks --prompts 1      # smoke

Generates held-out prompts with their fixed seeds at the default size and CFG with dense attention
and, at one denoising step (default 2, where `TemporalSparse()` chooses its tiles), captures the
queries and keys of every self-attention call. For every (batch row, head, query tile) of
`TemporalSparse`'s packed tile order it ranks the other key tiles two ways, as
`next_layout.next_blocks` does (largest gap first, ties to the earliest visited):

- by the gap against the running row maximum (`TemporalSparse(estimate=False)`'s gaps), and
- by the gap against the rows' log-sum-exp (`gap_ref`, what `TemporalSparse()` chooses by),

and compares the top tile of each with the exact share of the query tile's attention each key tile
holds (float32 softmax). Reported: the share of running-max gaps at exactly 0 (saturated), how often
the running-max top tile is simply the first other tile visited, how often each top tile is the
heaviest, and the mean attention share of the own tile, of each top tile and of the heaviest other.

Writes ``benchmarks/results/gap-ranks-<device>-<date>.json`` (or ``--out DIR``).
"""

from __future__ import annotations

import argparse

import torch
from dit_accel.benchmarks.report import command_line, print_table, write_result
from dit_accel.kernels.block_sparse import TILE, block_sparse_attention
from dit_accel.kernels.tile_order import tile_order
from dit_accel.methods.base import AttentionMethod
from dit_accel.methods.dense import Dense
from dit_accel.methods.estimate import slots
from dit_accel.methods.sparse import _full_layout
from dit_accel.pipelines import load_reference
from dit_accel.pipelines.shapes.pipeline import DEFAULT_SIZE, DEFAULT_STEPS
from dit_accel.pipelines.shapes.suite import held_out_suite

import dit_accel


class _Stop(Exception):
    """Raised once the captured step is over: the rest of the generation is not needed."""


def _top(gap: torch.Tensor) -> torch.Tensor:
    """Index of the top entry of each row of ``gap`` (largest first, ties to the earliest)."""
    return (gap == gap.amax(-1, keepdim=True)).int().argmax(-1)


def tile_stats(q, k, grid) -> dict:
    """The ranking statistics (sums and counts, see the module docstring) of one self-attention call."""
    order = tile_order(grid, None, 0, False, q.device, packed=True)
    n = order.tile_len.numel()
    blocks, counts = _full_layout(n, q.device)
    kw = dict(tile_len=order.tile_len, seq_index=order.index)
    _, lse, running = block_sparse_attention(q, k, k, blocks, counts, return_lse=True, return_gap=True, **kw)
    _, ref = block_sparse_attention(q, k, k, blocks, counts, return_gap=True, gap_ref=lse, **kw)
    # exact attention share of each key tile per query tile, float32, one (batch, head) at a time
    idx, valid = slots(order)
    idx, tiles = idx[valid], (torch.arange(idx.numel(), device=q.device) // TILE)[valid]
    onehot = torch.nn.functional.one_hot(tiles, n).float()  # [tokens, n]
    share = torch.empty(q.shape[0], q.shape[1], n, n, device=q.device)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            qq, kk = q[b, h, idx].float(), k[b, h, idx].float()
            p = torch.softmax(qq @ kk.T * q.shape[-1] ** -0.5, -1) @ onehot  # [tokens, n key tiles]
            share[b, h] = (onehot.T @ p) / onehot.sum(0)[:, None]  # mean over each query tile's rows
    eye = torch.eye(n, dtype=torch.bool, device=q.device)
    off = ~eye.expand_as(share)
    running, ref = running.masked_fill(eye, float("-inf")), ref.masked_fill(eye, float("-inf"))
    other = share.masked_fill(eye, float("-inf"))
    heaviest = other.argmax(-1)
    top_run, top_ref = _top(running), _top(ref)
    first_other = (torch.arange(n, device=q.device) == 0).long()  # the first visited tile that is not the own one

    def pick(t):
        return share.gather(-1, t[..., None])[..., 0]

    return {"rows": heaviest.numel(), "saturated": int((running[off.expand_as(running)] == 0).sum()),
            "gaps": int(off.sum()), "running_top_is_first": int((top_run == first_other).sum()),
            "running_top_is_heaviest": int((top_run == heaviest).sum()),
            "ref_top_is_heaviest": int((top_ref == heaviest).sum()),
            "own_share": float(share.diagonal(dim1=-2, dim2=-1).sum()), "running_top_share": float(pick(top_run).sum()),
            "ref_top_share": float(pick(top_ref).sum()), "heaviest_share": float(pick(heaviest).sum()),
            "tiles": n}


class _Capture(AttentionMethod):
    """Dense attention that records `tile_stats` of every self-attention call at ``step``."""

    def __init__(self, step: int):
        self.step, self.calls, self._dense = step, [], Dense()

    def __call__(self, query, key, value, attn_mask, call=None):
        if call is not None and call.module.kind == "self":
            if call.layout.step_index > self.step:
                raise _Stop
            if call.layout.step_index == self.step:
                self.calls.append(tile_stats(query, key, call.layout.grid))
        return self._dense(query, key, value, attn_mask, call)


def run(pipe, device, prompts: int, step: int) -> dict:
    capture = _Capture(step)
    with dit_accel.apply(pipe, attention=capture):
        for item in held_out_suite(prompts):
            try:
                pipe(item["prompt"], generator=torch.Generator(device).manual_seed(item["seed"]),
                     num_inference_steps=DEFAULT_STEPS, **DEFAULT_SIZE)
            except _Stop:
                pass
    total = {key: sum(c[key] for c in capture.calls) for key in capture.calls[0] if key != "tiles"}
    rows = total["rows"]
    return {"prompts": prompts, "step": step, "size": DEFAULT_SIZE, "calls": len(capture.calls),
            "key_tiles": capture.calls[0]["tiles"], "query_tile_rows": rows,
            "running_gaps_saturated": round(total["saturated"] / total["gaps"], 4),
            "running_top_is_first_other_tile": round(total["running_top_is_first"] / rows, 4),
            "running_top_is_heaviest": round(total["running_top_is_heaviest"] / rows, 4),
            "ref_top_is_heaviest": round(total["ref_top_is_heaviest"] / rows, 4),
            "mean_share_own_tile": round(total["own_share"] / rows, 4),
            "mean_share_running_top": round(total["running_top_share"] / rows, 4),
            "mean_share_ref_top": round(total["ref_top_share"] / rows, 4),
            "mean_share_heaviest_other": round(total["heaviest_share"] / rows, 4)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--step", type=int, default=2, help="the denoising step whose attention is ranked")
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    pipe = load_reference(device=device, dtype=None)
    pipe.set_progress_bar_config(disable=True)
    result = run(pipe, device, args.prompts, args.step)
    print_table([{k: v for k, v in result.items() if k != "size"}], [k for k in result if k != "size"])
    payload = {"command": command_line("dit_accel.benchmarks.gap_ranks", argv), "dtype": str(pipe.transformer.dtype),
               **result}
    print(f"wrote {write_result('gap-ranks', payload, args.out)}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
