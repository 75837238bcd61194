"""TemporalSparse(estimate=True): the kernel's gaps (against the previous step's log-sum-exp) choose
the tiles computed exactly, and the skipped ones are forecast and corrected by summary tokens;
checked against float64 attention and an independent float64 choice."""

import logging
import math

import pytest
import torch
from dit_accel.kernels.tile_order import tile_order
from dit_accel.pipelines.tiny import make_tiny_pipeline, tiny_inputs
from helpers import attention_call, check_estimate64, pipeline_output, tile_of

import dit_accel
import dit_accel.methods.sparse as sparse_methods

GRID, TILE3 = (4, 16, 16), (2, 8, 8)  # 8 tiles of 128 tokens, no padding
S = math.prod(GRID)


def _scores(q, k):
    return q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])


def _gaps64(s, ref, tiles, n):
    """[B, H, n, n] float64: per (query tile, key tile) the largest over the query tile's rows of
    log2(largest weight in the key tile) - ref / ln 2, at most 0, by loops."""
    B, H = s.shape[:2]
    out = torch.empty(B, H, n, n, dtype=torch.float64)
    for qt in range(n):
        rows = (tiles == qt).nonzero().flatten()
        for kt in range(n):
            cols = (tiles == kt).nonzero().flatten()
            best = s[:, :, rows][:, :, :, cols].amax(-1) - ref[:, :, rows]  # [B, H, rows]
            out[:, :, qt, kt] = (best / math.log(2)).clamp(max=0).amax(-1)
    return out


def _choice64(gaps, threshold, k_min, k_max):
    """The kept tiles: each query tile's own, and of the others those at or above the threshold by
    decreasing gap, at least k_min and at most k_max."""
    B, H, n, _ = gaps.shape
    kept = torch.eye(n, dtype=torch.bool).repeat(B, H, 1, 1)
    for b in range(B):
        for h in range(H):
            for qt in range(n):
                others = sorted((k for k in range(n) if k != qt), key=lambda k: -gaps[b, h, qt, k].item())
                above = [k for k in others if gaps[b, h, qt, k] >= threshold]
                for k in others[:min(k_max, max(k_min, len(above)))]:
                    kept[b, h, qt, k] = True
    return kept


@pytest.mark.parametrize("correct, split", [(1.0, False), (0.0, True), (0.5, True)])
def test_estimate_against_float64(correct, split):
    """Steps 0, 1, 3, 5 (full passes at 0, 1, 3 and every 2 steps) are dense attention; step 1
    chooses per (batch, head, query tile) its own tile and at most 2 others by their gap against
    step 0's LSE (at least 1; with ``split`` a threshold that leaves some rows 1 and some 2);
    a sparse step is the kept tiles' exact attention merged with the linear forecast of (skipped
    part - correct x summary part) plus correct x the summary part now. Density: full passes 1,
    sparse steps the kept pairs, summaries one pair per query and skipped tile from step 1 on."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    inputs = [tuple(torch.randn(2, 2, S, 32, generator=g) for _ in range(3)) for _ in range(7)]
    order = tile_order(GRID, TILE3)
    n = order.tile_len.numel()
    ref = torch.logsumexp(_scores(*inputs[0][:2]), -1)
    gaps = _gaps64(_scores(*inputs[1][:2]), ref, tile_of(order), n)
    threshold = -10.0
    if split:  # between the middle two of the rows' second-largest other gaps: half the rows keep 2, half 1
        second = gaps.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf")).sort(-1, descending=True).values
        middle = second[..., 1].flatten().sort().values[n * 2 - 1:n * 2 + 1]  # 4 (batch, head) rows x 8 tiles
        threshold = float(middle.mean())
    kept = _choice64(gaps, threshold, 1, 2)
    if split:
        assert (kept.sum(-1) == 2).any() and (kept.sum(-1) == 3).any()
    method = dit_accel.TemporalSparse(tile=TILE3, full_steps=(0, 1, 3), full_every=2, max_density=0.25,
                                      threshold=threshold, correct=correct)
    state = check_estimate64(method, inputs, GRID, order, kept, correct)
    assert torch.equal(method.tile_mask({"blocks": state["chosen"][1], "counts": state["chosen"][2]}, n), kept)
    pairs = kept.double().sum((-1, -2)).mean().item() / n**2  # share of the pairs a sparse step computes
    summaries = 6 * (~kept).double().sum((-1, -2)).mean().item() * 128 / S**2 if correct else 0.0
    assert method.density() == pytest.approx((4 + 3 * pairs + summaries) / 7, rel=1e-9)


def test_without_an_earlier_pass_the_choice_uses_the_steps_own_lse():
    """With only step 0 leading, the choosing pass has no earlier LSE: it measures the gaps against
    its own (one more pass over the same pairs: density counts each pair once); its output is dense."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, k, v = (torch.randn(1, 2, S, 32, generator=g) for _ in range(3))
    order = tile_order(GRID, TILE3)
    n = order.tile_len.numel()
    s = _scores(q, k)
    kept = _choice64(_gaps64(s, torch.logsumexp(s, -1), tile_of(order), n), -10.0, 1, 1)
    method = dit_accel.TemporalSparse(tile=TILE3, full_steps=(0,), full_every=0, max_density=0.1, correct=0.0)
    state = {}
    out = method(q, k, v, None, attention_call(GRID, step=0, state=state))
    assert (out.double() - torch.softmax(s, -1) @ v.double()).abs().max() < 1e-4
    assert torch.equal(method.tile_mask({"blocks": state["chosen"][1], "counts": state["chosen"][2]}, n), kept)
    assert method.density() == pytest.approx(1.0)


def test_text_rows_stay_exact_and_nothing_turns_nan():
    """Joint attention: text query rows and text key tiles are always kept, so the text rows are
    exact at sparse steps too; a new generation (fresh state) starts over."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    text = 6
    method = dit_accel.TemporalSparse(tile=TILE3, full_steps=(0, 1), full_every=0, max_density=0.15)
    state = {}
    for step in range(4):
        q, k, v = (torch.randn(1, 2, S + text, 32, generator=g) for _ in range(3))
        out = method(q, k, v, None, attention_call(GRID, text, text_first=False, step=step, state=state))
        dense = torch.softmax(_scores(q, k), -1) @ v.double()
        assert torch.isfinite(out).all()
        assert (out[:, :, -text:].double() - dense[:, :, -text:]).abs().max() < 1e-4
        if step >= 2:
            assert (out.double() - dense).abs().max() > 1e-3  # the video rows were estimated
    fresh = method(q, k, v, None, attention_call(GRID, text, text_first=False, step=0, state={}))
    assert (fresh.double() - dense).abs().max() < 1e-4


def test_runs_dense_where_memory_is_short(monkeypatch, caplog):
    """When the forecast does not fit, that layer and branch run dense from the choosing step on
    (logged once)."""
    monkeypatch.setattr(sparse_methods, "_fits", lambda nbytes, device: False)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    method = dit_accel.TemporalSparse(tile=TILE3, full_steps=(0, 1), full_every=0)
    state = {}
    with caplog.at_level(logging.INFO, logger="dit_accel"):
        for step in range(4):
            q, k, v = (torch.randn(1, 2, S, 32, generator=g) for _ in range(3))
            out = method(q, k, v, None, attention_call(GRID, step=step, state=state))
            dense = torch.softmax(_scores(q, k), -1) @ v.double()
            assert (out.double() - dense).abs().max() < 1e-4
    assert method.density() == pytest.approx(1.0)
    assert sum("TemporalSparse(estimate=True)" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(warmup_steps=3), "warmup_steps=3.*estimate=False"),
    (dict(refresh_every=2), "refresh_every=2"),
    (dict(refresh_tol=0.2), "refresh_tol=0.2"),
    (dict(estimate="yes"), "estimate='yes'"),
    (dict(full_steps=(0, -2)), "full_steps"),
    (dict(full_every=-1), "full_every=-1"),
    (dict(correct=-1.0), "correct=-1.0"),
    (dict(min_density=0.5), "min_density=0.5, max_density=0.025"),
    (dict(min_density="half"), "min_density='half'.*'auto'"),
    (dict(estimate=False, warmup_steps=None), "warmup_steps=None"),
])
def test_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dit_accel.TemporalSparse(**kwargs)


def test_defaults_of_each_mode():
    """The estimate by default: a ceiling of 2.5% of the key tiles besides the own tile (every tile
    at threshold -inf), full passes at 0, 1, 2, 5 and every 4 after; without it, the former
    skip-and-drop defaults."""
    method = dit_accel.TemporalSparse()
    assert method.estimate and (method.min_density, method.max_density) == (0.0, 0.025)
    assert (method.warmup_steps, method.refresh_every, method.refresh_tol) == (None, None, None)
    assert [s for s in range(14) if method._full_step(s)] == [0, 1, 2, 5, 9, 13]
    assert dit_accel.TemporalSparse(threshold=float("-inf")).max_density == 1.0
    plain = dit_accel.TemporalSparse(estimate=False)
    assert (plain.warmup_steps, plain.refresh_every, plain.refresh_tol) == (2, 5, 0.1)
    assert (plain.min_density, plain.max_density) == (0.05, 1.0)
    assert dit_accel.TemporalSparse(-4.0).threshold == -4.0  # positional threshold, as before


def test_estimate_through_the_processor():
    """Through a tiny Wan pipeline with CFG: the defaults run their sparse steps (density below 1,
    finite output, different from dense)."""
    pipe = make_tiny_pipeline("wan")
    kwargs = tiny_inputs("wan", guidance_scale=4.0, height=64, width=64, num_frames=9, num_inference_steps=5)
    stock = pipeline_output(pipe, kwargs)
    method = dit_accel.TemporalSparse(tile=(1, 2, 2), packed=False, max_density=0.2)  # 12 tiles of 4 tokens
    with dit_accel.apply(pipe, attention=method):
        out = pipeline_output(pipe, kwargs)
    assert method.density() < 0.9
    assert torch.isfinite(out).all()
    assert (out - stock).abs().max().item() > 1e-4


@pytest.mark.parametrize("estimate", [True, False])
def test_parameters_round_trip_through_json(estimate):
    """What the app's form starts from (the fields' defaults as JSON, 'auto' for the mode's) and what
    to_dict() records both build the same method again."""
    import json

    from dit_accel.methods import METHODS
    from dit_accel.ui.core import method_defaults

    form = json.loads(method_defaults("TemporalSparse"))
    form["estimate"] = estimate
    method = METHODS["TemporalSparse"](**{k: tuple(v) if isinstance(v, list) else v for k, v in form.items()})
    assert method.to_dict() == dit_accel.TemporalSparse(estimate=estimate).to_dict()
    again = {k: v for k, v in json.loads(json.dumps(method.to_dict())).items() if k != "method"}
    assert dit_accel.TemporalSparse(**{k: tuple(v) if isinstance(v, list) else v for k, v in again.items()}
                                    ).to_dict() == method.to_dict()
