"""The sparse probes (benchmarks/sparse_pooled.py, sparse_cached.py, sparse_oracle.py) against float64 attention."""

import argparse
import math

import pytest
import torch
from dit_accel.benchmarks import sparse_pooled
from dit_accel.methods import estimate
from dit_accel.kernels.block_sparse import TILE, block_sparse_attention_reference, tiles_to_blocks
from helpers import attention_call, summary64, tile_of

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
    mask[..., 0, n - 1] = False  # at least one skipped tile (the random mask kept all 1 time in 4096)
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
    """The probes merge the kept tiles' pass with the skipped tiles' pass through their LSEs."""
    from dit_accel.kernels.tile_order import tile_order

    order = tile_order((3, 8, 10), None, 0, False, torch.device("cpu"))  # padded 3D tiles
    S = 3 * 8 * 10
    n = order.tile_len.numel()
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, k, v = (torch.randn(2, 2, S, 64, generator=g) for _ in range(3))
    mask = torch.rand(2, 2, n, n, generator=g) < 0.5
    mask[..., torch.arange(n), torch.arange(n)] = True
    mask[..., 0, n - 1] = False  # something skipped in every row (2 tiles: a random mask kept all 1 time in 256)
    parts = []
    for m in (mask, ~mask):
        blocks, counts = tiles_to_blocks(m)
        out, lse = block_sparse_attention_reference(q, k, v, blocks, counts, return_lse=True, tile_len=order.tile_len,
                                                    seq_index=order.index)
        parts += [out, order.scatter(lse)]
    merged = estimate.merge(*parts)
    dense = _dense64(q, k, v)
    assert (parts[0].double() - dense).abs().max() > 1e-2
    assert (merged.double() - dense).abs().max() < 1e-4


def test_oracle_visits_the_heaviest_tiles_of_the_exact_attention():
    from dit_accel.benchmarks import sparse_oracle
    from dit_accel.kernels.tile_order import tile_order

    grid = (3, 8, 10)  # ragged padded 3D tiles
    order = tile_order(grid, None, 0, False, torch.device("cpu"))
    S, n = math.prod(grid), order.tile_len.numel()
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, k, v = (torch.randn(2, 2, S, 32, generator=g) * (2.0 if i < 2 else 1.0) for i in range(3))
    tile = order.inverse // TILE
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(32), -1)
    expected = torch.zeros(2, 2, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            expected[:, :, i, j] = p[:, :, tile == i][..., tile == j].sum(-1).mean(-1)
    masses = sparse_oracle.tile_masses(q, k, tile, tile, n, n)
    assert (masses.double() - expected).abs().max() < 1e-5

    sel = sparse_oracle.best_tiles(masses, 0.4, "row", order.tile_len)
    assert (sel.sum(-1) == round(0.4 * n)).all()
    assert (expected.masked_fill(~sel, 2.0).amin(-1) >= expected.masked_fill(sel, -1.0).amax(-1) - 1e-6).all()

    method = sparse_oracle.OracleTiles(keep=0.4)
    out = method(q, k, v, None, attention_call(grid))
    token_mask = sel[:, :, tile][:, :, :, tile]
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(32)
    want = torch.softmax(s.masked_fill(~token_mask, float("-inf")), -1) @ v.double()
    assert (out.double() - want).abs().max() < 1e-4
    assert method.density() == pytest.approx(token_mask.double().mean().item(), rel=1e-9)


def test_oracle_per_call_takes_the_heaviest_pairs_within_the_budget():
    from dit_accel.benchmarks import sparse_oracle

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    masses = torch.softmax(torch.randn(2, 3, 8, 8, generator=g) * 3, -1)
    lens = torch.full((8,), 128, dtype=torch.int32)  # equal tiles: mass per key token orders like mass
    sel = sparse_oracle.best_tiles(masses, 0.3, "call", lens)
    m = math.floor(0.3 * masses.numel())
    assert (sel.sum(-1) >= 1).all()
    assert m <= sel.sum() <= m + 2 * 3 * 8
    assert sel.flatten()[masses.flatten().argsort(descending=True)[:m]].all()
    with pytest.raises(ValueError, match="allocation"):
        sparse_oracle.best_tiles(masses, 0.3, "head", lens)


def test_recall_measure_against_float64():
    from dit_accel.benchmarks import sparse_oracle

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    p = torch.softmax(torch.randn(50, 70, generator=g, dtype=torch.float64) * 2, -1)
    v = torch.randn(70, 16, generator=g, dtype=torch.float64)
    mask = torch.rand(50, 70, generator=g) < 0.4
    mask[:, 0] = True
    mass, err = sparse_oracle.kept(p.float(), v.float(), mask)
    renorm = (p * mask) / (p * mask).sum(-1, keepdim=True)
    assert mass == pytest.approx((p * mask).sum(-1).mean().item(), rel=1e-5)
    assert err == pytest.approx(((renorm @ v - p @ v).norm() / (p @ v).norm()).item(), rel=1e-4)
    labels = sparse_oracle.kmeans_tiles(torch.randn(300, 8, generator=g), 3)
    assert torch.bincount(labels).tolist() == [TILE, TILE, 300 - 2 * TILE]


def test_cached_probe_extrapolation_is_linear_in_the_step_and_leaves_empty_rows():

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    o0, d_o = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 10, 8, generator=g)
    l0, d_l = torch.randn(2, 3, 10, generator=g), torch.randn(2, 3, 10, generator=g)
    l0[0, 0, :4] = float("-inf")  # rows whose skipped set was empty at the older pass
    o1, l1 = o0 + 3 * d_o, l0 + 3 * d_l  # passes at steps 4 and 7: slope d per step / 3 steps
    out, lse = estimate.forecast([(o0, l0, 4), (o1, l1, 7)], 9)
    finite = torch.isfinite(l0)
    assert torch.allclose(out[finite], (o0 + 5 * d_o)[finite], atol=1e-5)
    assert torch.allclose(lse[finite], (l0 + 5 * d_l)[finite], atol=1e-5)
    assert torch.equal(out[~finite], o1[~finite]) and torch.equal(lse[~finite], l1[~finite])


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_scheduled_forecast_is_the_polynomial_through_the_passes(passes):
    """Against Lagrange's form in float64, on unevenly spaced clocks (timesteps)."""

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    xs = sorted((float(x) for x in torch.rand(passes, generator=g) * 1000), reverse=True)
    outs = [torch.randn(2, 3, 10, 8, generator=g) for _ in xs]
    lses = [torch.randn(2, 3, 10, generator=g) for _ in xs]
    lses[0][1, 2, :3] = float("-inf")  # rows one pass skipped nothing in
    at = xs[-1] - float(torch.rand(1, generator=g)) * 200

    def lagrange(values):
        total = 0
        for i, xi in enumerate(xs):
            w = math.prod((at - xj) / (xi - xj) for j, xj in enumerate(xs) if j != i)
            total = total + w * values[i].double()
        return total

    out, lse = estimate.forecast(list(zip(outs, lses, xs)), at)
    finite = torch.stack([torch.isfinite(x) for x in lses]).all(0)
    want_lse = lagrange([torch.where(finite, x, 0.0) for x in lses])
    assert torch.allclose(lse[finite].double(), want_lse[finite], rtol=1e-4, atol=1e-4)
    assert torch.allclose(out[finite].double(), lagrange(outs)[finite], rtol=1e-4, atol=1e-4)
    assert torch.equal(lse[~finite], lses[-1][~finite]) and torch.equal(out[~finite], outs[-1][~finite])
    half, half_lse = estimate.forecast(list(zip(outs, lses, xs)), at, damp=0.5)  # halfway to the newest pass
    assert torch.allclose(half[finite].double(), (lagrange(outs) + outs[-1].double())[finite] / 2, rtol=1e-4, atol=1e-4)
    assert torch.allclose(half_lse[finite].double(), (want_lse + lses[-1].double())[finite] / 2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("degree, window, correct", [(0, None, 0.0), (1, None, 0.0), (1, (1, 1, 1), 0.0),
                                                     (0, None, 1.0), (1, None, 0.5)])
def test_scheduled_tiles_full_steps_and_forecast(degree, window, correct):
    """Full passes exactly at the schedule's steps (dense output there), the layout fixed after the
    leading full steps, and sparse passes equal to float64 attention over the kept tiles merged with
    the forecast of the skipped tiles' part from the full passes (timestep clock), corrected by
    ``correct`` times the summary part's miss of its own forecast."""
    from dit_accel.benchmarks import sparse_cached
    from dit_accel.kernels.tile_order import tile_order

    grid, state = (4, 16, 16), {}  # 8 tiles of 2x8x8
    S = math.prod(grid)
    method = sparse_cached.ScheduledTiles(keep=0.25, full_steps=(0, 1, 3, 5), forecast=degree, clock="timestep",
                                          window=window, correct=correct, pool=32)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    order = tile_order(grid)
    skipped, summary = {}, {}  # step -> (output, lse, t) of float64 attention over the skipped keys / summaries
    for step in range(7):
        t = 1000.0 - 100.0 * step - 10.0 * step**2
        call = attention_call(grid, step=step, state=state, timestep=t)
        q, k, v = (torch.randn(1, 1, S, 16, generator=g) for _ in range(3))
        q[..., 0] += 5.0
        k[..., 0] += 5.0 * torch.rand(8, generator=g)[order.inverse // TILE]
        out = method(q, k, v, None, call)
        s = (q.double() @ k.double().transpose(-1, -2)) / 4.0
        if step in (0, 1, 3, 5):
            assert torch.allclose(out.double(), torch.softmax(s, -1) @ v.double(), atol=1e-4)
            if step >= 1:
                kept = method.tile_mask(state, 8)[0, 0]  # [query tile, key tile], tiled order
                if window is not None:  # a one-token window is each 3D tile's own tile
                    assert torch.equal(kept, torch.eye(8, dtype=torch.bool))
                pos = order.index.long()
                tile_of = torch.empty(S, dtype=torch.long)
                tile_of[pos] = torch.arange(pos.numel()) // TILE
                keep_pairs = kept[tile_of[:, None], tile_of[None, :]]
            if step == 1:
                layout = keep_pairs
            else:
                assert step == 0 or torch.equal(keep_pairs, layout)  # frozen after step 1
            if step >= 1:
                rest = s.masked_fill(keep_pairs, float("-inf"))
                lse = torch.logsumexp(rest, -1)
                skipped[step] = (torch.softmax(rest, -1) @ v.double(), lse, t)
                summary[step] = (*summary64(q, k, v, kept, order, 32), t)
            continue
        newest = [x for x in (1, 3, 5) if x < step][-degree - 1:]

        def guess(passes):
            if len(newest) == 1:
                return passes[newest[0]][:2]
            (o0, l0, t0), (o1, l1, t1) = (passes[x] for x in newest)
            return o1 + (t - t1) / (t1 - t0) * (o1 - o0), l1 + (t - t1) / (t1 - t0) * (l1 - l0)
        o_rest, l_rest = guess(skipped)
        o_now, l_now = summary64(q, k, v, kept, order, 32)
        o_sum, l_sum = guess(summary)
        o_rest, l_rest = o_rest + correct * (o_now - o_sum), l_rest + correct * (l_now - l_sum)
        live = s.masked_fill(~layout, float("-inf"))
        l_live = torch.logsumexp(live, -1)
        o_live = torch.softmax(live, -1) @ v.double()
        m = torch.maximum(l_live, l_rest)
        a, b = (l_live - m).exp()[..., None], (l_rest - m).exp()[..., None]
        assert torch.allclose(out.double(), (a * o_live + b * o_rest) / (a + b), atol=1e-4), step
    assert [x[2] for x in state["history"]] == [skipped[x][2] for x in (3, 5)[1 - degree:]]
    visited = float(layout.double().mean())  # the kept share of the sparse steps (2, 4, 6), the rest full
    summaries = 6 * (1 - visited) / 32 if correct else 0.0  # each query meets TILE / 32 per skipped tile at steps 1-6
    assert method.density() == pytest.approx((4 + 3 * visited + summaries) / 7, rel=1e-9)


@pytest.mark.parametrize("window, correct", [(None, 0.0), ((1, 1, 1), 0.0), (None, 1.0), ((1, 1, 1), 1.0)])
def test_scheduled_tiles_density_counts_every_row(window, correct):
    """Batch 2 x 2 heads: a shared (window) layout counts as much as a per-(batch, head) one, and so
    do the summary tokens of ``correct`` (from the last leading full step on)."""
    from dit_accel.benchmarks import sparse_cached

    grid = (4, 16, 16)  # 8 tiles of 2x8x8: keep=0.125 is one tile, as the one-token window
    S = math.prod(grid)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    method = sparse_cached.ScheduledTiles(keep=0.125, full_steps=(0, 1, 3), window=window, correct=correct, pool=64)
    state = {}
    for step in range(5):
        q, k, v = (torch.randn(2, 2, S, 16, generator=g) for _ in range(3))
        method(q, k, v, None, attention_call(grid, step=step, state=state))
    summaries = 4 * (7 / 8) * 2 / TILE if correct else 0.0  # steps 1-4: two summaries per skipped tile
    assert method.density() == pytest.approx((3 + 2 / 8 + summaries) / 5, rel=1e-9)


def test_scheduled_tiles_window_plus_keep_visits_both():
    """window_plus_keep: the layout after the leading full steps is the window's tiles (a one-token
    window: each query tile's own) together with the most weighted ``keep`` of the tiles."""
    from dit_accel.benchmarks import sparse_cached

    grid = (4, 16, 16)  # 8 tiles of 2x8x8
    S = math.prod(grid)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    inputs = [tuple(torch.randn(2, 2, S, 16, generator=g) for _ in range(3)) for _ in range(2)]
    masks = []
    for window, plus in ((None, False), ((1, 1, 1), True)):
        method, state = sparse_cached.ScheduledTiles(keep=0.125, full_steps=(0, 1, 3), window=window,
                                                     window_plus_keep=plus), {}
        for step, (q, k, v) in enumerate(inputs):
            method(q, k, v, None, attention_call(grid, step=step, state=state))
        masks.append(method.tile_mask(state, 8))
    heaviest, union = masks
    assert torch.equal(heaviest.sum(-1), torch.ones(2, 2, 8, dtype=torch.long))
    assert torch.equal(union, heaviest | torch.eye(8, dtype=torch.bool))


def test_scheduled_tiles_adaptive_refresh():
    """refresh_above=0: every sparse pass misses its forecast, so every call is a full pass (dense output,
    density 1); a threshold no miss reaches: the same outputs and density as without the check."""
    from dit_accel.benchmarks import sparse_cached

    grid = (4, 16, 16)
    S = math.prod(grid)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    inputs = [tuple(torch.randn(1, 2, S, 16, generator=g) for _ in range(3)) for _ in range(6)]
    runs = {}
    for tol in (0.0, 1e30, None):
        method = sparse_cached.ScheduledTiles(keep=0.25, full_steps=(0, 1, 4), forecast=1, refresh_above=tol)
        state, outs = {}, []
        for step, (q, k, v) in enumerate(inputs):
            outs.append(method(q, k, v, None, attention_call(grid, step=step, state=state)))
        runs[tol] = outs, method.density()
    for (q, k, v), out in zip(inputs, runs[0.0][0]):
        want = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 4.0, -1) @ v.double()
        assert torch.allclose(out.double(), want, atol=1e-4)
    assert runs[0.0][1] == 1.0 and runs[None][1] < 0.75
    assert all(torch.equal(a, b) for a, b in zip(runs[1e30][0], runs[None][0])) and runs[1e30][1] == runs[None][1]
    with pytest.raises(ValueError, match="refresh_above"):
        sparse_cached.ScheduledTiles(refresh_above=-1.0)


def test_cached_probe_frozen_layout_survives_refreshes():
    from dit_accel.benchmarks import sparse_cached
    from dit_accel.kernels.tile_order import tile_order

    grid, state = (4, 16, 16), {}  # 8 tiles of 2x8x8
    S = math.prod(grid)
    method = sparse_cached.HeldTiles(keep=0.5, reuse="extrapolate", warmup_steps=2, refresh_every=2)
    layouts = []
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    for step in range(7):
        call = attention_call(grid, step=step, state=state)
        q, k, v = (torch.randn(1, 1, S, 16, generator=g) for _ in range(3))
        q[..., 0] += 10.0
        order = tile_order(grid)  # each step, other key tiles score high
        k[..., 0] += 10.0 * torch.rand(8, generator=g)[order.inverse // TILE]
        out = method(q, k, v, None, call)
        assert torch.isfinite(out).all()
        layouts.append(state["blocks"].clone())
    assert all(torch.equal(b, layouts[1]) for b in layouts[1:])  # fixed from the last warm-up step on
    assert [s for *_, s in state["history"]] == [4, 6]


def test_recorded_command_reruns_with_the_same_arguments():
    """A probe's recorded command splits back into its argv (';'-lists, spaces and quotes included)."""
    import shlex

    from dit_accel.benchmarks.report import command_line

    argv = ["--schedules", "0,1,2;0,1,5", "--configs", "keep 0.05, refresh every 3;x'y", "--keep", "0.05"]
    words = shlex.split(command_line("dit_accel.benchmarks.sparse_cached", argv))
    assert words[:3] == ["python", "-m", "dit_accel.benchmarks.sparse_cached"] and words[3:] == argv
    bare = command_line("dit_accel.benchmarks.sparse", None)
    assert shlex.split(bare) == ["python", "-m", "dit_accel.benchmarks.sparse"]


def test_scheduled_variants_cross_every_option():
    """--schedules x --forecast x --window x (--correct 0, or each nonzero --correct x --pool) variants,
    each labelled with its own values; a pool that does not divide the tile is an argument error."""
    from dit_accel.benchmarks import sparse_cached

    ap = argparse.ArgumentParser()
    ap.error = lambda message: pytest.fail(message)  # noqa: E731 (argparse exits; make it visible)

    def variants(*argv):
        args = argparse.Namespace(schedules="0,1,5;0,2", forecast="0,1t", keep=0.05, refresh_above="",
                                  dense_layers="", damp="1", window="", correct="0", pool="128",
                                  window_plus_keep=False)
        for name, value in zip(argv[::2], argv[1::2]):
            setattr(args, name, value)
        return sparse_cached.scheduled_variants(ap, args)

    labels = [label for label, _, _ in variants("correct", "0,0.5", "pool", "128,32", "window", "1,1,1;2,1,1")]
    assert len(labels) == 2 * 2 * 2 * (1 + 2)
    assert {(x["correct"], x["pool"]) for x in labels} == {(0.0, TILE), (0.5, 128), (0.5, 32)}
    made = variants("correct", "0.5", "pool", "32")[0][1]()
    assert (made.correct, made.pool, made.full_steps, made.forecast, made.clock) == (0.5, 32, (0, 1, 5), 0, "step")
    assert "correct" not in variants()[0][0]
    with pytest.raises(ValueError, match="pool=48"):
        variants("correct", "1", "pool", "48")


def test_gap_ranks_on_a_planted_layout():
    """benchmarks/gap_ranks.py's statistics where the heaviest other key tile of every query tile is
    known: query tile i's queries align with the keys of tile (i + 3) mod 8. The gap against the
    rows' LSE ranks that tile first everywhere. The running-max gap of the first tile visited (tile
    0) is always 0, the largest possible, so for query tiles 1-7 the running-max top is tile 0, the
    heaviest only for query tile 5 (whose planted tile it is); query tile 0 (own tile masked) may go
    either way."""
    from dit_accel.benchmarks import gap_ranks
    from dit_accel.kernels.tile_order import tile_order

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    grid = (4, 16, 16)
    order = tile_order(grid, None, 0, False, "cpu", packed=True)
    n = order.tile_len.numel()
    assert n == 8
    tiles = tile_of(order)
    direction = torch.randn(n, 32, generator=g)
    q = torch.randn(1, 2, 1024, 32, generator=g) * 0.3 + 3 * direction[tiles]
    k = torch.randn(1, 2, 1024, 32, generator=g) * 0.3 + 3 * direction[(tiles - 3) % n]
    stats = gap_ranks.tile_stats(q, k, grid)
    rows = stats["rows"]
    assert rows == 2 * n and stats["tiles"] == n
    assert stats["ref_top_is_heaviest"] == rows
    assert stats["running_top_is_first"] >= 2 * (n - 1) and stats["running_top_is_heaviest"] <= 2 * 2
    assert stats["ref_top_share"] == pytest.approx(stats["heaviest_share"])
    assert stats["heaviest_share"] / rows > 0.5 > stats["running_top_share"] / rows
