"""Block-sparse attention kernel vs cuDNN SDPA (dense) and FlexAttention (same layout), GPU only.

    python -m dit_accel.benchmarks.sparse                         # every shape, densities 1/.5/.25/.1
    python -m dit_accel.benchmarks.sparse --shapes wan2.1-1.3b-480p-81f --iters 10

For each video-DiT shape and density, one random block layout (every query tile visits the same
number of key tiles, its own tile included; text tokens dense as queries and keys) is run by:
cuDNN SDPA on the full sequence (the baseline, timed right before and after each candidate so
drift hits both sides of the ratio), FlexAttention compiled with that layout as a ``BlockMask``
of 128-token blocks, and this project's Triton kernel at several launch configurations (the best
is reported, all are kept). "ideal" is 1 / density: dense time scaled by the work done.

Prints a table and writes benchmarks/results/sparse-<device>-<date>.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys

import torch
import torch.nn.functional as F
from dit_accel.benchmarks.report import command_line, cuda_time_ms, median, print_table, write_result
from dit_accel.kernels.block_sparse import (
    LAUNCH_DEFAULTS,
    TILE,
    add_dense_ranges,
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_attention_triton,
    tiles_to_blocks,
)
from dit_accel.kernels.tile_order import tile_order
from torch.nn.attention import SDPBackend, sdpa_kernel

from dit_accel.backends import _compiled_flex
from dit_accel.methods.sparse import _full_layout

# name: (video tokens as (frames, height, width) after patching, text tokens in joint attention, heads, head_dim)
SHAPES = {
    "wan2.1-1.3b-480p-81f": ((21, 30, 52), 0, 12, 128),
    "wan2.1-14b-720p-81f": ((21, 45, 80), 0, 40, 128),
    "hunyuanvideo-720p-129f": ((33, 45, 80), 256, 24, 128),
    "cogvideox-5b-480p-49f": ((13, 30, 45), 226, 48, 64),
}
DENSITIES = (1.0, 0.5, 0.25, 0.1)
WAN480 = "wan2.1-1.3b-480p-81f"  # the shape of the single-shape parts (overhead, extras, tail, patterns, fixed)
PARTS = ("kernel", "overhead", "extras", "step", "tail", "patterns", "fixed", "generation")
# launch configurations tried for the Triton kernel (knobs of block_sparse_attention_triton;
# max_registers 0 = no cap); 4 warps lost everywhere at head_dim 128 in the first sweeps (results of
# 2dee894), so only 8 warps are swept; TMA loads and warp specialization never won beyond noise
# (sparse-*-2026-11-23.json), they are swept with --configs tma (TMA also with the register cap here)
# (128 keys over 4 stages would need 288 KiB of shared memory: not swept)
CONFIGS = [*(dict(sub_n=n, num_warps=8, num_stages=st, max_registers=0)
             for n, st in ((64, 2), (64, 3), (64, 4), (128, 2), (128, 3))),
           dict(sub_n=64, num_warps=8, num_stages=2, max_registers=128),
           dict(sub_n=64, num_warps=8, num_stages=2, max_registers=128, tma=True)]
# 64-query CTAs of 4 warps (one warpgroup; two CTAs fit an SM) over the same 128-token layout
SPLIT_CONFIGS = [dict(block_m=64, sub_n=n, num_warps=4, num_stages=st, max_registers=0)
                 for n, st in itertools.product((64, 128), (2, 3, 4))]
# two CTAs per SM: registers capped at 128 per thread (8 warps) with key steps whose shared memory
# fits twice (64 keys over 2 stages: 96 KiB; 32 keys over 2-4 stages: 64-96 KiB), against the former
# uncapped defaults (the sweep that made the cap the default)
OCCUPANCY_CONFIGS = [dict(sub_n=128, num_warps=8, num_stages=2, max_registers=0),
                     dict(sub_n=64, num_warps=8, num_stages=3, max_registers=0),
                     dict(sub_n=64, num_warps=8, num_stages=2, max_registers=0),
                     dict(sub_n=64, num_warps=8, num_stages=2, max_registers=128),
                     *(dict(sub_n=32, num_warps=8, num_stages=st, max_registers=mr) for st, mr in
                       itertools.product((2, 3, 4), (0, 128)))]
# head_dim 64 (CogVideoX, SD3, LTX): the former default (4 warps, 64-key steps, 3 stages) against 8
# warps and the register cap (the accumulator needs 32 registers per thread at 8 warps)
HEAD64_CONFIGS = [dict(sub_n=64, num_warps=4, num_stages=st, max_registers=0) for st in (2, 3)] + [
    dict(sub_n=n, num_warps=8, num_stages=st, max_registers=mr)
    for n, st, mr in ((64, 2, 0), (64, 3, 0), (64, 3, 128), (64, 4, 128), (128, 2, 0), (128, 2, 128))]
# launch configurations and extra outputs of the extras part (TemporalSparse's kernel call)
EXTRAS_CONFIGS = [dict(sub_n=128, num_warps=8, num_stages=2, max_registers=0),
                  dict(sub_n=64, num_warps=8, num_stages=2, max_registers=128)]
# (gap_group, several layout tiles' gaps reduced at once, was measured slower at 4 and 16 and removed:
# sparse-extras-NVIDIA-H200-2026-11-30.json)
EXTRAS = [{}, dict(lse=True), dict(gap=True), dict(gap=True, drop=True)]
# the default launch with and without TMA loads (with --repeats: the comparison the single runs left to noise)
TMA_CAP_CONFIGS = [dict(sub_n=64, num_warps=8, num_stages=2, max_registers=128, tma=t) for t in (False, True)]
# warp specialization (a producer warp group issuing the loads) with the register cap, with and without TMA
WS_CAP_CONFIGS = [dict(sub_n=64, num_warps=8, num_stages=2, max_registers=128)] + [
    dict(sub_n=64, num_warps=8, num_stages=2, max_registers=128, tma=t, warp_specialize=True) for t in (False, True)]
# the fixed softmax shift (each row's largest score in its first sub-tile; no running max, no
# rescaling) and TMA loads, each on and off (the default takes both on Hopper)
SHIFT_CONFIGS = [dict(fixed_shift=False, tma=False), None, dict(fixed_shift=True, tma=False),
                 dict(fixed_shift=False, tma=True)]
TMA_CONFIGS = [dict(sub_n=n, num_warps=8, num_stages=st, tma=tma, warp_specialize=ws, max_registers=0)
               for n, st, tma, ws in itertools.product((64, 128), (2, 3, 4), (False, True), (False, True))]


def config_label(config: dict | None) -> str:
    if not config:
        return "defaults"
    short = {"num_warps": "w", "num_stages": "s", "warp_specialize": "ws", "max_registers": "maxreg"}
    return " ".join(f"{short.get(k, k)}={int(v) if isinstance(v, bool) else v}" for k, v in config.items())


def _random_qkv(seq: int, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bf16 q, k, v ``[1, heads, seq, dim]`` on the GPU."""
    return tuple(torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))


def cudnn_sdpa(q, k, v):
    """The dense baseline: SDPA forced onto cuDNN."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def random_layout(seq: int, heads: int, density: float, text: int, seed: int) -> torch.Tensor:
    """A bool tile mask [1, heads, n, n]: each query tile visits round(density * n) key tiles (its own
    included), chosen at random; a trailing text range of ``text`` tokens is dense both ways."""
    n = math.ceil(seq / TILE)
    per_row = max(1, round(density * n))
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, heads, n, n, generator=g)
    idx = torch.arange(n)
    scores[..., idx, idx] = 2.0  # own tile first
    keep = scores.argsort(dim=-1, descending=True)[..., :per_row]
    mask = torch.zeros(1, heads, n, n, dtype=torch.bool).scatter_(-1, keep, True)
    if text:
        mask = add_dense_ranges(mask, [(seq - text, seq)], seq, TILE)
    return mask


def flex_runner(mask: torch.Tensor, seq: int):
    """A compiled FlexAttention call over ``mask`` as full 128-token blocks, or a string saying why not."""
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError as exc:
        return f"FlexAttention unavailable: {exc}"
    compiled = _compiled_flex()
    mask = mask.cuda()
    counts = mask.sum(-1).to(torch.int32)
    indices = mask.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    zeros = torch.zeros_like(counts)

    def tile_lookup(b, h, q_idx, kv_idx):  # the same layout as a mask_mod; never evaluated on full blocks
        return mask[0, h, q_idx // TILE, kv_idx // TILE]

    block_mask = BlockMask.from_kv_blocks(zeros, torch.zeros_like(indices), counts, indices, BLOCK_SIZE=TILE,
                                          mask_mod=tile_lookup, seq_lengths=(seq, seq))
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _dense_ms(q, k, v, iters: int) -> float:
    """Median ms of the cuDNN dense baseline on q, k, v."""
    return median(cuda_time_ms(lambda: cudnn_sdpa(q, k, v), iters=iters))


def _timed_against_dense(fn, q, k, v, iters: int) -> tuple[float, float]:
    """(median ms of ``fn``, cuDNN dense ms on q, k, v timed right before and after it, averaged)."""
    before = _dense_ms(q, k, v, iters)
    ms = median(cuda_time_ms(fn, iters=iters))
    return ms, (before + _dense_ms(q, k, v, iters)) / 2


def _interleaved(fn, q, k, v, iters: int) -> dict:
    """The cuDNN dense call and ``fn`` timed alternately, one call each per round, so both run in the
    same power and clock state (the dense call draws the GPU's power limit: in blocks of calls the
    candidate starts where the dense block left the clocks): medians and their ratio."""
    def base():
        return cudnn_sdpa(q, k, v)

    for _ in range(3):
        base(), fn()
    pairs = [(cuda_time_ms(base, warmup=0, iters=1)[0], cuda_time_ms(fn, warmup=0, iters=1)[0]) for _ in range(iters)]
    b, m = median([p[0] for p in pairs]), median([p[1] for p in pairs])
    return dict(ms_interleaved=round(m, 3), baseline_ms_interleaved=round(b, 3), ratio_interleaved=round(b / m, 3))


def bench_shape(name: str, grid, text: int, heads: int, dim: int, densities, iters: int, configs,
                repeats: int = 1) -> list[dict]:
    seq = math.prod(grid) + text
    q, k, v = _random_qkv(seq, heads, dim)

    def timed(fn) -> tuple[float, float]:
        return _timed_against_dense(fn, q, k, v, iters)

    dense_ms = _dense_ms(q, k, v, iters)
    rows = [dict(shape=name, seq=seq, density=1.0, method="cudnn-sdpa dense (baseline)", ms=round(dense_ms, 3),
                 ratio=1.0)]
    for density in densities:
        mask = random_layout(seq, heads, density, text, seed=int(density * 1000))
        actual = mask.float().mean().item()
        blocks, counts = (t.cuda() for t in tiles_to_blocks(mask))
        ref = None
        if density == 1.0:
            ref = cudnn_sdpa(q, k, v)
        flex = flex_runner(mask, seq)
        row_base = dict(shape=name, seq=seq, density=round(actual, 4), ideal=round(1 / actual, 2))
        if isinstance(flex, str):
            rows.append(dict(row_base, method="flex", note=flex))
            flex_out = None
        else:
            try:
                flex_out = flex(q, k, v)
                ms, base = timed(lambda: flex(q, k, v))
                rows.append(dict(row_base, method="flex (compiled, BlockMask 128)", ms=round(ms, 3),
                                 baseline_ms=round(base, 3), ratio=round(base / ms, 3),
                                 **_interleaved(lambda: flex(q, k, v), q, k, v, iters)))
            except Exception as exc:  # report and go on
                flex_out = None
                rows.append(dict(row_base, method="flex", note=f"{type(exc).__name__}: {exc}"[:300]))
        best = None
        ratios = {}  # label -> this density's ratio per repeat
        for repeat, config in itertools.product(range(repeats), configs):  # repeats interleave the configs
            label = f"ours {config_label(config)}"

            def ours(config=config):
                knobs = dict(config or {})
                if config:  # the swept configurations were measured with the online softmax and pointer
                    # loads, the defaults then; they keep them unless they name the knobs
                    knobs.setdefault("fixed_shift", False)
                    knobs.setdefault("tma", False)
                block_m = knobs.get("block_m", TILE)  # smaller query tiles repeat their 128-row tile's list
                split, rows = TILE // block_m, math.ceil(seq / block_m)
                b, c = (blocks, counts) if split == 1 else (blocks.repeat_interleave(split, 2)[:, :, :rows],
                                                            counts.repeat_interleave(split, 2)[:, :, :rows])
                return block_sparse_attention_triton(q, k, v, b, c, **knobs)
            try:
                out = ours()
                check = ref if ref is not None else flex_out
                err = None if check is None else float((out.float() - check.float()).abs().max())
                ms, base = timed(ours)
                alternate = _interleaved(ours, q, k, v, iters)
            except Exception as exc:
                rows.append(dict(row_base, method=label,
                                 note=f"{type(exc).__name__}: {exc}"[:300]))
                continue
            row = dict(row_base, method=label, ms=round(ms, 3),
                       baseline_ms=round(base, 3), ratio=round(base / ms, 3),
                       max_abs_err=None if err is None else round(err, 5),
                       err_against="cudnn dense" if ref is not None else "flex", **alternate)
            if repeats > 1:
                row["repeat"] = repeat
                ratios.setdefault(label, []).append((row["ratio"], row["ratio_interleaved"]))
            rows.append(row)
            if repeats == 1 and (best is None or row["ratio"] > best["ratio"]):
                best = row
        for label, pairs in ratios.items():  # with repeats, configurations are compared by their median ratio
            r, alt = [p[0] for p in pairs], [p[1] for p in pairs]
            row = dict(row_base, method=f"{label} (median of {len(r)})", ratio=round(median(r), 3),
                       ratio_min=min(r), ratio_max=max(r), ratio_interleaved=round(median(alt), 3),
                       ratio_interleaved_min=min(alt), ratio_interleaved_max=max(alt))
            rows.append(row)
            if best is None or row["ratio"] > best["ratio"]:
                best = row
        if best is not None:
            rows.append(dict(best, method="ours (best config)", config=best["method"][5:]))
        done = [r for r in rows if r["density"] == row_base["density"] and r["method"].startswith(("flex", "ours ("))]
        print(*(f"  {r}" for r in done), sep="\n", flush=True)
        torch.cuda.empty_cache()
    return rows


def bench_tail(name: str, grid, text: int, heads: int, dim: int, densities, iters: int) -> list[dict]:
    """What the last, partial wave of CTAs costs: the default launch on the whole layout against the
    same layout with the CTAs of that partial wave (the last ones launched) given no key tiles. With
    two CTAs per SM at the default launch, CTAs beyond a multiple of 2 x SMs form that wave."""
    seq = math.prod(grid) + text
    q, k, v = _random_qkv(seq, heads, dim)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    slots = 2 * sms
    rows = []
    for density in densities:
        mask = random_layout(seq, heads, density, text, seed=int(density * 1000))
        blocks, counts = (t.cuda() for t in tiles_to_blocks(mask))
        n_q = counts.shape[-1]
        ctas = n_q * heads
        tail = ctas % slots
        cut = counts.clone().view(-1)
        cut[ctas - tail:] = 0  # launch order: query tile fastest, then head
        cut = cut.view_as(counts)
        full_ms, base = _timed_against_dense(lambda: block_sparse_attention_triton(q, k, v, blocks, counts), q, k, v,
                                             iters)
        cut_ms = median(cuda_time_ms(lambda: block_sparse_attention_triton(q, k, v, blocks, cut), iters=iters))
        rows.append(dict(shape=name, density=round(mask.float().mean().item(), 4), sms=sms, ctas=ctas,
                         waves=round(ctas / slots, 3), tail_ctas=tail, ms=round(full_ms, 3),
                         without_tail_ms=round(cut_ms, 3), tail_share=round(1 - cut_ms / full_ms, 4),
                         tail_share_if_even=round(tail / ctas, 4), baseline_ms=round(base, 3),
                         ratio=round(base / full_ms, 3)))
    return rows


def bench_patterns(name: str, grid, text: int, heads: int, dim: int, densities, iters: int) -> list[dict]:
    """The default launch on layouts with the same number of key tiles per query tile but different
    access patterns: random (the kernel part's layouts), a band around the diagonal (wrapping at the
    ends) and one shared set (every query tile of a head visits the same key tiles, the most reuse
    the L2 cache can get); the gap between them is what the random order costs in memory traffic."""
    seq = math.prod(grid) + text
    q, k, v = _random_qkv(seq, heads, dim)
    n = math.ceil(seq / TILE)
    rows = []
    for density in densities:
        per_row = max(1, round(density * n))
        idx = torch.arange(n)
        band = (idx[:, None] + torch.arange(per_row)[None, :] - per_row // 2) % n
        shared = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:per_row].expand(n, per_row)
        layouts = {"random": random_layout(seq, heads, density, text, seed=int(density * 1000)),
                   "band": torch.zeros(1, 1, n, n, dtype=torch.bool).scatter_(-1, band[None, None], True),
                   "shared": torch.zeros(1, 1, n, n, dtype=torch.bool).scatter_(-1, shared[None, None], True)}
        for pattern, mask in layouts.items():
            blocks, counts = (t.expand(1, heads, *t.shape[2:]).contiguous().cuda() for t in tiles_to_blocks(mask))
            ms, base = _timed_against_dense(lambda: block_sparse_attention_triton(q, k, v, blocks, counts), q, k, v,
                                            iters)
            rows.append(dict(shape=name, density=round(mask.float().mean().item(), 4), pattern=pattern,
                             ms=round(ms, 3), baseline_ms=round(base, 3), ratio=round(base / ms, 3)))
    return rows


def _queued_ms(fn, iters: int) -> float:
    """ms per call of ``fn`` run ``iters`` times back to back between two events (host time hidden)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def bench_fixed(name: str, grid, text: int, heads: int, dim: int, iters: int) -> dict:
    """What a call costs besides its key tiles: the default launch with every query tile visiting n key
    tiles (n = 0 measures launch, q load and output store alone), timed per call with a synchronization
    around it (as the kernel part) and queued back to back (host time hidden); a least-squares line
    ms = fixed + n * per_tile over n >= 1. Then layouts of the same total whose per-query-tile counts
    vary (uniform in [n/2, 3n/2]): if two CTAs sharing an SM with equal work run in lockstep, their
    prologues and epilogues coincide and varied counts run faster at the same total."""
    seq = math.prod(grid) + text
    q, k, v = _random_qkv(seq, heads, dim)
    n_tiles = math.ceil(seq / TILE)
    g = torch.Generator().manual_seed(0)
    order = torch.rand(1, heads, n_tiles, n_tiles, generator=g).argsort(-1).to(torch.int32).cuda()
    dense = _dense_ms(q, k, v, iters)
    rows = []

    def measure(n: int, label: str, blocks, counts) -> None:
        def call():
            return block_sparse_attention_triton(q, k, v, blocks, counts)
        ms = median(cuda_time_ms(call, iters=iters))
        rows.append(dict(shape=name, tiles=n, counts=label, ms=round(ms, 4),
                         ms_queued=round(_queued_ms(call, iters), 4)))
        print(f"  {rows[-1]}", flush=True)

    for n in (0, 1, 2, 4, 8, 16, 26, 32, 64, 96, 128, 192, n_tiles):
        counts = torch.full((1, heads, n_tiles), n, dtype=torch.int32, device="cuda")
        measure(n, "equal", order[..., : max(n, 1)].sort(-1).values.contiguous(), counts)
        if n in (26, 64, 128):
            half = n // 2
            per = torch.randint(n - half, n + half + 1, (1, heads, n_tiles), generator=g)
            per[..., : n_tiles // 2] = 2 * n - per[..., n_tiles - n_tiles // 2:].flip(-1)  # pairs sum to 2n
            var_counts = per.to(torch.int32).cuda()
            measure(n, f"varied {n - half}-{n + half}, mean {var_counts.float().mean().item():.2f}",
                    order[..., : n + half].sort(-1).values.contiguous(), var_counts)
    fit = {}
    for key in ("ms", "ms_queued"):
        pts = [(r["tiles"], r[key]) for r in rows if r["counts"] == "equal" and r["tiles"] >= 1]
        x = torch.tensor([p[0] for p in pts], dtype=torch.float64)
        y = torch.tensor([p[1] for p in pts], dtype=torch.float64)
        slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        fit[key] = dict(fixed_ms=round(float(y.mean()) - slope * float(x.mean()), 4), per_tile_ms=round(slope, 5))
    return dict(rows=rows, fit=fit, dense_ms=round(dense, 3), dense_ms_after=round(_dense_ms(q, k, v, iters), 3),
                ctas=n_tiles * heads, sms=torch.cuda.get_device_properties(0).multi_processor_count)


def _method_inputs(grid, text: int, heads: int, dim: int, density: float, iters: int):
    """TemporalSparse at a fixed density, its tile order on this grid, random model-order q, k, v and
    the cuDNN dense time for them."""
    from dit_accel import TemporalSparse

    method = TemporalSparse(max_density=density, min_density=density, threshold=float("inf"), estimate=False)
    order = tile_order(grid, None, text, False, torch.device("cuda"), packed=method.packed)
    seq = math.prod(grid) + text
    qkv = _random_qkv(seq, heads, dim)
    dense_ms = _dense_ms(*qkv, iters)
    return method, order, qkv, dense_ms


def _method_layout(order, heads: int, density: float):
    """(tile mask, blocks, counts) on the GPU: a random layout of ``order``'s tiles at ``density``
    (seed 7), its blocks padded to every tile as the methods keep them."""
    mask = random_layout(order.length, heads, density, order.text, seed=7).cuda()
    return (mask, *tiles_to_blocks(mask, width=order.tile_len.numel()))


def bench_extras(name: str, grid, text: int, heads: int, dim: int, densities, iters: int) -> list[dict]:
    """What TemporalSparse's extra outputs cost inside the kernel, per launch configuration: the
    call as the method makes it (model-order q, k, v through ``seq_index``, the packed order's
    ``tile_len``) with no extras, with the LSE output only, with the gap output, and with the gap
    plus the LSE drop against an earlier pass summed in the kernel (what the method's sparse passes
    ask for). Each call's outputs are also checked on the first head against the PyTorch reference
    twin (the GPU-only code paths)."""
    rows = []
    for density in densities:
        _, order, (q, k, v), dense_ms = _method_inputs(grid, text, heads, dim, density, iters)
        n = order.tile_len.numel()
        mask, blocks, counts = _method_layout(order, heads, density)
        full = _full_layout(n, q.device)
        prev = block_sparse_attention_triton(q, k, v, *full, tile_len=order.tile_len, seq_index=order.index,
                                             return_lse=True)[1]  # the LSE of a full pass
        for config in EXTRAS_CONFIGS:
            for extras in EXTRAS:
                knobs = dict(config, **extras)
                lse, gap, drop = knobs.pop("lse", False), knobs.pop("gap", False), knobs.pop("drop", False)
                total = torch.zeros(1, dtype=torch.float64, device=q.device)

                def call(knobs=knobs, lse=lse, gap=gap, drop=drop, total=total):
                    return block_sparse_attention_triton(q, k, v, blocks, counts, tile_len=order.tile_len,
                                                         seq_index=order.index, return_lse=lse, return_gap=gap,
                                                         lse_drop=(prev, total) if drop else None, **knobs)
                errors = _errors_against_reference(call(), q, k, v, blocks, counts, order, lse, gap,
                                                   prev if drop else None, knobs)
                ms, base = _timed_against_dense(call, q, k, v, iters)
                rows.append(dict(shape=name, density=round(mask.float().mean().item(), 4), launch=config_label(config),
                                 extras=config_label(extras), ms=round(ms, 3), baseline_ms=round(base, 3),
                                 ratio=round(base / ms, 3), **errors))
                print(f"  {rows[-1]}", flush=True)
    return rows


def _errors_against_reference(result, q, k, v, blocks, counts, order, lse: bool, gap: bool, prev=None,
                              knobs=None) -> dict:
    """Max abs differences of the kernel's outputs (``result``) from the reference twin's, first head;
    the gap's ``-inf`` pattern must agree exactly (else its error is reported as ``inf``). With
    ``prev``, the first head's summed LSE drop is compared too (a kernel call on that head alone)."""
    got = result if isinstance(result, tuple) else (result,)
    ref = block_sparse_attention_reference(q[:, :1], k[:, :1], v[:, :1], blocks[:, :1], counts[:, :1],
                                           tile_len=order.tile_len, seq_index=order.index, return_lse=lse,
                                           return_gap=gap)
    ref = ref if isinstance(ref, tuple) else (ref,)
    errors = {"out_max_abs_err": float((got[0][:, :1].float() - ref[0].float()).abs().max())}
    if lse:
        valid = ref[1].isfinite()
        errors["lse_max_abs_err"] = float((got[1][:, :1] - ref[1])[valid].abs().max())
    if gap:
        g, r = got[-1][:, :1], ref[-1]
        same = torch.equal(g.isfinite(), r.isfinite())
        errors["gap_max_abs_err"] = float((g - r)[r.isfinite()].abs().max()) if same else float("inf")
    if prev is not None:
        totals = []
        for fn in (block_sparse_attention_triton, block_sparse_attention_reference):
            totals.append(torch.zeros(1, dtype=torch.float64, device=q.device))
            fn(q[:, :1], k[:, :1], v[:, :1], blocks[:, :1], counts[:, :1], tile_len=order.tile_len,
               seq_index=order.index, lse_drop=(prev[:, :1].contiguous(), totals[-1]), **(knobs or {}))
        errors["drop_rel_err"] = float((totals[0] - totals[1]).abs() / totals[1].abs().clamp_min(1e-30))
    del ref
    torch.cuda.empty_cache()
    return {k: round(e, 5) for k, e in errors.items()}


def bench_overhead(name: str, grid, text: int, heads: int, dim: int, density: float, iters: int) -> list[dict]:
    """The cost of the tile layout and of TemporalSparse's bookkeeping, each as a fraction of one
    cuDNN dense attention call: the kernel reading model-order q, k, v through ``seq_index`` vs the
    same kernel on tensors already in tiled order (what the methods pay), gather + scatter copies
    (the alternative), what the index forgoes (tiled inputs at the default launch, which on Hopper
    takes TMA loads and the fixed shift, against the indexed call), the kernel's extras as the
    method asks for them (gap output, LSE drop summed in the kernel), and the bookkeeping (the next
    layout straight from the kernel's gaps, the refresh decision and the density count, in one
    launch, plus zeroing the drop's total). The bookkeeping is timed two ways: queued behind its
    attention call, as in a pipeline, where only its GPU work adds to the call (the figure that
    counts), and alone with a synchronization around it, where the host's kernel launches bound it."""
    method, order, (q, k, v), dense_ms = _method_inputs(grid, text, heads, dim, density, iters)
    seq = q.shape[2]
    qt, kt, vt = order.gather(q), order.gather(k), order.gather(v)

    def copies():
        order.gather(q), order.gather(k), order.gather(v)
        return order.scatter(qt)

    n = order.tile_len.numel()
    mask, blocks, counts = _method_layout(order, heads, density)
    state = {}  # one layer's state as the method keeps it: a full pass (the LSE reference), then this layout
    method._attend(q, k, v, order, state, *_full_layout(n, q.device), True)
    _, gap = method._attend(q, k, v, order, state, blocks, counts, False)

    def bookkeeping():  # per call, besides the kernel: next layout, refresh decision, pairs; drop total zeroed
        method._update(state, gap, blocks, counts, order, False, heads)
        return state["blocks"]

    def kernel(indexed: bool, **launch):
        args = (q, k, v) if indexed else (qt, kt, vt)
        index = order.index if indexed else None
        return lambda: block_sparse_attention(*args, blocks, counts, tile_len=order.tile_len, seq_index=index,
                                              **launch)

    def method_kernel():  # the kernel as the method calls it: gap output, LSE drop summed on the device
        return method._attend(q, k, v, order, state, blocks, counts, False)

    def call_with_bookkeeping():  # what a TemporalSparse call runs: the kernel with its extras, then the bookkeeping
        _, g = method_kernel()
        method._update(state, g, blocks, counts, order, False, heads)
        return state["blocks"]

    copy_ms = median(cuda_time_ms(copies, iters=iters))
    book_ms = median(cuda_time_ms(bookkeeping, iters=iters))
    # tiled inputs on the path the indexed call takes (online softmax, pointer loads), so the difference
    # is the index alone; at the default launch they take TMA loads and the fixed shift on Hopper
    tiled_ms = median(cuda_time_ms(kernel(False, fixed_shift=False, tma=False), iters=iters))
    tiled_default_ms = median(cuda_time_ms(kernel(False), iters=iters))
    indexed_ms = median(cuda_time_ms(kernel(True), iters=iters))
    extras_ms = median(cuda_time_ms(method_kernel, iters=iters))
    whole_ms = median(cuda_time_ms(call_with_bookkeeping, iters=iters))
    base = dict(shape=name, seq=seq, tile=list(order.tile), tiles=n, density=round(mask.float().mean().item(), 4),
                dense_ms=round(dense_ms, 3), kernel_tiled_ms=round(tiled_ms, 3), kernel_indexed_ms=round(indexed_ms, 3),
                kernel_tiled_default_ms=round(tiled_default_ms, 3), launch=dict(LAUNCH_DEFAULTS))
    return [
        dict(base, part="tile layout in the kernel (seq_index) vs tiled inputs", ms=round(indexed_ms - tiled_ms, 3),
             of_dense=round((indexed_ms - tiled_ms) / dense_ms, 4)),
        dict(base, part="tile layout as copies: gather q, k, v + scatter out", ms=round(copy_ms, 3),
             of_dense=round(copy_ms / dense_ms, 4)),
        dict(base, part="what reading through seq_index forgoes: tiled inputs at the default launch (on Hopper TMA "
                        "loads and the fixed shift) minus the indexed call", ms=round(tiled_default_ms - indexed_ms, 3),
             of_dense=round((tiled_default_ms - indexed_ms) / dense_ms, 4)),
        dict(base, part="TemporalSparse bookkeeping behind its attention call (call with it - call without)",
             ms=round(whole_ms - extras_ms, 3), of_dense=round((whole_ms - extras_ms) / dense_ms, 4)),
        dict(base, part="TemporalSparse bookkeeping alone, synchronized (bound by host launches)", ms=round(book_ms, 3),
             of_dense=round(book_ms / dense_ms, 4)),
        dict(base, part="kernel extra for the gap output and the LSE drop", ms=round(extras_ms - indexed_ms, 3),
             of_dense=round((extras_ms - indexed_ms) / dense_ms, 4)),
    ]


# Wan2.1-T2V-1.3B's transformer (its published config) and its 480p / 81-frame latent
WAN13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN13B_LATENT = (1, 16, 21, 60, 104)


def step_methods() -> dict:
    """Methods of the full-step benchmark, each at a fixed attention density (~25% and ~10%):
    Neighborhood's window alone and TemporalSparse's skip-and-drop (both ``estimate=False``), so that
    every step is a sparse step."""
    from dit_accel import Neighborhood, TemporalSparse

    fixed = dict(threshold=float("inf"), warmup_steps=1, refresh_every=0, refresh_tol=None, estimate=False)
    return {
        "Neighborhood(window=(0.5, 0.5, 0.75), estimate=False) ~25%": Neighborhood(window=(0.5, 0.5, 0.75),
                                                                                   estimate=False),
        "Neighborhood(window=(0.25, 0.5, 0.5), estimate=False) ~10%": Neighborhood(window=(0.25, 0.5, 0.5),
                                                                                   estimate=False),
        "TemporalSparse(density 0.25)": TemporalSparse(min_density=0.25, max_density=0.25, **fixed),
        "TemporalSparse(density 0.10)": TemporalSparse(min_density=0.10, max_density=0.10, **fixed),
        "TemporalSparse(density 0.25, packed=False)": TemporalSparse(min_density=0.25, max_density=0.25,
                                                                     packed=False, **fixed),
        # whole-clip 3D tiles: 260 tiles of 126 tokens (no padding) instead of 270 of at most 126
        "Neighborhood(window=(1.0, 0.5, 0.5), tile=(21, 3, 2), estimate=False) ~25%":
            Neighborhood(window=(1.0, 0.5, 0.5), tile=(21, 3, 2), estimate=False),
        "Neighborhood(window=(1.0, 0.3, 0.3), tile=(21, 3, 2), estimate=False) ~10%":
            Neighborhood(window=(1.0, 0.3, 0.3), tile=(21, 3, 2), estimate=False),
    }


def bench_step(iters: int, config: dict | None = None, latent=WAN13B_LATENT, text_len: int = 512) -> list[dict]:
    """One denoising step of a random-weight Wan2.1-1.3B transformer (bf16) at 480p / 81 frames:
    stock (diffusers' processor, cuDNN SDPA) vs each sparse method at steady state (after its
    warm-up steps). Timesteps decrease from call to call, as in a generation."""
    import dit_accel

    model, step = _wan_step(config, latent, text_len)

    def timed() -> float:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return median(cuda_time_ms(step, warmup=2, iters=iters))

    stock_ms = timed()
    rows = [dict(method="stock (diffusers WanAttnProcessor, cuDNN SDPA)", ms=round(stock_ms, 2), speedup=1.0)]
    for name, method in step_methods().items():
        with dit_accel.apply(model, attention=method):
            step()  # first step of a generation: warm-up / compilation
            method.reset_stats()
            ms = timed()
        rows.append(dict(method=name, ms=round(ms, 2), speedup=round(stock_ms / ms, 3),
                         density=round(method.density(), 4), config=method.to_dict()))
        print(f"  {rows[-1]}", flush=True)
    again = timed()  # drift check: stock again at the end
    rows.append(dict(method="stock again (drift check)", ms=round(again, 2), speedup=round(stock_ms / again, 3)))
    return rows


def _wan_step(config: dict | None, latent, text_len: int):
    """A random-weight Wan transformer (bf16, CUDA) and ``step(t=None)``: one call of it on fixed
    inputs at timestep ``t`` (default: one below the previous call's, as in a generation)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**(config or WAN13B)).to("cuda", torch.bfloat16).eval()
    x = torch.randn(*latent, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(latent[0], text_len, model.config.text_dim, device="cuda", dtype=torch.bfloat16)
    clock = iter(range(999, -10**9, -1))

    def step(t: float | None = None):
        t = torch.full((latent[0],), float(next(clock) if t is None else t), device="cuda")
        with torch.no_grad():
            return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    return model, step


def bench_generation(steps: int = 20, config: dict | None = None, latent=WAN13B_LATENT, text_len: int = 512) -> dict:
    """The transformer's time over one generation of ``steps`` steps (timesteps falling from 999) of a
    random-weight Wan2.1-1.3B at 480p / 81 frames: stock (cuDNN SDPA) vs `Neighborhood()` and
    `TemporalSparse()` at their defaults, whose full passes and sparse steps alternate on their schedule,
    with their density and memory: the peak allocated above the stock run's (from the second step on: the
    first step still holds the previous generation's state until the hook sees the new generation), per
    step, and what is still allocated after the generation (the forecast)."""
    import dit_accel

    model, step = _wan_step(config, latent, text_len)
    timesteps = [999.0 * (1 - i / steps) for i in range(steps)]

    peaks: list[float] = []  # the last generation's peak allocated memory per step, GB

    def generation() -> list[float]:
        out = []
        peaks.clear()
        for t in timesteps:
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(t)
            end.record()
            torch.cuda.synchronize()
            out.append(round(start.elapsed_time(end), 2))
            peaks.append(round(torch.cuda.max_memory_allocated() / 2**30, 2))
        return out

    rows = []
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        generation()  # warm-up
        stock = generation()
        stock_peaks, stock_held = list(peaks), torch.cuda.memory_allocated()
        for name, method in (("Neighborhood() (defaults: estimate)", dit_accel.Neighborhood()),
                             ("TemporalSparse() (defaults: estimate)", dit_accel.TemporalSparse())):
            with dit_accel.apply(model, attention=method):
                generation()  # warm-up / compilation; the next call's higher timestep starts a new generation
                method.reset_stats()
                ours = generation()
                held = torch.cuda.memory_allocated()  # the generation's forecast is still held here
            rows.append(dict(method=name, config=method.to_dict(), steps=steps, stock_ms=round(sum(stock), 1),
                             ms=round(sum(ours), 1), speedup=round(sum(stock) / sum(ours), 3),
                             density=round(method.density(), 4),
                             extra_memory_gb=round(max(peaks[1:]) - max(stock_peaks), 2),
                             held_after_gb=round((held - stock_held) / 2**30, 2), stock_step_ms=stock, step_ms=ours,
                             stock_step_peak_gb=stock_peaks, step_peak_gb=list(peaks)))
            print(f"  {rows[-1]}", flush=True)
        again = generation()  # drift check: stock again at the end
    return {"rows": rows, "stock_again_ms": round(sum(again), 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1,
                    help="kernel part: time every launch configuration this many times, interleaved, and compare "
                         "them by the median ratio (run-to-run noise is a few percent)")
    ap.add_argument("--quick", action="store_true", help="one launch configuration instead of a sweep")
    ap.add_argument("--parts", default="kernel,overhead,step",
                    help="comma-separated: kernel (vs cuDNN / Flex per shape), overhead (tile layout and "
                         "TemporalSparse bookkeeping, Wan 480p), extras (the cost of TemporalSparse's gap and LSE "
                         "outputs per launch configuration, Wan 480p), step (full Wan2.1-1.3B transformer step), "
                         "tail (what the last, partial wave of CTAs costs, Wan 480p), patterns (random, banded "
                         "and shared layouts of equal density, Wan 480p), fixed (what a call costs besides its key "
                         "tiles: 0 to all key tiles per query tile, equal and varied counts, Wan 480p), "
                         "generation (a 20-step generation of the Wan2.1-1.3B transformer with Neighborhood() and "
                         "TemporalSparse() at their defaults against stock)")
    ap.add_argument("--configs", default="sweep:wan2.1-1.3b-480p-81f",
                    help="kernel launch configurations: 'sweep' (all shapes), 'sweep:SHAPE' (that shape; the "
                         "others use the defaults) or 'default'; 'tma' instead of 'sweep' sweeps the TMA and "
                         "warp-specialization knobs, 'split' adds 64-query CTAs of 4 warps, 'occupancy' tries "
                         "two CTAs per SM (registers capped, small key steps), 'head64' the head_dim-64 knobs, "
                         "'tma-cap' the default with and without TMA loads, 'ws-cap' the default against "
                         "warp specialization under the register cap, 'shift' the fixed softmax shift and TMA "
                         "loads, each on and off")
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    ap.add_argument("--name", default="sparse", help="result file name prefix (NAME-<device>-<date>.json)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(parts) - set(PARTS):
        ap.error(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; choose from {', '.join(PARTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/sparse.py needs a CUDA GPU; run it through the device tool or on a GPU host.")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}")
    if args.repeats < 1:
        ap.error(f"--repeats: must be >= 1, got {args.repeats}")
    densities = [float(d) for d in args.densities.split(",")]
    if any(not 0 < d <= 1 for d in densities):
        ap.error(f"--densities: each must be in (0, 1], got {densities}")
    logging.basicConfig(level=logging.WARNING)
    kind, _, only = args.configs.partition(":")
    swept = set() if kind == "default" else ({only} if only else set(SHAPES))
    sweeps = {"sweep": CONFIGS, "tma": TMA_CONFIGS, "split": CONFIGS + SPLIT_CONFIGS, "occupancy": OCCUPANCY_CONFIGS,
              "head64": HEAD64_CONFIGS, "tma-cap": TMA_CAP_CONFIGS,
              "ws-cap": WS_CAP_CONFIGS, "shift": SHIFT_CONFIGS}
    if (kind not in sweeps and kind != "default") or not swept <= set(SHAPES):
        ap.error(f"--configs: expected one of {', '.join(sweeps)} (optionally ':SHAPE'), or 'default'; got "
                 f"{args.configs!r}")
    sweep = sweeps.get(kind, CONFIGS)
    rows, overhead, step = [], [], []
    for s in shapes if "kernel" in parts else []:
        grid, text, heads, dim = SHAPES[s]
        configs = sweep if s in swept and not args.quick else [None]
        rows += bench_shape(s, grid, text, heads, dim, densities, args.iters, configs, args.repeats)
        best = [r for r in rows if r["shape"] == s
                and (r["method"] == "ours (best config)" or r["method"].startswith(("flex", "cudnn")))]
        print_table(best, ["shape", "density", "ideal", "method", "ms", "baseline_ms", "ratio", "ratio_interleaved",
                           "max_abs_err", "config", "note"])
    args_given = argv if argv is not None else sys.argv[1:]
    payload = {"command": command_line("dit_accel.benchmarks.sparse", args_given),
               "dtype": "bfloat16", "batch": 1, "tile": TILE,
               "shapes": {k: dict(grid=g, text=t, heads=h, head_dim=d) for k, (g, t, h, d) in SHAPES.items()
                          if k in shapes},
               "ratio_meaning": "cuDNN SDPA dense time (timed before and after the candidate) / candidate time",
               "rows": rows}
    wan = (WAN480, *SHAPES[WAN480])  # name, grid, text, heads, head_dim
    if "overhead" in parts:
        overhead = bench_overhead(*wan, 0.25, args.iters)
        print_table(overhead, ["shape", "part", "ms", "dense_ms", "of_dense"])
        payload["overhead"] = overhead
    if "extras" in parts:
        extras = bench_extras(*wan, (0.25, 0.1), args.iters)
        print_table(extras, ["density", "launch", "extras", "ms", "baseline_ms", "ratio"])
        payload["extras"] = extras
    if "tail" in parts:
        payload["tail"] = bench_tail(*wan, (1.0, 0.25, 0.1), args.iters)
        print_table(payload["tail"], list(payload["tail"][0]))
    if "patterns" in parts:
        payload["patterns"] = bench_patterns(*wan, (0.25, 0.1), args.iters)
        print_table(payload["patterns"], list(payload["patterns"][0]))
    if "fixed" in parts:
        payload["fixed"] = bench_fixed(*wan, args.iters)
        print_table(payload["fixed"]["rows"], ["tiles", "counts", "ms", "ms_queued"])
        print("fit:", payload["fixed"]["fit"], "dense ms:", payload["fixed"]["dense_ms"])
    if "step" in parts:
        step = bench_step(args.iters)
        print_table(step, ["method", "ms", "speedup", "density"])
        payload["step"] = {"model": "WanTransformer3DModel, Wan2.1-T2V-1.3B config, random weights, bf16",
                           "latent": list(WAN13B_LATENT), "text_tokens": 512, "rows": step}
    if "generation" in parts:
        payload["generation"] = {"model": "WanTransformer3DModel, Wan2.1-T2V-1.3B config, random weights, bf16",
                                 "latent": list(WAN13B_LATENT), "text_tokens": 512, **bench_generation()}
    print("wrote", write_result(args.name, payload, args.out))


if __name__ == "__main__":
    main()
