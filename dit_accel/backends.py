"""Dense attention backends: which are available here, and why the missing ones are not.

Every backend function has SDPA's layout and semantics: `[batch, heads, seq, head_dim]` in and
out, `attn_mask` `None`, bool (True = attend) or an additive float bias broadcastable to
`[batch, heads, q_len, kv_len]`, default scale `1/sqrt(head_dim)`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import MethodUnavailableError

logger = logging.getLogger("dit_accel")

BACKENDS = ("sdpa", "flex", "xformers", "sage")


@dataclass(frozen=True)
class BackendStatus:
    """Whether a dense backend can run here; `detail` says what it will use or why it cannot."""

    name: str
    available: bool
    detail: str


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def backend_status(name: str) -> BackendStatus:
    """Availability of one backend on this machine (not a check of any particular shape)."""
    cuda = torch.cuda.is_available()
    if name == "sdpa":
        if cuda:
            kernels = [k for k, on in (("cuDNN", torch.backends.cuda.cudnn_sdp_enabled()),
                                       ("flash", torch.backends.cuda.flash_sdp_enabled()),
                                       ("mem-efficient", torch.backends.cuda.mem_efficient_sdp_enabled())) if on]
            return BackendStatus(name, True, f"torch {torch.__version__} SDPA on CUDA ({', '.join(kernels)} enabled)")
        return BackendStatus(name, True, f"torch {torch.__version__} SDPA on CPU")
    if name == "flex":
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except ImportError as exc:
            return BackendStatus(name, False, f"torch {torch.__version__} has no FlexAttention ({exc})")
        how = "compiled" if cuda else "eager, unfused (no CUDA): for tests, not speed"
        return BackendStatus(name, True, f"FlexAttention, {how}")
    if name == "xformers":
        version = _version("xformers")
        if version is None:
            return BackendStatus(name, False, "xformers is not installed (pip install 'dit-accel[xformers]')")
        try:
            xformers = importlib.import_module("xformers")
            importlib.import_module("xformers.ops")
        except Exception as exc:  # a wheel built for another torch fails in many ways
            return BackendStatus(name, False, f"xformers {version} is installed but does not import: {exc}")
        if not getattr(xformers, "_has_cpp_library", True):
            return BackendStatus(
                name, False,
                f"xformers {version} imports but its C++/CUDA extensions did not load (built for another torch "
                f"than {torch.__version__}), so it has no attention kernels; install an xformers built for this torch",
            )
        return BackendStatus(name, True, f"xformers {version} (kernel availability depends on the shape)")
    if name == "sage":
        version = _version("sageattention")
        if version is None:
            return BackendStatus(name, False, "sageattention is not installed (pip install sageattention)")
        if not cuda:
            return BackendStatus(name, False, f"sageattention {version} is installed but needs a CUDA GPU")
        return BackendStatus(name, True, f"sageattention {version} (INT8 QK, fp16/bf16 only, no masks)")
    raise ValueError(f"backend={name!r} is not one of {BACKENDS}.")


def detect_backends() -> dict[str, BackendStatus]:
    """Status of every dense backend on this machine."""
    return {name: backend_status(name) for name in BACKENDS}


def auto_backend(device: torch.device | str | None = None) -> tuple[str, str]:
    """The backend `Dense(backend="auto")` uses on `device`, and why.

    cuDNN SDPA is the fastest dense kernel measured on H100 for DiT shapes (faster than Flex,
    FA2 and SageAttention 1; see benchmarks/results), and SDPA is the only fused dense path on CPU.
    """
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        return "sdpa", "cuDNN SDPA measured fastest on Hopper for DiT shapes"
    return "sdpa", f"SDPA is the only fused dense attention on {device.type}"


def sdpa(query, key, value, attn_mask=None):
    """`F.scaled_dot_product_attention` (torch picks cuDNN / flash / efficient / math)."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _mask_score_mod(attn_mask: torch.Tensor):
    """Flex `score_mod` applying an SDPA-style mask (bool or additive), with broadcasting."""
    bias = attn_mask
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device).masked_fill(~bias, float("-inf"))
    while bias.ndim < 4:
        bias = bias.unsqueeze(0)
    one_b, one_h, one_q = (bias.shape[i] == 1 for i in range(3))

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[0 if one_b else b, 0 if one_h else h, 0 if one_q else q_idx, kv_idx].to(score.dtype)

    return score_mod


def flex(query, key, value, attn_mask=None):
    """FlexAttention; compiled on CUDA, eager (unfused, materialises scores) elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = _mask_score_mod(attn_mask) if attn_mask is not None else None
    if query.is_cuda:
        return _compiled_flex()(query, key, value, score_mod=score_mod)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(query, key, value, score_mod=score_mod)


def xformers_attention(query, key, value, attn_mask=None):
    """xformers `memory_efficient_attention`; raises `MethodUnavailableError` when it has no kernel."""
    import xformers.ops as xops

    bias = None
    if attn_mask is not None:
        bias = attn_mask
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=query.dtype, device=query.device).masked_fill(~bias, float("-inf"))
        bias = bias.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    try:
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias).transpose(1, 2)
    except NotImplementedError as exc:
        raise MethodUnavailableError(
            f"xformers has no kernel for query {tuple(query.shape)} {query.dtype} on {query.device}"
            f"{' with a mask' if attn_mask is not None else ''} ({_xformers_reasons(str(exc))}). "
            "Use Dense(backend='sdpa') (or 'auto') instead."
        ) from exc


def _xformers_reasons(message: str, most: int = 4) -> str:
    """`op: first reason` for each operator xformers' dispatcher rejected, from its error text."""
    lines = message.splitlines()
    reasons = [
        f"{line.split('`')[1].split('@')[0] if line.count('`') >= 2 else line.strip()}: {lines[i + 1].strip()}"
        for i, line in enumerate(lines[:-1]) if line.rstrip().endswith("is not supported because:")
    ]
    if not reasons:
        return lines[0].strip() if lines else "no operator found"
    more = f"; {len(reasons) - most} more" if len(reasons) > most else ""
    return "; ".join(reasons[:most]) + more


def sage(query, key, value, attn_mask=None):
    """SageAttention (INT8 QK^T, fp16 PV): CUDA, fp16/bf16, no mask."""
    from sageattention import sageattn

    return sageattn(query, key, value, tensor_layout="HND", is_causal=False)


def check_backend(name: str, query: torch.Tensor, attn_mask: torch.Tensor | None) -> None:
    """Raise `MethodUnavailableError` when backend `name` cannot run these inputs, naming why
    and the alternative."""
    status = backend_status(name)
    if not status.available:
        raise MethodUnavailableError(
            f"Dense(backend={name!r}) is unavailable: {status.detail}. Use Dense(backend='sdpa') (or 'auto')."
        )
    if name == "sage":
        if not query.is_cuda:
            raise MethodUnavailableError(
                f"Dense(backend='sage') cannot run on {query.device}: SageAttention needs a CUDA GPU. "
                "Use Dense(backend='sdpa') (or 'auto')."
            )
        if query.dtype not in (torch.float16, torch.bfloat16):
            raise MethodUnavailableError(
                f"Dense(backend='sage') cannot run {query.dtype}: SageAttention takes fp16/bf16 only. "
                "Cast the pipeline to bfloat16 or use Dense(backend='sdpa')."
            )
        if attn_mask is not None:
            raise MethodUnavailableError(
                "Dense(backend='sage') cannot apply an attention mask (this model passes one, e.g. a text "
                "padding mask). Use Dense(backend='sdpa') or 'flex'."
            )
    if name == "xformers" and not query.is_cuda:
        raise MethodUnavailableError(
            f"Dense(backend='xformers') has no kernel on {query.device}: xformers' memory-efficient "
            "attention runs on CUDA. Use Dense(backend='sdpa') (or 'auto')."
        )


KERNELS = {"sdpa": sdpa, "flex": flex, "xformers": xformers_attention, "sage": sage}
