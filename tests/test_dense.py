"""Dense backends against an explicit float64 attention on fresh random inputs, and their errors."""

import math
import random

import pytest
import torch

import dit_accel
from dit_accel import backends


def reference_attention(q, k, v, mask=None):
    """Softmax(QK^T / sqrt(d) + mask) V in float64, written out explicitly."""
    q, k, v = (x.double() for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return torch.softmax(scores, dim=-1) @ v


def _inputs(batch, heads, q_len, kv_len, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, n, dim, generator=g) for n in (q_len, kv_len, kv_len))


@pytest.mark.parametrize("backend", ["sdpa", "flex", "auto"])
@pytest.mark.parametrize("batch,heads,q_len,kv_len,dim", [(1, 2, 37, 37, 64), (2, 3, 131, 131, 128),
                                                          (2, 2, 129, 11, 64)])
@pytest.mark.parametrize("mask", [None, "bool", "additive"])
def test_dense_matches_float64(backend, batch, heads, q_len, kv_len, dim, mask):
    seed = random.SystemRandom().randrange(2**31)  # fresh inputs each run, reported on failure
    q, k, v = _inputs(batch, heads, q_len, kv_len, dim, seed)
    attn_mask = None
    if mask == "bool":  # key padding: the last 3 keys of row 0 are padding
        attn_mask = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool)
        attn_mask[0, ..., -3:] = False
    elif mask == "additive":
        attn_mask = torch.randn(batch, 1, q_len, kv_len)
    out = dit_accel.Dense(backend)(q, k, v, attn_mask, None)
    expected = reference_attention(q, k, v, attn_mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.double() - expected).abs().max().item() < 1e-5, f"seed {seed}"


def test_auto_says_what_it_uses():
    assert repr(dit_accel.Dense()) == "Dense(backend='auto' -> 'sdpa')"
    assert dit_accel.Dense().to_dict() == {"method": "Dense", "backend": "auto"}


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        dit_accel.Dense(backend="cudnn")


@pytest.mark.parametrize("name", ["sage", "xformers"])
def test_missing_backend_names_reason_and_alternative(name, monkeypatch):
    monkeypatch.setattr(backends, "_version", lambda dist: None)
    with pytest.raises(dit_accel.MethodUnavailableError, match=r"not installed.*backend='sdpa'"):
        dit_accel.Dense(backend=name)


def test_sage_on_cpu_names_device_and_alternative(monkeypatch):
    monkeypatch.setattr(backends, "backend_status", lambda name: backends.BackendStatus(name, True, "stub"))
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(dit_accel.MethodUnavailableError, match=r"needs a CUDA GPU.*backend='sdpa'"):
        backends.check_backend("sage", q, None)
    with pytest.raises(dit_accel.MethodUnavailableError, match="xformers"):
        backends.check_backend("xformers", q, None)


def test_backend_detection_reports_every_backend():
    found = backends.detect_backends()
    assert set(found) == set(backends.BACKENDS)
    assert found["sdpa"].available
    assert all(status.detail for status in found.values())
