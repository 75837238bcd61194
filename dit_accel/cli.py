"""The `dit-accel` command."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> str:
    """Versions, device, dense backends (with reasons for the missing ones), families and methods."""
    import torch

    from . import SUPPORTED_MODELS, __version__
    from .backends import auto_backend, detect_backends
    from .methods import METHODS

    lines = [f"dit-accel {__version__}", "", "versions:"]
    lines.append(f"  {'python':<13} {platform.python_version()}")
    for dist in ("torch", "triton", "diffusers", "accelerate", "transformers", "safetensors", "numpy"):
        lines.append(f"  {dist:<13} {_version(dist)}")
    lines += ["", "device:"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append(f"  cpu only ({torch.get_num_threads()} threads); no CUDA device")
    name, why = auto_backend()
    lines += ["", f"dense backends (auto -> {name}: {why}):"]
    for status in detect_backends().values():
        mark = "yes" if status.available else "no "
        lines.append(f"  {status.name:<9} {mark}  {status.detail}")
    lines += ["", "supported families:"]
    for family, cls in SUPPORTED_MODELS.items():
        lines.append(f"  {family:<14} {cls}")
    lines += ["", "attention methods:"]
    for method in METHODS:
        lines.append(f"  {method}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dit-accel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, device, backends, supported families and methods")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
