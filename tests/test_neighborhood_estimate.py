"""Neighborhood(estimate=True): full passes on the schedule, the window exact in between, and the
tiles outside it forecast and corrected by summary tokens; checked against float64 attention."""

import logging
import math

import pytest
import torch
from dit_accel.kernels.tile_order import tile_order
from dit_accel.pipelines.tiny import make_tiny_pipeline, tiny_inputs
from helpers import attention_call, check_estimate64, merge64, pipeline_output

import dit_accel
import dit_accel.methods.sparse as sparse_methods

GRID, TILE3 = (4, 16, 16), (2, 8, 8)  # 8 tiles of 128 tokens, no padding


def _inputs(g, B=2, H=2, D=32):
    q, k, v = (torch.randn(B, H, math.prod(GRID), D, generator=g) for _ in range(3))
    return q, k, v


@pytest.mark.parametrize("correct", [0.0, 1.0, 0.5])
def test_estimate_against_float64(correct):
    """Full passes at 0, 1, 3 and then every 2 steps are dense attention; a sparse step is the own
    tile's exact attention merged with the linear forecast, from the full passes from step 1 (the
    last leading one) on, of (outside part - correct x summary part), plus correct x the summary part
    now. Density: full passes 1, sparse steps the window's share, summaries one pair per query and
    skipped tile from step 1 on."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    method = dit_accel.Neighborhood(window=(1, 1, 1), tile=TILE3, full_steps=(0, 1, 3), full_every=2, correct=correct)
    order = tile_order(GRID, TILE3)
    n = order.tile_len.numel()
    kept = torch.eye(n, dtype=torch.bool)  # each query tile's own tile
    check_estimate64(method, [_inputs(g) for _ in range(7)], GRID, order, kept, correct)
    summaries = 6 * (n - 1) / (n * 128) if correct else 0.0  # steps 1-6, per query one token per skipped tile
    assert method.density() == pytest.approx((4 + 3 / n + summaries) / 7, rel=1e-9)


def test_estimate_with_text_keeps_text_rows_exact_and_the_generation_apart():
    """Joint attention: text queries see every key, so nothing is estimated for them (their output
    is dense at sparse steps too) and no row turns NaN; a new generation (fresh state) starts with
    full passes again."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    text = 6
    S = math.prod(GRID) + text
    method = dit_accel.Neighborhood(window=(1, 1, 1), tile=TILE3, full_steps=(0,), full_every=0)
    state = {}
    for step in range(3):
        q, k, v = (torch.randn(1, 2, S, 32, generator=g) for _ in range(3))
        out = method(q, k, v, None, attention_call(GRID, text, text_first=False, step=step, state=state))
        dense = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(32), -1) @ v.double()
        assert torch.isfinite(out).all()
        assert (out[:, :, -text:].double() - dense[:, :, -text:]).abs().max() < 1e-4
        if step:
            assert (out.double() - dense).abs().max() > 1e-3  # the video rows were estimated
    fresh = method(q, k, v, None, attention_call(GRID, text, step=0, state={}))
    assert (fresh.double() - dense).abs().max() < 1e-4


def test_estimate_runs_dense_where_memory_is_short(monkeypatch, caplog):
    """When the forecast does not fit, that layer and branch run dense from then on (logged once)."""
    monkeypatch.setattr(sparse_methods, "_fits", lambda nbytes, device: False)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    method = dit_accel.Neighborhood(window=(1, 1, 1), tile=TILE3, full_steps=(0,), full_every=0)
    states = ({}, {})  # two layers (or CFG branches)
    with caplog.at_level(logging.INFO, logger="dit_accel"):
        for step in range(3):
            for state in states:
                q, k, v = _inputs(g)
                out = method(q, k, v, None, attention_call(GRID, step=step, state=state))
                dense = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(32), -1) @ v.double()
                assert (out.double() - dense).abs().max() < 1e-4
    assert method.density() == pytest.approx(1.0)
    assert sum("short of memory" in r.getMessage() for r in caplog.records) == 1


def test_fits_leaves_a_tenth_of_the_device_free(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * 2**30, 80 * 2**30))
    cuda = torch.device("cuda")
    assert sparse_methods._fits(22 * 2**30, cuda) and not sparse_methods._fits(23 * 2**30, cuda)
    assert sparse_methods._fits(10**15, torch.device("cpu"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(estimate=1), "estimate=1"),
    (dict(full_steps=(0, -1)), "full_steps"),
    (dict(full_steps=(0, 1.5)), "full_steps"),
    (dict(full_every=-1), "full_every=-1"),
    (dict(correct=-0.5), "correct=-0.5"),
])
def test_estimate_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dit_accel.Neighborhood(**kwargs)


def test_defaults_and_schedule():
    """With the estimate the default window is each query's own tile, without it half the grid; full
    passes at 0, 1, 2, 5 and every 4 steps after."""
    method = dit_accel.Neighborhood()
    assert method.estimate and method.window == (1, 1, 1)
    assert dit_accel.Neighborhood(estimate=False).window == (0.5, 0.5, 0.5)
    assert [s for s in range(30) if method._full_step(s)] == [0, 1, 2, 5, 9, 13, 17, 21, 25, 29]
    assert [s for s in range(8) if dit_accel.Neighborhood(full_steps=(0, 3), full_every=0)._full_step(s)] == [0, 3]


def test_estimate_through_the_processor():
    """Through a tiny Wan pipeline with CFG: the estimate runs (density below 1, finite output) and
    differs from the window alone."""
    pipe = make_tiny_pipeline("wan")
    kwargs = tiny_inputs("wan", guidance_scale=4.0, height=64, width=64, num_frames=9, num_inference_steps=3)
    outs = {}
    for estimate in (True, False):
        method = dit_accel.Neighborhood(window=(1, 2, 2), tile=(1, 2, 2), full_steps=(0,), full_every=0,
                                        estimate=estimate)
        handle = dit_accel.apply(pipe, attention=method)
        outs[estimate] = pipeline_output(pipe, kwargs)
        handle.remove()
        assert method.density() < 0.9
    assert torch.isfinite(outs[True]).all()
    assert (outs[True] - outs[False]).abs().max().item() > 1e-4


def test_merge_into_is_the_lse_merge():
    """merge_into (one interpolation) against the float64 merge of two attention parts, including rows
    whose second part is empty (lse -inf)."""
    from dit_accel.methods.estimate import merge_into

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    out_a, out_b = (torch.randn(2, 3, 50, 16, generator=g) for _ in range(2))
    lse_a, lse_b = (torch.randn(2, 3, 50, generator=g) * 4 for _ in range(2))
    lse_b[:, :, :5] = float("-inf")
    got = merge_into(out_a, lse_a, out_b, lse_b).double()
    expect = merge64(out_a.double(), lse_a.double(), out_b.double(), lse_b.double())
    assert (got - expect).abs().max() < 1e-5
    assert torch.equal(got[:, :, :5], out_a[:, :, :5].double())
