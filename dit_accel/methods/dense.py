"""`Dense`: full attention through the best (or a chosen) dense backend."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .. import backends
from ..layout import AttentionCall
from .base import AttentionMethod

logger = logging.getLogger("dit_accel")


@dataclass
class Dense(AttentionMethod):
    """Full (dense) attention.

    Args:
        backend: `"auto"` (the fastest available for the device: cuDNN SDPA on Hopper, SDPA on
            CPU), `"sdpa"` (torch chooses cuDNN / flash / efficient / math), `"flex"`
            (FlexAttention, compiled on CUDA), `"xformers"` (when installed and it has a kernel
            for the shape) or `"sage"` (SageAttention, CUDA fp16/bf16, no masks).

    Inputs that a backend cannot run raise `MethodUnavailableError` naming the reason and the
    alternative; nothing falls back silently.
    """

    backend: str = "auto"
    # (device type, dtype, masked) -> kernel, filled after the inputs passed the backend's checks
    _kernels: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.backend != "auto" and self.backend not in backends.BACKENDS:
            raise ValueError(
                f"Dense(backend={self.backend!r}): unknown backend; choose one of "
                f"{('auto',) + backends.BACKENDS}."
            )
        if self.backend != "auto":
            status = backends.backend_status(self.backend)
            if not status.available:
                raise backends.MethodUnavailableError(
                    f"Dense(backend={self.backend!r}) is unavailable: {status.detail}. "
                    "Use Dense(backend='sdpa') (or 'auto')."
                )

    def __repr__(self) -> str:
        if self.backend == "auto":
            return f"Dense(backend='auto' -> {backends.auto_backend()[0]!r})"
        return f"Dense(backend={self.backend!r})"

    def to_dict(self) -> dict:
        return {"method": "Dense", "backend": self.backend}

    def resolve(self, device: torch.device) -> str:
        """The backend this method uses on `device`."""
        return backends.auto_backend(device)[0] if self.backend == "auto" else self.backend

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attn_mask: torch.Tensor | None, call: AttentionCall | None = None) -> torch.Tensor:
        signature = (query.device.type, query.dtype, attn_mask is not None)
        kernel = self._kernels.get(signature)
        if kernel is None:
            name = self.resolve(query.device)
            backends.check_backend(name, query, attn_mask)
            if self.backend == "auto":
                logger.info("dit_accel Dense: backend 'auto' uses %r on %s (%s)", name, query.device.type,
                            backends.auto_backend(query.device)[1])
            kernel = self._kernels[signature] = backends.KERNELS[name]
        return kernel(query, key, value, attn_mask)
