"""`apply`: turn dit-accel on for a pipeline or transformer in one call, and undo it exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import geometry
from .adapters import adapter_for
from .methods.base import AttentionMethod
from .methods.dense import Dense
from .processor import AttnProcessor


@dataclass
class _Applied:
    transformer: torch.nn.Module
    processors: dict[str, Any]
    attached_hook: bool
    created_registry: bool


@dataclass
class AccelHandle:
    """What `apply` did; `remove()` restores the stock processors and hooks exactly.

    Also a context manager: ``with dit_accel.apply(pipe, ...):`` removes on leaving the block, also
    when it raises.
    """

    attention: AttnProcessor | None
    _applied: list[_Applied] = field(default_factory=list, repr=False)
    _guidance: Any = field(default=None, repr=False)

    @property
    def transformers(self) -> list[torch.nn.Module]:
        return [a.transformer for a in self._applied]

    def __enter__(self) -> AccelHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Restore every transformer's original processors and remove the hooks `apply` added."""
        if self._guidance is not None:
            self._guidance.remove()
            self._guidance = None
        for applied in reversed(self._applied):
            t = applied.transformer
            if self.attention is not None:
                t.set_attn_processor(dict(applied.processors))
            if applied.attached_hook:
                geometry.detach(t)
            registry = getattr(t, "_diffusers_hook", None)
            if applied.created_registry and registry is not None and not registry.hooks:
                del t._diffusers_hook
        self._applied.clear()


def _transformers_of(target: Any) -> tuple[Any, list[torch.nn.Module]]:
    from diffusers import DiffusionPipeline

    if isinstance(target, DiffusionPipeline):
        found = [getattr(target, name, None) for name in ("transformer", "transformer_2")]
        found = [t for t in found if t is not None]
        if not found:
            raise ValueError(
                f"{type(target).__name__} has no `transformer` component; dit-accel accelerates DiT "
                "pipelines (Flux, SD3, Wan, HunyuanVideo, CogVideoX, LTX-Video)."
            )
        return target, found
    if isinstance(target, torch.nn.Module):
        return None, [target]
    raise TypeError(f"apply() takes a diffusers pipeline or transformer, got {type(target).__name__}.")


def _perturbable_layers(transformer: torch.nn.Module, adapter) -> dict[int, tuple[str, int]]:
    """Layer -> (module name, heads) of the self / joint attention modules of `transformer`."""
    out = {}
    for name, module in geometry.attention_modules(transformer):
        info = adapter.describe(name, module, transformer)
        if info is not None and info.kind in ("self", "joint"):
            out.setdefault(info.layer, (name, module.heads))
    return out


def apply(pipe_or_transformer: Any, attention: AttentionMethod | AttnProcessor | None = None,
          cache: Any = None, guidance: Any = None) -> AccelHandle:
    """Accelerate a diffusers pipeline (every transformer it has, e.g. Wan2.2's two experts) or
    a single transformer.

    Args:
        pipe_or_transformer: a `DiffusionPipeline` with a supported `transformer`, or the
            transformer itself.
        attention: an attention method (e.g. `Dense()`) or an `AttnProcessor`; `None` leaves the
            stock attention and only attaches the geometry hook.
        cache: a caching schedule (not provided by this version: must be `None`).
        guidance: a `SoftPAG` (needs a pipeline): its heads are checked against the model, its
            perturbation is installed on top of `attention` (`Dense()` when `None`), each
            conditional transformer call runs a perturbed copy of its conditional rows in the same
            batch, and the scheduler's step adds `s (eps_c - eps_pert)` to its prediction.

    Returns:
        An `AccelHandle`; `handle.remove()` restores the stock processors and hooks, as does leaving
        a ``with`` block over it.

    Raises:
        UnsupportedModelError: the transformer is not of a supported family (nothing is changed).
    """
    if cache is not None:
        raise NotImplementedError(f"cache={cache!r}: caching schedules are not part of this dit-accel version; "
                                  "pass cache=None.")
    from .guidance import Perturbed, SoftPAG

    if guidance is not None and not isinstance(guidance, SoftPAG):
        raise TypeError(f"guidance={guidance!r}: expected a dit_accel.SoftPAG (or None)")
    processor = attention
    if guidance is not None:
        inner = attention.method if isinstance(attention, AttnProcessor) else attention
        processor = AttnProcessor(Perturbed(inner if inner is not None else Dense(), guidance))
    elif attention is not None and not isinstance(attention, AttnProcessor):
        processor = AttnProcessor(attention)
    pipeline, transformers = _transformers_of(pipe_or_transformer)
    if guidance is not None and pipeline is None:
        raise ValueError("guidance=SoftPAG(...): needs the pipeline (apply(pipe, guidance=...)), whose scheduler step "
                         "receives the guidance term; for a bare transformer use guidance.perturbing() around your "
                         "own perturbed forward calls with attention=dit_accel.guidance.Perturbed(method, guidance)")
    for t in transformers:
        adapter = adapter_for(t)  # check every transformer before changing any
        if guidance is not None:
            guidance.check(_perturbable_layers(t, adapter))
    handle = AccelHandle(attention=processor)
    for t in transformers:
        had_registry = hasattr(t, "_diffusers_hook")
        saved = dict(t.attn_processors) if processor is not None else {}
        _, attached = geometry.attach(t, pipeline)
        handle._applied.append(_Applied(t, saved, attached, not had_registry))
        if processor is not None:
            t.set_attn_processor(processor)
    if guidance is not None:
        from .guidance import GuidanceRunner

        handle._guidance = GuidanceRunner(guidance, pipeline, {t: geometry.get_hook(t) for t in transformers})
        handle._guidance.install(transformers)
    return handle
