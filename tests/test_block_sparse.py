"""Block-sparse attention kernel (Triton under TRITON_INTERPRET=1 on CPU) vs its reference twin vs float64."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from dit_accel.kernels import block_sparse as bs

pytestmark = pytest.mark.skipif(bs.triton is None, reason="triton not installed")


def _token_mask(tile_mask, tile: int, S_q: int, S_k: int) -> torch.Tensor:
    """The explicit bool ``[B, H, S_q, S_k]`` token mask of a tile mask (Kronecker expansion)."""
    ones = torch.ones(tile, tile, dtype=torch.float64)
    return torch.stack([torch.stack([torch.kron(tile_mask[b, h].double(), ones)[:S_q, :S_k] > 0
                                     for h in range(tile_mask.shape[1])]) for b in range(tile_mask.shape[0])])


def _float64_attention(q, k, v, tile_mask, tile):
    """Independent oracle: explicit token mask from the tile mask (Kronecker expansion), float64 softmax."""
    mask = _token_mask(tile_mask, tile, q.shape[2], k.shape[2])
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(-1e300)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    out = torch.where(denom > 0, (e @ v.double()) / denom.clamp_min(1e-300), torch.zeros((), dtype=torch.float64))
    lse = torch.where(denom[..., 0] > 0, m[..., 0] + torch.log(denom[..., 0].clamp_min(1e-300)),
                      torch.full_like(m[..., 0], float("-inf")))
    return out, lse


def _inputs(B, H, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize(
    ("B", "H", "S", "D", "dtype", "tile", "sub_n", "knobs"),
    [
        (2, 2, 300, 64, torch.bfloat16, 128, None, {}),  # ragged last tile, batch 2
        (1, 3, 256, 128, torch.float16, 128, 64, {}),    # exact tiles, d=128, two 64-key sub-tiles per tile
        (2, 1, 200, 96, torch.bfloat16, 64, None, {}),   # d=96 (padded inside the kernel), 64-token tiles
        (1, 2, 77, 64, torch.float16, 32, None, {}),     # shorter than one default tile
        (1, 2, 300, 64, torch.bfloat16, 128, 32, {}),    # four sub-tiles per layout tile, ragged
        # tensor-descriptor loads: ragged, batch 2, both memory orders ([B, H, S, D] and [B, S, H, D] viewed)
        (2, 2, 300, 64, torch.bfloat16, 128, 64, {"tma": True}),
        (2, 3, 200, 128, torch.float16, 64, None, {"tma": True, "bshd": True}),
        (1, 2, 77, 64, torch.bfloat16, 32, None, {"tma": True, "warp_specialize": True}),
    ],
)
def test_kernel_equals_reference_and_float64(B, H, S, D, dtype, tile, sub_n, knobs):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs every run, reported on failure
    knobs = dict(knobs)
    if knobs.pop("bshd", False):  # the heads interleaved in memory, as diffusers' processors leave them
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _inputs(B, H, S, D, dtype, seed))
        assert not q.is_contiguous()
    else:
        q, k, v = _inputs(B, H, S, D, dtype, seed)
    if knobs.get("tma"):  # the descriptor path is taken for these inputs
        assert bs._descriptors((q, k, v), (tile, tile, tile)) is not None
    n = math.ceil(S / tile)
    g = torch.Generator().manual_seed(seed + 1)
    tile_mask = torch.rand(B, H, n, n, generator=g) < 0.45
    tile_mask = bs.add_dense_ranges(tile_mask, [(S - 10, S)], S, tile)  # "text" tokens at the end stay dense
    tile_mask[0, 0, 0] = False  # a query tile with nothing to visit (overrides the text range): output 0, LSE -inf
    blocks, counts = bs.tiles_to_blocks(tile_mask)
    out, lse = bs.block_sparse_attention_triton(q, k, v, blocks, counts, block_m=tile, block_n=tile, return_lse=True,
                                                sub_n=sub_n, **knobs)
    ref, ref_lse = bs.block_sparse_attention_reference(q, k, v, blocks, counts, block_m=tile, block_n=tile,
                                                       return_lse=True)
    exact, exact_lse = _float64_attention(q, k, v, tile_mask, tile)
    eps = 2**-8 if dtype == torch.bfloat16 else 2**-11  # unit roundoff of the output dtype
    scale = exact.abs().amax().item()
    for name, got in (("kernel", out), ("reference", ref)):
        err = (got.double() - exact).abs().amax().item() / scale
        assert err <= 4 * eps, f"{name}: relative error {err:.2e} > {4 * eps:.2e} (seed {seed})"
    finite = exact_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite) and torch.equal(ref_lse.isfinite(), finite)
    assert (lse.double() - exact_lse)[finite].abs().max() <= 1e-3
    assert (ref_lse.double() - exact_lse)[finite].abs().max() <= 1e-3


def test_full_density_equals_dense_attention():
    q, k, v = _inputs(2, 2, 190, 64, torch.float16, 3)
    n = math.ceil(190 / 64)
    blocks, counts = bs.tiles_to_blocks(torch.ones(1, 1, n, n, dtype=torch.bool))  # broadcast over B, H
    out = bs.block_sparse_attention_triton(q, k, v, blocks, counts, block_m=64, block_n=64)
    dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert (out.float() - dense).abs().max() <= 2e-3


def test_layout_round_trip():
    g = torch.Generator().manual_seed(0)
    tile_mask = torch.rand(2, 3, 5, 4, generator=g) < 0.5
    blocks, counts = bs.tiles_to_blocks(tile_mask)
    assert torch.equal(counts, tile_mask.sum(-1).int())
    mask = bs.blocks_to_mask(blocks, counts, 5 * 8 - 3, 4 * 8 - 5, 8, 8)
    expect = tile_mask.repeat_interleave(8, -2).repeat_interleave(8, -1)[..., : 5 * 8 - 3, : 4 * 8 - 5]
    assert torch.equal(mask, expect)
    for b in range(2):
        for h in range(3):
            for m in range(5):
                listed = blocks[b, h, m, : counts[b, h, m]].tolist()
                assert listed == torch.nonzero(tile_mask[b, h, m]).flatten().tolist()


def test_dense_ranges_cover_rows_and_columns():
    tm = bs.add_dense_ranges(torch.zeros(1, 1, 4, 4, dtype=torch.bool), [(130, 140)], 500, 128)
    assert tm[0, 0, 1].all() and tm[0, 0, :, 1].all() and tm.sum() == 7
    with pytest.raises(ValueError, match="ranges"):
        bs.add_dense_ranges(tm, [(400, 600)], 500, 128)


def test_bad_layout_is_named():
    q, k, v = _inputs(1, 1, 100, 64, torch.float16, 0)
    blocks, counts = bs.tiles_to_blocks(torch.ones(1, 1, 2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="kv_blocks"):
        bs.block_sparse_attention(q, k, v, blocks, counts)  # 100 queries are one 128-tile, not two
    with pytest.raises(ValueError, match="tile_mask"):
        bs.tiles_to_blocks(torch.ones(2, 2))


def test_dispatcher_falls_back_to_the_reference_once(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(bs, "_warned", set())
    q, k, v = _inputs(1, 1, 64, 64, torch.float32, 1)
    blocks, counts = bs.tiles_to_blocks(torch.ones(1, 1, 1, 1, dtype=torch.bool))
    with caplog.at_level(logging.INFO, logger=bs.__name__):
        a = bs.block_sparse_attention(q, k, v, blocks, counts)
        bs.block_sparse_attention(q, k, v, blocks, counts)
    assert sum("reference twin" in r.message for r in caplog.records) == 1
    assert torch.allclose(a, F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def _float64_gap(q, k, tile_mask, tile, row_ok, key_ok):
    """Independent oracle of the gap output, by loops: per visited tile in increasing order, the
    largest log2(tile row max / running row max) over the valid query rows of the query tile."""
    B, H, S, _ = q.shape
    s = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])) / math.log(2)
    s = s.masked_fill(~key_ok[None, None, None, :], float("-inf"))
    n = tile_mask.shape[-1]
    out = torch.full((B, H, n, n), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for m in range(n):
                rows = [r for r in range(m * tile, min(S, (m + 1) * tile)) if row_ok[r]]
                running = torch.full((len(rows),), float("-inf"), dtype=torch.float64)
                for i, kb in enumerate(torch.nonzero(tile_mask[b, h, m]).flatten().tolist()):
                    tile_max = s[b, h, rows, kb * tile:(kb + 1) * tile].amax(-1)
                    running = torch.maximum(running, tile_max)
                    out[b, h, m, i] = (tile_max - running).max() if rows else float("-inf")
    return out


def _padded_case(S: int, D: int, dtype, tile: int):
    """A fresh seed, random q, k, v (batch 2, 2 heads) of S slots, random valid lengths of the
    ceil(S / tile) tiles of a padded layout, a random tile mask with the diagonal, and the valid slots."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v = _inputs(2, 2, S, D, dtype, seed)
    n = math.ceil(S / tile)
    g = torch.Generator().manual_seed(seed + 1)
    tile_len = torch.randint(tile // 2, tile + 1, (n,), generator=g)
    tile_len[-1] = min(int(tile_len[-1]), S - (n - 1) * tile)
    tile_mask = (torch.rand(2, 2, n, n, generator=g) < 0.6) | torch.eye(n, dtype=torch.bool)
    pos = torch.arange(S)
    return seed, (q, k, v), tile_len, tile_mask, (pos % tile) < tile_len[pos // tile]


@pytest.mark.parametrize(("S", "D", "dtype"), [(150, 64, torch.bfloat16), (160, 128, torch.float16)])
def test_padded_tiles_and_gap_output(S, D, dtype):
    """tile_len hides padded key slots; the gap output matches a loop-by-loop float64 oracle."""
    tile = 32
    seed, (q, k, v), tile_len, tile_mask, valid = _padded_case(S, D, dtype, tile)
    blocks, counts = bs.tiles_to_blocks(tile_mask)
    kw = dict(block_m=tile, block_n=tile, tile_len=tile_len, return_gap=True)
    out, gap = bs.block_sparse_attention_triton(q, k, v, blocks, counts, sub_n=16, **kw)
    ref, ref_gap = bs.block_sparse_attention_reference(q, k, v, blocks, counts, **kw)
    # padded key slots carry no weight: the float64 oracle masks them on top of the tile mask
    s64 = q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)
    mask = _token_mask(tile_mask, tile, S, S) & valid
    exact = torch.softmax(s64.masked_fill(~mask, float("-inf")), -1) @ v.double()
    eps = 2**-8 if dtype == torch.bfloat16 else 2**-11
    rows = valid[None, None, :, None]
    scale = exact.abs().amax().item()
    for name, got in (("kernel", out), ("reference", ref)):
        err = ((got.double() - exact) * rows).abs().amax().item() / scale
        assert err <= 4 * eps, f"{name}: relative error {err:.2e} (seed {seed})"
    oracle = _float64_gap(q, k, tile_mask, tile, valid, valid)[..., : blocks.shape[-1]]
    finite = oracle.isfinite()
    for name, got in (("kernel", gap), ("reference", ref_gap)):
        assert torch.equal(got.isfinite(), finite), f"{name}: -inf entries differ (seed {seed})"
        assert (got.double() - oracle)[finite].abs().max() <= 0.05, f"{name}: gap off (seed {seed})"
    assert (oracle[finite] <= 0).all()


@pytest.mark.parametrize(("S", "D", "dtype"), [(150, 64, torch.bfloat16), (97, 128, torch.float16)])
def test_gap_against_a_reference_lse(S, D, dtype):
    """With ``gap_ref`` each visited tile's gap is the largest over the valid query rows of
    log2(tile row max) - ref / ln 2, at most 0: kernel and reference against a float64 loop oracle,
    with the rows' own LSE as the reference (the log2 of the largest attention probability in the
    tile) and with a perturbed one (some gaps clamp at 0); the output is that of the call without it."""
    tile = 32
    seed, (q, k, v), tile_len, tile_mask, valid = _padded_case(S, D, dtype, tile)
    n = tile_len.numel()
    g = torch.Generator().manual_seed(seed + 2)
    blocks, counts = bs.tiles_to_blocks(tile_mask)
    s = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)).masked_fill(~valid, float("-inf"))
    own = torch.logsumexp(s, -1)  # every key: at least the visited tiles' LSE
    for ref in (own, own - 3.0 * torch.rand(own.shape, generator=g, dtype=torch.float64)):
        oracle = torch.full((2, 2, n, blocks.shape[-1]), float("-inf"), dtype=torch.float64)
        for b in range(2):
            for h in range(2):
                for m in range(n):
                    rows = [r for r in range(m * tile, min(S, (m + 1) * tile)) if valid[r]]
                    for i, kb in enumerate(torch.nonzero(tile_mask[b, h, m]).flatten().tolist()):
                        tile_max = s[b, h, rows, kb * tile:(kb + 1) * tile].amax(-1)
                        oracle[b, h, m, i] = ((tile_max - ref[b, h, rows]) / math.log(2)).clamp(max=0).max()
        kw = dict(block_m=tile, block_n=tile, tile_len=tile_len, return_gap=True, gap_ref=ref.float())
        plain = bs.block_sparse_attention_triton(q, k, v, blocks, counts, block_m=tile, block_n=tile,
                                                 tile_len=tile_len, sub_n=16)
        finite = oracle.isfinite()
        for name, fn in (("kernel", bs.block_sparse_attention_triton),
                         ("reference", bs.block_sparse_attention_reference)):
            out, gap = fn(q, k, v, blocks, counts, sub_n=16, **kw)
            assert torch.equal(gap.isfinite(), finite), f"{name}: -inf entries differ (seed {seed})"
            assert (gap.double() - oracle)[finite].abs().max() <= 0.05, f"{name}: gap off (seed {seed})"
            if name == "kernel":
                assert torch.equal(out, plain)
        assert (oracle[finite] <= 0).all() and (oracle[finite] > -60).all()
    assert (oracle[finite] == 0).any()  # the perturbed reference clamps
    with pytest.raises(ValueError, match="return_gap=True"):
        bs.block_sparse_attention_reference(q, k, v, blocks, counts, block_m=tile, block_n=tile, gap_ref=own.float())
    with pytest.raises(ValueError, match="gap_ref: expected a float32"):
        bs.block_sparse_attention_triton(q, k, v, blocks, counts, block_m=tile, block_n=tile, return_gap=True,
                                         gap_ref=own)


def test_tile_len_needs_self_attention_shapes():
    q, k, v = _inputs(1, 1, 64, 64, torch.float32, 0)
    blocks, counts = bs.tiles_to_blocks(torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="tile_len"):
        bs.block_sparse_attention_reference(q, k, v, blocks, counts, block_m=32, block_n=32,
                                            tile_len=torch.full((3,), 32))


@pytest.mark.parametrize(("S_model", "D", "dtype", "B"), [(130, 64, torch.bfloat16, 2), (97, 128, torch.float16, 1)])
def test_seq_index_reads_and_writes_model_order(S_model, D, dtype, B):
    """With ``seq_index`` the kernel reads q, k, v in model order through the index and writes the
    output back there: equal to gather -> attention -> scatter, and to a float64 oracle."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    tile = 32
    g = torch.Generator().manual_seed(seed)
    q, k, v = _inputs(B, 2, S_model, D, dtype, seed)
    # padded tiles holding a random permutation of the model's tokens
    lens = []
    left = S_model
    while left:
        lens.append(min(left, int(torch.randint(tile // 2, tile + 1, (), generator=g))))
        left -= lens[-1]
    tile_len = torch.tensor(lens)
    n = len(lens)
    perm = torch.randperm(S_model, generator=g)
    index = torch.zeros(n * tile, dtype=torch.long)
    valid = (torch.arange(n * tile) % tile) < tile_len[torch.arange(n * tile) // tile]
    index[valid] = perm
    index[~valid] = perm[0]  # padding slots repeat a valid position
    tile_mask = (torch.rand(B, 2, n, n, generator=g) < 0.6) | torch.eye(n, dtype=torch.bool)
    blocks, counts = bs.tiles_to_blocks(tile_mask)
    kw = dict(block_m=tile, block_n=tile, tile_len=tile_len, return_lse=True, return_gap=True)
    out, lse, gap = bs.block_sparse_attention_triton(q, k, v, blocks, counts, sub_n=16, seq_index=index, **kw)
    ref, ref_lse, ref_gap = bs.block_sparse_attention_reference(q, k, v, blocks, counts, seq_index=index, **kw)
    qt, kt, vt = (x[:, :, index] for x in (q, k, v))
    tiled, tiled_lse, tiled_gap = bs.block_sparse_attention_triton(qt, kt, vt, blocks, counts, sub_n=16, **kw)
    assert out.shape == q.shape
    assert torch.equal(out[:, :, index[valid]], tiled[:, :, valid]), f"kernel: index path != gathered (seed {seed})"
    assert torch.equal(gap, tiled_gap) and torch.equal(lse[..., valid], tiled_lse[..., valid])
    # float64 oracle in tiled order, mapped back to model order
    s64 = qt.double() @ kt.double().transpose(-1, -2) / math.sqrt(D)
    mask = _token_mask(tile_mask, tile, qt.shape[2], qt.shape[2]) & valid
    exact_t = torch.softmax(s64.masked_fill(~mask, float("-inf")), -1) @ vt.double()
    exact = torch.zeros_like(q, dtype=torch.float64)
    exact[:, :, index[valid]] = exact_t[:, :, valid]
    eps = 2**-8 if dtype == torch.bfloat16 else 2**-11
    scale = exact.abs().amax().item()
    for name, got in (("kernel", out), ("reference", ref)):
        err = (got.double() - exact).abs().amax().item() / scale
        assert err <= 4 * eps, f"{name}: relative error {err:.2e} (seed {seed})"
    finite = ref_gap.isfinite()
    assert torch.equal(gap.isfinite(), finite) and (gap - ref_gap)[finite].abs().max() <= 0.05
    assert (lse[..., valid] - ref_lse[..., valid]).abs().max() <= 1e-2


def test_descriptor_path_only_where_the_inputs_fit():
    q, k, v = _inputs(1, 2, 100, 64, torch.bfloat16, 0)
    assert bs._descriptors((q, k, v), (64, 64, 64)) is not None
    q96 = _inputs(1, 2, 100, 96, torch.bfloat16, 0)[0]
    assert bs._descriptors((q96,), (64,)) is None  # head_dim beyond the box would read the next head
    odd = torch.randn(1, 2, 100, 67, dtype=torch.bfloat16)[..., :64]  # rows at a 134-byte stride
    assert bs._descriptors((odd,), (64,)) is None


@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 160, 256])
def test_default_launch_fits_a_hopper_sm(D):
    """The default knobs at every head_dim the kernel takes: the software pipeline's shared memory
    (q tile + num_stages k and v steps, bf16) within an H100/H200 SM's 227 KiB, and a register cap
    only where the fp32 accumulator (BLOCK_M x padded head_dim over the CTA's threads) leaves at
    least half the registers for the rest."""
    knobs = bs._launch_knobs(D)
    d_pad = max(16, 1 << (D - 1).bit_length())
    smem = 2 * (bs.TILE * d_pad + knobs["num_stages"] * 2 * knobs["sub_n"] * d_pad)
    assert smem <= 227 * 1024, (D, knobs, smem)
    acc_regs = bs.TILE * d_pad // (32 * knobs["num_warps"])
    if knobs["max_registers"]:
        assert acc_regs <= knobs["max_registers"] // 2, (D, knobs)
    assert bs._launch_knobs(D, max_registers=0, sub_n=32)["max_registers"] == 0  # explicit knobs win


def test_register_cap_only_where_two_ctas_fit():
    """The default cap is for Hopper (two 96 KiB CTAs per 227 KiB SM); an A100 (164 KiB) or an Ada
    GPU (100 KiB) holds one such CTA, so there the default is uncapped; an explicit cap still applies."""
    assert bs._launch_knobs(128, (9, 0))["max_registers"] == 128
    for capability in ((8, 0), (8, 9), (10, 0)):
        assert bs._launch_knobs(128, capability)["max_registers"] is None
        assert bs._launch_knobs(128, capability, max_registers=96)["max_registers"] == 96


def test_fixed_shift_and_tma_by_default_only_on_hopper():
    for knob in ("tma", "fixed_shift"):
        assert bs._launch_knobs(128, (9, 0))[knob]
        assert bs._launch_knobs(64, (9, 0))[knob]
        assert not bs._launch_knobs(128, (9, 0), shift_ok=False)[knob]  # not bfloat16, or running-max gaps
        assert not bs._launch_knobs(128, (8, 0))[knob]  # measured on Hopper only
        assert not bs._launch_knobs(128, None)[knob]  # the CPU interpreter
        assert not bs._launch_knobs(128, (9, 0), **{knob: False})[knob]  # an explicit knob wins


def test_seq_index_without_tile_len_must_be_a_permutation():
    q, k, v = _inputs(1, 1, 64, 64, torch.float32, 0)
    blocks, counts = bs.tiles_to_blocks(torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="seq_index"):
        bs.block_sparse_attention_reference(q, k, v, blocks, counts, block_m=32, block_n=32,
                                            seq_index=torch.arange(96) % 64)


def _oracle_drop(prev: torch.Tensor, lse: torch.Tensor) -> float:
    """Independent sum of the LSE decrease per row: 0 where the earlier LSE is -inf, the largest
    float32 where only the new one is, else max(prev - lse, 0)."""
    total = 0.0
    for p, cur in zip(prev.flatten().tolist(), lse.flatten().tolist()):
        if p == float("-inf"):
            continue
        total += torch.finfo(torch.float32).max if cur == float("-inf") else max(p - cur, 0.0)
    return total


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # -inf - -inf: the NaN case
def test_lse_drop_sums_the_decrease_against_an_earlier_pass():
    """``lse_drop`` adds the sum over rows of max(prev - lse, 0) to a float64 total (TemporalSparse's
    refresh check inside the kernel): kernel and reference against a float64 oracle, rows with an
    empty layout included; the other outputs are those of the call without it."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    tile, S = 32, 150
    q, k, v = _inputs(2, 2, S, 64, torch.bfloat16, seed)
    g = torch.Generator().manual_seed(seed + 1)
    n = math.ceil(S / tile)
    tile_mask = (torch.rand(2, 2, n, n, generator=g) < 0.5) | torch.eye(n, dtype=torch.bool)
    tile_mask[1, 0, 2] = False  # an empty query tile: output 0, LSE -inf
    blocks, counts = bs.tiles_to_blocks(tile_mask)
    _, exact_lse = _float64_attention(q, k, v, tile_mask, tile)
    empty = ~exact_lse.isfinite()
    prev = (exact_lse + torch.randn(exact_lse.shape, generator=g, dtype=torch.float64)).float()
    prev[empty] = float("-inf")  # both -inf: counts 0
    prev[0, 1, :7] = float("-inf")  # only the earlier pass -inf: counts 0
    expect = _oracle_drop(prev.double(), exact_lse)
    plain = bs.block_sparse_attention_triton(q, k, v, blocks, counts, block_m=tile, block_n=tile, return_gap=True)
    for name, fn in (("kernel", bs.block_sparse_attention_triton), ("reference", bs.block_sparse_attention_reference)):
        total = torch.zeros(1, dtype=torch.float64)
        out, gap = fn(q, k, v, blocks, counts, block_m=tile, block_n=tile, return_gap=True, lse_drop=(prev, total))
        assert abs(total.item() - expect) <= 1e-3 * S * 4, f"{name}: {total.item()} vs {expect} (seed {seed})"
        if name == "kernel":
            assert torch.equal(out, plain[0]) and torch.equal(gap, plain[1])
        total2 = torch.zeros(1, dtype=torch.float64)
        prev2 = prev.clone()
        prev2[1, 0, 64:96] = 0.0  # finite before, -inf now (the emptied tile): the largest float per row
        fn(q, k, v, blocks, counts, block_m=tile, block_n=tile, lse_drop=(prev2, total2))
        assert total2.item() >= 32 * torch.finfo(torch.float32).max, name
    with pytest.raises(ValueError, match="lse_drop"):
        bs.block_sparse_attention_reference(q, k, v, blocks, counts, block_m=tile, block_n=tile,
                                            lse_drop=(prev, torch.zeros(1)))


@pytest.mark.parametrize(("S", "D", "dtype", "padded", "tma"), [(300, 64, torch.bfloat16, False, False),
                                                                (300, 128, torch.bfloat16, False, True),
                                                                (150, 128, torch.float32, True, False),
                                                                (200, 64, torch.float16, False, False)])
def test_fixed_shift_equals_the_online_softmax(S, D, dtype, padded, tma):
    """``fixed_shift`` (each row's softmax shifted by its largest score in the first listed key
    sub-tile, not by the running max): kernel and reference against float64, with a row where a later
    key scores 100 nats above the rest (its query tile is redone with the running max; 12 nats for
    float16 weights, around their 2**15 limit) and an empty query tile; the gap and LSE-drop outputs
    are those of the call without it."""
    tile = 32 if padded else 128
    if padded:
        seed, (q, k, v), tile_len, tile_mask, valid = _padded_case(S, D, dtype, tile)
    else:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        q, k, v = _inputs(2, 2, S, D, dtype, seed)
        n = math.ceil(S / tile)
        tile_mask = torch.rand(2, 2, n, n, generator=torch.Generator().manual_seed(seed + 1)) < 0.6
        tile_mask = bs.add_dense_ranges(tile_mask, [(S - 10, S)], S, tile)
        tile_mask[1, 0, 0] = False  # an empty query tile: output 0, LSE -inf
        tile_len, valid = None, torch.ones(S, dtype=torch.bool)
    # the last valid key, aligned with query row 5 of (0, 1): far above anything in row 5's first tile
    jump = 12.0 if dtype == torch.float16 else 100.0
    key = int(valid.nonzero().max())
    k[0, 1, key] = (q[0, 1, 5].double() * jump * math.sqrt(D) / q[0, 1, 5].double().square().sum()).to(dtype)
    tile_mask[0, 1, 0, key // tile] = True
    blocks, counts = bs.tiles_to_blocks(tile_mask)
    s64 = q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)
    mask = _token_mask(tile_mask, tile, S, S) & valid
    s64 = s64.masked_fill(~mask, float("-inf"))
    others = s64[0, 1, 5].clone()
    others[key] = float("-inf")
    assert s64[0, 1, 5, key] > others.max() + jump - 8  # the jump is there
    exact_lse = torch.logsumexp(s64, -1)
    exact = torch.softmax(s64, -1).nan_to_num(0.0) @ v.double()
    kw = dict(block_m=tile, block_n=tile, tile_len=tile_len, return_lse=True)
    if tma:  # the descriptor path is taken for these inputs (the default's on Hopper)
        assert bs._descriptors((q, k, v), (tile, 64, 64)) is not None
    if padded:
        kw.update(return_gap=True, gap_ref=exact_lse.float())
    prev = (exact_lse + 1).float()
    eps = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-20}[dtype]
    rows = valid[None, None, :, None]
    scale = exact.abs().amax().item()
    for name, fn in (("kernel", bs.block_sparse_attention_triton),
                     ("reference", bs.block_sparse_attention_reference)):
        plain_total = torch.zeros(1, dtype=torch.float64)
        plain = fn(q, k, v, blocks, counts, lse_drop=(prev, plain_total), fixed_shift=False, **kw)
        total = torch.zeros(1, dtype=torch.float64)
        out, lse, *gap = fn(q, k, v, blocks, counts, fixed_shift=True, tma=tma, lse_drop=(prev, total), **kw)
        err = ((out.double() - exact) * rows).abs().amax().item() / scale
        assert err <= 4 * eps, f"{name}: relative error {err:.2e} (seed {seed})"
        live = exact_lse.isfinite() & valid
        assert torch.equal(lse.isfinite() & valid, live), f"{name}: -inf rows differ (seed {seed})"
        assert (lse.double() - exact_lse)[live].abs().max() <= 1e-3, f"{name}: LSE off (seed {seed})"
        assert abs(total.item() - plain_total.item()) <= 1e-3 * S * 4, name
        if padded:
            assert torch.equal(gap[0], plain[2]), f"{name}: gaps differ (seed {seed})"
    with pytest.raises(ValueError, match="fixed_shift: the running-max gaps"):
        bs.block_sparse_attention_triton(q, k, v, blocks, counts, block_m=tile, block_n=tile, tile_len=tile_len,
                                         return_gap=True, fixed_shift=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel's default path needs a GPU")
@pytest.mark.parametrize("D", [64, 128])
def test_default_path_on_the_gpu(D):
    """On a GPU the default launch (on Hopper: fixed shift with TMA loads) against float64, with query
    rows that a later key scores 20 nats (kept: large but finite weights) and 100 nats (redone with
    the running max) above their first sub-tile; the online path with pointer loads likewise."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    B, H, S, tile = 2, 3, 1000, 128
    q, k, v = (x.cuda() for x in _inputs(B, H, S, D, torch.bfloat16, seed))
    n = math.ceil(S / tile)
    g = torch.Generator().manual_seed(seed + 1)
    tile_mask = bs.add_dense_ranges(torch.rand(B, H, n, n, generator=g) < 0.3, [(S - 40, S)], S, tile)
    tile_mask[..., 0] = False  # rows start at a later tile; the planted keys sit in the dense text range
    tile_mask[..., n - 1] = True
    for (b, h, row, key), jump in zip([(0, 0, 5, S - 1), (1, 2, 300, S - 2), (0, 1, 700, S - 3)], (20.0, 100.0, 100.0)):
        qr = q[b, h, row].double()
        k[b, h, key] = (qr * jump * math.sqrt(D) / qr.square().sum()).to(torch.bfloat16)
    blocks, counts = (t.cuda() for t in bs.tiles_to_blocks(tile_mask))
    exact, exact_lse = _float64_attention(q.cpu(), k.cpu(), v.cpu(), tile_mask, tile)
    assert exact_lse[1, 2, 300] > 90 and exact_lse[0, 0, 5] > 10  # the planted keys dominate their rows
    scale = exact.abs().amax().item()
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert bs._launch_knobs(D, torch.cuda.get_device_capability())["fixed_shift"] == hopper
    for knobs in ({}, dict(fixed_shift=False, tma=False)):
        out, lse = bs.block_sparse_attention_triton(q, k, v, blocks, counts, return_lse=True, **knobs)
        err = (out.double().cpu() - exact).abs().amax().item() / scale
        assert err <= 4 * 2**-8, f"{knobs}: relative error {err:.2e} (seed {seed})"
        finite = exact_lse.isfinite()
        assert torch.equal(lse.cpu().isfinite(), finite)
        assert (lse.double().cpu() - exact_lse)[finite].abs().max() <= 1e-2, f"{knobs}: LSE off (seed {seed})"
