"""Block-sparse forward attention: Triton kernel, PyTorch reference twin, layout helpers.

The layout is a compact list per (batch, head, query tile) of the key tiles to visit
(``kv_blocks[b, h, m, :kv_counts[b, h, m]]``), not a dense mask to scan, so the kernel's work is
proportional to the tiles it computes. Query rows attend, with an exact softmax, to every key of
the listed tiles and to nothing else; a row whose tile lists nothing gets output 0 and LSE -inf.
Leading batch/head dimensions of the layout may be 1 (broadcast).

Sequences need not be multiples of the tile (the last tile is ragged); head_dim may be any size
up to 256 (64/96/128 are the DiT cases: non-powers of two are padded inside the kernel).

Two options serve the sparse methods:

- ``tile_len`` (self/joint attention): valid tokens per tile, for sequences laid out as padded 3D
  tiles (``kernels.tile_order``). Key slots past a tile's length are never attended; query rows
  past it are computed but do not count for the gap below.
- ``seq_index``: q, k, v (and the output) stay in the model's token order and the kernel reads
  them through this index (tiled slot -> model position), so a tiled layout costs no gather or
  scatter copies; the layout, ``tile_len``, the LSE and the gap are in the tiled order.
- ``return_gap``: for each visited key tile, in visiting order, the largest over the tile's valid
  query rows of ``log2(max weight in the tile / running row max after the tile)``; ``-inf`` past
  ``kv_counts``. A tile whose gap is below ``t`` put less than ``2**t`` of its row maximum on any
  query, so it can be skipped at the next denoising step (``TemporalSparse``). The running max
  only grows, so the gap never understates a tile's share. With ``gap_ref`` (a per-row log-sum-exp,
  natural log, in tiled order, e.g. the LSE of an earlier pass) the gap is measured against it
  instead of the running max: ``log2(max weight in the tile) - gap_ref / ln 2``, at most 0. Against
  the row's own LSE that is the log2 of the largest attention probability the tile holds, which
  ranks tiles by weight; the running max ranks the earliest visited first wherever rows attend
  broadly (many tiles then raise some row's running max and saturate at 0: 57% on the reference
  model, benchmarks/gap_ranks.py).

Where q, k, v fit tensor descriptors (no ``seq_index``) on Hopper, the kernel's default softmax
(bfloat16 inputs, no running-max gaps asked) uses a fixed shift instead of the online running
maximum: each query row's largest score in the first listed key sub-tile. The key loop then keeps
no row maximum and never rescales its accumulator, and with Hopper's TMA loads that is 6-13%
faster at the Wan 480p shape (launch knob ``fixed_shift``; see LAUNCH_DEFAULTS). The result does
not depend on the shift while no weight overflows: a query tile with a row whose sum against its
shift leaves ``[1, 2**64]`` (some key scoring about 44 nats above the first sub-tile's best;
``2**15`` for float16) is recomputed with the running maximum inside the same call.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

try:  # triton is a Linux dependency; the reference twin serves elsewhere
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

TILE = 128
LOG2E = 1.4426950408889634
_warned: set[str] = set()


# ----------------------------------------------------------------------------------------------
# Layout helpers


def tiles_to_blocks(tile_mask: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact a bool ``[B, H, n_q_tiles, n_k_tiles]`` tile mask into (kv_blocks, kv_counts).

    kv_blocks: int32 ``[B, H, n_q_tiles, width]``, the visited key tiles in increasing order
    (entries past ``kv_counts`` repeat the last valid one and are never read); kv_counts: int32
    ``[B, H, n_q_tiles]``. ``width`` defaults to the largest count (read back from the device);
    pass ``n_k_tiles`` to keep the call free of host syncs.
    """
    if tile_mask.dim() != 4 or tile_mask.dtype != torch.bool:
        raise ValueError(f"tile_mask: expected a bool [B, H, q_tiles, k_tiles] tensor, got {tile_mask.dtype} "
                         f"{tuple(tile_mask.shape)}")
    n_k = tile_mask.shape[-1]
    idx = torch.arange(n_k, device=tile_mask.device, dtype=torch.int32).expand_as(tile_mask)
    keyed = torch.where(tile_mask, idx, torch.full_like(idx, n_k))
    ordered = keyed.sort(dim=-1).values
    counts = tile_mask.sum(-1, dtype=torch.int32)
    if width is None:
        width = max(1, int(counts.max().item()) if counts.numel() else 1)
    blocks = ordered[..., :width].clamp_max(n_k - 1).contiguous()
    return blocks, counts.contiguous()


def add_dense_ranges(tile_mask: torch.Tensor, ranges, seq_len: int, tile: int = TILE) -> torch.Tensor:
    """Make the token ranges ``[(start, stop), ...]`` dense as queries and as keys.

    Every query tile touching a range visits all key tiles, and every key tile touching a range is
    visited by all query tiles (text tokens in joint attention stay dense).
    """
    out = tile_mask.clone()
    for start, stop in ranges:
        if not (0 <= start < stop <= seq_len):
            raise ValueError(f"ranges: ({start}, {stop}) is not inside the sequence [0, {seq_len})")
        first, last = start // tile, (stop - 1) // tile
        out[..., first : last + 1, :] = True
        out[..., :, first : last + 1] = True
    return out


def blocks_to_mask(kv_blocks: torch.Tensor, kv_counts: torch.Tensor, q_len: int, k_len: int,
                   block_m: int = TILE, block_n: int = TILE) -> torch.Tensor:
    """The explicit bool ``[B, H, q_len, k_len]`` mask a block layout stands for."""
    n_k = math.ceil(k_len / block_n)
    valid = torch.arange(kv_blocks.shape[-1], device=kv_blocks.device) < kv_counts[..., None]
    tiles = torch.zeros(*kv_blocks.shape[:-1], n_k + 1, dtype=torch.bool, device=kv_blocks.device)
    tiles.scatter_(-1, torch.where(valid, kv_blocks.long(), torch.full_like(kv_blocks.long(), n_k)), True)
    tiles = tiles[..., :n_k]
    rows = tiles.repeat_interleave(block_m, dim=-2)[..., :q_len, :]
    return rows.repeat_interleave(block_n, dim=-1)[..., :k_len]


# ----------------------------------------------------------------------------------------------
# Reference twin


def _tile_len_mask(tile_len: torch.Tensor, seq: int, tile: int) -> torch.Tensor:
    """Bool ``[seq]``: the slots within each tile's valid length."""
    pos = torch.arange(seq, device=tile_len.device)
    return (pos % tile) < tile_len.to(pos.device).long()[pos // tile]


def _outputs(out, lse=None, gap=None):
    """``out``, or ``(out, lse?, gap?)`` with the extras that were asked for (not None)."""
    extra = [x for x in (lse, gap) if x is not None]
    return (out, *extra) if extra else out


def block_sparse_attention_reference(q, k, v, kv_blocks, kv_counts, *, block_m: int = TILE, block_n: int = TILE,
                                     scale: float | None = None, return_lse: bool = False,
                                     tile_len: torch.Tensor | None = None, return_gap: bool = False,
                                     seq_index: torch.Tensor | None = None, lse_drop: tuple | None = None,
                                     gap_ref: torch.Tensor | None = None, **_launch):
    """PyTorch twin of :func:`block_sparse_attention` (fp32 math through an explicit mask).

    Launch knobs of the kernel (``sub_n``, ``num_warps``, ``num_stages``, ``fixed_shift``, ...) are
    accepted and ignored: the softmax does not depend on its shift (the twin subtracts each row's
    maximum).
    """
    S_q, _ = _check(q, k, v, kv_blocks, kv_counts, block_m, block_n, tile_len, seq_index)
    _check_lse_drop(lse_drop, q.shape[0], q.shape[1], S_q)
    _check_gap_ref(gap_ref, return_gap, q.shape[0], q.shape[1], S_q)
    if lse_drop is not None:
        res = block_sparse_attention_reference(q, k, v, kv_blocks, kv_counts, block_m=block_m, block_n=block_n,
                                               scale=scale, return_lse=True, tile_len=tile_len,
                                               return_gap=return_gap, seq_index=seq_index, gap_ref=gap_ref)
        prev, total = lse_drop
        total.add_(lse_drop_sum(prev, res[1]).to(total.dtype))
        return _outputs(res[0], res[1] if return_lse else None, res[2] if return_gap else None)
    if seq_index is not None:  # gather into the tiled order, attend there, write valid slots back
        idx = seq_index.to(q.device).long()
        res = block_sparse_attention_reference(
            q.index_select(2, idx), k.index_select(2, idx), v.index_select(2, idx), kv_blocks, kv_counts,
            block_m=block_m, block_n=block_n, scale=scale, return_lse=return_lse, tile_len=tile_len,
            return_gap=return_gap, gap_ref=gap_ref)
        res = res if isinstance(res, tuple) else (res,)
        valid = (_tile_len_mask(tile_len, idx.numel(), block_m) if tile_len is not None
                 else torch.ones_like(idx, dtype=torch.bool))
        out = torch.zeros_like(q)
        out[:, :, idx[valid]] = res[0][:, :, valid]
        return (out, *res[1:]) if len(res) > 1 else out
    S_q = q.shape[2]
    S_k = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = blocks_to_mask(kv_blocks, kv_counts, S_q, S_k, block_m, block_n)
    key_ok = row_ok = None
    if tile_len is not None:
        key_ok = _tile_len_mask(tile_len, S_k, block_n)
        row_ok = _tile_len_mask(tile_len, S_q, block_m)
        mask = mask & key_ok
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = (p @ v.float()).to(q.dtype)
    gap = _reference_gap(scores, kv_blocks, kv_counts, row_ok, block_m, block_n, gap_ref) if return_gap else None
    return _outputs(out, lse if return_lse else None, gap)


def _reference_gap(scores, kv_blocks, kv_counts, row_ok, block_m, block_n, gap_ref=None) -> torch.Tensor:
    """The gap output (see the module docstring) from the explicit masked scores."""
    B, H, S_q, S_k = scores.shape
    n_q, n_k = math.ceil(S_q / block_m), math.ceil(S_k / block_n)
    inf = float("-inf")
    s2 = F.pad(scores * LOG2E, (0, n_k * block_n - S_k, 0, n_q * block_m - S_q), value=inf)
    tile_max = s2.view(B, H, n_q, block_m, n_k, block_n).amax(-1)  # [B, H, n_q, BM, n_k]
    blocks = kv_blocks.long().expand(B, H, n_q, kv_blocks.shape[-1])
    counts = kv_counts.expand(B, H, n_q)
    visited = tile_max.gather(-1, blocks[:, :, :, None, :].expand(B, H, n_q, block_m, blocks.shape[-1]))
    if gap_ref is None:
        base = visited.cummax(-1).values
    else:
        base = F.pad(gap_ref.float() * LOG2E, (0, n_q * block_m - S_q)).view(B, H, n_q, block_m, 1)
    gap = torch.where(visited == inf, torch.full_like(visited, inf), (visited - base).clamp(max=0.0))
    rows = torch.arange(n_q * block_m, device=scores.device) < S_q
    if row_ok is not None:
        rows = rows & F.pad(row_ok, (0, n_q * block_m - S_q), value=False)
    gap = gap.masked_fill(~rows.view(1, 1, n_q, block_m, 1), inf).amax(3)
    live = torch.arange(blocks.shape[-1], device=scores.device) < counts[..., None]
    return gap.masked_fill(~live, inf)


def lse_drop_sum(prev: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Sum over rows of ``max(prev - lse, 0)``, NaN (both ``-inf``) counted as 0 and ``+inf`` as the
    largest float32: what ``lse_drop`` adds, in float64."""
    d = (prev.double() - lse.double()).nan_to_num(0.0, posinf=torch.finfo(torch.float32).max)
    return d.clamp(0.0, torch.finfo(torch.float32).max).sum()


def _check_gap_ref(gap_ref, return_gap: bool, B: int, H: int, S_q: int) -> None:
    if gap_ref is None:
        return
    if not return_gap:
        raise ValueError("gap_ref: measures the gap output; pass return_gap=True with it")
    if gap_ref.shape != (B, H, S_q) or gap_ref.dtype != torch.float32:
        raise ValueError(f"gap_ref: expected a float32 [{B}, {H}, {S_q}] log-sum-exp per row (tiled order), got "
                         f"{gap_ref.dtype} {tuple(gap_ref.shape)}")


def _check_lse_drop(lse_drop, B: int, H: int, S_q: int) -> None:
    if lse_drop is None:
        return
    prev, total = lse_drop
    if prev.shape != (B, H, S_q) or prev.dtype != torch.float32 or total.numel() != 1 or total.dtype != torch.float64:
        raise ValueError(f"lse_drop: expected (prev_lse float32 [{B}, {H}, {S_q}], total float64 with one element); "
                         f"got {prev.dtype} {tuple(prev.shape)} and {total.dtype} {tuple(total.shape)}")


def _check(q, k, v, kv_blocks, kv_counts, block_m, block_n, tile_len=None, seq_index=None) -> tuple[int, int]:
    """Validate the inputs; returns the (query, key) lengths the layout counts in (tiled when
    ``seq_index`` is given)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v: expected [B, H, S, D] with matching B, H, D; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    S_q, S_k = q.shape[2], k.shape[2]
    if seq_index is not None:
        if seq_index.dim() != 1 or q.shape[2] != k.shape[2]:
            raise ValueError(f"seq_index: a 1-D index over one sequence shared by q and k (self/joint attention); "
                             f"got shape {tuple(seq_index.shape)} with {q.shape[2]} queries, {k.shape[2]} keys")
        if tile_len is None and seq_index.numel() != q.shape[2]:
            raise ValueError(f"seq_index: without tile_len it must be a permutation of the {q.shape[2]} tokens, got "
                             f"{seq_index.numel()} entries; pass tile_len to mark padding slots")
        S_q = S_k = seq_index.numel()
    n_q = math.ceil(S_q / block_m)
    B, H = q.shape[:2]
    if kv_blocks.dim() != 4 or kv_blocks.shape[2] != n_q or kv_counts.shape != kv_blocks.shape[:3]:
        raise ValueError(f"kv_blocks / kv_counts: expected [B|1, H|1, {n_q}, n] and [B|1, H|1, {n_q}] for "
                         f"{S_q} queries in tiles of {block_m}; got {tuple(kv_blocks.shape)} and "
                         f"{tuple(kv_counts.shape)}")
    if kv_blocks.shape[0] not in (1, B) or kv_blocks.shape[1] not in (1, H):
        raise ValueError(f"kv_blocks: batch/head dims must be 1 or {B}/{H}, got {tuple(kv_blocks.shape[:2])}")
    if tile_len is not None:
        n_k = math.ceil(S_k / block_n)
        if block_m != block_n or S_q != S_k or tile_len.shape != (n_k,):
            raise ValueError(f"tile_len: self/joint attention only (block_m == block_n, as many queries as keys) "
                             f"with one length per tile, shape ({n_k},); got block_m={block_m}, block_n={block_n}, "
                             f"{S_q} queries, {S_k} keys, tile_len {tuple(tile_len.shape)}")
    return S_q, S_k


# ----------------------------------------------------------------------------------------------
# Triton kernel

if triton is not None:

    @triton.jit
    def _scores(
        q, K, DescK, Blocks, TileLen, Index, i, d_ok, offs_d, b, h, skb, skh, sks, k_row0, k_col, S_K,
        BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, HAS_LEN: tl.constexpr, DOT_F32: tl.constexpr,
        EVEN_D: tl.constexpr, HAS_INDEX: tl.constexpr, USE_TMA: tl.constexpr,
    ):
        """Sub-tile ``i`` of the key list: its raw scores q @ k^T (-inf on key slots past the
        sequence or the tile's length), first key position, key positions and value-load mask."""
        R: tl.constexpr = BLOCK_N // SUB_N  # sub-tiles per layout tile
        kb = tl.load(Blocks + i // R)
        start_n = kb * BLOCK_N + (i % R) * SUB_N
        k_end = S_K
        if HAS_LEN:
            k_end = tl.minimum(S_K, kb * BLOCK_N + tl.load(TileLen + kb))
        offs_n = start_n + tl.arange(0, SUB_N)
        col_ok = offs_n < k_end
        if EVEN_D:  # head_dim is a power of two: no head_dim mask, so the loads vectorize
            k_mask = col_ok[None, :]
            v_mask = col_ok[:, None]
        else:
            k_mask = col_ok[None, :] & d_ok[:, None]
            v_mask = col_ok[:, None] & d_ok[None, :]
        k_pos = offs_n
        if HAS_INDEX:
            k_pos = tl.load(Index + offs_n, mask=offs_n < S_K, other=0)
        if USE_TMA:  # rows past the sequence hold other finite data or zeros; col_ok masks them
            kt = tl.trans(DescK.load([k_row0 + start_n, k_col]))
        else:
            kt = tl.load(K + b * skb + h * skh + k_pos[None, :] * sks + offs_d[:, None], mask=k_mask, other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, kt)
        if start_n + SUB_N > k_end:  # only a ragged or padded tile
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
        return qk, start_n, k_pos, v_mask

    @triton.jit
    def _key_loop(
        q, m_i, K, V, Gap, Blocks, TileLen, Index, DescK, DescV, gap_row, gap_base, row_live, d_ok, offs_d,
        count, qk_scale, b, h, skb, skh, sks, svb, svh, svs, k_row0, k_col, v_row0, v_col, S_K,
        D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr,
        RETURN_GAP: tl.constexpr, HAS_LEN: tl.constexpr, DOT_F32: tl.constexpr, EVEN_D: tl.constexpr,
        HAS_INDEX: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, GAP_PARTS: tl.constexpr,
        PTX_STORE: tl.constexpr, GAP_REF: tl.constexpr, FIXED: tl.constexpr,
    ):
        """The key loop of one CTA: (acc, l_i, m_i) over the listed key tiles. ``m_i`` is the rows'
        starting maximum (exp2 domain); with ``FIXED`` it stays the softmax's shift throughout (no
        running maximum, no rescaling), else it is the running maximum, from -inf."""
        R: tl.constexpr = BLOCK_N // SUB_N  # sub-tiles per layout tile
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        if RETURN_GAP:
            tile_rm = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for i in tl.range(0, count * R, warp_specialize=WARP_SPEC):
            # layout tiles of BLOCK_N keys are visited as R sub-tiles of SUB_N
            qk, start_n, k_pos, v_mask = _scores(
                q, K, DescK, Blocks, TileLen, Index, i, d_ok, offs_d, b, h, skb, skh, sks, k_row0, k_col, S_K,
                BLOCK_N, SUB_N, HAS_LEN, DOT_F32, EVEN_D, HAS_INDEX, USE_TMA)
            # the softmax scale is folded into the exponent (one FMA per score, as in Triton's tutorial)
            if FIXED:  # the fixed shift: no row maximum, no rescaling of l_i and acc
                p = tl.math.exp2(qk * qk_scale - m_i[:, None])
                l_i += tl.sum(p, 1)
            else:
                qk_max = tl.max(qk, 1) * qk_scale
                m_new = tl.maximum(m_i, qk_max)
                p = tl.math.exp2(qk * qk_scale - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
            if USE_TMA:  # p is 0 on masked rows
                vv = DescV.load([v_row0 + start_n, v_col])
            else:
                vv = tl.load(V + b * svb + h * svh + k_pos[:, None] * svs + offs_d[None, :], mask=v_mask, other=0.0)
            if DOT_F32:
                vv = vv.to(tl.float32)
            if not FIXED:
                acc = acc * alpha[:, None]
            acc = tl.dot(p.to(vv.dtype), vv, acc)
            if not FIXED:
                m_i = m_new
            if RETURN_GAP:
                if FIXED:  # (with the fixed shift the wrapper allows only gaps against gap_ref)
                    qk_max = tl.max(qk, 1) * qk_scale
                tile_rm = tl.maximum(tile_rm, qk_max)
                if i % R == R - 1:  # layout tile finished: its gap against the running max (or gap_ref)
                    if GAP_REF:
                        g = tl.minimum(tile_rm - gap_base, 0.0)
                    else:
                        g = tile_rm - m_i
                    g = tl.where(row_live & (tile_rm > float("-inf")), g, float("-inf"))
                    # the max over each of GAP_PARTS groups of ROWS consecutive rows (16 at BLOCK_M
                    # 128: rows one warp holds in the MMA layout, so no cross-warp exchange and no
                    # barrier in the loop), folded into the tile's slot by an atomic max
                    ROWS: tl.constexpr = BLOCK_M // GAP_PARTS
                    gr = tl.reshape(g, [GAP_PARTS, ROWS])
                    in_g_layout = (g < g).to(tl.int32)  # zeros laid out as g: the row numbers follow it
                    lrow = tl.reshape(tl.arange(0, BLOCK_M) + in_g_layout, [GAP_PARTS, ROWS])
                    gp = tl.max(gr, 1)[:, None] + tl.zeros_like(gr)
                    first = lrow % ROWS == 0  # one row per group reports (its copies hold the same value)
                    if not PTX_STORE:  # CPU interpreter (no inline assembly there)
                        tl.atomic_max(gap_row + i // R + 0 * lrow, gp, mask=first)
                    else:  # tl.atomic_max would be re-laid out through shared memory, with a barrier.
                        # Gaps lie in [-inf, +0], where the float order is the reverse of the unsigned
                        # order of the bits: the float max is an unsigned min (-inf, the buffer's
                        # initial value, is the largest such pattern)
                        tl.inline_asm_elementwise(
                            "{ .reg .pred p; .reg .u64 a; setp.ne.s32 p, $3, 0; mad.wide.s32 a, $2, 4, $4; "
                            "@p red.global.min.u32 [a], $1; mov.b32 $0, 0; }",
                            "=r,r,r,r,l", [gp, i // R + 0 * lrow, first.to(tl.int32), gap_row.to(tl.int64)],
                            dtype=tl.int32, is_pure=False, pack=1)
                    tile_rm = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        return acc, l_i, m_i

    @triton.jit
    def _block_sparse_fwd(
        Q, K, V, Out, Lse, Gap, Blocks, Counts, TileLen, Index, DescQ, DescK, DescV, PrevLse, DropSum, GapRef,
        sm_scale,
        sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
        sbb, sbh, sbm, scb, sch, sgm,
        H, N_Q, S_Q, S_K, HEAD_D,
        D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr,
        RETURN_LSE: tl.constexpr, RETURN_GAP: tl.constexpr, HAS_LEN: tl.constexpr, DOT_F32: tl.constexpr,
        EVEN_D: tl.constexpr, HAS_INDEX: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
        GAP_PARTS: tl.constexpr, PTX_STORE: tl.constexpr, LSE_DROP: tl.constexpr, GAP_REF: tl.constexpr,
        SHIFT: tl.constexpr, SUM_HI: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        row_ok = offs_m < S_Q
        d_ok = offs_d < HEAD_D
        q_pos = offs_m
        if HAS_INDEX:  # tiled slot -> model position: no gather / scatter copies
            q_pos = tl.load(Index + offs_m, mask=row_ok, other=0)
        k_row0 = 0
        k_col = 0
        v_row0 = 0
        v_col = 0
        if USE_TMA:  # tensor-memory-accelerator loads: rows of one (batch, head) at a constant stride
            q_base = b * sqb + h * sqh
            q = DescQ.load([q_base // sqs + pid_m * BLOCK_M, q_base % sqs])
            k_base = b * skb + h * skh
            k_row0 = k_base // sks
            k_col = k_base % sks
            v_base = b * svb + h * svh
            v_row0 = v_base // svs
            v_col = v_base % svs
        else:
            q = tl.load(Q + b * sqb + h * sqh + q_pos[:, None] * sqs + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        qk_scale = sm_scale * 1.4426950408889634  # exp2 domain
        count = tl.load(Counts + b * scb + h * sch + pid_m)
        block_row = Blocks + b * sbb + h * sbh + pid_m * sbm
        row_live = row_ok
        if HAS_LEN:
            row_live = row_ok & (offs_m < pid_m * BLOCK_M + tl.load(TileLen + pid_m))
        gap_row = Gap
        gap_base = tl.zeros([BLOCK_M], dtype=tl.float32)
        if RETURN_GAP:
            gap_row = Gap + (pid_bh * N_Q + pid_m) * sgm
            if GAP_REF:  # the rows' reference in the exp2 domain
                gap_base = tl.load(GapRef + pid_bh * S_Q + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        if SHIFT:  # the fixed shift: each row's largest score in the first listed sub-tile, exp2 domain
            if count > 0:
                qk0, _, _, _ = _scores(
                    q, K, DescK, block_row, TileLen, Index, 0, d_ok, offs_d, b, h, skb, skh, sks, k_row0, k_col,
                    S_K, BLOCK_N, SUB_N, HAS_LEN, DOT_F32, EVEN_D, HAS_INDEX, USE_TMA)
                m_i = tl.max(qk0, 1) * qk_scale
        acc, l_i, m_i = _key_loop(
            q, m_i, K, V, Gap, block_row, TileLen, Index, DescK, DescV, gap_row, gap_base, row_live, d_ok, offs_d,
            count, qk_scale, b, h, skb, skh, sks, svb, svh, svs, k_row0, k_col, v_row0, v_col, S_K,
            D_PAD, BLOCK_M, BLOCK_N, SUB_N, RETURN_GAP, HAS_LEN, DOT_F32, EVEN_D, HAS_INDEX, USE_TMA, WARP_SPEC,
            GAP_PARTS, PTX_STORE, GAP_REF, SHIFT)
        if SHIFT:
            # Against the shift a row's sum must lie in [1, SUM_HI]: at least the first sub-tile's
            # largest weight, 1, and no weight above SUM_HI (2**64; 2**15 for float16 weights) so
            # none overflows. A row with no valid key in the first sub-tile (shift -inf: NaN sums)
            # fails too. A CTA with a row outside (padding rows of a tile included: they are written
            # without seq_index) is redone with the running maximum (a branch taken by the whole
            # CTA; its gaps are the same values again).
            bad = row_ok & ~((l_i >= 1.0) & (l_i <= SUM_HI))
            if tl.max(bad.to(tl.int32), 0) > 0:
                acc, l_i, m_i = _key_loop(
                    q, tl.full([BLOCK_M], float("-inf"), dtype=tl.float32), K, V, Gap, block_row, TileLen, Index,
                    DescK, DescV, gap_row, gap_base, row_live, d_ok, offs_d, count, qk_scale, b, h, skb, skh, sks,
                    svb, svh, svs, k_row0, k_col, v_row0, v_col, S_K,
                    D_PAD, BLOCK_M, BLOCK_N, SUB_N, RETURN_GAP, HAS_LEN, DOT_F32, EVEN_D, HAS_INDEX, USE_TMA,
                    WARP_SPEC, GAP_PARTS, PTX_STORE, GAP_REF, False)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        out_ok = row_ok
        if HAS_INDEX:  # padding slots repeat a model position: only valid slots write
            out_ok = row_live
        tl.store(Out + b * sob + h * soh + q_pos[:, None] * sos + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=out_ok[:, None] & d_ok[None, :])
        if RETURN_LSE or LSE_DROP:
            lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
            if RETURN_LSE:
                tl.store(Lse + pid_bh * S_Q + offs_m, lse, mask=row_ok)
            if LSE_DROP:  # sum over rows of max(prev - lse, 0), NaN as 0, +inf as the largest float
                prev = tl.load(PrevLse + pid_bh * S_Q + offs_m, mask=row_ok, other=0.0)
                d = prev - lse
                d = tl.where(d != d, 0.0, tl.minimum(tl.maximum(d, 0.0), 3.4028234663852886e38))
                tl.atomic_add(DropSum, tl.sum(tl.where(row_ok, d, 0.0).to(tl.float64), 0))


def block_sparse_attention_triton(q, k, v, kv_blocks, kv_counts, *, block_m: int = TILE, block_n: int = TILE,
                                  scale: float | None = None, return_lse: bool = False,
                                  tile_len: torch.Tensor | None = None, return_gap: bool = False,
                                  sub_n: int | None = None, num_warps: int | None = None,
                                  num_stages: int | None = None, seq_index: torch.Tensor | None = None,
                                  tma: bool | None = None, warp_specialize: bool | None = None,
                                  max_registers: int | None = None, lse_drop: tuple | None = None,
                                  gap_ref: torch.Tensor | None = None, fixed_shift: bool | None = None):
    """The Triton kernel (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

    Launch knobs (results do not depend on them; ``None`` takes :data:`LAUNCH_DEFAULTS`, chosen
    with ``benchmarks/sparse.py`` at the Wan 480p shape, d=128):
    ``sub_n`` (a power of two dividing ``block_n``: keys per inner step), ``num_warps``,
    ``num_stages``; ``tma`` loads q, k, v through tensor descriptors (Hopper's TMA) where the
    inputs allow it (no ``seq_index``, power-of-two head_dim, each (batch, head)'s rows at one
    16-byte-aligned stride), pointer loads otherwise; ``warp_specialize`` asks Triton to
    warp-specialize the key loop (in the H100 and H200 sweeps, ``benchmarks/results/sparse-*.json``,
    neither helped with the online softmax, so both are off by default there);
    ``fixed_shift`` shifts each row's softmax by its largest score in the first listed key sub-tile
    instead of the running maximum (see the module docstring). By default, on Hopper for bfloat16
    inputs that ask no running-max gaps, ``tma`` and ``fixed_shift`` are both on and the shift is
    taken where the TMA loads are (the pair is faster; TMA alone is slower, the shift alone about
    even); float16 would redo query tiles more often;
    ``max_registers`` caps the registers per thread (Triton's ``maxnreg``, 0 for no cap; the
    default, 128 on Hopper up to head_dim 128, lets two 8-warp CTAs share an SM; GPU only, ignored
    by the CPU interpreter).
    """
    if triton is None:
        raise RuntimeError("block_sparse_attention_triton: triton is not installed; use the reference twin")
    S_q, S_k = _check(q, k, v, kv_blocks, kv_counts, block_m, block_n, tile_len, seq_index)
    _check_lse_drop(lse_drop, q.shape[0], q.shape[1], S_q)
    _check_gap_ref(gap_ref, return_gap, q.shape[0], q.shape[1], S_q)
    if fixed_shift and return_gap and gap_ref is None:
        raise ValueError("fixed_shift: the running-max gaps (return_gap without gap_ref) need the running maximum; "
                         "pass gap_ref or fixed_shift=False")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, _, D = q.shape
    if D > 256:
        raise ValueError(f"head_dim: at most 256 is supported, got {D}")
    scale = D**-0.5 if scale is None else scale
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
    shift_ok = q.dtype == torch.bfloat16 and not (return_gap and gap_ref is None)  # as measured
    knobs = _launch_knobs(D, capability, shift_ok=shift_ok, sub_n=sub_n, num_warps=num_warps, num_stages=num_stages,
                          tma=tma, warp_specialize=warp_specialize, max_registers=max_registers,
                          fixed_shift=fixed_shift)
    sub_n = sub_n if sub_n is not None else min(knobs["sub_n"], block_n)
    if sub_n < 16 or block_n % sub_n or sub_n & (sub_n - 1):
        raise ValueError(f"sub_n: must be a power of two >= 16 dividing block_n={block_n}, got {sub_n}")
    n_q = math.ceil(S_q / block_m)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, S_q, device=q.device, dtype=torch.float32) if return_lse else out
    blocks = kv_blocks.to(torch.int32)
    counts = kv_counts.to(torch.int32)
    parts = min(GAP_PARTS, block_m)
    gap = (torch.full((B, H, n_q, blocks.shape[-1]), float("-inf"), device=q.device, dtype=torch.float32)
           if return_gap else out)
    lens = tile_len.to(device=q.device, dtype=torch.int32).contiguous() if tile_len is not None else counts
    index = seq_index.to(device=q.device, dtype=torch.int32).contiguous() if seq_index is not None else counts
    sb = [*lead_strides(blocks), blocks.stride(2)]
    sc = lead_strides(counts)
    even_d = D == max(16, triton.next_power_of_2(D))
    descs = None
    if knobs["tma"]:
        descs = _descriptors((q, k, v), (block_m, sub_n, sub_n)) if seq_index is None and even_d else None
        if descs is None and tma and "tma" not in _warned:  # asked for, not the default
            _warned.add("tma")
            logger.info("block_sparse_attention: tma=True but these inputs do not fit tensor descriptors (seq_index, "
                        "a head_dim that is not a power of two, or unaligned strides); using pointer loads")
    # by default the fixed shift goes with the TMA loads (with pointer loads it was no faster)
    shift = bool(knobs["fixed_shift"]) and (descs is not None or fixed_shift is not None)
    grid = (n_q, B * H)
    _block_sparse_fwd[grid](
        q, k, v, out, lse, gap, blocks, counts, lens, index, *(descs or (q, k, v)),
        *(lse_drop if lse_drop is not None else (lse, lse)), gap_ref.contiguous() if gap_ref is not None else lse,
        scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *sb, *sc, blocks.shape[-1], H, n_q, S_q, S_k, D,
        D_PAD=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m, BLOCK_N=block_n, SUB_N=sub_n,
        RETURN_LSE=return_lse, RETURN_GAP=return_gap, HAS_LEN=tile_len is not None,
        EVEN_D=even_d, HAS_INDEX=seq_index is not None, USE_TMA=descs is not None,
        WARP_SPEC=bool(knobs["warp_specialize"]), GAP_PARTS=parts, PTX_STORE=q.is_cuda,
        LSE_DROP=lse_drop is not None, GAP_REF=gap_ref is not None, SHIFT=shift,
        SUM_HI=2.0**15 if q.dtype == torch.float16 else 2.0**64,
        # Triton's CPU interpreter (3.9) computes bf16 tl.dot wrongly: there, the tiles are multiplied
        # in fp32 (loads, stores, indexing and the online softmax are the same code as on the GPU).
        DOT_F32=not q.is_cuda, num_warps=knobs["num_warps"], num_stages=knobs["num_stages"],
        **({"maxnreg": int(knobs["max_registers"])} if knobs["max_registers"] and q.is_cuda else {}),
    )
    return _outputs(out, lse if return_lse else None, gap if return_gap else None)


# The kernel reduces each visited tile's gap over GAP_PARTS groups of consecutive query rows (each
# group within one warp: no barrier in the key loop) and folds the groups into the tile's slot with
# an atomic max. The former version wrote the groups to a float32 scratch GAP_PARTS times the gap's
# size for the wrapper to reduce: at the H200's Wan 480p shape, 25% density, TemporalSparse's
# extras (gap, LSE drop) cost 2.0% of a dense call that way (sparse-NVIDIA-H200-2026-11-30.json at
# 6ee679f); one reduction across all rows per tile cost 6.1% (commit e1dc1f5).
GAP_PARTS = 8


# Launch knobs of block_sparse_attention_triton when not given (sub_n at most the key tile), chosen
# on the H200 at the Wan 480p shape (head_dim 128, sparse-occupancy-NVIDIA-H200-2026-11-30.json) and
# the CogVideoX shape (head_dim 64, sparse-head64-*.json): registers capped at 128 per thread let two
# 8-warp CTAs share an SM (64-key steps over 2 stages: 96 KiB of shared memory each at head_dim 128;
# 128-key steps over 2 stages: 80 KiB at 64), so one CTA's softmax, prologue and epilogue overlap the
# other's matrix products. That beat the best uncapped configuration at densities 1, 0.25 and 0.1 by
# 8-14% at head_dim 128, and the former 4-warp default by 4-8% at 64. Above 128 the accumulator
# alone needs 128 registers per thread, so the cap is off there; it is also off by default on GPUs
# other than Hopper (compute capability 9.x), where it was measured: an A100 SM's 164 KiB of shared
# memory holds one such CTA, not two, so the cap would only cost spills.
# The fixed softmax shift (first sub-tile's row max) and TMA loads go together by default on
# Hopper: the loop then keeps no running maximum and never rescales, and TMA loads beat pointer
# loads, which they did not with the online softmax. At the Wan 480p shape on the H200
# (sparse-shift-NVIDIA-H200-2026-12-01.json, commit f0e5ab6, medians of 5, ratio to cuDNN at density
# 1 / 0.5 / 0.25 / 0.1): both 0.976x / 2.021x / 3.86x / 7.583x; neither (the former default) 0.91x /
# 1.786x / 3.484x / 7.136x; the shift with pointer loads 0.90x / 1.797x / 3.508x / 7.411x; TMA with
# the online softmax 0.90x / 1.735x / 3.321x / 6.707x. (A shift given from a dense pass's LSE, the
# first form of this option, measured the same: sparse-max-ref-*.json.) Calls through seq_index (the
# sparse methods') cannot take TMA loads and keep the online softmax.
LAUNCH_DEFAULTS = {"sub_n": 64, "num_warps": 8, "num_stages": 2, "tma": False, "warp_specialize": False,
                   "max_registers": 128, "fixed_shift": False}


def _launch_knobs(head_dim: int, capability: tuple[int, int] | None = (9, 0), shift_ok: bool = True,
                  **given) -> dict:
    """The launch knobs for ``head_dim`` on a GPU of this compute capability (``None``: the CPU
    interpreter), for a call that may (``shift_ok``) or may not take the fixed softmax shift,
    :data:`LAUNCH_DEFAULTS` adjusted, then the ``given`` ones that are not ``None``."""
    knobs = dict(LAUNCH_DEFAULTS)
    if shift_ok and capability is not None and capability[0] == 9:
        knobs.update(tma=True, fixed_shift=True)  # together, see above
    if head_dim <= 64:
        knobs.update(sub_n=128)
    elif head_dim > 128:
        knobs.update(max_registers=None)
    if capability is not None and capability[0] != 9:
        knobs.update(max_registers=None)
    knobs.update({k: v for k, v in given.items() if v is not None})
    return knobs


def _descriptors(tensors, rows) -> tuple | None:
    """Tensor descriptors over ``[B, H, S, D]`` tensors seen as 2-D ``[rows, row stride]``, boxes of
    ``rows[i] x D``; None when a tensor does not fit (the pointer path then serves).

    Row ``(b * sb + h * sh) // ss + s``, column ``(b * sb + h * sh) % ss`` address element
    ``(b, h, s, 0)``: this covers both [B, H, S, D] and [B, S, H, D] memory orders.
    """
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover - triton < 3.4
        return None
    out = []
    for x, box in zip(tensors, rows):
        B, H, S, D = x.shape
        sb, sh, ss, sd = x.stride()
        if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
            return None  # TMA is Hopper and later
        if D < 16 or D & (D - 1) or sd != 1 or ss < D or x.data_ptr() % 16 or (ss * x.element_size()) % 16:
            return None
        bases = [b * sb + h * sh for b in range(B) for h in range(H)]
        if any(base % ss + D > ss for base in bases):
            return None
        n_rows = max(bases) // ss + S
        out.append(TensorDescriptor(x, shape=[n_rows, ss], strides=[ss, 1], block_shape=[box, D]))
    return tuple(out)


def lead_strides(t: torch.Tensor) -> list[int]:
    """Batch and head strides of a layout tensor for a kernel, 0 where that dimension is 1 (broadcast)."""
    return [t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0]


def triton_usable(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def block_sparse_attention(q, k, v, kv_blocks, kv_counts, *, block_m: int = TILE, block_n: int = TILE,
                           scale: float | None = None, return_lse: bool = False,
                           tile_len: torch.Tensor | None = None, return_gap: bool = False,
                           seq_index: torch.Tensor | None = None, lse_drop: tuple | None = None,
                           gap_ref: torch.Tensor | None = None, **launch):
    """Block-sparse attention: the Triton kernel where it can run, else the reference twin (logged once).

    Args:
        q, k, v: ``[B, H, S, D]`` (bf16/fp16 on GPU; any float dtype for the reference).
        kv_blocks, kv_counts: the layout, see :func:`tiles_to_blocks`.
        block_m, block_n: query / key tile sizes the layout counts in.
        scale: softmax scale (default ``D ** -0.5``).
        return_lse: also return the natural-log LSE per query row, float32 ``[B, H, S]``.
        tile_len: int ``[n_tiles]`` valid tokens per tile (padded 3D-tile layouts; self/joint only).
        return_gap: also return the per-visited-tile gap, float32 ``[B, H, n_q_tiles, max_count]``
            (see the module docstring).
        seq_index: int ``[S_tiled]``, the model position of each tiled slot (padding slots repeat
            one; ``tile_len`` marks them): q, k, v and the output stay in model order while the
            layout, ``tile_len``, LSE and gap count in tiled order (see the module docstring).
        lse_drop: ``(prev_lse, total)``: float32 ``[B, H, S]`` LSE of an earlier pass over the same
            rows and a one-element float64 tensor; the call adds to ``total`` the sum over rows of
            ``max(prev_lse - lse, 0)`` (:func:`lse_drop_sum`), so TemporalSparse's error check needs
            neither the LSE output nor another pass.
        gap_ref: float32 ``[B, H, S]`` log-sum-exp per row in tiled order (with ``return_gap``): measure
            the gap against it instead of the running row max (see the module docstring).
        launch: launch knobs of :func:`block_sparse_attention_triton` (``sub_n``, ``num_warps``,
            ``num_stages``, ``tma``, ``fixed_shift``, ...).

    Returns ``out``, or a tuple ``(out, lse?, gap?)`` with the requested extras in that order.
    """
    if triton_usable(q):
        return block_sparse_attention_triton(q, k, v, kv_blocks, kv_counts, block_m=block_m, block_n=block_n,
                                             scale=scale, return_lse=return_lse, tile_len=tile_len,
                                             return_gap=return_gap, seq_index=seq_index, lse_drop=lse_drop,
                                             gap_ref=gap_ref, **launch)
    key = q.device.type
    if key not in _warned:
        _warned.add(key)
        logger.info("block_sparse_attention: no Triton for %s tensors; using the PyTorch reference twin "
                    "(explicit mask, slower)", key)
    return block_sparse_attention_reference(q, k, v, kv_blocks, kv_counts, block_m=block_m, block_n=block_n,
                                            scale=scale, return_lse=return_lse, tile_len=tile_len,
                                            return_gap=return_gap, seq_index=seq_index, lse_drop=lse_drop,
                                            gap_ref=gap_ref)
