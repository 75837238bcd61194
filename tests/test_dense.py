"""Dense backends against an explicit float64 attention on fresh random inputs, and their errors."""

import math
import random
import sys
import types

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


def _stub_xformers(monkeypatch, has_cpp_library=True, error=None):
    """Install a stand-in `xformers` package whose attention raises `error` (as xformers' dispatcher
    does when it has no operator for the inputs)."""
    package = types.ModuleType("xformers")
    package._has_cpp_library = has_cpp_library
    ops = types.ModuleType("xformers.ops")

    def memory_efficient_attention(q, k, v, attn_bias=None):
        raise error

    ops.memory_efficient_attention = memory_efficient_attention
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(backends, "_version", lambda dist: "0.0.35" if dist == "xformers" else None)


def test_xformers_without_its_extensions_is_reported_unavailable(monkeypatch):
    _stub_xformers(monkeypatch, has_cpp_library=False)
    status = backends.backend_status("xformers")
    assert not status.available and "extensions did not load" in status.detail
    with pytest.raises(dit_accel.MethodUnavailableError, match=r"extensions did not load.*backend='sdpa'"):
        dit_accel.Dense(backend="xformers")


def test_xformers_without_a_kernel_names_shape_reasons_and_alternative(monkeypatch):
    message = (
        "No operator found for `memory_efficient_attention_forward` with inputs:\n"
        "     query       : shape=(1, 37, 2, 64) (torch.float32)\n"
        "`fa3F@0.0.0` is not supported because:\n"
        "    dtype=torch.float32 (supported: {torch.bfloat16, torch.float16})\n"
        "`cutlassF-pt` is not supported because:\n"
        "    device=cpu (supported: {'cuda'})\n"
    )
    _stub_xformers(monkeypatch, error=NotImplementedError(message))
    q = torch.randn(1, 2, 37, 64)
    with pytest.raises(dit_accel.MethodUnavailableError) as err:
        backends.xformers_attention(q, q, q)
    text = str(err.value)
    assert "(1, 2, 37, 64)" in text and "backend='sdpa'" in text
    assert "fa3F: dtype=torch.float32" in text and "cutlassF-pt: device=cpu" in text
