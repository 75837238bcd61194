"""Eval run configuration as plain data, validated before anything is generated.

A configs file (YAML or JSON)::

    size: {num_frames: 9, height: 48, width: 48}    # optional: the pipeline's default size
    steps: 20                                       # optional: the pipeline's default
    guidance_scale: 4.0                             # optional: the pipeline's default
    baseline: baseline                              # optional: the config every other is compared to
    configs:
      - name: neighborhood
        attention: {method: Neighborhood, window: [0.5, 0.5, 0.5]}
      - name: temporal-sparse
        attention: {method: TemporalSparse, threshold: -8}

The stock pipeline runs as the config named ``baseline`` unless the file names another one (which
must then be in ``configs``). Every error names the field (``configs[1].attention.window``), what
it must be and how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from ..methods import METHODS

BASELINE = "baseline"
_TOP_KEYS = {"size", "steps", "guidance_scale", "baseline", "configs", "seeds"}
_CONFIG_KEYS = {"name", "attention", "cache", "guidance", "size", "steps", "guidance_scale"}
_SIZE_KEYS = {"num_frames", "height", "width"}


class ConfigError(ValueError):
    """A bad eval configuration; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One configuration of a run: a name and its attention method as plain data (None: stock)."""

    name: str
    attention: dict | None = None

    def method(self):
        """A fresh attention method instance (None for the stock processors)."""
        if self.attention is None:
            return None
        params = {k: v for k, v in self.attention.items() if k != "method"}
        return METHODS[self.attention["method"]](**params)

    def to_dict(self) -> dict:
        return {"name": self.name, "attention": self.attention}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    configs: tuple[RunConfig, ...]  # the baseline first
    size: dict
    steps: int | None
    guidance_scale: float | None
    seeds: tuple[int, ...] | None

    @property
    def baseline(self) -> RunConfig:
        return self.configs[0]

    def to_dict(self) -> dict:
        return {"configs": [c.to_dict() for c in self.configs], "size": self.size, "steps": self.steps,
                "guidance_scale": self.guidance_scale, "seeds": list(self.seeds) if self.seeds else None}


def load_configs(path: str | Path) -> dict:
    """Read a YAML (``.yaml`` / ``.yml``) or JSON configs file as plain data."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--configs {path}: no such file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(f"--configs {path}: reading YAML needs PyYAML (pip install pyyaml), or write the "
                              "same data as JSON") from exc
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--configs {path}: not valid JSON ({exc}); YAML files must end in .yaml") from exc
    return data


def _check_size(size: Any, where: str) -> dict:
    if not isinstance(size, dict) or set(size) - _SIZE_KEYS or not size:
        raise ConfigError(f"{where}: expected a mapping with some of {sorted(_SIZE_KEYS)}, got {size!r}")
    for k, v in size.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}.{k}: must be a positive integer, got {v!r}")
    return dict(size)


def check_attention(att: Any, where: str) -> dict | None:
    """Validate one attention entry (``None``/``"stock"``, a method name, or ``{method: NAME, ...}``):
    ``{"method": NAME, **parameters}`` (lists made tuples; the method is built once to check them), or
    ``None`` for the stock processors.
    Raises :class:`ConfigError` naming ``where`` and the problem."""
    if att is None or att == "stock":
        return None
    if isinstance(att, str):
        att = {"method": att}
    if not isinstance(att, dict) or "method" not in att:
        raise ConfigError(f"{where}: expected {{method: NAME, ...parameters}} with NAME one of {sorted(METHODS)}, "
                          f"got {att!r}")
    name = att["method"]
    if name not in METHODS:
        raise ConfigError(f"{where}.method: unknown method {name!r}; choose from {sorted(METHODS)}")
    cls = METHODS[name]
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in att:
        if key != "method" and key not in known:
            raise ConfigError(f"{where}.{key}: {name} has no parameter {key!r}; its parameters are {sorted(known)}")
    params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in att.items() if k != "method"}
    try:
        cls(**params)
    except (TypeError, ValueError) as exc:
        field = next((k for k in params if re.search(rf"\b{re.escape(k)}\b", str(exc))), None)
        raise ConfigError(f"{where}.{field or 'method'}: {exc}") from exc
    return {"method": name, **params}


def parse_spec(data: Any) -> RunSpec:
    """Validate configs data (see the module docstring) into a :class:`RunSpec`; raises ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"configs file: expected a mapping with a 'configs' list, got {type(data).__name__}")
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{key}: unknown field; allowed are {sorted(_TOP_KEYS)}")
    size = _check_size(data["size"], "size") if data.get("size") is not None else {}
    steps = data.get("steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ConfigError(f"steps: must be a positive integer, got {steps!r}")
    cfg_scale = data.get("guidance_scale")
    if cfg_scale is not None and (not isinstance(cfg_scale, (int, float)) or isinstance(cfg_scale, bool)
                                  or cfg_scale < 0):
        raise ConfigError(f"guidance_scale: must be a number >= 0, got {cfg_scale!r}")
    seeds = data.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"seeds: must be a non-empty list of integers, got {seeds!r}")
    items = data.get("configs")
    if not isinstance(items, list) or not items:
        raise ConfigError("configs: must be a non-empty list of {name, attention} entries")
    configs, names = [], set()
    for i, item in enumerate(items):
        where = f"configs[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping with 'name' and 'attention', got {item!r}")
        for key in item:
            if key not in _CONFIG_KEYS:
                raise ConfigError(f"{where}.{key}: unknown field; allowed are {sorted(_CONFIG_KEYS)}")
        name = item.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ConfigError(f"{where}.name: must be a name of letters, digits, '.', '_' or '-', got {name!r}")
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} is used twice; names must be unique")
        names.add(name)
        for key in ("cache", "guidance"):
            if item.get(key) is not None:
                raise ConfigError(f"{where}.{key}: no {key} methods exist in this version of dit-accel yet; "
                                  f"remove the field")
        for key in ("size", "steps", "guidance_scale"):
            if key in item and item[key] != data.get(key):
                what = "resolution" if key == "size" else key
                raise ConfigError(f"{where}.{key}: every config must use the run's {what} ({data.get(key)!r}) so "
                                  f"that it can be compared with the baseline; set it once at the top level")
        configs.append(RunConfig(name, check_attention(item.get("attention"), f"{where}.attention")))
    baseline = data.get("baseline", BASELINE)
    if not isinstance(baseline, str):
        raise ConfigError(f"baseline: must be a config name, got {baseline!r}")
    if baseline == BASELINE and BASELINE not in names:
        configs.insert(0, RunConfig(BASELINE, None))
    elif baseline not in names:
        raise ConfigError(f"baseline: {baseline!r} is not one of the configs {sorted(names)}; name one of them or "
                          f"leave the field out to compare with the stock pipeline")
    else:
        configs.sort(key=lambda c: c.name != baseline)
    return RunSpec(tuple(configs), size, steps, None if cfg_scale is None else float(cfg_scale),
                   tuple(seeds) if seeds else None)


__all__ = ["BASELINE", "ConfigError", "RunConfig", "RunSpec", "load_configs", "parse_spec"]
