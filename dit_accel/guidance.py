"""Head-level perturbation guidance: SoftPAG.

"Fine-Grained Perturbation Guidance via Attention Head Selection": the perturbed pass replaces the
attention map of chosen (layer, head) pairs by ``A' = (1 - u) A + u I``, so each chosen head's
output becomes ``(1 - u) attn(q, k, v) + u v``: no attention map is materialized, and it works on
top of any attention method (the method computes ``attn(q, k, v)``; the mix is applied to its
output). Only self and joint attention are perturbed (identity needs queries and keys over one
sequence); with ``rows="image"`` the text rows of joint attention keep their attention.

This module holds the configuration and the perturbation; :func:`dit_accel.apply` with
``guidance=SoftPAG(...)`` installs it. Inside :meth:`SoftPAG.perturbing` the attention of the given
batch rows is perturbed (all rows when none are given).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .layout import AttentionCall
from .methods.base import AttentionMethod


def _heads_map(heads) -> dict[int, tuple[int, ...]]:
    if not isinstance(heads, dict) or not heads:
        raise ValueError(f"SoftPAG(heads={heads!r}): expected a non-empty dict {{layer: [head, ...]}} or preset=PATH")
    out = {}
    for layer, hs in heads.items():
        try:
            layer_i = int(layer)  # JSON keys are strings
        except (TypeError, ValueError):
            raise ValueError(f"SoftPAG(heads): layer {layer!r} is not an int") from None
        if layer_i < 0 or isinstance(hs, int | str) or not hs:
            raise ValueError(f"SoftPAG(heads[{layer!r}]={hs!r}): expected layer >= 0 and a non-empty list of "
                             "head indices")
        if any(not isinstance(h, int) or isinstance(h, bool) or h < 0 for h in hs):
            raise ValueError(f"SoftPAG(heads[{layer!r}]={hs!r}): head indices must be ints >= 0")
        out[layer_i] = tuple(sorted(set(hs)))
    return out


_DEFAULTS = {"strength": 1.0, "scale": 3.0, "rows": "image"}


def read_preset(path, where: str = "preset") -> dict:
    """A preset JSON (as ``dit-accel headhunt`` saves) as a dict; errors start with ``where``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file {str(path)!r}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not a JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("heads"), dict):
        raise ValueError(f"{where}: expected a JSON object with 'heads' {{layer: [head, ...]}}, as dit-accel headhunt "
                         "saves")
    return data


@dataclass
class SoftPAG:
    """Soft perturbed-attention guidance on chosen heads.

    Args:
        heads: ``{layer: [head, ...]}`` (layers count transformer blocks in execution order, as
            ``ModuleInfo.layer``), or ``None`` with ``preset``.
        strength: ``u`` in [0, 1]: 0 leaves attention unchanged, 1 is identity attention.
        scale: ``s``, the guidance weight of ``(eps_c - eps_pert)``.
        rows: ``"image"`` (perturb the image/video query rows; text rows of joint attention keep
            theirs) or ``"all"``.
        adaptive_scale: lowers ``s`` as denoising proceeds, as diffusers' PAG does:
            ``max(0, s - adaptive_scale * (1000 - t))``.
        start, stop: the fraction of the denoising steps in which guidance is applied.
        preset: a JSON file with ``heads`` (and optionally ``strength``, ``scale``, ``rows``), as
            a HeadHunter search saves (:func:`headhunt`); explicit arguments win over the file.

    ``strength``, ``scale`` and ``rows`` left unset take the preset's values, else 1.0, 3.0 and
    ``"image"``.
    """

    heads: dict | None = None
    strength: float | None = None
    scale: float | None = None
    rows: str | None = None
    adaptive_scale: float = 0.0
    start: float = 0.0
    stop: float = 1.0
    preset: str | None = None
    _active: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.preset is not None:
            data = read_preset(self.preset, f"SoftPAG(preset={self.preset!r})")
            for name in ("heads", "strength", "scale", "rows"):
                if getattr(self, name) is None and data.get(name) is not None:
                    setattr(self, name, data[name])
        for name, default in _DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        self.heads = _heads_map(self.heads)
        if not 0.0 <= float(self.strength) <= 1.0:
            raise ValueError(f"SoftPAG(strength={self.strength}): u must be in [0, 1] (0 = no perturbation, "
                             "1 = identity attention)")
        if self.rows not in ("image", "all"):
            raise ValueError(f"SoftPAG(rows={self.rows!r}): expected 'image' or 'all'")
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise ValueError(f"SoftPAG(start={self.start}, stop={self.stop}): need 0 <= start < stop <= 1")
        if self.adaptive_scale < 0:
            raise ValueError(f"SoftPAG(adaptive_scale={self.adaptive_scale}): must be >= 0")

    def to_dict(self) -> dict:
        return {"guidance": "SoftPAG", "heads": {str(k): list(v) for k, v in self.heads.items()},
                "strength": self.strength, "scale": self.scale, "rows": self.rows,
                "adaptive_scale": self.adaptive_scale, "start": self.start, "stop": self.stop}

    @contextlib.contextmanager
    def perturbing(self, rows=None):
        """Within this block, attention of the batch ``rows`` (a sequence of indices; ``None``: every
        row) is perturbed in the chosen heads."""
        previous = self._active
        self._active = "all" if rows is None else tuple(int(r) for r in rows)
        try:
            yield self
        finally:
            self._active = previous

    def check(self, modules: dict[int, tuple[str, int]]) -> None:
        """Check the heads against a model: ``modules`` maps each layer with self or joint attention
        to (module name, heads)."""
        for layer, hs in self.heads.items():
            if layer not in modules:
                raise ValueError(f"SoftPAG(heads): layer {layer} has no self or joint attention in this model; layers "
                                 f"with it: {sorted(modules)}")
            name, n = modules[layer]
            if max(hs) >= n:
                raise ValueError(f"SoftPAG(heads[{layer}]={list(hs)}): {name} has {n} heads (0..{n - 1})")

    def mix(self, out: torch.Tensor, value: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """The perturbed output of one attention call (``out`` unchanged when nothing applies)."""
        if self._active is None or self.strength == 0 or call is None or call.module.kind not in ("self", "joint"):
            return out
        heads = self.heads.get(call.module.layer)
        if not heads or out.shape[2] != value.shape[2]:
            return out
        seq = slice(None)
        if self.rows == "image" and call.module.kind == "joint" and call.text_span is not None:
            start, stop = call.text_span
            if start == 0:
                seq = slice(stop, None)
            elif stop == out.shape[2]:
                seq = slice(0, start)
        b = (torch.arange(out.shape[0], device=out.device) if self._active == "all"
             else torch.tensor(self._active, device=out.device))
        h = torch.tensor(heads, device=out.device)
        idx = (b[:, None], h[None, :], seq)
        u = float(self.strength)
        out = out.clone()
        out[idx] = value[idx] if u == 1.0 else ((1 - u) * out[idx].float() + u * value[idx].float()).to(out.dtype)
        return out


class Perturbed(AttentionMethod):
    """An attention method whose output is perturbed by a :class:`SoftPAG` where it is active."""

    def __init__(self, inner: AttentionMethod, pag: SoftPAG) -> None:
        self.inner = inner
        self.pag = pag

    def __call__(self, query, key, value, attn_mask, call=None):
        return self.pag.mix(self.inner(query, key, value, attn_mask, call), value, call)

    def to_dict(self) -> dict:
        return {**self.inner.to_dict(), "guidance": self.pag.to_dict()}

    def __repr__(self) -> str:
        return f"Perturbed({self.inner!r}, {self.pag!r})"


# ----------------------------------------------------------------------------------------------
# Guidance without forking pipelines


def _sample(output):
    """The prediction tensor of a transformer output (tuple or ``Transformer2DModelOutput``)."""
    return output[0] if isinstance(output, tuple) else output.sample


def _with_sample(output, sample):
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output


def _extend(value, batch: int, rows: torch.Tensor):
    """A forward argument with the ``rows`` of its batch appended (tensors whose first dim is the
    batch); anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return torch.cat([value, value.index_select(0, rows.to(value.device))])
    return value


class GuidanceRunner:
    """Installed by ``apply(pipe, guidance=SoftPAG(...))``: the transformer's conditional calls run
    a perturbed copy of their conditional rows in the same batch, and the pipeline's scheduler
    step adds ``s (eps_c - eps_pert)`` to the prediction it receives (after the pipeline's own
    CFG), so any stock pipeline yields ``eps_u + g (eps_c - eps_u) + s (eps_c - eps_pert)`` (and
    ``eps_c + s (eps_c - eps_pert)`` without CFG) without knowing ``g``."""

    def __init__(self, pag: SoftPAG, pipeline, hooks) -> None:
        self.pag = pag
        self.pipeline = pipeline
        self.hooks = hooks  # transformer -> its geometry hook
        self.pending: torch.Tensor | None = None
        self._saved = []

    def install(self, transformers) -> None:
        scheduler = self.pipeline.scheduler
        step = scheduler.step
        runner = self

        def guided_step(model_output, *args, **kwargs):
            if runner.pending is not None:
                delta, runner.pending = runner.pending, None
                if delta.shape != model_output.shape:
                    raise RuntimeError(f"SoftPAG: the scheduler got a prediction of shape {tuple(model_output.shape)} "
                                       f"but the conditional rows gave {tuple(delta.shape)}; this pipeline reshapes "
                                       "its prediction between the transformer and the scheduler")
                model_output = model_output + delta.to(model_output.dtype)
            return step(model_output, *args, **kwargs)

        scheduler.step = guided_step
        self._saved.append((scheduler, "step", "step" in vars(scheduler), step))
        for t in transformers:
            forward = t.forward

            def guided_forward(*args, _forward=forward, _t=t, **kwargs):
                return runner.forward(_t, _forward, args, kwargs)

            self._saved.append((t, "forward", "forward" in vars(t), forward))
            t.forward = guided_forward

    def remove(self) -> None:
        for obj, name, own, value in reversed(self._saved):
            if own:
                setattr(obj, name, value)
            else:
                delattr(obj, name)
        self._saved.clear()
        self.pending = None

    def _scale(self, timestep) -> float | None:
        """s at this timestep, or None outside [start, stop) of the schedule."""
        pag = self.pag
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        timesteps = getattr(self.pipeline.scheduler, "timesteps", None)
        if timesteps is not None and len(timesteps) and (pag.start > 0 or pag.stop < 1):
            ts = torch.as_tensor(timesteps).float().cpu()
            i = int((ts - t).abs().argmin())
            if not pag.start <= i / len(ts) < pag.stop:
                return None
        return max(0.0, pag.scale - pag.adaptive_scale * (1000 - t)) if pag.adaptive_scale else pag.scale

    def forward(self, transformer, forward, args, kwargs):
        hook = self.hooks[transformer]
        context = hook.cache_context._context
        branch = context.name if context is not None else None
        if branch == "uncond":  # nothing conditional in this call
            return forward(*args, **kwargs)
        adapter = hook.adapter
        arguments = adapter.bind_arguments(transformer, args, kwargs)
        arguments.pop("self", None)
        for name, param in adapter._signature.parameters.items():  # **kwargs of forward: pass them flat
            if param.kind is param.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
            elif param.kind is param.VAR_POSITIONAL and arguments.pop(name, ()):
                raise TypeError(f"SoftPAG: {type(transformer).__name__}.forward got extra positional arguments")
        batch = arguments["hidden_states"].shape[0]
        cond, _ = hook._cfg_rows(branch, batch)
        if cond is None:
            cond = tuple(range(batch))  # no CFG in this call: every row is conditional
        scale = self._scale(arguments["timestep"]) if cond else None
        if not cond or scale is None or scale == 0:
            return forward(*args, **kwargs)
        rows = torch.tensor(cond)
        extended = {k: _extend(v, batch, rows) for k, v in arguments.items()}
        with self.pag.perturbing(rows=range(batch, batch + len(cond))):
            output = forward(**extended)
        sample = _sample(output)
        eps, pert = sample[:batch], sample[batch:]
        delta = scale * (eps.index_select(0, rows.to(eps.device)).float() - pert.float())
        self.pending = delta  # consumed by the next scheduler step
        return _with_sample(output, eps)


from .headhunt import HeadHuntResult, headhunt, perturbable_heads  # noqa: E402  (the search over SoftPAG heads)

__all__ = ["GuidanceRunner", "HeadHuntResult", "Perturbed", "SoftPAG", "headhunt", "perturbable_heads"]
