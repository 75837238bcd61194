"""Per-family adapters, looked up by the transformer's class."""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from .base import Adapter
from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .ltx import LTXAdapter
from .sd3 import SD3Adapter
from .wan import WanAdapter

_ADAPTERS: dict[str, type[Adapter]] = {
    cls.model_class: cls
    for cls in (FluxAdapter, SD3Adapter, WanAdapter, HunyuanVideoAdapter, CogVideoXAdapter, LTXAdapter)
}

SUPPORTED_MODELS: dict[str, str] = {cls.family: name for name, cls in _ADAPTERS.items()}
"""Family name -> diffusers transformer class name, for every supported family."""


def find_adapter_class(model: torch.nn.Module) -> type[Adapter] | None:
    """The adapter class for `model`'s class (or a subclass of a supported class), else `None`."""
    for cls in type(model).__mro__:
        if cls.__name__ in _ADAPTERS and cls.__module__.startswith("diffusers."):
            return _ADAPTERS[cls.__name__]
    return None


def adapter_for(model: torch.nn.Module) -> Adapter:
    """A new adapter for `model`; raises `UnsupportedModelError` naming the supported families."""
    cls = find_adapter_class(model)
    if cls is None:
        supported = ", ".join(f"{fam} ({name})" for fam, name in SUPPORTED_MODELS.items())
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a supported transformer. dit-accel supports: {supported}. "
            "Pass a pipeline whose `transformer` is one of these, or the transformer itself."
        )
    return cls()


__all__ = ["Adapter", "SUPPORTED_MODELS", "adapter_for", "find_adapter_class"]
