"""Tile-aligned token order, Neighborhood and TemporalSparse: exactness against dense attention,
window geometry by its defining properties, skip bookkeeping against the kernel's gap output, and
the methods through AttnProcessor on tiny pipelines of every video family and Flux."""

import math

import pytest
import torch
import torch.nn.functional as F
from dit_accel.kernels import block_sparse as bs
from dit_accel.kernels.tile_order import choose_tile, tile_order, window_tiles
from dit_accel.pipelines.tiny import make_tiny_pipeline, tiny_inputs
from helpers import attention_call, pipeline_output

import dit_accel

GRIDS = [(5, 6, 7), (3, 9, 13), (1, 16, 16), (4, 4, 4)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize(("text", "text_first"), [(0, False), (11, True), (11, False)])
def test_tile_order_is_an_exact_permutation(grid, text, text_first):
    order = tile_order(grid, None, text, text_first)
    S = math.prod(grid) + text
    x = torch.randn(2, 3, S, 4)
    assert torch.equal(order.scatter(order.gather(x)), x)
    assert math.prod(order.tile) <= bs.TILE
    assert int(order.tile_len[: order.video_tiles].sum()) == math.prod(grid)
    assert int(order.tile_len.sum()) == S  # text tiles too, the last one ragged
    # every model position sits in exactly one valid slot, and a slot's tokens form one 3D box
    slots = torch.arange(order.length)
    valid = (slots % bs.TILE) < order.tile_len[slots // bs.TILE].long()
    assert sorted(order.index[valid].tolist()) == list(range(S))
    _, H, W = grid
    offset = text if text_first else 0
    for n in range(order.video_tiles):
        pos = order.index[n * bs.TILE: n * bs.TILE + int(order.tile_len[n])] - offset
        coords = torch.stack([pos // (H * W), (pos // W) % H, pos % W], 1)
        extent = coords.amax(0) - coords.amin(0) + 1
        assert int(extent.prod()) == len(pos) and (extent <= torch.tensor(order.tile)).all()
    # packed: the same traversal without padding, in full kernel tiles (only the last video tile ragged)
    packed = tile_order(grid, None, text, text_first, packed=True)
    assert torch.equal(packed.scatter(packed.gather(x)), x)
    nv = packed.video_tiles
    assert nv == math.ceil(math.prod(grid) / bs.TILE) and int(packed.tile_len.sum()) == S
    assert (packed.tile_len[: nv - 1] == bs.TILE).all()
    assert torch.equal(packed.tile_len[nv:], order.tile_len[order.video_tiles:])  # text tiles unchanged
    p_slots = torch.arange(packed.length)
    p_valid = (p_slots % bs.TILE) < packed.tile_len[p_slots // bs.TILE].long()
    assert torch.equal(packed.index[p_valid], order.index[valid])
    member = packed.kernel_tiles_of_boxes()  # each kernel tile holds tokens of the boxes it lists, only
    for n in range(nv):
        pos = packed.index[n * bs.TILE: n * bs.TILE + int(packed.tile_len[n])] - offset
        boxes = {int(order.inverse[p + offset]) // bs.TILE for p in pos}
        assert boxes == set(torch.nonzero(member[n]).flatten().tolist())


def test_choose_tile_prefers_little_padding_and_compact_tiles():
    assert choose_tile((30, 48, 80)) == (2, 8, 8)  # divides exactly
    t = choose_tile((21, 30, 52))
    n = math.prod(math.ceil(g / s) for g, s in zip((21, 30, 52), t))
    assert n * bs.TILE <= 1.1 * 21 * 30 * 52 and max(t) / min(t) <= 4


@pytest.mark.parametrize("stride", [1, (1, 2, 1)])
def test_window_tiles_by_definition(stride):
    order = tile_order((9, 12, 20), (2, 4, 4), text=5)
    window = (5, 8, 12)
    mask = window_tiles(order, window, stride)
    nv = order.video_tiles
    coords = order.tile_coords()
    span = [math.ceil(w / t) for w, t in zip(window, order.tile)]
    video = mask[:nv, :nv]
    assert (video.sum(1) == math.prod(span)).all()  # same window size everywhere (shifted at edges)
    assert video.diagonal().all()  # a query tile is in its own window
    for q in range(nv):  # keys lie within span-1 tiles of the query along each axis
        keys = coords[video[q]]
        assert ((keys - coords[q]).abs() <= torch.tensor(span) - 1).all()
        assert ((keys.amax(0) - keys.amin(0) + 1) == torch.tensor(span)).all()  # a contiguous box
    assert mask[nv:].all() and mask[:, nv:].all()  # text dense both ways
    if stride != 1:  # query tiles of one group share their window
        st = (1, 2, 1)
        group = [tuple((c // torch.tensor(st)).tolist()) for c in coords]
        for a in range(nv):
            for b in range(nv):
                if group[a] == group[b]:
                    assert torch.equal(video[a], video[b])


def _token_mask(order, tiles):
    """Model-order token mask ``[S, S]`` of a kernel-tile mask over ``order``."""
    slot = bs.blocks_to_mask(*bs.tiles_to_blocks(tiles[None, None]), order.length, order.length)[0, 0]
    return slot[order.inverse][:, order.inverse]


def test_packed_window_covers_the_boxes_its_tiles_touch():
    grid, tile, window, text = (7, 9, 13), (2, 3, 5), (3, 4, 6), 5
    padded = tile_order(grid, tile, text=text)
    packed = tile_order(grid, tile, text=text, packed=True)
    exact = _token_mask(padded, window_tiles(padded, window))
    got = _token_mask(packed, window_tiles(packed, window))
    assert (got | ~exact).all()  # every padded-window pair is still computed
    # and nothing beyond: query token i sees key j iff some box of i's kernel tile windows some box of j's
    member = packed.kernel_tiles_of_boxes().float()
    box_keep = window_tiles(padded, window)[: padded.video_tiles, : padded.video_tiles].float()
    kernel_keep = (member @ box_keep @ member.T) > 0
    nv = math.prod(grid)
    tile_of = packed.inverse[:nv] // bs.TILE
    assert torch.equal(got[:nv, :nv], kernel_keep[tile_of][:, tile_of])
    assert got[nv:].all() and got[:, nv:].all()  # text dense both ways


def test_window_errors_name_the_input():
    order = tile_order((4, 8, 8), (2, 4, 4))
    with pytest.raises(ValueError, match="window"):
        window_tiles(order, (5, 8, 8))
    with pytest.raises(ValueError, match="stride"):
        window_tiles(order, (2, 4, 4), stride=2)
    with pytest.raises(ValueError, match="tile"):
        tile_order((4, 8, 8), (4, 8, 8))
    with pytest.raises(ValueError, match="window"):
        dit_accel.Neighborhood(window=(2.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="min_density"):
        dit_accel.TemporalSparse(min_density=0.5, max_density=0.2)


def _float64_masked(q, k, v, mask):
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v.double()


@pytest.mark.parametrize(("text", "text_first"), [(0, False), (6, True), (6, False)])
@pytest.mark.parametrize("triton", [False, True])
def test_neighborhood_equals_masked_attention(text, text_first, triton, monkeypatch):
    """Whole-grid window == dense; a smaller window == float64 attention under the token mask the
    tile layout stands for (queries and keys mapped back to model order)."""
    if triton and bs.triton is None:
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if triton else "0")
    grid = (3, 6, 10)
    S = math.prod(grid) + text
    q, k, v = (torch.randn(2, 2, S, 64) for _ in range(3))
    whole = dit_accel.Neighborhood(window=grid, tile=(1, 6, 10))
    out = whole(q, k, v, None, attention_call(grid, text, text_first))
    assert (out.double() - _float64_masked(q, k, v, torch.ones(S, S, dtype=torch.bool))).abs().max() < 1e-5
    local = dit_accel.Neighborhood(window=(1, 6, 10), tile=(1, 6, 10), estimate=False)
    out = local(q, k, v, None, attention_call(grid, text, text_first))
    order = tile_order(grid, (1, 6, 10), text, text_first)
    tiles = window_tiles(order, (1, 6, 10))
    slot_mask = bs.blocks_to_mask(*bs.tiles_to_blocks(tiles[None, None]), order.length, order.length)[0, 0]
    token_mask = slot_mask[order.inverse][:, order.inverse]  # model-order positions
    exact = _float64_masked(q, k, v, token_mask)
    assert (out.double() - exact).abs().max() < 1e-4
    assert not token_mask.all() and local.density() < 0.9
    if not text:  # each frame attends to itself only: block-diagonal by frame
        frame = torch.arange(S) // (6 * 10)
        assert torch.equal(token_mask, frame[:, None] == frame[None, :])


@pytest.mark.parametrize("packed", [False, True])
def test_temporal_sparse_skips_what_the_gap_marks(packed):
    torch.manual_seed(0)
    grid = (4, 8, 8)  # 4 frame tiles of 64 tokens with tile (1, 8, 8)
    S = math.prod(grid)
    # keys of frame f align with queries of frame f: attention is nearly block-diagonal
    base = torch.randn(1, 1, 4, 1, 32) * 6
    q = (base.expand(2, 2, 4, 64, 32) + 0.1 * torch.randn(2, 2, 4, 64, 32)).reshape(2, 2, S, 32)
    k = q.clone()
    v = torch.randn(2, 2, S, 32)
    method = dit_accel.TemporalSparse(estimate=False, threshold=-8.0, warmup_steps=1, refresh_every=3, refresh_tol=None,
                                      min_density=0.0, tile=(1, 8, 8), packed=packed)
    state = {}
    method(q, k, v, None, attention_call(grid, step=0, state=state))  # warm-up: every tile, records the skip set
    order = tile_order(grid, (1, 8, 8), packed=packed)  # packed: two frames per kernel tile
    full = bs.tiles_to_blocks(torch.ones(1, 1, order.tile_len.numel(), order.tile_len.numel(), dtype=torch.bool))
    _, gap = bs.block_sparse_attention_reference(order.gather(q), order.gather(k), order.gather(v), *full,
                                                 tile_len=order.tile_len, return_gap=True, block_m=128, block_n=128)
    n = order.tile_len.numel()
    assert torch.equal(method.tile_mask(state, n), gap >= -8.0)
    assert not method.tile_mask(state, n).all()
    mask = method.tile_mask(state, n)
    method.reset_stats()
    out = method(q, k, v, None, attention_call(grid, step=1, state=state))
    lens = order.tile_len.double()  # density: the token pairs of the tiles run, over all pairs
    expect = torch.einsum("bhqk,q,k->", mask.double(), lens, lens) / (mask.shape[0] * mask.shape[1] * S**2)
    assert float(method.density()) == pytest.approx(float(expect), rel=1e-6)
    slot = bs.blocks_to_mask(*bs.tiles_to_blocks(mask), order.length, order.length)
    token = slot[..., order.inverse, :][..., order.inverse]
    assert (out.double() - _float64_masked(q, k, v, token)).abs().max() < 1e-4
    # refresh: step 1 + 3 after warm-up runs every tile again
    method.reset_stats()
    method(q, k, v, None, attention_call(grid, step=4, state=state))
    assert method.density() == 1.0


def test_temporal_sparse_density_floor_and_ceiling():
    torch.manual_seed(1)
    grid = (6, 8, 8)
    q, k, v = (torch.randn(1, 2, math.prod(grid), 32) for _ in range(3))
    n = 6  # tile (1, 8, 8), not packed: 6 tiles of 64 tokens, one per 128-slot kernel tile
    for lo, hi, thr in ((0.5, 1.0, 100.0), (0.0, 0.34, float("-inf"))):
        method = dit_accel.TemporalSparse(estimate=False, threshold=thr, warmup_steps=1, refresh_tol=None,
                                          min_density=lo, max_density=hi, tile=(1, 8, 8), packed=False)
        state = {}
        method(q, k, v, None, attention_call(grid, state=state))
        kept = state["counts"]
        assert torch.equal(kept, method.tile_mask(state, n).sum(-1, dtype=torch.int32))
        assert (kept >= math.ceil(lo * n)).all() and (kept <= math.ceil(hi * n)).all()


def test_threshold_minus_inf_and_cross_attention_are_dense():
    grid = (2, 4, 4)
    S = math.prod(grid)
    q, k, v = (torch.randn(1, 2, S, 32) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v)
    for method in (dit_accel.TemporalSparse(threshold=float("-inf")),  # the estimate: every tile kept
                   dit_accel.TemporalSparse(threshold=float("-inf"), estimate=False, warmup_steps=0)):
        state = {}
        for step in range(4):
            out = method(q, k, v, None, attention_call(grid, step=step, state=state))
            assert (out - dense).abs().max() < 1e-5
        assert method.density() == 1.0
    kv = torch.randn(1, 2, 7, 32)
    method.reset_stats()
    cross = method(q, kv, kv, None, attention_call(grid, kind="cross"))
    assert (cross - F.scaled_dot_product_attention(q, kv, kv)).abs().max() < 1e-6
    assert method.density() is None  # nothing ran sparse


def test_dense_steps_count_as_full_density():
    """A dense step is computed in full, so it counts as density 1: two steps, one dense, average
    the sparse step's density with 1."""
    grid = (2, 8, 16)
    S = math.prod(grid)
    q, k, v = (torch.randn(1, 2, S, 32) for _ in range(3))
    sparse = dit_accel.Neighborhood(window=(1, 8, 16), tile=(1, 8, 16), estimate=False)
    sparse(q, k, v, None, attention_call(grid, step=1))
    d = sparse.density()
    assert d == pytest.approx(0.5)  # one of two frames
    mixed = dit_accel.Neighborhood(window=(1, 8, 16), tile=(1, 8, 16), dense_steps=1, estimate=False)
    out0 = mixed(q, k, v, None, attention_call(grid, step=0))
    assert (out0 - F.scaled_dot_product_attention(q, k, v)).abs().max() < 1e-5
    mixed(q, k, v, None, attention_call(grid, step=1))
    assert mixed.density() == pytest.approx((1 + d) / 2)


# family -> tiny pipeline size (height/width, frames) giving a token grid of at least (1, 4, 4)
VIDEO_FAMILIES = {"wan": (64, 9), "hunyuan-video": (32, 9), "cogvideox": (64, 9), "ltx": (32, None), "flux": (32, None)}


@pytest.mark.parametrize("family", list(VIDEO_FAMILIES))
def test_methods_through_the_processor(family):
    """Whole-grid windows and threshold -inf reproduce the stock pipeline; a local window changes
    it; cross- and text-attention stay dense; the sparse path really ran (measured density)."""
    size, frames = VIDEO_FAMILIES[family]
    kw = dict(height=size, width=size, **({"num_frames": frames} if frames else {}))
    kwargs = tiny_inputs(family, guidance_scale=4.0, **kw)
    pipe = make_tiny_pipeline(family)
    stock = pipeline_output(pipe, kwargs)
    for method in (dit_accel.Neighborhood(window=(1.0, 1.0, 1.0)),
                   dit_accel.TemporalSparse(threshold=float("-inf")),
                   dit_accel.TemporalSparse(threshold=float("-inf"), estimate=False, warmup_steps=1)):
        handle = dit_accel.apply(pipe, attention=method)
        out = pipeline_output(pipe, kwargs)
        handle.remove()
        assert (out - stock).abs().max().item() <= 1e-5, method
        assert method.density() == pytest.approx(1.0), f"{method} never ran sparse on {family}"
    small = (1, 4, 4) if family in ("ltx", "flux") else (1, 2, 2)  # grids of 8x8 / 4x4 tokens per frame
    local = dit_accel.Neighborhood(window=small, tile=small, estimate=False)
    handle = dit_accel.apply(pipe, attention=local)
    out = pipeline_output(pipe, kwargs)
    handle.remove()
    assert local.density() < 0.8
    assert (out - stock).abs().max().item() > 1e-4


def test_error_triggered_refresh_follows_the_mean_lse_drop():
    """refresh_tol: after a sparse pass whose rows' LSE fell, on average, by more than the tolerance
    below the last full pass's, the next layout is every tile; below it the skip set stays. The mean
    drop is computed here independently (float64 softmax normalizers of both layouts)."""
    torch.manual_seed(1)
    grid = (4, 8, 8)
    S = math.prod(grid)
    base = torch.randn(1, 1, 4, 1, 32)  # queries and keys of a frame share a direction: some tiles drop
    q, k = ((base.expand(1, 2, 4, 64, 32) + torch.randn(1, 2, 4, 64, 32)).reshape(1, 2, S, 32) for _ in range(2))
    v = torch.randn(1, 2, S, 32)
    order = tile_order(grid, (1, 8, 8))
    n = order.tile_len.numel()

    def lse_of(tile_mask):  # float64 log-sum-exp per row in the tiled order, over the tokens of tile_mask
        slot = bs.blocks_to_mask(*bs.tiles_to_blocks(tile_mask), order.length, order.length)
        qt, kt = order.gather(q).double(), order.gather(k).double()
        s = (qt @ kt.transpose(-1, -2) / math.sqrt(32)).masked_fill(~slot, float("-inf"))
        valid = (torch.arange(order.length) % 128) < order.tile_len.repeat_interleave(128)[: order.length]
        return torch.logsumexp(s.masked_fill(~valid, float("-inf")), -1)

    probe = dit_accel.TemporalSparse(estimate=False, threshold=-2.0, warmup_steps=1, refresh_every=0, refresh_tol=None,
                                     min_density=0.0, tile=(1, 8, 8), packed=False)
    state = {}
    probe(q, k, v, None, attention_call(grid, step=0, state=state))
    mask = probe.tile_mask(state, n)
    assert not mask.all()
    drop = float((lse_of(torch.ones_like(mask)) - lse_of(mask)).clamp_min(0).nan_to_num(0.0).mean())
    assert drop > 1e-3
    for tol, refresh in ((0.8 * drop, True), (1.25 * drop, False)):
        method = dit_accel.TemporalSparse(estimate=False, threshold=-2.0, warmup_steps=1, refresh_every=0,
                                          refresh_tol=tol, min_density=0.0, tile=(1, 8, 8), packed=False)
        state = {}
        method(q, k, v, None, attention_call(grid, step=0, state=state))
        assert torch.equal(method.tile_mask(state, n), mask)
        method(q, k, v, None, attention_call(grid, step=1, state=state))  # sparse: measures the drop in the kernel
        assert bool(method.tile_mask(state, n).all()) == refresh, f"tol {tol:.4f} against a drop of {drop:.4f}"
