"""SoftPAG as a guider of diffusers' modular pipelines.

    from dit_accel.guiders import SoftPAGGuider
    guider = SoftPAGGuider(guidance_scale=5.0, heads={12: [3, 7]}, strength=1.0, perturbed_guidance_scale=3.0)
    pipe.update_components(guider=guider)          # a ModularPipeline (Wan, Flux, SD3, ...)

The modular denoise loop runs one denoiser call per prediction the guider asks for: ``pred_cond``,
``pred_uncond`` (with CFG) and ``pred_cond_perturbed`` (while SoftPAG is active), and combines them
as ``eps_u + g (eps_c - eps_u) + s (eps_c - eps_pert)`` (without CFG: ``eps_c + s (eps_c - eps_pert)``),
the same formula as ``apply(pipe, guidance=SoftPAG(...))`` on stock pipelines. On the first call the
guider wraps the denoiser's attention (a dit-accel method already installed there is kept inside)
so that the chosen heads are perturbed during the perturbed call only; :meth:`SoftPAGGuider.remove`
restores the processors.
"""

from __future__ import annotations

import math
import weakref

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg

from .guidance import Perturbed, SoftPAG


class SoftPAGGuider(BaseGuidance):
    """Classifier-free guidance plus SoftPAG on chosen heads, for modular pipelines.

    Args:
        guidance_scale: ``g`` of classifier-free guidance (1.0 turns CFG off).
        heads, preset, strength, rows: as :class:`dit_accel.SoftPAG`.
        perturbed_guidance_scale: ``s`` (``None``: the preset's, else 3.0).
        perturbed_guidance_start, perturbed_guidance_stop: the fraction of the steps with SoftPAG.
        guidance_rescale, use_original_formulation, start, stop, enabled: as diffusers' guiders.
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_perturbed"]

    @register_to_config
    def __init__(self, guidance_scale: float = 5.0, heads: dict | None = None, preset: str | None = None,
                 strength: float | None = None, perturbed_guidance_scale: float | None = None,
                 rows: str | None = None, perturbed_guidance_start: float = 0.0, perturbed_guidance_stop: float = 1.0,
                 guidance_rescale: float = 0.0, use_original_formulation: bool = False, start: float = 0.0,
                 stop: float = 1.0, enabled: bool = True):
        super().__init__(start, stop, enabled)
        self.pag = SoftPAG(heads=heads, preset=preset, strength=strength, scale=perturbed_guidance_scale, rows=rows)
        if not 0.0 <= perturbed_guidance_start < perturbed_guidance_stop <= 1.0:
            raise ValueError(f"SoftPAGGuider(perturbed_guidance_start={perturbed_guidance_start}, "
                             f"perturbed_guidance_stop={perturbed_guidance_stop}): need 0 <= start < stop <= 1")
        self.guidance_scale = guidance_scale
        self.perturbed_guidance_scale = self.pag.scale
        self.perturbed_guidance_start = perturbed_guidance_start
        self.perturbed_guidance_stop = perturbed_guidance_stop
        self.guidance_rescale = guidance_rescale
        self.use_original_formulation = use_original_formulation
        self._handles: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._perturbing = None

    # -- models -----------------------------------------------------------------------------
    def _install(self, denoiser: torch.nn.Module) -> None:
        if denoiser in self._handles:
            return
        import dit_accel
        from dit_accel import AttnProcessor, Dense

        from .apply import _perturbable_layers
        from .adapters import adapter_for

        self.pag.check(_perturbable_layers(denoiser, adapter_for(denoiser)))
        current = {type(p) for p in denoiser.attn_processors.values()}
        inner = Dense()
        if current == {AttnProcessor}:  # a dit-accel method is installed: keep it inside
            inner = next(iter(denoiser.attn_processors.values())).method
            if isinstance(inner, Perturbed):
                inner = inner.inner
        self._handles[denoiser] = dit_accel.apply(denoiser, attention=Perturbed(inner, self.pag))

    def remove(self, denoiser: torch.nn.Module | None = None) -> None:
        """Restore the attention processors of ``denoiser`` (every prepared denoiser when ``None``)."""
        for d in [denoiser] if denoiser is not None else list(self._handles):
            handle = self._handles.pop(d, None)
            if handle is not None:
                handle.remove()

    def _is_perturbed_call(self) -> bool:
        return self._is_pag_enabled() and self._count_prepared == self.num_conditions

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        self._install(denoiser)
        if self._is_perturbed_call():
            self._perturbing = self.pag.perturbing()  # every row of this call
            self._perturbing.__enter__()

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._perturbing is not None:
            self._perturbing.__exit__(None, None, None)
            self._perturbing = None

    # -- inputs -----------------------------------------------------------------------------
    def _plan(self) -> tuple[list[int], list[str]]:
        predictions = ["pred_cond"]
        if self._is_cfg_enabled():
            predictions.append("pred_uncond")
        if self._is_pag_enabled():
            predictions.append("pred_cond_perturbed")
        return [1 if p == "pred_uncond" else 0 for p in predictions], predictions

    def prepare_inputs(self, data):
        indices, predictions = self._plan()
        return [self._prepare_batch(data, i, p) for i, p in zip(indices, predictions)]

    def prepare_inputs_from_block_state(self, data, input_fields):
        indices, predictions = self._plan()
        return [self._prepare_batch_from_block_state(input_fields, data, i, p) for i, p in zip(indices, predictions)]

    # -- guidance -----------------------------------------------------------------------------
    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None,
                pred_cond_perturbed: torch.Tensor | None = None) -> GuiderOutput:
        cfg, pag = self._is_cfg_enabled(), self._is_pag_enabled()
        if cfg:
            pred = pred_cond if self.use_original_formulation else pred_uncond
            pred = pred + self.guidance_scale * (pred_cond - pred_uncond)
        else:
            pred = pred_cond
        if pag:
            pred = pred + self.perturbed_guidance_scale * (pred_cond - pred_cond_perturbed)
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1 or self._is_perturbed_call()

    @property
    def num_conditions(self) -> int:
        return 1 + int(self._is_cfg_enabled()) + int(self._is_pag_enabled())

    def _in_range(self, start: float, stop: float) -> bool:
        if self._num_inference_steps is None:
            return True
        return int(start * self._num_inference_steps) <= self._step < int(stop * self._num_inference_steps)

    def _is_cfg_enabled(self) -> bool:
        if not self._enabled or not self._in_range(self._start, self._stop):
            return False
        return not math.isclose(self.guidance_scale, 0.0 if self.use_original_formulation else 1.0)

    def _is_pag_enabled(self) -> bool:
        if not self._enabled or not self._in_range(self.perturbed_guidance_start, self.perturbed_guidance_stop):
            return False
        return not math.isclose(self.perturbed_guidance_scale, 0.0) and self.pag.strength > 0


__all__ = ["SoftPAGGuider"]
