"""The sparse probes (benchmarks/sparse_pooled.py, sparse_cached.py) against explicit float64 attention."""

import pytest
import torch
from dit_accel.benchmarks import sparse_pooled
from dit_accel.kernels.block_sparse import TILE, block_sparse_attention_reference, tiles_to_blocks

import dit_accel.methods.sparse as sparse_methods


def _padded_order(tile_len):
    """seq_index for tiles holding tile_len model tokens each (padding slots repeat the tile's first token)."""
    index, start = [], 0
    for n in tile_len:
        index += list(range(start, start + n)) + [start] * (TILE - n)
        start += n
    return torch.tensor(index), torch.tensor(tile_len), start


def _dense64(q, k, v):
    s = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(s, -1) @ v.double()


@pytest.mark.parametrize("B,H,D", [(1, 2, 16), (2, 1, 64)])
def test_exact_when_every_skipped_tile_has_equal_keys(B, H, D):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    index, tile_len, S = _padded_order([100, 128, 57, 90])
    n = len(tile_len)
    tile_of = torch.repeat_interleave(torch.arange(n), tile_len)
    k = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)[:, :, tile_of].float()  # one key per tile
    q, v = (torch.randn(B, H, S, D, generator=g) for _ in range(2))
    mask = torch.rand(1, 1, n, n, generator=g) < 0.5
    mask[..., torch.arange(n), torch.arange(n)] = True
    blocks, counts = tiles_to_blocks(mask)
    out, lse = block_sparse_attention_reference(q, k, v, blocks, counts, return_lse=True, tile_len=tile_len,
                                                seq_index=index)
    est = sparse_pooled.pooled_estimate(q, k, v, blocks, counts, out, lse, tile_len, index)
    dense = _dense64(q, k, v)
    assert (out.double() - dense).abs().max() > 1e-2  # the skipped tiles matter here
    assert (est.double() - dense).abs().max() < 1e-4


def test_nothing_added_when_every_tile_is_visited_and_the_patch_is_undone():
    index, tile_len, S = _padded_order([128, 70, 128])
    q, k, v = (torch.randn(1, 2, S, 32) for _ in range(3))
    blocks, counts = tiles_to_blocks(torch.ones(1, 1, 3, 3, dtype=torch.bool))
    kernel = sparse_methods.block_sparse_attention
    with sparse_pooled.with_pooled_estimate():
        assert sparse_methods.block_sparse_attention is not kernel
        out = sparse_methods.block_sparse_attention(q, k, v, blocks, counts, tile_len=tile_len, seq_index=index)
    assert sparse_methods.block_sparse_attention is kernel
    assert (out.double() - _dense64(q, k, v)).abs().max() < 1e-4


def test_cached_probe_merge_of_a_layout_and_its_complement_is_dense():
    """sparse_cached merges the kept tiles' pass with the skipped tiles' pass through their LSEs."""
    from dit_accel.benchmarks import sparse_cached
    from dit_accel.kernels.tile_order import tile_order

    order = tile_order((3, 8, 10), None, 0, False, torch.device("cpu"))  # padded 3D tiles
    S = 3 * 8 * 10
    n = order.tile_len.numel()
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, k, v = (torch.randn(2, 2, S, 64, generator=g) for _ in range(3))
    mask = torch.rand(2, 2, n, n, generator=g) < 0.5
    mask[..., torch.arange(n), torch.arange(n)] = True
    parts = []
    for m in (mask, ~mask):
        blocks, counts = tiles_to_blocks(m)
        out, lse = block_sparse_attention_reference(q, k, v, blocks, counts, return_lse=True, tile_len=order.tile_len,
                                                    seq_index=order.index)
        parts += [out, sparse_cached._model_order(lse, order)]
    merged = sparse_cached.merge(*parts)
    dense = _dense64(q, k, v)
    assert (parts[0].double() - dense).abs().max() > 1e-2
    assert (merged.double() - dense).abs().max() < 1e-4
