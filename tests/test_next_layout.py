"""TemporalSparse's next-mask kernel (Triton under TRITON_INTERPRET=1) vs its twin vs a plain loop."""

import math

import pytest
import torch
from dit_accel.kernels import block_sparse as bs
from dit_accel.kernels.next_layout import _next_mask_kernel, next_mask, next_mask_reference  # noqa: F401

pytestmark = pytest.mark.skipif(bs.triton is None, reason="triton not installed")


def _loop_oracle(gap, blocks, counts, n_k, threshold, k_min, k_max, text_tile):
    B, H, n_q, W = gap.shape
    out = torch.zeros(B, H, n_q, n_k, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for m in range(n_q):
                c = int(counts[b if counts.shape[0] > 1 else 0, h if counts.shape[1] > 1 else 0, m])
                row_blocks = blocks[b if blocks.shape[0] > 1 else 0, h if blocks.shape[1] > 1 else 0, m]
                g = [float(gap[b, h, m, i]) for i in range(c)]
                order = sorted(range(c), key=lambda i: (-g[i], i))  # equal gaps: earlier first
                rank = {i: r for r, i in enumerate(order)}
                for i in range(c):
                    keep = (g[i] >= threshold or rank[i] < k_min) and rank[i] < k_max
                    keep = keep or int(row_blocks[i]) >= text_tile or m >= text_tile
                    out[b, h, m, int(row_blocks[i])] = keep
    return out


CASES = pytest.mark.parametrize(("threshold", "k_min", "k_max", "text"), [
    (-3.0, 1, 100, False),            # threshold only
    (100.0, 4, 100, False),           # the floor decides
    (-math.inf, 1, 3, True),          # the ceiling decides; text tiles and rows kept
    (-2.0, 2, 5, True),               # all three
])


def _random_layout(g, B, H, n, text_tile):
    """A random tile mask (diagonal kept; text rows and columns, from ``text_tile`` on, full) and its
    layout."""
    tiles = torch.rand(B, H, n, n, generator=g) < 0.6
    tiles |= torch.eye(n, dtype=torch.bool)
    tiles[..., text_tile:] = True
    tiles[:, :, text_tile:] = True
    return tiles, *bs.tiles_to_blocks(tiles, width=n)


@CASES
def test_next_mask_kernel_twin_and_loop_agree(threshold, k_min, k_max, text):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator().manual_seed(seed)
    B, H, n = 2, 3, 11
    text_tile = 9 if text else n
    tiles, blocks, counts = _random_layout(g, B, H, n, text_tile)
    gap = -8 * torch.rand(B, H, n, n, generator=g)
    gap[..., 0] = 0.0
    gap[:, :, :, 1:4] = 0.0  # ties at 0, as tiles holding some row's maximum give
    gap[0, 0, 1, 4:6] = -1.0
    gap = gap.masked_fill(torch.arange(n) >= counts[..., None], -math.inf)
    kw = dict(n_k=n, threshold=threshold, k_min=k_min, k_max=k_max, text_tile=text_tile if text else None)
    want = _loop_oracle(gap, blocks, counts, n, threshold, k_min, k_max, text_tile)
    ref = next_mask_reference(gap, blocks, counts, **kw)
    got = next_mask(gap, blocks, counts, **kw)  # TRITON_INTERPRET=1 on CPU: the kernel
    assert torch.equal(ref, want), f"twin differs from the loop (seed {seed})"
    assert torch.equal(got, want), f"kernel differs from the loop (seed {seed})"
    assert not (got & ~tiles).any()  # only visited tiles survive


def test_next_mask_runs_the_kernel_under_the_interpreter(monkeypatch):
    calls = []
    original = _next_mask_kernel.__getitem__

    def spy(self, grid):
        calls.append(grid)
        return original(grid)

    monkeypatch.setattr(type(_next_mask_kernel), "__getitem__", spy)
    tiles = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    blocks, counts = bs.tiles_to_blocks(tiles, width=3)
    next_mask(torch.zeros(1, 1, 3, 3), blocks, counts, n_k=3, threshold=-1.0, k_min=1, k_max=3)
    assert calls, "the Triton kernel did not run"


def test_bad_shapes_are_named():
    blocks, counts = bs.tiles_to_blocks(torch.ones(1, 1, 3, 3, dtype=torch.bool), width=3)
    with pytest.raises(ValueError, match="gap / blocks"):
        next_mask_reference(torch.zeros(1, 1, 3, 4), blocks, counts, n_k=3, threshold=0.0, k_min=1, k_max=3)


@CASES
def test_next_blocks_is_the_next_mask_compacted_in_visiting_order(threshold, k_min, k_max, text):
    """next_blocks (kernel and twin) against the loop oracle's mask, compacted here by hand: the kept
    tiles of every row in the order the row visited them, zeros after the count."""
    from dit_accel.kernels.next_layout import next_blocks, next_blocks_reference

    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator().manual_seed(seed)
    B, H, n = 2, 3, 13
    text_tile = 11 if text else n
    _, blocks, counts = _random_layout(g, B, H, n, text_tile)
    # a visiting order that is not increasing: each row's live entries reversed
    for b in range(B):
        for h in range(H):
            for m in range(n):
                c = int(counts[b, h, m])
                blocks[b, h, m, :c] = blocks[b, h, m, :c].flip(0)
    gap = -8 * torch.rand(B, H, n, n, generator=g)
    gap[..., 0] = 0.0
    gap[:, :, :, 2:4] = 0.0
    gap = gap.masked_fill(torch.arange(n) >= counts[..., None], -math.inf)
    kw = dict(n_k=n, threshold=threshold, k_min=k_min, k_max=k_max, text_tile=text_tile if text else None)
    mask = _loop_oracle(gap, blocks, counts, n, threshold, k_min, k_max, text_tile)
    want_b = torch.zeros(B, H, n, n, dtype=torch.int32)
    want_c = torch.zeros(B, H, n, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for m in range(n):
                kept = [int(t) for t in blocks[b, h, m, : int(counts[b, h, m])] if mask[b, h, m, int(t)]]
                want_b[b, h, m, : len(kept)] = torch.tensor(kept, dtype=torch.int32)
                want_c[b, h, m] = len(kept)
    tile_len = torch.randint(1, 129, (n,), generator=g)
    want_pairs = torch.zeros(B, H, n)
    for b in range(B):
        for h in range(H):
            for m in range(n):
                visited = blocks[b, h, m, : int(counts[b, h, m])].long()
                want_pairs[b, h, m] = float(tile_len[m]) * float(tile_len[visited].sum())
    every = torch.arange(n, dtype=torch.int32).expand(B, H, n, n)
    for name, fn in (("twin", next_blocks_reference), ("kernel", next_blocks)):  # TRITON_INTERPRET=1: the kernel
        got = fn(gap, blocks, counts, **kw)
        assert torch.equal(got.counts, want_c), f"{name}: counts differ (seed {seed})"
        assert torch.equal(got.blocks, want_b), f"{name}: blocks differ (seed {seed})"
        assert got.pairs is None
        for flag in (False, True):  # the refresh flag: every tile next time; pairs count the layout just run
            got = fn(gap, blocks, counts, **kw, tile_len=tile_len, refresh=torch.tensor(flag))
            assert torch.equal(got.pairs, want_pairs), f"{name}: pairs differ (seed {seed})"
            assert torch.equal(got.blocks, every if flag else want_b), f"{name}: refresh={flag} (seed {seed})"
            assert torch.equal(got.counts, torch.full_like(want_c, n) if flag else want_c)
        # a refresh value against a bound, and the pairs summed into a running float64 total
        for value, above in ((2.5, 3.0), (3.5, 3.0)):
            total = torch.full((1,), 7.0, dtype=torch.float64)
            got = fn(gap, blocks, counts, **kw, tile_len=tile_len, refresh=torch.tensor([value], dtype=torch.float64),
                     refresh_above=above, pairs_sum=total, pairs_scale=3.0)
            flag = value > above
            assert got.pairs is None
            assert total.item() == 7.0 + 3.0 * want_pairs.double().sum().item(), f"{name}: pairs_sum (seed {seed})"
            assert torch.equal(got.blocks, every if flag else want_b), f"{name}: {value} > {above} (seed {seed})"
        with pytest.raises(ValueError, match="pairs_sum"):
            fn(gap, blocks, counts, **kw, tile_len=tile_len, pairs_sum=torch.zeros(1))
        with pytest.raises(ValueError, match="refresh_above"):
            fn(gap, blocks, counts, **kw, refresh=torch.tensor(True), refresh_above=0.5)
