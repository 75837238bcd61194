"""Geometry capture: a diffusers `ModelHook` on the transformer records a `TokenLayout` before
every forward call, and a registry maps each attention module to its hook and `ModuleInfo`.

The hook is stateful in diffusers' sense: pipelines reset it at the end of every generation
(`maybe_free_model_hooks`), and it receives the pipeline's cache context (`"cond"`,
`"uncond"`, `"cond_uncond"`), which tells which batch rows belong to which CFG branch.
"""

from __future__ import annotations

import logging
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .adapters import Adapter, adapter_for, find_adapter_class
from .errors import UnsupportedModelError
from .layout import ModuleInfo, TokenLayout

logger = logging.getLogger("dit_accel")

HOOK_NAME = "dit_accel.geometry"


class _ContextOnly(BaseState):
    """The hook keeps no per-context state; its StateManager only carries the cache context."""

    def reset(self, *args, **kwargs) -> None:
        pass


class GeometryHook(ModelHook):
    """Records the `TokenLayout` of each forward call of the transformer it is registered on.

    Also owns the per-layer state of attention methods (`store`), which it clears whenever a
    new generation starts: on diffusers' stateful-hook reset, or when the timestep rises again.
    """

    _is_stateful = True

    def __init__(self, adapter: Adapter, pipeline: Any = None) -> None:
        super().__init__()
        self.adapter = adapter
        self.cache_context = StateManager(_ContextOnly)
        self.pipeline_ref = weakref.ref(pipeline) if pipeline is not None else None
        self.layout: TokenLayout | None = None
        self.store: dict[tuple, dict[str, Any]] = {}
        self.generation = 0
        self._step = 0
        self._last_timestep: float | None = None

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.layout = self.record(module, args, kwargs)
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.new_generation()
        self.cache_context.set_context(None)
        return module

    def new_generation(self) -> None:
        """Forget all method state and restart step counting."""
        self.generation += 1
        self.store.clear()
        self._step = 0
        self._last_timestep = None

    def record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> TokenLayout:
        """Compute the layout of a forward call with these arguments."""
        fields = self.adapter.layout_fields(module, self.adapter.bind_arguments(module, args, kwargs))
        context = self.cache_context._context
        timestep = fields["timestep"]
        # One host read per transformer call (not per attention call) to count steps.
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self._last_timestep is not None and value > self._last_timestep:
            self.new_generation()
        elif self._last_timestep is not None and value < self._last_timestep:
            self._step += 1
        self._last_timestep = value
        step = context.step_index if context is not None and context.step_index is not None else self._step
        branch = context.name if context is not None else None
        cond_rows, uncond_rows = self._cfg_rows(branch, fields["batch_size"])
        return TokenLayout(
            family=self.adapter.family, text_position=self.adapter.text_position, step_index=step,
            generation=self.generation, branch=branch, cond_rows=cond_rows, uncond_rows=uncond_rows, **fields,
        )

    def _cfg_rows(self, branch: str | None, batch_size: int):
        rows = tuple(range(batch_size))
        if branch == "cond":
            return rows, ()
        if branch == "uncond":
            return (), rows
        batched = branch == "cond_uncond"
        if branch is None and self.adapter.batched_cfg and self.pipeline_ref is not None:
            pipeline = self.pipeline_ref()
            batched = bool(getattr(pipeline, "do_classifier_free_guidance", False))
        if batched and batch_size % 2 == 0:
            # diffusers pipelines concatenate [negative, positive].
            return rows[batch_size // 2:], rows[: batch_size // 2]
        return None, None

    def state_for(self, owner: object, info: ModuleInfo, shape: torch.Size) -> dict[str, Any]:
        """State dict of `owner` (a method) for this module, CFG branch and sequence shape."""
        branch = self.layout.branch if self.layout is not None else None
        return self.store.setdefault((id(owner), info.name, branch, tuple(shape)), {})


@dataclass(frozen=True)
class Binding:
    """What the processor needs to know about one attention module."""

    hook: GeometryHook
    adapter: Adapter
    info: ModuleInfo


_BINDINGS: "weakref.WeakKeyDictionary[torch.nn.Module, Binding]" = weakref.WeakKeyDictionary()


def attention_modules(transformer: torch.nn.Module):
    """`(name, module)` of every module of `transformer` that takes an attention processor."""
    for name, module in transformer.named_modules():
        if hasattr(module, "set_processor"):
            yield name, module


def get_hook(transformer: torch.nn.Module) -> GeometryHook | None:
    """The geometry hook registered on `transformer`, if any."""
    registry = getattr(transformer, "_diffusers_hook", None)
    return registry.get_hook(HOOK_NAME) if registry is not None else None


def attach(transformer: torch.nn.Module, pipeline: Any = None) -> tuple[GeometryHook, bool]:
    """Register the geometry hook on `transformer` (once) and bind its attention modules.

    Returns the hook and whether this call registered it. Raises `UnsupportedModelError` for a
    transformer of an unsupported family.
    """
    hook = get_hook(transformer)
    if hook is not None:
        if pipeline is not None:
            hook.pipeline_ref = weakref.ref(pipeline)
        return hook, False
    adapter = adapter_for(transformer)
    hook = GeometryHook(adapter, pipeline)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, HOOK_NAME)
    for name, module in attention_modules(transformer):
        info = adapter.describe(name, module, transformer)
        if info is not None:
            _BINDINGS[module] = Binding(hook, adapter, info)
    return hook, True


def detach(transformer: torch.nn.Module) -> None:
    """Remove the geometry hook and the module bindings from `transformer`, freeing the methods' state
    at once (the hook sits in reference cycles, so it would otherwise wait for the cyclic collector,
    holding GPU memory such as the sparse methods' forecasts)."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.get_hook(HOOK_NAME).new_generation()
        registry.remove_hook(HOOK_NAME, recurse=False)
    for _, module in attention_modules(transformer):
        _BINDINGS.pop(module, None)


def binding_for(attn: torch.nn.Module) -> Binding:
    """The binding of an attention module, attaching the geometry hook on first use.

    A processor set with plain `transformer.set_attn_processor(...)` meets its transformer only
    inside the forward call; the transformer and the call's arguments are then found once on the
    call stack, the hook is attached for later calls, and this call's layout is recorded.
    """
    binding = _BINDINGS.get(attn)
    if binding is not None:
        return binding
    transformer, args, kwargs, pipeline = _find_caller(attn)
    hook, _ = attach(transformer, pipeline)
    hook.layout = hook.record(transformer, args, kwargs)
    logger.info("dit_accel: attached the geometry hook to %s on its first call", type(transformer).__name__)
    binding = _BINDINGS.get(attn)
    if binding is None:
        raise UnsupportedModelError(
            f"{type(attn).__name__} is an attention module of {type(transformer).__name__} that dit-accel has "
            "no adapter for. Set dit_accel.AttnProcessor only on the transformer's blocks, e.g. with "
            "dit_accel.apply(pipe, attention=...)."
        )
    return binding


def _find_caller(attn: torch.nn.Module):
    from diffusers import DiffusionPipeline

    frame = sys._getframe(2)
    transformer = None
    while frame is not None:
        owner = frame.f_locals.get("self")
        if transformer is None:
            if (frame.f_code.co_name == "_call_impl" and isinstance(owner, torch.nn.Module)
                    and find_adapter_class(owner) is not None and any(m is attn for m in owner.modules())):
                transformer = owner
                args, kwargs = frame.f_locals.get("args", ()), frame.f_locals.get("kwargs", {})
        elif isinstance(owner, DiffusionPipeline):
            return transformer, args, kwargs, owner
        frame = frame.f_back
    if transformer is None:
        raise UnsupportedModelError(
            f"dit_accel.AttnProcessor was called by a {type(attn).__name__} that is not inside a supported "
            "transformer (Flux, SD3, Wan, HunyuanVideo, CogVideoX, LTX-Video). Use it through "
            "transformer.set_attn_processor(...) or dit_accel.apply(...) on one of those."
        )
    return transformer, args, kwargs, None
